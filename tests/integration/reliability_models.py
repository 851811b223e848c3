"""Launch Lightning ranks the way a cluster does, inject failures, and watch every process's exit.

Each rank is a separate process with torchrun's environment (``TORCHELASTIC_RUN_ID``, ``RANK``, ``GROUP_RANK``,
``LOCAL_RANK=0``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) and trains with
``Trainer(devices=1, num_nodes=world_size, strategy=GossipLocalStrategy(...))``: Lightning picks its
``TorchElasticEnvironment``, exactly as under ``torchrun`` or one SLURM task per node. No agent watches the ranks,
so nothing but the package itself ends the survivors of a crash.

Importing Lightning costs several CPU seconds per process. So that a test pays it once, not once per rank and run,
:class:`RankLauncher` starts one *fork server* (``python reliability_models.py``, in its own session) that imports
Lightning and ``lightning_dopt`` and then forks the rank processes of each run. A forked rank runs the same code a
fresh ``python train.py`` would from ``Trainer(...)`` on, and ends like a script: an exception prints its traceback
and exits 1, ``SystemExit`` keeps its code, and the interpreter's normal shutdown runs (a hang at exit is seen).
The server waits for the ranks with a hard deadline, SIGKILLs whatever is left after it, and reports each rank's
exit code (negative: killed by that signal) and exit time. :meth:`RankLauncher.close` kills the server's whole
process group, so no rank outlives a test.

A run is described by a JSON-able ``spec`` (see :func:`run_rank`); each rank writes its stdout/stderr to
``<out>/rank<r>.out``/``.err`` and, when asked, snapshots of its module to ``<out>/<event>-rank<r>.pt``.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for ``ports`` (also when run as the fork server)
from ports import free_port  # noqa: E402


# ---------------------------------------------------------------------------------------------- rank side
def _stamp(event: str) -> None:
    """Write ``[t=<seconds since the run started>] <event>`` to stderr (clock shared by all processes)."""
    elapsed = time.monotonic() - float(os.environ.get("RELIABILITY_T0", "0"))
    print(f"[t={elapsed:.2f}] {event}", file=sys.stderr, flush=True)


def _die(how: str, rank: int, where: str) -> None:
    _stamp(f"rank {rank} dies ({how}) in {where}")
    sys.stdout.flush()
    sys.stderr.flush()
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure on rank {rank} in {where}")


def _instruments(spec: dict[str, Any], rank: int) -> Any:
    """The callback that snapshots the module, injects failures and asks the server for a signal."""
    import lightning as L
    import torch

    out = spec["out"]
    fail = spec.get("fail") or {}
    failing = fail.get("rank") == rank
    sigterm = spec.get("sigterm") or {}

    def snapshot(module: Any) -> dict[str, Any]:
        return {key: value.detach().clone() for key, value in module.state_dict().items()}

    class Instruments(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if spec.get("record"):
                torch.save(snapshot(pl_module), os.path.join(out, f"start-rank{rank}.pt"))
            if failing and fail["phase"] == "round":
                sync = trainer.strategy.engine.sync
                gossip_round = sync.gossip_round

                def dying_round(index: int, *args: Any, **kwargs: Any) -> Any:
                    if index == fail["at"]:
                        _die(fail["how"], rank, f"synchronization round {index}")
                    return gossip_round(index, *args, **kwargs)

                sync.gossip_round = dying_round

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            step = trainer.global_step
            if failing and fail["phase"] == "after_step" and step == fail["at"]:
                _die(fail["how"], rank, f"on_train_batch_end after step {step}")
            if sigterm and rank == sigterm.get("from_rank", 0) and step == sigterm["after_step"]:
                Path(out, "sigterm-now").touch()
                time.sleep(sigterm.get("pause_s", 0.0))  # the other ranks run ahead into the next collective
            if spec.get("step_sleep_s"):
                time.sleep(spec["step_sleep_s"])

        def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            # runs after the strategy's on_validation_start swapped the average in
            if failing and fail["phase"] == "validation" and not trainer.sanity_checking:
                _die(fail["how"], rank, "validation (average swapped in)")

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            _stamp(f"on_exception {type(exception).__name__}")

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if spec.get("record"):
                torch.save(snapshot(pl_module), os.path.join(out, f"end-rank{rank}.pt"))
                with open(os.path.join(out, f"stats-rank{rank}.json"), "w") as handle:
                    json.dump({"global_step": trainer.global_step, "steps": trainer.strategy.steps,
                               "bytes_sent_by_purpose": trainer.strategy.comm_stats.bytes_sent_by_purpose}, handle)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:  # after the strategy's final average
            if spec.get("record"):
                torch.save(snapshot(pl_module), os.path.join(out, f"fit-end-rank{rank}.pt"))

    return Instruments()


def _patch_failures(spec: dict[str, Any], rank: int, model: Any) -> None:
    fail = spec.get("fail") or {}
    if fail.get("rank") != rank:
        return
    if fail["phase"] == "train_step":
        training_step = model.training_step

        def dying_training_step(batch: Any, batch_idx: int) -> Any:
            if model.global_step == fail["at"]:
                _die(fail["how"], rank, f"training_step at step {model.global_step}")
            return training_step(batch, batch_idx)

        model.training_step = dying_training_step
    elif fail["phase"] == "save":
        import lightning_dopt.strategy as strategy_module

        atomic_save = strategy_module.atomic_save  # the strategy's writer of per-rank files
        calls = [0]

        def dying_save(checkpoint: Any, filepath: Any) -> None:
            calls[0] += 1
            if calls[0] == fail["at"]:
                # the other ranks go on writing their files meanwhile: wait (at most ``wait_s``) until rank 0 has
                # written the main file of this save, so the test sees what a crash at that moment leaves behind
                main = os.path.dirname(str(filepath))[: -len(".dopt")]
                end = time.monotonic() + fail.get("wait_s", 0.0)
                while time.monotonic() < end and _save_id(main) != checkpoint.get("save_id"):
                    time.sleep(0.05)
                _die(fail["how"], rank, f"save_checkpoint (writing {os.path.basename(str(filepath))})")
            atomic_save(checkpoint, filepath)

        strategy_module.atomic_save = dying_save


def _save_id(main: str) -> str | None:
    import torch

    try:
        return torch.load(main, map_location="cpu", weights_only=False)["lightning_dopt"]["save_id"]
    except Exception:  # noqa: BLE001 - missing, partly written or foreign: not this save's main file yet
        return None


def _models() -> dict[str, Any]:
    from torch.utils.data import DataLoader, IterableDataset, Subset

    from lightning_models import RegressionModel, regression_data

    class UnevenModel(RegressionModel):
        """Rank r reads its own shard without a DistributedSampler; the last rank's shard is half as long."""

        def train_dataloader(self) -> DataLoader:
            data = regression_data(self.hparams.samples)
            world, rank = self.trainer.world_size, self.global_rank
            size = len(data) // world // (2 if rank == world - 1 else 1)
            return DataLoader(Subset(data, range(rank * size, (rank + 1) * size)), batch_size=self.hparams.batch_size)

    class Stream(IterableDataset):
        def __init__(self, samples: int) -> None:
            self.data = regression_data(64)
            self.samples = samples

        def __iter__(self) -> Any:
            for index in range(self.samples):
                yield self.data[index % len(self.data)]

    class UnevenStreamModel(RegressionModel):
        """An IterableDataset without ``__len__``: the last rank's stream ends after half as many batches."""

        def train_dataloader(self) -> DataLoader:
            rank, world = self.global_rank, self.trainer.world_size
            samples = 32 // (2 if rank == world - 1 else 1)
            return DataLoader(Stream(samples), batch_size=self.hparams.batch_size)

    return {"regression": RegressionModel, "uneven": UnevenModel, "uneven_stream": UnevenStreamModel}


def run_rank(spec: dict[str, Any]) -> None:
    """Train one rank as described by ``spec``.

    Keys: ``world_size``, ``out``, ``root`` (default_root_dir); optional ``strategy`` (GossipLocalStrategy
    keyword arguments, ``timeout_s`` for ``timeout``), ``trainer`` (Trainer keyword arguments), ``model``
    (``regression``, ``uneven``, ``uneven_stream``) and ``model_options``, ``checkpoints`` (a list of
    ModelCheckpoint keyword arguments), ``ckpt_path``, ``record`` (snapshot the module at train start/end),
    ``fail`` (``{"rank", "phase", "at", "how", "wait_s"}``; phases ``train_step`` (global step ``at``), ``round``
    (round index ``at``), ``validation``, ``after_step``, ``save`` (the ``at``-th per-rank file write, once rank 0
    wrote that save's main file or after ``wait_s`` seconds); ``how`` ``sigkill`` or ``raise``), ``sigterm`` (``{"after_step", "from_rank", "pause_s",
    "signal", "ranks"}``: once rank ``from_rank`` (default 0) finished step ``after_step`` it pauses ``pause_s``
    seconds and the server sends ``signal`` (default SIGTERM) to ``ranks`` (default all)), ``step_sleep_s``,
    ``env`` (extra environment variables; ``{rank}`` is replaced, ``None`` removes one), ``local_world_size``
    (ranks per node, default 1: torchrun's ``LOCAL_RANK``, ``GROUP_RANK`` and ``LOCAL_WORLD_SIZE`` follow from it;
    pass ``trainer={"devices": ..., "num_nodes": ...}`` to match).
    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_dopt import GossipLocalStrategy

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    L.seed_everything(spec.get("seed", 1), verbose=False)
    options = dict(spec.get("strategy") or {})
    if "timeout_s" in options:
        options["timeout"] = timedelta(seconds=options.pop("timeout_s"))
    strategy = GossipLocalStrategy(**options)
    callbacks: list[Any] = [ModelCheckpoint(**kwargs) for kwargs in spec.get("checkpoints", [])]
    callbacks.append(_instruments(spec, rank))
    model = _models()[spec.get("model", "regression")](**(spec.get("model_options") or {}))
    _patch_failures(spec, rank, model)
    trainer_options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, num_nodes=spec["world_size"], strategy=strategy,
        default_root_dir=spec["root"], logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=bool(spec.get("checkpoints")),
        callbacks=callbacks)
    trainer_options.update(spec.get("trainer") or {})
    trainer = L.Trainer(**trainer_options)
    trainer.fit(model, ckpt_path=spec.get("ckpt_path"))
    print(f"rank {rank}: fit returned at step {trainer.global_step}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- fork server
def _start_rank(spec: dict[str, Any], rank: int, port: int, start: float) -> int:
    pid = os.fork()
    if pid:
        return pid
    # child: become a fresh rank process and never return to the server loop
    local = spec.get("local_world_size", 1)  # ranks per node, numbered node by node
    environment = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(spec["world_size"]),
                   "RANK": str(rank), "GROUP_RANK": str(rank // local), "LOCAL_RANK": str(rank % local),
                   "LOCAL_WORLD_SIZE": str(local),
                   "TORCHELASTIC_RUN_ID": f"reliability-{port}", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
                   "RELIABILITY_T0": repr(start)}
    os.environ.update(environment)
    for key, value in (spec.get("env") or {}).items():  # "{rank}" is replaced; None removes the variable
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value.format(rank=rank)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, suffix in ((1, "out"), (2, "err")):
        target = os.open(os.path.join(spec["out"], f"rank{rank}.{suffix}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    atexit.register(_stamp, "interpreter shutdown")
    run_rank(spec)  # an exception propagates and ends this process with exit code 1, like a script
    sys.exit(0)


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    port = free_port()
    start = time.monotonic()
    deadline = start + spec.get("deadline_s", 60.0)
    pids = [_start_rank(spec, rank, port, start) for rank in range(spec["world_size"])]
    codes: dict[int, int] = {}
    exit_s: dict[int, float] = {}
    marker = os.path.join(spec["out"], "sigterm-now")
    sigterm_s = None
    hung: list[int] = []
    while len(codes) < len(pids):
        for rank, pid in enumerate(pids):
            if rank in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[rank] = os.waitstatus_to_exitcode(status)
                exit_s[rank] = time.monotonic() - start
        if sigterm_s is None and os.path.exists(marker):
            for rank, pid in enumerate(pids):
                if rank not in codes and rank in spec["sigterm"].get("ranks", range(len(pids))):
                    os.kill(pid, getattr(signal, spec["sigterm"].get("signal", "SIGTERM")))
            sigterm_s = time.monotonic() - start
        if time.monotonic() > deadline:
            for rank, pid in enumerate(pids):
                if rank not in codes:
                    hung.append(rank)
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    codes[rank] = -signal.SIGKILL
                    exit_s[rank] = time.monotonic() - start
        time.sleep(0.02)
    return {"codes": [codes[r] for r in range(len(pids))], "exit_s": [exit_s[r] for r in range(len(pids))],
            "hung": hung, "sigterm_s": sigterm_s}


def serve() -> None:
    """Read one JSON spec per line on stdin, run it, answer one JSON line on stdout."""
    sys.path.insert(0, HERE)
    import lightning  # noqa: F401  (the point of the server: import once, fork many)
    import torch  # noqa: F401

    import lightning_dopt  # noqa: F401
    import lightning_models  # noqa: F401

    # Leave the imported modules out of every later collection, in the ranks' final one at exit too (what a
    # forking server does to keep pages shared): otherwise that last collection adds seconds to every exit here.
    gc.freeze()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        print(json.dumps(_run(spec)), flush=True)


# -------------------------------------------------------------------------------------------- test side
@dataclass
class RunResult:
    codes: list[int]
    exit_s: list[float]
    hung: list[int]
    sigterm_s: float | None
    out: Path

    def stderr(self, rank: int) -> str:
        return (self.out / f"rank{rank}.err").read_text(errors="replace")

    def report(self) -> str:
        return "\n".join(f"--- rank {rank}: exit {code} at {self.exit_s[rank]:.1f} s"
                         f"{' (hung, killed)' if rank in self.hung else ''}\n{self.stderr(rank)[-3000:]}"
                         for rank, code in enumerate(self.codes))


class RankLauncher:
    """The test side of the fork server (one per test module)."""

    def __init__(self, start_timeout: float = 120.0) -> None:
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=environment, start_new_session=True, text=True)
        self._read(start_timeout)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AssertionError(f"the rank fork server did not answer within {timeout:g} s (or died)")
        return json.loads(line)

    def run(self, spec: dict[str, Any], out: Path) -> RunResult:
        """Run ``spec`` (``deadline_s``: hard limit on the whole run, default 60 s)."""
        out.mkdir(parents=True, exist_ok=True)
        spec = {"out": str(out), "root": str(out), **spec}
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        answer = self._read(spec.get("deadline_s", 60.0) + 30.0)
        return RunResult(answer["codes"], answer["exit_s"], answer["hung"], answer["sigterm_s"], out)

    def close(self) -> None:
        """Kill the server and every rank it forked (they share its process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


if __name__ == "__main__":
    serve()
