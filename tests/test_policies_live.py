"""The memory policies from outside, on the real Wan architecture (tests/realarch.py): the CLI
(`vace-local generate --model DIR --offload X`) and a live server (`python -m server --model DIR`, env
`VACE_OFFLOAD`) over consecutive jobs. Every policy must give `offload none`'s frames and sampling statistics."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.test_server_live import AUTH, LiveServer
from vace_local.cli import app

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

pytestmark = pytest.mark.slow

POLICIES = ("none", "model", "group", "sequential")
SAMPLING = ("num_inference_steps", "computed_steps", "skipped_steps", "forwards", "skipped_step_indices")


def decoded(path: Path) -> np.ndarray:
    frames = imageio_ffmpeg.read_frames(str(path))
    meta = next(frames)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in frames])


def sampling(metadata: dict[str, Any]) -> dict[str, Any]:
    return {k: metadata["sampling"][k] for k in SAMPLING}


def test_cli_every_policy_consecutive_jobs(realarch_wan21: Path, tmp_path: Path) -> None:
    """Two `generate` runs per policy in one process (the second reuses the loaded engine) on the real VAE."""
    runner = CliRunner()
    got: dict[str, list[tuple[np.ndarray, dict[str, Any]]]] = {}
    for policy in POLICIES:
        for i, seed in enumerate((3, 4)):
            out = tmp_path / policy
            result = runner.invoke(app, [
                "generate", "--model", str(realarch_wan21), "--offload", policy, "--device", "cpu", "--cfg-batch",
                "--prompt", "a dog runs on the beach", "--size", "16x16", "--num-frames", "17", "--steps", "2",
                "--seed", str(seed), "--out", str(out), "--name", f"job{i}", "--quiet"])
            assert result.exit_code == 0, result.output
            meta = json.loads((out / f"job{i}.json").read_text())
            got.setdefault(policy, []).append((decoded(out / f"job{i}.mp4"), sampling(meta)))
    for policy in POLICIES:
        for i, (frames, stats) in enumerate(got[policy]):
            assert stats == {"num_inference_steps": 2, "computed_steps": 2, "skipped_steps": 0, "forwards": 2,
                             "skipped_step_indices": []}, (policy, i)
            assert np.array_equal(frames, got["none"][i][0]), f"{policy} job {i + 1}: frames differ from none"
    assert not np.array_equal(got["none"][0][0], got["none"][1][0])


def _run_jobs(srv: LiveServer, seeds: tuple[int, ...]) -> list[tuple[np.ndarray, dict[str, Any]]]:
    out = []
    for seed in seeds:
        body = {"prompt": "a red car on a city street at night", "size": "16x16", "seconds": "1",
                "num_inference_steps": 2, "seed": seed, "flow_shift": 3.0}
        r = httpx.post(f"{srv.base}/v1/videos", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        vid = r.json()["id"]
        deadline = time.time() + 300
        row = srv.row(vid)
        while row["status"] not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
            time.sleep(0.3)
            row = srv.row(vid)
        assert row["status"] == "succeeded", (row, srv.logs(vid))
        job_dir = srv.data_dir / "outputs" / vid
        [meta_file] = [p for p in job_dir.glob("*.json")]
        [video_file] = [p for p in job_dir.glob("*.mp4")]
        out.append((decoded(video_file), sampling(json.loads(meta_file.read_text()))))
    return out


def test_live_server_every_policy_consecutive_jobs(realarch_wan21_narrow_vae: Path, tmp_path: Path) -> None:
    """One server per policy, one worker, three jobs each: same frames and statistics as `offload none`."""
    seeds = (5, 6, 5)
    got = {}
    for policy in POLICIES:
        srv = LiveServer(tmp_path / policy, tmp_path / "cache", model=str(realarch_wan21_narrow_vae),
                         extra_env={"VACE_OFFLOAD": policy, "VACE_CFG_BATCH": "1"})
        try:
            srv.start(ready_timeout=300)
            got[policy] = _run_jobs(srv, seeds)
        finally:
            srv.stop()
    for policy in POLICIES:
        for i, (frames, stats) in enumerate(got[policy]):
            assert stats == {"num_inference_steps": 2, "computed_steps": 2, "skipped_steps": 0, "forwards": 2,
                             "skipped_step_indices": []}, (policy, i)
            assert np.array_equal(frames, got["none"][i][0]), f"{policy} job {i + 1}: frames differ from none"
    assert np.array_equal(got["none"][0][0], got["none"][2][0])
