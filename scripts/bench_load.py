#!/usr/bin/env python
"""Host memory of loading a real-architecture Wan VACE model (and of one small job with it), as JSON.

    # once: the full-depth Wan2.1-VACE-1.3B architecture with random weights, saved like the published repo
    .venv/bin/python scripts/bench_load.py build --dir ~/.cache/vace-bench/wan21-vace-1.3b
    # then, one process at a time: load (and optionally run one job) and report peak RSS
    .venv/bin/python scripts/bench_load.py load --dir ~/.cache/vace-bench/wan21-vace-1.3b --dtype bf16 --job

`build` creates every parameter on the meta device and materialises it directly in bf16 (vace_bench.synthetic:
no fp32 copy), then `save_pretrained` writes the diffusers layout: transformer (full depth: 30 blocks, 15 VACE
blocks) and text encoder in bf16 safetensors, the VAE in fp32, the shipped UniPC scheduler config, a small local
T5 tokenizer. The text encoder has the UMT5-XXL widths with `--text-layers` blocks (default 1; the real one has
24 and a 256k vocabulary: 5.7 B params, too large for a shared 24 GB box) and the tokenizer's small vocabulary.

`load` runs `Engine(DIR, EngineOptions(...))` — whatever `vace_local` is on PYTHONPATH, so the same script
measures another checkout (e.g. `PYTHONPATH=/tmp/before`) — and prints peak RSS (VmHWM, which counts
memory-mapped file pages as well as anonymous memory) after the load and after the job, plus RssAnon/RssFile.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

GB = 1e9


def proc_status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process, in bytes."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def snapshot(label: str) -> dict[str, Any]:
    st = proc_status()
    return {"stage": label, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),
            **{f"{k}_gb": round(v / GB, 3) for k, v in st.items()}}


def weight_files(path: Path) -> dict[str, int]:
    """Bytes of the safetensors files per component directory."""
    return {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors"))
            for d in sorted(path.iterdir()) if d.is_dir() and any(d.glob("*.safetensors"))}


def build(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from diffusers import UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # vace_bench (benchmark code, not installed)
    from vace_bench import synthetic
    from vace_local.engine.tiny import _build_tokenizer

    target = Path(args.dir).expanduser()
    if (target / "model_index.json").is_file():
        return {"built": False, "dir": str(target), "files": weight_files(target)}
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer()
    tok.save_pretrained(tmp / "tokenizer")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                            flow_shift=3.0).save_pretrained(tmp / "scheduler")
    synthetic.build_vae("wan", "cpu").save_pretrained(tmp / "vae")
    from accelerate import init_empty_weights

    cfg = {**synthetic.text_encoder_config("xxl"), "num_layers": args.text_layers, "vocab_size": len(tok)}
    with init_empty_weights(include_buffers=False):
        te = UMT5EncoderModel(UMT5Config(**cfg))
    synthetic.materialize(te, "cpu", torch.bfloat16, seed=1).eval()
    te.tie_weights()
    te.save_pretrained(tmp / "text_encoder")
    del te
    model = synthetic.build_transformer(args.size, "cpu", torch.bfloat16)
    model.save_pretrained(tmp / "transformer", max_shard_size="5GB")
    params = sum(p.numel() for p in model.parameters())
    del model
    index = {"_class_name": "WanVACEPipeline", "_diffusers_version": "0.35.0.dev0",
             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
             "transformer": ["diffusers", "WanVACETransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(target)
    return {"built": True, "dir": str(target), "transformer_params": params, "files": weight_files(target)}


def load(args: argparse.Namespace) -> dict[str, Any]:
    rec: dict[str, Any] = {"dir": args.dir, "dtype": args.dtype, "offload": args.offload, "device": args.device,
                           "vace_local": None, "stages": [snapshot("start")]}
    import numpy as np
    import torch

    import vace_local
    from vace_local.core.bundle import ControlBundle
    from vace_local.core.spec import JobSpec
    from vace_local.engine.engine import Engine, EngineOptions

    rec["vace_local"] = str(Path(vace_local.__file__).parent)
    rec["files"] = weight_files(Path(args.dir).expanduser())
    rec["stages"].append(snapshot("imported"))
    opts: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "offload": args.offload}
    if args.host_ram_gb is not None:
        opts["host_ram"] = int(args.host_ram_gb * GB)
    t0 = time.perf_counter()
    eng = Engine(str(Path(args.dir).expanduser()), EngineOptions(**opts))
    rec["load_s"] = round(time.perf_counter() - t0, 2)
    rec["loaded_dtype"] = str(eng.pipe.transformer.dtype).removeprefix("torch.")
    rec["policy"] = eng.policy
    rec["memory_plan"] = eng.describe().get("memory_plan")
    rec["stages"].append(snapshot("loaded"))
    if args.job:
        w, h, f = (int(x) for x in args.job_size.split("x"))
        rng = np.random.default_rng(0)
        bundle = ControlBundle(frames=rng.random((f, h, w, 3), dtype=np.float32), masks=np.ones((f, h, w), np.float32))
        spec = JobSpec(model=args.dir, prompt="a cat walks in the city", width=w, height=h, num_frames=f,
                       num_inference_steps=args.steps, seed=1)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        t0 = time.perf_counter()
        eng.generate(spec, bundle, seed=1)
        rec["job_s"] = round(time.perf_counter() - t0, 2)
        rec["job"] = {"size": args.job_size, "steps": args.steps}
        rec["stages"].append(snapshot("after_job"))
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the random-weight model directory (once)")
    b.add_argument("--dir", required=True)
    b.add_argument("--size", default="1.3b", choices=["1.3b", "14b", "tiny"])
    b.add_argument("--text-layers", type=int, default=1)
    ld = sub.add_parser("load", help="load it and report peak host RSS")
    ld.add_argument("--dir", required=True)
    ld.add_argument("--device", default="cpu")
    ld.add_argument("--dtype", default="auto")
    ld.add_argument("--offload", default="auto")
    ld.add_argument("--host-ram-gb", type=float, default=None, help="EngineOptions.host_ram (plan as if this free)")
    ld.add_argument("--job", action="store_true", help="also run one small job")
    ld.add_argument("--job-size", default="128x128x17")
    ld.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    rec = build(args) if args.cmd == "build" else load(args)
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
