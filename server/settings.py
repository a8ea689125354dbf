"""Server settings: the registry's `VACE_*` variables (vace_local/core/config.py) plus the API's and the workers'
own, overridden by `vace-local serve` options. Each variable is declared once, here or in the registry."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from vace_local.core.config import DEFAULT_MODEL, EngineSettings, VaceSettings, export, split_list
from vace_local.core.spec import HARD_MAX_FRAMES, MIN_FRAMES

TINY_MODEL = "tiny"
#: Live previews every this many steps by default (measured cost: docs/PERFORMANCE.md "Live previews").
PREVIEW_EVERY_DEFAULT = 5
#: The tiny random-weight smoke models (`vace_local.engine.tiny.TINY_MODELS`; the API process does not import it).
TINY_MODELS = (TINY_MODEL, "tiny-two-expert")


class Settings(VaceSettings, EngineSettings):
    """Everything the API process and its workers need; workers receive a copy at spawn. The engine options
    (`VACE_OFFLOAD`, ...) and what the engine reads itself (`VACE_MAX_FRAMES`, `VACE_MEDIA_*`, `VACE_SAFETY_*`,
    ...) are declared in vace_local/core/config.py."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: Model the workers load (`tiny` = random-weight smoke model).
    model: str = DEFAULT_MODEL
    #: `auto` = one worker per visible GPU, one CPU worker without GPUs; or an explicit count (0 = API only).
    workers: str = "auto"
    data_dir: Path = Path("vace-data")
    #: SQLAlchemy URL; default `sqlite:///<data_dir>/jobs.db` (WAL). A PostgreSQL URL works unchanged.
    database_url: str | None = None
    #: Accepted API keys (comma-separated in env). Empty: no auth and the server binds to localhost only.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: With keys configured, every route but /health needs one; these open /metrics and the docs
    #: (/docs, /redoc, /openapi.json) to callers without a key.
    public_metrics: bool = False
    public_docs: bool = False
    #: Base of every URL we hand out (outputs, uploads, urls.get); default: derived from each request.
    public_base_url: str | None = None
    #: Hosts / IPs / CIDRs that input URLs and webhooks may reach even when they are private or loopback.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = Field(300 * 1024 * 1024, gt=0)
    # -- request bodies (server/body_guard.py): JSON is counted as it arrives, refused past these (400/413) --
    #: Deepest JSON nesting a request body may have (the deepest real one has 3 levels).
    max_json_depth: int = Field(10, ge=2, le=1000)
    #: Most JSON values (object members + array elements) in one request body.
    max_json_values: int = Field(1000, ge=16)
    #: Bytes of a JSON body besides its data-URI strings (prompts, URLs, numbers, names), and the whole body of
    #: JSON-only routes; a text value over it is refused naming its field.
    max_json_text_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    # -- a key-less server (no api_keys) answers only its own names and its own pages (CSRF, DNS rebinding) --
    #: Host names it serves besides localhost, 127.0.0.1, [::1], the bound address and public_base_url's host
    #: (comma-separated; `*` turns the Host check off).
    server_names: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Web origins (`scheme://host[:port]`) whose pages may call it besides its own (`*`: any page may).
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_download_bytes: int = Field(500 * 1024 * 1024, gt=0)
    download_timeout_s: float = Field(120.0, gt=0)
    #: Finished jobs, their outputs and uploads are deleted after this many hours (0 = keep forever).
    retention_hours: float = Field(168.0, ge=0)
    cleanup_interval_s: float = Field(600.0, gt=0)
    #: How long `enable_sync_mode` / sync endpoints wait before answering with the timeout shape.
    sync_timeout_s: float = Field(600.0, gt=0)
    #: A running job's lease: its worker's heartbeat renews it (every third of this, at most every 2 s); when
    #: it runs out the job is orphaned and whichever server instance sees it first re-queues it.
    heartbeat_timeout_s: float = Field(60.0, gt=0)
    #: This server's name in a store shared by several (its workers' rows, its jobs after a restart). Must be
    #: unique per server and the same across its restarts; default: host name + a hash of data dir and port.
    instance_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    #: Threads for slow blocking work on the API process (submit-time downloads/probes, data-URI decodes,
    #: retention cleanup); /health and /ready never wait for them.
    slow_work_threads: int = Field(4, ge=1, le=64)
    # -- HTTP server guards (uvicorn; see README "Exposed deployments" for the reverse-proxy side) --
    #: Open connections (and in-flight requests) at most; beyond it a request gets 503, a new connection an
    #: immediate 503 and close, so idle sockets cannot use up every file descriptor.
    max_connections: int = Field(1000, ge=1)
    #: A client must send a complete request head (request line + headers) within this many seconds of
    #: connecting or of the previous response (slowloris); else the connection is closed (408).
    header_timeout_s: float = Field(10.0, gt=0)
    #: Idle keep-alive connections are closed after this many seconds.
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    #: Largest request head (request line + headers) accepted; beyond it: 400.
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    #: Listen backlog (connections waiting to be accepted).
    backlog: int = Field(2048, ge=1)
    #: Queued jobs in all; past it a submit gets 429 with `Retry-After`.
    max_queue: int = Field(10000, ge=1)
    #: Queued jobs per API key (with keys configured; 0 = no per-key cap); past it that key's submits get 429
    #: with `Retry-After` while other keys still submit. Workers take keys in turn either way (fair claiming).
    max_queued_per_key: int = Field(1000, ge=0)
    #: Seconds a queue-full 429 asks the client to wait before retrying (`Retry-After`).
    queue_retry_after_s: int = Field(10, ge=1, le=3600)
    max_attempts: int = Field(2, ge=1)
    webhook_max_attempts: int = Field(6, ge=1)
    webhook_timeout_s: float = Field(10.0, gt=0)
    #: Webhook deliveries in flight at once: per destination (scheme + host + port), per owner (API key; the
    #: tenant isolation: one key's tarpits hold only its own slots) and in all (under the client's 100 connections).
    webhook_per_destination: int = Field(2, ge=1)
    webhook_per_owner: int = Field(8, ge=1)
    webhook_max_in_flight: int = Field(32, ge=1, le=100)
    # -- where uploads and outputs live (server/storage.py) --
    #: `local`: the data dir (one box, or one directory every box mounts); `s3`: an S3-compatible bucket
    #: (credentials from the usual AWS_* variables / config files), with every box on the same data dir path.
    storage: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_prefix: str = ""
    #: e.g. `http://minio:9000` for MinIO; default: AWS S3.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    #: How `/files/…` serves a file this box has no copy of: `stream` it through the API, or `redirect` (307)
    #: to a presigned URL of the object (valid `presign_ttl_s` seconds).
    file_delivery: Literal["stream", "redirect"] = "stream"
    presign_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    #: Also write control/mask preview videos beside each output.
    save_previews: bool = False
    #: Live previews: every N denoising steps (and after the last) the worker writes a small animated strip of
    #: the current denoised estimate (`GET /api/v3/predictions/{id}/progress` → `preview`); 0 = off.
    preview_every: int = Field(PREVIEW_EVERY_DEFAULT, ge=0, le=1000)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    log_level: str = "info"
    # -- engine: the options themselves are EngineSettings' (vace_local/core/config.py) --
    #: Ranks per job (vace_local.run.parallel): each worker is a group of this many GPUs (CPU: gloo ranks) that runs
    #: one job at a time, split CFG-parallel (when even and `cfg_parallel`) × Ulysses sequence-parallel.
    gpus_per_job: int = Field(1, ge=1, le=64)
    cfg_parallel: bool = True
    #: Per-request LoRAs (`loras` on every endpoint): the size bound of the disk cache of downloaded LoRA files.
    lora_cache_bytes: int = Field(8 * 1024**3, gt=0)
    #: TEST/LAPTOP ONLY, effective only with `model=tiny`: cap width/height (keeping aspect) and frame count
    #: so hosted-API sizes (832*480, 81 frames) run quickly on CPU. 0 = no cap.
    tiny_max_side: int = Field(0, ge=0)
    tiny_max_frames: int = Field(0, ge=0)
    tiny_max_steps: int = Field(0, ge=0)
    #: TEST ONLY, effective only with `model=tiny`: while this file exists, each job's denoising holds after the
    #: step written in it (empty: the first) until the job is cancelled or the file is removed, so tests act
    #: mid-run deterministically.
    tiny_hold_file: Path | None = None
    #: API model id or family → served model, e.g. `{"wan2.2-vace-fun-a14b": "wan2.1-vace-14b"}` to answer the
    #: AI/ML Wan 2.2 ids with Wan 2.1 VACE (env `VACE_MODEL_MAP` as JSON). Unmapped ids of another model → 4xx.
    model_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("api_keys", "allowed_hosts", "server_names", "allowed_origins", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return split_list(v)

    @field_validator("max_frames")
    @classmethod
    def _job_maximum(cls, v: int) -> int:
        """The server refuses a job maximum outside 17..9601 (the CLI clamps it: core.spec.max_job_frames)."""
        if not MIN_FRAMES <= v <= HARD_MAX_FRAMES:
            raise ValueError(f"max_frames must be within {MIN_FRAMES}..{HARD_MAX_FRAMES}, got {v}")
        return v

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("public_base_url must start with http:// or https://")
        return v

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> Settings:
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("storage=s3 needs s3_bucket (VACE_S3_BUCKET)")
        return self

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: Any) -> str:
        s = str(v).strip().lower()
        if s != "auto" and not (s.isdigit() and int(s) <= 64):
            raise ValueError(f"workers must be 'auto' or a count 0..64, got {v!r}")
        return s

    def engine_options(self, device: str):  # noqa: ANN201 - vace_local.engine.engine.EngineOptions (worker only)
        """The engine options the workers load with (imported lazily: the API process never needs them)."""
        from vace_local.engine.engine import EngineOptions

        aux = self.aux_gpu_bytes() if device != "cpu" else 0
        return EngineOptions.from_settings(self, device=device, aux_bytes=aux)

    def safety_options(self, device: str):  # noqa: ANN201 - vace_local.engine.safety_check.SafetyOptions (worker only)
        from vace_local.engine.safety_check import SafetyOptions

        return SafetyOptions.from_settings(self, device)

    def expander_options(self, device: str):  # noqa: ANN201 - vace_local.engine.prompt_expand.ExpanderOptions
        from vace_local.engine.prompt_expand import ExpanderOptions

        return ExpanderOptions.from_settings(self, device)

    def aux_gpu_bytes(self) -> int:
        """Weight bytes of the installed helper models, for the `auto` memory policy (0 when not installed)."""
        from vace_local.core.errors import ModelNotFoundError
        from vace_local.engine.models import resolve_aux_model, weights_bytes

        total = 0
        for model_id, name in ((self.safety_model, "safety"), (self.prompt_expander_model, "prompt-expander")):
            try:
                total += weights_bytes(resolve_aux_model(model_id, name))
            except ModelNotFoundError:
                pass
        return total

    def export_limits(self) -> None:
        """Make the job maximum the process-wide VACE_MAX_FRAMES that JobSpec validates against."""
        export(max_frames=self.max_frames)

    @property
    def is_tiny(self) -> bool:
        return self.model in TINY_MODELS

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def instance(self) -> str:
        """Stable across restarts (so a restarted server recovers its own jobs at once), distinct between
        servers on one host (each has its own port or data dir)."""
        if self.instance_id:
            return self.instance_id
        digest = hashlib.sha1(f"{self.data_dir.resolve()}:{self.port}".encode()).hexdigest()[:10]
        return f"{socket.gethostname()[:48]}-{digest}"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def prepare_dirs(self) -> None:
        for sub in ("uploads", "outputs", "work", "cache"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)


def max_request_bytes(settings: Settings) -> int:
    """Largest request body accepted: one upload-sized data URI in base64 (4/3) plus 1 MiB of JSON."""
    return settings.max_upload_bytes * 4 // 3 + (1 << 20)
