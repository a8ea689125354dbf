#!/usr/bin/env python
"""Benchmark: seconds per denoising step, component times, peak VRAM and effective TFLOP/s of Wan VACE.

Builds the published architectures with random weights (vace_bench.synthetic: meta device, materialised
on the target device) and runs them through the same engine as real weights. Every mode is compared in
the same run with stock diffusers defaults (plain `WanVACEPipeline.__call__`: SDPA, two CFG passes, the
text encoder on every call, no compile) as a ratio.

    # the real figures (H100 class GPU):
    .venv/bin/python scripts/bench.py --model 14b --out bench-14b.json
    # CI / CPU smoke run of the same harness on the tiny model:
    .venv/bin/python scripts/bench.py --tiny --out bench-tiny.json
    # one job over N GPUs (CFG × Ulysses layouts, vace_local.run.parallel) against one GPU, on a multi-GPU box:
    .venv/bin/python scripts/bench.py --model 14b --gpus 8 --modes bf16 --out bench-8gpu.json

Per-step time is the median interval between step callbacks after the first (warm-up) step; the 30-step
end-to-end figure is text + VAE encode + 30 × step + VAE decode from those measurements (`e2e_est_s`).
The VAE (encode of the control video, decode of the latents) is timed once per size, not per mode: the
denoising jobs reuse that encoded conditioning and stop after their last step, so a mode costs its build
and its steps only. For a device with a time limit: `--budget-s` skips modes whose estimate (the FLOP model
and the measured matmul peak before anything is measured, then the modes already measured) would not
finish, and a mode's timed job stops at the budget's end or after `--mode-limit-s` once one step interval is
measured (s/step from fewer steps, `cut_short`); `--plan` prints the estimates without running; `--append`
adds to an earlier run's JSON (reusing its stock / bf16 baselines and VAE times only from the same GPU
model, skipping modes already measured there) and `--require-cuda` (or VACE_REQUIRE_CUDA=1) exits 2 at once
when CUDA is missing instead of benchmarking the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
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
    own_vae: bool = False  # the mode changes the VAE itself (tiling): time its VAE instead of reusing the size's
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
    Mode("vae_tiling", {"vae_tiling": True}, own_vae=True),
    Mode("fast_mode_distilled", {"cfg_batch": True}, {"num_inference_steps": 4, "guidance_scale": 1.0},
         note="4 steps, no CFG (as with a CausVid/lightx2v LoRA): e2e of a 5 s video"),
    Mode("step_cache", {}, {"acceleration": "regular"},
         note="skip pattern on random weights is not representative"),
]}
DEFAULT_MODES = ("stock", "bf16", "cfg_batch", "compile", "fast", "fp8_storage", "fp8_linear", "offload_group",
                 "offload_group_fp8", "offload_sequential", "vae_tiling", "fast_mode_distilled")
TINY_MODES = ("stock", "bf16", "cfg_batch", "fp8_storage", "vae_tiling", "fast_mode_distilled", "step_cache")
#: Rough cost of a mode relative to a plain resident one, for the --budget-s estimate (compile warms up).
COST_FACTOR = {"compile": 4.0, "fast": 4.0, "fp8_linear": 4.0, "offload_model": 2.0, "offload_group": 2.5,
               "offload_group_fp8": 2.5, "offload_sequential": 6.0}
#: A-priori cost model for --budget-s before anything is measured and for `plan()` (the GPU kit's time budget,
#: checked on the CPU by tests/test_gpu_kit.py). Sustained fraction of the measured bf16 matmul peak:
#: stock diffusers + SDPA ≈ 44 % (performance-anchors §1), a tuned bf16 engine ≈ 60 %; then each mode's
#: slowdown over the resident engine (offload streams, fp8 upcasts) and its one-off costs.
PRIOR_EFFICIENCY = {"stock": 0.44}
PRIOR_DEFAULT_EFFICIENCY = 0.60
PRIOR_SLOWDOWN = {"offload_group": 1.5, "offload_group_fp8": 1.6, "offload_model": 1.5, "offload_sequential": 6.0,
                  "fp8_storage": 1.15}
#: Seconds: random-weight build on the device; VAE timing (first mode of a size, per 1e6 output pixels×frames);
#: moving the weights to pinned CPU memory for offload modes; compile warm-up.
PRIOR_BUILD_S = {"14b": 15.0, "1.3b": 6.0, "tiny": 1.0}
PRIOR_VAE_S_PER_MPIX = 0.9  # ≈ 30 s for encode ×2 + decode at 832×480×81 (32 Mpix)
PRIOR_OFFLOAD_SETUP_S = {"14b": 30.0, "1.3b": 8.0, "tiny": 0.5}
PRIOR_COMPILE_S = 150.0
EXIT_NO_CUDA = 2
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
    env["git_commit"] = _command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 1024**3, 1), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())),
                   driver=_command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    return env


def _command_output(cmd: list[str]) -> str | None:
    """First line a small tool prints (driver version, git commit), or None where it is missing."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def require_cuda(torch: Any) -> None:
    """Fail fast (exit 2) where the caller demanded CUDA: a CPU fallback would burn a GPU lease on nothing."""
    if not torch.cuda.is_available():
        print(f"bench.py: CUDA not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "refusing to benchmark the CPU because --require-cuda / VACE_REQUIRE_CUDA=1 is set", file=sys.stderr)
        sys.exit(EXIT_NO_CUDA)


# -- inputs ---------------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int, int]:
    try:
        w, h, f = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHTxFRAMES, got {text!r}") from exc
    return w, h, f


def make_bundle(w: int, h: int, f: int) -> Any:
    import numpy as np

    from vace_local.core.bundle import ControlBundle

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


class StopBeforeDecode(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from the last timed step's callback: the steps are measured; the decode is timed once per size."""


#: size → conditioning latents from the one timed VAE encode; the modes' jobs reuse them (same bundle).
_CONDITIONING: dict[tuple[int, ...], Any] = {}


def reuse_conditioning(pipe: Any) -> None:
    """Make `pipe` take its VACE conditioning latents from the size's one measured encode (no VAE per mode)."""
    real = pipe.prepare_video_latents

    def prepare_video_latents(video: Any, mask: Any, reference_images: Any = None, generator: Any = None,
                              device: Any = None) -> Any:
        key = (*video.shape, bool(reference_images and any(r is not None for refs in reference_images for r in refs)))
        if key not in _CONDITIONING:
            _CONDITIONING[key] = real(video, mask, reference_images, generator, device)
        return _CONDITIONING[key].to(device or pipe._execution_device).clone()

    pipe.prepare_video_latents = prepare_video_latents


def time_text(pipe: Any, device: str, cfg: bool) -> float:
    """Text encoding (prompt + negative) as a job with a new prompt pays it (offload moves the encoder too)."""
    import torch

    from vace_local.core.spec import OFFICIAL_NEGATIVE_PROMPT

    with torch.inference_mode():
        sync(device)
        t = time.perf_counter()
        pipe.encode_prompt(prompt=PROMPT, negative_prompt=OFFICIAL_NEGATIVE_PROMPT, do_classifier_free_guidance=cfg,
                           max_sequence_length=512, device=pipe._execution_device)
        sync(device)
    return round(time.perf_counter() - t, 4)


def time_vae(pipe: Any, bundle: Any, device: str) -> dict[str, float]:
    """VAE encode of the control video (as the pipeline does it: inactive + reactive) and decode of the latents."""
    import torch

    exec_dev = pipe._execution_device
    out: dict[str, float] = {}
    with torch.inference_mode():
        f, h, w = bundle.masks.shape
        video = torch.from_numpy(bundle.frames).permute(0, 3, 1, 2).unsqueeze(0)
        mask = torch.from_numpy(bundle.masks).unsqueeze(1).expand(-1, 3, -1, -1).unsqueeze(0)
        t = time.perf_counter()
        v, m, refs = pipe.preprocess_conditions(video, mask, None, 1, h, w, f, torch.float32, exec_dev)
        latents = pipe.prepare_video_latents(v, m, refs, torch.Generator("cpu").manual_seed(0), exec_dev)
        sync(device)
        out["vae_encode_s"] = time.perf_counter() - t
        _CONDITIONING[(*v.shape, False)] = latents

        z = torch.randn(1, pipe.vae.config.z_dim, latents.shape[2], h // 8, w // 8, device=exec_dev,
                        dtype=pipe.vae.dtype)
        sync(device)
        t = time.perf_counter()
        pipe.vae.decode(z, return_dict=False)
        sync(device)
        out["vae_decode_s"] = time.perf_counter() - t
    return {k: round(v, 4) for k, v in out.items()}


def _stop(i: int, stop_at: int, timer: StepTimer, deadline: float | None) -> bool:
    """After step `i` (1-based): the timed steps are done, or the deadline passed with one interval measured."""
    return i >= stop_at or (deadline is not None and len(timer.marks) >= 2 and time.monotonic() >= deadline)


def run_stock(pipe: Any, bundle: Any, w: int, h: int, f: int, steps: int, guidance: float, device: str,
              stop_at: int | None = None, deadline: float | None = None) -> StepTimer:
    """A plain pipeline call with diffusers' defaults (a `steps`-step schedule), stopped after `stop_at` steps or
    at `deadline` once one step interval is measured (the decode is timed once per size)."""
    import torch

    from vace_local.core.spec import OFFICIAL_NEGATIVE_PROMPT

    timer = StepTimer(device)
    video = torch.from_numpy(bundle.frames).permute(0, 3, 1, 2).unsqueeze(0)
    mask = torch.from_numpy(bundle.masks).unsqueeze(1).expand(-1, 3, -1, -1).unsqueeze(0)

    def cb(_pipe: Any, i: int, _t: Any, _kw: dict[str, Any]) -> dict[str, Any]:
        timer.mark()
        if _stop(i + 1, stop_at or steps, timer, deadline):
            raise StopBeforeDecode
        return {}

    pipe.set_progress_bar_config(disable=True)
    with contextlib.suppress(StopBeforeDecode):
        pipe(prompt=PROMPT, negative_prompt=OFFICIAL_NEGATIVE_PROMPT, video=video, mask=mask, height=h, width=w,
             num_frames=f, num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator("cpu").manual_seed(0), output_type="np", callback_on_step_end=cb)
    return timer


def run_steps(engine: Any, spec: Any, bundle: Any, timer: StepTimer | None = None, stop_at: int | None = None,
              deadline: float | None = None) -> None:
    """`engine.generate` through the real path, stopped after `stop_at` steps (default: the spec's last), or at
    `deadline` once `timer` holds one interval (no decode)."""
    steps = stop_at or spec.num_inference_steps
    marks = timer or StepTimer("cpu")  # only counts steps when no timer is given

    def on_progress(p: Any) -> None:
        if p.stage != "generate" or not p.step:
            return
        if timer is not None:
            timer.mark()
        if _stop(p.step, steps, marks, deadline if timer is not None else None):
            raise StopBeforeDecode

    with contextlib.suppress(StopBeforeDecode):
        engine.generate(spec, bundle, seed=0, on_progress=on_progress)


def bench_mode(mode: Mode, size_name: str, wh_f: tuple[int, int, int], args: argparse.Namespace, device: str,
               dtype: Any, flops_cfg: dict[str, Any], vae: dict[str, float] | None,
               deadline: float | None = None) -> dict[str, Any]:
    """One mode on a freshly built model; `vae` holds the size's VAE times (None: measure them here). Its timed
    job stops at `deadline` (monotonic) once one step interval is measured: s/step is then from fewer steps
    (`cut_short`), the end-to-end figure still extrapolates to the full schedule."""
    import torch

    from vace_bench.flops import step_flops
    from vace_bench.synthetic import build_pipeline
    from vace_local.core.spec import JobSpec
    from vace_local.engine.engine import Engine, EngineOptions

    w, h, f = wh_f
    job = {"num_inference_steps": args.steps, "guidance_scale": 5.0, **mode.job}
    steps = job["num_inference_steps"]
    n_timed = timed_steps(mode, args.steps)
    cfg = job["guidance_scale"] > 1.0
    rec: dict[str, Any] = {"mode": mode.name, "model": size_name, "size": f"{w}x{h}x{f}", "note": mode.note,
                           "options": mode.options, "job": job}
    bundle = make_bundle(w, h, f)
    reset_peak(device)
    offload = mode.options.get("offload", "none")
    pipe = engine = run_pipe = None
    try:
        t = time.perf_counter()
        pipe = build_pipeline(size_name, device, dtype)  # materialised on the device: no slow CPU init
        if offload != "none":
            pipe.to("cpu")  # offloaded modes start from weights in CPU RAM, exactly as a real load does
        if not mode.stock:
            opts = {"device": device, "dtype": args.dtype, "offload": offload, **mode.options}
            opts.setdefault("vae_tiling", False)
            engine = Engine.from_pipeline(pipe, f"synthetic-{size_name}", EngineOptions(**opts))
        run_pipe = engine.pipe if engine is not None else pipe
        rec["build_s"] = round(time.perf_counter() - t, 2)
        if vae is None or mode.own_vae:
            t = time.perf_counter()
            vae = time_vae(run_pipe, bundle, device)
            rec["vae_measured_here"], rec["vae_s"] = True, round(time.perf_counter() - t, 2)
        reuse_conditioning(run_pipe)
        comps = {"text_encode_s": time_text(run_pipe, device, cfg), **vae}
        if mode.stock:
            reset_peak(device)
            t = time.perf_counter()
            timer = run_stock(pipe, bundle, w, h, f, steps, job["guidance_scale"], device, n_timed, deadline)
            wall = time.perf_counter() - t
            rec["attention"] = "native (process default)"
        else:
            spec = JobSpec(model="bench", prompt=PROMPT, width=w, height=h, num_frames=f, seed=0, **job)
            if mode.warmup_run:  # compile: an untimed 2-step job pays the compilation (and its recompile)
                t = time.perf_counter()
                run_steps(engine, spec.model_copy(update={"num_inference_steps": 2}), bundle)
                rec["warmup_s"] = round(time.perf_counter() - t, 2)
            # Otherwise no warm-up job: the text encode and the first step (kernel selection) come before the
            # first step mark, and s/step is taken from the intervals after it.
            reset_peak(device)
            timer = StepTimer(device)
            t = time.perf_counter()
            run_steps(engine, spec, bundle, timer, n_timed, deadline)
            wall = time.perf_counter() - t
            rec["attention"] = engine.attention.name
            rec["engine"] = engine.describe()["fast_path"]
            rec["last_run"] = engine.last_run
        rec.update(comps)
        rec["peak_vram_gib"] = peak_gib(device)
        rec["generate_wall_s"] = round(wall, 3)  # the timed steps, without VAE encode / decode
        rec["steps_timed"] = len(timer.marks)
        if len(timer.marks) < n_timed:
            rec["cut_short"] = f"deadline: {len(timer.marks)} of {n_timed} steps timed"
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
    except Exception as exc:  # noqa: BLE001 - one broken mode must not cost the others' figures
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rec["traceback"] = traceback.format_exc()[-3000:]
        print(rec["traceback"], file=sys.stderr, flush=True)
    finally:
        del engine, pipe, run_pipe  # before empty_cache: the next mode starts from a clean device
        reset_peak(device)
    return rec


def estimate_s(name: str, model: str, size: str, records: list[dict[str, Any]]) -> float | None:
    """Seconds a mode should take, from the plain modes already measured at this model and size (None: unknown).

    The median plain mode (build + steps, without the one-off VAE timing) times the mode's `COST_FACTOR`.
    """
    walls = [r["bench_wall_s"] - r.get("vae_s", 0.0) for r in records if r.get("model") == model
             and r.get("size") == size and r.get("bench_wall_s") and "error" not in r and r["mode"] not in COST_FACTOR]
    if not walls:
        return None
    return round(statistics.median(walls) * COST_FACTOR.get(name, 1.0), 1)


def timed_steps(mode: Mode, steps: int) -> int:
    """Steps a mode's timed job runs: `--steps`, or fewer where the mode's own schedule is shorter."""
    return min(mode.job.get("num_inference_steps", steps), steps)


def prior_step_s(name: str, model: str, wh_f: tuple[int, int, int], peak_tflops: float) -> float:
    """Expected seconds per denoising step of mode `name` from the FLOP model and the measured matmul peak."""
    from vace_bench.flops import step_flops
    from vace_bench.synthetic import TRANSFORMER_CONFIGS

    mode = MODES[name]
    cfg = {"guidance_scale": 5.0, **mode.job}["guidance_scale"] > 1.0
    flops = step_flops(TRANSFORMER_CONFIGS[model], *wh_f, cfg=cfg)
    rate = PRIOR_EFFICIENCY.get(name, PRIOR_DEFAULT_EFFICIENCY) * peak_tflops * 1e12
    return flops / rate * PRIOR_SLOWDOWN.get(name, 1.0)


def prior_estimate_s(name: str, model: str, wh_f: tuple[int, int, int], steps: int, peak_tflops: float, *,
                     with_vae: bool) -> float:
    """Expected wall seconds of one mode as `bench_mode` runs it: build, (the size's VAE timing), offload setup,
    the timed steps (the first of them is the warm-up); compile adds its compilation and a 2-step job."""
    mode = MODES[name]
    w, h, f = wh_f
    total = PRIOR_BUILD_S.get(model, 15.0)
    if with_vae:
        total += PRIOR_VAE_S_PER_MPIX * w * h * f / 1e6
    if "offload" in mode.options:
        total += PRIOR_OFFLOAD_SETUP_S.get(model, 30.0)
    if mode.warmup_run:
        total += PRIOR_COMPILE_S
    n = timed_steps(mode, steps) + (2 if mode.warmup_run else 0)  # the first timed step is the warm one
    return round(total + n * prior_step_s(name, model, wh_f, peak_tflops), 1)


def plan(mode_names: list[str], model: str, sizes: list[tuple[int, int, int]], steps: int,
         peak_tflops: float) -> list[dict[str, Any]]:
    """The modes in run order with their prior estimates and the running total (what a budget must hold)."""
    out, total = [], 0.0
    for wh_f in sizes:
        for i, name in enumerate(mode_names):
            est = prior_estimate_s(name, model, wh_f, steps, peak_tflops, with_vae=i == 0)
            total += est
            out.append({"mode": name, "size": "x".join(map(str, wh_f)), "est_s": est, "cum_s": round(total, 1)})
    return out


def load_previous(path: Path) -> dict[str, Any] | None:
    """An earlier run's JSON for --append (a missing file starts a new one)."""
    if not path.exists():
        return None
    prev = json.loads(path.read_text())
    prev.setdefault("runs", [{"environment": prev.get("environment"), "matmul_peak": prev.get("matmul_peak"),
                              "args": prev.get("args")}])
    prev.setdefault("vae", {})
    return prev


def group_layouts(n: int) -> list[Any]:
    """Layouts worth timing on n ranks: CFG × Ulysses (the default) and Ulysses only."""
    from vace_local.run.parallel import Layout

    layouts = [Layout.for_ranks(n), Layout.for_ranks(n, cfg=False)]
    return list(dict.fromkeys(layouts))


def bench_group(layout: Any, size_name: str, wh_f: tuple[int, int, int], args: argparse.Namespace,
                device: str) -> dict[str, Any]:
    """Seconds per step of one job split over `layout.world` ranks (GPUs 0..n-1; gloo ranks on CPU)."""
    from vace_local.core.spec import JobSpec
    from vace_local.engine.engine import EngineOptions
    from vace_local.run.parallel import Group

    w, h, f = wh_f
    name = f"parallel_cfg{layout.cfg}_u{layout.ulysses}"
    rec: dict[str, Any] = {"mode": name, "model": size_name, "size": f"{w}x{h}x{f}", "layout": layout.as_dict()}
    cuda = device.startswith("cuda")
    devices = [f"cuda:{i}" for i in range(layout.world)] if cuda else ["cpu"] * layout.world
    group = Group(f"synthetic-{size_name}", EngineOptions(device=devices[0], dtype=args.dtype, offload="none",
                                                          vae_tiling=False),
                  layout, devices, pipeline_factory=("vace_bench.synthetic:build_pipeline", size_name), timeout_s=600.0)
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
    p.add_argument("--out", default="bench.json", help="JSON results file (rewritten after every mode)")
    p.add_argument("--append", action="store_true",
                   help="add to --out if it exists: reuse its stock / bf16 baselines and VAE times, skip its modes")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget: skip a mode whose estimate would not finish inside it")
    p.add_argument("--mode-limit-s", type=float, default=None,
                   help="stop a mode's timed job after this many seconds once one step interval is measured")
    p.add_argument("--plan", action="store_true",
                   help="print each mode's prior estimate and the running total (no benchmark) and exit")
    p.add_argument("--assume-peak-tflops", type=float, default=None,
                   help="with --plan: the bf16 matmul peak to plan for instead of measuring this device's")
    p.add_argument("--require-cuda", action="store_true",
                   help="exit 2 at once without CUDA (also with VACE_REQUIRE_CUDA=1)")
    p.add_argument("--gpus", type=int, default=1, help="also time one job split over N GPUs (CFG × Ulysses and "
                                                       "Ulysses-only layouts; gloo ranks on CPU)")
    args = p.parse_args(argv)
    started = time.monotonic()

    import torch

    from vace_local.core.config import vace_settings

    if args.require_cuda or vace_settings().require_cuda or args.device.startswith("cuda"):
        require_cuda(torch)
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

    from vace_bench.synthetic import TRANSFORMER_CONFIGS

    flops_cfg = TRANSFORMER_CONFIGS[args.model]
    if args.plan:
        peak = args.assume_peak_tflops or matmul_peak_tflops(device)["tflops"]
        rows = plan(mode_names, args.model, sizes, args.steps, peak)
        print(json.dumps({"model": args.model, "steps": args.steps, "peak_tflops": peak, "plan": rows}, indent=2))
        return 0
    out = Path(args.out)
    run = {"environment": environment(device), "matmul_peak": matmul_peak_tflops(device), "args": vars(args)}
    result = (load_previous(out) if args.append else None) or {**run, "runs": [], "vae": {}, "records": []}
    result["runs"].append(run)
    peak = run["matmul_peak"]["tflops"]
    print(f"# device {device}: measured matmul peak {peak} TFLOP/s ({run['matmul_peak']['dtype']})", flush=True)
    records: list[dict[str, Any]] = result["records"]

    def save() -> None:
        result["table"] = table(records)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)  # a run killed at its time limit leaves the last complete JSON, never half a file

    def put(rec: dict[str, Any]) -> None:
        """Add a record, replacing an earlier one of the same mode (a retry of a skipped or failed mode)."""
        records[:] = [r for r in records if (r["mode"], r.get("model"), r.get("size"))
                      != (rec["mode"], rec.get("model"), rec.get("size")) or not same_device(r)]
        records.append(rec)

    gpu = run["environment"].get("gpu")

    def same_device(r: dict[str, Any]) -> bool:
        """A record taken on this run's GPU (an --append file from another card is kept, not compared)."""
        runs = result["runs"]
        i = r.get("run")
        env = (runs[i].get("environment") or {}) if isinstance(i, int) and 0 <= i < len(runs) else {}
        return env.get("gpu") == gpu

    def done(name: str, size: str) -> dict[str, Any] | None:
        return next((r for r in records if r["mode"] == name and r.get("model") == args.model
                     and r.get("size") == size and r.get("s_per_step") and same_device(r)), None)

    for w, h, f in sizes:
        size = f"{w}x{h}x{f}"
        vae_key = f"{size}@{gpu}" if gpu else size  # VAE times of this card only
        is_480 = (w, h) == (832, 480) or args.model == "tiny"
        for name in mode_names:
            mode = MODES[name]
            where = {"mode": name, "model": args.model, "size": size, "run": len(result["runs"]) - 1}
            if done(name, size):
                print(f"# {args.model} {size} {name}: already in {out}, kept", flush=True)
                continue
            if mode.cuda_only and not device.startswith("cuda"):
                put({**where, "skipped": "needs CUDA"})
                continue
            if name in MEMORY_MODES_480P_ONLY and not is_480 and args.modes is None:
                continue
            est = estimate_s(name, args.model, size, [r for r in records if same_device(r)])
            if est is None:  # nothing measured yet at this size on this device: the FLOP model's prior
                est = prior_estimate_s(name, args.model, (w, h, f), args.steps, peak,
                                       with_vae=vae_key not in result["vae"])
            left = None if args.budget_s is None else args.budget_s - (time.monotonic() - started)
            if left is not None and (left <= 0 or (est is not None and est > left)):
                put({**where, "skipped": f"time budget: est {est} s, {max(left, 0):.0f} s left"})
                print(f"# {args.model} {size} {name}: skipped, est {est} s > {left:.0f} s left", flush=True)
                save()
                continue
            t = time.perf_counter()
            deadline = [time.monotonic() + x for x in (left, args.mode_limit_s) if x is not None]
            rec = {**where, **bench_mode(replace(mode), args.model, (w, h, f), args, device, dtype, flops_cfg,
                                         result["vae"].get(vae_key), min(deadline) if deadline else None)}
            rec["bench_wall_s"] = round(time.perf_counter() - t, 1)
            rec["est_s"] = est
            if rec.get("vae_measured_here") and not mode.own_vae:
                result["vae"][vae_key] = {k: rec[k] for k in ("vae_encode_s", "vae_decode_s")}
            if rec.get("tflops") is not None:
                rec["frac_peak"] = float(f"{rec['tflops'] / peak:.4g}")
            base, resident = done("stock", size), done("bf16", size)
            # Same job → compare seconds per step; a different schedule (fewer steps, no CFG) → end to end.
            basis = "e2e_est_s" if mode.job else "s_per_step"
            if name == "stock" and rec.get(basis):
                rec["ratio_vs_stock"], rec["ratio_basis"] = 1.0, basis
            elif base and base.get(basis) and rec.get(basis):
                rec["ratio_vs_stock"] = round(base[basis] / rec[basis], 3)
                rec["ratio_basis"] = basis
            if resident and rec.get("s_per_step") and name not in ("bf16", "stock"):
                rec["slowdown_vs_resident"] = round(rec["s_per_step"] / resident["s_per_step"], 3)
            put(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "traceback"}), flush=True)
            save()
        resident = done("bf16", size)
        for layout in group_layouts(args.gpus) if args.gpus > 1 else []:
            t = time.perf_counter()
            rec = {"run": len(result["runs"]) - 1, **bench_group(layout, args.model, (w, h, f), args, device)}
            rec["bench_wall_s"] = round(time.perf_counter() - t, 1)
            if resident and resident.get("s_per_step") and rec.get("s_per_step"):
                rec["speedup_vs_1_gpu"] = round(resident["s_per_step"] / rec["s_per_step"], 3)
            put(rec)
            print(json.dumps(rec), flush=True)
            save()
    save()
    print(result["table"])
    print(f"# results: {out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
