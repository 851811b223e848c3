"""``GossipLocalStrategy(hierarchy="node")`` under Lightning, launched as a cluster launches it: 3 nodes × 2 ranks,
one process each with torchrun's environment (``RANK``, ``LOCAL_RANK``, ``GROUP_RANK``, ``LOCAL_WORLD_SIZE``,
``WORLD_SIZE``) and ``Trainer(devices=2, num_nodes=3)`` (the fork server of :mod:`reliability_models`). The
algorithm itself is tested on the engine in ``tests/distributed/test_hierarchy_distributed.py``; here: the
strategy builds the node and cross-node groups from the cluster environment, trains, ends with one model on every
rank, counts intra-node bytes apart, resumes from a checkpoint, and refuses bad layouts on every rank without a hang.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_dopt import sidecar_path
from reliability_models import RankLauncher

pytestmark = pytest.mark.timeout(240)

WORLD, LOCAL, NODES = 6, 2, 3
SPEC = {"world_size": WORLD, "local_world_size": LOCAL, "record": True, "deadline_s": 120.0,
        "strategy": {"local_steps": 2, "hierarchy": "node", "compression": "int8", "timeout_s": 60},
        "model_options": {"batch_norm": True, "samples": 72},
        "trainer": {"devices": LOCAL, "num_nodes": NODES, "max_steps": 6}}


def load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("overlap", [False, True])
def test_three_nodes_of_two_ranks_train_to_one_model(launcher: RankLauncher, tmp_path: Path, overlap: bool) -> None:
    # checkpoints at epoch ends (3 steps of 12 samples per rank), where a resumed fit replays the same batches
    spec = {**SPEC, "strategy": {**SPEC["strategy"], "overlap": overlap},
            "checkpoints": [{"dirpath": str(tmp_path / "ckpt"), "every_n_epochs": 1, "save_top_k": -1,
                             "save_on_train_epoch_end": True, "filename": "{step}"}]}
    run = launcher.run(spec, tmp_path)
    assert run.codes == [0] * WORLD, run.report()
    ends = [load(tmp_path / f"end-rank{rank}.pt") for rank in range(WORLD)]  # the last step's replicas
    for node in range(NODES):
        first, second = ends[LOCAL * node], ends[LOCAL * node + 1]
        assert all(torch.equal(first[key], second[key]) for key in first), node  # one replica per node
    # after the last round (step 6) one node of three rested: the nodes are not all equal
    assert not all(torch.equal(ends[0]["net.0.weight"], ends[LOCAL * node]["net.0.weight"]) for node in range(NODES))
    finals = [load(tmp_path / f"fit-end-rank{rank}.pt") for rank in range(WORLD)]  # after the exact average
    for key in finals[0]:
        assert all(torch.equal(finals[0][key], final[key]) for final in finals), key
    for rank in range(WORLD):
        stats = json.loads((tmp_path / f"stats-rank{rank}.json").read_text())
        sent = stats["bytes_sent_by_purpose"]
        assert stats["global_step"] == 6 and sent.get("node", 0) > 0, stats
    checkpoint = tmp_path / "ckpt" / "step=3.ckpt"
    assert checkpoint.exists() and all(Path(sidecar_path(checkpoint, rank)).exists() for rank in range(WORLD))

    saved = [load(sidecar_path(checkpoint, rank))["state_dict"] for rank in range(WORLD)]
    resumed = launcher.run({**spec, "checkpoints": [], "ckpt_path": str(checkpoint)}, tmp_path / "resumed")
    assert resumed.codes == [0] * WORLD, resumed.report()
    for rank in range(WORLD):  # every rank restarts from its own saved replica: its node's, the same on both ranks
        start = load(tmp_path / "resumed" / f"start-rank{rank}.pt")
        assert all(torch.equal(start[key], saved[rank][key]) for key in saved[rank]), rank
        assert all(torch.equal(saved[rank][key], saved[rank - rank % LOCAL][key]) for key in saved[rank]), rank
    assert not all(torch.equal(saved[0]["net.0.weight"], saved[LOCAL * node]["net.0.weight"]) for node in range(NODES))


@pytest.mark.parametrize(("env", "message"), [
    ({"GROUP_RANK": "0"}, "numbered node by node"),
    ({"LOCAL_WORLD_SIZE": "{rank}"}, "the same number of ranks on every node"),
])
def test_a_bad_node_layout_fails_on_every_rank(launcher: RankLauncher, tmp_path: Path, env: dict[str, str],
                                               message: str) -> None:
    run = launcher.run({**SPEC, "env": env, "deadline_s": 60.0}, tmp_path)
    assert not run.hung and all(code != 0 for code in run.codes), run.codes
    for rank in range(WORLD):
        assert message in run.stderr(rank), run.stderr(rank)[-2000:]
