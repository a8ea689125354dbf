"""Model resolution: built-in names, Hugging Face repo ids, local directories and the tiny smoke models.

Hub ids go through huggingface_hub (its cache, resumable downloads, `HF_HUB_OFFLINE`); loading never
downloads implicitly unless `allow_download` is set, so a missing model gives one clear error with the
command that fetches it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vace_local.core.config import env_name, vace_settings
from vace_local.core.errors import ModelNotFoundError
from vace_local.engine.checkpoints import BASE_PATTERNS, EXPERT_DIRS, OriginalCheckpoint, find_original
from vace_local.engine.memory import ComponentSize, ModelSize
from vace_local.engine.tiny import TINY_HELPER, TINY_MODELS, ensure_tiny_helper, ensure_tiny_model


@dataclass(frozen=True)
class ModelInfo:
    """What we know about a built-in model before loading it."""

    repo_id: str
    #: An original-format release (vace_local.engine.checkpoints): the built-in diffusers model that supplies the
    #: text encoder, tokenizer, VAE, scheduler and transformer config; only `allow` is fetched from `repo_id`.
    base: str | None = None
    allow: tuple[str, ...] | None = None


# Repos and expert layout from the published configs (each repo's model_index.json and transformer config).
# Wan 2.2 VACE-Fun A14B is the official release in its original format (two expert folders), converted at
# load; its other components are Wan 2.1 VACE 14B's (same UMT5-XXL, VAE and transformer config).
BUILTIN_MODELS: dict[str, ModelInfo] = {
    "wan2.1-vace-14b": ModelInfo("Wan-AI/Wan2.1-VACE-14B-diffusers"),
    "wan2.1-vace-1.3b": ModelInfo("Wan-AI/Wan2.1-VACE-1.3B-diffusers"),
    "wan2.2-vace-fun-a14b": ModelInfo("alibaba-pai/Wan2.2-VACE-Fun-A14B", base="wan2.1-vace-14b",
                                      allow=tuple(f"{d}/*" for d in EXPERT_DIRS)),
}
#: Environment variable naming the base model (built-in name or diffusers directory) of a local
#: original-format checkpoint; default: the official diffusers model of the checkpoint's width.
BASE_MODEL_ENV = env_name("base_model")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    kind: str  # "tiny" | "builtin" | "hub" | "local"
    #: Set for an original-format checkpoint: its transformer files, converted at load (vace_local.engine.checkpoints).
    original: OriginalCheckpoint | None = None
    #: The diffusers-layout model that supplies the other components of an original-format checkpoint.
    base: Path | None = None

    @property
    def is_tiny(self) -> bool:
        return self.kind == "tiny"


def _hub_snapshot(repo_id: str, name: str, allow_download: bool, allow: tuple[str, ...] | None = None) -> Path:
    import os

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=not allow_download,
                                      allow_patterns=list(allow) if allow else None))
    except LocalEntryNotFoundError as exc:
        if not allow_download:
            raise ModelNotFoundError(
                f"model '{name}' ({repo_id}) is not in the Hugging Face cache. "
                f"Fetch it first with: vace-local download {name}"
            ) from exc
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set; unset it to download" if offline else "the Hugging Face Hub is unreachable"
        raise ModelNotFoundError(f"could not download model '{name}' ({repo_id}): {why}") from exc
    except Exception as exc:  # network errors, gated repos, bad ids
        raise ModelNotFoundError(f"could not get model '{name}' ({repo_id}): {exc}") from exc


def resolve_model(name: str, *, allow_download: bool = False, cache_dir: Path | None = None) -> ResolvedModel:
    """Map a model name to a local directory holding a diffusers `model_index.json`."""
    if name in TINY_MODELS:
        return ResolvedModel(name, ensure_tiny_model(name, cache_dir), "tiny")
    if name in BUILTIN_MODELS:
        info = BUILTIN_MODELS[name]
        if info.base is None:
            return ResolvedModel(name, _hub_snapshot(info.repo_id, name, allow_download), "builtin")
        root = _hub_snapshot(info.repo_id, name, allow_download, info.allow)
        base = _base_snapshot(info.base, name, allow_download)
        return ResolvedModel(name, root, "builtin", _original_or_fail(root, name), base)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return ResolvedModel(name, path, "local")
        original = find_original(path)
        if original is None:
            raise ModelNotFoundError(
                f"model directory {path} has no model_index.json (not a diffusers pipeline) and no original-format "
                f"Wan transformer (*.safetensors at its top level, or {' and '.join(EXPERT_DIRS)} folders)")
        return ResolvedModel(name, path, "local", original, _local_base(original, allow_download))
    if _REPO_ID.match(name) and not name.startswith((".", "/", "~")):
        return ResolvedModel(name, _hub_snapshot(name, name, allow_download), "hub")
    raise ModelNotFoundError(
        f"model '{name}' not found: not a built-in name ({', '.join([*BUILTIN_MODELS, *TINY_MODELS])}), "
        "not an existing local directory, not a Hugging Face repo id"
    )


def _base_snapshot(base: str, name: str, allow_download: bool) -> Path:
    """The diffusers components of built-in `base` (all but its transformer weights) for model `name`."""
    info = BUILTIN_MODELS[base]
    path = _hub_snapshot(info.repo_id, name, allow_download, BASE_PATTERNS)
    if not (path / "transformer" / "config.json").is_file() and not allow_download:
        raise ModelNotFoundError(f"model '{name}' needs the components of '{base}' ({info.repo_id}), which are not "
                                 f"complete in the Hugging Face cache. Fetch them with: vace-local download {name}")
    return path


def _original_or_fail(root: Path, name: str) -> OriginalCheckpoint:
    original = find_original(root)
    if original is None:
        raise ModelNotFoundError(f"model '{name}' at {root} holds no {' and '.join(EXPERT_DIRS)} weights (an "
                                 f"interrupted download?). Fetch it again with: vace-local download {name}")
    return original


def _local_base(original: OriginalCheckpoint, allow_download: bool) -> Path:
    """The base of a local original-format checkpoint: $VACE_BASE_MODEL, else the official model of its width."""
    from vace_local.engine.checkpoints import checkpoint_shape, default_base

    shape = checkpoint_shape(original.experts[0])  # a non-VACE or non-Wan file fails here, before any weight
    base = vace_settings().base_model or default_base(shape)
    if base in BUILTIN_MODELS:
        return _base_snapshot(base, base, allow_download)
    resolved = resolve_model(base, allow_download=allow_download)
    if resolved.original is not None:
        raise ModelNotFoundError(f"{BASE_MODEL_ENV}={base}: the base must be a diffusers-layout model "
                                 "(a directory with model_index.json, or a built-in name)")
    return resolved.path


def download_model(name: str) -> Path:
    """Fetch a model's weights ahead of time (resumable); return the local directory."""
    return resolve_model(name, allow_download=True).path


def resolve_aux_model(model_id: str, download_name: str, *, allow_download: bool = False) -> Path:
    """A transformers model (safety checker, prompt expander) as a local directory: a directory holding a
    `config.json`, or a Hub repo id from the cache (downloaded only with `allow_download`), or `tiny` (built
    here: `vace_local.engine.tiny.ensure_tiny_helper`). A missing model raises ModelNotFoundError naming
    `vace-local download <download_name>`."""
    if model_id == TINY_HELPER:
        return ensure_tiny_helper(download_name)
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{download_name} model directory {path} has no config.json")
        return path
    if _REPO_ID.match(model_id) and not model_id.startswith((".", "/", "~")):
        return _hub_snapshot(model_id, download_name, allow_download)
    raise ModelNotFoundError(f"{download_name} model '{model_id}' is neither a local directory nor a Hub repo id")


def weights_bytes(path: Path) -> int:
    """Bytes of the weight files in a model directory (what the memory policy budgets for it)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))


# -- sizes before loading: the real configs instantiated on the meta device ------------------------------

_SIZED = ("transformer", "transformer_2", "text_encoder", "vae")


def _component_class(library: str, class_name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(library), class_name)


def meta_component(cls: Any, config: dict[str, Any]) -> Any:
    """`cls` built from `config` on the meta device: parameter shapes without memory or init time."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers ModelMixin
            return cls.from_config(config)
        model = cls(cls.config_class(**config))  # transformers PreTrainedModel
    model.tie_weights()  # as a real load does (UMT5's encoder.embed_tokens is `shared`): count it once
    return model


def component_size(module: Any) -> ComponentSize:
    """Parameter counts of a (meta) module: in total, kept fp32 by the loader under bf16 / fp16, and stored in
    fp8 by layerwise casting (applied to the module — pass a meta copy, never loaded weights)."""
    import torch

    named = [(n, p.numel()) for n, p in module.named_parameters()]

    def kept(patterns: Any) -> int:  # the loaders' rule: a module name equal to a pattern anywhere in the path
        pats = set(patterns or ())
        return sum(k for n, k in named if pats.intersection(n.split(".")))

    diffusers_model = hasattr(module, "enable_layerwise_casting")
    keep = getattr(module, "_keep_in_fp32_modules", None)
    strict = getattr(module, "_keep_in_fp32_modules_strict", None)
    # diffusers keeps its list in fp32 under any 16-bit dtype; transformers only under fp16 (strict: both)
    at_bf16 = kept(keep) if diffusers_model else kept(strict)
    at_fp16 = kept(keep) if diffusers_model else kept(set(keep or ()) | set(strict or ()))
    fp8 = 0
    if diffusers_model and hasattr(module, "vace_blocks"):
        module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        fp8 = sum(p.numel() for p in module.parameters() if p.dtype == torch.float8_e4m3fn)
    return ComponentSize(sum(k for _, k in named), at_bf16, at_fp16, fp8)


def model_size(path: Path) -> ModelSize:
    """Parameter counts of a diffusers-layout pipeline directory, from its configs on the meta device."""
    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    sizes: dict[str, ComponentSize] = {}
    for name in _SIZED:
        entry = index.get(name)
        config_file = path / name / "config.json"
        if not entry or entry[0] is None or not config_file.is_file():  # (an original-format base has no expert 2)
            continue
        config = json.loads(config_file.read_text())
        sizes[name] = component_size(meta_component(_component_class(*entry), config))
    experts = sum(1 for n in ("transformer", "transformer_2") if n in sizes)
    main = sizes.get("transformer") or sizes["transformer_2"]
    return ModelSize(main, sizes["text_encoder"], sizes["vae"], experts)


def pipeline_size(pipe: Any) -> ModelSize:
    """`model_size` of an already built pipeline: each component's class and config again on the meta device."""

    def size(module: Any) -> ComponentSize:
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        return component_size(meta_component(type(module), config))

    experts = [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]
    return ModelSize(size(experts[0]), size(pipe.text_encoder), size(pipe.vae), len(experts))


def load_pipeline(path: Path, dtype: Any, placement: dict[str, str | None]) -> Any:
    """Load a `WanVACEPipeline` with every component read from safetensors straight to where it will live.

    `placement[name]` is a device for a component that stays resident there (loaded with `device_map`: each
    tensor goes from the memory-mapped file to the device, no full host copy), or None for one that stays on
    the CPU (an offload policy's single host copy; memory-mapped when the file dtype is the load dtype). The
    VAE loads in fp32 (diffusers docs), the transformers and the text encoder in `dtype`.
    """
    import torch
    from diffusers import WanVACEPipeline

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    components: dict[str, Any] = {}
    for name in _SIZED:
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        cls = _component_class(*entry)
        kw: dict[str, Any] = {"dtype": torch.float32 if name == "vae" else dtype}
        if placement.get(name):
            kw["device_map"] = placement[name]
        if hasattr(cls, "load_config"):  # diffusers ModelMixin
            components[name] = cls.from_pretrained(path, subfolder=name, **kw)
        else:  # transformers PreTrainedModel
            components[name] = cls.from_pretrained(path / name, **kw)
    return WanVACEPipeline.from_pretrained(path, **components)
