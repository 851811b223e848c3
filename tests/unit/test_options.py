"""Options: validated once for both strategies, readable as strategy attributes, and buildable from class paths."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_dopt import GossipLocalStrategy, SimulatedStrategy
from lightning_dopt.compress import BlockQuantCodec
from lightning_dopt.options import PRESETS, Options


def test_both_strategies_hold_the_same_validated_options() -> None:
    gossip = GossipLocalStrategy(local_steps=3, compression="int8")
    simulated = SimulatedStrategy(workers=5, local_steps=3, compression="int8")
    assert gossip.options == simulated.options == Options(local_steps=3, compression="int8")
    assert (gossip.local_steps, simulated.compression, simulated.workers) == (3, "int8", 5)
    with pytest.raises(AttributeError, match="no attribute 'not_an_option'"):
        gossip.not_an_option  # noqa: B018
    with pytest.raises(AttributeError, match="local_steps is fixed when the strategy is built"):
        simulated.local_steps = 8
    for strategy in (GossipLocalStrategy, SimulatedStrategy):
        with pytest.raises(ValueError, match="unknown topology 'star'; valid choices: random, ring"):
            strategy(topology="star")


def test_presets_are_valid_option_sets() -> None:
    for name, (options, _) in PRESETS.items():
        GossipLocalStrategy(**options)


def test_lightning_cli_builds_codec_and_outer_optimizer_objects_from_class_paths() -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(GossipLocalStrategy, "strategy")

    def build(*args: str) -> GossipLocalStrategy:
        return parser.instantiate_classes(parser.parse_args(list(args))).strategy

    quantized = build("--strategy.compression=lightning_dopt.compress.BlockQuantCodec", "--strategy.compression.bits=4",
                      "--strategy.compression.block_size=64")
    assert isinstance(quantized.options.codec, BlockQuantCodec)
    assert (quantized.options.codec.bits, quantized.options.codec.block_size) == (4, 64)
    outer = build("--strategy.topology=complete", "--strategy.local_steps=4", "--strategy.outer_optimizer=torch.optim.SGD",
                  "--strategy.outer_optimizer.lr=0.5", "--strategy.outer_optimizer.momentum=0.9")
    optimizer = outer.options.outer_factory([torch.zeros(3, requires_grad=True)])
    assert isinstance(optimizer, torch.optim.SGD)
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["momentum"]) == (0.5, 0.9)
