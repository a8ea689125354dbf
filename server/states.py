"""The server's state vocabularies in one place: job statuses and the moves allowed between them, worker and
webhook statuses, and the exit codes by which a worker tells its supervisor why it stopped.

Every status is a `StrEnum` whose values are the strings the store has always written ("queued", "ready", …),
so existing databases, `status == "running"` comparisons, JSON and each dialect's status mapping keep working.
This module imports nothing heavy: the API process, the supervisor and the workers all use it.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class JobStatus(StrEnum):
    """A job's internal status; dialects map it to their own vocabularies."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """A terminal job never changes status again (and its webhook, if any, is due)."""
        return not TRANSITIONS[self]


#: The only status changes the store makes; `server.store` refuses anything else before it touches a row.
#: queued → running (a worker claims it) or cancelled (cancel while queued); running → a terminal status (the
#: worker finishes it, or its recovery fails / cancels it) or back to queued (recovered for a retry, or
#: released on shutdown). Terminal statuses go nowhere.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    """A status change the transition table does not allow: a bug in the caller, never a user error."""


def check_transition(from_: JobStatus, to: JobStatus) -> None:
    if to not in TRANSITIONS[from_]:
        raise IllegalTransition(f"a {from_} job cannot become {to}")


class WorkerStatus(StrEnum):
    """A worker row's status, written by the supervisor (starting, dead, stopped) and the worker itself."""

    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    #: The model failed to load; the row's message says why (the supervisor reports it as the exit reason).
    ERROR = "error"
    DEAD = "dead"
    STOPPED = "stopped"


#: Worker statuses with the model loaded, taking jobs (what /ready counts).
WORKER_LOADED = frozenset({WorkerStatus.READY, WorkerStatus.BUSY})


class WebhookStatus(StrEnum):
    """A job's webhook delivery state (NULL in the store: the job has no webhook, or is not finished)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WorkerExit(IntEnum):
    """Exit codes a worker process uses to say why it stopped; the supervisor restarts it either way."""

    LOAD_FAILED = 3
    RESTART = 4
    GROUP_FAILED = 6

    @property
    def reason(self) -> str:
        return _EXIT_REASONS[self]


_EXIT_REASONS = {
    WorkerExit.LOAD_FAILED: "model failed to load",
    WorkerExit.RESTART: "restart after GPU out-of-memory",
    WorkerExit.GROUP_FAILED: "a rank of its parallel group failed; restarting the group",
}
