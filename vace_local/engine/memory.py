"""Memory policies: where the weights live while a job runs.

- `none`: everything resident on the GPU (fastest).
- `model`: diffusers model CPU offload — one component on the GPU at a time.
- `group`: group offload — transformer leaf groups (prefetched on a CUDA stream while the previous one runs),
  text-encoder blocks a few at a time.
- `sequential`: sequential CPU offload — lowest VRAM, slowest.
`auto` picks from free VRAM and the model's footprint. Each policy is a removable diffusers hook.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vace_local.core.errors import InputError, InsufficientMemory
from vace_local.core.spec import OFFLOAD_POLICIES as POLICIES
from vace_local.core.spec import MemoryPolicy as Policy
from vace_local.core.spec import latent_tokens

GIB = 1024**3


@dataclass(frozen=True)
class Footprint:
    """Bytes of each component as it will sit on the GPU."""

    transformer: int  # one expert
    text_encoder: int
    vae: int
    experts: int = 1
    #: Helper models sharing the GPU with the pipeline (prompt expander, safety checker).
    aux: int = 0

    @property
    def total(self) -> int:
        return self.transformer * self.experts + self.text_encoder + self.vae + self.aux


def activation_reserve(width: int = 832, height: int = 480, num_frames: int = 81) -> int:
    """Headroom for activations and the VAE decode; grows with the token count (rough, measured-order)."""
    tokens = latent_tokens(width, height, num_frames)
    return int(4 * GIB + tokens * 160 * 1024)  # ~9 GiB at 480p×81, ~16 GiB at 720p×81


def vram_needs(fp: Footprint, reserve: int) -> dict[Policy, int]:
    """GPU bytes each policy needs: what stays resident under it plus the activation reserve."""
    return {
        "none": fp.total + reserve,
        # Model offload needs the largest single component resident (an expert, or the text encoder).
        "model": max(fp.transformer, fp.text_encoder) + fp.vae + fp.aux + reserve,
        # Group offload keeps only a few leaf groups plus the VAE resident; streams need ~2 groups in flight.
        "group": fp.vae + fp.aux + reserve + fp.transformer // 10,
        # Sequential streams every layer; the VAE and the activations are what must fit.
        "sequential": fp.vae + fp.aux + reserve,
    }


def choose_policy(free_vram: int | None, fp: Footprint, reserve: int | None = None) -> Policy:
    """Pick the fastest policy that fits. `free_vram=None` means no CUDA: run resident on the CPU."""
    if free_vram is None:
        return "none"
    needs = vram_needs(fp, activation_reserve() if reserve is None else reserve)
    return next((p for p in ("none", "model", "group") if needs[p] <= free_vram), "sequential")


# -- the load-time plan: dtype and policy from parameter counts, free VRAM and free host RAM -------------

#: Host RAM needed beside the weights: a small job's activations and transient load buffers (the process's own
#: imports are already outside the MemAvailable it is compared with).
HOST_RESERVE = GIB
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ComponentSize:
    """Parameter counts of one component, read from its config on the meta device (no weights loaded)."""

    params: int
    #: Parameters the loader keeps in fp32 when asked for bf16 / fp16 (the class's `_keep_in_fp32_modules`).
    fp32_at_bf16: int = 0
    fp32_at_fp16: int = 0
    #: Parameters that fp8 storage (diffusers layerwise casting) stores at one byte.
    fp8: int = 0

    def nbytes(self, dtype: str, fp8_storage: bool = False) -> int:
        kept = {"fp32": 0, "bf16": self.fp32_at_bf16, "fp16": self.fp32_at_fp16}[dtype]
        cast = self.fp8 if fp8_storage else 0  # layerwise casting skips the fp32-kept modules
        return cast + 4 * kept + DTYPE_BYTES[dtype] * (self.params - kept - cast)


@dataclass(frozen=True)
class ModelSize:
    """A pipeline's parameter counts, before anything is loaded (see `vace_local.engine.models.model_size`)."""

    transformer: ComponentSize  # one expert
    text_encoder: ComponentSize
    vae: ComponentSize  # always loaded in fp32
    experts: int = 1

    @property
    def params(self) -> int:
        return self.transformer.params * self.experts + self.text_encoder.params + self.vae.params

    def footprint(self, dtype: str, *, fp8_storage: bool = False, aux: int = 0) -> Footprint:
        """Bytes per component once loaded in `dtype` (the VAE in fp32; fp8 storage shrinks the transformer)."""
        return Footprint(self.transformer.nbytes(dtype, fp8_storage), self.text_encoder.nbytes(dtype),
                         self.vae.nbytes("fp32"), self.experts, aux)


@dataclass(frozen=True)
class MemoryPlan:
    """What `auto` chose at load time and the numbers it chose from (logged, and in each job's metadata)."""

    device: str
    dtype: str  # "bf16" | "fp16" | "fp32" (transformer and text encoder; the VAE is fp32)
    policy: Policy
    footprint: Footprint
    params: int
    free_vram: int | None  # None: no CUDA device
    free_ram: int
    vram_need: int | None  # GPU bytes the policy needs (resident weights + activation reserve)
    ram_need: int  # host bytes: the weights kept on the host + HOST_RESERVE
    reason: str
    fits: bool = True  # False only for an explicit dtype / offload that does not fit (a warning, not an error)

    def as_dict(self) -> dict[str, object]:
        fp = self.footprint
        return {
            "dtype": self.dtype, "offload": self.policy, "reason": self.reason, "fits": self.fits,
            "params": self.params, "weights_bytes": fp.total,
            "component_bytes": {"transformer": fp.transformer, "experts": fp.experts,
                                "text_encoder": fp.text_encoder, "vae": fp.vae, "aux": fp.aux},
            "free_vram_bytes": self.free_vram, "vram_need_bytes": self.vram_need,
            "free_ram_bytes": self.free_ram, "ram_need_bytes": self.ram_need,
        }


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.1f} GiB"


def _weights(fp: Footprint, dtype: str) -> str:
    experts = f" x {fp.experts} experts" if fp.experts > 1 else ""
    aux = f", helper models {gib(fp.aux)}" if fp.aux else ""
    return (f"{dtype} weights {gib(fp.total)} (transformer {gib(fp.transformer)}{experts}, "
            f"text encoder {gib(fp.text_encoder)}, VAE {gib(fp.vae)}{aux})")


def plan_memory(size: ModelSize, *, device: str, free_vram: int | None, free_ram: int, dtype: str = "auto",
                offload: str = "auto", aux: int = 0, fp8_storage: bool = False,
                reserve: int | None = None) -> MemoryPlan:
    """Choose dtype and memory policy before loading, counting VRAM and host RAM.

    CPU: `auto` dtype is fp32 when the fp32 weights fit in free RAM, else bf16. CUDA: bf16; the policy is the
    fastest whose VRAM need fits and whose host copy (offload policies keep one CPU copy of the weights) fits
    in RAM. When nothing fits under `auto`, raise InsufficientMemory with the numbers; an explicit dtype or
    policy that does not fit is kept and flagged (`fits=False`).
    """
    if not device.startswith("cuda"):
        return _plan_cpu(size, device, free_ram, dtype, offload, aux, fp8_storage)
    if free_vram is None:
        raise ValueError("a CUDA plan needs the free VRAM")
    chosen = "bf16" if dtype == "auto" else dtype
    fp = size.footprint(chosen, fp8_storage=fp8_storage, aux=aux)
    reserve = activation_reserve() if reserve is None else reserve
    vram = vram_needs(fp, reserve)
    host_copy = fp.total - fp.aux + HOST_RESERVE
    ram: dict[Policy, int] = {p: (HOST_RESERVE if p == "none" else host_copy) for p in POLICIES if p != "auto"}
    dtype_why = "bf16 on CUDA" if dtype == "auto" else f"{chosen} as set"
    head = f"{_weights(fp, chosen)}; free VRAM {gib(free_vram)}, free RAM {gib(free_ram)}"
    if offload != "auto":
        policy: Policy = offload  # type: ignore[assignment]
        fits = vram[policy] <= free_vram and ram[policy] <= free_ram
        why = f"offload={policy} as set" + ("" if fits else (
            f" (does not fit: needs {gib(vram[policy])} VRAM and {gib(ram[policy])} RAM)"))
        return MemoryPlan(device, chosen, policy, fp, size.params, free_vram, free_ram, vram[policy], ram[policy],
                          f"dtype {dtype_why}; {why}; {head}", fits)
    steps: list[str] = []
    for policy in ("none", "model", "group", "sequential"):
        v_ok, r_ok = vram[policy] <= free_vram, ram[policy] <= free_ram
        if (v_ok or policy == "sequential") and r_ok:
            ram_txt = "" if policy == "none" else f", one host copy needs {gib(ram[policy])} RAM"
            steps.append(f"{policy} needs {gib(vram[policy])} VRAM{ram_txt}")
            return MemoryPlan(device, chosen, policy, fp, size.params, free_vram, free_ram, vram[policy],
                              ram[policy], f"dtype {dtype_why}; offload={policy}: " + "; ".join(steps) + f"; {head}")
        what = f"{gib(vram[policy])} VRAM" if not v_ok else f"{gib(ram[policy])} RAM"
        steps.append(f"{policy} needs {what}")
    raise InsufficientMemory(
        f"the model does not fit this machine: {_weights(fp, chosen)}; free VRAM {gib(free_vram)} (resident "
        f"needs {gib(vram['none'])} incl. {gib(reserve)} for activations), free RAM {gib(free_ram)} (offloading "
        f"keeps one host copy: {gib(host_copy)}). Free memory, use a larger machine, or try --fp8 storage"
    )


def _plan_cpu(size: ModelSize, device: str, free_ram: int, dtype: str, offload: str, aux: int,
              fp8_storage: bool) -> MemoryPlan:
    policy: Policy = "none" if offload == "auto" else offload  # type: ignore[assignment]
    pol_why = "offload=none: the CPU runs resident" if offload == "auto" else f"offload={policy} as set"

    def plan(d: str, why: str, fits: bool = True) -> MemoryPlan:
        fp = size.footprint(d, fp8_storage=fp8_storage)
        need = fp.total + HOST_RESERVE
        text = f"dtype {why}; {pol_why}; {_weights(fp, d)}; free RAM {gib(free_ram)}, needed {gib(need)}"
        return MemoryPlan(device, d, policy, fp, size.params, None, free_ram, None, need, text, fits)

    def need(d: str) -> int:
        return size.footprint(d, fp8_storage=fp8_storage).total + HOST_RESERVE

    if dtype != "auto":
        return plan(dtype, f"{dtype} as set", need(dtype) <= free_ram)
    if need("fp32") <= free_ram:
        return plan("fp32", "fp32: the fp32 weights fit in RAM")
    if need("bf16") <= free_ram:
        return plan("bf16", f"bf16: fp32 would need {gib(need('fp32'))} RAM")
    fp = size.footprint("bf16", fp8_storage=fp8_storage)
    raise InsufficientMemory(
        f"the model does not fit this machine: {_weights(fp, 'bf16')}; no CUDA device (free VRAM 0), free RAM "
        f"{gib(free_ram)}, needed {gib(need('bf16'))} (weights + {gib(HOST_RESERVE)} for the process). "
        "Free memory, use a machine with more RAM or a GPU, or a smaller model"
    )


def host_free_ram() -> int:
    """Host RAM this process can still use: MemAvailable, capped by a cgroup v2 (container) limit, whose usage
    counts reclaimable page cache, so inactive file pages are taken off it."""
    free = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    cg = Path("/sys/fs/cgroup")
    try:
        limit = (cg / "memory.max").read_text().strip()
        usage = int((cg / "memory.current").read_text())
        stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return free
    if limit.isdigit():
        free = min(free, max(0, int(limit) - usage + int(stat.get("inactive_file", 0))))
    return free


def wants_vae_tiling(policy: Policy, free_vram: int | None) -> bool:
    """Tile the VAE whenever memory is tight (anything but fully resident, or < 24 GiB free)."""
    if free_vram is None:
        return False
    return policy != "none" or free_vram < 24 * GIB


def has_streams(device: str) -> bool:
    """Whether `device`'s backend has the async copy streams group offload can overlap transfers with."""
    return device.split(":")[0] in ("cuda", "xpu")


def apply_policy(pipe, policy: Policy, device: str) -> None:  # noqa: ANN001 - WanVACEPipeline
    """Install the hooks for `policy` on a pipeline that currently lives on the CPU.

    Hooks of our own on the denoiser must be registered before this (see `DenoiserForward.install`): accelerate's
    model offload re-installs its hooks after every pipeline call and restores the forward it found first.
    Any policy runs on the CPU too (onload device = CPU), so the same hook code a GPU runs is tested without one.
    A policy diffusers / accelerate refuse for this device or pipeline raises one `InputError` on `offload`.
    """
    if policy not in POLICIES or policy == "auto":
        raise ValueError(f"unknown memory policy {policy!r}; choose one of {', '.join(POLICIES)}")
    try:
        _APPLY[policy](pipe, device)
    except Exception as exc:  # diffusers / accelerate refusing this policy here: one line, no traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError("offload", f"'{policy}' cannot be used on {device}: {first}") from exc


def _resident(pipe, device: str) -> None:  # noqa: ANN001
    pipe.to(device)


def _model_offload(pipe, device: str) -> None:  # noqa: ANN001
    pipe.enable_model_cpu_offload(device=device)
    before_call(pipe, "model", device)


def _sequential_offload(pipe, device: str) -> None:  # noqa: ANN001
    pipe.enable_sequential_cpu_offload(device=device)
    before_call(pipe, "sequential", device)


def before_call(pipe, policy: Policy, device: str) -> None:  # noqa: ANN001
    """Before each pipeline call (diffusers re-installs model-offload hooks after every call): on the CPU,
    accelerate's hooks execute on plain `cpu`, not the `cpu:0` diffusers gives them. `Tensor.to("cpu:0")` copies
    every weight on each onload (fresh buffers change the float results in the last bits: no longer identical to
    `none`), and under sequential offload a `Parameter` copied that way comes back a plain Tensor, which accelerate's
    next offload to `meta` cannot rewrap (`TypeError: new() received an invalid combination of arguments`)."""
    if policy in ("model", "sequential") and device.split(":")[0] == "cpu":
        _plain_cpu_execution_device(pipe)


def _plain_cpu_execution_device(pipe) -> None:  # noqa: ANN001
    import torch

    cpu = torch.device("cpu")
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            for h in _accelerate_hooks(module):
                if getattr(h, "execution_device", None) is not None and torch.device(h.execution_device).type == "cpu":
                    h.execution_device = cpu
    pipe._offload_device = cpu


def _group_offload(pipe, device: str) -> None:  # noqa: ANN001
    """Transformer(s) leaf by leaf, the text encoder's blocks a few at a time, the VAE resident. diffusers'
    `apply_group_offloading` works on any module (transformers' UMT5 encoder has no `enable_group_offload`).
    Streams (prefetching the next group while one runs) only where the device has them."""
    import torch
    from diffusers.hooks import apply_group_offloading

    onload, cpu, streams = torch.device(device), torch.device("cpu"), has_streams(device)
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            apply_group_offloading(model, onload, offload_device=cpu, offload_type="leaf_level", use_stream=streams,
                                   low_cpu_mem_usage=streams)
    # UMT5's blocks sit one level down (`encoder.block`): without block_modules the whole encoder is one group.
    apply_group_offloading(pipe.text_encoder, onload, offload_device=cpu, offload_type="block_level",
                           num_blocks_per_group=1 if streams else 4, block_modules=["encoder"], use_stream=streams,
                           low_cpu_mem_usage=streams)
    pipe.vae.to(device)


_APPLY = {"none": _resident, "model": _model_offload, "sequential": _sequential_offload, "group": _group_offload}


@contextmanager
def adding_layers(pipe, names: tuple[str, ...], policy: Policy) -> Iterator[None]:  # noqa: ANN001
    """Around adding layers (LoRA adapters) to the components `names` after the memory policy was applied, so the
    new layers follow the policy like the old ones.

    - `sequential`: accelerate keeps the weights on the `meta` device and streams each layer's own weights in from
      a CPU map; PEFT places new adapter weights on their base layer's device, `meta`, so they would be lost (NaN
      frames, measured). The component's hooks are removed first (which puts its weights back on the CPU), the
      layers are added, and `cpu_offload` is applied again on the same execution device: new layers included,
      every weight on the CPU between uses. This is what diffusers' `load_lora_weights` does for a whole pipeline,
      done here per component and keeping our execution device (it re-applies with none, which fails on CPU hosts).
    - `group`: new layers sit outside every offload group, so on a GPU they would stay on the CPU; diffusers'
      re-application of the stored group-offload config gives them groups (diffusers does this itself after
      `delete_adapters`).
    - `none` / `model`: PEFT puts new weights beside their base layer's, which the policy already moves.
    """
    import torch

    models = [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]
    devices = {}
    if policy == "sequential":
        from accelerate.hooks import remove_hook_from_module

        for model in models:
            devices[id(model)] = _execution_device(model)
            remove_hook_from_module(model, recurse=True)
    try:
        yield
    finally:
        if policy == "sequential":
            from accelerate import cpu_offload

            for model in models:
                cpu_offload(model, devices[id(model)], offload_buffers=len(model._parameters) > 0)
        elif policy == "group":
            from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

            for model in models:
                _maybe_remove_and_reapply_group_offloading(model)


def _execution_device(model) -> object:  # noqa: ANN001
    """The device accelerate's sequential-offload hooks of `model` execute on (after `before_call`'s fix)."""
    import torch

    for module in model.modules():
        for h in _accelerate_hooks(module):
            if getattr(h, "execution_device", None) is not None:
                return torch.device(h.execution_device)
    raise RuntimeError(f"{type(model).__name__} has no sequential-offload hooks")


def _accelerate_hooks(module) -> list:  # noqa: ANN001
    """The accelerate hooks on `module` (a `SequentialHook` unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))
