#!/usr/bin/env python
"""Benchmark: seconds per denoising step, component times, peak VRAM and effective TFLOP/s of Wan VACE.

Builds the published architectures with random weights (vace_local.synthetic: meta device, materialised
on the target device) and runs them through the same engine as real weights. Every mode is compared in
the same run with stock diffusers defaults (plain `WanVACEPipeline.__call__`: SDPA, two CFG passes, the
text encoder on every call, no compile) as a ratio.

    # the real figures (H100 class GPU):
    .venv/bin/python scripts/bench.py --model 14b --out bench-14b.json
    # CI / CPU smoke run of the same harness on the tiny model:
    .venv/bin/python scripts/bench.py --tiny --out bench-tiny.json
    # one job over N GPUs (CFG × Ulysses layouts, vace_local.parallel) against one GPU, on a multi-GPU box:
    .venv/bin/python scripts/bench.py --model 14b --gpus 8 --modes bf16 --out bench-8gpu.json

Per-step time is the median interval between step callbacks after the first (warm-up) step; the 30-step
end-to-end figure is text + VAE encode + 30 × step + VAE decode from those measurements (`e2e_est_s`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "a boxer in a red ring throws a slow punch, film lighting, camera slowly moving"


@dataclass(frozen=True)
class Mode:
    """One benchmarked configuration: engine options + job overrides; `stock` bypasses the engine."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)
    stock: bool = False
    cuda_only: bool = False
    warmup_run: bool = False  # compile: one untimed job first
    note: str = ""


MODES: dict[str, Mode] = {m.name: m for m in [
    Mode("stock", stock=True, note="diffusers defaults: SDPA, 2 CFG passes, text encoded per call"),
    Mode("bf16", note="engine defaults: attention auto, text cache"),
    Mode("cfg_batch", {"cfg_batch": True}),
    Mode("compile", {"compile": True}, warmup_run=True),
    Mode("fast", {"cfg_batch": True, "compile": True}, warmup_run=True, note="all exact options"),
    Mode("fp8_storage", {"fp8_storage": True}, note="layerwise fp8 weights"),
    Mode("fp8_linear", {"fp8_linear": True, "compile": True}, cuda_only=True, warmup_run=True,
         note="torchao float8 dynamic + compile"),
    Mode("offload_model", {"offload": "model"}, cuda_only=True),
    Mode("offload_group", {"offload": "group"}, cuda_only=True, note="leaf groups, CUDA stream prefetch"),
    Mode("offload_group_fp8", {"offload": "group", "fp8_storage": True}, cuda_only=True),
    Mode("offload_sequential", {"offload": "sequential"}, cuda_only=True),
    Mode("vae_tiling", {"vae_tiling": True}),
    Mode("fast_mode_distilled", {"cfg_batch": True}, {"num_inference_steps": 4, "guidance_scale": 1.0},
         note="4 steps, no CFG (as with a CausVid/lightx2v LoRA): e2e of a 5 s video"),
    Mode("step_cache", {}, {"acceleration": "regular"},
         note="skip pattern on random weights is not representative"),
]}
DEFAULT_MODES = ("stock", "bf16", "cfg_batch", "compile", "fast", "fp8_storage", "fp8_linear", "offload_group",
                 "offload_group_fp8", "offload_sequential", "vae_tiling", "fast_mode_distilled")
TINY_MODES = ("stock", "bf16", "cfg_batch", "fp8_storage", "vae_tiling", "fast_mode_distilled", "step_cache")
MEMORY_MODES_480P_ONLY = {"offload_model", "offload_group", "offload_group_fp8", "offload_sequential",
                          "vae_tiling", "fast_mode_distilled"}


# -- device helpers ------------------------------------------------------------------------------------
def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 1024**3, 2)


def matmul_peak_tflops(device: str) -> dict[str, Any]:
    """Measured dense matmul rate: bf16 8192³ on CUDA, fp32 1024³ on CPU (the denominator of `frac_peak`)."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    iters = 50 if device.startswith("cuda") else 5
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    secs = (time.perf_counter() - t) / iters
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": round(2 * n**3 / secs / 1e12, 2)}


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "device": device,
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 1024**3, 1), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    return env


# -- inputs ---------------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int, int]:
    try:
        w, h, f = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHTxFRAMES, got {text!r}") from exc
    return w, h, f


def make_bundle(w: int, h: int, f: int) -> Any:
    import numpy as np

    from vace_local.bundle import ControlBundle

    rng = np.random.default_rng(0)
    masks = np.zeros((f, h, w), dtype=np.float32)
    masks[:, :, w // 4: 3 * w // 4] = 1.0  # generate the middle half (an inpainting-like job)
    return ControlBundle(frames=rng.random((f, h, w, 3), dtype=np.float32), masks=masks)


# -- measurement ------------------------------------------------------------------------------------------
class StepTimer:
    def __init__(self, device: str) -> None:
        self.device, self.marks = device, []

    def mark(self) -> None:
        sync(self.device)
        self.marks.append(time.perf_counter())

    @property
    def s_per_step(self) -> float | None:
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return statistics.median(gaps) if gaps else None


def time_components(pipe: Any, bundle: Any, device: str, cfg: bool) -> dict[str, float]:
    """Text encoding (prompt + negative), VAE encode of the control video (as the pipeline does it), decode."""
    import torch

    from vace_local.spec import OFFICIAL_NEGATIVE_PROMPT

    exec_dev = pipe._execution_device
    out: dict[str, float] = {}
    with torch.inference_mode():
        sync(device)
        t = time.perf_counter()
        pipe.encode_prompt(prompt=PROMPT, negative_prompt=OFFICIAL_NEGATIVE_PROMPT, do_classifier_free_guidance=cfg,
                           max_sequence_length=512, device=exec_dev)
        sync(device)
        out["text_encode_s"] = time.perf_counter() - t

        f, h, w = bundle.masks.shape
        video = torch.from_numpy(bundle.frames).permute(0, 3, 1, 2).unsqueeze(0)
        mask = torch.from_numpy(bundle.masks).unsqueeze(1).expand(-1, 3, -1, -1).unsqueeze(0)
        t = time.perf_counter()
        v, m, refs = pipe.preprocess_conditions(video, mask, None, 1, h, w, f, torch.float32, exec_dev)
        latents = pipe.prepare_video_latents(v, m, refs, torch.Generator("cpu").manual_seed(0), exec_dev)
        sync(device)
        out["vae_encode_s"] = time.perf_counter() - t

        z = torch.randn(1, pipe.vae.config.z_dim, latents.shape[2], h // 8, w // 8, device=exec_dev,
                        dtype=pipe.vae.dtype)
        sync(device)
        t = time.perf_counter()
        pipe.vae.decode(z, return_dict=False)
        sync(device)
        out["vae_decode_s"] = time.perf_counter() - t
    return {k: round(v, 4) for k, v in out.items()}


def run_stock(pipe: Any, bundle: Any, w: int, h: int, f: int, steps: int, guidance: float, device: str) -> StepTimer:
    import torch

    from vace_local.spec import OFFICIAL_NEGATIVE_PROMPT

    timer = StepTimer(device)
    video = torch.from_numpy(bundle.frames).permute(0, 3, 1, 2).unsqueeze(0)
    mask = torch.from_numpy(bundle.masks).unsqueeze(1).expand(-1, 3, -1, -1).unsqueeze(0)

    def cb(_pipe: Any, _i: int, _t: Any, _kw: dict[str, Any]) -> dict[str, Any]:
        timer.mark()
        return {}

    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=PROMPT, negative_prompt=OFFICIAL_NEGATIVE_PROMPT, video=video, mask=mask, height=h, width=w,
         num_frames=f, num_inference_steps=steps, guidance_scale=guidance,
         generator=torch.Generator("cpu").manual_seed(0), output_type="np", callback_on_step_end=cb)
    return timer


def bench_mode(mode: Mode, size_name: str, wh_f: tuple[int, int, int], args: argparse.Namespace, device: str,
               dtype: Any, flops_cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vace_local.engine import Engine, EngineOptions
    from vace_local.flops import step_flops
    from vace_local.spec import JobSpec
    from vace_local.synthetic import build_pipeline

    w, h, f = wh_f
    job = {"num_inference_steps": args.steps, "guidance_scale": 5.0, **mode.job}
    steps = job["num_inference_steps"]
    cfg = job["guidance_scale"] > 1.0
    rec: dict[str, Any] = {"mode": mode.name, "model": size_name, "size": f"{w}x{h}x{f}", "note": mode.note,
                           "options": mode.options, "job": job}
    bundle = make_bundle(w, h, f)
    reset_peak(device)
    offload = mode.options.get("offload", "none")
    pipe = build_pipeline(size_name, device, dtype)  # materialised on the device: no slow CPU init
    if offload != "none":
        pipe.to("cpu")  # offloaded modes start from weights in CPU RAM, exactly as a real load does
    engine = None
    try:
        if mode.stock:
            comps = time_components(pipe, bundle, device, cfg)
            reset_peak(device)
            t = time.perf_counter()
            timer = run_stock(pipe, bundle, w, h, f, steps, job["guidance_scale"], device)
            wall = time.perf_counter() - t
            rec["attention"] = "native (process default)"
        else:
            opts = {"device": device, "dtype": args.dtype, "offload": offload, **mode.options}
            opts.setdefault("vae_tiling", False)
            engine = Engine.from_pipeline(pipe, f"synthetic-{size_name}", EngineOptions(**opts))
            comps = time_components(engine.pipe, bundle, device, cfg)
            spec = JobSpec(model="bench", prompt=PROMPT, width=w, height=h, num_frames=f, seed=0, **job)
            if mode.warmup_run:
                t = time.perf_counter()
                engine.generate(spec.model_copy(update={"num_inference_steps": 2}), bundle, seed=0)
                rec["warmup_s"] = round(time.perf_counter() - t, 2)
            engine.generate(spec.model_copy(update={"num_inference_steps": 1}), bundle, seed=0)  # fills text cache
            reset_peak(device)
            timer = StepTimer(device)
            t = time.perf_counter()
            engine.generate(spec, bundle, seed=0, on_progress=lambda p: timer.mark())
            wall = time.perf_counter() - t
            rec["attention"] = engine.attention.name
            rec["engine"] = engine.describe()["fast_path"]
            rec["last_run"] = engine.last_run
        rec.update(comps)
        rec["peak_vram_gib"] = peak_gib(device)
        rec["generate_wall_s"] = round(wall, 3)
        s = timer.s_per_step
        rec["s_per_step"] = round(s, 4) if s else None
        if s:
            e2e_steps = steps if mode.job.get("num_inference_steps") else args.e2e_steps
            rec["e2e_steps"] = e2e_steps
            rec["e2e_est_s"] = round(comps["text_encode_s"] + comps["vae_encode_s"] + e2e_steps * s
                                     + comps["vae_decode_s"], 2)
            fl = step_flops(flops_cfg, w, h, f, cfg=cfg)
            rec["step_flops"] = fl
            rec["step_pflop"] = float(f"{fl / 1e15:.4g}")
            rec["tflops"] = float(f"{fl / s / 1e12:.4g}")
    except torch.OutOfMemoryError as exc:
        rec["error"] = f"out of memory: {str(exc)[:200]}"
    finally:
        del engine, pipe
        reset_peak(device)
    return rec


def group_layouts(n: int) -> list[Any]:
    """Layouts worth timing on n ranks: CFG × Ulysses (the default) and Ulysses only."""
    from vace_local.parallel import Layout

    layouts = [Layout.for_ranks(n), Layout.for_ranks(n, cfg=False)]
    return list(dict.fromkeys(layouts))


def bench_group(layout: Any, size_name: str, wh_f: tuple[int, int, int], args: argparse.Namespace,
                device: str) -> dict[str, Any]:
    """Seconds per step of one job split over `layout.world` ranks (GPUs 0..n-1; gloo ranks on CPU)."""
    from vace_local.engine import EngineOptions
    from vace_local.parallel import Group
    from vace_local.spec import JobSpec

    w, h, f = wh_f
    name = f"parallel_cfg{layout.cfg}_u{layout.ulysses}"
    rec: dict[str, Any] = {"mode": name, "model": size_name, "size": f"{w}x{h}x{f}", "layout": layout.as_dict()}
    cuda = device.startswith("cuda")
    devices = [f"cuda:{i}" for i in range(layout.world)] if cuda else ["cpu"] * layout.world
    group = Group(f"synthetic-{size_name}", EngineOptions(device=devices[0], dtype=args.dtype, offload="none",
                                                          vae_tiling=False),
                  layout, devices, synthetic=size_name, timeout_s=600.0)
    try:
        spec = JobSpec(model="bench", prompt=PROMPT, width=w, height=h, num_frames=f, seed=0,
                       num_inference_steps=args.steps, guidance_scale=5.0)
        bundle = make_bundle(w, h, f)
        group.engine.generate(spec.model_copy(update={"num_inference_steps": 1}), bundle, seed=0)  # warm-up
        timer = StepTimer(device)
        t = time.perf_counter()
        group.engine.generate(spec, bundle, seed=0, on_progress=lambda p: timer.mark())
        rec["generate_wall_s"] = round(time.perf_counter() - t, 3)
        s = timer.s_per_step
        rec["s_per_step"] = round(s, 4) if s else None
        rec["attention"] = group.engine.attention.name
        rec["peak_vram_gib"] = peak_gib(device)  # rank 0's
    finally:
        group.close()
    return rec


def table(records: list[dict[str, Any]]) -> str:
    cols = [("model", "model"), ("size", "size"), ("mode", "mode"), ("s_per_step", "s/step"),
            ("ratio_vs_stock", "×stock"), ("tflops", "TFLOP/s"), ("frac_peak", "%peak"),
            ("text_encode_s", "text s"), ("vae_encode_s", "vae enc s"), ("vae_decode_s", "vae dec s"),
            ("e2e_est_s", "e2e s"), ("peak_vram_gib", "VRAM GiB"), ("attention", "attention")]
    rows = [[h for _, h in cols]]
    for r in records:
        if "skipped" in r or "error" in r:
            rows.append([r.get("model", ""), r.get("size", ""), r["mode"], r.get("skipped") or r.get("error"),
                         *[""] * (len(cols) - 4)])
            continue
        row = []
        for k, _ in cols:
            v = r.get(k)
            if k == "frac_peak" and v is not None:
                v = f"{100 * v:.3g}"
            row.append("" if v is None else str(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(cols))]
    lines = [" | ".join(c.ljust(widths[i]) for i, c in enumerate(r[:len(cols)])) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (CI smoke run of the harness)")
    p.add_argument("--model", default="14b", choices=["14b", "1.3b", "tiny"], help="architecture to build")
    p.add_argument("--sizes", default=None, help="comma list of WxHxF (default 832x480x81,1280x720x81)")
    p.add_argument("--modes", default=None, help=f"comma list from: {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=3, help="denoising steps per timed job (first is warm-up)")
    p.add_argument("--e2e-steps", type=int, default=30, help="steps for the end-to-end estimate")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--out", default="bench.json", help="JSON results file")
    p.add_argument("--gpus", type=int, default=1, help="also time one job split over N GPUs (CFG × Ulysses and "
                                                       "Ulysses-only layouts; gloo ranks on CPU)")
    args = p.parse_args(argv)

    import torch

    if args.tiny:
        args.model = "tiny"
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is a warm-up)")
    default_sizes = "64x64x17" if args.model == "tiny" else "832x480x81,1280x720x81"
    sizes = [parse_size(s) for s in (args.sizes or default_sizes).split(",")]
    default_modes = TINY_MODES if args.model == "tiny" else DEFAULT_MODES
    mode_names = args.modes.split(",") if args.modes else list(default_modes)
    unknown = [m for m in mode_names if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if "stock" not in mode_names:
        mode_names.insert(0, "stock")  # every run carries its own baseline
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)

    from vace_local.synthetic import TRANSFORMER_CONFIGS

    flops_cfg = TRANSFORMER_CONFIGS[args.model]
    result: dict[str, Any] = {"environment": environment(device), "matmul_peak": matmul_peak_tflops(device),
                              "args": vars(args), "records": []}
    peak = result["matmul_peak"]["tflops"]
    print(f"# device {device}: measured matmul peak {peak} TFLOP/s ({result['matmul_peak']['dtype']})", flush=True)
    records: list[dict[str, Any]] = result["records"]
    for w, h, f in sizes:
        is_480 = (w, h) == (832, 480) or args.model == "tiny"
        base: dict[str, Any] | None = None
        resident: dict[str, Any] | None = None
        for name in mode_names:
            mode = MODES[name]
            where = {"mode": name, "model": args.model, "size": f"{w}x{h}x{f}"}
            if mode.cuda_only and not device.startswith("cuda"):
                records.append({**where, "skipped": "needs CUDA"})
                continue
            if name in MEMORY_MODES_480P_ONLY and not is_480 and args.modes is None:
                continue
            t = time.perf_counter()
            rec = bench_mode(replace(mode), args.model, (w, h, f), args, device, dtype, flops_cfg)
            rec["bench_wall_s"] = round(time.perf_counter() - t, 1)
            if rec.get("tflops") is not None:
                rec["frac_peak"] = float(f"{rec['tflops'] / peak:.4g}")
            if name == "stock":
                base = rec
            if name == "bf16":
                resident = rec
            # Same job → compare seconds per step; a different schedule (fewer steps, no CFG) → end to end.
            basis = "e2e_est_s" if mode.job else "s_per_step"
            if base and base.get(basis) and rec.get(basis):
                rec["ratio_vs_stock"] = round(base[basis] / rec[basis], 3)
                rec["ratio_basis"] = basis
            if resident and resident.get("s_per_step") and rec.get("s_per_step") and name != "bf16":
                rec["slowdown_vs_resident"] = round(rec["s_per_step"] / resident["s_per_step"], 3)
            records.append(rec)
            print(json.dumps(rec), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2))  # keep partial results
        for layout in group_layouts(args.gpus) if args.gpus > 1 else []:
            t = time.perf_counter()
            rec = bench_group(layout, args.model, (w, h, f), args, device)
            rec["bench_wall_s"] = round(time.perf_counter() - t, 1)
            if resident and resident.get("s_per_step") and rec.get("s_per_step"):
                rec["speedup_vs_1_gpu"] = round(resident["s_per_step"] / rec["s_per_step"], 3)
            records.append(rec)
            print(json.dumps(rec), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
    text = table(records)
    result["table"] = text
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(text)
    print(f"# results: {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
