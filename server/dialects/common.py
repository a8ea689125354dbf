"""What the safety checker and prompt expander did for a job, read from the worker's `job.result`.

The dialects render these facts under their own field names; a job whose outputs were not checked answers
`None` (JSON null), never a guessed `false`.
"""

from __future__ import annotations

from typing import Any

from server.store import JobRecord


def _safety(job: JobRecord) -> dict[str, Any]:
    return (job.result or {}).get("safety") or {}


def nsfw_flag(job: JobRecord) -> bool | None:
    """True / False when the safety checker classified the output; None when nothing was checked."""
    s = _safety(job)
    return bool(s.get("flagged")) if s.get("status") == "checked" else None


def safety_requested(job: JobRecord) -> bool:
    return bool(job.spec.get("enable_safety_checker"))


def safety_note(job: JobRecord) -> str | None:
    """The checker's one-line outcome when it did not check (not installed) or changed the output."""
    s = _safety(job)
    if s.get("status") == "not_installed" or s.get("action") == "replaced_with_black":
        return str(s.get("message") or "")
    return None


def prompt_used(job: JobRecord) -> str:
    """The prompt the model was conditioned on: the expanded one when prompt expansion ran."""
    return str((job.result or {}).get("prompt") or job.spec.get("prompt", ""))


def expansion_note(job: JobRecord) -> str | None:
    """The expander's outcome when it was asked for but did not expand (not installed / empty output)."""
    e = (job.result or {}).get("prompt_expansion") or {}
    return str(e.get("message")) if e and e.get("status") != "expanded" else None
