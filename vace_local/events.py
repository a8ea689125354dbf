"""Typed progress events a run reports (stage changes and denoising steps), for the CLI bar and the worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

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
