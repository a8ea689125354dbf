"""The API process's services, built once per app, and the narrow view of them a dialect route gets.

`Services.build(settings, store)` wires `Jobs`, `Files`, `Uploads`, `InputResolver` and the `Offload` seam; the
app keeps it as `app.state.services`. A dialect route takes `api: Api = Depends(get_api)`: jobs, file URLs,
uploads, the submit-time input rule, the slow pool and the few settings a dialect reads — never the store or
the storage, so every store call a handler makes goes through an async method (off the event loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from server.files import Files
from server.jobs import Jobs
from server.offload import Offload
from server.settings import Settings
from server.storage import make_storage
from server.store import Store
from server.submit_inputs import InputResolver
from server.uploads import Uploads


class DialectConfig(Protocol):
    """The settings a dialect reads (a `Settings` is one)."""

    model: str
    model_map: dict[str, str]
    public_base_url: str | None
    sync_timeout_s: float
    retention_hours: float
    allowed_hosts: list[str]
    max_upload_bytes: int
    max_download_bytes: int
    download_timeout_s: float


@dataclass(frozen=True)
class Api:
    """What a dialect route works with (`Depends(get_api)`)."""

    jobs: Jobs
    files: Files
    uploads: Uploads
    inputs: InputResolver
    offload: Offload
    config: DialectConfig


@dataclass
class Services:
    """Every service of one API process."""

    settings: Settings
    store: Store
    offload: Offload
    files: Files
    uploads: Uploads
    inputs: InputResolver
    jobs: Jobs

    @classmethod
    def build(cls, settings: Settings, store: Store) -> Services:
        offload = Offload(settings.slow_work_threads)
        storage = make_storage(settings)
        files = Files(settings, store, storage, offload)
        uploads = Uploads(settings, store, storage, offload)
        inputs = InputResolver(settings, files, uploads)
        jobs = Jobs(settings, store, storage, uploads, inputs, offload)
        return cls(settings, store, offload, files, uploads, inputs, jobs)

    @property
    def api(self) -> Api:
        return Api(self.jobs, self.files, self.uploads, self.inputs, self.offload, self.settings)

    def close(self) -> None:
        self.offload.close()


def get_api(request: Request) -> Api:
    """FastAPI dependency: the dialect view of this app's services."""
    return request.app.state.api
