"""The popen launcher (``Trainer(strategy="gossip_local", devices=n)`` from a script) ends every rank it started
when rank 0 fails, also before the process group exists."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port

pytestmark = pytest.mark.timeout(180)

_SCRIPT = """
import sys
from datetime import timedelta

import lightning as L

from lightning_dopt import GossipLocalStrategy
from lightning_dopt.launchers import CheckedSubprocessLauncher
from lightning_models import RegressionModel

CheckedSubprocessLauncher.child_exit_grace_s = 3.0
strategy = GossipLocalStrategy(timeout=timedelta(minutes=10))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(RegressionModel())
"""


def test_rank_1_is_ended_when_rank_0_cannot_open_the_rendezvous(tmp_path: Path) -> None:
    """Rank 0 finds ``MASTER_PORT`` taken and raises; rank 1 has connected to the port's holder and would wait
    for the 10-minute rendezvous timeout. The launcher gives it the grace period and kills it."""
    port = free_port()
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), str(Path(__file__).resolve().parents[2])])}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:  # listens, never answers
        holder.bind(("", port))
        holder.listen(8)
        start = time.monotonic()
        process = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=120)  # returns once every rank has closed the pipe
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"the ranks were still running after 120 s:\n{output[-4000:]}")
        elapsed = time.monotonic() - start
    assert process.returncode != 0
    assert "EADDRINUSE" in output, output[-4000:]
    assert "rank 0 failed and 1 rank(s) it started were still running 3 s later; killing them" in output, \
        output[-4000:]
    assert elapsed < 90, f"took {elapsed:.0f} s"
