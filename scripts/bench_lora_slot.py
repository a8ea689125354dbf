"""Benchmark (not a test): the per-forward cost of `--compile`'s LoRA slot (`CompiledLoraSlot`).

Two engines on the real-architecture model (tests/realarch.py): one plain, one with a zero rank-R slot on every
linear (what a compiled engine carries on every job, LoRA or not). The transformer forward of a real job (inputs
captured from one) is timed on both, interleaved, as process CPU time on one thread (steadier than wall time on a
shared machine); prints the medians. Eager: the slot's cost before inductor fuses its elementwise ops.

Usage: PYTHONPATH=. .venv/bin/python scripts/bench_lora_slot.py [--rank 64] [--size 128] [--layers 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tests.realarch import build_wan21_vace
from vace_local.core.bundle import ControlBundle
from vace_local.core.spec import JobSpec
from vace_local.engine.engine import Engine, EngineOptions
from vace_local.engine.lora import CompiledLoraSlot


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--size", type=int, default=128, help="width = height of the job, pixels")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = str(build_wan21_vace(num_layers=args.layers, vae_base_dim=16))
    plain = Engine(model, EngineOptions(dtype="fp32"))
    slotted = Engine(model, EngineOptions(dtype="fp32"))
    CompiledLoraSlot(slotted.pipe, rank=args.rank).install()
    captured: dict = {}
    hook = plain.pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: captured.update(kw) if not captured else None, with_kwargs=True)
    spec = JobSpec(model=model, prompt="a man walks on the street", width=args.size, height=args.size, num_frames=17,
                   num_inference_steps=1)
    plain.sample(spec, ControlBundle.blank(17, args.size, args.size), seed=2)
    hook.remove()
    times: dict[str, list[float]] = {"plain": [], "slot": []}
    with torch.no_grad():
        for eng in (plain, slotted):  # warm-up
            eng.pipe.transformer(**captured)
        for _ in range(args.repeat):
            for name, eng in (("plain", plain), ("slot", slotted)):
                t = time.process_time()
                eng.pipe.transformer(**captured)
                times[name].append(time.process_time() - t)
    p, s = statistics.median(times["plain"]), statistics.median(times["slot"])
    print(f"hidden_states {tuple(captured['hidden_states'].shape)}, {args.layers} blocks, slot rank {args.rank}: "
          f"plain {p:.3f} s, slot {s:.3f} s per forward (CPU time, median of {args.repeat}); "
          f"{100 * (s / p - 1):+.1f} %")


if __name__ == "__main__":
    main()
