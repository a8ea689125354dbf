"""A VACE-correct step cache and batched CFG, as one hook around the whole transformer forward.

Why not diffusers' FirstBlockCache / MagCache: they hook only `blocks.*`; the residual they replay already
contains the previous step's VACE hints, and the transformer's own loop adds fresh hints after blocks
0, 5, …, 35 again on a skipped step, so the control signal is counted twice (a plausible cause of "masks
ignored with caching"). Here the cache sits *outside* the transformer: a step is either a full forward
(VACE branch and hints included, each exactly once) or no forward at all, replaying the last computed
prediction. Nothing is added on top of a replay, so hints cannot be double-counted.

When to skip (output-change estimate, as in EasyCache): after two computed steps we know how strongly
the prediction reacts to a change of its input, k = rel‖Δout‖ / rel‖Δin‖. Each later step adds
k · rel‖Δin‖ to an accumulator; while the accumulator stays below `threshold` the step is skipped, and a
computed step resets it. The first `warmup_steps`, the last `final_steps`, the first steps after an expert
switch and any step after `max_skips` skips in a row are always computed. Threshold 0 never skips, so the
result is then bit-identical to an uncached run. For flow-matching models the velocity changes slowly
along the trajectory, which is what makes replaying it a good approximation.

Which call is which: the pipeline wraps each transformer call in `cache_context("cond")` /
`cache_context("uncond")`; diffusers hands that context to every stateful hook (`StateManager`), so the hook
keeps one history slot per context, the diffusers way, and a "cond" call starts a new denoising step. A call
outside any cache context (a direct transformer call) is passed through untouched.

Batched CFG: when enabled, the cond call runs cond and uncond as one batch-2 forward and the following
uncond call of the same step is answered from it. A `pair_forward` (CFG-parallel ranks, `vace_local.run.parallel`)
takes the batch-2 forward's place: it returns (cond, uncond) computed on two ranks, and the uncond call is
answered the same way.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

HOOK_NAME = "vace_local_denoiser_forward"
#: The cache contexts the pipeline announces; anything else is treated as its own CFG branch too.
COND, UNCOND = "cond", "uncond"
#: JobSpec.acceleration → step-cache threshold. Uncalibrated on real weights (see docs/PERFORMANCE.md).
ACCELERATION_THRESHOLDS: dict[str, float] = {"none": 0.0, "low": 0.05, "regular": 0.10}


@dataclass(frozen=True)
class StepCacheConfig:
    threshold: float = 0.0
    warmup_steps: int = 2
    final_steps: int = 1
    max_skips: int = 3

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"step cache threshold must be >= 0, got {self.threshold}")
        if self.warmup_steps < 2:
            raise ValueError("step cache warmup_steps must be >= 2 (two computed steps give the rate estimate)")


@dataclass
class StepStats:
    """What the cache did in one job (recorded in the job's metadata)."""

    computed: int = 0
    skipped: int = 0
    forwards: int = 0  # transformer forwards actually run (a batched CFG forward counts once)
    skipped_steps: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"computed_steps": self.computed, "skipped_steps": self.skipped, "forwards": self.forwards,
                "skipped_step_indices": list(self.skipped_steps)}


def _rel_l1(a: Any, b: Any) -> float:
    den = b.float().abs().mean().item()
    return (a.float() - b.float()).abs().mean().item() / max(den, 1e-12)


def _sample(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out.sample


def _wrap(kwargs: dict[str, Any], sample: Any) -> Any:
    """Return `sample` in the form the caller asked for (tuple when return_dict=False)."""
    if not kwargs.get("return_dict", True):
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


#: One number per (job, expert): a history slot written under another number is stale.
_EPOCHS = itertools.count()


class _JobState:
    def __init__(self, cache: StepCacheConfig, total_steps: int, negative: Any | None, cfg_batch: bool,
                 pair_forward: Any = None) -> None:
        self.cache = cache
        self.total = total_steps
        self.negative = negative
        self.pair_forward = pair_forward
        self.cfg_batch = (cfg_batch or pair_forward is not None) and negative is not None
        self.stats = StepStats()
        self.step = -1
        self.skip = False
        self.expert: int | None = None
        self.epoch = next(_EPOCHS)
        self.prev_x: Any = None
        self.acc = 0.0
        self.rate: float | None = None
        self.run_skips = 0
        self.pending: tuple[int, Any] | None = None  # (step, batched uncond answer) for this step's uncond call
        self.step_rates: list[float] = []

    # -- step decision -----------------------------------------------------------------------------
    def begin_step(self, expert: int, x: Any) -> None:
        self.step += 1
        forced = self.cache.threshold <= 0
        if expert != self.expert:  # a new expert: the other expert's history says nothing about this one
            self.expert, self.epoch, self.rate, self.acc = expert, next(_EPOCHS), None, 0.0
            forced = True
        c = self.cache
        forced = forced or self.step < c.warmup_steps or self.step >= self.total - c.final_steps
        forced = forced or self.run_skips >= c.max_skips or self.rate is None or self.prev_x is None
        skip = False
        if not forced:
            self.acc += self.rate * _rel_l1(x, self.prev_x)
            skip = self.acc < c.threshold
        if skip:
            self.run_skips += 1
            self.stats.skipped += 1
            self.stats.skipped_steps.append(self.step)
        else:
            self.acc, self.run_skips = 0.0, 0
            self.stats.computed += 1
        self.skip = skip
        self.prev_x = x.detach().clone() if c.threshold > 0 else None

    def replay(self, slot: Any) -> Any | None:
        """The branch's last computed prediction when this step is skipped (and the slot is this job's)."""
        return slot.pred if self.skip and slot.epoch == self.epoch else None

    def record(self, slot: Any, branch: str, x: Any, pred: Any) -> None:
        if self.cache.threshold <= 0:
            return  # nothing is ever replayed: keep no tensors
        if slot.epoch == self.epoch:
            rate = _rel_l1(pred, slot.pred) / max(_rel_l1(x, slot.x), 1e-8)
            self.step_rates.append(rate)
            # Conservative: the larger rate of the branches of this step decides.
            self.rate = rate if branch == COND or self.rate is None else max(self.rate, rate)
        slot.x, slot.pred, slot.epoch = x.detach().clone(), pred.detach().clone(), self.epoch


class DenoiserForward:
    """The transformer forward during denoising: computed, replayed from the step cache, or batched for CFG.

    Installs one hook per transformer (expert) and holds the per-job state they share; each hook keeps the
    per-branch history (diffusers per-context state)."""

    def __init__(self) -> None:
        self._job: _JobState | None = None
        self._models: list[Any] = []

    def install(self, model: Any) -> None:
        """Hook `model`'s forward through diffusers' hook registry. Install before any memory policy: accelerate
        (model / sequential offload) then wraps this forward and restores it, not the bare one, each time it
        re-installs its hooks (after every pipeline call); diffusers' group-offload hooks chain around it."""
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(model)
        if registry.get_hook(HOOK_NAME) is None:
            registry.register_hook(_Hook(self, len(self._models)), HOOK_NAME)
            self._models.append(model)

    def remove(self) -> None:
        from diffusers.hooks import HookRegistry

        for model in self._models:
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK_NAME, recurse=False)
        self._models = []

    def begin_job(self, *, total_steps: int, cache: StepCacheConfig | None = None, negative: Any | None = None,
                  cfg_batch: bool = False, pair_forward: Any = None) -> None:
        """Arm the hooks for one job. `negative`: the negative embeddings the pipeline will pass (for CFG);
        `pair_forward(fwd, kwargs, negative) -> (cond, uncond)` replaces the batch-2 CFG forward."""
        self._job = _JobState(cache or StepCacheConfig(), total_steps, negative, cfg_batch, pair_forward)

    def check_ran(self, steps: int) -> None:
        """After a completed denoising loop: every step must have gone through a hook. Fewer means something
        (an offload hook re-installed around the model, a forward swapped in) bypassed it, and the job's
        batched CFG / step cache / pair forward silently did not run: fail loudly instead."""
        job = self._job
        if job is not None and self._models and job.stats.computed + job.stats.skipped != steps:
            raise RuntimeError(f"the denoiser hook saw {job.stats.computed + job.stats.skipped} of {steps} steps: "
                               "something installed after it bypasses it")

    def end_job(self) -> StepStats | None:
        job, self._job = self._job, None
        return job.stats if job is not None else None

    # -- the forward --------------------------------------------------------------------------------
    def forward(self, hook: Any, fwd: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        job = self._job
        branch = hook.branch()
        if job is None or branch is None or args or "hidden_states" not in kwargs:
            return fwd(*args, **kwargs)
        x = kwargs["hidden_states"]
        if branch == COND or job.step < 0:
            job.begin_step(hook.expert, x)
        slot = hook.branches.get_state()

        if branch == UNCOND and job.pending is not None and job.pending[0] == job.step:
            uncond = job.pending[1]
            job.pending = None
            job.record(slot, branch, x, uncond)
            return _wrap(kwargs, uncond)

        replay = job.replay(slot)
        if replay is not None:
            return _wrap(kwargs, replay)

        if job.cfg_batch and branch == COND:
            cond, uncond = (job.pair_forward or self._batched)(fwd, kwargs, job.negative)
            job.stats.forwards += 1
            job.record(slot, branch, x, cond)
            job.pending = (job.step, uncond)
            return _wrap(kwargs, cond)

        out = fwd(**kwargs)
        job.stats.forwards += 1
        job.record(slot, branch, x, _sample(out))
        return out

    @staticmethod
    def _batched(fwd: Any, kwargs: dict[str, Any], negative: Any) -> tuple[Any, Any]:
        import torch

        kw = dict(kwargs)
        pos = kw["encoder_hidden_states"]
        kw["hidden_states"] = torch.cat([kw["hidden_states"]] * 2)
        kw["timestep"] = torch.cat([kw["timestep"]] * 2)
        kw["encoder_hidden_states"] = torch.cat([pos, negative.to(device=pos.device, dtype=pos.dtype)])
        if kw.get("control_hidden_states") is not None:
            kw["control_hidden_states"] = torch.cat([kw["control_hidden_states"]] * 2)
        out = fwd(**kw)
        cond, uncond = _sample(out).chunk(2)
        return cond, uncond


@functools.cache
def _hook_class() -> type:
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    class BranchSlot(BaseState):
        """One CFG branch's (input, prediction) of its last computed step, for one expert."""

        def __init__(self) -> None:
            self.reset()

        def reset(self) -> None:
            self.x: Any = None
            self.pred: Any = None
            self.epoch = -1

    class Hook(ModelHook):
        _is_stateful = True  # diffusers' cache_context then sets the branch on `branches`

        def __init__(self, owner: DenoiserForward, expert: int) -> None:
            super().__init__()
            self.owner, self.expert = owner, expert
            self.branches = StateManager(BranchSlot)

        def branch(self) -> str | None:
            """The cache context the pipeline announced ("cond" / "uncond"); None outside any context."""
            try:
                return self.branches.context.name
            except ValueError:
                return None

        def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            return self.owner.forward(self, self.fn_ref.original_forward, args, kwargs)

        def reset_state(self, module: Any) -> Any:
            self.branches.reset()
            return module

    return Hook


def _Hook(owner: DenoiserForward, expert: int) -> Any:  # noqa: N802 - diffusers is imported lazily
    return _hook_class()(owner, expert)
