"""Map the spec's sampler name and flow shift to a diffusers scheduler.

The shift always comes from the job, never from the shipped scheduler config (which says 3.0 while the
official VACE default is 16). Euler's keyword is `shift`, not `flow_shift`: a plain config conversion
would silently run with shift 1.0.
"""

from __future__ import annotations

from typing import Any

SAMPLERS = ("unipc", "dpm++", "euler")


def make_scheduler(sampler: str, flow_shift: float, base_config: dict[str, Any] | None = None):  # noqa: ANN201
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    cfg = dict(base_config or {})
    cfg.setdefault("num_train_timesteps", 1000)
    if sampler == "unipc":
        return UniPCMultistepScheduler.from_config(
            cfg, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
        )
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            cfg, algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=flow_shift,
        )
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(cfg, shift=flow_shift)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
