"""vace-local: run the Wan VACE video models locally, from the CLI or behind hosted-API-compatible HTTP.

This package imports no torch at import time so the API process can use `JobSpec` without loading it.
"""

from vace_local.core.errors import InputError, JobCancelled, ModelNotFoundError, VaceError
from vace_local.core.spec import JobSpec

__all__ = ["InputError", "JobCancelled", "JobSpec", "ModelNotFoundError", "VaceError"]
__version__ = "0.1.0"
