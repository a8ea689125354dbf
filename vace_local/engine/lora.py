"""LoRA loading through diffusers' Wan LoRA loader: fused into the weights for zero runtime cost (`--lora`, for
the whole process), or as adapters switched per job (`AdapterPool`; `CompiledLoraSlot` under `--compile`).

Sources are local `.safetensors` files (or a directory holding exactly one) or in-memory state dicts;
nothing is fetched from the Hub. diffusers converts the common key layouts on load: Kijai/ComfyUI
(`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `alpha`, `diff`, `diff_b`), musubi
(`lora_unet_*`) and diffusers/PEFT (`transformer.blocks.N.attn1.to_q.lora_A.weight`).

`.alpha` keys are folded into the down weights here (delta = up @ down · alpha / rank) before diffusers sees
the file: its converter folds them only on the main blocks' attention and FFN, and a release that carries
them on `text_embedding`, `time_embedding`, `time_projection` or `head` (some lightx2v / CausVid files)
would otherwise fail inside diffusers with a message naming neither the file nor the key.

Distillation LoRAs (CausVid, lightx2v) only work with their own schedule: they carry overrides for the
step count, guidance scale and flow shift, which the engine applies to every job when fused and to the jobs
that ask for them when per request (their weights give broken output at 30 steps with CFG 5).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vace_local.core.errors import VaceError
from vace_local.core.spec import MemoryPolicy

log = logging.getLogger(__name__)

Experts = Literal["both", "high", "low"]


@dataclass(frozen=True)
class LoraOption:
    """One LoRA to load at engine start (process-level)."""

    source: str  # local .safetensors file, or a directory with exactly one
    scale: float = 1.0
    #: Overrides for distillation LoRAs; None keeps the job's value.
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    #: Two-expert models: which expert gets it ("high" = transformer, "low" = transformer_2).
    experts: Experts = "both"

    def __post_init__(self) -> None:
        if self.experts not in ("both", "high", "low"):
            raise ValueError(f"lora experts must be both, high or low, got {self.experts!r}")
        if self.num_inference_steps is not None and not 1 <= self.num_inference_steps <= 100:
            raise ValueError(f"lora num_inference_steps must be within 1..100, got {self.num_inference_steps}")
        if self.guidance_scale is not None and not 0 <= self.guidance_scale <= 20:
            raise ValueError(f"lora guidance_scale must be within 0..20, got {self.guidance_scale}")

    @classmethod
    def parse(cls, text: str) -> LoraOption:
        """CLI form: `PATH[:scale[:steps[:guidance[:shift]]]]`, e.g. `causvid.safetensors:0.5:8:1`."""
        parts = text.rsplit(":", 4)
        path, nums = parts[0], parts[1:]
        while nums and not is_number(nums[0]):  # a Windows drive letter or a ':' in the path
            path, nums = f"{path}:{nums[0]}", nums[1:]
        vals = [float(x) for x in nums]
        return cls(
            source=path,
            scale=vals[0] if len(vals) > 0 else 1.0,
            num_inference_steps=int(vals[1]) if len(vals) > 1 else None,
            guidance_scale=vals[2] if len(vals) > 2 else None,
            flow_shift=vals[3] if len(vals) > 3 else None,
        )

    def overrides(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        if self.num_inference_steps is not None:
            out["num_inference_steps"] = self.num_inference_steps
        if self.guidance_scale is not None:
            out["guidance_scale"] = self.guidance_scale
        if self.flow_shift is not None:
            out["flow_shift"] = self.flow_shift
        return out


def is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


class LoraFormatError(VaceError, ValueError):
    """A LoRA file whose keys we cannot map onto the transformer; the message names the file and the key."""


def lora_path(source: str | Path) -> Path:
    """The `.safetensors` file a LoRA source names (a file, or a directory holding exactly one)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"lora directory {path} must hold exactly one .safetensors file, "
                                    f"found {len(files)}")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"lora file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"lora file must be .safetensors (pickle files are refused), got {path.name}")
    return path


_DOWN = (".lora_down.weight", ".lora_A.weight")
_UP = (".lora_up.weight", ".lora_B.weight")


def fold_alphas(state: dict[str, Any], label: str) -> dict[str, Any]:
    """`state` with every `X.alpha` folded into `X`'s down weight (scaled by alpha / rank) and removed.

    Exact: the LoRA delta is up @ down · alpha / rank whichever matrix carries the factor. musubi files
    (`lora_unet_*`) are left alone: diffusers' musubi converter requires their alphas. An alpha without its
    down and up weights raises LoraFormatError naming `label` (the file) and the key.
    """
    if any(k.startswith("lora_unet_") for k in state):
        return state
    out = dict(state)
    for key in [k for k in state if k.endswith(".alpha")]:
        base = key.removesuffix(".alpha")
        down = next((base + s for s in _DOWN if base + s in out), None)
        up = next((base + s for s in _UP if base + s in out), None)
        if down is None or up is None:
            raise LoraFormatError(f"lora file {label}: key {key!r} has no matching {base}.lora_down/lora_up "
                                  "(or lora_A/lora_B) weights, so its alpha cannot be applied")
        alpha = out.pop(key)
        if alpha.numel() != 1:
            raise LoraFormatError(f"lora file {label}: key {key!r} must be a single number, got shape "
                                  f"{tuple(alpha.shape)}")
        rank = out[down].shape[0]
        out[down] = out[down] * (float(alpha.item()) / rank)
    return out


def read_lora_file(source: str | Path) -> dict[str, Any]:
    """Load a LoRA state dict from a local file (or a directory with exactly one .safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(lora_path(source)))


LoraItem = tuple[dict[str, Any], float, Experts, str]  # (state dict, scale, experts, label naming its file)


def expert_components(pipe: Any, experts: Experts) -> tuple[str, ...]:
    """The pipeline's transformers a LoRA goes to: "high" = `transformer`, "low" = `transformer_2` (Wan 2.2's
    experts; a one-transformer model has only `transformer`)."""
    out = []
    if experts in ("both", "high") and pipe.transformer is not None:
        out.append("transformer")
    if experts in ("both", "low") and getattr(pipe, "transformer_2", None) is not None:
        out.append("transformer_2")
    return tuple(out)


def split_lora_key(key: str) -> tuple[str, str]:
    """A converted (diffusers `transformer.*`) LoRA key as (module path, what follows `.lora_`), e.g.
    `transformer.blocks.0.attn1.to_q.lora_A.weight` → (`blocks.0.attn1.to_q`, `A.weight`); no `.lora_`: (key, "")."""
    stem, sep, tail = key.removeprefix("transformer.").rpartition(".lora_")
    return (stem, tail) if sep else (key.removeprefix("transformer."), "")


def _mapping_error(label: str, exc: Exception) -> LoraFormatError:
    """diffusers' conversion / PEFT error, restated with the file and the first key it could not place."""
    text = str(exc)
    keys = re.findall(r"'((?:diffusion_model\.|transformer\.)?[\w.]+\.(?:weight|bias|alpha|diff|diff_b))'", text)
    if isinstance(exc, KeyError) and exc.args:
        keys = [str(exc.args[0]), *keys]
    key = keys[0] if keys else None
    if key and "vace_blocks" in key:
        why = "it targets the VACE blocks, which diffusers' Wan LoRA loader does not map (T2V LoRAs touch only " \
              "the main blocks)"
    elif key:
        why = "diffusers' Wan LoRA loader cannot map this key onto the transformer"
    else:
        why = "diffusers' Wan LoRA loader could not apply it"
    where = f"key {key!r}: " if key else ""
    return LoraFormatError(f"lora file {label}: {where}{why} ({type(exc).__name__}: {text[:300]})")


def fuse_loras(pipe: Any, loras: list[LoraItem]) -> list[str]:
    """Load each (state dict, scale, experts, label) as an adapter, fuse them all, drop the adapter layers.

    Returns the adapter names. Fusing before fp8 storage / compile keeps those options unaware of LoRA.
    A file diffusers cannot map raises LoraFormatError naming the file (`label`) and the key.
    """
    if not loras:
        return []
    targets: dict[str, tuple[list[str], list[float]]] = {"transformer": ([], []), "transformer_2": ([], [])}
    names: list[str] = []
    for i, (raw, scale, experts, label) in enumerate(loras):
        state = fold_alphas(raw, label)
        name = f"lora{i}"
        names.append(name)
        for component in expert_components(pipe, experts):
            kwargs = {"load_into_transformer_2": True} if component == "transformer_2" else {}
            try:
                pipe.load_lora_weights(dict(state), adapter_name=name, **kwargs)
            except (ValueError, KeyError, RuntimeError, AttributeError) as exc:
                raise _mapping_error(label, exc) from exc
            targets[component][0].append(name)
            targets[component][1].append(scale)
    for component, (adapters, weights) in targets.items():
        model = getattr(pipe, component, None)
        if model is None or not adapters:
            continue
        model.set_adapters(adapters, weights=weights)
        model.fuse_lora(lora_scale=1.0, adapter_names=adapters)
        model.unload_lora()
    log.info("fused %d LoRA(s)", len(loras))
    return names


# -- per-request LoRAs: adapters on the resident model, switched per job -------------------------------------
@dataclass(frozen=True)
class JobLora:
    """One LoRA a job asks for, its file already local (the worker / CLI resolved `path`)."""

    file: Path
    scale: float
    experts: Experts
    field: str  # the request field that named it, e.g. "loras[0].path"


@dataclass
class _Adapter:
    name: str
    components: tuple[str, ...]
    #: `CompiledLoraSlot`: the converted weights, kept on the CPU and written into the slot when a job uses them.
    state: dict[str, Any] | None = None


def _linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    import torch

    # a layer holding adapters already is PEFT's wrapper around the original Linear (`X.base_layer`)
    return {n.removesuffix(".base_layer"): (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".lora_" not in n}


def check_targets(state: dict[str, Any], model: Any, label: str) -> None:
    """Refuse a converted (diffusers `transformer.*`) LoRA whose keys name no linear of `model` or whose shapes
    do not fit it (a LoRA for another model family or size): PEFT would only warn and load part of it."""
    shapes = _linear_shapes(model)
    for key, value in state.items():
        stem, tail = split_lora_key(key)
        if not tail:
            raise LoraFormatError(f"lora file {label}: key {key!r} is not a LoRA weight")
        base = stem.removesuffix(".base_layer")
        if base not in shapes:
            raise LoraFormatError(f"lora file {label}: key {key!r} names no linear layer of this model "
                                  "(a LoRA for another model family?)")
        out_f, in_f = shapes[base]
        if tail.startswith("A.weight") and value.shape[-1] != in_f or tail.startswith("B.weight") and \
                value.shape[0] != out_f:
            raise LoraFormatError(f"lora file {label}: key {key!r} has shape {tuple(value.shape)}, but the layer is "
                                  f"{out_f}x{in_f} (a LoRA for another model size or family)")


class AdapterPool:
    """LoRA adapters (PEFT layers) on the resident transformers, switched per job without touching the base
    weights: an LRU of at most `capacity` adapters; `activate` loads what a job needs and enables exactly that.

    Loads go through each transformer's `load_lora_adapter` (not the pipeline's `load_lora_weights`, which
    removes and re-installs the pipeline's offload hooks — and fails doing so on a CPU-only machine); the keys are
    converted by diffusers' Wan `lora_state_dict` after `fold_alphas`, as for fused LoRAs.
    """

    def __init__(self, pipe: Any, capacity: int = 4, policy: MemoryPolicy = "none") -> None:
        self.pipe = pipe
        self.capacity = max(1, capacity)
        #: The engine's memory policy: new adapter layers are put under its hooks (`memory.adding_layers`).
        self.policy = policy
        #: More context managers around adding adapter layers to the given transformers, for hooks that must see the
        #: layers PEFT wraps (a Ulysses group's context-parallel plan: `vace_local.run.parallel.enable_ulysses`).
        self.layer_guards: list[Callable[[list[Any]], AbstractContextManager[Any]]] = []
        self._loaded: OrderedDict[tuple[str, int, int, str], _Adapter] = OrderedDict()
        self._counter = 0
        self.loads = 0  # adapters loaded from disk (tests and benchmarks read it)

    def _key(self, lora: JobLora) -> tuple[str, int, int, str]:
        st = lora.file.stat()
        return (str(lora.file.resolve()), st.st_size, st.st_mtime_ns, lora.experts)

    def _load(self, lora: JobLora, keep: set[str]) -> _Adapter:
        from vace_local.core.errors import InputError

        components = expert_components(self.pipe, lora.experts)
        if not components:
            raise InputError(lora.field.removesuffix(".path") + ".transformer",
                             f"this model has no {lora.experts}-noise expert")
        while len(self._loaded) >= self.capacity:
            victim = next((k for k, a in self._loaded.items() if a.name not in keep), None)
            if victim is None:
                break
            self._drop(self._loaded.pop(victim))
        label = lora.file.name
        try:
            raw = read_lora_file(lora.file)
            state = self.pipe.lora_state_dict(fold_alphas(raw, label))
        except LoraFormatError as exc:
            raise InputError(lora.field, str(exc)) from exc
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise InputError(lora.field, str(_mapping_error(label, exc))) from exc
        if not state:
            raise InputError(lora.field, f"lora file {label} holds no LoRA weights")
        self._counter += 1
        return self._attach(_Adapter(f"job{self._counter}", components), state, lora)

    def _attach(self, adapter: _Adapter, state: dict[str, Any], lora: JobLora) -> _Adapter:
        """Load the converted `state` as PEFT adapter layers named `adapter.name` on its components."""
        from vace_local.core.errors import InputError
        from vace_local.engine.memory import adding_layers

        label, components = lora.file.name, adapter.components
        done: list[str] = []
        try:
            with ExitStack() as guards:
                guards.enter_context(adding_layers(self.pipe, components, self.policy))
                for guard in self.layer_guards:
                    guards.enter_context(guard([getattr(self.pipe, c) for c in components]))
                for c in components:
                    model = getattr(self.pipe, c)
                    check_targets(state, model, label)
                    model.load_lora_adapter(dict(state), prefix="transformer", adapter_name=adapter.name,
                                            low_cpu_mem_usage=True)
                    done.append(c)
        except Exception as exc:
            self._drop(_Adapter(adapter.name, tuple(done)))
            err = exc if isinstance(exc, LoraFormatError) else _mapping_error(label, exc)
            raise InputError(lora.field, str(err)) from exc
        self.loads += 1
        return adapter

    def _drop(self, adapter: _Adapter) -> None:
        for c in adapter.components:
            model = getattr(self.pipe, c)
            if adapter.name in getattr(model, "peft_config", {}):
                model.delete_adapters(adapter.name)

    def activate(self, loras: list[JobLora]) -> list[dict[str, Any]]:
        """Load (or reuse) each LoRA and make exactly these adapters active at their scales; none → every
        adapter off (the base weights were never changed). Returns the metadata of what is active."""
        active: list[tuple[_Adapter, JobLora]] = []
        keep: set[str] = set()
        for lora in loras:
            key = self._key(lora)
            adapter = self._loaded.get(key)
            if adapter is None:
                adapter = self._load(lora, keep)
                self._loaded[key] = adapter
            self._loaded.move_to_end(key)
            keep.add(adapter.name)
            active.append((adapter, lora))
        self._enable(active)
        return [{"adapter": a.name, "file": x.file.name, "scale": x.scale, "transformer": x.experts,
                 "experts": list(a.components)} for a, x in active]

    def _enable(self, active: list[tuple[_Adapter, JobLora]]) -> None:
        for c in ("transformer", "transformer_2"):
            model = getattr(self.pipe, c, None)
            if model is None or not getattr(model, "peft_config", None):
                continue
            names = [a.name for a, _ in active if c in a.components]
            weights = [x.scale for a, x in active if c in a.components]
            if names:
                model.enable_lora()
                model.set_adapters(names, weights=weights)
            else:
                model.disable_lora()

    @property
    def loaded(self) -> list[str]:
        return [a.name for a in self._loaded.values()]


#: The adapter name of `CompiledLoraSlot`'s layers.
SLOT = "slot"


class CompiledLoraSlot(AdapterPool):
    """Per-request LoRAs on a compiled model without recompiling: one fixed adapter ("slot") of rank `rank` on every
    linear layer, added before `torch.compile` and never changed in shape, structure or scaling; a job's LoRAs are
    written into its weights in place (each LoRA's down weights times its scale, concatenated along the rank, the
    rest zeros), a job without LoRAs zeroes them. The compiled graphs therefore see the same modules and guards on
    every job (a new adapter, a scale change or turning adapters off each recompile otherwise: measured 6-30 s per
    change on the tiny model on CPU with inductor, and dynamo stops recompiling a function past its recompile limit).

    Why not PEFT's hotswap (`enable_lora_hotswap` + `load_lora_weights(..., hotswap=True)`): it swaps one adapter
    for another with the same or fewer targets (a LoRA on more layers than the first raises), one adapter per model,
    and turning adapters off (`disable_lora`) for a job without LoRA recompiles too (measured). The slot (PEFT
    layers, in-place copies) also serves several LoRAs in one job and LoRAs on any linear (untargeted layers stay
    zero). Cost: the rank-`rank` matmuls run on every linear on every job (zeros when unused). The converted weights
    of the `capacity` most recently used LoRA files stay in CPU memory (`loaded`).
    """

    def __init__(self, pipe: Any, capacity: int = 4, policy: MemoryPolicy = "none", rank: int = 64) -> None:
        super().__init__(pipe, capacity, policy)
        self.rank = rank
        self._layers: dict[str, dict[str, Any]] = {}  # component → {module name: PEFT LoRA layer}

    def install(self) -> None:
        """Add the zero slot to every transformer (before the memory policy and compile see the model)."""
        import torch
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        for c in ("transformer", "transformer_2"):
            model = getattr(self.pipe, c, None)
            if model is None:
                continue
            targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            config = LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=targets, lora_bias=True,
                                init_lora_weights=False)
            inject_adapter_in_model(config, model, adapter_name=SLOT)
            self._layers[c] = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
            with torch.no_grad():
                for layer in self._layers[c].values():
                    layer.lora_A[SLOT].weight.zero_()
                    layer.lora_B[SLOT].weight.zero_()
                    layer.lora_B[SLOT].bias.zero_()

    def _attach(self, adapter: _Adapter, state: dict[str, Any], lora: JobLora) -> _Adapter:
        from vace_local.core.errors import InputError

        for c in adapter.components:
            check_targets(state, getattr(self.pipe, c), lora.file.name)
        ranks: dict[str, int] = {}
        for key, value in state.items():
            stem, tail = split_lora_key(key)
            if tail == "A.weight":
                ranks[stem] = int(value.shape[0])
        wide = {m: r for m, r in ranks.items() if r > self.rank}
        if wide:
            name, r = next(iter(wide.items()))
            raise InputError(lora.field, f"lora file {lora.file.name} has rank {r} on {name}; with --compile "
                                         f"per-request LoRAs go into a slot of rank {self.rank} "
                                         "(EngineOptions.lora_slot_rank)")
        adapter.state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self.loads += 1
        return adapter

    def _drop(self, adapter: _Adapter) -> None:
        adapter.state = None

    def _enable(self, active: list[tuple[_Adapter, JobLora]]) -> None:
        import torch

        from vace_local.core.errors import InputError

        for c, layers in self._layers.items():
            parts: dict[str, list[tuple[Any, Any, Any]]] = {}  # module → [(scaled A, B, scaled bias)]
            for adapter, lora in active:
                if c not in adapter.components or adapter.state is None:
                    continue
                for key, a in adapter.state.items():
                    stem, tail = split_lora_key(key)
                    if tail != "A.weight":
                        continue
                    bias = adapter.state.get(f"transformer.{stem}.lora_B.bias")
                    parts.setdefault(stem.removesuffix(".base_layer"), []).append(
                        (a * lora.scale, adapter.state[f"transformer.{stem}.lora_B.weight"],
                         None if bias is None else bias * lora.scale))
            over = {m: sum(int(a.shape[0]) for a, _, _ in p) for m, p in parts.items()}
            over = {m: r for m, r in over.items() if r > self.rank}
            if over:
                name, r = next(iter(over.items()))
                raise InputError("loras", f"this job's LoRAs add up to rank {r} on {name}; with --compile one job's "
                                          f"LoRAs share a slot of rank {self.rank} (EngineOptions.lora_slot_rank)")
            with torch.no_grad():
                for name, layer in layers.items():
                    a_w, b_w, b_b = layer.lora_A[SLOT].weight, layer.lora_B[SLOT].weight, layer.lora_B[SLOT].bias
                    a_w.zero_()
                    b_w.zero_()
                    b_b.zero_()
                    r = 0
                    for a, b, bias in parts.get(name, []):
                        a_w[r:r + a.shape[0]].copy_(a)
                        b_w[:, r:r + a.shape[0]].copy_(b)
                        if bias is not None:
                            b_b.add_(bias.to(b_b))
                        r += a.shape[0]
