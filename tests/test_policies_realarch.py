"""Every memory policy on the real Wan architecture (tests/realarch.py), on the CPU, over consecutive jobs.

The CPU runs the same diffusers / accelerate hook code a GPU runs (onload device = CPU), so a policy that breaks
our hooks between pipeline calls, or breaks on transformers' UMT5 encoder, fails here. On the CPU every policy
computes exactly what `offload none` computes, so frames must be bit-identical and the sampling statistics equal,
on every one of three jobs run on one loaded engine.

Defects these tests caught (each failed on the code before the fix):
- `group` died at load on the CPU (streams requested on a device without them) and, on CUDA, on the text encoder
  (`UMT5EncoderModel` has no `enable_group_offload`): `test_policy_matrix[*-group]`,
  `test_group_offload_hooks_the_text_encoder_blocks`.
- `model` dropped our denoiser hook from the 2nd job on (batched CFG ran 0 forwards, `computed_steps: 0`):
  `test_policy_matrix[cfg_batch-model]`, `test_hooks_see_every_step_of_every_job`.
- `sequential` raised `TypeError: new() received an invalid combination of arguments` on the CPU:
  `test_policy_matrix[*-sequential]`.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vace_local.core.bundle import ControlBundle
from vace_local.core.errors import InputError
from vace_local.core.spec import JobSpec
from vace_local.engine.engine import Engine, EngineOptions
from vace_local.engine.lora import LoraOption

pytestmark = pytest.mark.slow

POLICIES = ("none", "model", "group", "sequential")
VARIANTS = ("plain", "cfg_batch", "fp8_storage", "lora")
F, H, W = 17, 16, 16
SEEDS = (1, 2, 1)
STEPS = 2
CACHE_STEPS = 4  # the step cache always computes 2 warm-up steps and the last one: step 2 can skip


def bundle() -> ControlBundle:
    rng = np.random.default_rng(0)
    masks = np.zeros((F, H, W), dtype=np.float32)
    masks[:, 4:12, 4:12] = 1.0
    return ControlBundle(frames=rng.random((F, H, W, 3), dtype=np.float32), masks=masks)


def job(model: Path, seed: int, **kw: Any) -> JobSpec:
    base = dict(model=str(model), prompt="a red car on a city street at night", width=W, height=H, num_frames=F,
                num_inference_steps=STEPS, seed=seed, flow_shift=3.0)
    return JobSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA in the Kijai layout on both main blocks' self-attention q and the FFN input."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    sd: dict[str, torch.Tensor] = {}
    for block in range(2):
        for name, (out_f, in_f) in {"self_attn.q": (1536, 1536), "ffn.0": (8960, 1536)}.items():
            key = f"diffusion_model.blocks.{block}.{name}"
            sd[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.05
            sd[f"{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.05
            sd[f"{key}.alpha"] = torch.tensor(4.0)
    path = tmp_path_factory.mktemp("lora") / "realarch_lora.safetensors"
    save_file(sd, str(path))
    return path


def options(policy: str, variant: str, lora: Path) -> EngineOptions:
    extra: dict[str, Any] = {
        "plain": {}, "cfg_batch": {"cfg_batch": True}, "fp8_storage": {"fp8_storage": True},
        "lora": {"loras": (LoraOption(str(lora), scale=1.0),)},
    }[variant]
    return EngineOptions(device="cpu", dtype="fp32", offload=policy, **extra)


@dataclass
class Run:
    frames: list[np.ndarray]
    stats: list[dict[str, Any]]
    cached_frames: list[np.ndarray]
    cached_stats: list[dict[str, Any]]


_RUNS: dict[tuple[str, str, str], Run] = {}


def counted(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in ("computed_steps", "skipped_steps", "forwards", "skipped_step_indices")}


def runs(model: Path, policy: str, variant: str, lora: Path) -> Run:
    """Three jobs on one engine (and for `plain` three step-cache jobs after them); memoised per module."""
    key = (str(model), policy, variant)
    if key not in _RUNS:
        engine = Engine(str(model), options(policy, variant, lora))
        assert engine.policy == policy
        b = bundle()
        run = Run([], [], [], [])
        for seed in SEEDS:
            g = engine.sample(job(model, seed), b, seed=seed)
            run.frames.append(g.uint8())
            run.stats.append(counted(g.stats.as_dict()))
        if variant == "plain":
            for seed in SEEDS:
                g = engine.sample(job(model, seed, num_inference_steps=CACHE_STEPS, step_cache_threshold=1.0), b,
                                  seed=seed)
                run.cached_frames.append(g.uint8())
                run.cached_stats.append(counted(g.stats.as_dict()))
        del engine
        gc.collect()
        _RUNS[key] = run
    return _RUNS[key]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_matrix(realarch_wan21_narrow_vae: Path, lora_file: Path, variant: str, policy: str) -> None:
    """3 consecutive jobs under `policy` give `offload none`'s frames and sampling statistics, every job."""
    model = realarch_wan21_narrow_vae
    got = runs(model, policy, variant, lora_file)
    ref = runs(model, "none", variant, lora_file)
    forwards = STEPS if variant == "cfg_batch" else 2 * STEPS
    for i, stats in enumerate(got.stats):
        assert stats == {"computed_steps": STEPS, "skipped_steps": 0, "forwards": forwards,
                         "skipped_step_indices": []}, f"job {i + 1}"
        assert stats == ref.stats[i]
        assert np.array_equal(got.frames[i], ref.frames[i]), f"job {i + 1}: frames differ from offload none"
    assert np.array_equal(got.frames[0], got.frames[2]) and not np.array_equal(got.frames[0], got.frames[1])
    assert got.frames[0].std() > 5, "degenerate output"  # random weights, but not constant or NaN-black
    if variant == "plain":
        for i, stats in enumerate(got.cached_stats):
            assert stats["skipped_steps"] > 0 and stats["computed_steps"] + stats["skipped_steps"] == CACHE_STEPS
            assert stats == ref.cached_stats[i] == got.cached_stats[0], f"step-cache job {i + 1}"
            assert np.array_equal(got.cached_frames[i], ref.cached_frames[i]), f"step-cache job {i + 1}"


def test_variants_change_the_output(realarch_wan21_narrow_vae: Path, lora_file: Path) -> None:
    """The matrix compares like with like: fp8 storage and the LoRA really change the weights."""
    model = realarch_wan21_narrow_vae
    plain = runs(model, "none", "plain", lora_file).frames[0]
    assert not np.array_equal(plain, runs(model, "none", "fp8_storage", lora_file).frames[0])
    assert not np.array_equal(plain, runs(model, "none", "lora", lora_file).frames[0])


def test_group_offload_hooks_the_text_encoder_blocks(realarch_wan21_narrow_vae: Path) -> None:
    """transformers' UMT5 encoder is group-offloaded block by block through diffusers' `apply_group_offloading`."""
    from diffusers import WanVACEPipeline

    from vace_local.engine.memory import apply_policy

    pipe = WanVACEPipeline.from_pretrained(realarch_wan21_narrow_vae)
    apply_policy(pipe, "group", "cpu")

    def hooked(module: torch.nn.Module) -> bool:
        registry = getattr(module, "_diffusers_hook", None)
        return registry is not None and registry.get_hook("group_offloading") is not None

    te = pipe.text_encoder
    assert all(hooked(block) for block in te.encoder.block)
    assert hooked(pipe.transformer.blocks[0].attn1.to_q)  # leaf level
    assert te.shared.weight is te.encoder.embed_tokens.weight  # the tied weight stays one tensor
    # A second policy on top is refused by diffusers: one line naming `offload`, not a traceback.
    with pytest.raises(InputError) as err:
        apply_policy(pipe, "model", "cpu")
    assert str(err.value).startswith("offload: 'model' cannot be used on cpu: ") and "\n" not in str(err.value)


def test_hooks_see_every_step_of_every_job(realarch_wan21_narrow_vae: Path) -> None:
    """The old order — our hook registered after model offload — loses the hook from job 2 on; the engine now
    fails such a job loudly instead of reporting `computed_steps: 0` (and installs its hook first)."""
    model = realarch_wan21_narrow_vae
    engine = Engine(str(model), EngineOptions(device="cpu", dtype="fp32", offload="none", cfg_batch=True))
    b = bundle()
    engine.fast.remove()
    engine.pipe.enable_model_cpu_offload(device="cpu")
    engine.fast.install(engine.pipe.transformer)
    assert engine.sample(job(model, 1), b, seed=1).stats.cache.forwards == STEPS
    with pytest.raises(RuntimeError, match="denoiser hook saw 0 of 2 steps"):
        engine.sample(job(model, 1), b, seed=1)


_TWO: dict[str, tuple[list[np.ndarray], list[dict[str, Any]], list[tuple[int, int]]]] = {}


def two_expert_runs(model: Path, policy: str) -> tuple[list[np.ndarray], list[dict[str, Any]], list[tuple[int, int]]]:
    """Three jobs on the Wan 2.2 two-expert layout; per job the (high, low) expert forwards counted by torch
    pre-hooks on each expert's first block (outside our hook and the policy's)."""
    if policy not in _TWO:
        engine = Engine(str(model), EngineOptions(device="cpu", dtype="fp32", offload=policy))
        assert engine.two_experts and engine.policy == policy
        calls = [0, 0]
        for i, t in enumerate(engine._transformers()):
            t.blocks[0].register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        frames, stats, experts = [], [], []
        for seed in SEEDS:
            calls[:] = [0, 0]
            g = engine.sample(job(model, seed, num_inference_steps=3), bundle(), seed=seed)
            frames.append(g.uint8())
            stats.append(counted(g.stats.as_dict()))
            experts.append((calls[0], calls[1]))
        del engine
        gc.collect()
        _TWO[policy] = (frames, stats, experts)
    return _TWO[policy]


@pytest.mark.parametrize("policy", POLICIES)
def test_two_experts_under_every_policy(realarch_wan22: Path, policy: str) -> None:
    """Wan 2.2 (transformer + transformer_2, boundary_ratio 0.875): both experts run, every job, as under none."""
    frames, stats, experts = two_expert_runs(realarch_wan22, policy)
    ref_frames, ref_stats, _ = two_expert_runs(realarch_wan22, "none")
    for i in range(len(SEEDS)):
        # shift 3, 3 steps: t = 999 (high-noise expert), then 857 and 600 (low-noise expert); CFG: 2 calls a step
        assert experts[i] == (2, 4), f"job {i + 1}"
        assert stats[i] == ref_stats[i] == {"computed_steps": 3, "skipped_steps": 0, "forwards": 6,
                                            "skipped_step_indices": []}, f"job {i + 1}"
        assert np.array_equal(frames[i], ref_frames[i]), f"job {i + 1}: frames differ from offload none"
