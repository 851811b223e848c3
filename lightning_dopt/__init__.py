"""lightning-dopt: Lightning strategies that communicate less.

``import lightning_dopt`` registers the strategy names ``gossip_local``, ``local_sgd``, ``adacons``, their
``*_spawn`` variants, ``noloco``, ``gossip_node`` and ``simulated`` with Lightning (idempotent), so
``Trainer(strategy="gossip_local")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dopt.comm import CommStats, PeerFailure
from lightning_dopt.compress import CODECS, Codec, make_codec
from lightning_dopt.engine import Engine, NonFiniteReplicaError
from lightning_dopt.group_max import GroupMaxCodec
from lightning_dopt.inprocess import InProcessCommunicator, InProcessGroup
from lightning_dopt.options import EVAL_MODELS, Options
from lightning_dopt.simulation import SimulatedStrategy
from lightning_dopt.strategy import GossipLocalStrategy, sidecar_path
from lightning_dopt.topk import TopKCodec
from lightning_dopt.topology import TOPOLOGIES

GossipLocalStrategy.register_strategies(StrategyRegistry)
if SimulatedStrategy.strategy_name not in StrategyRegistry:
    SimulatedStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"
__all__ = ["CODECS", "Codec", "CommStats", "EVAL_MODELS", "Engine", "GossipLocalStrategy", "GroupMaxCodec",
           "InProcessCommunicator", "InProcessGroup", "NonFiniteReplicaError", "Options", "PeerFailure",
           "SimulatedStrategy", "TOPOLOGIES", "TopKCodec", "make_codec", "sidecar_path", "__version__"]
