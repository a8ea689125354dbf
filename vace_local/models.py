"""Model resolution: built-in names, Hugging Face repo ids, local directories and the tiny smoke models.

Hub ids go through huggingface_hub (its cache, resumable downloads, `HF_HUB_OFFLINE`); loading never
downloads implicitly unless `allow_download` is set, so a missing model gives one clear error with the
command that fetches it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vace_local.errors import ModelNotFoundError
from vace_local.tiny import TINY_HELPER, TINY_MODELS, ensure_tiny_helper, ensure_tiny_model


@dataclass(frozen=True)
class ModelInfo:
    """What we know about a built-in model before loading it."""

    repo_id: str


# Repos and expert layout from the published configs (see shared/reference/diffusers-wan-notes.md §2, §8).
BUILTIN_MODELS: dict[str, ModelInfo] = {
    "wan2.1-vace-14b": ModelInfo("Wan-AI/Wan2.1-VACE-14B-diffusers"),
    "wan2.1-vace-1.3b": ModelInfo("Wan-AI/Wan2.1-VACE-1.3B-diffusers"),
    "wan2.2-vace-fun-a14b": ModelInfo("linoyts/Wan2.2-VACE-Fun-14B-diffusers"),
}
DEFAULT_MODEL = "wan2.1-vace-14b"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    kind: str  # "tiny" | "builtin" | "hub" | "local"

    @property
    def is_tiny(self) -> bool:
        return self.kind == "tiny"


def _hub_snapshot(repo_id: str, name: str, allow_download: bool) -> Path:
    import os

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=not allow_download))
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
        return ResolvedModel(name, _hub_snapshot(BUILTIN_MODELS[name].repo_id, name, allow_download), "builtin")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no model_index.json (not a diffusers pipeline)")
        return ResolvedModel(name, path, "local")
    if _REPO_ID.match(name) and not name.startswith((".", "/", "~")):
        return ResolvedModel(name, _hub_snapshot(name, name, allow_download), "hub")
    raise ModelNotFoundError(
        f"model '{name}' not found: not a built-in name ({', '.join([*BUILTIN_MODELS, *TINY_MODELS])}), "
        "not an existing local directory, not a Hugging Face repo id"
    )


def download_model(name: str) -> Path:
    """Fetch a model's weights ahead of time (resumable); return the local directory."""
    return resolve_model(name, allow_download=True).path


def resolve_aux_model(model_id: str, download_name: str, *, allow_download: bool = False) -> Path:
    """A transformers model (safety checker, prompt expander) as a local directory: a directory holding a
    `config.json`, or a Hub repo id from the cache (downloaded only with `allow_download`), or `tiny` (built
    here: `vace_local.tiny.ensure_tiny_helper`). A missing model raises ModelNotFoundError naming
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
