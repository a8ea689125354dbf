"""The errors the API answers with and the one exception-to-status mapper.

`ApiError` is an HTTP-level error each dialect renders in its own envelope; `validation_error` turns pydantic
errors into one naming each field and rule; `map_exception` is what the worker records for an exception
(`Failure`), matching torch errors by name so the API never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from server.states import JobStatus
from vace_local.core.errors import InputError, Problem, problems_from_pydantic, problems_text


class ApiError(Exception):
    """An HTTP-level error; each dialect renders it in its own envelope.

    `problems` are the broken rules as data (field path in the dialect's names, message, rule type), for the
    dialects that answer per field (fal's `detail`) and for what a failed job stores; `message` is the one-line
    text the other envelopes show. `field` names the user's field when known (OpenAI's `param`). Build a
    field error with `ApiError.invalid`.
    """

    def __init__(self, status_code: int, message: str, *, field: str | None = None,
                 error_type: str = "invalid_request", problems: list[Problem] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        #: Sent with the error whatever the dialect's envelope (e.g. `Retry-After` on 429).
        self.headers = headers or {}
        self.message = message
        self.problems = problems or []
        self.field = field if field is not None else next((p.field for p in self.problems if p.field), None)
        self.error_type = error_type

    @classmethod
    def invalid(cls, problems: Problem | list[Problem], status_code: int = 400, *,
                error_type: str = "validation_error", show_got: bool = True, more: bool = True) -> ApiError:
        """An error about named fields: the message is `field: rule; …` rendered from the problems
        (`show_got`, `more`: see `problems_text`)."""
        items = [problems] if isinstance(problems, Problem) else list(problems)
        return cls(status_code, problems_text(items, show_got=show_got, more=more), error_type=error_type,
                   problems=items)

    def detail(self) -> list[dict[str, Any]]:
        """The broken rules as data (what a failed job stores): field path in user names, message, type."""
        if self.problems:
            return [p.as_dict() for p in self.problems]
        return [{"field": self.field, "message": self.message, "type": self.error_type}]


@dataclass
class Failure:
    """What the worker records for an exception: final status, a short type, a user-facing message."""

    status: str
    error_type: str
    message: str
    restart_worker: bool = False
    #: The broken rules as data (`JobRecord.error_detail`): `[{"field", "message", "type"}]`; empty when the
    #: failure is not about a user field.
    detail: list[dict[str, Any]] = field(default_factory=list)


def user_field(name: str, field_names: dict[str, str] | None) -> str:
    """Translate a JobSpec/JobInputs field path (`inputs.reference_images[2]`) to the dialect's name."""
    if not field_names:
        return name
    n = name.removeprefix("inputs.")
    if n in field_names:  # an exact entry wins (WaveSpeed's `image` is appended to reference_images)
        return field_names[n]
    head, sep, rest = n.partition("[")
    head_dot, dot, tail = head.partition(".")
    mapped = field_names.get(head_dot, head_dot)
    return mapped + dot + tail + sep + rest


def map_exception(exc: BaseException, field_names: dict[str, str] | None = None) -> Failure:
    """The one exception-to-status mapper. Matches torch errors by name so the API never imports torch."""
    from vace_local.core.errors import JobCancelled, ModelNotFoundError, OutOfMemory, VaceError

    name = type(exc).__name__
    if isinstance(exc, JobCancelled):
        return Failure(JobStatus.CANCELLED, "cancelled", "cancelled by request")
    if isinstance(exc, InputError):
        name = user_field(exc.field, field_names)
        return Failure(JobStatus.FAILED, "input_error", f"input '{name}': {exc.message}",
                       detail=[Problem(name, exc.message).as_dict()])
    if isinstance(exc, OutOfMemory) or name == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return Failure(JobStatus.FAILED, "out_of_memory",
                       "the GPU ran out of memory for this job (try a smaller size or fewer frames); "
                       "the worker was restarted", restart_worker=True)
    if isinstance(exc, ModelNotFoundError):
        return Failure(JobStatus.FAILED, "model_not_found", str(exc))
    if isinstance(exc, ValidationError):
        err = validation_error(exc, field_names, value_error_prefix=False)
        return Failure(JobStatus.FAILED, "invalid_input", err.message, detail=err.detail())
    if isinstance(exc, VaceError):
        return Failure(JobStatus.FAILED, "error", str(exc))
    return Failure(JobStatus.FAILED, "internal_error", f"internal error: {name}: {str(exc)[:500]}")


def validation_error(exc: ValidationError | list[dict[str, Any]], field_names: dict[str, str] | None = None,
                     status_code: int = 400, *, value_error_prefix: bool = True) -> ApiError:
    """Pydantic errors → ApiError whose message names each field and the rule broken (the shared formatter,
    with the wording the WaveSpeed and default envelopes have always sent)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    problems = problems_from_pydantic(errors, lambda path: user_field(path, field_names),
                                      value_error_prefix=value_error_prefix, lower_required=True)
    return ApiError.invalid(problems, status_code)
