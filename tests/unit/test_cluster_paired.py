"""``benchmarks/cluster/paired.py``: pairs alternate their order, each pair's ratio is B's step over A's, stored runs
are read instead of run again, and bad arguments are refused before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PAIRED = Path(__file__).resolve().parents[2] / "benchmarks" / "cluster" / "paired.py"
CONFIG = {"ranks": 4, "rate_mbit": 100.0, "steps": 24, "batch_size": 125, "eval_every": 12, "hidden": 2048,
          "lr": 0.1, "momentum": 0.9, "local_steps": 2, "warmup": 0, "powersgd_rank": 4, "test_limit": 0, "seed": 0,
          "threads": 1, "compute_sleep": 0.0, "ranks_per_node": 1}


def stored_run(name: str, seed: int, step_seconds: float, accuracy: float) -> dict[str, Any]:
    """A finished run as ``bench.py`` stores it: every rank's clock advances ``step_seconds`` per step."""
    steps = CONFIG["steps"]
    clock = [step_seconds * (s + 1) for s in range(steps)]
    rank = {"steps": steps, "params": 1000, "clock": clock, "counted_kind": "bytes", "counted_bytes": 100.0 * steps,
            "wire_tx_bytes": 110.0 * steps, "comm_seconds": 0.01 * steps,
            "evals": [{"step": steps, "clock": clock[-1], "accuracy": accuracy, "counted_bytes": 100.0 * steps,
                       "eval_seconds": 1.0}]}
    return {"status": "ok", "contender": name, "config": {**CONFIG, "seed": seed}, "ranks": [rank] * 4,
            "load_start": [1.0], "load_end": [2.0], "date": "2026-12-06 06:00 UTC", "command": "stored"}


def test_stored_pairs_give_ratios_in_alternating_order(tmp_path: Path) -> None:
    steps = {("ddp_powersgd", 0): [0.30, 0.32], ("sparse_local_sgd_g16_m8_h2", 0): [0.24, 0.33]}
    for (name, seed), per_pair in steps.items():
        for index, seconds in enumerate(per_pair):
            folder = tmp_path / f"seed{seed}" / f"pair{index}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.json").write_text(json.dumps(stored_run(name, seed, seconds, 85.0 + index)))
    out = tmp_path / "paired.json"
    done = subprocess.run([sys.executable, str(PAIRED), "--a", "ddp_powersgd", "--b", "sparse_local_sgd_g16_m8_h2",
                           "--pairs", "2", "--results-dir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "B faster in 1 of 2 pairs" in done.stdout
    record = json.loads(out.read_text())
    first, second = record["pairs"]
    assert first["order"] == ["ddp_powersgd", "sparse_local_sgd_g16_m8_h2"]
    assert second["order"] == ["sparse_local_sgd_g16_m8_h2", "ddp_powersgd"]
    assert abs(first["ratio"] - 0.24 / 0.30) < 1e-9 and abs(second["ratio"] - 0.33 / 0.32) < 1e-9
    assert (first["a_accuracy"], second["b_accuracy"]) == (85.0, 86.0)
    assert record["summary"]["0"]["b_faster"] == 1 and record["summary"]["0"]["pairs"] == 2


def test_bad_arguments_are_refused_before_any_run(tmp_path: Path) -> None:
    for arguments, message in ((["--a", "ddp", "--b", "ddp"], "two different contenders"),
                               (["--a", "ddp", "--b", "no_sync", "--pairs", "0"], "--pairs must be >= 1"),
                               (["--a", "ddp", "--b", "no_sync", "--seeds", "0,x"], "comma-separated integers"),
                               (["--a", "ddp", "--b", "nope"], "invalid choice: 'nope'")):
        done = subprocess.run([sys.executable, str(PAIRED), *arguments, "--results-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not any(tmp_path.iterdir())
