"""Lightning's launchers, with a model check before any process starts and an end to orphaned ranks.

With the popen launcher the process that calls ``fit`` is rank 0 and starts ranks ``1 … n-1`` as child
processes. Lightning kills those children when a child fails, but not when rank 0 itself raises: a child still
waiting at the rendezvous (rank 0 failed before or while creating the process group, for instance on a taken
``MASTER_PORT``) would then wait for the whole process-group timeout. :class:`CheckedSubprocessLauncher` gives
the children :attr:`~CheckedSubprocessLauncher.child_exit_grace_s` seconds to end on their own (a child in
training learns of rank 0's failure from the heartbeats and raises its own error naming rank 0) and kills the
rest. The spawn launcher needs no such care: ``torch.multiprocessing`` terminates all ranks when one fails.
"""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any, Callable

from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def check_no_ddp_wrapper(model: Any) -> None:
    """Refuse a model with a ``DistributedDataParallel`` inside: the strategy communicates itself."""
    if isinstance(model, nn.Module):
        for name, submodule in model.named_modules():
            if isinstance(submodule, DistributedDataParallel):
                where = f"submodule '{name}'" if name else "the model"
                raise ValueError(f"{where} is wrapped in DistributedDataParallel; GossipLocalStrategy manages "
                                 "communication itself: pass the plain module (valid: an unwrapped LightningModule)")


BeforeLaunch = Callable[[Any, Any], None]
"""``before_launch(trainer, model)``: a check that raises before any rank process starts."""


class CheckedSubprocessLauncher(_SubprocessScriptLauncher):
    """Lightning's popen launcher that validates the model (and runs ``before_launch``) before any process starts
    and, when rank 0 fails, ends the ranks it started instead of leaving them waiting."""

    child_exit_grace_s: float = 15.0

    def __init__(self, *args: Any, before_launch: BeforeLaunch | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_launch = before_launch

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        check_no_ddp_wrapper(args[0] if args else None)
        if self.before_launch is not None:
            self.before_launch(trainer, args[0] if args else None)
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except BaseException:
            self._end_children()
            raise

    def _end_children(self) -> None:
        deadline = time.monotonic() + self.child_exit_grace_s
        for process in self.procs:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        running = [process for process in self.procs if process.poll() is None]
        if running:
            rank_zero_warn(f"lightning_dopt: rank 0 failed and {len(running)} rank(s) it started were still running "
                           f"{self.child_exit_grace_s:g} s later; killing them (pids "
                           f"{', '.join(str(p.pid) for p in running)})")
            for process in running:
                process.send_signal(signal.SIGKILL)
                process.wait()


class CheckedMultiProcessingLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher that validates the model (and runs ``before_launch``) before any process
    starts."""

    def __init__(self, *args: Any, before_launch: BeforeLaunch | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_launch = before_launch

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        check_no_ddp_wrapper(args[0] if args else None)
        if self.before_launch is not None:
            self.before_launch(trainer, args[0] if args else None)
        return super().launch(function, *args, trainer=trainer, **kwargs)
