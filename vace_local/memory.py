"""Memory policies: where the weights live while a job runs.

- `none`: everything resident on the GPU (fastest).
- `model`: diffusers model CPU offload — one component on the GPU at a time.
- `group`: group offload — transformer leaf groups (prefetched on a CUDA stream while the previous one runs),
  text-encoder blocks a few at a time.
- `sequential`: sequential CPU offload — lowest VRAM, slowest.
`auto` picks from free VRAM and the model's footprint. Each policy is a removable diffusers hook.
"""

from __future__ import annotations

from dataclasses import dataclass

from vace_local.errors import InputError
from vace_local.spec import OFFLOAD_POLICIES as POLICIES
from vace_local.spec import MemoryPolicy as Policy

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
    tokens = (num_frames - 1) // 4 + 1
    tokens *= (height // 16) * (width // 16)
    return int(4 * GIB + tokens * 160 * 1024)  # ~9 GiB at 480p×81, ~16 GiB at 720p×81


def choose_policy(free_vram: int | None, fp: Footprint, reserve: int | None = None) -> Policy:
    """Pick the fastest policy that fits. `free_vram=None` means no CUDA: run resident on the CPU."""
    if free_vram is None:
        return "none"
    reserve = activation_reserve() if reserve is None else reserve
    if fp.total + reserve <= free_vram:
        return "none"
    # Model offload needs the largest single component resident (an expert, or the text encoder).
    if max(fp.transformer, fp.text_encoder) + fp.vae + fp.aux + reserve <= free_vram:
        return "model"
    # Group offload keeps only a few leaf groups plus the VAE resident; streams need ~2 groups in flight.
    if fp.vae + fp.aux + reserve + fp.transformer // 10 <= free_vram:
        return "group"
    return "sequential"


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
            hook = getattr(module, "_hf_hook", None)
            for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
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
