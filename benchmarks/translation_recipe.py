"""Translation recipe: BLEU against bytes sent for each strategy config, at equal optimizer steps.

Usage::

    python benchmarks/translation_recipe.py [--strategies ddp gossip_local ...] [--base quick.yaml]
                                            [--out docs/recipes/translation.md] [--timeout 1200] [-- extra CLI args]

For each strategy it runs, in its own process group killed after ``--timeout`` seconds,

    python -m recipes.translation fit --config configs/<base> --config configs/strategies/<strategy>.yaml <overrides>

(``fit`` ends with a test of the trained model, the average of the replicas) with the same seed, data, model,
batch size per rank and number of optimizer steps, and a :class:`~recipes.translation.callbacks.RunSummary`
callback that records validation BLEU/chrF next to the bytes rank 0 had sent (training traffic: warm-up,
aggregation and rounds; Lightning's ``ddp`` is not instrumented, so its bytes are the ring all-reduce formula
``steps · 2(n−1)/n · P``). It then writes a markdown table and ``docs/img/translation_bleu_vs_bytes.png`` into the
``## Results`` section of ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.results_doc import write_section  # noqa: E402

CONFIGS = REPO_ROOT / "recipes" / "translation" / "configs"
STRATEGIES = ("ddp", "gossip_local", "gossip_local_warmup", "gossip_local_int8", "local_sgd", "adacons",
              "scaled_adam")
TITLE = "## Results"
PLOT = REPO_ROOT / "docs" / "img" / "translation_bleu_vs_bytes.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "gossip_local"], choices=STRATEGIES)
    parser.add_argument("--base", default="quick.yaml", help="base config in recipes/translation/configs")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "runs" / "translation" / "benchmark")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "recipes" / "translation.md")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds for each run (fit + test)")
    parser.add_argument("--reuse", action="store_true", help="skip strategies whose summary already has test scores")
    parser.add_argument("--note", default="", help="a sentence added to the results section (how it was run)")
    parser.add_argument("extra", nargs="*", help="extra CLI arguments for every run (after --)")
    args = parser.parse_args(argv)
    if not (CONFIGS / args.base).is_file():
        parser.error(f"no config {CONFIGS / args.base}")
    return args


def _run(command: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run ``command`` in its own process group (all ranks), killing the group after ``timeout`` seconds."""
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = -signal.SIGKILL
    return code, time.perf_counter() - start


def run_strategy(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Fit and test one strategy; the RunSummary record with the command and wall time, or None on failure."""
    workdir = args.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    summary = workdir / "summary.json"
    if args.reuse and summary.is_file() and "test" in json.loads(summary.read_text()):
        return json.loads(summary.read_text())
    summary.unlink(missing_ok=True)
    command = [sys.executable, "-m", "recipes.translation", "fit",
               "--config", str((CONFIGS / args.base).relative_to(REPO_ROOT)),
               "--config", str((CONFIGS / "strategies" / f"{name}.yaml").relative_to(REPO_ROOT)),
               "--trainer.logger=false", "--trainer.enable_checkpointing=false",
               "--trainer.callbacks=[lightning_dopt.callbacks.CommReport, recipes.translation.callbacks.RunSummary]",
               f"--trainer.callbacks.path={summary}", "--trainer.enable_progress_bar=false", *args.extra]
    code, seconds = _run(command, workdir / "run.log", args.timeout)
    record = json.loads(summary.read_text()) if summary.is_file() else {}
    if code != 0 or "test" not in record:
        print(f"[{name}] failed (exit {code}); see {workdir / 'run.log'}", flush=True)
        return None
    record["command"] = shlex.join(["python", *command[1:]])
    record["wall_seconds"] = seconds
    summary.write_text(json.dumps(record, indent=1))
    print(f"[{name}] val BLEU {record['validations'][-1]['bleu']:.2f}, test BLEU {record['test']['bleu']:.2f}, "
          f"{seconds:.0f} s", flush=True)
    return record


def _megabytes(value: float) -> str:
    return f"{value / 1e6:,.1f}"


def markdown_table(records: dict[str, dict[str, Any]]) -> str:
    reference = records.get("ddp")
    ddp_bytes = reference["fit"]["training_bytes_sent"] if reference else None
    lines = ["| strategy | steps | val BLEU | val chrF | test BLEU | test chrF | MB sent per rank (training) | vs DDP "
             "| fit time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, record in records.items():
        fit, last, test = record["fit"], record["validations"][-1], record["test"]
        sent = fit["training_bytes_sent"]
        ratio = f"{sent / ddp_bytes:.3f}" if ddp_bytes else "–"
        marker = "" if fit["bytes_counted"] else " (formula)"
        lines.append(f"| {name} | {fit['steps']} | {last['bleu']:.2f} | {last['chrf']:.2f} | {test['bleu']:.2f} | "
                     f"{test['chrf']:.2f} | {_megabytes(sent)}{marker} | {ratio} | {fit['seconds']:.0f} s |")
    return "\n".join(lines)


def plot(records: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, record in records.items():
        points = [(v["training_bytes_sent"] / 1e6, v["bleu"]) for v in record["validations"]]
        axis.plot(*zip(*points), marker="o", label=name)
    axis.set_xscale("log")
    axis.set_xlabel("MB sent per rank for training (log scale; ddp: ring all-reduce formula)")
    axis.set_ylabel("validation BLEU (Ruth + Jonah)")
    axis.set_title("Translation recipe, quick config: BLEU vs bytes sent")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def results_section(records: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    any_record = next(iter(records.values()))
    fit = any_record["fit"]
    load = os.getloadavg()
    commands = "\n".join(record["command"].replace(f"{REPO_ROOT}/", "") for record in records.values())
    extra = " -- " + " ".join(args.extra) if args.extra else ""
    note = f"\n\n{args.note}" if args.note else ""
    return f"""{TITLE}

Produced by `python benchmarks/translation_recipe.py --strategies {' '.join(records)}{extra}`
on {datetime.date.today().isoformat()}: base config `{args.base}`, {fit['world_size']} CPU processes,
{fit['steps']} optimizer steps each, {fit['parameters']:,} parameters, same seed, data and batches. Validation BLEU
is greedy on Ruth + Jonah (133 verses), test BLEU is beam 4 on the test books (Esther + Acts, `max_eval_pairs` of
them), both sacreBLEU corpus scores of the averaged model. "MB sent" is rank 0's training traffic (warm-up,
aggregation, rounds) from `strategy.comm_stats`; the start broadcast, evaluation on the average and the final
average are excluded. Wall times were measured on a shared 2-core machine (load average at the end
{load[0]:.1f}), so compare them only within this table.{note}

{markdown_table(records)}

![BLEU vs bytes sent](../img/{PLOT.name})

Commands that were run:

```
{commands}
```
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    records = {name: record for name in args.strategies if (record := run_strategy(name, args)) is not None}
    if not records:
        raise SystemExit("every run failed")
    plot(records, PLOT)
    write_section(args.out, TITLE, results_section(records, args), intro="# Translation recipe\n")
    print(markdown_table(records))


if __name__ == "__main__":
    main()
