"""Scaled local steps (SAVIC-style frozen diagonal preconditioners) vs SGD vs per-rank Adam, and DiLoCo's outer
optimizer vs plain Local SGD, at equal steps on a real task.

Jobs, child runs and rows: ``vision_runs``. Each scaled family runs both lrs of :data:`SWEEP`, the lower final training
loss is ``picked``; ``gossip-scaled-adam`` reuses ``scaled-adam``'s pick. Setup: ``docs/benchmarks.md``.
"""

from __future__ import annotations

from typing import Any

from harness import REPO_ROOT, Column, Contender
from vision_runs import Study, main

SCALING_OPTIONS: dict[str, dict[str, float]] = {"adam": {"scaling_beta": 0.99, "scaling_eps": 1e-4},
                                                "rmsprop": {"scaling_beta": 0.99, "scaling_eps": 1e-4},
                                                "oasis": {"scaling_beta": 0.99, "scaling_alpha_min": 1e-2}}
SWEEP = {"scaled-adam": (3e-4, 1e-3), "scaled-rmsprop": (1e-4, 3e-4), "scaled-oasis": (3e-3, 1e-2)}


def contender(name: str, label: str, optimizer: str, lr: float, topology: str = "complete",
              **options: Any) -> Contender:
    """Compared with plain SGD on the same topology (plotted dashed when gossip)."""
    options |= SCALING_OPTIONS.get(options.get("scaling"), {})
    local = topology == "complete"
    return Contender(name, {"topology": topology, **options}, {"label": label, "optimizer": optimizer, "lr": lr,
                                                               "style": "-" if local else "--",
                                                               "reference": "sgd" if local else "gossip-sgd"})


CONTENDERS: dict[str, Contender] = {c.name: c for c in (
    contender("sgd", "Local SGD, SGD m=0.9", "sgd", 0.05),
    contender("scaled-adam", "Local SGD, SGD m=0.9 + Adam scaling", "sgd", 3e-4, scaling="adam"),
    contender("scaled-rmsprop", "Local SGD, SGD m=0.9 + RMSProp scaling", "sgd", 3e-4, scaling="rmsprop"),
    contender("scaled-oasis", "Local SGD, SGD m=0.9 + OASIS scaling", "sgd", 3e-3, scaling="oasis"),
    contender("adam", "Local SGD, per-rank Adam", "adam", 1e-3),
    contender("diloco", "DiLoCo (outer Nesterov 0.7/0.9), SGD m=0.9 inner", "sgd", 0.05, outer_optimizer="diloco"),
    contender("gossip-sgd", "gossip random, SGD m=0.9", "sgd", 0.05, topology="random"),
    contender("gossip-scaled-adam", "gossip random, SGD m=0.9 + Adam scaling", "sgd", 3e-4, "random", scaling="adam"),
)}
STUDY = Study("scaling_curves", __doc__.split("\n\n")[0], CONTENDERS, columns=[
    Column("label", "contender"), Column("lr", "lr", "g"), Column("picked", "picked"), Column("steps", "steps", "d"),
    Column("rounds", "rounds", ".0f"), Column("accuracy", "test accuracy (%)", ".2f"),
    Column("delta_accuracy", "Δ vs SGD (points)", "+.2f"), Column("final_train_loss", "final train loss", ".4f"),
    Column("bytes_per_rank", "round MB/rank", ".3f", 1e6), Column("formula_per_rank", "formula (MB)", ".3f", 1e6),
    Column("bytes_ratio", "ratio to SGD bytes", ".3f"), Column("train_seconds", "training time (s)", ".0f")],
    defaults={"steps": 480, "local_steps": 8, "weight_decay": 0.0,
              "plot": REPO_ROOT / "docs" / "img" / "scaling_curves.png"},
    sweep=SWEEP, inherit_lr={"gossip-scaled-adam": "scaled-adam"})

if __name__ == "__main__":
    main(STUDY)
