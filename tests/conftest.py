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


@pytest.fixture(scope="session")
def realarch_wan21() -> Path:
    """Wan2.1-VACE-1.3B architecture at 2 layers / 1 VACE layer, real VAE and UMT5 widths (tests/realarch.py)."""
    from tests.realarch import build_wan21_vace

    return build_wan21_vace()


@pytest.fixture(scope="session")
def realarch_wan21_narrow_vae() -> Path:
    """As `realarch_wan21` with a narrower VAE (same class): for tests that run many jobs on CPU."""
    from tests.realarch import build_wan21_vace

    return build_wan21_vace(vae_base_dim=16)


@pytest.fixture(scope="session")
def realarch_wan22() -> Path:
    """The Wan2.2-VACE-Fun two-expert layout at the 1.3B width, 2 layers per expert (tests/realarch.py)."""
    from tests.realarch import build_wan22_vace

    return build_wan22_vace(vae_base_dim=16)
