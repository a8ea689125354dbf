"""Per-model speed options: attention backend, regional compile, fp8 weight storage, fp8 linear layers.

Every function here changes only the model it is given. In particular the attention backend is set on
that model's attention processors only: diffusers' `set_attention_backend` also sets the process-wide
registry default, so a second model (or the other expert) would silently inherit it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Tried in order by `attention="auto"` on CUDA. All are exact attention (no quantisation); SageAttention
#: (8-bit QK) is only used when asked for by name because it changes the output slightly.
CUDA_AUTO_ORDER = ("_flash_3", "_native_cudnn", "flash", "native")
CPU_AUTO_ORDER = ("native",)
#: Short aliases accepted in EngineOptions.attention.
ALIASES = {"fa3": "_flash_3", "flash3": "_flash_3", "fa2": "flash", "cudnn": "_native_cudnn", "sdpa": "native"}


@dataclass(frozen=True)
class BackendChoice:
    name: str
    requested: str
    #: Backends tried before `name`, each with the reason it was not used.
    rejected: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.name, "requested": self.requested,
                "rejected": {name: why for name, why in self.rejected}}


def attention_modules(model: Any) -> list[Any]:
    from diffusers.models.attention import AttentionModuleMixin

    return [m for m in model.modules() if isinstance(m, AttentionModuleMixin)]


def model_attention_backends(model: Any) -> set[str | None]:
    """The backend each attention processor of `model` is pinned to (None: the process default)."""
    out: set[str | None] = set()
    for m in attention_modules(model):
        b = getattr(m.processor, "_attention_backend", None)
        out.add(None if b is None else getattr(b, "value", str(b)))
    return out


def _probe(name: str, device: str, dtype: Any, head_dim: int) -> None:
    """Check the backend's requirements and run it once on tiny tensors on the target device."""
    import torch
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    backend = AttentionBackendName(name)
    _check_attention_backend_requirements(backend)
    q = torch.randn(1, 64, 2, head_dim, device=device, dtype=dtype)
    out = dispatch_attention_fn(q, q, q, backend=backend)
    if out.shape != q.shape or not torch.isfinite(out.float()).all():
        raise RuntimeError(f"backend {name} returned a wrong result on a probe")


def select_attention_backend(models: Iterable[Any], requested: str, device: str, dtype: Any) -> BackendChoice:
    """Pin the first working backend on every attention processor of `models` (no global side effect)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    models = [m for m in models if m is not None]
    requested = ALIASES.get(requested, requested)
    known = {b.value for b in AttentionBackendName}
    if requested != "auto" and requested not in known:
        raise ValueError(f"attention must be 'auto' or one of {', '.join(sorted(known | set(ALIASES)))}, "
                         f"got {requested!r}")
    if requested == "auto":
        order = CUDA_AUTO_ORDER if device.startswith("cuda") else CPU_AUTO_ORDER
    else:
        order = (requested, "native") if requested != "native" else ("native",)
    head_dim = next((int(m.config.attention_head_dim) for m in models), 64)
    rejected: list[tuple[str, str]] = []
    for name in order:
        try:
            _probe(name, device, dtype, head_dim)
        except Exception as exc:  # missing package, wrong GPU, unsupported dtype/shape
            rejected.append((name, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        for model in models:
            for module in attention_modules(model):
                module.set_attention_backend(name)  # per processor; never touches the registry default
        if rejected:
            log.info("attention backend %s (not available: %s)", name, "; ".join(n for n, _ in rejected))
        return BackendChoice(name, requested, tuple(rejected))
    raise RuntimeError(f"no attention backend works on {device}: {rejected}")


def enable_fp8_storage(model: Any, compute_dtype: Any) -> None:
    """Store weights as float8_e4m3fn and upcast per layer at compute time (~half the bf16 VRAM).

    diffusers' layerwise casting skips the patch embeddings, condition embedder and norms (the model's
    `_skip_layerwise_casting_patterns`), which are precision-sensitive and small.
    """
    import torch

    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def fp8_linear_filter(module: Any, fqn: str) -> bool:
    """Quantise only the big linears inside transformer / VACE blocks (not embeddings or the output head)."""
    import torch

    return isinstance(module, torch.nn.Linear) and fqn.startswith(("blocks.", "vace_blocks."))


def enable_fp8_linear(model: Any) -> None:
    """torchao float8 dynamic activation + weight quantisation (row-wise scales) of the block linears.

    Needs CUDA compute capability >= 8.9 (Ada/Hopper) and the `fast` extra (torchao).
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("fp8_linear needs a CUDA GPU with compute capability >= 8.9 (Ada or Hopper)")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise RuntimeError(f"fp8_linear needs compute capability >= 8.9, this GPU has {major}.{minor}")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise RuntimeError("fp8_linear needs torchao: pip install 'vace-local[fast]'") from exc
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_linear_filter)


def compile_blocks(model: Any, backend: str = "inductor") -> None:
    """Regional compile: each repeated block (main and VACE) is compiled once and reused for all of them."""
    model.compile_repeated_blocks(fullgraph=True, dynamic=False, backend=backend)
