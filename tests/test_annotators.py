"""Annotators end to end on tiny random weights, saved in the official layout, loaded by the real loaders."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessors import build_bundle, tiny, weights
from preprocessors.annotators.pose import FACE, draw
from tests.media_helpers import LocalInputs
from vace_local.core.errors import ModelNotFoundError
from vace_local.core.media import write_video
from vace_local.core.spec import JobSpec


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("annotators")
    tiny.ensure_tiny_annotators(d)
    assert tiny.ensure_tiny_annotators(d) == d  # idempotent
    return d


@pytest.fixture()
def video(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.integers(0, 255, (9, 64, 96, 3), dtype=np.uint8)
    return write_video(f, tmp_path / "v.mp4", fps=16, quality="maximum")


def test_tiny_layout(tiny_dir):
    for rel in (weights.FILES["pose_det"], weights.FILES["pose_est"], weights.FILES["sam2"]):
        assert (tiny_dir / rel).is_file()
    assert (tiny_dir / weights.FILES["sam2"]).with_suffix(".json").is_file()  # the tiny config it needs
    for rel in weights.HF_DIRS.values():
        assert (tiny_dir / rel / "config.json").is_file()


@pytest.mark.parametrize("task", ["depth", "depthv2", "pose", "face"])
def test_control_tasks_on_tiny_weights(tiny_dir, video, monkeypatch, task):
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(tiny_dir))
    s = JobSpec(task=task, width=96, height=64, num_frames=17, inputs={"video": "v"})
    b = build_bundle(s, LocalInputs(video=video))
    b.check(17, 64, 96)
    assert np.all(b.masks == 1)
    real = b.frames[:9]
    if task.startswith("depth"):
        assert b.info["annotator"].startswith("transformers:")
        # min-max normalised on the model's map of the whole source frame, then resized to the frame: within
        # 0..1 and not flat (the exact values are checked with a ramp model in test_tracking_depth_rules.py)
        assert real.min() >= 0 and real.max() <= 1 and np.all(real.max(axis=(1, 2, 3)) > real.min(axis=(1, 2, 3)))
        assert np.array_equal(real[..., 0], real[..., 2])
    else:
        assert b.info["annotator"] == "dwpose-onnx"
    assert np.all(b.frames[9:] == 0.5)  # padding after the 9-frame clip


@pytest.mark.parametrize("task", ["depth", "pose"])
def test_annotators_dir_is_passed_explicitly(tiny_dir, video, monkeypatch, tmp_path, task):
    """The folder given to build_bundle is the one the annotators load from, whatever the environment says,
    and building the bundle leaves the environment alone."""
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = JobSpec(task=task, width=96, height=64, num_frames=17, inputs={"video": "v"})
    b = build_bundle(s, LocalInputs(video=video), annotators_dir=tiny_dir)
    assert b.info["annotator"] == ("dwpose-onnx" if task == "pose" else "transformers:dpt-hybrid-midas-hf")
    import os

    assert os.environ["VACE_ANNOTATORS_DIR"] == str(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError):  # the default folder (the environment's) is still the fallback
        build_bundle(s, LocalInputs(video=video))


def test_draw_pose_and_face():
    pts = np.zeros((133, 2), np.float32)
    scores = np.zeros(133, np.float32)
    # right shoulder (COCO 6) and left shoulder (5) → neck between them; face points on a row
    pts[5], pts[6], scores[5], scores[6] = (70, 40), (30, 40), 0.9, 0.9
    pts[FACE] = np.stack([np.linspace(20, 80, 68), np.full(68, 10)], -1)
    scores[FACE] = 0.9
    face = np.zeros((64, 96, 3), np.uint8)
    draw(face, [(pts, scores)], body=False, face=True)
    assert np.all(face[10, 20] == 255) and face[40].max() == 0
    body = np.zeros((64, 96, 3), np.uint8)
    draw(body, [(pts, scores)], body=True, face=False)
    assert body[40, 50].max() > 0 and body[10].max() == 0  # limb drawn, no face dots
    assert tuple(body[40, 60]) == tuple(int(c * 0.6) for c in (255, 85, 0))  # neck→left-shoulder limb colour


def test_missing_weights_name_file_and_command(tmp_path, video, monkeypatch):
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = JobSpec(task="pose", width=96, height=64, num_frames=17, inputs={"video": "v"})
    with pytest.raises(ModelNotFoundError, match=r"yolox_l\.onnx.*vace-local download annotators"):
        build_bundle(s, LocalInputs(video=video))
    with pytest.raises(ModelNotFoundError, match=r"dpt_hybrid-midas-501f0c75\.pt"):
        build_bundle(s.model_copy(update={"task": "depth"}), LocalInputs(video=video))


@pytest.mark.slow
def test_official_midas_file_through_controlnet_aux(tmp_path, video, monkeypatch):
    """The official dpt_hybrid .pt (full-size architecture, random weights) via controlnet-aux."""
    import torch
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    path = tmp_path / weights.FILES["depth"]
    path.parent.mkdir(parents=True)
    model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(tmp_path))
    s = JobSpec(task="depth", width=96, height=64, num_frames=17, inputs={"video": "v"})
    b = build_bundle(s, LocalInputs(video=video))
    assert b.info["annotator"] == "controlnet-aux:midas-dpt-hybrid"
    real = b.frames[:9]
    # min-max per frame: each frame spans 0..1, or is all 0 when random weights give a flat (ReLU-clamped) map
    assert np.all((np.isclose(real.max(axis=(1, 2, 3)), 1) & np.isclose(real.min(axis=(1, 2, 3)), 0))
                  | (real.max(axis=(1, 2, 3)) == 0))
