"""Preprocessors: build the exact VACE control video, masks and reference images for a job.

Entry points: `build_bundle(spec, resolved)` and `plan_timing(spec, resolved)` (apply the
match-input-length/fps options before building).
"""

from preprocessors.build import build_bundle, plan_timing

__all__ = ["build_bundle", "plan_timing"]
