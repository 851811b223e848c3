"""Outer optimizers over gossip topologies (GossipOuterRound) on virtual ranks: outer SGD with lr 1 and no momentum
is plain gossip (also through CompressedGossipOuterRound with a lossless codec); the mean anchor follows the outer
optimizer on the mean pseudo-gradient; state round-trips so a resumed run continues bitwise; BatchNorm buffers are
mixed."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lightning_dopt.compress import Codec
from lightning_dopt.compressed_rounds import CompressedGossipOuterRound
from lightning_dopt.engine import Engine, build_engine
from lightning_dopt.inprocess import InProcessGroup
from lightning_dopt.options import Options
from lightning_dopt.rounds import GossipOuterRound

NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
NO_REFRESH = 10_000  # an anchor_interval longer than the runs: compressed outer rounds are all graph rounds


class LosslessCodec(Codec):
    """fp32 values as their own bytes: encode/decode is the identity, so a compressed round computes what the
    uncompressed one does (up to the order of float additions)."""

    name = "fp32"
    unbiased = True

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.detach().float().contiguous().view(torch.uint8).clone()

    def decode(self, payload: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        numel = self._check_payload(payload, numel)
        values = payload.view(torch.float32)
        return values.clone() if out is None else out.copy_(values)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))


class VirtualRun:
    """``world_size`` virtual ranks, each training its own copy of ``model(0)`` (common start) on its own data with
    plain SGD, the engine's closure and step; ``step(k)`` runs ``k`` optimizer steps on every rank."""

    def __init__(self, options: Options, world_size: int) -> None:
        self.group = InProcessGroup(world_size, timeout=20.0)
        self.modules = [model(0) for _ in range(world_size)]
        self.engines: list[Engine] = [
            build_engine(options, module, [list(module.parameters())], comm, rank, torch.device("cpu"),
                         background=comm.background, timeout=20.0)
            for rank, (module, comm) in enumerate(zip(self.modules, self.group.communicators()))]
        self.group.run(lambda rank: self.engines[rank].sync.broadcast_())
        self.steps = 0
        self.before_round: list[torch.Tensor | None] = [None] * world_size  # parameters before the last after_step

    def _step(self, rank: int) -> None:
        module, engine = self.modules[rank], self.engines[rank]
        params = list(module.parameters())
        data = torch.randn(16, 6, generator=torch.Generator().manual_seed(1000 * self.steps + rank)) + rank

        def closure() -> None:
            module.zero_grad()
            (module(data) - rank).square().mean().backward()

        engine.wrap_closure(0, params, closure)()
        with torch.no_grad():
            for p in params:
                p -= 0.05 * p.grad
        self.before_round[rank] = torch.cat([p.detach().reshape(-1) for p in params])
        engine.after_step()

    def step(self, count: int = 1) -> None:
        for _ in range(count):
            self.group.run(self._step)
            self.steps += 1

    def checkpoint(self) -> list[tuple[dict, int, int, dict[str, torch.Tensor]]]:
        """What a checkpoint and its sidecar hold, per rank: engine state, step and round counters, module state."""
        return [(engine.state_dict(), engine.steps, engine.round, {k: v.clone() for k, v in module.state_dict().items()})
                for engine, module in zip(self.engines, self.modules)]

    def restore(self, saved: list[tuple[dict, int, int, dict[str, torch.Tensor]]]) -> None:
        """Resume every rank from :meth:`checkpoint`'s output."""
        for engine, module, (engine_state, steps, round_index, module_state) in zip(self.engines, self.modules, saved):
            module.load_state_dict(module_state)
            engine.load_state_dict(engine_state)
            engine.steps = engine.fit_first_step = steps
            engine.round = round_index
        self.steps = saved[0][1]

    def flat(self, rank: int) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in self.modules[rank].state_dict().values()
                          if t.is_floating_point()])

    def close(self) -> None:
        self.group.close()


@pytest.mark.parametrize("lossless", [False, True], ids=["exact", "lossless_codec"])
@pytest.mark.parametrize(("topology", "world_size"), [("random", 5), ("one_peer_exponential", 4), ("ring", 4)])
def test_outer_sgd_with_lr_one_and_no_momentum_is_plain_gossip(topology: str, world_size: int, lossless: bool) -> None:
    """GossipOuterRound, and CompressedGossipOuterRound over a lossless codec (graph rounds only)."""
    compressed = {"compression": LosslessCodec(), "anchor_interval": NO_REFRESH} if lossless else {}
    plain = VirtualRun(Options(local_steps=2, topology=topology), world_size)
    outer = VirtualRun(Options(local_steps=2, topology=topology, **compressed,
                               outer_optimizer=functools.partial(torch.optim.SGD, lr=1.0)), world_size)
    assert isinstance(outer.engines[0].sync.round, CompressedGossipOuterRound if lossless else GossipOuterRound)
    plain.step(12)
    outer.step(12)
    for rank in range(world_size):
        assert torch.allclose(outer.flat(rank), plain.flat(rank), atol=1e-6, rtol=0)
    assert float((plain.flat(0) - plain.flat(1)).abs().max()) > 1e-3  # the replicas still differ: not vacuous
    plain.close()
    outer.close()


def test_the_mean_anchor_follows_the_outer_optimizer_on_the_mean_pseudo_gradient() -> None:
    """Σ_i θ̄_i = Σ_i θ_i and Σ_i Δ̄_i = Σ_i Δ_i for doubly stochastic W, and Nesterov SGD is linear in its
    gradients: the mean anchor takes exactly the step that the outer optimizer takes on the mean pseudo-gradient."""
    world_size, local_steps = 4, 3
    run = VirtualRun(Options(local_steps=local_steps, topology="ring", outer_optimizer=NESTEROV), world_size)
    anchors = [engine.sync.round.anchor for engine in run.engines]
    oracle = torch.zeros_like(anchors[0], dtype=torch.float64, requires_grad=True)
    oracle_outer = torch.optim.SGD([oracle], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(5):
        run.step(local_steps - 1)
        mean_anchor = torch.stack(anchors).double().mean(0)
        run.step(1)  # its after_step is the round
        mean_local = torch.stack(run.before_round).double().mean(0)
        with torch.no_grad():
            oracle.copy_(mean_anchor)
        oracle.grad = mean_anchor - mean_local
        oracle_outer.step()
        new_mean = torch.stack(anchors).double().mean(0)
        assert torch.allclose(new_mean, oracle.detach(), atol=1e-5, rtol=0)
    assert float((anchors[0] - anchors[2]).abs().max()) > 1e-3  # the ranks' anchors differ: gossip, not averaging
    run.close()


def test_a_resumed_run_continues_bitwise() -> None:
    options = Options(local_steps=2, topology="random", outer_optimizer=NESTEROV)
    straight = VirtualRun(options, 3)
    straight.step(10)
    first = VirtualRun(options, 3)
    first.step(5)
    saved = first.checkpoint()
    first.close()
    resumed = VirtualRun(options, 3)
    resumed.restore(saved)
    resumed.step(5)
    for rank in range(3):
        assert torch.equal(resumed.flat(rank), straight.flat(rank))
        assert torch.equal(resumed.engines[rank].sync.round.anchor, straight.engines[rank].sync.round.anchor)
    straight.close()
    resumed.close()


def test_batchnorm_buffers_are_mixed_with_the_parameters() -> None:
    run = VirtualRun(Options(local_steps=2, topology="one_peer_exponential", outer_optimizer=NESTEROV), 2)
    run.step(1)
    means = [module[1].running_mean.clone() for module in run.modules]
    assert not torch.allclose(means[0], means[1])  # different data: different statistics before the round
    run.step(1)  # a round between the two ranks: ½/½ of everything
    assert torch.allclose(run.modules[0][1].running_mean, run.modules[1][1].running_mean)
    run.close()
