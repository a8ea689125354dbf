"""Spawns and supervises the worker processes (multiprocessing 'spawn'), from a thread of the API process.

* `workers=auto`: one worker per visible GPU (counted without torch: `CUDA_VISIBLE_DEVICES`, else
  `nvidia-smi -L`), one CPU worker when there is none. With `gpus_per_job=N` a worker is a group of N GPUs
  (8 GPUs, N=2 → four groups "0,1" … "6,7"); its process is rank 0 and starts the other ranks itself
  (vace_local.run.parallel), so a group is supervised, restarted and re-queued like one worker.
* Leases: a running job belongs to the worker whose heartbeat keeps renewing its lease. Every instance sharing
  the store checks for expired leases and recovers those jobs (re-queued once, then failed), its own or
  another's; the conditional update makes exactly one recovery win. At start, an instance recovers at once
  only the jobs its own previous run left running (its id is stable across restarts); other instances'
  running jobs and worker rows are never touched. (On SQLite, one server per store, all of them.)
* A worker that exits or stops heart-beating has its job re-queued once (then failed with the reason) and is
  restarted with exponential backoff. A worker that cannot load its model keeps /ready at 503.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.settings import Settings
from server.states import WorkerExit, WorkerStatus
from server.store import Store

log = logging.getLogger("vace.server.supervisor")


def visible_gpus() -> list[str]:
    """GPU indices this machine exposes, found without importing torch."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def plan_workers(setting: str, gpus_per_job: int = 1) -> list[str | None]:
    """One entry per worker: its GPU indices ("0" or, for a group, "0,1"), or None for a CPU worker."""
    gpus = visible_gpus()
    if gpus_per_job > 1 and gpus:
        if len(gpus) < gpus_per_job:
            raise ValueError(f"gpus_per_job={gpus_per_job} but only {len(gpus)} GPU(s) are visible")
        if len(gpus) % gpus_per_job:
            log.warning("%d GPUs do not split into groups of %d: %d left idle", len(gpus), gpus_per_job,
                        len(gpus) % gpus_per_job)
        n = len(gpus) // gpus_per_job
        gpus = [",".join(gpus[i * gpus_per_job:(i + 1) * gpus_per_job]) for i in range(n)]
    if setting == "auto":
        return list(gpus) if gpus else [None]
    n = int(setting)
    if not gpus:
        return [None] * n
    return [gpus[i % len(gpus)] for i in range(n)]


@dataclass
class Slot:
    index: int
    gpu: str | None
    proc: Any = None
    worker_id: str = ""
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    history: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, settings: Settings, store: Store, instance: str) -> None:
        self.settings = settings
        self.store = store
        self.instance = instance
        self.slots = [Slot(i, g) for i, g in enumerate(plan_workers(settings.workers, settings.gpus_per_job))]
        #: Distinguishes this run's worker ids from a previous run's (the instance id is the same).
        self.run_id = uuid.uuid4().hex[:8]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx = mp.get_context("spawn")

    @property
    def expected(self) -> int:
        return len(self.slots)

    def recover_own_previous_run(self) -> None:
        """Jobs this instance's previous run left running are orphans (that run is gone): re-queue once, else
        fail, without waiting for their leases; then forget that run's worker rows. Other instances' jobs
        and rows are theirs. A SQLite store has one server by design, so there every running job and worker
        row is from a previous run (whatever its instance id: e.g. restarted on another port)."""
        shared = self.store.is_postgres
        orphans = self.store.running_jobs_of_instance(self.instance) if shared else self.store.running_jobs()
        for job in orphans:
            new = self.store.recover_job(job, "the server restarted while the job was running",
                                         max_attempts=self.settings.max_attempts)
            log.warning("job %s orphaned by this server's previous run → %s", job.id, new)
        self.store.delete_workers_of(self.instance if shared else None)

    def start(self) -> None:
        self.recover_own_previous_run()
        for slot in self.slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._loop, name="vace-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, slot: Slot) -> None:
        from server.worker import WorkerArgs, worker_main

        slot.worker_id = f"w{slot.index}-{self.run_id}-{slot.restarts}"
        device = f"cuda:{slot.gpu}" if slot.gpu is not None else "cpu"
        self.store.upsert_worker(slot.worker_id, slot=slot.index, instance=self.instance, pid=None,
                                 device=device, status=WorkerStatus.STARTING, model=self.settings.model, message=None)
        args = WorkerArgs(slot=slot.index, worker_id=slot.worker_id, gpu=slot.gpu,
                          settings_json=self.settings.model_dump_json(), parent_pid=os.getpid())
        slot.proc = self._ctx.Process(target=worker_main, args=(args,), name=f"vace-worker-{slot.index}",
                                      daemon=False)
        slot.proc.start()
        slot.started_at = time.time()
        log.info("started worker %s (pid %s, %s)", slot.worker_id, slot.proc.pid, device)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._check()
            except Exception:  # noqa: BLE001 - supervision must not die
                log.exception("supervisor check failed")

    def _check(self) -> None:
        now = time.time()
        for slot in self.slots:
            p = slot.proc
            if p is not None and not p.is_alive():
                code = p.exitcode
                reason = _describe_exit(code)
                prev = self.store.get_worker(slot.worker_id) or {}
                if prev.get("status") == WorkerStatus.ERROR and prev.get("message"):
                    reason = prev["message"]  # the worker's own account (e.g. why the model did not load)
                self.store.upsert_worker(slot.worker_id, status=WorkerStatus.DEAD, message=reason)
                for job in self.store.running_jobs([slot.worker_id]):
                    new = self.store.recover_job(job, f"the worker process died ({reason})",
                                                 max_attempts=self.settings.max_attempts)
                    log.warning("job %s lost its worker (%s) → %s", job.id, reason, new)
                healthy_for = now - slot.started_at
                slot.restarts += 1
                delay = 1.0 if healthy_for > 300 else min(60.0, 2.0 ** min(len(slot.history), 6))
                slot.history = [] if healthy_for > 300 else [*slot.history, code or 0]
                slot.next_start = now + delay
                slot.proc = None
                log.warning("worker slot %d exited (%s); restarting in %.0f s", slot.index, reason, delay)
            if slot.proc is None and now >= slot.next_start and not self._stop.is_set():
                self._spawn(slot)
        # Expired leases, any instance's: our own hung worker is killed (its job recovered next round); a job
        # whose worker is elsewhere (another instance died, or is cut off) is recovered here.
        for job in self.store.expired_leases(now, self.settings.heartbeat_timeout_s):
            owner = next((s for s in self.slots if s.worker_id == job.worker_id and s.proc is not None), None)
            if owner is not None:
                log.warning("worker %s stopped heart-beating; killing it", owner.worker_id)
                owner.proc.kill()
                continue
            new = self.store.recover_job(job, f"the lease of worker {job.worker_id} expired (no heartbeat); "
                                         f"recovered by instance {self.instance}",
                                         max_attempts=self.settings.max_attempts)
            if new is not None:
                log.warning("job %s: lease of worker %s expired → %s", job.id, job.worker_id, new)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        procs = [s.proc for s in self.slots if s.proc is not None]
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.time() + timeout
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.time()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        ids = [s.worker_id for s in self.slots if s.worker_id]
        for job in self.store.running_jobs(ids):  # killed mid-step during shutdown: not the job's fault
            self.store.release_job(job, "server shut down while the job was running")
        for wid in ids:
            self.store.upsert_worker(wid, status=WorkerStatus.STOPPED)

def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    try:
        return WorkerExit(code).reason
    except ValueError:
        return f"exit code {code}"
