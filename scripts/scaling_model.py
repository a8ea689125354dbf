#!/usr/bin/env python
"""Scaling model of one Wan VACE job over N GPUs (CFG-parallel × Ulysses), from the FLOP model and link speed.

    .venv/bin/python scripts/scaling_model.py            # the table in docs/PERFORMANCE.md
    .venv/bin/python scripts/scaling_model.py --link-gbs 200 --tflops 400

Per step and rank: compute = the sharded part of each forward / Ulysses degree + the replicated part (text
K/V projections, embedders), times the forwards this rank runs (2 with CFG on one rank, 1 with CFG-parallel);
communication = the four all-to-alls (Q, K, V before, O after) of every self-attention (40 main + 8 VACE
blocks), each moving (u-1)/u of the rank's token shard, plus the CFG all-gather of the prediction. Nothing is
overlapped (diffusers' Ulysses waits on each all-to-all), so the model is conservative on that point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vace_bench.flops import TEXT_TOKENS, forward_flops, latent_tokens  # noqa: E402

SIZES = {"480p": (832, 480, 81), "720p": (1280, 720, 81)}
LAYOUTS = {1: (1, 1), 2: (2, 1), 4: (2, 2), 8: (2, 4)}  # GPUs → (cfg, ulysses)
BYTES = 2  # bf16 activations


def model_14b() -> dict:
    from vace_bench.synthetic import TRANSFORMER_CONFIGS

    return dict(TRANSFORMER_CONFIGS["14b"])


def step_time(cfg_deg: int, uly: int, size: tuple[int, int, int], c: dict, tflops: float, link_gbs: float,
              link_eff: float) -> dict[str, float]:
    w, h, f = size
    tokens = latent_tokens(w, h, f)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    blocks = c["num_layers"] + len(c["vace_layers"])
    fwd = forward_flops(c, tokens)
    replicated = blocks * 2 * 2 * TEXT_TOKENS * d * d + 2 * TEXT_TOKENS * (c["text_dim"] * d + d * d)
    sharded = fwd.total - replicated
    forwards = 2 // cfg_deg  # per rank per step (CFG on)
    compute_s = forwards * (sharded / uly + replicated) / (tflops * 1e12)
    a2a_bytes = forwards * blocks * 4 * (tokens / uly) * d * BYTES * (uly - 1) / uly
    latent = c["out_channels"] * ((f - 1) // 4 + 1) * (h // 8) * (w // 8) * BYTES
    cfg_bytes = latent * (cfg_deg - 1)
    comm_s = (a2a_bytes + cfg_bytes) / (link_gbs * 1e9 * link_eff)
    return {"tokens": tokens, "step_pflop": 2 * fwd.total / 1e15, "rank_pflop": forwards * (sharded / uly + replicated)
            / 1e15, "a2a_gb": a2a_bytes / 1e9, "compute_s": compute_s, "comm_s": comm_s, "step_s": compute_s + comm_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tflops", type=float, default=650.0,
                   help="sustained bf16 TFLOP/s of one GPU on this model (default: LightX2V's 1xH100 rate)")
    p.add_argument("--link-gbs", type=float, default=450.0, help="NVLink GB/s per GPU per direction "
                                                                "(NVLink 4: 900 bidirectional)")
    p.add_argument("--link-eff", type=float, default=0.7, help="fraction of it an all-to-all achieves")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--serial-s", default="480p=12,720p=30",
                   help="text encode + VAE encode + VAE decode seconds, not split over GPUs")
    args = p.parse_args(argv)
    serial = {k: float(v) for k, v in (x.split("=") for x in args.serial_s.split(","))}
    c = model_14b()
    print(f"# VACE-14B, {args.tflops:g} TFLOP/s per GPU, {args.link_gbs:g} GB/s x {args.link_eff:g} per direction, "
          f"{args.steps} steps, serial part {serial}")
    print("size | GPUs | cfg x ulysses | PFLOP/step (rank) | all-to-all GB/step/rank | compute s | comm s | s/step "
          "| step speed-up | e2e s | e2e speed-up")
    for name, size in SIZES.items():
        base = step_time(1, 1, size, c, args.tflops, args.link_gbs, args.link_eff)
        base_e2e = serial[name] + args.steps * base["step_s"]
        for n, (cd, u) in LAYOUTS.items():
            r = step_time(cd, u, size, c, args.tflops, args.link_gbs, args.link_eff)
            e2e = serial[name] + args.steps * r["step_s"]
            print(f"{name} ({r['tokens']} tok) | {n} | {cd} x {u} | {r['rank_pflop']:.2f} | {r['a2a_gb']:.2f} | "
                  f"{r['compute_s']:.2f} | {r['comm_s']:.3f} | {r['step_s']:.2f} | "
                  f"{base['step_s'] / r['step_s']:.2f}x | {e2e:.0f} | {base_e2e / e2e:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
