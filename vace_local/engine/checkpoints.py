"""Original-format Wan VACE checkpoints, as the official repositories ship them, converted at load.

The official Wan 2.2 VACE-Fun A14B release (`alibaba-pai/Wan2.2-VACE-Fun-A14B`) is not a diffusers pipeline:
it holds `high_noise_model/` and `low_noise_model/` (each `diffusion_pytorch_model*.safetensors` with the
original Wan key names: `blocks.N.self_attn.q`, `vace_blocks.N.before_proj`, `head.head`, …) next to the
original `Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth` and a `google/umt5-xxl` tokenizer. Wan 2.1's
original repos hold one such transformer at the top level (possibly sharded, with an index).

The transformers are converted at load by diffusers' own single-file code
(`WanVACETransformer3DModel.from_single_file`, i.e. `single_file_utils.convert_wan_transformer_to_diffusers`);
nothing is written to disk. diffusers has no converter for the original T5 `.pth`, so the text encoder,
tokenizer, VAE and scheduler come from a diffusers-layout *base* model of the same architecture — for the
A14B experts the official `Wan-AI/Wan2.1-VACE-14B-diffusers` (same UMT5-XXL, same Wan 2.1 VAE, same
transformer config), whose `transformer/config.json` also gives the experts' config. The base is checked
against the checkpoint's tensor shapes before any weight is read.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vace_local.core.errors import VaceError

log = logging.getLogger(__name__)

#: The Wan 2.2 A14B expert folders: `transformer` (high noise) and `transformer_2` (low noise).
EXPERT_DIRS = ("high_noise_model", "low_noise_model")
#: diffusers' `boundary_ratio` for Wan 2.2 VACE-Fun A14B (its conversion script and converted repo).
A14B_BOUNDARY_RATIO = 0.875
#: Components the base model contributes (all but the transformer weights).
BASE_PATTERNS = ("model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*", "vae/*",
                 "transformer/config.json")
_BLOCK = re.compile(r"^(?:model\.diffusion_model\.|diffusion_model\.)?(vace_blocks|blocks)\.(\d+)\.")


class CheckpointFormatError(VaceError):
    """An original-format checkpoint that does not match its base model or is incomplete (names the file)."""


@dataclass(frozen=True)
class OriginalCheckpoint:
    """Where an original-format checkpoint's transformer weights are: one tuple of files per expert."""

    root: Path
    experts: tuple[tuple[Path, ...], ...]

    @property
    def two_experts(self) -> bool:
        return len(self.experts) == 2


def _weight_files(folder: Path) -> tuple[Path, ...]:
    """The safetensors shards of one transformer: those an index names, else every `*.safetensors` there."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return tuple(folder / n for n in names)
    return tuple(sorted(folder.glob("*.safetensors")))


def find_original(path: Path) -> OriginalCheckpoint | None:
    """The original-format checkpoint in directory `path` (no `model_index.json`), or None if it holds none."""
    path = Path(path)
    if not path.is_dir() or (path / "model_index.json").is_file():
        return None
    experts = [_weight_files(path / d) for d in EXPERT_DIRS if (path / d).is_dir()]
    if len(experts) == 2 and all(experts):
        return OriginalCheckpoint(path, tuple(experts))
    top = _weight_files(path)
    if top:
        return OriginalCheckpoint(path, (top,))
    return None


@dataclass(frozen=True)
class Shape:
    """The architecture a checkpoint's tensors imply (read from the safetensors headers, no weights)."""

    dim: int
    in_channels: int
    ffn_dim: int
    num_layers: int
    num_vace_blocks: int
    vace_in_channels: int


def checkpoint_shape(files: tuple[Path, ...]) -> Shape:
    """Read the architecture from the headers of `files`; a file that is not a Wan VACE transformer raises."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    blocks: dict[str, set[int]] = {"blocks": set(), "vace_blocks": set()}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                m = _BLOCK.match(key)
                if m:
                    blocks[m.group(1)].add(int(m.group(2)))
                bare = re.sub(r"^(?:model\.diffusion_model\.|diffusion_model\.)", "", key)
                if bare in ("patch_embedding.weight", "vace_patch_embedding.weight", "blocks.0.ffn.0.weight"):
                    shapes[bare] = tuple(sf.get_slice(key).get_shape())
    where = ", ".join(str(f) for f in files[:2]) + (" …" if len(files) > 2 else "")
    for need in ("patch_embedding.weight", "blocks.0.ffn.0.weight"):
        if need not in shapes:
            raise CheckpointFormatError(f"{where}: no key {need!r}: not an original-format Wan transformer "
                                        "(a diffusers-layout pipeline needs its model_index.json)")
    if "vace_patch_embedding.weight" not in shapes or not blocks["vace_blocks"]:
        raise CheckpointFormatError(f"{where}: no 'vace_patch_embedding' / 'vace_blocks' keys: a Wan transformer "
                                    "without the VACE branch (T2V/I2V), which this server cannot run")
    pe, vpe = shapes["patch_embedding.weight"], shapes["vace_patch_embedding.weight"]
    return Shape(dim=pe[0], in_channels=pe[1], ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
                 num_layers=max(blocks["blocks"]) + 1, num_vace_blocks=max(blocks["vace_blocks"]) + 1,
                 vace_in_channels=vpe[1])


def default_base(shape: Shape) -> str:
    """The official diffusers model of the same width, which supplies text encoder, tokenizer, VAE, scheduler."""
    return "wan2.1-vace-1.3b" if shape.dim == 1536 else "wan2.1-vace-14b"


def check_against_base(shape: Shape, base_dir: Path, files: tuple[Path, ...]) -> dict[str, Any]:
    """The base's transformer config, after checking it describes the checkpoint; a mismatch raises."""
    cfg_path = base_dir / "transformer" / "config.json"
    if not cfg_path.is_file():
        raise CheckpointFormatError(f"base model {base_dir} has no transformer/config.json, which gives the "
                                    "converted transformer its config")
    cfg = json.loads(cfg_path.read_text())
    want = {"dim": cfg["num_attention_heads"] * cfg["attention_head_dim"], "in_channels": cfg["in_channels"],
            "ffn_dim": cfg["ffn_dim"], "num_layers": cfg["num_layers"],
            "num_vace_blocks": len(cfg.get("vace_layers") or []), "vace_in_channels": cfg.get("vace_in_channels")}
    got = {k: getattr(shape, k) for k in want}
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if bad:
        diff = ", ".join(f"{k} {g} (base {w})" for k, (g, w) in bad.items())
        raise CheckpointFormatError(f"{files[0]}: does not match the base model's transformer config {cfg_path}: "
                                    f"{diff}. Point VACE_BASE_MODEL at the diffusers model of the same "
                                    "architecture")
    return cfg


def check_keys(files: tuple[Path, ...], cfg: dict[str, Any]) -> None:
    """Every weight of the diffusers model must come out of diffusers' key conversion of the file's names
    (checked on the names alone, before any weight is read); extra keys are only logged."""
    from accelerate import init_empty_weights
    from diffusers import WanVACETransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors import safe_open

    names: dict[str, None] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.update(dict.fromkeys(sf.keys()))
    converted = set(convert_wan_transformer_to_diffusers(names))
    with init_empty_weights():
        expected = set(WanVACETransformer3DModel.from_config(cfg).state_dict())
    missing = sorted(expected - converted)
    if missing:
        raise CheckpointFormatError(f"{files[0]}: {len(missing)} transformer weights are missing after diffusers' "
                                    f"key conversion, e.g. {missing[:3]}: an incomplete or non-VACE checkpoint")
    extra = sorted(converted - expected)
    if extra:
        log.warning("%s: %d keys that the transformer does not use, e.g. %s", files[0], len(extra), extra[:3])


def keep_fp32_modules(model: Any) -> None:
    """Parameters named in `_keep_in_fp32_modules` (time embedder, scale-shift tables, affine norms) back to
    fp32, as `from_pretrained(dtype=bf16)` leaves them (the benchmark's random models are built this way).
    Matched per parameter name, as diffusers does."""
    import torch

    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep) and p.dtype != torch.float32:
            p.data = p.data.float()


def cast_like_from_pretrained(model: Any, dtype: Any) -> None:
    """Every parameter to `dtype` except `_keep_in_fp32_modules`, which go to fp32 from the checkpoint's values
    (diffusers' single-file path casts them all with `.to(dtype)`, rounding those too)."""
    import torch

    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        want = torch.float32 if dtype != torch.float32 and any(k in name.split(".") for k in keep) else dtype
        if p.dtype != want:
            p.data = p.data.to(want)


def load_expert(files: tuple[Path, ...], base_dir: Path, dtype: Any, device: Any = None) -> Any:
    """One original-format transformer → `WanVACETransformer3DModel` through diffusers' single-file loader
    (its Wan key conversion), in `dtype` with the fp32 modules `from_pretrained` keeps."""
    from diffusers import WanVACETransformer3DModel
    from safetensors.torch import load_file

    cfg = check_against_base(checkpoint_shape(files), base_dir, files)
    check_keys(files, cfg)
    where = str(device) if device is not None else "cpu"
    state: dict[str, Any] = {}
    for f in files:  # shards merged (one copy of the expert, read straight onto `device`; the model adopts it)
        state.update(load_file(str(f), device=where))
    original_keys = len(state)
    model = WanVACETransformer3DModel.from_single_file(state, config=str(base_dir), subfolder="transformer",
                                                       local_files_only=True, device=where)
    del state
    cast_like_from_pretrained(model, dtype)
    log.info("converted %s (%d original keys, %d file(s)) with diffusers' single-file Wan converter",
             files[0].parent, original_keys, len(files))
    return model.eval()


def load_original_pipeline(ckpt: OriginalCheckpoint, base_dir: Path, dtypes: dict[str, Any],
                           device: Any = None) -> Any:
    """The `WanVACEPipeline` of an original-format checkpoint: converted transformer(s) + the base's other parts.

    Two experts (`high_noise_model`, `low_noise_model`) become `transformer` / `transformer_2` with the A14B
    boundary ratio; `dtypes` is the engine's per-component dtype map (as for `from_pretrained`).
    """
    from diffusers import WanVACEPipeline

    dtype = dtypes.get("transformer", dtypes.get("default"))
    experts = [load_expert(files, base_dir, dtype, device) for files in ckpt.experts]
    extra: dict[str, Any] = {"transformer": experts[0]}
    if ckpt.two_experts:
        extra.update(transformer_2=experts[1], boundary_ratio=A14B_BOUNDARY_RATIO)
    return WanVACEPipeline.from_pretrained(base_dir, dtype=dtypes, **extra)
