"""Loss curves, test accuracy and bytes per step: mean gradient aggregation versus AdaCons, on 4 and 8 ranks.

Jobs, child runs and rows: ``vision_runs``; ``mean-*`` average the gradients every step like DDP (all warm-up steps),
``adacons-*`` use ``aggregation="adacons"``. Setup and reading: ``docs/benchmarks.md``, "AdaCons vs mean aggregation".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness import REPO_ROOT, Column, Contender
from lightning_dopt.comm import ring_allreduce_bytes
from vision_runs import Study, main, traffic_formula


def contender(name: str, label: str, optimizer: str, **options: Any) -> Contender:
    """Compared with the mean run of the same optimizer (plotted solid for Adam, dashed for SGD)."""
    options = options or {"warmup_steps": 10**9}  # the mean: every step is a warm-up step
    return Contender(name, options, {"label": label, "optimizer": optimizer, "reference": f"mean-{optimizer}",
                                     "style": "-" if optimizer == "adam" else "--"})


ADACONS = {"aggregation": "adacons"}
CONTENDERS: dict[str, Contender] = {c.name: c for c in (
    contender("mean-adam", "mean, Adam", "adam"),
    contender("adacons-adam", "AdaCons, Adam", "adam", **ADACONS),
    contender("adacons-stale-adam", "AdaCons stale weights, Adam", "adam", **ADACONS, stale_weights=True),
    contender("adacons-mom-adam", "AdaCons momentum 0.9, Adam", "adam", **ADACONS, adacons_momentum=0.9),
    contender("mean-sgd", "mean, SGD", "sgd"),
    contender("adacons-ps-sgd", "AdaCons preserve_scale, SGD", "sgd", **ADACONS, preserve_scale=True),
    contender("adacons-sgd", "AdaCons (no preserve_scale), SGD", "sgd", **ADACONS),
    contender("adacons-layerwise-adam", "AdaCons layer-wise, Adam", "adam", **ADACONS, adacons_layerwise=True),
)}


def expected_bytes(result: Mapping[str, Any]) -> float | None:
    """Training bytes per rank. Mean: ``lightning_dopt.traffic``. AdaCons, per step (ring all-reduce ``2(n−1)/n · b``
    per call): two all-reduces of the ``4P`` gradient bytes, one of the ``n × T`` coefficients (``T = 1``, or ``m``
    layer-wise), one of the ``m`` gradient-presence flags and one of the ``4B`` floating buffer bytes; stale weights:
    one gradient all-reduce per step, two at the first."""
    options, world, steps, tensors = result["options"], result["world_size"], result["steps"], result["param_tensors"]
    if options.get("aggregation") != "adacons":
        return traffic_formula(result)
    gradient = ring_allreduce_bytes(4 * result["params"], world)
    table = ring_allreduce_bytes(4 * world * (tensors if options.get("adacons_layerwise") else 1), world)
    per_step = gradient + table + ring_allreduce_bytes(4 * tensors, world) + ring_allreduce_bytes(
        4 * result["buffer_values"], world)
    return steps * per_step + (gradient if options.get("stale_weights") else steps * gradient)


STUDY = Study("adacons_curves", __doc__.split("\n\n")[0], CONTENDERS, columns=[
    Column("ranks", "ranks", "d"), Column("label", "contender"), Column("lr", "peak lr", "g"),
    Column("seed", "seed", "d"), Column("steps", "steps", "d"), Column("accuracy", "test accuracy (%)", ".2f"),
    Column("delta_accuracy", "Δ vs mean (points)", "+.2f"), Column("final_train_loss", "final train loss", ".4f"),
    Column("bytes_per_step", "bytes/step/rank (kB)", ".3f", 1e3),
    Column("formula_per_step", "formula (kB)", ".3f", 1e3), Column("bytes_ratio", "ratio to mean bytes", ".4f"),
    Column("grad_norm_median", "median gradient norm", ".3f"),
    Column("weight_min_mean", "mean n·min α", ".2f"), Column("weight_max_mean", "mean n·max α", ".2f"),
    Column("weight_zero_fraction", "steps with an α = 0", ".2f"), Column("train_seconds", "training time (s)", ".0f")],
    defaults={"world_sizes": [4, 8], "steps_per_world": [400, 200], "steps": 300, "seeds": [0, 1], "timeout": 420.0,
              "contenders": [name for name in CONTENDERS if name not in ("adacons-sgd", "adacons-layerwise-adam")],
              "extra_contenders": ["adacons-sgd"], "noise_contenders": ["mean-adam", "adacons-adam"],
              "plot": REPO_ROOT / "docs" / "img" / "adacons_curves.png"},
    formula=expected_bytes)

if __name__ == "__main__":
    main(STUDY)
