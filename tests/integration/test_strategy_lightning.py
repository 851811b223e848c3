"""Lightning integration of GossipLocalStrategy on CPU/gloo with the spawn launcher (2 ranks)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import lightning_dopt
from lightning_dopt import GossipLocalStrategy, sidecar_path
from lightning_dopt.comm import ring_allreduce_bytes
from lightning_models import (ManualTwoOptimizerModel, PreconditionerRecorder, Recorder, RegressionModel,
                              ScheduledModel, UnshuffledSGDModel, load_ranks, regression_data, state_snapshot)

pytestmark = pytest.mark.timeout(180)


def make_trainer(root: Path, strategy: Any, devices: int = 2, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(default_root_dir=root, accelerator="cpu", devices=devices, strategy=strategy,
                                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    options.update(kwargs)
    return L.Trainer(**options)


def spawn(**options: Any) -> GossipLocalStrategy:
    return GossipLocalStrategy(start_method="spawn", **options)


def fitted_state(root: Path, strategy: Any, steps: int = 20, **model_options: Any) -> dict[str, torch.Tensor]:
    L.seed_everything(1)
    model = RegressionModel(**model_options)
    make_trainer(root, strategy, max_steps=steps).fit(model)
    return state_snapshot(model)


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[key].double() - second[key].double()).abs().max().item() for key in first)


def mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key].double() for s in states]).mean(0) for key in states[0]}


# ------------------------------------------------------------------------------------------- registry
def test_import_registers_all_names_idempotently() -> None:
    for name in ("gossip_local", "gossip_local_spawn", "local_sgd", "local_sgd_spawn", "adacons", "adacons_spawn"):
        assert StrategyRegistry[name]["strategy"] is GossipLocalStrategy
    assert StrategyRegistry["local_sgd"]["init_params"] == {"topology": "complete"}
    assert StrategyRegistry["gossip_local_spawn"]["init_params"] == {"start_method": "spawn"}
    GossipLocalStrategy.register_strategies(StrategyRegistry)  # a second import must not raise
    trainer = L.Trainer(strategy="local_sgd", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, GossipLocalStrategy) and trainer.strategy.topology == "complete"
    assert lightning_dopt.TOPOLOGIES == ("random", "ring", "torus", "exponential", "one_peer_exponential", "complete")


# ------------------------------------------------------------------------------------- bad configuration
@pytest.mark.parametrize("options, message", [
    ({"topology": "rign"}, "valid choices: random, ring, torus, exponential, one_peer_exponential, complete"),
    ({"local_steps": 0}, "local_steps must be an integer >= 1"),
    ({"local_steps": 2.5}, "local_steps must be an integer >= 1"),
    ({"local_steps": True}, "local_steps must be an integer >= 1"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ({"eval_model": "best"}, "valid choices: average, local"),
    ({"consensus_interval": 0}, "consensus_interval must be an integer >= 1"),
    ({"start_method": "thread"}, "valid choices: popen, spawn, fork, forkserver"),
    ({"compression": "int3"}, "valid choices: None, bf16, fp16, int8, int4"),
    ({"compression": "int8", "block_size": 3}, "block_size"),
    ({"compression": "int8", "anchor_interval": 0}, "anchor_interval must be an integer >= 1"),
    ({"aggregation": "median"}, "valid choices: mean, adacons"),
    ({"aggregation": "adacons"}, "aggregation='adacons' cannot be combined with topology='random'"),
    ({"aggregation": "adacons", "topology": "complete", "compression": "int8"},
     "aggregation='adacons' cannot be combined with compression='int8'"),
    ({"aggregation": "adacons", "topology": "complete", "local_steps": 4, "stale_weights": True},
     "stale_weights=True cannot be combined with aggregation='adacons' and local_steps=4"),
    ({"aggregation": "adacons", "topology": "complete", "adacons_guard": "clip"}, "valid choices: shift, mean"),
    ({"aggregation": "adacons", "topology": "complete", "adacons_momentum": 1.0}, r"in \[0, 1\)"),
    ({"aggregation": "adacons", "topology": "complete", "stale_weights": True, "preserve_scale": True},
     "stale_weights=True cannot be combined with aggregation='adacons' and preserve_scale=True"),
    ({"outer_optimizer": "adam"}, "valid choices: None, 'diloco'"),
    ({"outer_optimizer": "diloco", "scaling": "adam"}, "Use topology='complete' with scaling, or scaling=None"),
    ({"outer_optimizer": "diloco", "topology": "complete", "aggregation": "adacons"}, "Use local_steps > 1"),
    ({"scaling": "adagrad"}, "valid choices: None, adam, rmsprop, oasis"),
    ({"scaling": "adam", "scaling_beta": 1.0}, "beta"),
    ({"scaling": "oasis", "scaling_alpha_min": 0.0}, "alpha_min"),
    ({"scaling": "adam", "topology": "complete", "aggregation": "adacons"},
     "scaling='adam' cannot be combined with aggregation='adacons' and local_steps=1"),
])
def test_bad_options_raise_value_error_naming_valid_choices(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GossipLocalStrategy(**options)


def test_torus_on_non_square_world_fails_when_the_trainer_is_built() -> None:
    with pytest.raises(ValueError, match="torus needs a square world size"):
        L.Trainer(strategy=spawn(topology="torus"), accelerator="cpu", devices=2, logger=False)


def test_ddp_wrapped_module_is_rejected_before_processes_start(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = RegressionModel()
        model.net[2] = nn.parallel.DistributedDataParallel(model.net[2])
        with pytest.raises(ValueError, match="wrapped in DistributedDataParallel"):
            make_trainer(tmp_path, spawn(), max_steps=1).fit(model)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- DDP parity
@pytest.fixture(scope="module")
def ddp_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return fitted_state(tmp_path_factory.mktemp("ddp"), "ddp_spawn")


def test_local_sgd_with_one_local_step_equals_ddp(tmp_path: Path, ddp_state: dict[str, torch.Tensor]) -> None:
    ours = fitted_state(tmp_path, spawn(local_steps=1, topology="complete"))
    assert max_difference(ours, ddp_state) <= 1e-5


@pytest.mark.parametrize("topology", ["random", "ring"])
def test_warmup_covering_the_run_equals_ddp(tmp_path: Path, ddp_state: dict[str, torch.Tensor],
                                            topology: str) -> None:
    ours = fitted_state(tmp_path, spawn(local_steps=4, topology=topology, warmup_steps=20))
    assert max_difference(ours, ddp_state) <= 1e-5


@pytest.mark.parametrize("topology", ["complete", "random"])
def test_outer_sgd_with_unit_lr_and_no_momentum_equals_plain_rounds(tmp_path: Path, topology: str) -> None:
    """Local SGD (``complete``: PseudoGradientRound) and gossip (``random``: GossipOuterRound), on gloo ranks."""
    plain = fitted_state(tmp_path / "plain", spawn(local_steps=4, topology=topology))
    outer = fitted_state(tmp_path / "outer", spawn(local_steps=4, topology=topology,
                                                   outer_optimizer=functools.partial(torch.optim.SGD, lr=1.0)))
    diloco = fitted_state(tmp_path / "diloco", spawn(local_steps=4, topology=topology, outer_optimizer="diloco"))
    assert max_difference(outer, plain) <= 1e-6
    assert max_difference(diloco, plain) > 1e-4, "the Nesterov outer step must change the trajectory"


def test_gossip_without_warmup_differs_from_ddp(tmp_path: Path, ddp_state: dict[str, torch.Tensor]) -> None:
    """Guards the parity tests against passing vacuously."""
    ours = fitted_state(tmp_path, spawn(local_steps=4, topology="random"))
    assert max_difference(ours, ddp_state) > 1e-4


# ------------------------------------------------------------------------------ evaluation and buffers
def test_validation_runs_on_the_exact_average_and_restores_the_replica(tmp_path: Path) -> None:
    L.seed_everything(1)
    model = RegressionModel(batch_norm=True)
    trainer = make_trainer(tmp_path, spawn(local_steps=1000, consensus_interval=2), max_steps=6,
                           limit_val_batches=2, val_check_interval=4, callbacks=[Recorder(str(tmp_path))])
    trainer.fit(model)
    local, evaluated = load_ranks(str(tmp_path), "local", 2), load_ranks(str(tmp_path), "eval", 2)
    after, final = load_ranks(str(tmp_path), "after_eval", 2), load_ranks(str(tmp_path), "train_end", 2)
    assert max_difference(local[0], local[1]) > 1e-3, "replicas should differ: no round ran"
    average = {k: v for k, v in mean_state(local).items() if local[0][k].is_floating_point()}
    for rank in range(2):
        assert max_difference({k: evaluated[rank][k] for k in average}, average) <= 1e-6
        assert all(torch.equal(after[rank][key], local[rank][key]) for key in local[rank])
    assert "net.1.running_mean" in average, "BatchNorm statistics are part of the averaged state"
    # after fit every rank holds the exact average; the spawn main process receives rank 0's copy
    expected = mean_state(final)
    assert max_difference({k: v for k, v in state_snapshot(model).items() if k in average},
                          {k: v for k, v in expected.items() if k in average}) <= 1e-6
    assert trainer.callback_metrics["dopt/consensus_distance"] > 0
    assert "comm/bytes_sent" in trainer.callback_metrics


@pytest.mark.parametrize("average_buffers", [True, False])
def test_batchnorm_statistics_are_averaged_at_rounds(tmp_path: Path, average_buffers: bool) -> None:
    L.seed_everything(1)
    trainer = make_trainer(tmp_path, spawn(local_steps=1, topology="complete", average_buffers=average_buffers),
                           max_steps=3, callbacks=[Recorder(str(tmp_path))])
    trainer.fit(RegressionModel(batch_norm=True))
    final = load_ranks(str(tmp_path), "train_end", 2)
    gap = (final[0]["net.1.running_mean"] - final[1]["net.1.running_mean"]).abs().max().item()
    assert torch.equal(final[0]["net.0.weight"], final[1]["net.0.weight"])
    assert (gap == 0.0) if average_buffers else (gap > 1e-4)


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("options", [
    {"topology": "random"},
    {"topology": "random", "compression": "int8", "anchor_interval": 2, "overlap": True},
], ids=["fp32", "overlap_int8"])
def test_checkpoint_resume_reproduces_an_uninterrupted_run_exactly(tmp_path: Path, options: dict[str, Any]) -> None:
    """The sidecar also carries the compression anchor, rounding RNG and error-feedback residual. (Exact resume of
    the other options, bf16/int4/fp16 codecs, AdaCons rounds and their momentum, DiLoCo, each scaling family, fp16
    scalers, alone and together, is checked row by row in test_combination_matrix.py.)"""

    def run(out: Path, ckpt_path: str | None = None) -> None:
        out.mkdir()
        L.seed_everything(1)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1,
                                     save_on_train_epoch_end=True)
        strategy = spawn(local_steps=3, **options)
        trainer = make_trainer(tmp_path, strategy, max_epochs=2,
                               enable_checkpointing=True, callbacks=[checkpoint, Recorder(str(out))])
        trainer.fit(RegressionModel(), ckpt_path=ckpt_path)

    run(tmp_path / "uninterrupted")
    first_epoch = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    for rank in range(2):
        assert os.path.exists(sidecar_path(first_epoch, rank))
    (tmp_path / "ckpt" / "epoch=1-step=16.ckpt").unlink()
    run(tmp_path / "resumed", ckpt_path=str(first_epoch))

    uninterrupted = load_ranks(str(tmp_path / "uninterrupted"), "train_end", 2)
    resumed = load_ranks(str(tmp_path / "resumed"), "train_end", 2)
    assert max_difference(uninterrupted[0], uninterrupted[1]) > 1e-4, "replicas differ at the end"
    for rank in range(2):
        assert all(torch.equal(resumed[rank][key], uninterrupted[rank][key]) for key in resumed[rank])
    stats = load_ranks(str(tmp_path / "resumed"), "stats", 2)
    assert [s["steps"] for s in stats] == [16, 16]

    # the main file holds the average of the replicas, and loads without lightning_dopt installed
    main = torch.load(first_epoch, weights_only=False)
    sidecars = [torch.load(sidecar_path(first_epoch, r), weights_only=False)["state_dict"] for r in range(2)]
    assert max_difference(main["state_dict"], mean_state(sidecars)) <= 1e-6
    script = ("import sys; sys.modules['lightning_dopt'] = None; sys.path.insert(0, sys.argv[1]);"
              "from lightning_models import RegressionModel;"
              "model = RegressionModel.load_from_checkpoint(sys.argv[2]); print(float(model.net[0].weight.sum()))")
    result = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(first_epoch)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert abs(float(result.stdout.split()[-1]) - float(main["state_dict"]["net.0.weight"].sum())) < 1e-5


def test_missing_or_truncated_sidecar_is_a_clear_error(tmp_path: Path) -> None:
    L.seed_everything(1)
    trainer = make_trainer(tmp_path, spawn(local_steps=2), max_steps=4, enable_checkpointing=False)
    trainer.fit(RegressionModel())
    # save from inside the ranks: the spawn main process has no process group left
    path = tmp_path / "model.ckpt"
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="model", every_n_train_steps=4)
    make_trainer(tmp_path, spawn(local_steps=2), max_steps=4, enable_checkpointing=True,
                 callbacks=[checkpoint]).fit(RegressionModel())
    assert path.exists()
    with open(sidecar_path(path, 0), "r+b") as handle:
        handle.truncate(100)
    with open(sidecar_path(path, 1), "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(Exception, match="is unreadable"):
        make_trainer(tmp_path, spawn(local_steps=2), max_steps=6).fit(RegressionModel(), ckpt_path=str(path))
    for rank in range(2):
        os.remove(sidecar_path(path, rank))
    with pytest.raises(Exception, match="missing per-rank checkpoint file"):
        make_trainer(tmp_path, spawn(local_steps=2), max_steps=6).fit(RegressionModel(), ckpt_path=str(path))


# ---------------------------------------------------------------------------------- training features
def test_accumulation_clipping_scheduler_and_bf16(tmp_path: Path) -> None:
    L.seed_everything(1)
    trainer = make_trainer(tmp_path, spawn(local_steps=2, topology="ring"), max_steps=4, accumulate_grad_batches=2,
                           gradient_clip_val=0.5, precision="bf16-mixed", callbacks=[Recorder(str(tmp_path))])
    trainer.fit(ScheduledModel())
    stats = load_ranks(str(tmp_path), "stats", 2)
    for rank_stats in stats:
        assert rank_stats["steps"] == 4 and rank_stats["global_step"] == 4
        assert rank_stats["comm"]["rounds"] == 2


def test_manual_optimization_with_two_optimizers_rounds_once_per_batch(tmp_path: Path) -> None:
    L.seed_everything(1)
    trainer = make_trainer(tmp_path, spawn(local_steps=1, topology="complete"), max_steps=8,
                           callbacks=[Recorder(str(tmp_path))])
    trainer.fit(ManualTwoOptimizerModel())
    stats = load_ranks(str(tmp_path), "stats", 2)
    final = load_ranks(str(tmp_path), "train_end", 2)
    assert [s["steps"] for s in stats] == [4, 4] and [s["comm"]["rounds"] for s in stats] == [4, 4]
    assert max_difference(final[0], final[1]) <= 1e-7


def test_single_process_world_trains_without_communication(tmp_path: Path) -> None:
    strategy = GossipLocalStrategy(local_steps=2)
    trainer = make_trainer(tmp_path, strategy, devices=1, max_steps=4)
    try:
        trainer.fit(RegressionModel())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert strategy.steps == 4
    assert strategy.comm_stats.bytes_sent == 0 and strategy.comm_stats.rounds == 0


def test_clipping_with_scaling_warns_that_it_clips_the_scaled_gradient(tmp_path: Path) -> None:
    strategy = GossipLocalStrategy(local_steps=2, scaling="adam")
    trainer = make_trainer(tmp_path, strategy, devices=1, max_steps=2, gradient_clip_val=1.0)
    try:
        with pytest.warns(UserWarning, match=r"gradient_clip_val=1.0 with scaling='adam' clips the scaled gradient"):
            trainer.fit(RegressionModel())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    strategy.finish_rounds()  # public and a no-op without a round in flight
    assert strategy.steps == 2


def test_adacons_combines_gradients_once_per_real_step_and_keeps_replicas_identical(tmp_path: Path) -> None:
    L.seed_everything(1)
    strategy = spawn(topology="complete", aggregation="adacons", adacons_momentum=0.5, preserve_scale=True)
    trainer = make_trainer(tmp_path, strategy, max_steps=4, accumulate_grad_batches=2,
                           callbacks=[Recorder(str(tmp_path))])
    trainer.fit(RegressionModel(batch_norm=True))
    final = load_ranks(str(tmp_path), "train_end", 2)
    stats = load_ranks(str(tmp_path), "stats", 2)
    assert all(torch.equal(final[0][key], final[1][key]) for key in final[0]), "no rounds needed: replicas agree"
    assert [s["steps"] for s in stats] == [4, 4] and [s["comm"]["rounds"] for s in stats] == [0, 0]
    gradient_bytes = sum(v.numel() * 4 for k, v in final[0].items() if k.endswith(("weight", "bias")))
    buffer_bytes = sum(v.numel() * 4 for k, v in final[0].items() if k.endswith(("running_mean", "running_var")))
    # per real step: two gradient all-reduces, one of the 2 coefficients, the BatchNorm buffers' average, flags
    tensors = sum(1 for k in final[0] if k.endswith(("weight", "bias")))
    per_step = 2 * ring_allreduce_bytes(gradient_bytes, 2) + ring_allreduce_bytes(8, 2) + \
        ring_allreduce_bytes(buffer_bytes, 2) + ring_allreduce_bytes(4 * tensors, 2)  # + presence flags
    assert stats[0]["comm"]["bytes_sent_by_purpose"]["aggregate"] == 4 * per_step


# ------------------------------------------------------------------------------------------------ scaling
def test_scaled_local_sgd_with_one_step_rounds_equals_centralized_scaled_sgd(tmp_path: Path) -> None:
    """Exact equivalence tested: with H = 1, ``complete``, RMSProp scaling and plain SGD, 2 ranks follow
    ``x ← x − γ ḡ_t / D_{t−1}`` with ``v_t = β v_{t−1} + (1−β) mean_i g_{i,t}²``,
    ``D_t = max(√v_t + ε, 0.01 · mean(√v_t + ε))`` per tensor and ``D_0 = 1``:
    a centralized scaled method whose preconditioner lags one step and uses the mean of the squared per-rank
    gradients."""
    steps, beta, eps, lr = 6, 0.9, 1e-8, 0.005
    L.seed_everything(1)
    model = UnshuffledSGDModel(lr=lr)
    reference = UnshuffledSGDModel(lr=lr)
    reference.load_state_dict(model.state_dict())
    trainer = make_trainer(tmp_path, spawn(local_steps=1, topology="complete", scaling="rmsprop", scaling_beta=beta,
                                           scaling_eps=eps), max_steps=steps, use_distributed_sampler=False,
                           callbacks=[PreconditionerRecorder(str(tmp_path))])
    trainer.fit(model)

    data = regression_data(64)
    params = list(reference.parameters())
    moments = [torch.zeros_like(p) for p in params]
    diagonal = [torch.ones_like(p) for p in params]
    for step in range(steps):
        per_rank = []
        for rank in range(2):
            indices = [rank + 2 * (4 * step + k) for k in range(4)]
            reference.zero_grad()
            reference.training_step((data.tensors[0][indices], data.tensors[1][indices]), step).backward()
            per_rank.append([p.grad.clone() for p in params])
        with torch.no_grad():
            for k, param in enumerate(params):
                mean_gradient = (per_rank[0][k] + per_rank[1][k]) / 2
                param.sub_(lr * mean_gradient / diagonal[k])
                squares = (per_rank[0][k] ** 2 + per_rank[1][k] ** 2) / 2
                moments[k] = beta * moments[k] + (1 - beta) * squares
                plain = moments[k].sqrt() + eps
                diagonal[k] = plain.clamp_min(0.01 * plain.mean())  # the default relative floor
    assert max_difference(state_snapshot(model), state_snapshot(reference)) <= 1e-6
    saved = load_ranks(str(tmp_path), "diag", 2)
    assert all(torch.equal(a, b) for a, b in zip(saved[0][0], saved[1][0])), "D must be identical on every rank"
    assert max(torch.max(torch.abs(a - b)).item() for a, b in zip(saved[0][0], diagonal)) <= 1e-6


@pytest.mark.parametrize("scaling", ["adam", "oasis"])
def test_scaling_with_zero_learning_rate_changes_nothing_and_keeps_d_identical(tmp_path: Path, scaling: str) -> None:
    L.seed_everything(1)
    model = RegressionModel(lr=0.0, momentum=0.0)
    start = state_snapshot(model)
    trainer = make_trainer(tmp_path, spawn(local_steps=2, topology="complete", scaling=scaling), max_steps=4,
                           callbacks=[PreconditionerRecorder(str(tmp_path))])
    trainer.fit(model)
    assert all(torch.equal(start[key], value) for key, value in state_snapshot(model).items())
    saved = load_ranks(str(tmp_path), "diag", 2)
    assert all(torch.equal(a, b) for a, b in zip(saved[0][0], saved[1][0]))
    floor = 1e-4 if scaling == "oasis" else 1e-8
    assert all(bool((d >= floor).all()) and bool(torch.isfinite(d).all()) for d in saved[0][0])
    assert any(bool((d != 1).any()) for d in saved[0][0]), "D was refreshed from the statistics"


def test_oasis_refuses_gradient_accumulation_before_training(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, spawn(scaling="oasis"), max_steps=2, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="scaling='oasis' cannot be combined with accumulate_grad_batches=2"):
        trainer.fit(RegressionModel())
