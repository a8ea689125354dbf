"""One loaded copy per process of an optional auxiliary model (safety checker, prompt expander), per options.

Both are optional: when their weights are not installed the job still runs and its report says so. So a
missing model is logged and answered with None, and not remembered: installing the weights later works without
a restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from vace_local.core.errors import ModelNotFoundError

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class OptionalModelCache(Generic[K, V]):
    """`get(options)` loads with `load(options)` on first use and keeps the result; None when not installed."""

    def __init__(self, load: Callable[[K], V], not_installed: str) -> None:
        self._load = load
        self._not_installed = not_installed
        self._lock = threading.Lock()
        self._loaded: dict[K, V] = {}

    def get(self, options: K) -> V | None:
        with self._lock:
            if options not in self._loaded:
                try:
                    self._loaded[options] = self._load(options)
                except ModelNotFoundError as exc:
                    log.warning("%s: %s", self._not_installed, exc)
                    return None
            return self._loaded[options]
