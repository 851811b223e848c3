"""Helpers shared by the recipe tests: run a recipe's command line in a subprocess with a hard timeout; build a
strategy from a parsed (not instantiated) config."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonargparse import Namespace
from ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_recipe(module: str, args: list[str], timeout: float, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` from the repository root, W&B offline, and return its output.

    The command runs in its own session so that on timeout the whole process group (Lightning's popen launcher
    starts one process per extra rank) is killed; the test then fails with the output so far. ``MASTER_PORT`` is
    chosen outside the kernel's ephemeral range (:func:`ports.free_port`).
    """
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(free_port())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", module, *args]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"`{' '.join(command)}` did not finish within {timeout} s; output:\n{output[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def built_value(value: Any) -> Any:
    """A parsed ``class_path`` value as LightningCLI passes it to the strategy: an optimizer class becomes a factory
    ``params -> optimizer`` (an outer optimizer), any other class (a codec) an instance; plain values unchanged."""
    if not (isinstance(value, Namespace) and "class_path" in value):
        return value
    module, name = value.class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    init_args = vars(value.get("init_args") or Namespace())
    if issubclass(cls, torch.optim.Optimizer):
        return functools.partial(cls, **init_args)
    return cls(**init_args)


def built_strategy_args(init_args: Namespace) -> dict[str, Any]:
    """A parsed strategy's ``init_args`` as keyword arguments (``None`` values left to the strategy's defaults)."""
    return {key: built_value(value) for key, value in vars(init_args).items() if value is not None}
