"""What the benchmark scripts share: child runs, machine facts, JSON results, the table, plots and recipe runs."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # ``recipes`` is not an installed package: the scripts import it from the checkout
    sys.path.insert(0, str(REPO_ROOT))
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK")
# ^ removed from a child's environment, so that its launcher starts its own ranks on a fresh port
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


@dataclass(frozen=True)
class Contender:
    """A way of training: its name, its ``GossipLocalStrategy`` options, the settings the script reads itself."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


class Column(NamedTuple):
    """A table column: the row key, the header, the format spec ("" for text), the unit values are divided by."""

    key: str
    header: str
    spec: str = ""
    unit: float = 1.0


@dataclass(frozen=True)
class ChildRun:
    """How a child command ended: its exit code (``None``: killed at the timeout), wall seconds and log file."""

    returncode: int | None
    seconds: float
    log: Path

    def failure(self) -> str:
        ending = "killed at the timeout" if self.returncode is None else f"exit code {self.returncode}"
        tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        return f"FAILED ({ending} after {self.seconds:.0f} s); end of {self.log}:\n{tail}"


def run_child(command: Sequence[str], log: Path, timeout: float, omp_threads: int | None = None,
              env: Mapping[str, str] | None = None) -> ChildRun:
    """Run ``command`` from the repository root in a new process group (its launcher's ranks join it), output in
    ``log``, with ``env`` less :data:`LAUNCHER_VARIABLES`; the group is killed unless it ends well in ``timeout`` s."""
    variables = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES} | dict(env or {})
    variables |= {} if omp_threads is None else {"OMP_NUM_THREADS": str(omp_threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    started, returncode = time.perf_counter(), None
    with log.open("w") as output:
        process = subprocess.Popen(list(command), cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   env=variables, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if returncode != 0:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return ChildRun(returncode, time.perf_counter() - started, log)


def child_command(*options: str) -> list[str]:
    """This script's command line with ``options`` after it (argparse keeps their last value)."""
    return [sys.executable, str(Path(sys.argv[0]).resolve()), *sys.argv[1:], *options]


def read_result(path: Path, run: ChildRun) -> dict[str, Any] | None:
    """The JSON a child wrote to ``path``; ``None``, after printing how the child ended, when it wrote none."""
    if path.is_file():
        return json.loads(path.read_text())
    print(run.failure(), flush=True)
    return None


def load_average() -> float:
    return os.getloadavg()[0]


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def machine_facts() -> dict[str, Any]:
    """UTC date and time, torch and lightning versions, CPU model and count, 1-minute load average now."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    models = [line.partition(":")[2].strip() for line in cpuinfo if line.startswith("model name")]
    return {"date": utc_now(), "torch": version("torch"), "lightning": version("lightning"),
            "cpu": models[0] if models else platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_start": load_average()}


def new_results(benchmark: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The results document before its rows, with this process's command line and the machine's facts now. Paths
    inside the repository are kept relative to it, so a committed document names no folder of the machine."""
    return {"benchmark": benchmark, "command": shlex.join(["python", *sys.argv]), "started": utc_now(),
            "machine": machine_facts(), "config": {key: _portable(value) for key, value in config.items()},
            "rows": []}


def _portable(value: Any) -> Any:
    """A path under the repository as its path relative to the repository root; anything else unchanged."""
    if isinstance(value, Path) and value.is_absolute() and value.is_relative_to(REPO_ROOT):
        return value.relative_to(REPO_ROOT)
    return value


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    """Write ``results`` to ``path`` as JSON atomically, with ``load_end`` and ``ended`` added to its machine facts."""
    document = {**results, "machine": {**results["machine"], "load_end": load_average(), "ended": utc_now()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(document, indent=1, default=str) + "\n")
    os.replace(staging, path)


def report(results: Mapping[str, Any], columns: Sequence[Column], path: Path | None) -> None:
    """Print the rows of ``results`` as a markdown table; write ``results`` to ``path`` unless it is ``None``."""
    print("\n" + markdown_table(results["rows"], columns), flush=True)
    if path:
        write_results(path, results)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A cell is ``format(row[key] / unit, spec)``, text as it is, ``-`` when missing or ``None``."""
    lines = ["| " + " | ".join(column.header for column in columns) + " |",
             "|" + "|".join("---:" if column.spec else "---" for column in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_cell(row.get(column.key), column) for column in columns) + " |"
                              for row in rows])


def _cell(value: Any, column: Column) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) or not column.spec:
        return str(value)
    return format(value / column.unit if column.unit != 1 else value, column.spec)


def comma_list(kind: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """An argparse type: ``"a,b"`` as ``[kind("a"), kind("b")]``."""
    return lambda text: [kind(part.strip()) for part in text.split(",") if part.strip()]


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path, dpi: int = 120) -> None:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


def plot_lines(lines: Mapping[str, Sequence[tuple[float, float]]], path: Path, xlabel: str, ylabel: str,
               title: str = "", level: float | None = None) -> None:
    """One line of ``(x, y)`` points per name (``ddp*`` dashed), x on a log axis; a dotted line at y = ``level``."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure, axis = pyplot().subplots(figsize=(7, 4.2))
    for name, points in lines.items():
        if points:
            axis.plot(*zip(*points), "--" if name.startswith("ddp") else "-", marker="o", markersize=3, label=name)
    if level is not None:
        axis.axhline(level, color="gray", linewidth=0.8, linestyle=":")
    axis.set(xscale="log", xlabel=xlabel, ylabel=ylabel)
    axis.set_title(title, fontsize=9)
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def recipe_args(description: str, strategies: Sequence[str], default: Sequence[str], results_dir: Path,
                timeout: float, plot: Path | None) -> argparse.Namespace:
    """The command line of ``vision_recipe`` and ``translation_recipe``."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--strategies", nargs="+", type=comma_list(), default=[list(default)],
        help=f"strategy configs, space- or comma-separated, of: {', '.join(strategies)}")
    add("--base", default="quick.yaml", help="base config of every run (in the recipe's configs/)")
    add("--results-dir", type=Path, default=results_dir, help="every run's output and summary.json go here")
    add("--json", type=Path, help="write the results (harness JSON) here")
    add("--timeout", type=float, default=timeout, help="seconds per run")
    add("--plot", type=Path, default=plot, help="PNG of the validation metric against bytes sent")
    add("--report-only", action="store_true", help="run nothing: report (and plot) the runs stored in --results-dir")
    add("--extra", nargs=argparse.REMAINDER, default=[], help="everything after this goes to every run's command line")
    args = parser.parse_args()
    args.strategies = [n for names in args.strategies for n in names]
    if not args.strategies or set(args.strategies) - set(strategies):
        parser.error(f"unknown strategies {sorted(set(args.strategies) - set(strategies))}")
    args.results_dir = args.results_dir.resolve()
    return args


def run_recipe(recipe: str, name: str, base: str, options: Sequence[str], out_dir: Path,
               timeout: float) -> tuple[ChildRun, dict[str, Any]]:
    """Run ``recipes.<recipe> fit`` on ``base`` and strategy config ``name``: the child, its command and facts."""
    configs = REPO_ROOT / "recipes" / recipe / "configs"
    command = [sys.executable, "-m", f"recipes.{recipe}", "fit", f"--config={configs / base}",
               f"--config={configs / 'strategies' / name}.yaml", *options]
    recorded = shlex.join(["python", *command[1:]]).replace(f"{REPO_ROOT}/", "")
    print(f"[{name}] {recorded}", flush=True)
    load_start, date = load_average(), utc_now()
    child = run_child(command, out_dir / "output.txt", timeout, env={"PYTHONUNBUFFERED": "1"})
    return child, {"command": recorded, "wall_seconds": child.seconds, "load_start": load_start,
                   "load_end": load_average(), "date": date}
