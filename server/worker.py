"""Worker process: loads the model once, claims jobs from the store and runs them through `run_job`.

This is the only server module that imports torch (through the engine). One worker per GPU (its
`CUDA_VISIBLE_DEVICES` is set before torch loads) or one on the CPU. It heart-beats from a thread (so a
long denoising step never looks like a hang), reports progress per step, honours cancel between steps, and
exits if its parent (the API process) dies, so a SIGKILLed server leaves no orphan running jobs behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server import media_refs
from server.errors import map_exception, user_field
from server.settings import Settings
from server.states import JobStatus, WorkerExit, WorkerStatus
from server.storage import key_of_path, make_storage
from server.store import JobRecord, Store
from vace_local.core.config import export
from vace_local.core.errors import InputError, JobCancelled
from vace_local.core.events import Progress
from vace_local.core.inputs import Fetcher, MediaRef, walk_inputs
from vace_local.core.spec import JobInputs, JobSpec

log = logging.getLogger("vace.worker")

#: Fraction of overall progress at the start of each stage; `generate` spans the steps.
_STAGE_START = {"load": 0.0, "fetch": 0.02, "preprocess": 0.05, "generate": 0.1, "encode": 0.95, "done": 1.0}


@dataclass
class WorkerArgs:
    slot: int
    worker_id: str
    gpu: str | None
    settings_json: str
    parent_pid: int


class Worker:
    def __init__(self, args: WorkerArgs, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.id = args.worker_id
        self.store = Store(settings.db_url)
        self.data_dir = settings.data_dir.resolve()
        self.storage = make_storage(settings)
        self.current: JobRecord | None = None
        self.shutdown = threading.Event()
        self.engine: Any = None
        self.group: Any = None  # vace_local.run.parallel.Group when gpus_per_job > 1 (this process is rank 0)
        self._group_lock = threading.Lock()
        self._last_cancel_check = 0.0
        self._cancel_cached = False

    # -- lifecycle --

    def _watch_parent(self) -> None:
        while True:
            if os.getppid() != self.args.parent_pid:
                log.error("API process %d is gone; worker exiting", self.args.parent_pid)
                os._exit(1)
            time.sleep(0.5)

    def _heartbeat(self) -> None:
        while not self.shutdown.is_set():
            try:
                job = self.current
                self.store.worker_heartbeat(self.id, job.id if job else None, self._gpu_info(),
                                            lease_s=self.settings.heartbeat_timeout_s)
            except Exception:  # noqa: BLE001 - a missed heartbeat is not fatal
                log.exception("heartbeat failed")
            self.shutdown.wait(min(2.0, self.settings.heartbeat_timeout_s / 3))

    def _gpu_info(self) -> dict[str, Any]:
        if self.args.gpu is None or "torch" not in sys.modules:
            return {}
        import torch

        if not torch.cuda.is_available():
            return {}
        free, total = torch.cuda.mem_get_info()
        return {"gpu_memory_allocated": torch.cuda.memory_allocated(),
                "gpu_memory_reserved": torch.cuda.memory_reserved(), "gpu_memory_total": total,
                "gpu_memory_free": free}

    def load(self) -> None:
        from vace_local.engine.engine import get_engine

        if self.args.gpu is None:
            # A CPU worker uses every core (a tiny job at the hosted sizes is minutes of CPU work) but runs
            # niced, so the scheduler gives the API process the CPU whenever a request arrives.
            import torch

            torch.set_num_threads(max(1, os.cpu_count() or 1))
            os.nice(10)

        self.store.upsert_worker(self.id, pid=os.getpid(), status=WorkerStatus.LOADING,
                                 message=f"loading {self.settings.model}")
        device = "cuda" if self.args.gpu is not None else "cpu"
        if self.settings.gpus_per_job > 1:
            from vace_local.run.parallel import Group

            self.group = Group.for_worker(self.settings.model, self.settings.engine_options(device),
                                          self.settings.gpus_per_job, cfg=self.settings.cfg_parallel)
            self.engine = self.group.engine
            threading.Thread(target=self._watch_group, daemon=True, name="group-watch").start()
        else:
            self.engine = get_engine(self.settings.model, self.settings.engine_options(device))
        desc = self.engine.describe()
        msg = "tiny random-weight model loaded (outputs are noise)" if self.engine.is_tiny else "model loaded"
        self.store.upsert_worker(self.id, status=WorkerStatus.READY, message=msg,
                                 info={"engine": desc, **self._gpu_info()})
        log.info("worker %s ready: %s", self.id, desc)

    def _watch_group(self) -> None:
        while not self.shutdown.is_set():
            reason = self.group.dead_rank()
            if reason:
                self._group_failed(reason)
            time.sleep(0.25)

    def _group_failed(self, reason: str) -> None:
        """A rank is gone or out of step: fail the running job with the reason, exit so the group restarts."""
        with self._group_lock:  # the watcher and the job thread may both get here; the first one exits
            msg = f"the parallel group failed: {reason}"
            job = self.current
            if job is not None:
                self.store.finish_job(job.id, self.id, status=JobStatus.FAILED, error=msg, error_type="internal_error")
                self.store.add_log(job.id, f"{JobStatus.FAILED}: {msg}", level="error", source="worker")
            self.store.upsert_worker(self.id, status=WorkerStatus.DEAD, message=msg)
            log.error("%s; restarting the group", msg)
            os._exit(WorkerExit.GROUP_FAILED)

    def run_forever(self) -> None:
        idle = 0.05
        while not self.shutdown.is_set():
            job = self.store.claim_next(self.id, lease_s=self.settings.heartbeat_timeout_s)
            if job is None:
                self.shutdown.wait(idle)
                idle = min(idle * 1.5, 0.5)
                continue
            idle = 0.05
            self.run_one(job)

    # -- one job --

    def should_cancel(self) -> bool:
        if self.shutdown.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= 0.25 and self.current is not None:
            self._last_cancel_check = now
            self._cancel_cached = self.store.cancel_requested(self.current.id)
        return self._cancel_cached

    def _progress_fn(self, job: JobRecord):  # noqa: ANN202
        state = {"stage": None, "last": 0.0, "window": ""}

        def on_progress(p: Progress) -> None:
            if p.stage == "generate" and self._tiny_hold(job, p):
                return
            now = time.monotonic()
            window = p.message.split(",")[0].split(":")[0] if p.message.startswith("window ") else ""
            if window and window != state["window"]:  # a long job: one log line per window, "window 2/4"
                state["window"] = window
                self.store.add_log(job.id, f"generate: {p.message}", source="worker")
            stage_changed = p.stage != state["stage"]
            last_step = p.total and p.step >= p.total
            if not (stage_changed or last_step or now - state["last"] >= 0.25):
                return
            state["last"] = now
            if p.stage == "generate" and p.total:
                frac = 0.1 + 0.85 * p.fraction
            else:
                frac = _STAGE_START.get(p.stage, 0.0)
            self.store.set_progress(job.id, self.id, stage=p.stage, step=p.step, total=p.total, progress=frac)
            if stage_changed:
                state["stage"] = p.stage
                self.store.add_log(job.id, f"stage {p.stage}" + (f": {p.message}" if p.message else ""),
                                   source="worker")

        return on_progress

    def _tiny_hold(self, job: JobRecord, p: Progress, limit_s: float = 300.0) -> bool:
        """`VACE_TINY_HOLD_FILE` (tiny model only, for tests): while that file exists, denoising holds after the
        step written in it (empty: step 1), with the step recorded, until the job is cancelled or the file goes (at
        most `limit_s`), so a test lands a cancel, a kill or a look at a live preview mid-run for certain instead of
        racing the clock. False when not holding."""
        hold = self.settings.tiny_hold_file
        if hold is None or not self.settings.is_tiny:
            return False
        try:
            text = hold.read_text().strip()
        except OSError:  # no file: no hold
            return False
        if p.step != (int(text) if text.isdigit() else 1):
            return False
        self.store.set_progress(job.id, self.id, stage=p.stage, step=p.step, total=p.total,
                                progress=0.1 + 0.85 * p.fraction)
        self.store.add_log(job.id, f"holding after step {p.step} while {hold} exists (VACE_TINY_HOLD_FILE)",
                           source="worker")
        deadline = time.monotonic() + limit_s
        while hold.exists() and not self.should_cancel() and time.monotonic() < deadline:
            time.sleep(0.05)
        return True

    def resolve_inputs(self, spec: JobSpec, dest: Path, fields: dict[str, str]) -> JobSpec:
        """Every input becomes a checked local file (downloads follow the safety rules and stop within a
        fraction of a second of a cancel)."""
        dest.mkdir(parents=True, exist_ok=True)
        spec = self.resolve_loras(spec, fields)
        inputs = walk_inputs(spec.inputs, self.input_fetcher(dest, fields), JobInputs)
        return spec.model_copy(update={"inputs": inputs})

    def input_fetcher(self, dest: Path, fields: dict[str, str]) -> Fetcher[str]:
        """The worker's fetcher: a data URI decoded and sniffed, a URL downloaded under the network rules and
        sniffed, a path (what the API left: an upload or output) taken from this box's data dir or the shared
        storage and sniffed. Errors name the user's field."""
        s = self.settings

        def label(ref: MediaRef) -> str:
            if self.should_cancel():
                raise JobCancelled("cancelled while fetching inputs")
            return user_field(ref.label, fields)

        def data_uri(ref: MediaRef) -> str:
            name = label(ref)
            data = media_refs.decode_data_uri(ref.value, name, s.max_upload_bytes)
            ext = media_refs.check_content(data[:512], name, ref.kind)
            p = dest / f"{ref.stem}.{ext}"
            p.write_bytes(data)
            return str(p)

        def url(ref: MediaRef) -> str:
            name = label(ref)
            p = media_refs.download(ref.value, dest / f"{ref.stem}.download", name, allowed=s.allowed_hosts,
                                    max_bytes=s.max_download_bytes, timeout_s=s.download_timeout_s,
                                    should_cancel=self.should_cancel)
            ext = media_refs.check_file(p, name, ref.kind)
            final = p.with_suffix(f".{ext}")
            p.replace(final)
            return str(final)

        def path(ref: MediaRef) -> str:
            name = label(ref)
            p = Path(ref.value).resolve()
            if not p.is_relative_to(self.data_dir) or not p.is_file():
                # stored by another box (object storage): fetched into this box's data dir, else gone
                key = key_of_path(p) if self.storage.remote or p.is_relative_to(self.data_dir) else None
                fetched = self.storage.fetch(key) if key else None
                if fetched is None:
                    raise InputError(name, "file is not available on this server any more")
                p = fetched
            media_refs.check_file(p, name, ref.kind)
            return str(p)

        return Fetcher(data_uri=data_uri, url=url, path=path)

    def resolve_loras(self, spec: JobSpec, fields: dict[str, str]) -> JobSpec:
        """Each `loras[i].path` becomes a local file: from the LoRA folder, or downloaded (URL / Hugging Face)
        with the input rules (allowed hosts, size limit, deadline, cancel) into the size-bounded LoRA cache."""
        if not spec.loras:
            return spec
        from vace_local.core.lora_sources import LoraFiles

        s = self.settings

        def download(url: str, dest: Path, label: str) -> Path:
            return media_refs.download(url, dest, label, allowed=s.allowed_hosts, max_bytes=s.max_download_bytes,
                                       timeout_s=s.download_timeout_s, should_cancel=self.should_cancel)

        files = LoraFiles(self.data_dir / "cache" / "loras", download, lora_dir=s.lora_dir,
                          cache_bytes=s.lora_cache_bytes)
        loras = []
        for i, ref in enumerate(spec.loras):
            if self.should_cancel():
                raise JobCancelled("cancelled while fetching LoRAs")
            path = files.resolve(ref, user_field(f"loras[{i}].path", fields))
            loras.append(ref.model_copy(update={"path": str(path)}))
        return spec.model_copy(update={"loras": loras})

    def window_store(self, job: JobRecord):  # noqa: ANN201 - vace_local.run.long_video.DirWindowStore
        """A long job's finished windows, kept in the job's storage (`windows/<job>/`) so that a re-queued job
        resumes at its first unfinished window, on this box or another one."""
        from vace_local.run.long_video import DirWindowStore

        prefix = f"windows/{job.id}"
        return DirWindowStore(self.data_dir / prefix, fetch=lambda name: self.storage.fetch(f"{prefix}/{name}"),
                              published=lambda p: self.storage.publish(f"{prefix}/{p.name}"))

    def run_one(self, job: JobRecord) -> None:
        from vace_local.engine.preview import preview_scope
        from vace_local.run.job import run_job

        self.current = job
        self._cancel_cached = False
        self._last_cancel_check = 0.0
        fields = job.extra.get("fields") or {}
        work = self.data_dir / "work" / job.id
        out_dir = self.data_dir / "outputs" / job.id
        self.store.upsert_worker(self.id, status=WorkerStatus.BUSY, current_job=job.id)
        self.store.add_log(job.id, f"started on worker {self.args.slot} ({self.engine.device}), attempt "
                           f"{job.attempts}", source="worker")
        try:
            spec = JobSpec.model_validate(job.spec)
            if self.should_cancel():
                raise JobCancelled("cancelled before start")
            t = time.perf_counter()
            spec = self.resolve_inputs(spec, work / "inputs", fields)
            resolve_s = time.perf_counter() - t
            device = self.engine.device
            previews = _PreviewWriter(self, job, out_dir)
            with preview_scope(self.settings.preview_every, previews.write):
                result = run_job(spec, out_dir, engine=self.engine, on_progress=self._progress_fn(job),
                                 should_cancel=self.should_cancel, safety=self.settings.safety_options(device),
                                 expander=self.settings.expander_options(device), window_store=self.window_store(job))
            for note in result.notes:
                self.store.add_log(job.id, note, source="worker")
            outputs = [{"kind": o.kind, "file": o.path.name, "content_type": o.content_type,
                        "size": o.path.stat().st_size} for o in result.outputs]
            timings = dict(result.timings)
            timings["fetch"] = timings.get("fetch", 0.0) + resolve_s
            info = {"seed": result.seed, "width": result.width, "height": result.height,
                    "num_frames": result.num_frames, "fps": result.fps, "model": result.model,
                    "tiny": result.tiny, "prompt": result.prompt, "safety": result.safety,
                    "prompt_expansion": result.prompt_expansion, "windows": result.windows, "preview": previews.last}
            for o in outputs:  # written once, then any box can serve them
                self.storage.publish(f"outputs/{job.id}/{o['file']}")
            self.store.observe_stages(self.args.slot, {k: v for k, v in timings.items() if k != "total"})
            self.storage.delete_prefix(f"windows/{job.id}")  # done: nothing left to resume
            if self.store.finish_job(job.id, self.id, status=JobStatus.SUCCEEDED, outputs=outputs, result=info,
                                     timings=timings):
                note = " (tiny random-weight model: the video is noise)" if result.tiny else ""
                self.store.add_log(job.id, f"completed in {timings.get('total', 0):.1f} s, seed {result.seed}"
                                   + note, source="worker")
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded, then re-raised if fatal
            if isinstance(exc, JobCancelled) and self.shutdown.is_set():
                self.store.release_job(job, "server shutting down")  # its finished windows stay for the resume
                return
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            if self.group is not None and self.group.engine.broken:  # peers are out of step: restart the group
                self._group_failed(self.group.wait_dead_rank(2.0) or self.group.engine.broken)
            failure = map_exception(exc, fields)
            if failure.error_type == "internal_error":
                log.exception("job %s failed", job.id)
            status = JobStatus.CANCELLED if failure.status == JobStatus.CANCELLED else JobStatus.FAILED
            shutil.rmtree(out_dir, ignore_errors=True)
            self.storage.delete_prefix(f"windows/{job.id}")
            self.store.finish_job(job.id, self.id, status=status, error=failure.message,
                                  error_type=failure.error_type, error_detail=failure.detail or None)
            self.store.add_log(job.id, f"{status}: {failure.message}",
                               level="info" if status == JobStatus.CANCELLED else "error", source="worker")
            if failure.restart_worker:
                self.store.upsert_worker(self.id, status=WorkerStatus.DEAD,
                                         message="restarting after GPU out-of-memory")
                os._exit(WorkerExit.RESTART)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.current = None
            if not self.shutdown.is_set():
                self.store.upsert_worker(self.id, status=WorkerStatus.READY, current_job=None)

class _PreviewWriter:
    """Writes a running job's live previews (`vace_local.engine.preview`) as `outputs/<job>/preview-NNNN.webp` and
    records the latest in the job (`Store.set_preview`), so `GET /api/v3/predictions/{id}/progress` can hand out its
    URL. Each preview gets a new name (no stale copy in a browser or on another box); the two newest are kept, so a
    reader that got the previous URL can still fetch it. A preview that fails is logged once and stops the
    previews of that job, never the job."""

    KEEP = 2

    def __init__(self, worker: Worker, job: JobRecord, out_dir: Path) -> None:
        self.worker, self.job, self.out_dir = worker, job, out_dir
        self.files: list[str] = []
        self.last: dict[str, Any] | None = None
        self.failed = False

    def write(self, preview: Any) -> None:
        from vace_local.engine.preview import write_strip

        if self.failed:
            return
        try:
            name = f"preview-{len(self.files) + 1:04d}.webp"
            path = write_strip(preview.frames, self.out_dir / name)
            self.worker.storage.publish(f"outputs/{self.job.id}/{name}")
            f, h, w = preview.frames.shape[:3]
            self.last = {"kind": "preview", "file": name, "content_type": "image/webp", "size": path.stat().st_size,
                         "step": preview.step, "total": preview.total, "frames": f, "width": w, "height": h}
            self.worker.store.set_preview(self.job.id, self.worker.id, self.last)
            self.files.append(name)
            for old in self.files[:-self.KEEP]:
                (self.out_dir / old).unlink(missing_ok=True)
        except Exception as exc:  # noqa: BLE001 - a preview is a courtesy: the job goes on without
            self.failed = True
            log.exception("job %s: live preview failed", self.job.id)
            self.worker.store.add_log(self.job.id, f"live previews stopped: {exc}", level="warning", source="worker")


def worker_main(args: WorkerArgs) -> None:
    """Process entry point (multiprocessing 'spawn')."""
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    settings = Settings.model_validate_json(args.settings_json)
    settings.export_limits()
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s worker{args.slot} %(levelname)s %(name)s: %(message)s")
    if settings.cache_dir is None:  # the engine's caches (tiny models, LoRA files) go in the data dir
        export(cache_dir=(settings.data_dir / "cache").resolve())
    if settings.is_tiny:
        try:  # build the tiny annotators before reporting ready (the run path would do it on first use)
            from preprocessors.tiny import tiny_annotators_dir
            from vace_local.engine.tiny import default_cache_dir

            tiny_annotators_dir(default_cache_dir())
        except Exception:  # noqa: BLE001 - tasks needing annotators will fail with their own message
            log.exception("could not prepare tiny annotators")
    w = Worker(args, settings)
    threading.Thread(target=w._watch_parent, daemon=True, name="parent-watch").start()

    def on_term(signum: int, frame: Any) -> None:  # noqa: ARG001
        w.shutdown.set()
        if w.current is None:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the API process, which stops us
    try:
        w.load()
    except Exception as exc:  # noqa: BLE001
        log.exception("model failed to load")
        w.store.upsert_worker(w.id, status=WorkerStatus.ERROR,
                              message=f"model failed to load: {type(exc).__name__}: {exc}")
        sys.exit(WorkerExit.LOAD_FAILED)
    threading.Thread(target=w._heartbeat, daemon=True, name="heartbeat").start()
    w.run_forever()
