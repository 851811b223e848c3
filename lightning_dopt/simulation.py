"""``SimulatedStrategy``: ``N`` data-parallel workers trained in one process on one device, mixed by the very same
engine objects as a real run, through the in-process communicator.

For research at scale without a cluster: ``Trainer(devices=1, strategy=SimulatedStrategy(workers=64, local_steps=4,
topology="random", compression="int8"))`` trains 64 replicas of the module, worker ``i`` on the shard of the training
data that ``DistributedSampler(num_replicas=64, rank=i)`` gives rank ``i`` under DDP, each with its own optimizer
state, its own random stream and its own :class:`~lightning_dopt.engine.Engine`, whose rounds, codecs, AdaCons and
scaling run on an :class:`~lightning_dopt.inprocess.InProcessCommunicator`: the byte counters and the consensus
distance are those a real ``N``-rank run reports. With ``workers=4`` and the same seed, the averaged model after fit
equals that of a 4-rank ``GossipLocalStrategy`` run to float rounding (``tests/integration/test_simulation.py``).

One optimizer step of the simulation (one Lightning step, ``global_step`` + 1):

1. each worker in turn: its tensors, optimizer state and random state are swapped into the module (pointer swaps,
   no copies), and Lightning's closure runs its ``training_step`` on its batch and the backward pass;
2. the gradient work that needs every worker (warm-up averaging, synchronous AdaCons) and the scaling statistics run
   in one thread per worker (collectives meet in the in-process group);
3. each worker in turn: Lightning's optimizer step (gradient clipping, ``on_before_optimizer_step``, the update);
4. every worker's :meth:`~lightning_dopt.engine.Engine.after_step` in its thread: flags, the round when due.

Between steps the module holds worker 0's replica, as rank 0's process holds its own; validation swaps in the exact
average, and after fit every worker (so the module) holds it. Cost: ``N`` copies of the model, its gradients and the
optimizer state, plus each engine's round buffers; time about ``N`` times a single worker's step (a loop over
workers; the rounds are memory copies).

What differs from a real run, by construction: workers share the device, so ``min_work < 1`` (which adapts to measured
speed) is refused; a single gradient scaler cannot act for ``N`` workers, so ``16-mixed`` precision is refused (use
``bf16-mixed``); OASIS re-runs the step for its probes inside the closure, which the phases above split, so
``scaling="oasis"`` is refused. ``training_step``, ``transfer_batch_to_device`` and ``on_after_batch_transfer`` see one
worker's batch; callbacks' batch hooks and ``on_before_batch_transfer`` see the :class:`WorkerBatches` of the step;
the loss in the progress bar is the last worker's (a value logged with ``on_epoch=True`` is the mean over workers and
batches).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.fabric.plugins import CheckpointIO
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dopt.combinations import check as check_combination
from lightning_dopt.comm import CommStats
from lightning_dopt.compress import Codec
from lightning_dopt.engine import Engine, build_engine, optimizer_params
from lightning_dopt.inprocess import InProcessGroup
from lightning_dopt.options import Options, OptionsAttributes, check_int
from lightning_dopt.replica import ReplicaTensors, persistent_buffers
from lightning_dopt.rounds import OuterOptimizerFactory
from lightning_dopt.scaling import RandomState, capture_rng_state, restore_rng_state
from lightning_dopt.topology import validate_topology


SIMULATION_KEY = "lightning_dopt_simulation"
"""Where a simulation's checkpoint keeps every worker's state (beside the average, which is the ``state_dict``)."""


class WorkerBatches(list):
    """The workers' batches of one step, in worker order (what :class:`WorkerLoader` yields)."""


class WorkerLoader:
    """The training data as the ``N`` workers see it: worker ``i`` iterates the user's ``DataLoader`` re-created with
    the sampler DDP would give rank ``i`` of ``N``; each item is the :class:`WorkerBatches` of one step."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders
        self.sampler = self  # Lightning calls sampler.set_epoch(epoch) at every epoch

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            for sampler in {id(s): s for s in (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
                            if s is not None}.values():
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[WorkerBatches]:
        return (WorkerBatches(batches) for batches in zip(*self.loaders))


@dataclass
class Worker:
    """One simulated worker: its replica tensors (worker 0's are the module's own), optimizer state, random state and
    engine."""

    index: int
    tensors: list[Tensor]
    params: list[Tensor]  # its copies of the optimizer's parameters, in the optimizer's order
    optimizer_state: dict[Any, Any]
    rng: RandomState
    engine: Engine
    grads: list[Tensor | None] = field(default_factory=list)


class SimulatedStrategy(OptionsAttributes, SingleDeviceStrategy):
    """``workers`` data-parallel replicas of the module in this process, on the Trainer's one device.

    Args:
        workers: number of simulated workers ``N`` ≥ 1 (what ``world_size`` would be).
        local_steps … min_work: the algorithm options of :class:`~lightning_dopt.options.Options`, as for
            :class:`~lightning_dopt.strategy.GossipLocalStrategy` (refused here: ``min_work < 1``, ``scaling="oasis"``).
        timeout: bound in seconds on every wait between workers.
    """

    strategy_name = "simulated"

    def __init__(
        self, workers: int = 4, local_steps: int = 1, topology: str = "random", warmup_steps: int = 0,
        average_buffers: bool = True, eval_model: str = "average", consensus_interval: int | None = None,
        seed: int = 0, compression: str | Codec | None = None, block_size: int = 256, anchor_interval: int = 16,
        anchor_tolerance: float | None = 0.5, aggregation: str = "mean", adacons_momentum: float = 0.0,
        adacons_layerwise: bool = False, adacons_guard: str = "shift", preserve_scale: bool = False,
        stale_weights: bool = False, outer_optimizer: str | OuterOptimizerFactory | None = None,
        scaling: str | None = None, scaling_beta: float = 0.999, scaling_eps: float = 1e-8,
        scaling_alpha_min: float = 1e-4, scaling_floor: float = 1e-2, overlap: bool = False, min_work: float = 1.0,
        accelerator: Accelerator | None = None, checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None, timeout: float = 600.0,
    ) -> None:
        check_int("workers", workers, 1)
        self.options = Options(
            local_steps, topology, warmup_steps, average_buffers, eval_model, consensus_interval, seed, compression,
            block_size, anchor_interval, anchor_tolerance, aggregation, adacons_momentum, adacons_layerwise,
            adacons_guard, preserve_scale, stale_weights, outer_optimizer, scaling, scaling_beta, scaling_eps,
            scaling_alpha_min, scaling_floor, overlap, min_work)
        validate_topology(topology, workers)
        if min_work < 1.0:
            raise ValueError(f"SimulatedStrategy refuses min_work={min_work!r}: partial work adapts to each rank's "
                             "measured speed, and simulated workers share one device. Use min_work=1.0")
        if scaling == "oasis":
            raise ValueError("SimulatedStrategy refuses scaling='oasis': its probes re-run each worker's step inside "
                             "the closure. Use scaling='adam' or 'rmsprop', or GossipLocalStrategy")
        if not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0; got {timeout!r}")
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        self.workers = workers
        self.timeout = float(timeout)
        self.parallel_devices: list[torch.device] | None = None  # the Trainer's devices (one)
        self._group: InProcessGroup | None = None
        self._workers: list[Worker] = []
        self._module_tensors: list[Tensor] = []  # the module's parameters and persistent buffers, swapped per worker
        self._own: list[Tensor] = []  # the module's own storage (worker 0's), put back after each swap
        self._current = 0  # the worker whose batch training_step takes
        self._restored: dict[str, Any] | None = None  # the workers' states of the checkpoint a fit resumes

    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[0] if self.parallel_devices else self._root_device

    # ------------------------------------------------------------------------------------------ setup
    def _check_run(self, trainer: Any) -> None:
        """Refuse, before training, what a single process cannot simulate faithfully."""
        if self.parallel_devices and len(self.parallel_devices) > 1:
            raise ValueError(f"SimulatedStrategy trains its {self.workers} workers on one device; got "
                             f"{len(self.parallel_devices)} devices. Use Trainer(devices=1)")
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(f"SimulatedStrategy refuses precision={precision!r} with a gradient scaler: each rank "
                             "keeps its own scaler, the simulation has one. Use precision='bf16-mixed' or '32-true'")
        module = self.lightning_module
        check_combination(replace(self.options.setting, precision=precision, sync_batchnorm=False,
                                  automatic_optimization=bool(module.automatic_optimization),
                                  accumulate_grad_batches=int(trainer.accumulate_grad_batches)))
        if not module.automatic_optimization or trainer.accumulate_grad_batches != 1:
            raise ValueError("SimulatedStrategy runs every worker's forward and backward inside the optimizer step: "
                             "it needs automatic optimization and accumulate_grad_batches=1 (got "
                             f"automatic_optimization={module.automatic_optimization}, accumulate_grad_batches="
                             f"{trainer.accumulate_grad_batches})")

    @override
    def setup(self, trainer: Any) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._check_run(trainer)
        super().setup(trainer)
        if fitting:
            self._build_workers()

    def _build_workers(self) -> None:
        """``N`` workers starting from the module's weights (as ranks start from rank 0's), each with an engine."""
        module, device, options = self.lightning_module, self.root_device, self.options
        if len(self.optimizers) != 1:
            raise ValueError(f"SimulatedStrategy needs exactly one optimizer; configure_optimizers gave "
                             f"{len(self.optimizers)}")
        mine = list(module.parameters()) + persistent_buffers(module)
        self._module_tensors, self._own = mine, [tensor.data for tensor in mine]
        count = len(list(module.parameters()))
        self._group = InProcessGroup(self.workers, self.timeout, device)
        comms = self._group.communicators()
        optimizer, rng = self.optimizers[0], capture_rng_state(device)
        self._workers = []
        for index, comm in enumerate(comms):
            tensors = mine if index == 0 else [t.detach().clone().requires_grad_(t.requires_grad) for t in mine]
            replica = ReplicaTensors(tensors[:count], tensors[count:], tensors[count:])
            by_module = dict(zip(map(id, mine), tensors))
            params = [by_module[id(p)] for p in optimizer_params(optimizer)]
            engine = build_engine(options, replica, [params], comm if self.workers > 1 else None, index, device,
                                  background=comm.background, timeout=self.timeout)
            state = optimizer.state if index == 0 else defaultdict(dict)
            self._workers.append(Worker(index, tensors, params, state, (rng[0].clone(), rng[1]), engine))
        if self._restored is not None:
            self._restore_workers(self._restored)
        else:
            self._on_workers(lambda worker: worker.engine.sync and worker.engine.sync.broadcast_(src=0))

    def _on_workers(self, fn: Callable[[Worker], Any]) -> list[Any]:
        """``fn`` on every worker, concurrently (one thread each: collectives need every worker)."""
        assert self._group is not None
        return self._group.run(lambda index: fn(self._workers[index]))

    @contextmanager
    def _as_worker(self, worker: Worker) -> Iterator[None]:
        """The module computes as ``worker``: its tensors, optimizer state and random state swapped in."""
        mine, optimizer = self._module_tensors, self.optimizers[0]
        if worker.index:
            for tensor, value in zip(mine, worker.tensors):
                tensor.data = value
        optimizer.state = worker.optimizer_state
        own_rng = capture_rng_state(self.root_device)  # the process's stream (data loading, callbacks) goes on
        restore_rng_state(worker.rng, self.root_device)
        self._current = worker.index
        try:
            yield
        finally:
            worker.rng = capture_rng_state(self.root_device)
            restore_rng_state(own_rng, self.root_device)
            if worker.index:
                for tensor, own in zip(mine, self._own):
                    tensor.data = own
            optimizer.state = self._workers[0].optimizer_state

    @property
    def engine(self) -> Engine | None:
        """Worker 0's engine (what rank 0's would be)."""
        return self._workers[0].engine if self._workers else None

    @property
    def comm_stats(self) -> CommStats:
        """Worker 0's communication counters."""
        return self.engine.comm_stats if self.engine is not None else CommStats()

    def gather_comm_stats(self) -> list[CommStats]:
        """Every worker's counters, in worker order."""
        return [worker.engine.comm_stats for worker in self._workers]

    @property
    def steps(self) -> int:
        return self.engine.steps if self.engine is not None else 0

    # ------------------------------------------------------------------------------------------ data
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """The training loader becomes a :class:`WorkerLoader` of ``N`` shards (the other stages see the data as
        given: evaluation runs once, on the average)."""
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING or not isinstance(dataloader, torch.utils.data.DataLoader):
            return dataloader
        loaders = [_update_dataloader(dataloader, _get_distributed_sampler(
            dataloader, shuffle=True, overfit_batches=trainer.overfit_batches, mode=RunningStage.TRAINING,
            num_replicas=self.workers, rank=rank), mode=RunningStage.TRAINING) for rank in range(self.workers)]
        return WorkerLoader(loaders)

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """Workers' batches move one by one, so the transfer hooks (``transfer_batch_to_device``,
        ``on_after_batch_transfer``) see one worker's batch each, as on a rank."""
        transfer = super().batch_to_device
        if isinstance(batch, WorkerBatches):
            return WorkerBatches(transfer(one, device, dataloader_idx) for one in batch)
        return transfer(batch, device, dataloader_idx)

    # ----------------------------------------------------------------------------------- optimization
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's ``training_step`` on the current worker's batch."""
        batch, *rest = args
        return super().training_step(batch[self._current], *rest, **kwargs)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        """One step of every worker (the four phases of the module docstring)."""
        mine = optimizer_params(optimizer)
        self._workers[0].optimizer_state = optimizer.state  # (a checkpoint restore replaces the dict)
        outputs = []
        for worker in self._workers:  # 1. forward and backward
            with self._as_worker(worker):
                outputs.append(closure())
                worker.grads = [p.grad for p in mine]
                for p in mine:
                    p.grad = None
        if any(worker.engine.wraps_gradients for worker in self._workers):  # 2. gradients across workers
            self._on_workers(lambda worker: self._combine_gradients(worker, outputs[worker.index]))
        for worker in reversed(self._workers):  # 3. clipping and update (worker 0 last: its gradients stay)
            with self._as_worker(worker):
                for p, grad in zip(mine, worker.grads):
                    p.grad = grad
                output = super().optimizer_step(optimizer, lambda: outputs[worker.index], model, **kwargs)
            worker.grads = []
        logged = self._on_workers(lambda worker: worker.engine.after_step())  # 4. flags and rounds
        module = self.lightning_module
        if logged[0] and module._current_fx_name is not None:
            module.log_dict(logged[0], on_step=True, on_epoch=False, batch_size=1)
        return output

    def _combine_gradients(self, worker: Worker, output: Any) -> None:
        """Phase 2 for one worker: its engine's gradient wrappers on its gradients (held on its own tensors)."""
        for tensor, grad in zip(worker.params, worker.grads):
            tensor.grad = grad
        worker.engine.wrap_closure(0, worker.params, lambda: output, device=self.root_device)()
        worker.grads = [tensor.grad for tensor in worker.params]
        if worker.index:
            for tensor in worker.params:
                tensor.grad = None

    @override
    def on_train_end(self) -> None:
        """Every worker (so the module) ends fit holding the exact average."""
        super().on_train_end()
        if self._group is not None:
            self._on_workers(lambda worker: worker.engine.finish_fit())

    # ------------------------------------------------------------------------------------- evaluation
    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._group is None or self.workers == 1 or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return
        average = self.options.eval_model == "average"

        def prepare(worker: Worker) -> float:
            worker.engine.drain()
            sync = worker.engine.sync
            return sync.swap_in_average("eval") if average else sync.consensus_distance("eval")

        distance = self._on_workers(prepare)[0]
        self.lightning_module.log("dopt/consensus_distance", distance, on_step=False, on_epoch=True, batch_size=1)

    @override
    def on_validation_end(self) -> None:
        if self._group is not None and self.workers > 1 and self.engine.sync.swapped:
            self._on_workers(lambda worker: worker.engine.sync.restore_local())
        super().on_validation_end()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The exact average of the workers (what a checkpoint's main file holds in a real run)."""
        holds_replicas = self._group is not None and self.workers > 1 and not self.engine.sync.swapped
        if holds_replicas:
            self._on_workers(lambda worker: (worker.engine.drain(), worker.engine.sync.swap_in_average("checkpoint")))
        try:
            return {key: value.clone() for key, value in self.lightning_module.state_dict().items()}
        finally:
            if holds_replicas:
                self._on_workers(lambda worker: worker.engine.sync.restore_local())

    # ------------------------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """The main file holds the exact average (plain Lightning loads it) and, under ``"lightning_dopt_simulation"``,
        every worker's replica, optimizer state, random state and engine state, for an exact resume."""
        if self._group is not None:
            checkpoint[SIMULATION_KEY] = self._workers_state()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _workers_state(self) -> dict[str, Any]:
        optimizer, swapped = self.optimizers[0], self.workers > 1 and self.engine.sync.swapped
        workers = []
        for worker in self._workers:
            if swapped:  # (a save during validation) the local replicas are kept aside: read them
                worker.engine.sync.toggle()
            optimizer.state = worker.optimizer_state
            workers.append({"replica": [t.detach().clone() for t in worker.tensors],
                            "optimizer": copy.deepcopy(optimizer.state_dict()), "rng": worker.rng,
                            "engine": worker.engine.state_dict()})
            if swapped:
                worker.engine.sync.toggle()
        optimizer.state = self._workers[0].optimizer_state
        return {"workers": workers, "steps": self.engine.steps, "round": self.engine.round}

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A fit resumed from a simulation's checkpoint with as many workers restores every worker exactly; with
        another number of workers every worker starts from the average (with a warning)."""
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        saved = checkpoint.get(SIMULATION_KEY)
        self._restored = None
        if saved is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        self._restored = saved
        if len(saved["workers"]) != self.workers:
            rank_zero_warn(f"{checkpoint_path} was written by a simulation of {len(saved['workers'])} workers and is "
                           f"resumed with {self.workers}: every worker starts from the averaged model with worker 0's "
                           "optimizer state; the workers' replicas, optimizer and random states are not restored.")
            self._restored = {"steps": saved["steps"], "round": saved["round"], "workers": None}
        return checkpoint

    @torch.no_grad()
    def _restore_workers(self, saved: dict[str, Any]) -> None:
        """The counters, and with as many workers as saved every worker's replica, random and engine state (their
        optimizer states follow in :meth:`on_train_start`, after Lightning restored worker 0's)."""
        for worker in self._workers:
            worker.engine.steps = worker.engine.fit_first_step = saved["steps"]
            worker.engine.round = saved["round"]
        if saved["workers"] is None:
            self._on_workers(lambda worker: worker.engine.sync and worker.engine.sync.broadcast_(src=0))
            return
        for worker, state in zip(self._workers, saved["workers"]):
            for tensor, value in zip(worker.tensors, state["replica"]):
                tensor.copy_(value)
            worker.rng = state["rng"]
            worker.engine.load_state_dict(state["engine"])

    @override
    def on_train_start(self) -> None:
        """Restore the workers' optimizer states (after Lightning restored worker 0's from the main file)."""
        super().on_train_start()
        if self._restored is not None:
            optimizer, saved = self.optimizers[0], self._restored["workers"]
            first = copy.deepcopy(optimizer.state_dict())  # worker 0's, restored by Lightning from the main file
            states = [state["optimizer"] for state in saved] if saved is not None else [first] * self.workers
            for worker, state in zip(self._workers, states):
                optimizer.load_state_dict(state)
                worker.optimizer_state = optimizer.state
            optimizer.state = self._workers[0].optimizer_state
            self._restored = None

    @override
    def teardown(self) -> None:
        """Release the workers' tensors and threads; their counters and step counts stay readable."""
        for worker in self._workers:
            worker.engine.close()
            worker.engine.preconditioners = []
            worker.tensors, worker.params, worker.optimizer_state, worker.grads = [], [], {}, []
        if self._group is not None:
            self._group.close()
        self._group, self._module_tensors, self._own = None, [], []
        super().teardown()


__all__ = ["SimulatedStrategy", "WorkerBatches", "WorkerLoader"]
