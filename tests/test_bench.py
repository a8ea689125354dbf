"""FLOP model (hand count, torch's FlopCounterMode, published anchors) and the `bench.py --tiny` harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vace_bench.flops import forward_flops, latent_tokens, step_flops
from vace_bench.synthetic import TRANSFORMER_CONFIGS, build_transformer

ROOT = Path(__file__).resolve().parents[1]
TINY = TRANSFORMER_CONFIGS["tiny"]


def test_latent_tokens() -> None:
    assert latent_tokens(832, 480, 81) == 32_760
    assert latent_tokens(1280, 720, 81) == 75_600
    assert latent_tokens(832, 480, 81, num_refs=1) == 34_320


def test_tiny_forward_flops_match_a_hand_count() -> None:
    # tiny: d = 2 heads x 12 = 24, ffn 32, 3 main + 2 VACE blocks, text_dim 32, freq_dim 256, 16 -> 16 channels.
    # 32x48x17 frames: latent 5 x 4 x 6, patch (1,2,2) -> L = 5 * 2 * 3 = 30 tokens; text S = 512.
    L, S, d, ffn = 30, 512, 24, 32
    per_block_linear = 8 * L * d * d + 4 * L * d * d + 4 * S * d * d + 4 * L * d * ffn
    per_block_attn = 4 * L * L * d + 4 * L * S * d
    linear = 5 * per_block_linear + 2 * (2 * L * d * d) + 2 * L * d * d  # after_proj x2, before_proj x1
    attention = 5 * per_block_attn
    embed = (2 * L * 64 * d + 2 * L * 384 * d  # patch embeddings: 16*4 and 96*4 inputs
             + 2 * (256 * d + d * d) + 12 * d * d  # time embedder + time projection (6d)
             + 2 * S * (32 * d + d * d)  # text embedder
             + 2 * L * d * 64)  # output projection
    f = forward_flops(TINY, latent_tokens(48, 32, 17))
    assert f.tokens == L
    assert f.linear == linear and f.attention == attention and f.embed == embed
    assert step_flops(TINY, 48, 32, 17, cfg=True) == 2 * (linear + attention + embed)
    assert step_flops(TINY, 48, 32, 17, cfg=False) == linear + attention + embed


def test_flops_match_torch_flop_counter_on_the_tiny_transformer() -> None:
    """Run the real module under FlopCounterMode (math attention, so the L×L products are counted too)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_transformer("tiny", "cpu", torch.float32)
    for m in model.modules():
        if hasattr(m, "set_attention_backend") and hasattr(m, "processor"):
            m.set_attention_backend("_native_math")
    lat_f, lat_h, lat_w = 5, 4, 6
    x = torch.randn(1, 16, lat_f, lat_h, lat_w)
    c = torch.randn(1, 96, lat_f, lat_h, lat_w)
    e = torch.randn(1, 512, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=e, control_hidden_states=c)
    measured = counter.get_total_flops()
    analytic = forward_flops(TINY, lat_f * (lat_h // 2) * (lat_w // 2)).total
    assert measured == pytest.approx(analytic, rel=1e-9)


def test_14b_flops_match_the_published_arithmetic_floor() -> None:
    # performance-anchors.md §1: VACE-14B 2.029 PF (480p) and 7.864 PF (720p) per forward, x2 per CFG step.
    cfg = TRANSFORMER_CONFIGS["14b"]
    assert step_flops(cfg, 832, 480, 81) / 1e15 == pytest.approx(4.06, rel=0.01)
    assert step_flops(cfg, 1280, 720, 81) / 1e15 == pytest.approx(15.73, rel=0.01)
    vace_share = forward_flops(cfg, 32_760).vace / forward_flops(cfg, 32_760).total
    assert 0.15 < vace_share < 0.2  # 8 of 48 blocks plus projections: the "+21 % over T2V"


def test_synthetic_14b_builds_on_meta_with_the_published_parameter_count() -> None:
    from accelerate import init_empty_weights
    from diffusers import WanVACETransformer3DModel

    with init_empty_weights():
        model = WanVACETransformer3DModel(**TRANSFORMER_CONFIGS["14b"])
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(17.34, abs=0.01)


def test_bench_tiny_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--sizes", "32x32x17", "--steps", "2",
         "--modes", "bf16,cfg_batch,offload_group", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "cpu" and result["matmul_peak"]["tflops"] > 0
    recs = {r["mode"]: r for r in result["records"]}
    assert set(recs) == {"stock", "bf16", "cfg_batch", "offload_group"}  # stock baseline always added
    assert recs["offload_group"]["skipped"] == "needs CUDA"
    for name in ("stock", "bf16", "cfg_batch"):
        r = recs[name]
        assert r["s_per_step"] > 0 and r["tflops"] > 0 and r["ratio_vs_stock"] > 0
        assert r["text_encode_s"] > 0 and r["vae_encode_s"] > 0 and r["vae_decode_s"] > 0
        assert r["step_flops"] == step_flops(TINY, 32, 32, 17)
    assert recs["stock"]["ratio_vs_stock"] == 1.0
    assert recs["bf16"]["last_run"]["forwards"] == 4  # 2 steps x 2 CFG passes
    assert recs["cfg_batch"]["last_run"]["forwards"] == 2  # one batched forward per step
    assert "s/step" in result["table"] and "cfg_batch" in proc.stdout
