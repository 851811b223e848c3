"""Translation recipe: BLEU against bytes sent for each strategy config, at equal optimizer steps.

    python benchmarks/translation_recipe.py [--strategies ddp gossip_local ...] [--base quick.yaml]
                                            [--json FILE] [--timeout 1200] [-- extra CLI args]

Each strategy runs ``python -m recipes.translation fit --config configs/<base> --config
configs/strategies/<strategy>.yaml <extra>`` in its own process group (killed after ``--timeout`` s), with a
:class:`~recipes.translation.callbacks.RunSummary` callback: validation BLEU/chrF next to the training bytes rank 0
had sent (Lightning's ``ddp``: the ring all-reduce formula), the test scores of the average and the fit time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from harness import REPO_ROOT, Column, markdown_table, new_results, run_child, write_results

CONFIGS = REPO_ROOT / "recipes" / "translation" / "configs"
STRATEGIES = ("ddp", "gossip_local", "gossip_local_warmup", "gossip_local_int8", "local_sgd", "adacons",
              "scaled_adam")
COLUMNS = [Column("strategy", "strategy"), Column("steps", "steps", "d"), Column("val_bleu", "val BLEU", ".2f"),
           Column("val_chrf", "val chrF", ".2f"), Column("test_bleu", "test BLEU", ".2f"),
           Column("test_chrf", "test chrF", ".2f"), Column("sent", "MB sent per rank (training)", ",.1f", 1e6),
           Column("bytes", "bytes"), Column("bytes_ratio", "vs DDP", ".3f"),
           Column("fit_seconds", "fit time (s)", ".0f")]


def run_strategy(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Fit and test one strategy; its RunSummary record with the command and wall time, or None on failure."""
    summary = args.workdir / name / "summary.json"
    if args.reuse and summary.is_file() and "test" in json.loads(summary.read_text()):
        return json.loads(summary.read_text())
    summary.unlink(missing_ok=True)
    command = [sys.executable, "-m", "recipes.translation", "fit",
               "--config", str((CONFIGS / args.base).relative_to(REPO_ROOT)),
               "--config", str((CONFIGS / "strategies" / f"{name}.yaml").relative_to(REPO_ROOT)),
               "--trainer.logger=false", "--trainer.enable_checkpointing=false",
               "--trainer.callbacks=[lightning_dopt.callbacks.CommReport, recipes.translation.callbacks.RunSummary]",
               f"--trainer.callbacks.path={summary}", "--trainer.enable_progress_bar=false", *args.extra]
    child = run_child(command, args.workdir / name / "run.log", args.timeout)
    record = json.loads(summary.read_text()) if summary.is_file() else {}
    if child.returncode != 0 or "test" not in record:
        print(f"[{name}] {child.failure()}", flush=True)
        return None
    record |= {"command": shlex.join(["python", *command[1:]]), "wall_seconds": child.seconds}
    summary.write_text(json.dumps(record, indent=1))
    print(f"[{name}] val BLEU {record['validations'][-1]['bleu']:.2f}, test BLEU {record['test']['bleu']:.2f}, "
          f"{child.seconds:.0f} s", flush=True)
    return record


def plot(records: dict[str, dict[str, Any]], path: Path) -> None:
    """Validation BLEU against the training bytes rank 0 had sent, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, record in records.items():
        points = [(v["training_bytes_sent"] / 1e6, v["bleu"]) for v in record["validations"]]
        axis.plot(*zip(*points), marker="o", label=name)
    axis.set(xscale="log", xlabel="MB sent per rank for training (log scale; ddp: ring all-reduce formula)",
             ylabel="validation BLEU (Ruth + Jonah)", title="Translation recipe: BLEU vs bytes sent")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "gossip_local"], choices=STRATEGIES)
    parser.add_argument("--base", default="quick.yaml", help="base config in recipes/translation/configs")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "runs" / "translation" / "benchmark")
    parser.add_argument("--json", type=Path, help="write the results (harness JSON) here")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "docs" / "img" / "translation_bleu_vs_bytes.png")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds for each run (fit + test)")
    parser.add_argument("--reuse", action="store_true", help="skip strategies whose summary already has test scores")
    parser.add_argument("extra", nargs="*", help="extra CLI arguments for every run (after --)")
    args = parser.parse_args()
    if not (CONFIGS / args.base).is_file():
        parser.error(f"no config {CONFIGS / args.base}")
    results = new_results("translation_recipe", vars(args))
    records = {name: record for name in args.strategies if (record := run_strategy(name, args)) is not None}
    if not records:
        raise SystemExit("every run failed")
    for name, record in records.items():
        fit, last, test = record["fit"], record["validations"][-1], record["test"]
        ddp = records["ddp"]["fit"]["training_bytes_sent"] if "ddp" in records else None
        results["rows"].append({
            "strategy": name, "steps": fit["steps"], "val_bleu": last["bleu"], "val_chrf": last["chrf"],
            "test_bleu": test["bleu"], "test_chrf": test["chrf"], "sent": fit["training_bytes_sent"],
            "bytes": "counted" if fit["bytes_counted"] else "formula", "fit_seconds": fit["seconds"],
            "bytes_ratio": fit["training_bytes_sent"] / ddp if ddp else None, "record": record})
    print(markdown_table(results["rows"], COLUMNS))
    if args.json:
        write_results(args.json, results)
    plot(records, args.plot)


if __name__ == "__main__":
    main()
