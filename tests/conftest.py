"""Shared pytest fixtures and settings.

Tests build their own small data in temporary folders; none reads the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} not found: the tests expect ../shared beside the repository (as CI has it)")
    return SHARED


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny world of every stage (checkpoints, phantoms, a latent cache, a factor bank), built once
    per test run (tests/support/world.py). Tests read it and write elsewhere."""
    from tests.support.world import session_world

    return session_world(tmp_path_factory)


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # CI machines have 2 cores; MEDUET_TEST_THREADS lets parallel local runs share them.
    torch.set_num_threads(int(os.environ.get("MEDUET_TEST_THREADS", "2")))
