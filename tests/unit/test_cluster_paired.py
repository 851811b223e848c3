"""``benchmarks/cluster/paired.py`` against a stand-in for ``bench.py``: the run order alternates from pair to pair
across seeds, each pair's ratio is B's step over A's, ``--rerun`` and the extra arguments reach every run, an
unfinished run stops the comparison, and bad arguments are refused before anything runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

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


def load_paired() -> Any:
    spec = importlib.util.spec_from_file_location("dopt_cluster_paired", PAIRED)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


paired = load_paired()


class FakeBench:
    """Stands for ``bench.py``: records which contender ran for which seed and stores a run with the step time of
    ``seconds[(name, seed)]``'s next entry."""

    def __init__(self, seconds: dict[tuple[str, int], list[float]]) -> None:
        self.seconds = {key: list(values) for key, values in seconds.items()}
        self.calls: list[tuple[str, int, list[str]]] = []

    def __call__(self, command: list[str]) -> None:
        def value(option: str) -> str:
            return command[command.index(option) + 1]

        name, seed, folder = value("--contenders"), int(value("--seed")), Path(value("--results-dir"))
        self.calls.append((name, seed, command))
        folder.mkdir(parents=True, exist_ok=True)
        step = self.seconds[(name, seed)].pop(0)
        paired.result_path(folder, name, seed).write_text(json.dumps(stored_run(name, seed, step, 85.0 + step)))


def test_pairs_alternate_across_seeds_and_give_b_over_a(tmp_path: Path) -> None:
    a, b = "ddp_powersgd", "sparse_local_sgd_g16_m8_h2"
    bench = FakeBench({(a, 0): [0.30, 0.32, 0.29], (b, 0): [0.24, 0.33, 0.22],
                       (a, 1): [0.31, 0.28, 0.30], (b, 1): [0.25, 0.21, 0.26]})
    out = tmp_path / "paired.json"
    paired.main(["--a", a, "--b", b, "--seeds", "0,1", "--pairs", "3", "--results-dir", str(tmp_path / "runs"),
                 "--json", str(out), "--", "--steps", "24"], runner=bench)
    order = [(a, b), (b, a), (a, b), (b, a), (a, b), (b, a)]  # the alternation goes on across the seed change
    assert [(name, seed) for name, seed, _ in bench.calls] == [
        (name, seed) for seed, pair in zip((0, 0, 0, 1, 1, 1), order) for name in pair]
    for _, _, command in bench.calls:
        assert command[-2:] == ["--steps", "24"] and "--rerun" not in command
    record = json.loads(out.read_text())
    assert [tuple(p["order"]) for p in record["pairs"]] == order
    ratios = [p["ratio"] for p in record["pairs"]]
    assert ratios == pytest.approx([0.24 / 0.30, 0.33 / 0.32, 0.22 / 0.29, 0.25 / 0.31, 0.21 / 0.28, 0.26 / 0.30],
                                   rel=1e-9)
    assert record["pairs"][1]["a_accuracy"] == pytest.approx(85.32)
    assert record["summary"]["0"] == {"median_ratio": pytest.approx(0.24 / 0.30),
                                      "max_ratio": pytest.approx(0.33 / 0.32), "b_faster": 2, "pairs": 3}
    assert record["summary"]["1"]["b_faster"] == 3


def test_rerun_reaches_every_bench_command_and_an_unfinished_run_stops(tmp_path: Path) -> None:
    a, b = "ddp", "no_sync"
    bench = FakeBench({(a, 0): [3.2], (b, 0): [0.1]})
    paired.main(["--a", a, "--b", b, "--pairs", "1", "--results-dir", str(tmp_path), "--rerun"], runner=bench)
    assert all("--rerun" in command for _, _, command in bench.calls) and len(bench.calls) == 2

    def unfinished(command: list[str]) -> None:
        folder = Path(command[command.index("--results-dir") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        paired.result_path(folder, a, 0).write_text(json.dumps({"status": "timeout"}))

    with pytest.raises(SystemExit, match=r"the run did not finish \(timeout\)"):
        paired.main(["--a", a, "--b", b, "--pairs", "1", "--results-dir", str(tmp_path / "other")], runner=unfinished)


def test_bad_arguments_are_refused_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def never(command: list[str]) -> None:
        raise AssertionError(f"ran {command}")

    for arguments, message in ((["--a", "ddp", "--b", "ddp"], "two different contenders"),
                               (["--a", "ddp", "--b", "no_sync", "--pairs", "0"], "--pairs must be >= 1"),
                               (["--a", "ddp", "--b", "no_sync", "--seeds", "0,x"], "comma-separated integers"),
                               (["--a", "ddp", "--b", "nope"], "invalid choice: 'nope'"),
                               (["--a", "ddp", "--b", "no_sync", "--", "--seed=3"], "--seed after '--'"),
                               (["--a", "ddp", "--b", "no_sync", "--", "--results-dir", "x"], "--results-dir after")):
        with pytest.raises(SystemExit) as exit_info:
            paired.main([*arguments, "--results-dir", str(tmp_path)], runner=never)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
