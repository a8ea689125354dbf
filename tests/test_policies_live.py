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


_CLI: dict[str, list[tuple[np.ndarray, dict[str, Any]]]] = {}
_LIVE: dict[str, list[tuple[np.ndarray, dict[str, Any]]]] = {}
EXPECTED = {"num_inference_steps": 2, "computed_steps": 2, "skipped_steps": 0, "forwards": 2,
            "skipped_step_indices": []}


def cli_jobs(model: Path, policy: str, tmp: Path) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Two `generate` runs in one process (the second reuses the loaded engine), memoised per policy."""
    if policy not in _CLI:
        runner = CliRunner()
        out, got = tmp / f"cli-{policy}", []
        for i, seed in enumerate((3, 4)):
            result = runner.invoke(app, [
                "generate", "--model", str(model), "--offload", policy, "--device", "cpu", "--cfg-batch",
                "--prompt", "a dog runs on the beach", "--size", "16x16", "--num-frames", "17", "--steps", "2",
                "--seed", str(seed), "--out", str(out), "--name", f"job{i}", "--quiet"])
            assert result.exit_code == 0, result.output
            meta = json.loads((out / f"job{i}.json").read_text())
            assert meta["model"]["offload"] == policy and meta["model"]["device"] == "cpu"
            got.append((decoded(out / f"job{i}.mp4"), sampling(meta)))
        _CLI[policy] = got
    return _CLI[policy]


@pytest.mark.parametrize("policy", POLICIES)
def test_cli_consecutive_jobs(realarch_wan21: Path, tmp_path_factory: pytest.TempPathFactory, policy: str) -> None:
    """`vace-local generate --model DIR --offload X` on the real VAE: `offload none`'s frames and statistics."""
    tmp = tmp_path_factory.getbasetemp()
    got, ref = cli_jobs(realarch_wan21, policy, tmp), cli_jobs(realarch_wan21, "none", tmp)
    for i, (frames, stats) in enumerate(got):
        assert stats == EXPECTED, f"job {i + 1}"
        assert np.array_equal(frames, ref[i][0]), f"job {i + 1}: frames differ from offload none"
    assert not np.array_equal(got[0][0], got[1][0])


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
        [meta_file] = list(job_dir.glob("*.json"))
        [video_file] = list(job_dir.glob("*.mp4"))
        meta = json.loads(meta_file.read_text())
        assert meta["model"]["offload"] == srv.env["VACE_OFFLOAD"]
        out.append((decoded(video_file), sampling(meta)))
    return out


def live_jobs(model: Path, policy: str, tmp: Path) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Three jobs on a live server (`--model DIR`, one CPU worker, `VACE_OFFLOAD`), memoised per policy."""
    if policy not in _LIVE:
        srv = LiveServer(tmp / f"live-{policy}", tmp / "cache", model=str(model),
                         extra_env={"VACE_OFFLOAD": policy, "VACE_CFG_BATCH": "1"})
        try:
            srv.start(ready_timeout=300)
            _LIVE[policy] = _run_jobs(srv, (5, 6, 5))
        finally:
            srv.stop()
    return _LIVE[policy]


@pytest.mark.parametrize("policy", POLICIES)
def test_live_server_consecutive_jobs(realarch_wan21_narrow_vae: Path, tmp_path_factory: pytest.TempPathFactory,
                                      policy: str) -> None:
    """One server per policy, three jobs on its one worker: `offload none`'s frames and statistics, every job."""
    tmp = tmp_path_factory.getbasetemp()
    got = live_jobs(realarch_wan21_narrow_vae, policy, tmp)
    ref = live_jobs(realarch_wan21_narrow_vae, "none", tmp)
    for i, (frames, stats) in enumerate(got):
        assert stats == EXPECTED, f"job {i + 1}"
        assert np.array_equal(frames, ref[i][0]), f"job {i + 1}: frames differ from offload none"
    assert np.array_equal(got[0][0], got[2][0]) and not np.array_equal(got[0][0], got[1][0])
