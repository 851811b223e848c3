"""Translation recipe: BLEU against bytes sent for each strategy config, at equal optimizer steps.

Each run is ``python -m recipes.translation fit`` on ``--base`` and the strategy config plus ``--extra``, with a
:class:`~recipes.translation.callbacks.RunSummary` callback: validation BLEU/chrF next to the training bytes rank 0 had
sent (Lightning's ``ddp``: the ring all-reduce formula), the test scores of the average and the fit time.
"""

from __future__ import annotations

import json
from typing import Any

from harness import REPO_ROOT, Column, new_results, plot_lines, recipe_args, report, run_recipe

STRATEGIES = ("ddp", "gossip_local", "gossip_local_warmup", "gossip_local_int8", "post_local_int8",
              "post_local_int8_outer", "sparse_local_sgd", "local_sgd", "adacons", "scaled_adam", "noloco")
COLUMNS = [Column("strategy", "strategy"), Column("steps", "steps", "d"), Column("val_bleu", "val BLEU", ".2f"),
           Column("val_chrf", "val chrF", ".2f"), Column("test_bleu", "test BLEU", ".2f"),
           Column("test_chrf", "test chrF", ".2f"), Column("sent", "MB sent per rank (training)", ",.1f", 1e6),
           Column("bytes", "bytes"), Column("bytes_ratio", "vs DDP", ".3f"),
           Column("fit_seconds", "fit time (s)", ".0f")]


def run_strategy(name: str, args: Any) -> dict[str, Any] | None:
    """Fit and test one strategy: its RunSummary record, or None on failure (``--report-only``: the stored record)."""
    summary = args.results_dir / name / "summary.json"
    if args.report_only:
        if not summary.is_file():
            print(f"[{name}] no stored run: {summary} is missing", flush=True)
            return None
        return json.loads(summary.read_text())
    summary.unlink(missing_ok=True)
    child, record = run_recipe("translation", name, args.base, [
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[lightning_dopt.callbacks.CommReport, recipes.translation.callbacks.RunSummary]",
        f"--trainer.callbacks.path={summary}", "--trainer.enable_progress_bar=false", *args.extra],
        summary.parent, args.timeout)
    record = (json.loads(summary.read_text()) if summary.is_file() else {}) | record
    if child.returncode != 0 or "test" not in record:
        print(f"[{name}] {child.failure()}", flush=True)
        return None
    summary.write_text(json.dumps(record, indent=1))
    print(f"[{name}] val BLEU {record['validations'][-1]['bleu']:.2f}, test BLEU {record['test']['bleu']:.2f}, "
          f"{child.seconds:.0f} s", flush=True)
    return record


def main() -> None:
    args = recipe_args(__doc__.split("\n\n")[0], STRATEGIES, ("ddp", "gossip_local"),
                       REPO_ROOT / "runs" / "translation" / "benchmark", 1200.0,
                       REPO_ROOT / "docs" / "img" / "translation_bleu_vs_bytes.png")
    results = new_results("translation_recipe", vars(args))
    records = {name: record for name in args.strategies if (record := run_strategy(name, args)) is not None}
    if not records:
        raise SystemExit("every run failed")
    for name, record in records.items():
        last, test = record["validations"][-1], record.get("test", {})  # a stored run that stopped early has no test
        fit = record["fit"] or {"steps": last["step"], "seconds": None,  # and its last validation stands for its fit
                                **{key: last[key] for key in ("training_bytes_sent", "bytes_counted")}}
        ddp = records["ddp"]["fit"]["training_bytes_sent"] if "ddp" in records else None
        results["rows"].append({
            "strategy": name, "steps": fit["steps"], "val_bleu": last["bleu"], "val_chrf": last["chrf"],
            "test_bleu": test.get("bleu"), "test_chrf": test.get("chrf"), "sent": fit["training_bytes_sent"],
            "bytes": "counted" if fit["bytes_counted"] else "formula", "fit_seconds": fit["seconds"],
            "bytes_ratio": fit["training_bytes_sent"] / ddp if ddp else None, "record": record})
    report(results, COLUMNS, args.json)
    plot_lines({name: [(v["training_bytes_sent"] / 1e6, v["bleu"]) for v in record["validations"]]
                        for name, record in records.items()}, args.plot,
                       "MB sent per rank for training (log scale; ddp: ring all-reduce formula)",
                       "validation BLEU (Ruth + Jonah)", "Translation recipe: BLEU vs bytes sent")


if __name__ == "__main__":
    main()
