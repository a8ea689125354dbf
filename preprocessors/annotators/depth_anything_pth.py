"""Read the official `depth_anything_v2_vitl.pth` into transformers' `DepthAnythingForDepthEstimation`.

The official file is a bare state dict of the Depth-Anything-V2 repository's own module (`pretrained.*` DINOv2
ViT-L/14 + `depth_head.*` DPT head), which transformers cannot open. Its tensors map one to one onto the
transformers layout, except each block's fused `attn.qkv` which is split into query / key / value. The config
and image processor settings are those of depth-anything/Depth-Anything-V2-Large-hf, which match the official
`infer_image` (short side resized up to 518, sides multiples of 14, bicubic, ImageNet mean / std).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vace_local.core.errors import ModelNotFoundError

#: official `intermediate_layer_idx['vitl']` = [4, 11, 17, 23]; transformers counts the embeddings as stage 0
VITL_OUT_INDICES = [5, 12, 18, 24]

# (official key pattern, transformers key) — applied in order, the first match wins.
_RULES: list[tuple[str, str]] = [
    (r"pretrained\.cls_token", "backbone.embeddings.cls_token"),
    (r"pretrained\.mask_token", "backbone.embeddings.mask_token"),
    (r"pretrained\.pos_embed", "backbone.embeddings.position_embeddings"),
    (r"pretrained\.patch_embed\.proj\.(weight|bias)", r"backbone.embeddings.patch_embeddings.projection.\1"),
    (r"pretrained\.blocks\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
     r"backbone.encoder.layer.\1.\2.\3"),
    (r"pretrained\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"backbone.encoder.layer.\1.attention.o_proj.\2"),
    (r"pretrained\.blocks\.(\d+)\.ls([12])\.gamma", r"backbone.encoder.layer.\1.layer_scale\2.lambda1"),
    (r"pretrained\.norm\.(weight|bias)", r"backbone.layernorm.\1"),
    (r"depth_head\.projects\.(\d)\.(weight|bias)", r"neck.reassemble_stage.layers.\1.projection.\2"),
    (r"depth_head\.resize_layers\.(\d)\.(weight|bias)", r"neck.reassemble_stage.layers.\1.resize.\2"),
    (r"depth_head\.scratch\.output_conv1\.(weight|bias)", r"head.conv1.\1"),
    (r"depth_head\.scratch\.output_conv2\.0\.(weight|bias)", r"head.conv2.\1"),
    (r"depth_head\.scratch\.output_conv2\.2\.(weight|bias)", r"head.conv3.\1"),
]
_QKV = re.compile(r"pretrained\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_LAYER_RN = re.compile(r"depth_head\.scratch\.layer([1-4])_rn\.weight")
# refinenet4 (deepest) is transformers' first fusion layer
_REFINE = re.compile(r"depth_head\.scratch\.refinenet([1-4])\.(out_conv|resConfUnit[12]\.conv[12])\.(weight|bias)")


def _fusion_part(part: str) -> str:
    if part == "out_conv":
        return "projection"
    unit, conv = part.split(".")
    return f"residual_layer{unit[-1]}.convolution{conv[-1]}"


def official_to_transformers(state: dict[str, Any]) -> dict[str, Any]:
    """Rename (and split qkv of) an official Depth-Anything-V2 state dict; unknown keys raise KeyError."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if m := _QKV.fullmatch(key):
            q, k, v = value.chunk(3, dim=0)
            base = f"backbone.encoder.layer.{m[1]}.attention"
            out.update({f"{base}.q_proj.{m[2]}": q, f"{base}.k_proj.{m[2]}": k, f"{base}.v_proj.{m[2]}": v})
            continue
        if m := _LAYER_RN.fullmatch(key):
            out[f"neck.convs.{int(m[1]) - 1}.weight"] = value
            continue
        if m := _REFINE.fullmatch(key):
            out[f"neck.fusion_stage.layers.{4 - int(m[1])}.{_fusion_part(m[2])}.{m[3]}"] = value
            continue
        for pattern, target in _RULES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            raise KeyError(key)
    return out


def vitl_config() -> Any:
    """DepthAnythingConfig of the official vitl model (features 256, out_channels [256, 512, 1024, 1024])."""
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                            image_size=518, patch_size=14, out_indices=VITL_OUT_INDICES, apply_layernorm=True,
                            reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=1024,
                               reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=[256, 512, 1024, 1024],
                               fusion_hidden_size=256, head_hidden_size=32, head_in_index=-1,
                               depth_estimation_type="relative")


def image_processor() -> Any:
    """The official `infer_image` preprocessing as a DPTImageProcessor."""
    from transformers import DPTImageProcessor

    return DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                             resample=3, do_rescale=True, do_normalize=True, image_mean=[0.485, 0.456, 0.406],
                             image_std=[0.229, 0.224, 0.225], do_pad=False)


def load_official(path: Path, config: Any = None) -> Any:
    """DepthAnythingForDepthEstimation holding the official file's tensors (strict: every weight accounted for)."""
    import torch
    from transformers import DepthAnythingForDepthEstimation

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and not any(k.startswith("pretrained.") for k in state):
        state = state["model"]
    try:
        mapped = official_to_transformers(state)
        with torch.device("meta"):  # no random init of 335M parameters that are overwritten anyway
            model = DepthAnythingForDepthEstimation(config or vitl_config())
        model.load_state_dict(mapped, strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelNotFoundError(
            f"{path} is not an official Depth-Anything-V2 vitl checkpoint ({type(exc).__name__}: {exc})"[:600]
        ) from exc
    return model.eval()
