"""Where annotator weights live: a folder in the ali-vilab/VACE-Annotators layout.

The folder is passed down explicitly (`annotators_dir=` of `build_bundle` and the annotators); None means the
default, `VACE_ANNOTATORS_DIR` or ~/.cache/vace-local/annotators.

Resolution order per file: the local folder; then (unless HF_HUB_OFFLINE) huggingface_hub from the official
repo; else one clear error naming the missing file and the command that fetches it. Transformers-format
models (Depth-Anything-V2 `*-hf` repos, Intel/dpt-hybrid-midas) are accepted as sub-folders with config.json.
"""

from __future__ import annotations

import os
from pathlib import Path

from vace_local.core.config import vace_settings
from vace_local.core.errors import ModelNotFoundError

OFFICIAL_REPO = "ali-vilab/VACE-Annotators"
FILES = {
    "depth": "depth/dpt_hybrid-midas-501f0c75.pt",
    "depthv2": "depth/depth_anything_v2_vitl.pth",
    "pose_det": "pose/yolox_l.onnx",
    "pose_est": "pose/dw-ll_ucoco_384.onnx",
    "sam2": "sam2/sam2.1_hiera_large.pt",
    "salient": "salient/u2net.pt",
}
#: transformers-format alternatives (folder with config.json), looked up before the official file
HF_DIRS = {"depth": "depth/dpt-hybrid-midas-hf", "depthv2": "depth/depth-anything-v2-hf"}
#: bumped when the tiny annotator recipe changes (v2: the real DPT / Depth-Anything image processor settings)
TINY_ANNOTATORS_VERSION = 2
DOWNLOAD_HINT = "run `vace-local download annotators` (or set VACE_ANNOTATORS_DIR to a folder that has it)"


def annotators_dir(root: Path | None = None) -> Path:
    """`root` when given, else the default folder (`VACE_ANNOTATORS_DIR`, or the user cache)."""
    if root is not None:
        return Path(root)
    return vace_settings().annotators_root


def hf_dir(key: str, root: Path | None = None) -> Path | None:
    rel = HF_DIRS.get(key)
    d = annotators_dir(root) / rel if rel else None
    return d if d is not None and (d / "config.json").is_file() else None


def resolve(key: str, root: Path | None = None) -> Path:
    """Local path of the official file for `key` under `root` (None: the default folder); fetched from the Hub
    when online, else ModelNotFoundError."""
    rel = FILES[key]
    local = annotators_dir(root) / rel
    if local.is_file():
        return local
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(OFFICIAL_REPO, rel, local_dir=annotators_dir(root)))
        except Exception:  # offline, repo unreachable, file absent: fall through to the clear error
            pass
    raise ModelNotFoundError(f"annotator weights missing: {local} ({OFFICIAL_REPO}/{rel}); {DOWNLOAD_HINT}")


def download_annotators(dest: Path | None = None, keys: list[str] | None = None) -> Path:
    """Fetch the official annotator files into `dest` (default: the annotators folder); returns the folder."""
    from huggingface_hub import snapshot_download

    dest = Path(dest) if dest else annotators_dir()
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [FILES[k] for k in (keys or ["depth", "depthv2", "pose_det", "pose_est", "sam2", "salient"])]
    snapshot_download(OFFICIAL_REPO, allow_patterns=wanted, local_dir=dest)
    return dest
