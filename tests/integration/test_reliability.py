"""Reliability of GossipLocalStrategy under failures, bad data layouts, restarts and preemption (CPU, gloo).

Ranks are launched the way clusters launch them (torchrun's environment, ``devices=1, num_nodes=n``, one process
per rank, no agent watching them) by the fork server of :mod:`reliability_models`, which gives every rank's exit
code, exit time and stderr; survivors' times count from the failed rank's death. What is tested:

* a rank killed with SIGKILL (or raising) in each phase of ``fit`` ends every other rank with a non-zero exit
  within ``SURVIVOR_LIMIT_S``, and the survivors' error names the failed rank;
* a crash in the middle of a checkpoint save leaves the earlier checkpoints whole and resumable;
* resuming on another world size starts every rank from the saved average with a warning; a per-rank file from
  another save is refused without any rank hanging;
* uneven data fails before the first step (sized data) or at least never hangs (a stream without a length);
* SIGTERM (to every rank, as SLURM sends it, or to one) stops every rank at the same step with a consistent
  checkpoint, from which a rerun resumes exactly.

docs/reliability.md describes the guarantees and the measured times.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist

from lightning_dopt import GossipLocalStrategy, sidecar_path
from lightning_dopt.checkpoint_files import atomic_save
from lightning_dopt.strategy import AtomicCheckpointIO
from lightning_models import RegressionModel, state_snapshot
from reliability_models import RankLauncher, RunResult

pytestmark = pytest.mark.timeout(240)

SURVIVOR_LIMIT_S = 60.0  # bound on how long the other ranks may take to exit after a rank died (loaded 2-core box)
BASE = {"world_size": 2, "strategy": {"local_steps": 2}, "trainer": {"max_steps": 8}, "deadline_s": 90.0}


def names_failed_rank(stderr: str, rank: int) -> bool:
    """The survivor's error says which rank failed (and how), not just that a socket closed."""
    return re.search(rf"\branks? {rank}\b[^\n]{{0,60}}?\b(stopped|raised|crashed|killed|unreachable|died|exited)",
                     stderr) is not None


def stamp(stderr: str, event: str) -> float | None:
    """Seconds since the run started at which a rank printed ``event`` (see ``reliability_models._stamp``)."""
    match = re.search(rf"\[t=([0-9.]+)\] {re.escape(event)}", stderr)
    return float(match.group(1)) if match else None


def load(path: Path | str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def save_ids(main: Path, world_size: int) -> list[str | None]:
    """The save id of the main file followed by those of its per-rank files (None where a file is missing)."""
    ids = [load(main)["lightning_dopt"]["save_id"]]
    for rank in range(world_size):
        path = sidecar_path(main, rank)
        ids.append(load(path)["save_id"] if os.path.exists(path) else None)
    return ids


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


# ------------------------------------------------------------------------------------------- crashed ranks
# phase -> (failed rank, spec). "checkpoint_save": rank 1 dies while writing its 4th per-rank file (last.ckpt at step
# 4, after step=2.ckpt, last.ckpt and step=4.ckpt were written whole), once rank 0 has written that save's main file
# (or after 5 s); the same run serves the checkpoint tests below.
PHASES: dict[str, tuple[int, dict[str, Any]]] = {
    "local_step": (1, {"fail": {"rank": 1, "phase": "train_step", "at": 3, "how": "sigkill"}}),
    "exception_in_local_step": (1, {"fail": {"rank": 1, "phase": "train_step", "at": 3, "how": "raise"}}),
    "blocking_exchange": (1, {"fail": {"rank": 1, "phase": "round", "at": 1, "how": "sigkill"}}),
    "blocking_exchange_rank0": (0, {"fail": {"rank": 0, "phase": "round", "at": 1, "how": "sigkill"}}),
    "validation_swap": (1, {"fail": {"rank": 1, "phase": "validation", "how": "sigkill"},
                            "trainer": {"max_steps": 8, "limit_val_batches": 2, "val_check_interval": 4}}),
    "checkpoint_save": (1, {"checkpoints": [{"dirpath": "{out}/ckpt", "every_n_train_steps": 2, "save_top_k": -1,
                                             "save_last": True, "filename": "{{step}}"}],
                            "fail": {"rank": 1, "phase": "save", "at": 4, "how": "sigkill", "wait_s": 5.0}}),
    "background_exchange": (1, {"strategy": {"local_steps": 2, "overlap": True},
                                "fail": {"rank": 1, "phase": "after_step", "at": 4, "how": "sigkill"}}),
}
_runs: dict[str, RunResult] = {}


def crashed_run(launcher: RankLauncher, workdir: Path, phase: str) -> RunResult:
    """Run each phase once (two tests read it)."""
    if phase not in _runs:
        out = workdir / phase
        spec = {**BASE, **PHASES[phase][1]}
        spec["checkpoints"] = [{key: value.format(out=out) if isinstance(value, str) else value
                                for key, value in options.items()} for options in spec.get("checkpoints", [])]
        _runs[phase] = launcher.run(spec, out)
    return _runs[phase]


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_crashed_rank_ends_every_other_rank_in_bounded_time(launcher: RankLauncher, workdir: Path,
                                                               phase: str) -> None:
    failed, _ = PHASES[phase]
    result = crashed_run(launcher, workdir, phase)
    expected = -9 if PHASES[phase][1]["fail"]["how"] == "sigkill" else 1
    assert result.codes[failed] == expected, result.report()
    assert not result.hung, result.report()
    died = stamp(result.stderr(failed), f"rank {failed} dies")
    assert died is not None, result.report()
    for rank, code in enumerate(result.codes):
        if rank == failed:
            continue
        assert code != 0, result.report()
        after = result.exit_s[rank] - result.exit_s[failed]
        detected = stamp(result.stderr(rank), "on_exception")
        print(f"\n{phase}: rank {rank} exited with {code} {after:.1f} s after rank {failed} died"
              + (f" (raised {detected - died:.1f} s after)" if detected is not None else ""))
        assert after < SURVIVOR_LIMIT_S, result.report()


@pytest.mark.parametrize("phase", list(PHASES))
def test_the_survivors_error_names_the_failed_rank(launcher: RankLauncher, workdir: Path, phase: str) -> None:
    failed, _ = PHASES[phase]
    result = crashed_run(launcher, workdir, phase)
    for rank in range(len(result.codes)):
        if rank != failed:
            assert names_failed_rank(result.stderr(rank), failed), result.report()


# ---------------------------------------------------------------------------------- checkpoints and restarts
def test_a_crash_mid_save_leaves_the_earlier_checkpoints_whole_and_resumable(launcher: RankLauncher,
                                                                             workdir: Path) -> None:
    crashed = crashed_run(launcher, workdir, "checkpoint_save")
    assert crashed.codes[1] == -9
    ckpt = crashed.out / "ckpt"
    for name in ("step=2.ckpt", "step=4.ckpt"):
        ids = save_ids(ckpt / name, 2)
        assert len(set(ids)) == 1, (name, ids)
    saved = [load(sidecar_path(ckpt / "step=4.ckpt", rank))["state_dict"] for rank in range(2)]
    resumed = launcher.run({**BASE, "ckpt_path": str(ckpt / "step=4.ckpt"), "record": True}, workdir / "resumed")
    assert resumed.codes == [0, 0], resumed.report()
    for rank in range(2):
        start = load(resumed.out / f"start-rank{rank}.pt")
        assert all(torch.equal(start[key], saved[rank][key]) for key in saved[rank]), f"rank {rank} replica"
        assert load(resumed.out / f"end-rank{rank}.pt").keys() == saved[rank].keys()
    stats = [(resumed.out / f"stats-rank{rank}.json").read_text() for rank in range(2)]
    assert all('"global_step": 8' in text and '"steps": 8' in text for text in stats), stats


def test_a_crash_while_overwriting_last_ckpt_keeps_it_resumable(launcher: RankLauncher, workdir: Path) -> None:
    crashed = crashed_run(launcher, workdir, "checkpoint_save")
    assert crashed.codes[1] == -9
    ids = save_ids(crashed.out / "ckpt" / "last.ckpt", 2)
    assert len(set(ids)) == 1, f"main file and per-rank files come from different saves: {ids}"


class _Crash(BaseException):
    """Stands for the process dying (SIGKILL, node failure) at that point."""


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a second filesystem (/dev/shm)")
@pytest.mark.parametrize("writer", ["sidecar", "main_file"])
def test_checkpoint_files_are_replaced_atomically_even_with_tmpdir_on_another_filesystem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    """A crash half-way through writing the new file (here: torch.save dies after half the bytes) leaves the previous
    file whole, even when TMPDIR is on another filesystem (Lightning's own writer would copy into the target)."""
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same filesystem as the test directory")
        monkeypatch.setattr(tempfile, "tempdir", str(other))
        path = tmp_path / "last.ckpt"
        old = {"state_dict": {"w": torch.arange(100_000.0)}, "save_id": "old"}
        new = {"state_dict": {"w": torch.zeros(100_000)}, "save_id": "new"}
        save = atomic_save if writer == "sidecar" else AtomicCheckpointIO().save_checkpoint
        save(old, path)
        real_save = torch.save

        def crash_halfway(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            target.write(data[: len(data) // 2])
            target.flush()
            raise _Crash()

        monkeypatch.setattr(torch, "save", crash_halfway)
        with pytest.raises(_Crash):
            save(new, path)
        monkeypatch.undo()
        survivor = load(path)
        assert survivor["save_id"] == "old"
        assert torch.equal(survivor["state_dict"]["w"], old["state_dict"]["w"])
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
        assert all(name == "last.ckpt.dopt" for name in leftovers), leftovers
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_resume_on_one_process_starts_from_the_saved_average_with_a_warning(launcher: RankLauncher, workdir: Path,
                                                                            tmp_path: Path) -> None:
    ckpt = crashed_run(launcher, workdir, "checkpoint_save").out / "ckpt" / "step=4.ckpt"
    average = load(ckpt)["state_dict"]
    starts: list[dict[str, torch.Tensor]] = []

    class Start(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            starts.append(state_snapshot(pl_module))

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=GossipLocalStrategy(local_steps=2), max_steps=6,
                        default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Start()])
    try:
        with pytest.warns(UserWarning, match="was written by 2 ranks and is resumed on 1: every rank starts from the "
                                             "averaged model"):
            trainer.fit(RegressionModel(), ckpt_path=str(ckpt))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert all(torch.equal(starts[0][key], average[key]) for key in average)
    assert trainer.global_step == 6


def test_resume_on_three_ranks_starts_every_rank_from_the_saved_average_with_a_warning(
        launcher: RankLauncher, workdir: Path) -> None:
    ckpt = crashed_run(launcher, workdir, "checkpoint_save").out / "ckpt" / "step=4.ckpt"
    average = load(ckpt)["state_dict"]
    result = launcher.run({**BASE, "world_size": 3, "ckpt_path": str(ckpt), "record": True,
                           "trainer": {"max_steps": 6}}, workdir / "three_ranks")
    assert result.codes == [0, 0, 0], result.report()
    assert "was written by 2 ranks and is resumed on 3: every rank starts from the averaged model" in \
        result.stderr(0), result.report()
    for rank in range(3):
        start = load(result.out / f"start-rank{rank}.pt")
        assert all(torch.equal(start[key], average[key]) for key in average), f"rank {rank}"
        assert '"global_step": 6' in (result.out / f"stats-rank{rank}.json").read_text()


def test_a_per_rank_file_from_another_save_is_refused_and_no_rank_hangs(launcher: RankLauncher,
                                                                        workdir: Path) -> None:
    source = crashed_run(launcher, workdir, "checkpoint_save").out / "ckpt"
    mixed = workdir / "mixed"
    mixed.mkdir()
    shutil.copy(source / "step=4.ckpt", mixed / "step=4.ckpt")
    (mixed / "step=4.ckpt.dopt").mkdir()
    shutil.copy(sidecar_path(source / "step=4.ckpt", 0), sidecar_path(mixed / "step=4.ckpt", 0))
    # rank 1's file of the step-2 save, renamed as if it belonged to the step-4 save
    shutil.copy(sidecar_path(source / "step=2.ckpt", 1), sidecar_path(mixed / "step=4.ckpt", 1))
    result = launcher.run({**BASE, "ckpt_path": str(mixed / "step=4.ckpt")}, workdir / "mixed_run")
    assert result.codes == [1, 1] and not result.hung, result.report()
    assert "does not belong to" in result.stderr(1) and "refusing to mix replicas" in result.stderr(1)
    assert result.exit_s[0] - result.exit_s[1] < SURVIVOR_LIMIT_S


# -------------------------------------------------------------------------------------------------- uneven data
def test_uneven_sized_data_fails_before_the_first_step_on_every_rank(launcher: RankLauncher, workdir: Path) -> None:
    result = launcher.run({**BASE, "model": "uneven", "trainer": {"max_epochs": 1, "use_distributed_sampler": False}},
                          workdir / "uneven")
    assert result.codes == [1, 1] and not result.hung, result.report()
    for rank, batches in ((0, 8), (1, 4)):
        stderr = result.stderr(rank)
        assert f"different numbers of training batches per epoch (between 4 and 8; rank {rank} has {batches})" \
            in stderr, result.report()
        assert "DistributedSampler" in stderr, result.report()


_stream: dict[str, RunResult] = {}


def uneven_stream(launcher: RankLauncher, workdir: Path) -> RunResult:
    """Two IterableDatasets without ``__len__``: rank 1's ends after 4 batches, rank 0's after 8."""
    if "run" not in _stream:
        _stream["run"] = launcher.run({**BASE, "model": "uneven_stream", "trainer": {"max_epochs": 1},
                                       "deadline_s": 45.0}, workdir / "uneven_stream")
    return _stream["run"]


def test_uneven_streams_without_a_length_never_hang(launcher: RankLauncher, workdir: Path) -> None:
    result = uneven_stream(launcher, workdir)
    assert not result.hung, result.report()
    assert all(code != 0 for code in result.codes), result.report()


def test_uneven_streams_without_a_length_are_reported_as_uneven_data(launcher: RankLauncher, workdir: Path) -> None:
    result = uneven_stream(launcher, workdir)
    text = result.stderr(0) + result.stderr(1)
    assert re.search(r"different numbers of (training )?(batches|steps)|ran out of data|uneven", text), result.report()


# -------------------------------------------------------------------------------------------- SIGTERM (preemption)
SIGTERM_RUN = {**BASE, "trainer": {"max_steps": 400}, "step_sleep_s": 0.02, "record": True}


def _check_preempted(result: RunResult) -> int:
    """Every rank stopped by itself (no signal death, no hang) at the same step with a whole hpc checkpoint."""
    assert result.sigterm_s is not None
    assert not result.hung and all(code >= 0 for code in result.codes), result.report()
    print(f"\nSIGTERM: ranks exited with {result.codes} {max(result.exit_s) - result.sigterm_s:.1f} s after the signal")
    assert max(result.exit_s) - result.sigterm_s < SURVIVOR_LIMIT_S
    main = result.out / "hpc_ckpt_1.ckpt"
    assert len(set(save_ids(main, 2))) == 1
    step = load(main)["global_step"]
    assert 5 <= step < 400
    assert "SIGTERM received by rank" in result.stderr(0), result.report()
    return step


_sigterm: dict[str, RunResult] = {}


def sigterm_run(launcher: RankLauncher, workdir: Path) -> RunResult:
    """SIGTERM to both ranks at once (as SLURM does) at an awkward moment: rank 1 finished step 5 and pauses, so
    rank 0 is blocked in the collective before round 3 (steps 5 and 6) when the signal arrives."""
    if "run" not in _sigterm:
        _sigterm["run"] = launcher.run({**SIGTERM_RUN, "sigterm": {"after_step": 5, "from_rank": 1, "pause_s": 1.0}},
                                       workdir / "sigterm")
    return _sigterm["run"]


def test_sigterm_to_every_rank_stops_all_at_one_step_with_a_consistent_checkpoint(launcher: RankLauncher,
                                                                                   workdir: Path) -> None:
    _check_preempted(sigterm_run(launcher, workdir))


def test_a_rerun_resumes_exactly_from_the_sigterm_checkpoint(launcher: RankLauncher, workdir: Path) -> None:
    first = sigterm_run(launcher, workdir)
    main = first.out / "hpc_ckpt_1.ckpt"
    step = load(main)["global_step"]
    saved = [load(sidecar_path(main, rank))["state_dict"] for rank in range(2)]
    rerun = launcher.run({**BASE, "ckpt_path": str(main), "record": True, "trainer": {"max_steps": step + 4}},
                         workdir / "sigterm_rerun")
    assert rerun.codes == [0, 0], rerun.report()
    for rank in range(2):
        start = load(rerun.out / f"start-rank{rank}.pt")
        assert all(torch.equal(start[key], saved[rank][key]) for key in saved[rank]), f"rank {rank}"
        assert f'"global_step": {step + 4}' in (rerun.out / f"stats-rank{rank}.json").read_text()


def test_ckpt_path_hpc_finds_the_sigterm_checkpoint(launcher: RankLauncher, workdir: Path) -> None:
    first = sigterm_run(launcher, workdir)
    assert (first.out / "hpc_ckpt_1.ckpt").exists()
    trainer = L.Trainer(default_root_dir=first.out, logger=False, accelerator="cpu", devices=1)
    connector = trainer._checkpoint_connector
    assert connector._hpc_resume_path == str(first.out / "hpc_ckpt_1.ckpt")
    assert connector.hpc_save_path(first.out) == str(first.out / "hpc_ckpt_2.ckpt")


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(launcher: RankLauncher, workdir: Path) -> None:
    result = launcher.run({**SIGTERM_RUN, "sigterm": {"after_step": 5, "ranks": [1]}}, workdir / "sigterm_one")
    _check_preempted(result)
    assert "SIGTERM received by rank(s) 1:" in result.stderr(0)



SLURM_ENV = {"TORCHELASTIC_RUN_ID": None, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train",
             "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1", "SLURM_LOCALID": "0", "SLURM_PROCID": "{rank}",
             "SLURM_NODEID": "{rank}"}


def test_slurm_requeue_signal_saves_a_consistent_checkpoint_without_hanging(launcher: RankLauncher,
                                                                          workdir: Path) -> None:
    """SIGUSR1 (``#SBATCH --signal=USR1@90``) to both ranks while rank 1 pauses after step 5 and rank 0 waits in the
    collective of the next round; ``scontrol`` is missing here, so the requeue itself only logs an error."""
    result = launcher.run({**BASE, "strategy": {"local_steps": 2, "timeout_s": 5}, "trainer": {"max_steps": 40},
                           "env": SLURM_ENV, "deadline_s": 40.0,
                           "sigterm": {"after_step": 5, "from_rank": 1, "pause_s": 1.0, "signal": "SIGUSR1"}},
                          workdir / "slurm_requeue")
    assert "SLURM auto-requeueing enabled" in result.stderr(0), result.report()
    assert not result.hung and result.codes == [0, 0], result.report()
    assert len(set(save_ids(result.out / "hpc_ckpt_1.ckpt", 2))) == 1
