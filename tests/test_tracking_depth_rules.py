"""Official VACE rules for mask tracking and depth (issue 10, findings 8 and 9), with controlled models.

- `mask_tracker` auto = SAM2.1 when the sam2 package and its checkpoint are present, else flow; the bundle info
  says which ran and why.
- The official `sam2.1_hiera_large.pt` layout ({"model": state_dict} of the package's Hiera-L config) loads.
- The official `depth_anything_v2_vitl.pth` (its own key names) loads into transformers' layout unchanged.
- Depth is normalised on the whole source frame, then cropped: a depth model that returns a known ramp shows
  the crop's values equal the source-frame formula (cropping first would stretch the crop to 0..1).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from preprocessors import build_bundle, weights
from tests.media_helpers import LocalInputs, moving_square
from vace_local.core.media import write_video
from vace_local.core.spec import JobSpec

HAS_SAM2 = importlib.util.find_spec("sam2") is not None
needs_sam2 = pytest.mark.skipif(not HAS_SAM2, reason="the optional sam2 package is not installed")


def _square_clip(tmp_path: Path, n: int = 5, width: int = 64) -> LocalInputs:
    from PIL import Image

    frames, truth = moving_square(n, width, 64, size=20)
    video = write_video(frames, tmp_path / "v.mp4", fps=16, quality="maximum")
    Image.fromarray((truth[0] * 255).astype(np.uint8)).save(tmp_path / "m.png")
    return LocalInputs(video=video, mask_image=tmp_path / "m.png")


def _inpaint_spec(**control: str) -> JobSpec:
    return JobSpec(task="inpainting", width=64, height=64, num_frames=17, inputs={"video": "v", "mask_image": "m"},
                   control=control)


# --- mask tracker: auto ------------------------------------------------------------------------------------


def test_auto_tracker_falls_back_to_flow_and_says_why(tmp_path, monkeypatch):
    empty = tmp_path / "annotators"
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(empty))
    assert JobSpec().control.mask_tracker == "auto"
    b = build_bundle(_inpaint_spec(), _square_clip(tmp_path))
    assert b.info["mask_tracker"] == "flow"
    reason = b.info["mask_tracker_reason"]
    if HAS_SAM2:
        assert reason == f"auto: sam2.1_hiera_large.pt not found in {empty / 'sam2'}"
    else:
        assert "sam2 package is not installed" in reason


@needs_sam2
def test_auto_tracker_picks_sam2_when_package_and_weights_exist(tmp_path, monkeypatch):
    from preprocessors import tiny

    d = tmp_path / "annotators"
    tiny.save_tiny_sam2(d / weights.FILES["sam2"])
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(d))
    # a 96x64 source into a 64x64 job: SAM2 tracks the uncropped source frames, its masks are cropped after
    b = build_bundle(_inpaint_spec(), _square_clip(tmp_path, width=96))
    assert b.info["mask_tracker"] == "sam2"
    assert b.info["mask_tracker_reason"].startswith(f"auto: sam2 package and sam2.1_hiera_large.pt found in {d}")
    b.check(17, 64, 64)
    assert set(np.unique(b.masks)) <= {0.0, 1.0}
    _, truth = moving_square(5, 96, 64, size=20)
    assert np.array_equal(b.masks[0], truth[0][:, 16:80])  # frame 0: the user's mask, cropped like the video
    # an explicit choice is kept and recorded as such
    b = build_bundle(_inpaint_spec(mask_tracker="flow"), _square_clip(tmp_path))
    assert (b.info["mask_tracker"], b.info["mask_tracker_reason"]) == ("flow", "mask_tracker 'flow' requested")


@needs_sam2
@pytest.mark.slow
def test_official_sam2_hiera_large_checkpoint_loads(tmp_path, monkeypatch):
    """The package's Hiera-L config, random init, saved like the official file: every tensor comes back."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    from preprocessors import sam2_track
    from preprocessors.tracking import choose_tracker

    torch.manual_seed(1234)
    source = build_sam2_video_predictor(sam2_track.CONFIG, None, device="cpu").state_dict()
    assert sum(v.numel() for v in source.values()) > 220e6  # SAM2.1 Hiera-L: ~224M parameters
    ckpt = tmp_path / weights.FILES["sam2"]
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": source}, ckpt)
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(tmp_path))
    assert choose_tracker("auto") == ("sam2", f"auto: sam2 package and sam2.1_hiera_large.pt found in "
                                              f"{ckpt.parent} (official SAM2.1 Hiera-L)")
    predictor = sam2_track.load_predictor("cpu")
    assert predictor.fill_hole_area == 0  # official VACE: no hole filling
    loaded = predictor.state_dict()
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    del predictor, loaded
    sam2_track._predictor.cache_clear()


# --- Depth-Anything-V2 official .pth -------------------------------------------------------------------------


def official_depth_anything_vitl_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the official DepthAnythingV2(encoder='vitl', features=256,
    out_channels=[256, 512, 1024, 1024]) state dict: DINOv2 ViT-L/14 at 518 px (`pretrained.*`) + DPT head."""
    dim, feat, outs = 1024, 256, (256, 512, 1024, 1024)
    s: dict[str, tuple[int, ...]] = {
        "pretrained.cls_token": (1, 1, dim), "pretrained.pos_embed": (1, 37 * 37 + 1, dim),
        "pretrained.mask_token": (1, dim), "pretrained.patch_embed.proj.weight": (dim, 3, 14, 14),
        "pretrained.patch_embed.proj.bias": (dim,), "pretrained.norm.weight": (dim,), "pretrained.norm.bias": (dim,),
    }
    for i in range(24):
        b = f"pretrained.blocks.{i}."
        s |= {b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
              b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
              b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
              b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
              b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,), b + "ls2.gamma": (dim,)}
    h = "depth_head."
    for i, c in enumerate(outs):
        s |= {f"{h}projects.{i}.weight": (c, dim, 1, 1), f"{h}projects.{i}.bias": (c,)}
    for i, k in ((0, 4), (1, 2)):  # transposed convs ×4 and ×2; layer 2 is an identity; layer 3 a stride-2 conv
        s |= {f"{h}resize_layers.{i}.weight": (outs[i], outs[i], k, k), f"{h}resize_layers.{i}.bias": (outs[i],)}
    s |= {f"{h}resize_layers.3.weight": (outs[3], outs[3], 3, 3), f"{h}resize_layers.3.bias": (outs[3],)}
    for i, c in enumerate(outs, start=1):
        s[f"{h}scratch.layer{i}_rn.weight"] = (feat, c, 3, 3)
    for r in range(1, 5):
        p = f"{h}scratch.refinenet{r}."
        s |= {p + "out_conv.weight": (feat, feat, 1, 1), p + "out_conv.bias": (feat,)}
        for u in (1, 2):
            for c in (1, 2):
                unit = f"{p}resConfUnit{u}.conv{c}"
                s |= {f"{unit}.weight": (feat, feat, 3, 3), f"{unit}.bias": (feat,)}
    s |= {f"{h}scratch.output_conv1.weight": (feat // 2, feat, 3, 3), f"{h}scratch.output_conv1.bias": (feat // 2,),
          f"{h}scratch.output_conv2.0.weight": (32, feat // 2, 3, 3), f"{h}scratch.output_conv2.0.bias": (32,),
          f"{h}scratch.output_conv2.2.weight": (1, 32, 1, 1), f"{h}scratch.output_conv2.2.bias": (1,)}
    return s


@pytest.mark.slow
def test_official_depth_anything_v2_pth_converts_to_transformers(tmp_path, monkeypatch):
    import torch

    from preprocessors.annotators.depth import load_depth
    from preprocessors.annotators.depth_anything_pth import load_official

    shapes = official_depth_anything_vitl_shapes()
    assert len(shapes) == 407
    g = torch.Generator().manual_seed(0)
    source = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    path = tmp_path / weights.FILES["depthv2"]
    path.parent.mkdir(parents=True)
    torch.save(source, path)
    # the depthv2 loader takes the official file when no transformers folder is there (it used to refuse it)
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(tmp_path))
    load_depth.cache_clear()
    assert load_depth("depthv2", str(tmp_path))[0] == "official-pth:depth-anything-v2-vitl"
    load_depth.cache_clear()
    model = load_official(path)
    got = model.state_dict()
    assert len(got) == 407 + 24 * 4  # each fused qkv weight / bias becomes three tensors
    for i in (0, 11, 23):
        q, k, v = (got[f"backbone.encoder.layer.{i}.attention.{n}_proj.weight"] for n in "qkv")
        assert torch.equal(torch.cat([q, k, v]), source[f"pretrained.blocks.{i}.attn.qkv.weight"])
    pairs = {  # one tensor per renaming rule
        "pretrained.pos_embed": "backbone.embeddings.position_embeddings",
        "pretrained.blocks.7.ls2.gamma": "backbone.encoder.layer.7.layer_scale2.lambda1",
        "pretrained.blocks.7.attn.proj.weight": "backbone.encoder.layer.7.attention.o_proj.weight",
        "pretrained.norm.weight": "backbone.layernorm.weight",
        "depth_head.resize_layers.3.weight": "neck.reassemble_stage.layers.3.resize.weight",
        "depth_head.scratch.layer2_rn.weight": "neck.convs.1.weight",
        "depth_head.scratch.refinenet4.resConfUnit2.conv1.weight":
            "neck.fusion_stage.layers.0.residual_layer2.convolution1.weight",
        "depth_head.scratch.refinenet1.out_conv.bias": "neck.fusion_stage.layers.3.projection.bias",
        "depth_head.scratch.output_conv2.2.weight": "head.conv3.weight",
    }
    for off, hf in pairs.items():
        assert torch.equal(got[hf], source[off]), (off, hf)
    # nothing lost or invented: the model's tensors are exactly the source's (qkv as its three parts)

    def sig(t: torch.Tensor) -> tuple:
        return tuple(t.shape), float(t.sum())

    expected = []
    for k, v in source.items():
        expected += [sig(c) for c in v.chunk(3)] if ".attn.qkv." in k else [sig(v)]
    assert sorted(expected) == sorted(sig(v) for v in got.values())
    with torch.inference_mode():
        depth = model(pixel_values=torch.rand(1, 3, 28, 42)).predicted_depth  # 2x3 patches: it runs
    assert depth.shape == (1, 28, 42) and torch.isfinite(depth).all()


# --- depth: normalised on the source frame, then cropped ---------------------------------------------------


def _register_ramp_model():  # noqa: ANN202 - (config class, model class)
    """A depth model with the transformers signature whose output is a known ramp across the input's width."""
    import torch
    from transformers import AutoConfig, AutoModelForDepthEstimation, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import DepthEstimatorOutput

    class RampDepthConfig(PretrainedConfig):
        model_type = "vace-test-ramp-depth"

    class RampDepthModel(PreTrainedModel):
        config_class = RampDepthConfig
        main_input_name = "pixel_values"

        def __init__(self, config: RampDepthConfig) -> None:
            super().__init__(config)
            self.offset = torch.nn.Parameter(torch.tensor(3.0))  # any offset / scale: min-max removes it
            self.post_init()

        def _init_weights(self, module: torch.nn.Module) -> None:
            pass

        def forward(self, pixel_values: torch.Tensor, **_: object) -> DepthEstimatorOutput:
            b, _, h, w = pixel_values.shape
            ramp = self.offset + 5.0 * torch.arange(w, dtype=torch.float32) / (w - 1)  # larger = nearer
            return DepthEstimatorOutput(predicted_depth=ramp.expand(b, h, w).clone())

    try:
        AutoConfig.register(RampDepthConfig.model_type, RampDepthConfig)
        AutoModelForDepthEstimation.register(RampDepthConfig, RampDepthModel)
    except ValueError:  # already registered by an earlier test in this process
        pass
    return RampDepthConfig, RampDepthModel


@pytest.fixture(scope="module")
def ramp_depth_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForDepthEstimation, DPTImageProcessor

    _register_ramp_model()
    d = tmp_path_factory.mktemp("ramp-annotators")
    target = d / weights.HF_DIRS["depth"]
    cfg = AutoConfig.for_model("vace-test-ramp-depth")
    AutoModelForDepthEstimation.from_config(cfg).save_pretrained(target)
    # Intel/dpt-hybrid-midas' preprocessor_config.json: the model sees the frame squashed to 384x384
    DPTImageProcessor(size={"height": 384, "width": 384}, keep_aspect_ratio=False, ensure_multiple_of=1,
                      resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(target)
    return d


def test_depth_of_a_ramp_is_normalised_on_the_source_frame_before_the_crop(ramp_depth_dir, tmp_path, monkeypatch):
    from preprocessors.annotators.depth import load_depth

    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(ramp_depth_dir))
    load_depth.cache_clear()
    src_w, src_h, job = 160, 64, 64  # landscape source into a square job: the crop keeps x in [48, 112)
    rng = np.random.default_rng(0)
    video = write_video(rng.integers(0, 255, (3, src_h, src_w, 3), dtype=np.uint8), tmp_path / "v.mp4", fps=16,
                        quality="maximum")
    s = JobSpec(task="depth", width=job, height=job, num_frames=17, inputs={"video": "v"})
    b = build_bundle(s, LocalInputs(video=video))
    assert b.info["annotator"] == "transformers:dpt-hybrid-midas-hf"
    control = b.frames[:3]
    assert np.array_equal(control[..., 0], control[..., 1]) and np.array_equal(control[..., 0], control[..., 2])
    # official: the ramp spans 0..1 over the whole source width; the centre crop shows its middle part
    left = (src_w - job) // 2
    expected = (np.arange(job) + left + 0.5) / src_w
    got = control[0, job // 2, :, 0]
    assert np.abs(got - expected).max() < 0.02, (got[[0, -1]], expected[[0, -1]])
    assert np.allclose(control[:, :, :, 0], got[None, None, :], atol=1e-6)  # the same ramp on every row / frame
    assert 0.28 < got.min() < 0.33 and 0.67 < got.max() < 0.72  # cropping first would give 0 .. 1
    load_depth.cache_clear()
