"""`vace-local preprocess` writes control.mp4, mask.mp4 and preview.mp4 of the exact job geometry."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from vace_local.cli import app
from vace_local.core.media import probe, write_video


def test_preprocess_command(tmp_path):
    v = write_video(np.full((20, 64, 96, 3), 180, np.uint8), tmp_path / "v.mp4", fps=16)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["preprocess", "--task", "outpainting", "--video", str(v), "--size", "128*64",
                                   "--num-frames", "17", "--control", '{"expand_left": true}', "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name, width in (("control.mp4", 128), ("mask.mp4", 128), ("preview.mp4", 256)):
        info = probe(out / name)
        assert (info.num_frames, info.width, info.height) == (17, width, 64)
    bad = CliRunner().invoke(app, ["preprocess", "--task", "depth", "--out", str(out)])
    assert bad.exit_code == 2 and "needs inputs.video" in bad.output
