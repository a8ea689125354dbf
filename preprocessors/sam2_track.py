"""SAM2 mask tracking (the official choice): first-frame mask → `add_new_mask` → `propagate_in_video`.

Needs the `sam2` package and `sam2/sam2.1_hiera_large.pt` (SAM2.1 Hiera-L with the package's
`configs/sam2.1/sam2.1_hiera_l.yaml`); without either, one clear error (the `flow` tracker needs no weights).
A checkpoint may carry a sidecar `sam2.1_hiera_large.json` ({"config": ..., "overrides": [...]}) naming the
package config and hydra overrides it was built with: the tiny random-weight model uses it, so tests load it
through the same code as the real checkpoint. As in official VACE: seeded with the user's first-frame mask,
no dilation, `fill_hole_area = 0`.
"""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from preprocessors import weights
from vace_local.core.errors import ModelNotFoundError
from vace_local.core.events import checkpoint

CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"  # the package config that matches sam2.1_hiera_large.pt


def sidecar(ckpt: Path) -> Path:
    """Where a non-default checkpoint records the config it needs."""
    return ckpt.with_suffix(".json")


def _config_for(ckpt: Path) -> tuple[str, list[str]]:
    side = sidecar(ckpt)
    if not side.is_file():
        return CONFIG, []
    rec = json.loads(side.read_text())
    return str(rec.get("config", CONFIG)), [str(o) for o in rec.get("overrides", [])]


@functools.lru_cache(maxsize=2)
def _predictor(ckpt: str, mtime: float, device: str) -> Any:
    """Build once per process (per checkpoint file and device): Hiera-L takes seconds to load."""
    from sam2.build_sam import build_sam2_video_predictor

    config, overrides = _config_for(Path(ckpt))
    try:
        predictor = build_sam2_video_predictor(config, ckpt, device=device, hydra_overrides_extra=overrides)
    except RuntimeError as exc:  # sam2 raises a bare RuntimeError when the state dict does not fit the config
        raise ModelNotFoundError(
            f"SAM2 checkpoint {ckpt} does not match {config} (expected SAM2.1 Hiera-L); {weights.DOWNLOAD_HINT}"
        ) from exc
    predictor.fill_hole_area = 0  # official VACE turns off sam2's default hole filling (8 px) after building
    return predictor


def load_predictor(device: str, annotators_dir: Path | None = None) -> Any:
    try:
        import sam2.build_sam  # noqa: F401
    except ImportError as exc:
        raise ModelNotFoundError(
            "mask_tracker 'sam2' needs the sam2 package (pip install 'sam2==1.1.0', SAM2_BUILD_CUDA=0 on CPU); "
            "use mask_tracker 'flow' instead"
        ) from exc
    ckpt = weights.resolve("sam2", annotators_dir)
    return _predictor(str(ckpt), ckpt.stat().st_mtime, device)


def track_sam2(frames: np.ndarray, first_mask: np.ndarray, annotators_dir: Path | None = None) -> np.ndarray:
    """Masks (F, H, W) float32 0/1 at the frames' size; frame 0 is the given mask itself."""
    import torch
    from PIL import Image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = load_predictor(device, annotators_dir)
    first = first_mask >= 0.5
    out = np.zeros(frames.shape[:3], np.float32)
    with tempfile.TemporaryDirectory(prefix="vace-sam2-") as d:  # sam2 1.1.0 reads a JPEG folder or an mp4
        for i, f in enumerate(frames):
            Image.fromarray(np.ascontiguousarray(f)).save(Path(d) / f"{i:05d}.jpg", quality=95)
        with (
            torch.inference_mode(),
            torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"),
            warnings.catch_warnings(),
        ):
            # without the optional CUDA extension sam2 skips hole filling and warns once per frame
            warnings.filterwarnings("ignore", message=r".*cannot import name '_C'.*")
            state = predictor.init_state(video_path=d)
            predictor.add_new_mask(state, frame_idx=0, obj_id=1, mask=torch.from_numpy(first))
            for idx, _ids, logits in predictor.propagate_in_video(state):
                checkpoint()
                out[idx] = (logits[0, 0] > 0).float().cpu().numpy()
            predictor.reset_state(state)
    out[0] = first  # the user's mask is the truth on frame 0 (SAM2 re-renders it from a low-res copy)
    return out
