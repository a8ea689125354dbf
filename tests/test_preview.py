"""Live previews (vace_local.engine.preview): the Wan 2.1 latent→RGB projection and the x0 the worker shows, on the tiny
model's real pipeline (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import F, H, W, control_bundle, spec

from vace_local.engine.engine import Engine, get_engine
from vace_local.engine.preview import Preview, latent_to_rgb, preview_scope, write_strip


@pytest.fixture(scope="module")
def engine() -> Engine:
    return get_engine("tiny")


def test_projection_of_known_latents():
    """Zero latents give the bias colour; a unit latent in one channel adds that channel's published row."""
    zeros = torch.zeros(1, 16, 2, 3, 4)
    rgb = latent_to_rgb(zeros)
    assert rgb.shape == (2, 3, 4, 3) and rgb.dtype == np.uint8
    # (bias + 1) · 127.5 with ComfyUI's Wan21 bias [-0.1835, -0.0868, -0.3360]
    assert rgb[0, 0, 0].tolist() == [104, 116, 85]
    one = torch.zeros(16, 1, 1, 1)
    one[2] = 1.0  # channel 2: [0.3568, 0.2548, 0.1747]
    assert latent_to_rgb(one)[0, 0, 0].tolist() == [150, 149, 107]
    one[2], one[6] = 0.0, 3.0  # channel 6 ×3: [-0.3477, -0.4059, -0.2925] + bias < -1 → clipped to 0
    assert latent_to_rgb(one)[0, 0, 0].tolist() == [0, 0, 0]
    # linear: a mix is the sum of the parts (before the clip), per pixel and frame independently
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 5, 6, generator=g) * 0.2
    y = torch.randn(16, 3, 5, 6, generator=g) * 0.2
    lin = (latent_to_rgb(x).astype(int) + latent_to_rgb(y).astype(int) - latent_to_rgb(torch.zeros_like(x)).astype(int))
    assert np.abs(latent_to_rgb(x + y).astype(int) - lin).max() <= 2


def test_x0_at_the_last_euler_step_is_the_final_latent(engine: Engine):
    """x0 = x_t − σ_t·v from the guided prediction: at the last Euler step (σ_next = 0) it is the latent the
    pipeline decodes; earlier it is not the noisy latent the step callback would see."""
    got: list[Preview] = []
    with preview_scope(1, got.append):
        engine.generate(spec(sampler="euler", num_inference_steps=4), control_bundle(), seed=3)
    assert [p.step for p in got] == [1, 2, 3, 4] and all(p.total == 4 for p in got)
    last = got[-1]
    torch.testing.assert_close(last.x0, last.latents, rtol=0, atol=1e-5)
    assert not torch.allclose(got[0].x0, got[0].latents, atol=1e-2)  # step 1: x0 is not the step's latent
    lat_f = (F - 1) // 4 + 1
    assert last.frames.shape == (lat_f, H // 8, W // 8, 3)
    assert np.array_equal(last.frames, latent_to_rgb(last.latents))


def test_every_n_steps_skips_reference_frames_and_changes_nothing(engine: Engine):
    """Previews every 2 steps (and after the last); reference-image latent frames are not in the strip; the
    output is the same as without previews (the tap only reads)."""
    s = spec(num_inference_steps=5)
    bundle = control_bundle(refs=2)
    plain = engine.generate(s, bundle, seed=5)
    got: list[Preview] = []
    with preview_scope(2, got.append):
        tapped = engine.generate(s, bundle, seed=5)
    assert np.array_equal(plain, tapped)
    assert [p.step for p in got] == [2, 4, 5]
    assert got[0].x0.shape[2] == (F - 1) // 4 + 1  # 2 reference frames skipped
    with preview_scope(0, got.append):  # 0 = off
        engine.generate(s, bundle, seed=5)
    assert len(got) == 3


def test_strip_is_an_animated_webp(tmp_path):
    from PIL import Image

    frames = np.stack([np.full((6, 10, 3), 40 * i, np.uint8) for i in range(5)])
    path = write_strip(frames, tmp_path / "preview.webp")
    with Image.open(path) as im:
        assert im.format == "WEBP" and im.n_frames == 5 and im.size == (10, 6)
        im.seek(3)
        assert abs(int(np.asarray(im.convert("RGB"))[3, 5, 0]) - 120) <= 4
    assert not list(tmp_path.glob(".*"))  # the temporary file was renamed


def test_two_experts_share_the_tap():
    """Wan 2.2's two experts step one scheduler: every step is previewed across the expert switch, and the last
    Euler x0 is still the final latent."""
    eng = Engine("tiny-two-expert")
    got: list[Preview] = []
    with preview_scope(1, got.append):
        eng.generate(spec(model="tiny-two-expert", sampler="euler", num_inference_steps=6, flow_shift=3.0),
                     control_bundle(), seed=2)
    assert [p.step for p in got] == list(range(1, 7))
    torch.testing.assert_close(got[-1].x0, got[-1].latents, rtol=0, atol=1e-5)
