"""Benchmark (not a test): per-request LoRA switching on the real-architecture model (tests/realarch.py).

Measures, on one engine: loading a LoRA adapter from disk, switching between two loaded adapters, and a
job without LoRA after them; against a fresh engine load with the LoRA fused (what a switch cost before). And the
per-step time of an unfused adapter vs the same LoRA fused (the runtime cost of not fusing).

Usage: PYTHONPATH=. .venv/bin/python scripts/bench_lora.py [--layers 2] [--rank 32] [--steps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.realarch import build_wan21_vace
from vace_local.core.bundle import ControlBundle
from vace_local.core.spec import JobSpec, LoraRef
from vace_local.engine.engine import Engine, EngineOptions
from vace_local.engine.lora import JobLora, LoraOption

BLOCK = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
         "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def make_lora(transformer, rank: int, seed: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """A diffusers-layout LoRA on every linear of every main block (what style LoRAs train)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(len(transformer.blocks)):
        for m in BLOCK:
            out_f, in_f = transformer.get_submodule(f"blocks.{i}.{m}").weight.shape
            sd[f"transformer.blocks.{i}.{m}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            sd[f"transformer.blocks.{i}.{m}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
    return sd


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = str(build_wan21_vace(num_layers=args.layers, vace_layers=(0,), vae_base_dim=16))
    tmp = Path(tempfile.mkdtemp())
    eng = Engine(model, EngineOptions(offload="none", dtype="fp32"))
    paths = []
    for seed in (1, 2):
        p = tmp / f"lora{seed}.safetensors"
        save_file(make_lora(eng.pipe.transformer, args.rank, seed), str(p))
        paths.append(p)
    a, b = (JobLora(p, 1.0, "both", "loras[0].path") for p in paths)
    first_load = [timed(lambda: eng.adapters.activate([a])), timed(lambda: eng.adapters.activate([b]))]
    switch = [timed(lambda x=x: eng.adapters.activate([x])) for _ in range(args.repeat) for x in (a, b)]
    off = [timed(lambda: eng.adapters.activate([])) for _ in range(args.repeat)]
    fresh = [timed(lambda: Engine(model, EngineOptions(offload="none", dtype="fp32",
                                                       loras=(LoraOption(str(paths[0])),))))
             for _ in range(2)]

    job = JobSpec(model=model, prompt="a cat", width=64, height=48, num_frames=17, num_inference_steps=args.steps,
                  seed=1, guidance_scale=1.0)
    rng = np.random.default_rng(0)
    bundle = ControlBundle(frames=rng.random((17, 48, 64, 3), dtype=np.float32),
                           masks=np.ones((17, 48, 64), dtype=np.float32))
    fused = Engine(model, EngineOptions(offload="none", dtype="fp32", loras=(LoraOption(str(paths[0])),)))

    def run(e: Engine, loras: list[LoraRef], steps: int) -> float:
        return timed(lambda: e.sample(job.model_copy(update={"num_inference_steps": steps, "loras": loras}),
                                      bundle, seed=1, decode=False))

    # per step = (time of `steps` steps - time of 1 step) / (steps - 1): the VAE encode and the other fixed
    # costs cancel; fused and adapter runs interleaved so a busy machine slows both alike.
    lora_a = [LoraRef(path=str(paths[0]))]
    run(fused, [], 1), run(eng, lora_a, 1)  # warm-up
    fused_s, adapter_s = [], []
    for _ in range(args.repeat):
        fused_s.append((run(fused, [], args.steps) - run(fused, [], 1)) / (args.steps - 1))
        adapter_s.append((run(eng, lora_a, args.steps) - run(eng, lora_a, 1)) / (args.steps - 1))
    per_step_fused, per_step_adapter = statistics.median(fused_s), statistics.median(adapter_s)
    out = {
        "command": "PYTHONPATH=. .venv/bin/python scripts/bench_lora.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": f"realarch Wan2.1-VACE-1.3B width, {args.layers} blocks, fp32 CPU, LoRA rank {args.rank} on all "
                 f"{len(BLOCK)} linears of every block",
        "adapter_first_load_s": [round(x, 4) for x in first_load],
        "switch_loaded_s_median": round(statistics.median(switch), 5),
        "lora_off_s_median": round(statistics.median(off), 5),
        "fresh_engine_load_with_fused_lora_s": [round(x, 3) for x in fresh],
        "per_step_s_fused": round(per_step_fused, 4),
        "per_step_s_adapter": round(per_step_adapter, 4),
        "adapter_overhead_pct": round(100 * (per_step_adapter / per_step_fused - 1), 1),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
