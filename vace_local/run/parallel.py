"""One job on several ranks: CFG-parallel × Ulysses sequence-parallel, through torch.distributed.

Layout: `world = cfg × ulysses`, rank = cfg_index · ulysses + ulysses_index. Every rank holds the whole
pipeline and runs the same denoising loop on the same latents; only the transformer forward is split:

* **CFG parallel** (`cfg=2`): the cond branch runs on cfg-index 0, the uncond branch on cfg-index 1, and one
  all-gather over the CFG group gives every rank both predictions, so the scheduler step (and the step cache's
  decisions) stay bit-identical on all ranks. It plugs into `DenoiserForward` as its `pair_forward`.
* **Ulysses** (`ulysses>1`): diffusers' own context-parallel machinery — `ContextParallelConfig`, its split /
  gather hooks and its Ulysses all-to-all attention — with a plan for `WanVACETransformer3DModel`, which
  diffusers does not ship (`VACE_CP_PLAN`). No all-to-all is written here.

Text encoding and VAE encode run on every rank (deterministic, so identical; it avoids shipping tensors);
the VAE decode runs on rank 0 only. Rank 0 owns the job: it publishes (spec, bundle, seed) to the others,
decides cancel once per step and broadcasts the decision, so every rank leaves the loop at the same step.
A rank that fails outside a coordinated cancel exits, which breaks the group on purpose: its peers'
collectives then fail quickly (gloo) or time out (NCCL) instead of waiting for a message that never comes.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from vace_local.core.bundle import ControlBundle
from vace_local.core.errors import InputError, JobCancelled
from vace_local.core.events import CancelFn, ProgressFn, never_cancel, no_progress
from vace_local.core.spec import JobSpec

if TYPE_CHECKING:
    from vace_local.engine.engine import Generation

log = logging.getLogger(__name__)

#: Exit code of a follower rank that failed mid-job (its group must be restarted).
EXIT_RANK_FAILED = 5
_JOB_KEY = "vace/job/{}"


@dataclass(frozen=True)
class Layout:
    """How a group's ranks split one job."""

    cfg: int = 1  # 1 or 2: CFG branches on different ranks
    ulysses: int = 1  # sequence shards per CFG branch

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg parallel degree must be 1 or 2, got {self.cfg}")
        if self.ulysses < 1:
            raise ValueError(f"ulysses degree must be >= 1, got {self.ulysses}")

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses

    @classmethod
    def for_ranks(cls, ranks: int, cfg: bool = True) -> Layout:
        """Default split of `ranks`: CFG first (the most reliable speed-up), the rest Ulysses."""
        if ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        c = 2 if cfg and ranks % 2 == 0 else 1
        return cls(cfg=c, ulysses=ranks // c)

    def coords(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.ulysses)

    def as_dict(self) -> dict[str, int]:
        return {"world": self.world, "cfg": self.cfg, "ulysses": self.ulysses}


def vace_cp_plan() -> dict[str, Any]:
    """Context-parallel plan for `WanVACETransformer3DModel` (diffusers ships one only for the plain Wan model).

    Same as diffusers' Wan plan (both RoPE outputs and `blocks.0`'s input split on the token axis, `proj_out`'s
    output gathered), plus VACE block 0's two inputs split the same way. Every VACE block then works on the
    rank's token shard, so each hint it returns lines up with the shard of hidden states it is added to after
    main block i. The text (cross-attention keys) is never split: diffusers' Wan processor only passes the
    parallel config to self-attention.
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    tokens = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
    rope = ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)
    return {
        "rope": {0: rope, 1: rope},
        "vace_blocks.0": {"hidden_states": tokens, "control_hidden_states": tokens},
        "blocks.0": {"hidden_states": tokens},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RankContext:
    """This process's place in its group (after `init_rank`)."""

    rank: int
    layout: Layout
    device: str
    store: Any
    mesh: Any
    cfg_group: Any

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def init_rank(rank: int, layout: Layout, port: int, *, device: str = "cpu", addr: str = "127.0.0.1",
              timeout_s: float = 120.0) -> RankContext:
    """Join the group: one TCP store (rank 0 hosts it) and a process group over it, plus the device mesh.

    On CUDA CPU tensors (job hand-off, cancel flags) go over gloo and CUDA tensors over NCCL.
    `timeout_s` bounds every collective, so a peer that hangs fails the job instead of blocking forever.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(addr, port, layout.world, is_master=rank == 0, timeout=timeout)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", store=store, rank=rank,
                            world_size=layout.world, timeout=timeout)
    mesh = init_device_mesh("cuda" if cuda else "cpu", (layout.cfg, 1, layout.ulysses),
                            mesh_dim_names=("cfg", "ring", "ulysses"))
    return RankContext(rank, layout, device, store, mesh, mesh["cfg"].get_group())


def close_rank() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# -- the two kinds of parallelism -----------------------------------------------------------------------
def _cp_capable(name: str) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name))


def enable_ulysses(engine: Any, ctx: RankContext) -> None:
    """Shard every transformer (expert) of `engine` over the Ulysses ranks with `VACE_CP_PLAN`.

    On CUDA this is diffusers' `enable_parallelism(config, cp_plan)`. On CPU (gloo tests) the same three steps
    are done here, because `enable_parallelism` derives the rank's device from `torch.accelerator`, which
    has no CPU devices; everything else (config, hooks, attention) is diffusers'.
    """
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    from vace_local.engine import fastpath

    models = engine._transformers()
    heads = int(models[0].config.num_attention_heads)
    if heads % ctx.layout.ulysses:
        raise ValueError(f"ulysses degree {ctx.layout.ulysses} must divide the model's {heads} attention heads")
    if not _cp_capable(engine.attention.name):  # e.g. FA3 (non-hub): pick the best CP-capable kernel instead
        order = fastpath.CUDA_AUTO_ORDER if ctx.device.startswith("cuda") else fastpath.CPU_AUTO_ORDER
        name = next(n for n in (*order, "native") if _cp_capable(n))
        engine.attention = fastpath.select_attention_backend(models, name, ctx.device, engine.compute_dtype)
    plan = vace_cp_plan()
    for model in models:
        cp = ContextParallelConfig(ulysses_degree=ctx.layout.ulysses, mesh=ctx.mesh)
        if ctx.device.startswith("cuda"):
            model.enable_parallelism(config=cp, cp_plan=plan)
            continue
        import torch

        config = ParallelConfig(context_parallel_config=cp)
        config.setup(ctx.rank, ctx.world, torch.device(ctx.device), mesh=ctx.mesh)
        model._parallel_config = config
        for module in fastpath.attention_modules(model):
            if hasattr(module.processor, "_parallel_config"):
                module.processor._parallel_config = config
        apply_context_parallel(model, cp, plan)
    engine.adapters.layer_guards.append(lambda models: replanned(models, plan))


@contextmanager
def replanned(models: list[Any], plan: dict[str, Any]) -> Iterator[None]:
    """Around adding LoRA adapter layers: the context-parallel hooks come off and go back on by module name, so a
    planned module that PEFT wraps (`proj_out`, which a LoRA on the head targets) is gathered after its adapter's
    delta is added, not before (the delta, computed on the rank's token shard, would not line up: measured
    `RuntimeError: The size of tensor a (24) must match the size of tensor b (12)`)."""
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

    for model in models:
        remove_context_parallel(model, plan)
    try:
        yield
    finally:
        for model in models:
            apply_context_parallel(model, model._parallel_config.context_parallel_config, plan)


def cfg_pair_forward(ctx: RankContext) -> Any:
    """`DenoiserForward` pair forward: this rank's CFG branch, then an all-gather of both predictions."""
    import torch
    import torch.distributed as dist

    branch = ctx.layout.coords(ctx.rank)[0]

    def pair(fwd: Any, kwargs: dict[str, Any], negative: Any) -> tuple[Any, Any]:
        kw = dict(kwargs)
        if branch == 1:
            pos = kw["encoder_hidden_states"]
            kw["encoder_hidden_states"] = negative.to(device=pos.device, dtype=pos.dtype)
        out = fwd(**kw)
        pred = (out[0] if isinstance(out, tuple) else out.sample).contiguous()
        both = [torch.empty_like(pred) for _ in range(ctx.layout.cfg)]
        dist.all_gather(both, pred, group=ctx.cfg_group)
        return both[0], both[1]

    return pair


# -- one job on the whole group -------------------------------------------------------------------------
class GroupEngine:
    """An `Engine` whose `generate` runs on every rank of the group; drop-in for `run_job` on rank 0.

    Followers sit in `serve()`. Attributes it does not define (is_tiny, effective_spec, model_name, ...)
    are the local engine's.
    """

    def __init__(self, engine: Any, ctx: RankContext) -> None:
        self.engine = engine
        self.ctx = ctx
        self.jobs = 0
        #: Why this group can no longer run jobs (a rank failed mid-job); None while healthy.
        self.broken: str | None = None
        if ctx.layout.ulysses > 1:
            enable_ulysses(engine, ctx)
        if ctx.layout.cfg > 1:
            engine.pair_forward = cfg_pair_forward(ctx)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def describe(self) -> dict[str, Any]:
        d = self.engine.describe()
        d["parallel"] = {**self.ctx.layout.as_dict(), "backend": "nccl" if self.ctx.device.startswith("cuda")
                         else "gloo"}
        return d

    def check_job(self, spec: JobSpec, bundle: ControlBundle) -> Any:
        scale = self.engine.check_job(spec, bundle)
        u = self.ctx.layout.ulysses
        if u > 1:
            from vace_local.core.spec import latent_tokens

            tokens = latent_tokens(spec.width, spec.height, spec.num_frames, num_refs=len(bundle.reference_images))
            per_frame = latent_tokens(spec.width, spec.height, 1)
            if tokens % u:
                raise InputError("width", f"{spec.width}x{spec.height} gives {per_frame} tokens per latent frame "
                                          f"({tokens} in all), which {u} sequence-parallel ranks cannot split "
                                          "evenly; choose a size whose token count is a multiple of "
                                          f"{u}")
        return scale

    def _collective_cancel(self, should_cancel: CancelFn) -> CancelFn:
        """Rank 0 asks `should_cancel` once per step and every rank gets the same answer."""
        import torch
        import torch.distributed as dist

        def check() -> bool:
            flag = torch.tensor([1 if self.ctx.is_leader and should_cancel() else 0], dtype=torch.int32)
            dist.broadcast(flag, src=0)
            return bool(flag.item())

        return check

    def _run(self, spec: JobSpec, bundle: ControlBundle, seed: int, on_progress: ProgressFn,
             should_cancel: CancelFn) -> Generation:
        try:
            return self.engine.sample(spec, bundle, seed=seed, on_progress=on_progress,
                                      should_cancel=self._collective_cancel(should_cancel), decode=self.ctx.is_leader)
        except JobCancelled:
            raise  # every rank raised it at the same step: the group is still in step
        except BaseException as exc:
            self.broken = f"rank {self.ctx.rank} failed mid-job: {type(exc).__name__}: {exc}"[:500]
            raise

    def sample(self, spec: JobSpec, bundle: ControlBundle, *, seed: int, on_progress: ProgressFn = no_progress,
               should_cancel: CancelFn = never_cancel, decode: bool = True) -> Generation:
        """Rank 0: check the job, hand it to every rank, run it together; returns rank 0's frames and stats."""
        import torch
        import torch.distributed as dist

        if not self.ctx.is_leader:
            raise RuntimeError("only rank 0 starts jobs; followers run serve()")
        if self.broken:
            raise RuntimeError(f"parallel group is broken ({self.broken}); restart it")
        self.check_job(spec, bundle)
        # A LoRA that cannot be found or mapped fails here, on rank 0 alone: every rank runs the same loader on
        # the same local file (the worker resolved it), so once it loads here the others load it too.
        self.engine.load_job_loras(spec)
        if should_cancel():
            raise JobCancelled("job cancelled before denoising")
        self.ctx.store.set(_JOB_KEY.format(self.jobs), b"job")
        self.jobs += 1
        payload = [pickle.dumps((spec.model_dump_json(), bundle, seed))]
        dist.broadcast_object_list(payload, src=0, device=torch.device("cpu"))  # gloo, also beside NCCL
        return self._run(spec, bundle, seed, on_progress, should_cancel)

    def generate_float(self, spec: JobSpec, bundle: ControlBundle, *, seed: int,
                       on_progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel,
                       decode: bool = True) -> np.ndarray | None:
        return self.sample(spec, bundle, seed=seed, on_progress=on_progress, should_cancel=should_cancel).frames

    def generate(self, spec: JobSpec, bundle: ControlBundle, *, seed: int, on_progress: ProgressFn = no_progress,
                 should_cancel: CancelFn = never_cancel) -> np.ndarray:
        return self.sample(spec, bundle, seed=seed, on_progress=on_progress, should_cancel=should_cancel).uint8()

    def stop_followers(self) -> None:
        if self.ctx.is_leader and not self.broken:
            self.ctx.store.set(_JOB_KEY.format(self.jobs), b"stop")

    def serve(self, parent_alive: Any = None) -> None:
        """Follower loop: wait for rank 0's next job (polling the store, so idling never hits a collective
        timeout), run it, repeat until told to stop. A failure mid-job exits the process (see module doc)."""
        import torch
        import torch.distributed as dist

        while True:
            key = _JOB_KEY.format(self.jobs)
            while not self.ctx.store.check([key]):
                if parent_alive is not None and not parent_alive():
                    log.error("rank %d: leader is gone; exiting", self.ctx.rank)
                    os._exit(1)
                time.sleep(0.05)
            self.jobs += 1
            if self.ctx.store.get(key) == b"stop":
                return
            payload: list[Any] = [None]
            dist.broadcast_object_list(payload, src=0, device=torch.device("cpu"))
            spec_json, bundle, seed = pickle.loads(payload[0])
            try:
                self._run(JobSpec.model_validate_json(spec_json), bundle, seed, no_progress, never_cancel)
            except JobCancelled:
                continue
            except BaseException:  # noqa: BLE001
                log.exception("rank %d failed mid-job; leaving the group", self.ctx.rank)
                os._exit(EXIT_RANK_FAILED)


# -- launching a group ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankArgs:
    rank: int
    layout: Layout
    port: int
    model: str
    options: Any  # EngineOptions (device filled in per rank)
    devices: tuple[str, ...]  # one per rank
    leader_pid: int
    timeout_s: float = 120.0
    #: `("package.module:function", arg)`: every rank builds its pipeline with `function(arg, device, torch dtype)`
    #: (same seed on every rank) instead of loading `model` — how the benchmark runs published architectures with
    #: random weights without the product importing benchmark code.
    pipeline_factory: tuple[str, str] | None = None


def _load(args: RankArgs) -> GroupEngine:
    from dataclasses import replace

    from vace_local.engine.engine import Engine

    device = args.devices[args.rank]
    ctx = init_rank(args.rank, args.layout, args.port, device=device, timeout_s=args.timeout_s)
    options = replace(args.options, device=device)
    if args.pipeline_factory:
        import importlib

        import torch

        target, arg = args.pipeline_factory
        module, _, function = target.partition(":")
        build = getattr(importlib.import_module(module), function)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(options.dtype)
        engine = Engine.from_pipeline(build(arg, device, dtype), args.model, options)
    else:
        engine = Engine(args.model, options)
    return GroupEngine(engine, ctx)


def follower_main(args: RankArgs) -> None:
    """Entry point of ranks 1..n-1 (multiprocessing 'spawn')."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{args.rank} %(levelname)s %(message)s")
    if not args.devices[args.rank].startswith("cuda"):
        import torch

        torch.set_num_threads(1)  # CPU test groups: n ranks share the cores
    group = _load(args)

    def leader_alive() -> bool:
        return os.getppid() == args.leader_pid

    group.serve(leader_alive)
    close_rank()


class Group:
    """Rank 0 in this process, ranks 1..n-1 as child processes; `engine` runs jobs on all of them."""

    def __init__(self, model: str, options: Any, layout: Layout, devices: list[str] | None = None, *,
                 timeout_s: float = 120.0, pipeline_factory: tuple[str, str] | None = None) -> None:
        import multiprocessing as mp

        self.layout = layout
        devices = devices or ["cpu"] * layout.world
        if len(devices) != layout.world:
            raise ValueError(f"{layout.world} ranks need {layout.world} devices, got {len(devices)}")
        port = free_port()
        base = RankArgs(0, layout, port, model, options, tuple(devices), os.getpid(), timeout_s, pipeline_factory)
        ctx = mp.get_context("spawn")
        self.procs = []
        for r in range(1, layout.world):
            p = ctx.Process(target=follower_main, args=(RankArgs(**{**base.__dict__, "rank": r}),),
                            name=f"vace-rank-{r}", daemon=True)
            p.start()
            self.procs.append(p)
        self.engine = _load(base)

    @classmethod
    def for_worker(cls, model: str, options: Any, ranks: int, *, cfg: bool = True) -> Group:
        """The server worker's group: `ranks` CUDA devices (all visible to this process) or gloo CPU ranks."""
        devices = [f"cuda:{i}" for i in range(ranks)] if options.device.startswith("cuda") else ["cpu"] * ranks
        return cls(model, options, Layout.for_ranks(ranks, cfg=cfg), devices)

    def wait_dead_rank(self, timeout: float) -> str | None:
        """`dead_rank()`, waiting up to `timeout` s for it (a peer's socket error can come before its exit)."""
        deadline = time.monotonic() + timeout
        while (reason := self.dead_rank()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return reason

    def dead_rank(self) -> str | None:
        """'rank k exited (...)' for the first follower that is gone, else None."""
        for r, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                return f"rank {r} exited (exit code {p.exitcode})"
        return None

    def close(self, timeout: float = 10.0) -> None:
        self.engine.stop_followers()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        close_rank()
