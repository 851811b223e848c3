"""Every test sees the environment variables it started with.

Lightning's popen launcher writes ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
into ``os.environ`` of the process that calls ``fit`` (even with one device). A test that fits in the pytest
process would otherwise leak ``LOCAL_RANK`` into every later subprocess, and a later 2-rank run would believe its
ranks were launched externally: rank 0 then waits for a rank 1 that nobody starts.

It also puts ``tests/`` on ``sys.path`` for the helpers shared by all test folders (:mod:`ports`).
"""

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
