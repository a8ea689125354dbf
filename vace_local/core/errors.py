"""Typed errors the engine raises (the server maps each to a status once), and broken rules as data: `Problem`
and the one pydantic-error formatter the CLI and every HTTP dialect share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class VaceError(Exception):
    """Base class for errors whose message is safe and useful to show to the user."""


class InputError(VaceError):
    """A user input (named by `field`) cannot be used: unreadable, wrong kind, too large, refused URL."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ModelNotFoundError(VaceError):
    """Weights for a model are not available locally (and could not be fetched)."""


class JobCancelled(VaceError):
    """The job was cancelled by request; nothing was written."""


class OutOfMemory(VaceError):
    """The GPU ran out of memory for this job."""


class InsufficientMemory(VaceError):
    """The model cannot be loaded on this machine under any memory policy: not enough VRAM and host RAM.
    Raised before a byte is loaded, with the numbers (weights, free VRAM, free RAM)."""


# ---- broken rules as data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One broken rule of a request or spec, kept as data so every front end renders it in its own shape.

    `field` is the path in the caller's names (`ref_image_urls[1]`, `inputs.video`, `query.limit`; None = the
    whole input),
    `message` says what is wrong without the field in front, `type` names the rule (pydantic's error type or
    ours), `location` is where an HTTP field lives ("body" or "query"), `got` a short repr of the rejected
    scalar for the texts that show it.
    """

    field: str | None
    message: str
    type: str = "value_error"
    location: str = "body"
    got: str | None = None

    def text(self, *, show_got: bool = True) -> str:
        """`field: message` (just the message when no field is known)."""
        msg = self.message + (f" (got {self.got})" if show_got and self.got else "")
        return f"{self.field}: {msg}" if self.field else msg

    def as_dict(self) -> dict[str, Any]:
        """What a failed job stores (`JobRecord.error_detail` items)."""
        return {"field": self.field, "message": self.message, "type": self.type}

    @property
    def path(self) -> list[str | int]:
        """The field path as parts, list indices as ints: `ref_image_urls[1]` → ["ref_image_urls", 1]."""
        if not self.field:
            return []
        parts = self.field.replace("[", ".").replace("]", "").split(".")
        return [int(p) if p.isdigit() else p for p in parts if p]


def join_path(parts: Iterable[str | int]) -> str:
    """["reference_images", 2, "url"] → `reference_images[2].url` (the inverse of `Problem.path`)."""
    out = ""
    for p in parts:
        s = str(p)
        out += f"[{s}]" if isinstance(p, int) or s.isdigit() else (f".{s}" if out else s)
    return out


#: pydantic's error locations that name where a request field lives rather than the field.
_LOCATIONS = ("body", "query", "path", "header")
_JSON_NAMES = {"NoneType": "JSON null", "list": "a JSON array", "str": "a JSON string", "int": "a JSON number",
               "float": "a JSON number", "bool": "a JSON boolean"}


def problems_from_pydantic(errors: Iterable[Mapping[str, Any]], rename: Callable[[str], str] | None = None, *,
                           value_error_prefix: bool = False, lower_required: bool = False) -> list[Problem]:
    """The one pydantic-error formatter: `ValidationError.errors()` → Problems, for the CLI and every dialect.

    `rename` maps a spec path (`inputs.reference_images[2]`) to the caller's name. A body that is not JSON, not
    a JSON object, or missing gets a sentence saying so instead of pydantic's. pydantic's "Value error, " in
    front of a validator's message is dropped; `value_error_prefix` / `lower_required` keep the wording
    (`Value error, …`, `field required`) that the WaveSpeed and default envelopes have always sent.
    """
    out: list[Problem] = []
    for e in errors:
        loc = list(e.get("loc", ()))
        location = str(loc[0]) if loc and loc[0] in _LOCATIONS else "body"
        path = join_path(x for x in loc if x != "body")  # a query/path parameter keeps its root: `query.limit`
        field = (rename(path) if rename else path) if path else None
        etype = str(e.get("type", "value_error"))
        msg = str(e.get("msg", "invalid"))
        if not value_error_prefix:
            msg = msg.removeprefix("Value error, ")
        got = None
        if etype == "json_invalid":
            msg = f"request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
            field = None
        elif field is None and etype in ("model_attributes_type", "dict_type", "model_type"):
            given = e.get("input")
            what = ("a body that was not sent as JSON" if isinstance(given, bytes)
                    else _JSON_NAMES.get(type(given).__name__, type(given).__name__))
            msg = (f"request body must be a JSON object of the documented fields, sent with "
                   f"'Content-Type: application/json' (got {what})")
        elif etype == "missing":
            if field is None:
                msg = ("request body is missing: send a JSON object of the documented fields with "
                       "'Content-Type: application/json'")
            elif lower_required:
                msg = "field required"
        elif "input" in e and not isinstance(e["input"], dict | list):
            got = repr(e["input"])[:60]
        out.append(Problem(field, msg, etype, location, got))
    return out


def problems_text(problems: list[Problem], *, show_got: bool = True, limit: int = 5, more: bool = True) -> str:
    """One line naming each field and rule: `a: …; b[1]: …` (the first `limit`, then how many more)."""
    parts = [p.text(show_got=show_got) for p in problems[:limit]]
    if more and len(problems) > limit:
        parts.append(f"… and {len(problems) - limit} more")
    return "; ".join(parts)
