"""Shared test setup: fully offline, tiny models cached under .cache/ in the repo, fixtures from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"

# Set before anything imports huggingface_hub / diffusers: no network, a private empty HF cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "hf-test"))
os.environ.setdefault("VACE_CACHE_DIR", str(ROOT / ".cache" / "test-models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    if os.environ.get("VACE_REQUIRE_CUDA") == "1":  # set by scripts/device_check.sh: a skip would hide a broken GPU
        pytest.exit("VACE_REQUIRE_CUDA=1 but CUDA is not available (torch.cuda.is_available() is False)",
                    returncode=2)
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def pg_cluster():
    """One throw-away PostgreSQL server for the session (skips, naming why, where none can be started)."""
    from tests.pg_server import PgCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()
