"""fp16 mixed precision with a gradient scaler (CPU/gloo, spawn, 2 ranks; Lightning's ``MixedPrecision("16-mixed",
"cpu")`` plugin, which the ``precision="16-mixed"`` flag would replace by bf16 on a CPU).

The strategy's gradient work (scaling statistics, AdaCons, warm-up averaging) runs inside the optimizer closure,
before the plugin unscales the gradients: it must act on the unscaled gradients, and a step the scaler skips (an
Inf or NaN gradient) must leave no trace in the statistics or the AdaCons momentum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_dopt import GossipLocalStrategy
from lightning_models import NonFiniteStepModel, PrecisionRecorder, RegressionModel, load_ranks, state_snapshot

pytestmark = pytest.mark.timeout(180)

STEPS = 16
BAD_STEP = 3
INIT_SCALE = 2.0 ** 8  # 2^16, the default, overflows this model's scaled fp16 activation gradients in the first steps


def fit(root: Path, options: dict[str, Any], fp16: bool) -> list[dict[str, Any]]:
    root.mkdir()
    L.seed_everything(1)
    model = NonFiniteStepModel(bad_step=BAD_STEP if fp16 else -1, lr=0.01, momentum=0.0)
    trainer = L.Trainer(default_root_dir=root, accelerator="cpu", devices=2, max_steps=STEPS, logger=False,
                        strategy=GossipLocalStrategy(start_method="spawn", topology="complete", **options),
                        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))]
                        if fp16 else None,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[PrecisionRecorder(str(root))])
    trainer.fit(model)
    return load_ranks(str(root), "precision", 2)


def distance(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    return sum(float((first[key].double() - second[key].double()).norm() ** 2) for key in first) ** 0.5


@pytest.mark.parametrize("options", [
    {"scaling": "adam", "local_steps": 2, "scaling_beta": 0.9},
    {"aggregation": "adacons", "adacons_momentum": 0.5},
    {"warmup_steps": STEPS, "local_steps": 4},
], ids=["scaling", "adacons", "warmup-averaging"])
def test_fp16_with_a_gradient_scaler_acts_on_unscaled_gradients_and_skips_inf_steps(tmp_path: Path,
                                                                                     options: dict[str, Any]) -> None:
    L.seed_everything(1)
    start = state_snapshot(RegressionModel(lr=0.01, momentum=0.0))
    reference = fit(tmp_path / "fp32", options, fp16=False)
    mixed = fit(tmp_path / "fp16", options, fp16=True)
    for rank in mixed:
        assert all(bool(torch.isfinite(value).all()) for value in rank["state"].values())
        # the Inf step was skipped (the scale halved; it grows back only after 2000 good steps), and no other step
        assert rank["scale"] == INIT_SCALE / 2
        if "scaling" in options:
            assert rank["accumulated"] == [STEPS - 1], "the skipped step must not reach the statistics"
    assert distance(mixed[0]["state"], mixed[1]["state"]) == 0.0  # synchronous modes keep identical replicas
    # the same progress as fp32 (one step of sixteen skipped, fp16 matmuls): a step of 1/S, or statistics of S²g²,
    # would leave the model where it started
    moved, moved_fp32 = distance(mixed[0]["state"], start), distance(reference[0]["state"], start)
    assert 0.7 < moved / moved_fp32 < 1.3, (moved, moved_fp32)
    if "scaling" not in options:  # (scaled steps are about lr · sign(g) per coordinate: fp16 rounding flips some)
        assert distance(mixed[0]["state"], reference[0]["state"]) < 0.35 * moved_fp32
