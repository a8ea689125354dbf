"""SAM2 mask tracking (the official choice): first-frame mask → `add_new_mask` → `propagate_in_video`.

Needs the `sam2` package and `sam2/sam2.1_hiera_large.pt`; without either, one clear error (the `flow`
tracker needs no weights).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from preprocessors import weights
from vace_local.errors import ModelNotFoundError


def track_sam2(frames: np.ndarray, first_mask: np.ndarray) -> np.ndarray:
    try:
        import torch
        from sam2.build_sam import build_sam2_video_predictor
    except ImportError as exc:
        raise ModelNotFoundError(
            "mask_tracker 'sam2' needs the sam2 package (pip install 'sam2==1.1.0', SAM2_BUILD_CUDA=0 on CPU); "
            "use mask_tracker 'flow' instead"
        ) from exc
    ckpt = weights.resolve("sam2")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_l.yaml", str(ckpt), device=device)
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:  # the predictor reads a folder of JPEG frames
        for i, f in enumerate(frames):
            Image.fromarray(f).save(Path(d) / f"{i:05d}.jpg", quality=95)
        out = np.zeros(frames.shape[:3], np.float32)
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            state = predictor.init_state(video_path=d)
            predictor.add_new_mask(state, frame_idx=0, obj_id=1, mask=first_mask > 0.5)
            for idx, _ids, logits in predictor.propagate_in_video(state):
                out[idx] = (logits[0, 0] > 0).float().cpu().numpy()
    return out
