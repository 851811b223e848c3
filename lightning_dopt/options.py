"""The algorithm options shared by :class:`~lightning_dopt.strategy.GossipLocalStrategy` (one rank per process) and
:class:`~lightning_dopt.simulation.SimulatedStrategy` (``N`` workers in one process). Pure Python, no Lightning.

:class:`Options` checks each value where it is given (the checks belong to the objects that use them: the codec's
in :func:`~lightning_dopt.compress.make_codec`, the preconditioner's in
:func:`~lightning_dopt.scaling.make_preconditioner`, the topology's in :func:`~lightning_dopt.topology.validate_topology`, …) and the combinations in
:mod:`lightning_dopt.combinations`, so a bad configuration fails before any process starts. The engine
(:mod:`lightning_dopt.engine`) builds one object per algorithm from it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any

import torch

from lightning_dopt.aggregate import GUARDS
from lightning_dopt.combinations import Setting, check as check_combination
from lightning_dopt.compress import Codec, make_codec
from lightning_dopt.compressed_rounds import check_anchor_options
from lightning_dopt.hierarchy import check_hierarchy
from lightning_dopt.pacing import check_min_work
from lightning_dopt.rounds import OuterOptimizerFactory, diloco_outer_optimizer
from lightning_dopt.scaling import SCALINGS, check_relative_floor, make_preconditioner
from lightning_dopt.group_max import GroupMaxCodec
from lightning_dopt.topology import validate_topology

EVAL_MODELS = ("average", "local")
NOLOCO_OUTER = functools.partial(torch.optim.SGD, lr=0.5, momentum=0.5, nesterov=True)
"""The presets' outer optimizer: Nesterov SGD with ``lr / (1 − momentum) = 1`` (no long-run amplification of the
averaged progress; DiLoCo's 0.7 / 0.9 diverged over an SGD-momentum inner loop, docs/scaling.md)."""
PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "gossip_local": ({}, "local steps + random pairwise gossip"),
    "gossip_local_spawn": ({"start_method": "spawn"}, "gossip_local with the spawn launcher"),
    "local_sgd": ({"topology": "complete"}, "local steps + exact all-reduce averaging (Local SGD)"),
    "local_sgd_spawn": ({"topology": "complete", "start_method": "spawn"}, "local_sgd with the spawn launcher"),
    "adacons": ({"topology": "complete", "aggregation": "adacons"},
                "synchronous training with AdaCons gradient aggregation"),
    "adacons_spawn": ({"topology": "complete", "aggregation": "adacons", "start_method": "spawn"},
                      "adacons with the spawn launcher"),
    "noloco": ({"local_steps": 4, "topology": "random",
                "outer_optimizer": NOLOCO_OUTER},
               "H = 4 local steps, random pairwise gossip of parameters and anchors, an outer Nesterov SGD step "
               "(lr 0.5, momentum 0.5) on each rank's anchor; no all-reduce, twice gossip's bytes (docs/scaling.md)"),
    "noloco_int8": ({"local_steps": 4, "topology": "random", "compression": "int8",
                     "outer_optimizer": NOLOCO_OUTER},
                    "noloco whose anchors and pseudo-gradients travel as int8 (0.26x noloco's bytes; "
                    "docs/scaling.md)"),
    "sparse_local_sgd": ({"local_steps": 2, "topology": "complete",
                          "compression": GroupMaxCodec(group=16, bits=4, mean_group=8)},
                         "H = 2 local steps, then the compressed exact mean of group-max-coded differences from the "
                         "shared anchor: the largest of every 16 values of each rank's chunks and of every 8 of the "
                         "owners' means, 4 bits each, error feedback, the unsent part kept in the replica (at 4 ranks "
                         "0.022 of fp32's bytes; docs/benchmarks.md)"),
    "gossip_node": ({"local_steps": 4, "topology": "random", "compression": "int8", "hierarchy": "node"},
                    "nodes of several GPUs: one replica per node, int8 gossip between random pairs of nodes every "
                    "4 steps, each GPU exchanging its shard (docs/launch.md)"),
}
"""The registered names of :class:`~lightning_dopt.strategy.GossipLocalStrategy`: ``{name: (options, description)}``."""
AGGREGATIONS = ("mean", "adacons")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def outer_optimizer_factory(outer_optimizer: str | OuterOptimizerFactory | None) -> OuterOptimizerFactory | None:
    """The factory an ``outer_optimizer`` option names: ``None``, ``"diloco"`` or a callable."""
    if outer_optimizer is None:
        return None
    if isinstance(outer_optimizer, str):
        if outer_optimizer != "diloco":
            raise ValueError(f"unknown outer_optimizer {outer_optimizer!r}; valid choices: None, 'diloco', or a "
                             "callable that builds a torch.optim.Optimizer from a list of tensors")
        return diloco_outer_optimizer
    if callable(outer_optimizer):
        return outer_optimizer
    raise ValueError(f"outer_optimizer must be None, 'diloco' or a callable; got {outer_optimizer!r}")


class OptionsAttributes:
    """For the strategies: the options held in ``self.options`` read as attributes (``strategy.local_steps``)."""

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in Options.names():
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Options.names() and "options" in self.__dict__:
            raise AttributeError(f"{name} is fixed when the strategy is built (the engine reads strategy.options); "
                                 f"pass {name}={value!r} to the constructor instead")
        super().__setattr__(name, value)


@dataclass(frozen=True)
class Options:
    """What the algorithm does (the strategies add only how they run: launcher, devices, timeouts).

    Update, for rank (worker) ``i`` with replica ``x_i`` and its own optimizer:

    * every optimizer step: ``x_i ← opt_i(x_i, g_i)`` with the rank's local gradient ``g_i``
      (during the first ``warmup_steps`` steps ``g_i`` is replaced by ``(1/n) Σ_j g_j``, as in DDP);
    * after every ``local_steps``-th step past warm-up, round ``r``: ``x_i ← Σ_j W_ij(r) x_j`` with the
      mixing matrix of ``topology`` for round ``r`` (a pure function of ``(seed, r, n)``).

    Args:
        local_steps: H ≥ 1, optimizer steps between synchronization rounds.
        topology: one of :data:`~lightning_dopt.topology.TOPOLOGIES`. ``complete`` is Local SGD (exact mean
            by all-reduce); ``random`` is SwarmSGD's random pairwise matching.
        warmup_steps: number of initial optimizer steps that average gradients every step (DDP-equivalent).
        average_buffers: also average persistent floating-point buffers (BatchNorm running statistics) at rounds
            (non-persistent buffers, constants left out of ``state_dict``, are never sent).
        eval_model: ``"average"`` evaluates validation/test/predict on the exact global average,
            ``"local"`` on each rank's replica.
        consensus_interval: if set, log the consensus distance every this many optimizer steps
            (one extra all-reduce of the model each time). It is always logged at validation.
        seed: seed of the round schedule (the same on every rank).
        compression: what crosses the wire at rounds: ``None`` (fp32), one of
            :data:`~lightning_dopt.compress.CODECS` (``"bf16"``, ``"fp16"``, ``"int8"``, ``"int4"``) or a
            :class:`~lightning_dopt.compress.Codec`. Ranks send the difference from a shared anchor, so the error is
            proportional to the replicas' spread plus their drift since the anchor's last refresh, not to the
            weights (:class:`~lightning_dopt.compressed_rounds.AnchoredCompression`).
        block_size: values per quantization block (one scale and offset each) for ``int8``/``int4``.
        anchor_interval: with compression, every this many rounds is a compressed exact-mean round that
            refreshes the shared anchor (every round for ``complete``): the longest a shared anchor is kept.
        anchor_tolerance: with compression, a round is also an anchor refresh when some rank predicts that its
            compression error ``‖Q(x_i − a) − (x_i − a)‖`` would exceed this fraction of its distance to its
            neighbours' replicas (the codec's relative error at its last graph round times its drift since the
            anchor, over the distance measured then; the error grows with the drift, the distance does not).
            ``None``: refresh only every ``anchor_interval`` rounds. Not used with an outer optimizer (its rounds
            refresh every ``anchor_interval`` rounds, or every round with ``complete``).
        aggregation: ``"mean"``, or ``"adacons"`` (with ``topology="complete"``): with ``local_steps=1`` every
            step's gradient is the AdaCons combination of all ranks' gradients instead of their mean
            (:mod:`lightning_dopt.gradients`); with ``local_steps > 1`` each round combines the pseudo-gradients
            ``anchor − x_i`` with AdaCons weights, keeping the mean pseudo-gradient's norm
            (:class:`~lightning_dopt.rounds.PseudoGradientRound`).
        adacons_momentum: β of AdaCons' subspace momentum (0 disables it).
        adacons_layerwise: one weight per rank and parameter tensor instead of one per rank.
        adacons_guard: ``"shift"`` or ``"mean"``: what to do with negative coefficients or a sum ≤ eps.
        preserve_scale: rescale the AdaCons gradient to the norm of the mean gradient (use it with plain SGD).
        stale_weights: reuse the previous step's AdaCons weights: one gradient all-reduce per step instead of two.
        outer_optimizer: ``"diloco"`` (SGD, Nesterov momentum 0.9, lr 0.7) or a factory
            ``params -> torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=1.0)``; picklable for
            the spawn launcher). With ``topology="complete"`` each round steps a shared anchor with the
            pseudo-gradient ``anchor − mean_i x_i`` (DiLoCo) and sets every replica to it; with a graph topology each
            rank steps its own anchor with its neighbourhood's mixed pseudo-gradient from its neighbourhood's mixed
            anchor (NoLoCo-style, :class:`~lightning_dopt.rounds.GossipOuterRound`; twice gossip's bytes). With
            ``compression`` the pseudo-gradient is that of the compressed exact mean (``complete``,
            :class:`~lightning_dopt.compressed_rounds.CompressedOuterRound`), or over a graph topology anchors and
            pseudo-gradients travel encoded, the latter with error feedback for biased codecs such as
            :class:`~lightning_dopt.topk.TopKCodec`
            (:class:`~lightning_dopt.compressed_rounds.CompressedGossipOuterRound`; ``2·c`` times fp32 gossip's bytes
            for payload ratio ``c``, anchors refreshed by a compressed exact mean every ``anchor_interval`` rounds).
        scaling: ``None`` or one of :data:`~lightning_dopt.scaling.SCALINGS` (``"adam"``, ``"rmsprop"``,
            ``"oasis"``): every local step becomes ``x ← x − γ D⁻¹ g`` (the optimizer sees ``D⁻¹ g``) with a diagonal
            ``D`` frozen during a local phase and refreshed after each round from statistics mixed in the round's
            message (identical on every rank with ``complete``, approximately so with gossip). ``D = 1`` until the
            first round. OASIS estimates ``diag(∇²f)`` with one finite-difference Hutchinson probe per step (two
            extra forward/backward passes).
        scaling_beta, scaling_eps, scaling_alpha_min: EMA factor of the statistics, floor of ``D`` for adam/rmsprop,
            floor for oasis.
        scaling_floor: relative floor of ``D``: within each parameter tensor ``D ≥ scaling_floor · mean(D)``, so a
            coordinate whose statistics are (near) zero does not take a step ``1/eps`` times too long (0 disables it).
        overlap: run each round's exchange in a background thread (own process group, side CUDA stream) while
            the next local steps compute, and apply it one round later with the delta rule
            ``x ← x + (mixed − snapshot)`` (:class:`~lightning_dopt.rounds.OverlappedRounds`; staleness one round).
            Not with AdaCons rounds or an outer optimizer.
        min_work: the least share of its batches a rank trains on. Below 1.0, a rank persistently slower than the
            median rank skips whole optimizer steps (its work fraction adapts at every round to the median's pace,
            never below ``min_work``) instead of making the others wait for it at rounds (partial work,
            :mod:`lightning_dopt.pacing`). Skipped steps still count as steps (rounds, ``global_step``,
            schedulers); the user's ``training_step`` is not called for them and ``on_train_batch_end`` receives
            ``{"loss": 0, "dopt_skipped": True}``. Needs automatic optimization and no collectives inside
            ``training_step`` (``self.log(..., sync_dist=True)`` per step, ``all_gather``, ``sync_batchnorm``),
            which a skipping rank would not join. 1.0 (default): every rank trains on every batch.
        hierarchy: ``"flat"`` (default): every rank is a gossip peer. ``"node"``: one replica per node: the ranks of
            a node average their gradients (and buffers) every step, rounds of ``topology`` run between nodes, and
            local rank ``k`` of a node exchanges (and compresses) only shard ``k`` of the state with local rank ``k``
            of the partner node, after which the node re-assembles the state (:mod:`lightning_dopt.hierarchy`).
            Ranks must be numbered node by node with the same number on every node (torchrun, SLURM).
    """

    local_steps: int = 1
    topology: str = "random"
    warmup_steps: int = 0
    average_buffers: bool = True
    eval_model: str = "average"
    consensus_interval: int | None = None
    seed: int = 0
    compression: str | Codec | None = None
    block_size: int = 256
    anchor_interval: int = 16
    anchor_tolerance: float | None = 0.5
    aggregation: str = "mean"
    adacons_momentum: float = 0.0
    adacons_layerwise: bool = False
    adacons_guard: str = "shift"
    preserve_scale: bool = False
    stale_weights: bool = False
    outer_optimizer: str | OuterOptimizerFactory | None = None
    scaling: str | None = None
    scaling_beta: float = 0.999
    scaling_eps: float = 1e-8
    scaling_alpha_min: float = 1e-4
    scaling_floor: float = 1e-2
    overlap: bool = False
    min_work: float = 1.0
    hierarchy: str = "flat"

    def __post_init__(self) -> None:
        check_int("local_steps", self.local_steps, 1)
        validate_topology(self.topology)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.eval_model not in EVAL_MODELS:
            raise ValueError(f"unknown eval_model {self.eval_model!r}; valid choices: {', '.join(EVAL_MODELS)}")
        if self.consensus_interval is not None:
            check_int("consensus_interval", self.consensus_interval, 1)
        check_int("seed", self.seed, 0)
        check_anchor_options(self.anchor_interval, self.anchor_tolerance)
        self.codec  # noqa: B018 (validates compression and block_size)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; valid choices: {', '.join(AGGREGATIONS)}")
        momentum = self.adacons_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"adacons_momentum must be a number in [0, 1); got {momentum!r}")
        if self.adacons_guard not in GUARDS:
            raise ValueError(f"unknown adacons_guard {self.adacons_guard!r}; valid choices: {', '.join(GUARDS)}")
        outer_optimizer_factory(self.outer_optimizer)
        if self.scaling is not None:
            if self.scaling not in SCALINGS:
                raise ValueError(f"unknown scaling {self.scaling!r}; valid choices: None, {', '.join(SCALINGS)}")
            check_relative_floor(self.scaling_floor, "scaling_floor")
            make_preconditioner(self.scaling, [], beta=self.scaling_beta, eps=self.scaling_eps,
                                alpha_min=self.scaling_alpha_min, relative_floor=self.scaling_floor)
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be True or False; got {self.overlap!r}")
        object.__setattr__(self, "min_work", check_min_work(self.min_work))
        check_hierarchy(self.hierarchy)
        check_combination(self.setting)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(field.name for field in fields(cls))

    @property
    def codec(self) -> Codec | None:
        """The codec of ``compression`` (``None``: fp32 rounds)."""
        return make_codec(self.compression, block_size=self.block_size)

    @property
    def outer_factory(self) -> OuterOptimizerFactory | None:
        return outer_optimizer_factory(self.outer_optimizer)

    @property
    def setting(self) -> Setting:
        """The facts :mod:`lightning_dopt.combinations` checks (those known at construction)."""
        codec = self.codec
        compression = None if codec is None else self.compression if isinstance(self.compression, str) else repr(codec)
        outer = None if self.outer_optimizer is None else "diloco" if self.outer_optimizer == "diloco" else "custom"
        return Setting(topology=self.topology, compression=compression, overlap=self.overlap, scaling=self.scaling,
                       aggregation=self.aggregation, outer_optimizer=outer, local_steps=self.local_steps,
                       min_work=self.min_work, warmup_steps=self.warmup_steps, stale_weights=self.stale_weights,
                       preserve_scale=self.preserve_scale, hierarchy=self.hierarchy)

    @property
    def combines_gradients(self) -> bool:
        """Synchronous AdaCons: every step combines gradients, so replicas never diverge and need no rounds."""
        return self.aggregation == "adacons" and self.local_steps == 1
