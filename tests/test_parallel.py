"""One job over several ranks (gloo on loopback, tiny model, fp32): CFG-parallel, Ulysses and both give the
frames of one process; cancel stops every rank at the same step; a killed rank fails the job with a reason."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vace_local.core.bundle import ControlBundle
from vace_local.core.errors import JobCancelled
from vace_local.core.events import Progress
from vace_local.core.spec import JobSpec
from vace_local.engine.engine import Engine, EngineOptions
from vace_local.run.parallel import Group, Layout

# Smallest job the spec allows: 17 frames → 5 latent frames + 1 reference frame, 2×2 patches each = 24 tokens.
F, H, W = 17, 32, 32
STEPS = 3
TOL = 1e-4


def job(**kw: object) -> JobSpec:
    base = dict(model="tiny", prompt="a cat in a boxing ring", width=W, height=H, num_frames=F,
                num_inference_steps=STEPS, guidance_scale=5.0, seed=5)
    base.update(kw)
    return JobSpec(**base)


def control_bundle() -> ControlBundle:
    """A control video with a mask (left half kept) and one reference image."""
    rng = np.random.default_rng(1)
    masks = np.ones((F, H, W), dtype=np.float32)
    masks[:, :, : W // 2] = 0.0
    b = ControlBundle(frames=rng.random((F, H, W, 3), dtype=np.float32), masks=masks)
    b.reference_images = [rng.random((H, W, 3), dtype=np.float32)]
    return b


def _record_latents(engine: Engine) -> list:
    """Record what the pipeline hands to the VAE decoder (the final latents), passing it through unchanged.

    The tiny random VAE attenuates differences strongly (with the CFG branches swapped, this job's latents
    move by 0.057 but its frames by 0.0086), so the latents are compared as well as the frames.
    """
    seen: list = []
    decode = engine.pipe.vae.decode

    def recording_decode(z, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    engine.pipe.vae.decode = recording_decode
    return seen


@pytest.fixture(scope="module")
def single() -> Engine:
    return Engine("tiny", EngineOptions(device="cpu"))


@pytest.fixture(scope="module")
def reference(single: Engine) -> tuple[np.ndarray, object]:
    """The frames (float32 in [0, 1]) and final latents one process makes."""
    latents = _record_latents(single)
    frames = single.generate_float(job(), control_bundle(), seed=5)
    return frames, latents[-1]


def _group(layout: Layout) -> Iterator[Group]:
    g = Group("tiny", EngineOptions(device="cpu"), layout, timeout_s=60.0)
    try:
        yield g
    finally:
        g.close()


def _tokens_seen(group: Group) -> list[int]:
    """Token counts the main and VACE blocks after the first see on rank 0 (shards when Ulysses is on)."""
    seen: list[int] = []
    t = group.engine.engine.pipe.transformer
    t.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    t.vace_blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[2].shape[1]))
    return seen


def _check_equal(group: Group, reference: tuple[np.ndarray, object], tokens_per_rank: int, forwards: int) -> None:
    frames, latents = reference
    seen = _tokens_seen(group)
    got_latents = _record_latents(group.engine.engine)
    out = group.engine.generate_float(job(), control_bundle(), seed=5)
    diff = float(np.abs(out - frames).max())
    lat_diff = float((got_latents[-1] - latents).abs().max())
    print(f"{group.layout.as_dict()}: max abs diff frames {diff:.3g}, latents {lat_diff:.3g}")
    assert out.shape == frames.shape and diff <= TOL
    assert lat_diff <= TOL
    assert set(seen) == {tokens_per_rank}  # the work really was split
    assert group.engine.last_run["forwards"] == forwards  # CFG parallel: one (paired) forward per step


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory, single: Engine) -> Path:
    """A Kijai-layout LoRA on every main block, the embedders and the head (`proj_out`, whose output the Ulysses
    plan gathers across ranks)."""
    from safetensors.torch import save_file

    from tests.test_lora import alpha_everywhere_lora

    path = tmp_path_factory.mktemp("lora") / "everywhere.safetensors"
    save_file(alpha_everywhere_lora(single.pipe.transformer, rank=4, alpha=2.0), str(path))
    return path


def _check_loras(group: Group, single: Engine, lora_file: Path) -> None:
    """A job with a per-request LoRA, then one without, on the group: the frames one process makes for each
    (every rank applies the same adapters, and turns them off again); a bad LoRA fails on rank 0 before any
    other rank hears of the job, so the group stays usable."""
    from vace_local.core.errors import InputError
    from vace_local.core.spec import LoraRef

    with_lora = job(loras=[LoraRef(path=str(lora_file), scale=0.8)])
    frames = []
    for spec in (with_lora, job()):
        want = single.generate_float(spec, control_bundle(), seed=5)
        got = group.engine.generate_float(spec, control_bundle(), seed=5)
        assert float(np.abs(got - want).max()) <= TOL
        used = [(x["file"], x["scale"]) for x in group.engine.last_run["loras"]]
        assert used == ([("everywhere.safetensors", 0.8)] if spec.loras else [])
        frames.append(got)
    assert float(np.abs(frames[0] - frames[1]).max()) > 1e-3  # the LoRA does change this job
    with pytest.raises(InputError, match=r"loras\[0\]\.path"):
        group.engine.generate_float(job(loras=[LoraRef(path=str(lora_file.with_name("missing.safetensors")))]),
                                    control_bundle(), seed=5)
    assert group.dead_rank() is None and group.engine.broken is None


def _cancel_at_step_1(group: Group) -> None:
    """Rank 0 cancels after step 1; if any rank kept denoising, the next job's collectives would not line up."""
    steps: list[int] = []

    def on_progress(p: Progress) -> None:
        steps.append(p.step)

    with pytest.raises(JobCancelled):
        group.engine.generate_float(job(), control_bundle(), seed=5, on_progress=on_progress,
                                    should_cancel=lambda: bool(steps))
    assert steps == [1]
    assert group.dead_rank() is None and group.engine.broken is None


class TestCfgTwoRanks:
    @pytest.fixture(scope="class")
    @classmethod
    def group(cls) -> Iterator[Group]:
        yield from _group(Layout(cfg=2, ulysses=1))

    def test_same_frames_as_one_process(self, group: Group, reference: tuple) -> None:
        _check_equal(group, reference, tokens_per_rank=24, forwards=STEPS)

    def test_per_request_lora_then_none(self, group: Group, single: Engine, lora_file: Path) -> None:
        _check_loras(group, single, lora_file)


class TestUlyssesTwoRanks:
    @pytest.fixture(scope="class")
    @classmethod
    def group(cls) -> Iterator[Group]:
        yield from _group(Layout(cfg=1, ulysses=2))

    def test_same_frames_as_one_process(self, group: Group, reference: tuple) -> None:
        _check_equal(group, reference, tokens_per_rank=12, forwards=2 * STEPS)

    def test_per_request_lora_then_none(self, group: Group, single: Engine, lora_file: Path) -> None:
        _check_loras(group, single, lora_file)

    def test_cancel_stops_every_rank_and_the_next_job_runs(self, group: Group, reference: tuple) -> None:
        _cancel_at_step_1(group)
        out = group.engine.generate_float(job(), control_bundle(), seed=5)
        assert float(np.abs(out - reference[0]).max()) <= TOL

    def test_size_that_does_not_shard_is_refused_by_name(self, group: Group) -> None:
        from vace_local.core.errors import InputError

        # 16x16 has one patch per latent frame: 5 tokens cannot be split over 2 ranks.
        spec = job(width=16, height=16)
        bundle = ControlBundle.blank(F, 16, 16)
        with pytest.raises(InputError, match="sequence-parallel") as err:
            group.engine.generate_float(spec, bundle, seed=5)
        assert err.value.field == "width"
        assert group.engine.broken is None  # refused before any rank started

    def test_killed_rank_fails_the_job_with_a_reason(self, group: Group) -> None:
        victim = group.procs[0]

        def kill_rank_1(p: Progress) -> None:
            if p.step == 1:
                os.kill(victim.pid, signal.SIGKILL)

        t = time.monotonic()
        with pytest.raises(Exception) as err:  # noqa: PT011 - gloo's error type varies by torch version
            group.engine.generate_float(job(), control_bundle(), seed=5, on_progress=kill_rank_1)
        took = time.monotonic() - t
        assert not isinstance(err.value, JobCancelled)
        print(f"killed rank: job failed after {took:.1f} s with {type(err.value).__name__}: {err.value}"[:300])
        assert took < 45, f"a dead rank took {took:.0f} s to fail the job"
        victim.join(timeout=5)
        assert group.dead_rank() == "rank 1 exited (exit code -9)"
        assert group.engine.broken and "rank 0 failed mid-job" in group.engine.broken
        with pytest.raises(RuntimeError, match="broken"):  # no further job on a broken group
            group.engine.generate_float(job(), control_bundle(), seed=5)


class TestCfgTimesUlyssesFourRanks:
    @pytest.fixture(scope="class")
    @classmethod
    def group(cls) -> Iterator[Group]:
        yield from _group(Layout(cfg=2, ulysses=2))

    def test_same_frames_as_one_process(self, group: Group, reference: tuple) -> None:
        _check_equal(group, reference, tokens_per_rank=12, forwards=STEPS)

    def test_cancel_stops_every_rank(self, group: Group) -> None:
        _cancel_at_step_1(group)

    def test_step_cache_skips_the_same_steps_on_every_rank(self, group: Group, single: Engine) -> None:
        # Every rank decides skips from the same gathered predictions; one rank skipping alone would deadlock.
        spec = job(num_inference_steps=8, step_cache_threshold=0.5)
        want = single.generate_float(spec, control_bundle(), seed=5)
        skipped = single.last_run["skipped_step_indices"]
        assert skipped  # the threshold is high enough to skip on this job
        got = group.engine.generate_float(spec, control_bundle(), seed=5)
        assert group.engine.last_run["skipped_step_indices"] == skipped
        assert float(np.abs(got - want).max()) <= TOL


def test_default_layouts() -> None:
    assert Layout.for_ranks(1) == Layout(1, 1)
    assert Layout.for_ranks(2) == Layout(2, 1)
    assert Layout.for_ranks(8) == Layout(2, 4)
    assert Layout.for_ranks(3) == Layout(1, 3)
    assert Layout.for_ranks(4, cfg=False) == Layout(1, 4)
    with pytest.raises(ValueError, match="cfg parallel degree"):
        Layout(cfg=4)


@pytest.mark.gpu
def test_two_gpus_match_one_gpu() -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    opts = EngineOptions(device="cuda:0", dtype="fp32")
    ref = Engine("tiny", opts).generate_float(job(), control_bundle(), seed=5)
    for layout in (Layout(cfg=2), Layout(ulysses=2)):
        g = Group("tiny", opts, layout, devices=["cuda:0", "cuda:1"])
        try:
            out = g.engine.generate_float(job(), control_bundle(), seed=5)
        finally:
            g.close()
        diff = float(np.abs(out - ref).max())
        print(f"{layout.as_dict()} on 2 GPUs: max abs diff {diff:.3g}")
        assert diff <= 1e-3  # TF32 / kernel choice may differ per shard shape on GPU


def _follower_pids(worker_pid: int) -> list[int]:
    """The worker's child processes that are ranks (not multiprocessing's resource tracker)."""
    kids = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    return [int(k) for k in kids if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]


@pytest.mark.slow
def test_server_runs_jobs_on_a_two_rank_group_and_restarts_it_when_a_rank_dies(tmp_path: Path) -> None:
    from tests.test_server_live import LiveServer, _held, _terminal

    hold = tmp_path / "hold"  # present: jobs hold after denoising step 1 (VACE_TINY_HOLD_FILE), so the kill is mid-run
    srv = LiveServer(tmp_path / "data", Path(os.environ["VACE_CACHE_DIR"]),
                     extra_env={"VACE_GPUS_PER_JOB": "2", "VACE_TINY_HOLD_FILE": str(hold)}).start(ready_timeout=240)
    try:
        first = srv.submit({"prompt": "a group job", "num_inference_steps": 2, "seed": 1})
        row = srv.wait(first["id"], _terminal, timeout=180, what="first job")
        assert row["status"] == "succeeded", row
        [worker] = srv.worker_pids()
        [follower] = _follower_pids(worker)

        hold.touch()
        long = srv.submit({"prompt": "a long job", "num_inference_steps": 40})
        srv.wait(long["id"], _held, timeout=120, what="long job holding after step 1")
        t = time.monotonic()
        os.kill(follower, signal.SIGKILL)
        hold.unlink()
        row = srv.wait(long["id"], _terminal, timeout=60, what="long job failing")
        took = time.monotonic() - t
        print(f"server: a killed rank failed the job in {took:.1f} s: {row['error']}")
        assert row["status"] == "failed" and "rank 1 exited (exit code -9)" in row["error"], row
        assert took < 20

        after = srv.submit({"prompt": "after the restart", "num_inference_steps": 2, "seed": 2})
        row = srv.wait(after["id"], _terminal, timeout=240, what="job on the restarted group")
        assert row["status"] == "succeeded", row
        assert srv.worker_pids() != [worker]  # the group was restarted
    finally:
        srv.stop()


def test_supervisor_plans_gpu_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.supervisor import plan_workers

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert plan_workers("auto") == [str(i) for i in range(8)]
    assert plan_workers("auto", 2) == ["0,1", "2,3", "4,5", "6,7"]
    assert plan_workers("auto", 8) == ["0,1,2,3,4,5,6,7"]
    assert plan_workers("auto", 3) == ["0,1,2", "3,4,5"]  # two GPUs left idle (logged)
    assert plan_workers("1", 4) == ["0,1,2,3"]
    with pytest.raises(ValueError, match="only 8 GPU"):
        plan_workers("auto", 16)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert plan_workers("auto", 2) == [None]  # CPU: one worker, which runs gloo ranks
