"""The engine: load a Wan VACE pipeline once per process and turn (JobSpec, ControlBundle) into frames.

It wraps diffusers' `WanVACEPipeline` and guards against its silent pitfalls: conditioning is passed as exact
(width, height, num_frames) tensors, reference images are passed reversed so the model sees them in the
user's order, the official negative prompt is explicit, the scheduler's shift comes from the spec, and the
global RNG is seeded too (stochastic schedulers ignore the generator).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vace_local.core.bundle import ControlBundle
from vace_local.core.config import EngineSettings
from vace_local.core.errors import InputError, JobCancelled, OutOfMemory
from vace_local.core.events import CancelFn, Progress, ProgressFn, never_cancel, no_progress
from vace_local.core.spec import DtypeName as Dtype
from vace_local.core.spec import JobSpec, OffloadPolicy
from vace_local.engine.lora import LoraOption
from vace_local.engine.memory import (
    POLICIES,
    Footprint,
    MemoryPlan,
    ModelSize,
    Policy,
    apply_policy,
    before_call,
    host_free_ram,
    plan_memory,
    wants_vae_tiling,
)
from vace_local.engine.models import ResolvedModel, resolve_model
from vace_local.engine.preview import attach_preview
from vace_local.engine.samplers import make_scheduler
from vace_local.engine.step_cache import ACCELERATION_THRESHOLDS, DenoiserForward, StepCacheConfig, StepStats

log = logging.getLogger(__name__)


#: The defaults of the options a user picks, declared once (core.config.EngineSettings).
_PICKED = EngineSettings()


@dataclass(frozen=True)
class EngineOptions:
    """Process-level settings (not per job): where and how the weights live."""

    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: Dtype = _PICKED.dtype  # auto: bf16 on CUDA; on the CPU fp32 when it fits in RAM, else bf16
    offload: OffloadPolicy = _PICKED.offload
    vae_tiling: bool | None = None  # None: on when memory is tight
    allow_download: bool = False
    # -- fast path (docs/PERFORMANCE.md); defaults are on only where they cost no quality --
    #: Attention kernel, pinned per model: "auto" (FA3 > cuDNN SDPA > FA2 > SDPA on CUDA), or a name.
    attention: str = _PICKED.attention
    #: Prompt → embeddings cache entries (exact: same tensors the text encoder gives); 0 turns it off.
    text_cache: int = 32
    #: Run CFG's cond and uncond branches as one batch-2 forward (same result, more activation memory).
    cfg_batch: bool = _PICKED.cfg_batch
    #: Regional torch.compile of the repeated transformer / VACE blocks.
    compile: bool = _PICKED.compile
    compile_backend: str = "inductor"
    #: Store transformer weights as fp8 (e4m3) and upcast per layer: ~half the VRAM, small output change.
    fp8_storage: bool = False
    #: torchao float8 dynamic quantisation of the block linears (CUDA >= 8.9): faster, small output change.
    fp8_linear: bool = False
    #: LoRAs fused at load; distillation LoRAs carry step / guidance / shift overrides.
    loras: tuple[LoraOption, ...] = field(default_factory=tuple)
    #: Per-request LoRAs (`JobSpec.loras`) kept loaded as adapters, least recently used dropped first.
    lora_adapters: int = _PICKED.lora_adapters
    #: With `compile`: rank of the fixed LoRA slot per-request LoRAs are written into (no recompile per swap; the
    #: slot's matmuls run on every linear on every job). 0: no slot, per-request LoRAs refused with `compile`.
    lora_slot_rank: int = _PICKED.lora_slot_rank
    #: Bytes of helper models (prompt expander, safety checker) that `auto` must leave room for on the GPU.
    aux_bytes: int = 0
    #: Host RAM (bytes) the load may plan with; None: what the OS reports available (MemAvailable, cgroup limit).
    host_ram: int | None = None

    def __post_init__(self) -> None:
        if self.offload not in POLICIES:
            raise ValueError(f"offload must be one of {', '.join(POLICIES)}, got {self.offload!r}")
        if self.text_cache < 0:
            raise ValueError(f"text_cache must be >= 0, got {self.text_cache}")
        if self.fp8_storage and self.fp8_linear:
            raise ValueError("fp8_storage and fp8_linear are exclusive: fp8_linear already stores fp8 weights")

    @classmethod
    def from_settings(cls, s: EngineSettings, **process: Any) -> EngineOptions:
        """The options a user picked (`generate` / `serve` flags, the server's `VACE_*` variables: one declaration,
        core.config.EngineSettings) plus this process's own (`device`, `allow_download`, `aux_bytes`, ...)."""
        return cls(offload=s.offload, dtype=s.dtype, attention=s.attention, cfg_batch=s.cfg_batch, compile=s.compile,
                   fp8_storage=s.fp8 == "storage", fp8_linear=s.fp8 == "linear",
                   loras=tuple(LoraOption.parse(x) for x in s.loras), lora_adapters=s.lora_adapters,
                   lora_slot_rank=s.lora_slot_rank, **process)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) float frames in [0, 1] → uint8, rounded."""
    return (frames * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SamplingStats:
    """What one denoising run did: the settings it ran with (after LoRA overrides) and the step cache's work."""

    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    step_cache_threshold: float
    text_encode_s: float
    cache: StepStats | None = None
    #: The job's LoRA adapters (`AdapterPool.activate`): adapter name, file, scale, experts.
    loras: tuple[dict[str, Any], ...] = ()
    lora_switch_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The job metadata's "sampling" record."""
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "flow_shift": self.flow_shift, "step_cache_threshold": self.step_cache_threshold,
                "text_encode_s": round(self.text_encode_s, 4), "loras": list(self.loras),
                "lora_switch_s": round(self.lora_switch_s, 4), **(self.cache.as_dict() if self.cache else {})}


@dataclass(frozen=True)
class Generation:
    """`Engine.sample`'s result: the frames and the stats of the run that made them."""

    #: (F, H, W, 3) float32 in [0, 1]; None when the decode was skipped (`decode=False`).
    frames: np.ndarray | None
    stats: SamplingStats

    def uint8(self) -> np.ndarray:
        if self.frames is None:
            raise ValueError("this generation was not decoded")
        return to_uint8(self.frames)


class Engine:
    """A loaded pipeline plus the logic to run one job on it. Not thread-safe: one job at a time."""

    def __init__(self, model: str, options: EngineOptions | None = None, *, pipeline: Any = None) -> None:
        import torch

        from vace_local.engine.models import load_pipeline, model_size, pipeline_size

        self.options = options or EngineOptions()
        self.model_name = model
        self.device = self._pick_device()
        if pipeline is not None:  # prebuilt (benchmark's random-weight real-size models): same path from here
            self.resolved = ResolvedModel(model, Path("<memory>"), "memory")
            self.plan = self._plan(pipeline_size(pipeline), prebuilt=pipeline)
            self.compute_dtype = getattr(torch, TORCH_DTYPES[self.plan.dtype])
            self.pipe = pipeline
        else:
            self.resolved = resolve_model(model, allow_download=self.options.allow_download)
            original = self.resolved.original
            # An original-format release sizes as its base model with its own expert count.
            size = model_size(self.resolved.base if original is not None else self.resolved.path)
            if original is not None:
                size = dataclasses.replace(size, experts=len(original.experts))
            self.plan = self._plan(size)
            self.compute_dtype = getattr(torch, TORCH_DTYPES[self.plan.dtype])
            # Resident: each weight goes from the file straight to the device; offloaded: one CPU copy.
            # fp8 storage casts the transformers on the CPU first, so their bf16 copy never sits on the GPU.
            here = self.device if self.plan.policy == "none" else None
            experts = None if self.options.fp8_storage else here
            if original is not None:  # the official original-format release: converted here
                from vace_local.engine.checkpoints import load_original_pipeline

                dtypes = {"transformer": self.compute_dtype, "transformer_2": self.compute_dtype,
                          "text_encoder": self.compute_dtype, "default": torch.float32}
                self.pipe = load_original_pipeline(original, self.resolved.base, dtypes, device=experts)
            else:
                placement = {"transformer": experts, "transformer_2": experts, "text_encoder": here, "vae": here}
                self.pipe = load_pipeline(self.resolved.path, self.compute_dtype, placement)
        self.pipe.set_progress_bar_config(disable=True)
        #: When this engine's weights were loaded (job metadata: jobs on one loaded model share it).
        self.loaded_at = time.time()
        self._text_cache: OrderedDict[str, Any] = OrderedDict()
        self._last_stats: SamplingStats | None = None
        #: Set by `vace_local.run.parallel` in a CFG-parallel group: computes (cond, uncond) for one step.
        self.pair_forward: Any = None
        # LoRAs are fused into the weights before any fp8 cast or compile, which then see plain weights.
        self.lora_overrides: dict[str, float | int] = {}
        if self.options.loras:
            self.add_loras(self.options.loras)
        from vace_local.engine.lora import AdapterPool, CompiledLoraSlot

        #: Why per-request LoRAs are refused on this engine; None when they are served.
        self.lora_refusal = self._lora_refusal()
        if self.options.compile and self.lora_refusal is None:  # the slot goes in before fp8, offload and compile
            self.adapters: AdapterPool = CompiledLoraSlot(self.pipe, self.options.lora_adapters, self.plan.policy,
                                                          self.options.lora_slot_rank)
            self.adapters.install()
        else:
            self.adapters = AdapterPool(self.pipe, self.options.lora_adapters, self.plan.policy)
        if self.options.fp8_storage:
            from vace_local.engine.fastpath import enable_fp8_storage

            for t in self._transformers():
                enable_fp8_storage(t, self.compute_dtype)
        self._base_scheduler_config = dict(self.pipe.scheduler.config)
        self.policy: Policy = self.plan.policy
        # Our denoiser hook goes on before the memory policy's: accelerate's model offload restores, after every
        # pipeline call, the forward it wrapped first, so a hook added after it would be dropped from job 2 on.
        self.fast = DenoiserForward()
        for t in self._transformers():
            self.fast.install(t)
        apply_policy(self.pipe, self.policy, self.device)
        tiling = self.options.vae_tiling
        self.vae_tiling = wants_vae_tiling(self.policy, self.plan.free_vram) if tiling is None else tiling
        if self.vae_tiling:
            self.pipe.vae.enable_tiling()
        self._setup_fast_path()
        log.info("loaded %s from %s on %s (%s, offload=%s, vae_tiling=%s); memory plan: %s", model,
                 self.resolved.path, self.device, self.compute_dtype, self.policy, self.vae_tiling, self.plan.reason)

    @classmethod
    def from_pipeline(cls, pipeline: Any, name: str, options: EngineOptions | None = None) -> Engine:
        """An engine around an already built `WanVACEPipeline` (weights on the CPU, or on `options.device`)."""
        return cls(name, options, pipeline=pipeline)

    # -- setup helpers -------------------------------------------------------------------------------
    def _transformers(self) -> list[Any]:
        return [t for t in (self.pipe.transformer, getattr(self.pipe, "transformer_2", None)) if t is not None]

    def _setup_fast_path(self) -> None:
        """Per-model speed options, after the memory policy placed the weights (see fastpath.py)."""
        from vace_local.engine import fastpath

        models = self._transformers()
        if self.options.fp8_linear:
            for t in models:
                fastpath.enable_fp8_linear(t)
        self.attention = fastpath.select_attention_backend(models, self.options.attention, self.device,
                                                           self.compute_dtype)
        if self.options.compile:
            for t in models:
                fastpath.compile_blocks(t, self.options.compile_backend)

    def add_loras(self, loras: Any) -> None:
        """Fuse LoRAs (`LoraOption`s, or `(state_dict, scale)` pairs) into the weights; record overrides.

        Call before anything else touches the weights (the engine does this for `options.loras`).
        """
        from vace_local.engine.lora import fuse_loras, lora_path, read_lora_file

        items = []
        for i, lora in enumerate(loras):
            if isinstance(lora, LoraOption):
                items.append((read_lora_file(lora.source), lora.scale, lora.experts, str(lora_path(lora.source))))
                self.lora_overrides.update(lora.overrides())
            else:
                state, scale = lora
                items.append((state, float(scale), "both", f"<state dict {i}>"))
        fuse_loras(self.pipe, items)

    def _lora_refusal(self) -> str | None:
        """Why this engine cannot serve per-request LoRAs (`JobSpec.loras`), in words for the job's error and
        `describe()`; None when it can."""
        o = self.options
        if o.fp8_storage or o.fp8_linear:
            return ("per-request LoRAs are not available with --fp8: the fp8 paths cast or quantise the transformer "
                    "weights at load and adapter layers added per job are not covered by them; fuse LoRAs at start "
                    "with --lora (fused before the fp8 cast)")
        if o.compile and o.lora_slot_rank <= 0:
            return ("per-request LoRAs are not available with --compile when the LoRA slot is off (lora_slot_rank "
                    "0): adding, switching or rescaling an adapter would recompile the blocks (6-30 s per change "
                    "measured on the tiny model on CPU); fuse LoRAs at start with --lora")
        if o.compile and self.plan.policy not in ("none", "model"):
            return (f"per-request LoRAs are not available with --compile under offload '{self.plan.policy}': the "
                    "LoRA slot is written in place, which offload 'none' or 'model' allows; fuse LoRAs at start "
                    "with --lora")
        return None

    def _pick_device(self) -> str:
        import torch

        if self.options.device != "auto":
            return self.options.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _plan(self, size: ModelSize, prebuilt: Any = None) -> MemoryPlan:
        """dtype and memory policy before any weight is loaded (see memory.plan_memory); warns when an explicit
        choice does not fit, raises InsufficientMemory when `auto` finds nothing that fits."""
        free_ram = self.options.host_ram if self.options.host_ram is not None else host_free_ram()
        free_vram = self._free_vram()
        if prebuilt is not None:  # its weights already take memory where they are: count them as available to it
            held = {"cpu": 0, "cuda": 0}
            for m in prebuilt.components.values():
                for p in m.parameters() if hasattr(m, "parameters") else ():
                    held[p.device.type] = held.get(p.device.type, 0) + p.numel() * p.element_size()
            free_ram += held["cpu"]
            free_vram = None if free_vram is None else free_vram + held["cuda"]
        plan = plan_memory(size, device=self.device, free_vram=free_vram, free_ram=free_ram,
                           dtype=self.options.dtype, offload=self.options.offload, aux=self.options.aux_bytes,
                           fp8_storage=self.options.fp8_storage)
        if not plan.fits:
            log.warning("memory plan: %s", plan.reason)
        return plan

    def _free_vram(self) -> int | None:
        import torch

        if not self.device.startswith("cuda"):
            return None
        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        return int(free)

    def footprint(self) -> Footprint:
        """Bytes per component from the loaded modules: each parameter at its storage dtype's size (fp8 storage
        counts 1 byte per weight, the layers it skips their compute dtype)."""

        def size(module: Any) -> int:
            if module is None:
                return 0
            return sum(p.numel() * p.element_size() for p in module.parameters())

        p = self.pipe
        experts = 2 if getattr(p, "transformer_2", None) is not None and p.transformer is not None else 1
        main = p.transformer if p.transformer is not None else p.transformer_2
        return Footprint(size(main), size(p.text_encoder), size(p.vae), experts, self.options.aux_bytes)

    # -- introspection -------------------------------------------------------------------------------
    @property
    def last_run(self) -> dict[str, Any]:
        """`SamplingStats.as_dict()` of the latest run (also a cancelled one), for benchmarks and tests; the run
        path takes the stats from `sample`'s return value."""
        return self._last_stats.as_dict() if self._last_stats else {}

    @property
    def is_tiny(self) -> bool:
        return self.resolved.is_tiny

    @property
    def two_experts(self) -> bool:
        return self.pipe.config.boundary_ratio is not None

    @property
    def vace_layers(self) -> list[int]:
        t = self.pipe.transformer if self.pipe.transformer is not None else self.pipe.transformer_2
        return list(t.config.vace_layers)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.model_name,
            "path": str(self.resolved.path),
            "kind": self.resolved.kind,
            #: "original": an original-format checkpoint converted at load (vace_local.engine.checkpoints).
            "format": "original" if self.resolved.original is not None else "diffusers",
            "tiny": self.is_tiny,
            "device": self.device,
            "dtype": str(self.compute_dtype).removeprefix("torch."),
            "offload": self.policy,
            "memory_plan": self.plan.as_dict(),
            "vae_tiling": self.vae_tiling,
            "two_experts": self.two_experts,
            "boundary_ratio": self.pipe.config.boundary_ratio,
            "loaded_at": self.loaded_at,
            "lora_adapters": {"loaded": self.adapters.loaded, "loads": self.adapters.loads,
                              "capacity": self.adapters.capacity, **self._lora_mode()},
            "fast_path": {
                "attention": self.attention.as_dict(),
                "text_cache": self.options.text_cache,
                "cfg_batch": self.options.cfg_batch,
                "compile": self.options.compile_backend if self.options.compile else False,
                "fp8_storage": self.options.fp8_storage,
                "fp8_linear": self.options.fp8_linear,
                "loras": [{"source": x.source, "scale": x.scale, "experts": x.experts, **x.overrides()}
                          for x in self.options.loras],
                "lora_overrides": dict(self.lora_overrides),
            },
        }

    def _lora_mode(self) -> dict[str, Any]:
        """How per-request LoRAs are served: "adapters" (PEFT adapters switched per job), "compiled-slot"
        (written into a fixed slot of `slot_rank`, no recompile) or "refused" with the reason."""
        from vace_local.engine.lora import CompiledLoraSlot

        if self.lora_refusal:
            return {"mode": "refused", "refused": self.lora_refusal}
        if isinstance(self.adapters, CompiledLoraSlot):
            return {"mode": "compiled-slot", "slot_rank": self.adapters.rank}
        return {"mode": "adapters"}

    # -- one job -------------------------------------------------------------------------------------
    @staticmethod
    def step_cache_threshold(spec: JobSpec) -> float:
        """The job's step-cache threshold: explicit value, else the `acceleration` preset."""
        if spec.step_cache_threshold is not None:
            return spec.step_cache_threshold
        return ACCELERATION_THRESHOLDS[spec.acceleration]

    def _encode(self, prompt: str, negative: str, cfg: bool) -> tuple[Any, Any]:
        """Prompt embeddings through a small LRU cache; identical tensors to what the pipeline computes."""
        return self._embed(prompt), (self._embed(negative) if cfg else None)

    def _embed(self, text: str) -> Any:
        import torch

        cached = self._text_cache.get(text)
        if cached is not None:
            self._text_cache.move_to_end(text)
            return cached
        with torch.no_grad():  # the pipeline's own mode (grad-enabled T5 differs in the last bit)
            emb, _ = self.pipe.encode_prompt(prompt=text, negative_prompt=None, do_classifier_free_guidance=False,
                                             max_sequence_length=512, device=self.pipe._execution_device)
        if self.options.text_cache > 0:
            self._text_cache[text] = emb
            while len(self._text_cache) > self.options.text_cache:
                self._text_cache.popitem(last=False)
        return emb

    def effective_spec(self, spec: JobSpec) -> JobSpec:
        """The spec as it will run: a distillation LoRA imposes its own steps / guidance / shift — a fused one
        on every job, one in `spec.loras` on this job only (it wins over a fused one)."""
        update = dict(self.lora_overrides)
        for lora in spec.loras:
            update.update(lora.overrides())
        return spec.model_copy(update=update) if update else spec

    def _job_loras(self, spec: JobSpec) -> list[Any]:
        """`spec.loras` as local files for the adapter pool; refused where adapters cannot run."""
        from vace_local.engine.lora import JobLora, lora_path

        if spec.loras and self.lora_refusal:
            raise InputError("loras", self.lora_refusal)
        out = []
        for i, lora in enumerate(spec.loras):
            try:
                path = lora_path(lora.path)
            except (FileNotFoundError, ValueError) as exc:
                raise InputError(f"loras[{i}].path", str(exc)) from None
            out.append(JobLora(path, lora.scale, lora.transformer, f"loras[{i}].path"))
        return out

    def load_job_loras(self, spec: JobSpec) -> list[dict[str, Any]]:
        """Load (or reuse) the job's LoRA adapters and activate them; a bad one raises InputError naming its field.
        `sample` does this itself; a parallel group's rank 0 calls it first, so a bad LoRA fails before the job
        reaches the other ranks."""
        return self.adapters.activate(self._job_loras(spec))

    def _conditioning_scale(self, spec: JobSpec) -> float | list[float]:
        scale = spec.context_scale
        if isinstance(scale, list) and len(scale) != len(self.vace_layers):
            raise InputError(
                "context_scale",
                f"this model has {len(self.vace_layers)} VACE layers; give one value or exactly "
                f"{len(self.vace_layers)} values, got {len(scale)}",
            )
        return scale

    def check_job(self, spec: JobSpec, bundle: ControlBundle) -> float | list[float]:
        """Refuse a job this model cannot run (before any work); returns the VACE conditioning scale."""
        bundle.check(spec.num_frames, spec.height, spec.width)
        if spec.guidance_scale_2 is not None and not self.two_experts:
            raise InputError("guidance_scale_2", f"model '{self.model_name}' has a single expert")
        return self._conditioning_scale(spec)

    def generate(
        self,
        spec: JobSpec,
        bundle: ControlBundle,
        *,
        seed: int,
        on_progress: ProgressFn = no_progress,
        should_cancel: CancelFn = never_cancel,
    ) -> np.ndarray:
        """Run the denoising loop and decode; returns (F, H, W, 3) uint8 frames."""
        return self.sample(spec, bundle, seed=seed, on_progress=on_progress, should_cancel=should_cancel).uint8()

    def generate_float(
        self,
        spec: JobSpec,
        bundle: ControlBundle,
        *,
        seed: int,
        on_progress: ProgressFn = no_progress,
        should_cancel: CancelFn = never_cancel,
        decode: bool = True,
    ) -> np.ndarray | None:
        """`generate` before quantisation: (F, H, W, 3) float32 in [0, 1], or None with `decode=False`."""
        return self.sample(spec, bundle, seed=seed, on_progress=on_progress, should_cancel=should_cancel,
                           decode=decode).frames

    def sample(
        self,
        spec: JobSpec,
        bundle: ControlBundle,
        *,
        seed: int,
        on_progress: ProgressFn = no_progress,
        should_cancel: CancelFn = never_cancel,
        decode: bool = True,
    ) -> Generation:
        """Run the denoising loop and decode: float frames plus what the run did. `decode=False` skips the VAE
        decode (the non-zero ranks of a parallel group, whose frames rank 0 already has)."""
        import torch
        from PIL import Image

        scale = self.check_job(spec, bundle)
        job_loras = self._job_loras(spec)
        spec = self.effective_spec(spec)
        before_call(self.pipe, self.policy, self.device)
        t_lora = time.perf_counter()
        used = self.adapters.activate(job_loras)
        t_lora = time.perf_counter() - t_lora
        self.pipe.scheduler = make_scheduler(spec.sampler, spec.flow_shift, self._base_scheduler_config)
        cfg = spec.guidance_scale > 1.0  # exactly the pipeline's rule (guidance_scale_2 does not count)
        t_text = time.perf_counter()
        prompt_embeds, negative_embeds = self._encode(spec.prompt, spec.effective_negative_prompt, cfg)
        t_text = time.perf_counter() - t_text

        # Exact-size 5-D tensors in [0, 1]: diffusers then does no resize of its own (pitfall 1).
        video = torch.from_numpy(bundle.frames).permute(0, 3, 1, 2).unsqueeze(0)
        mask = torch.from_numpy(bundle.masks).unsqueeze(1).expand(-1, 3, -1, -1).unsqueeze(0)
        refs = [Image.fromarray((r * 255.0 + 0.5).clip(0, 255).astype(np.uint8)) for r in bundle.reference_images]
        # diffusers prepends refs one by one, which reverses them; reverse so the model sees the user's order.
        refs_arg = list(reversed(refs)) or None

        total = spec.num_inference_steps

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            on_progress(Progress("generate", i + 1, total))
            if should_cancel():
                raise JobCancelled("job cancelled during denoising")
            return {}

        if decode:  # live previews of x0 (vace_local.engine.preview), when the run asked for them; refs are skipped
            attach_preview(self.pipe.scheduler, total, len(refs))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        threshold = self.step_cache_threshold(spec)
        self.fast.begin_job(total_steps=total, cache=StepCacheConfig(threshold=threshold),
                            negative=negative_embeds if cfg else None, cfg_batch=self.options.cfg_batch,
                            pair_forward=self.pair_forward)
        with _GLOBAL_RNG_LOCK:
            torch.manual_seed(seed)  # stochastic schedulers draw from the global RNG (pitfall 4)
            try:
                out = self.pipe(
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_embeds if cfg else None,
                    video=video,
                    mask=mask,
                    reference_images=refs_arg,
                    conditioning_scale=scale,
                    height=spec.height,
                    width=spec.width,
                    num_frames=spec.num_frames,
                    num_inference_steps=total,
                    guidance_scale=spec.guidance_scale,
                    guidance_scale_2=spec.guidance_scale_2 if self.two_experts else None,
                    generator=generator,
                    output_type="np" if decode else "latent",
                    callback_on_step_end=on_step,
                )
                self.fast.check_ran(total)
            except torch.OutOfMemoryError as exc:
                raise OutOfMemory(
                    f"GPU out of memory at {spec.width}x{spec.height}x{spec.num_frames} "
                    f"(offload={self.policy}); try a lower offload level such as --offload group"
                ) from exc
            finally:
                stats = SamplingStats(total, spec.guidance_scale, spec.flow_shift, threshold, t_text,
                                      self.fast.end_job(), tuple(used), t_lora)
                self._last_stats = stats
                self.pipe.maybe_free_model_hooks()  # also after a cancel: offload hooks back to the CPU
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        return Generation(np.asarray(out.frames[0], dtype=np.float32) if decode else None, stats)


TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_GLOBAL_RNG_LOCK = threading.Lock()
_ENGINE_LOCK = threading.Lock()
_ENGINE: Engine | None = None


def get_engine(model: str, options: EngineOptions | None = None) -> Engine:
    """The process's engine for `model`, loaded once and reused; switching models frees the old one."""
    global _ENGINE
    options = options or EngineOptions()
    with _ENGINE_LOCK:
        if _ENGINE is not None and _ENGINE.model_name == model and _ENGINE.options == options:
            return _ENGINE
        _ENGINE = None  # drop the old pipeline before loading the next
        _ENGINE = Engine(model, options)
        return _ENGINE
