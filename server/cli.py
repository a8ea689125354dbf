"""`vace-local serve`: the API and its workers in one command (options override `VACE_*` env settings)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from vace_local.core.config import engine_flags, settings_error_text

log = logging.getLogger("vace.server")


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@engine_flags(env_help=True)
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1; VACE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000; VACE_PORT).")] = None,
    model: Annotated[str | None, typer.Option(help="Model the workers load; 'tiny' = random-weight smoke "
                                                   "model (VACE_MODEL).")] = None,
    workers: Annotated[str | None, typer.Option(help="'auto' (one per GPU, else one CPU worker) or a count; "
                                                     "0 = API only (VACE_WORKERS).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Job store, uploads and outputs (VACE_DATA_DIR).")] = None,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="Accepted API key (repeatable; "
                                                                         "VACE_API_KEYS=a,b).")] = None,
    public_base_url: Annotated[str | None, typer.Option(help="Base of returned URLs "
                                                             "(VACE_PUBLIC_BASE_URL).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug | info | warning | error")] = None,
    engine: dict | None = None,  # the EngineSettings flags (--offload, --dtype, ... --lora): see engine_flags
    gpus_per_job: Annotated[int | None, typer.Option(help="GPUs per job: workers become groups of N GPUs "
                                                          "(CFG x Ulysses parallel; VACE_GPUS_PER_JOB).")] = None,
) -> None:
    """Serve the hosted-API-compatible HTTP API (WaveSpeed, fal, AI/ML) with GPU workers."""
    import uvicorn

    from server.app import create_app
    from server.http_guard import guarded_protocol, raise_fd_limit
    from server.settings import Settings

    overrides: dict[str, Any] = {k: v for k, v in {
        "host": host, "port": port, "model": model, "workers": workers, "data_dir": data_dir,
        "api_keys": api_key or None, "public_base_url": public_base_url, "ssl_certfile": ssl_certfile,
        "ssl_keyfile": ssl_keyfile, "log_level": log_level, "gpus_per_job": gpus_per_job, **(engine or {}),
    }.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # named as its variable (a flag's value is checked by the same field)
        typer.secho(f"error: {settings_error_text(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - pydantic messages name the setting
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        typer.secho("error: --ssl-certfile and --ssl-keyfile go together", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if not settings.auth_enabled:
        if not _is_loopback(settings.host):
            log.warning("no API key configured: refusing to listen on %s; binding to 127.0.0.1 only "
                        "(set --api-key / VACE_API_KEYS to serve other hosts)", settings.host)
            settings = settings.model_copy(update={"host": "127.0.0.1"})
        else:
            log.warning("no API key configured: the API is open to anyone on this machine")
    if settings.is_tiny:
        log.warning("model 'tiny': outputs come from a tiny random-weight model and are noise")
    app = create_app(settings)
    fds = raise_fd_limit()
    if fds < settings.max_connections + 64:
        log.warning("open-file limit %d is below max_connections (%d) + headroom; lower VACE_MAX_CONNECTIONS or "
                    "raise the limit (ulimit -n)", fds, settings.max_connections)
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        timeout_graceful_shutdown=15, access_log=False,
        # Connection guards (server/http_guard.py): h11 for its head-size limit, plus a head deadline and a cap.
        http=guarded_protocol(settings.header_timeout_s, settings.max_connections),
        limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_timeout_s,
        h11_max_incomplete_event_size=settings.max_header_bytes, backlog=settings.backlog,
    )


def main() -> None:
    typer.run(serve)
