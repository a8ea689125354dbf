"""Typed progress events a run reports (stage changes and denoising steps), for the CLI bar and the worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

from vace_local.core.errors import JobCancelled

Stage = Literal["load", "fetch", "preprocess", "generate", "encode", "done"]


@dataclass(frozen=True)
class Progress:
    stage: Stage
    step: int = 0
    total: int = 0
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def no_progress(_: Progress) -> None:
    return None


def never_cancel() -> bool:
    return False


_current_cancel: ContextVar[CancelFn] = ContextVar("vace_cancel", default=never_cancel)


@contextmanager
def cancel_scope(should_cancel: CancelFn) -> Iterator[None]:
    """Make `should_cancel` the current job's cancel check for `checkpoint()` calls deep in preprocessing.

    Per-context state (a ContextVar), so the decode / annotate / track loops need no callback parameter
    threaded through every signature, and concurrent runs in other threads keep their own check."""
    token = _current_cancel.set(should_cancel)
    try:
        yield
    finally:
        _current_cancel.reset(token)


def checkpoint() -> None:
    """Raise JobCancelled when the current job was cancelled; called once per frame by long loops."""
    if _current_cancel.get()():
        raise JobCancelled("job cancelled")
