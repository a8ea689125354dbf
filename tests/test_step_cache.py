"""The VACE-correct step cache on the tiny model: exact at threshold 0, skips whole forwards, control still counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vace_local.core.bundle import ControlBundle
from vace_local.core.spec import JobSpec
from vace_local.engine.engine import Engine, EngineOptions, get_engine
from vace_local.engine.step_cache import ACCELERATION_THRESHOLDS, StepCacheConfig

F, H, W = 17, 32, 48
STEPS = 8


def spec(**kw) -> JobSpec:
    base = dict(model="tiny", prompt="a cat in a boxing ring", width=W, height=H, num_frames=F,
                num_inference_steps=STEPS, seed=5)
    base.update(kw)
    return JobSpec(**base)


def bundle(left_keep: bool = False) -> ControlBundle:
    rng = np.random.default_rng(0)
    masks = np.ones((F, H, W), dtype=np.float32)
    if left_keep:
        masks[:, :, : W // 2] = 0.0
    return ControlBundle(frames=rng.random((F, H, W, 3), dtype=np.float32), masks=masks)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return get_engine("tiny")


class CallLog:
    """Counts block calls and records every prediction the transformer returns (outside the cache hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.blocks = 0
        self.vace_blocks = 0
        self.outputs: list[tuple[float, torch.Tensor]] = []
        self.handles = [
            model.blocks[0].register_forward_hook(lambda *a: self._inc("blocks")),
            model.vace_blocks[0].register_forward_hook(lambda *a: self._inc("vace_blocks")),
            model.register_forward_hook(self._out, with_kwargs=True),
        ]

    def _inc(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def _out(self, _m, _args, kwargs, output) -> None:  # noqa: ANN001
        sample = output[0] if isinstance(output, tuple) else output.sample
        self.outputs.append((float(kwargs["timestep"][0]), sample.detach().clone()))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def test_threshold_zero_equals_an_uncached_run(engine: Engine) -> None:
    cached = engine.generate(spec(step_cache_threshold=0.0), bundle(), seed=5)
    assert engine.last_run["skipped_steps"] == 0 and engine.last_run["forwards"] == 2 * STEPS
    engine.fast.remove()  # no hook at all: the plain diffusers forward
    try:
        plain = engine.generate(spec(), bundle(), seed=5)
    finally:
        for t in engine._transformers():
            engine.fast.install(t)
    assert np.array_equal(cached, plain)


def test_threshold_skips_whole_forwards_and_replays_without_adding_hints(engine: Engine) -> None:
    log = CallLog(engine.pipe.transformer)
    try:
        engine.generate(spec(step_cache_threshold=1.0), bundle(), seed=5)
    finally:
        log.close()
    run = engine.last_run
    assert run["skipped_steps"] > 0 and run["computed_steps"] + run["skipped_steps"] == STEPS
    # Skipped steps run no block at all: neither the main blocks nor the VACE branch (hints can't be re-added).
    assert log.blocks == log.vace_blocks == run["forwards"] == 2 * run["computed_steps"]
    # Warm-up and the last step are always computed.
    assert {0, 1, STEPS - 1}.isdisjoint(run["skipped_step_indices"])
    # A skipped step returns exactly the last computed prediction of the same CFG branch.
    per_step = [log.outputs[i:i + 2] for i in range(0, len(log.outputs), 2)]
    assert len(per_step) == STEPS
    last_computed = per_step[0]
    for i, pair in enumerate(per_step):
        if i in run["skipped_step_indices"]:
            assert torch.equal(pair[0][1], last_computed[0][1]) and torch.equal(pair[1][1], last_computed[1][1])
        else:
            last_computed = pair


def test_with_cache_the_mask_and_control_still_matter(engine: Engine) -> None:
    s = spec(step_cache_threshold=1.0)
    full = engine.generate(s, bundle(), seed=5)
    assert engine.last_run["skipped_steps"] > 0
    keep_left = engine.generate(s, bundle(left_keep=True), seed=5)
    assert engine.last_run["skipped_steps"] > 0
    assert not np.array_equal(full, keep_left)
    no_control = engine.generate(s.model_copy(update={"context_scale": 0.0}), bundle(), seed=5)
    assert not np.array_equal(full, no_control)


def test_cached_output_is_an_approximation_of_the_uncached_one(engine: Engine) -> None:
    exact = engine.generate(spec(), bundle(), seed=5).astype(np.float32)
    approx = engine.generate(spec(step_cache_threshold=1.0), bundle(), seed=5).astype(np.float32)
    assert not np.array_equal(exact, approx)
    other_seed = engine.generate(spec(), bundle(), seed=6).astype(np.float32)
    assert np.abs(exact - approx).mean() < np.abs(exact - other_seed).mean()


def test_acceleration_presets_and_explicit_threshold() -> None:
    assert Engine.step_cache_threshold(spec()) == 0.0
    assert Engine.step_cache_threshold(spec(acceleration="low")) == ACCELERATION_THRESHOLDS["low"] > 0
    assert Engine.step_cache_threshold(spec(acceleration="regular")) == ACCELERATION_THRESHOLDS["regular"]
    assert ACCELERATION_THRESHOLDS["regular"] > ACCELERATION_THRESHOLDS["low"]
    assert Engine.step_cache_threshold(spec(acceleration="regular", step_cache_threshold=0.0)) == 0.0
    with pytest.raises(ValueError, match="step_cache_threshold"):
        spec(step_cache_threshold=-0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        StepCacheConfig(threshold=0.1, warmup_steps=1)


def test_cache_with_batched_cfg_skips_and_stays_deterministic() -> None:
    eng = Engine("tiny", EngineOptions(cfg_batch=True))
    a = eng.generate(spec(step_cache_threshold=1.0), bundle(), seed=5)
    run = eng.last_run
    assert run["skipped_steps"] > 0 and run["forwards"] == run["computed_steps"]  # one batched forward per step
    assert np.array_equal(a, eng.generate(spec(step_cache_threshold=1.0), bundle(), seed=5))


def test_two_experts_recompute_after_the_switch() -> None:
    eng = Engine("tiny-two-expert", EngineOptions())
    # 8 UniPC steps at shift 3: steps 0-2 on the high-noise expert, 3-7 on the low-noise one.
    eng.generate(spec(model="tiny-two-expert", flow_shift=3.0, step_cache_threshold=1.0), bundle(), seed=5)
    skipped = eng.last_run["skipped_step_indices"]
    assert 3 not in skipped and 4 not in skipped  # the new expert needs two computed steps of its own
    assert eng.last_run["computed_steps"] + eng.last_run["skipped_steps"] == STEPS


def test_the_cfg_branch_comes_from_the_cache_context() -> None:
    """The pipeline announces each call's branch with `cache_context`: the hook files the prediction in that
    context's slot, and a cond/uncond pair is one step even when the uncond latents are another tensor object
    (the old id()-based guess took that for a new step)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext

    from vace_bench.synthetic import build_transformer
    from vace_local.engine.step_cache import HOOK_NAME, DenoiserForward

    model = build_transformer("tiny", "cpu", torch.float32, seed=0)
    fwd = DenoiserForward()
    fwd.install(model)
    hook = HookRegistry.check_if_exists_or_initialize(model).get_hook(HOOK_NAME)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 3, 4, 6, generator=g), encoder_hidden_states=torch.randn(1, 512, 32),
              control_hidden_states=torch.randn(1, 96, 3, 4, 6, generator=g), return_dict=False)
    neg = torch.randn(1, 512, 32, generator=g)
    fwd.begin_job(total_steps=4, cache=StepCacheConfig(threshold=1.0), negative=neg)
    with torch.no_grad():
        for t in (900, 800):
            step = {**kw, "timestep": torch.tensor([t])}
            with model.cache_context("cond"):
                cond = model(**step)[0]
            with model.cache_context("uncond"):
                uncond = model(**{**step, "hidden_states": step["hidden_states"].clone(),
                                  "encoder_hidden_states": neg})[0]
        stats = fwd.end_job()
        assert (stats.computed, stats.skipped, stats.forwards) == (2, 0, 4)
        hook.branches.set_context(CacheContext("uncond"))
        assert torch.equal(hook.branches.get_state().pred, uncond)
        hook.branches.set_context(CacheContext("cond"))
        assert torch.equal(hook.branches.get_state().pred, cond)
        hook.branches.set_context(None)
        # Outside any cache context (a direct call) the hook passes the forward through, counting nothing.
        fwd.begin_job(total_steps=4, cache=StepCacheConfig(threshold=1.0), negative=neg)
        plain = model(**{**kw, "timestep": torch.tensor([800])})[0]
        assert fwd.end_job().forwards == 0 and torch.equal(plain, cond)
