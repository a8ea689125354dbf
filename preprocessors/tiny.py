"""Tiny random-weight annotators (tests and `--model tiny`): real architecture classes, small configs.

Saved in the same layout the real loaders read, so tests exercise the real loading code.
"""

from __future__ import annotations

from pathlib import Path

from preprocessors import weights
from vace_local.core.config import vace_settings

DET_SIZE = (640, 640)  # YOLOX-L input (h, w)
POSE_SIZE = (384, 288)  # DW-LL ucoco 384 input (h, w)
NUM_KPTS = 133  # COCO-WholeBody
SIMCC_SPLIT = 2.0


def _midas_image_processor(dest: Path) -> None:
    """The settings of Intel/dpt-hybrid-midas' preprocessor_config.json: 384×384 squash, bilinear, mean/std 0.5.

    (Depth resizes the frame itself to the official MiDaS size and skips this resize; the rest applies.)
    """
    from transformers import DPTImageProcessor

    DPTImageProcessor(size={"height": 384, "width": 384}, keep_aspect_ratio=False, ensure_multiple_of=1, resample=2,
                      do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                      image_std=[0.5, 0.5, 0.5]).save_pretrained(dest)


def save_tiny_dpt(dest: Path) -> Path:
    """DPTForDepthEstimation (the transformers class of Intel/dpt-hybrid-midas) with a tiny ViT config."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    if (dest / "config.json").is_file():
        return dest
    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                    fusion_hidden_size=16, head_in_index=-1, is_hybrid=False)
    DPTForDepthEstimation(cfg).save_pretrained(dest)
    _midas_image_processor(dest)
    return dest


def save_tiny_depth_anything(dest: Path) -> Path:
    """DepthAnythingForDepthEstimation with a tiny DINOv2 backbone (same class as the *-hf repos)."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from preprocessors.annotators import depth_anything_pth

    if (dest / "config.json").is_file():
        return dest
    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                            image_size=28, patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                              neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
    DepthAnythingForDepthEstimation(cfg).save_pretrained(dest)
    depth_anything_pth.image_processor().save_pretrained(dest)  # Depth-Anything-V2-Large-hf's settings
    return dest


def save_tiny_dwpose(det_path: Path, pose_path: Path) -> tuple[Path, Path]:
    """ONNX files with YOLOX-L's and DW-LL's input/output signatures, built from tiny random torch nets."""
    import torch
    from torch import nn

    class Det(nn.Module):
        """(1, 3, 640, 640) → (1, 8400, 85): per-anchor raw YOLOX outputs at strides 8, 16, 32."""

        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(nn.Conv2d(3, 85, 1) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            outs = []
            for s, head in zip((8, 16, 32), self.heads, strict=True):
                y = head(nn.functional.avg_pool2d(x / 255.0, s))
                outs.append(y.flatten(2).transpose(1, 2))
            return torch.cat(outs, 1)

    class Pose(nn.Module):
        """(1, 3, 384, 288) → simcc_x (1, 133, 576), simcc_y (1, 133, 768)."""

        def __init__(self) -> None:
            super().__init__()
            self.fx = nn.Linear(3, NUM_KPTS * int(POSE_SIZE[1] * SIMCC_SPLIT))
            self.fy = nn.Linear(3, NUM_KPTS * int(POSE_SIZE[0] * SIMCC_SPLIT))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.fx(f).view(1, NUM_KPTS, -1), self.fy(f).view(1, NUM_KPTS, -1)

    torch.manual_seed(0)
    for path, net, shape, names in (
        (det_path, Det(), (1, 3, *DET_SIZE), ["output"]),
        (pose_path, Pose(), (1, 3, *POSE_SIZE), ["simcc_x", "simcc_y"]),
    ):
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.onnx.export(net.eval(), (torch.zeros(shape),), str(tmp), input_names=["input"], output_names=names,
                          dynamo=False)
        tmp.replace(path)
    return det_path, pose_path


#: hydra overrides shrinking the package's SAM2.1 Hiera-T config: 128 px input, 32-d tokens, 16-d memory
SAM2_TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SAM2_TINY_OVERRIDES = [
    "++model.image_size=128",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.fuser.num_layers=1",
]


def save_tiny_sam2(ckpt: Path) -> Path:
    """SAM2VideoPredictor (the class the real loader builds) from a shrunk Hiera-T config, random init.

    Saved as `{"model": state_dict}` like the official checkpoint, plus the sidecar JSON the loader reads to
    pick the config (preprocessors.sam2_track).
    """
    import json

    import torch
    from sam2.build_sam import build_sam2_video_predictor

    from preprocessors.sam2_track import sidecar

    if ckpt.is_file() and sidecar(ckpt).is_file():
        return ckpt
    torch.manual_seed(0)
    model = build_sam2_video_predictor(SAM2_TINY_CONFIG, None, device="cpu", hydra_overrides_extra=SAM2_TINY_OVERRIDES)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"model": model.state_dict()}, tmp)
    tmp.replace(ckpt)
    sidecar(ckpt).write_text(json.dumps({"config": SAM2_TINY_CONFIG, "overrides": SAM2_TINY_OVERRIDES}, indent=1))
    return ckpt


def ensure_tiny_annotators(dest: Path) -> Path:
    """Build tiny random-weight annotators in the weights layout (idempotent); pass `dest` as `annotators_dir`.

    depth / depthv2: tiny transformers DPT / Depth-Anything models; pose: tiny ONNX models with the DWPose
    input/output signatures. Outputs are meaningless; the code paths are the real ones.
    sam2 (only when the optional sam2 package is installed): a shrunk SAM2.1 video predictor with its config
    sidecar.
    """
    import importlib.util
    import shutil

    dest = Path(dest)
    marker = dest / f".tiny-complete-v{weights.TINY_ANNOTATORS_VERSION}"
    if importlib.util.find_spec("sam2") is not None and not (dest / weights.FILES["sam2"]).is_file():
        save_tiny_sam2(dest / weights.FILES["sam2"])
    if marker.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for rel in weights.HF_DIRS.values():  # an older recipe's folders are rebuilt
        shutil.rmtree(dest / rel, ignore_errors=True)
    save_tiny_dpt(dest / weights.HF_DIRS["depth"])
    save_tiny_depth_anything(dest / weights.HF_DIRS["depthv2"])
    save_tiny_dwpose(dest / weights.FILES["pose_det"], dest / weights.FILES["pose_est"])
    marker.write_text("tiny random-weight annotators: outputs are noise\n")
    return dest


def tiny_annotators_dir(cache_dir: Path) -> Path:
    """The annotators folder for a job on the tiny model: the user's `VACE_ANNOTATORS_DIR` when set, else tiny
    random-weight annotators built once in `cache_dir`/tiny/annotators, so smoke mode preprocesses with no
    downloaded weights. The caller passes the folder on (`build_bundle(..., annotators_dir=)`)."""
    if vace_settings().annotators_dir is not None:
        return weights.annotators_dir()
    return ensure_tiny_annotators(Path(cache_dir) / "tiny" / "annotators")
