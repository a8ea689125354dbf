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
