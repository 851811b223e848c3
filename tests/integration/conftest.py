"""Make ``lightning_models`` and ``combination_matrix`` importable here and in the spawned rank processes (they
inherit sys.path), and the distributed tests' ``helpers`` (``run_ranks``); the ``launcher`` fixture (one rank fork
server per test module, :mod:`reliability_models`)."""

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
sys.path.insert(0, os.path.dirname(__file__))

from reliability_models import RankLauncher  # noqa: E402


@pytest.fixture(scope="module")
def launcher() -> Iterator[RankLauncher]:
    server = RankLauncher()
    try:
        yield server
    finally:
        server.close()
