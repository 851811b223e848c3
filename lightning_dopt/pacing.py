"""Partial work for slow ranks: a rank that is persistently slower than the others trains on only a share of its
batches, so that nobody waits for it at rounds.

This is FedProx's "partial work" (Li et al., 2020, where a device does as many local steps as its budget allows)
applied to data-parallel rounds. Asynchronous gossip (AD-PSGD, SwarmSGD) has the same effect implicitly: there a slow
worker contributes fewer gradient steps per unit of time while the others go on.

Pace. Each rank measures its busy time per trained step: the wall time from the end of one round's communication to
the next round (waits for partners fall outside that window; a window that holds evaluation or a checkpoint is not
measured), summed over recent windows and divided by the steps it trained in them. Both sums are exponential moving
averages over windows, so work that lands in the window after its step (a callback after the optimizer step, the
next batch's loading) is still counted::

    B_i ← (1 − α) · B_i + α · busy,    T_i ← (1 − α) · T_i + α · trained,    c_i = B_i / T_i

Every rank's ``c_j`` travels with the round's control flags (one float64 per rank, no other message). With the
reference ``p``, the lower median of the ``c_j`` (a pace that at least half of the ranks keep), rank ``i`` trains on
the share::

    f_i = 1                          if c_i ≤ (1 + slack) · p
    f_i = max(min_work, p / c_i)     otherwise

Why this keeps pace: a trained step costs ``w_i`` and a skipped one ``s_i`` (the batch is still loaded and the batch
hooks still run), so ``c_i = w_i + s_i (1 − f_i)/f_i`` and a rank's time per step is ``f_i · c_i``, which the rule sets
to ``p``: the fixed point is ``f_i = (p − s_i)/(w_i − s_i)``. ``c_i`` depends on ``f_i`` only through ``s_i``, so the
iteration converges without oscillating when ``s_i < p`` (its derivative is ``s_i / p``); a rank ``k`` times slower
than the reference settles at ``f_i ≈ 1/k``. When the slowness is in what a skipped step still does (``s_i ≥ p``,
e.g. a slow input pipeline), no share keeps pace: the rank sits at ``min_work`` and still holds the others back.

Noise is kept out: the slack leaves ranks within 10 % of the reference alone, and a rank starts skipping only once
its last ``PATIENCE`` windows each (not just their average) were over the slack: a one-off pause, such as a garbage
collection, does not count.

Skipping. The rank trains on a batch when its credit reaches one (``credit += f_i`` per optimizer step), which spreads
the trained steps evenly. A skipped step still counts as an optimizer step, so every rank keeps the same round
schedule, epoch boundaries, ``global_step`` and learning-rate schedule. The price is data, not bytes: a rank at
``f_i`` trains on that share of its shard's batches in expectation (which ones depends on timing, so runs with
partial work are not reproducible bit for bit). No step is skipped during warm-up (``warmup_steps``), when every
step averages gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

SLACK = 0.1
SMOOTHING = 0.2
PATIENCE = 3


def check_min_work(min_work: object) -> float:
    """``min_work`` as a float in (0, 1], or a ``ValueError`` naming the valid range."""
    if isinstance(min_work, bool) or not isinstance(min_work, (int, float)) or not 0.0 < min_work <= 1.0:
        raise ValueError(f"min_work must be a number in (0, 1] (the least share of its batches a slow rank trains on; "
                         f"1.0 trains on every batch); got {min_work!r}")
    return float(min_work)


class WorkPacer:
    """One rank's pace measurement, work fraction and skip schedule (pure Python; see the module docstring)."""

    def __init__(self, min_work: float, slack: float = SLACK, smoothing: float = SMOOTHING,
                 patience: int = PATIENCE) -> None:
        self.min_work = check_min_work(min_work)
        self.slack = slack
        self.smoothing = smoothing
        self.patience = patience
        self.fraction = 1.0
        self._last_window = 0.0  # seconds per trained step in the last window with a trained step
        self._windows_over = 0  # consecutive such windows over the slack
        self._busy = 0.0  # B_i: EMA of busy seconds per window
        self._trained = 0.0  # T_i: EMA of trained steps per window
        self._credit = 0.0

    @property
    def seconds_per_trained_step(self) -> float:
        """``c_i = B_i / T_i``; 0 until a window with a trained step was measured."""
        return self._busy / self._trained if self._trained > 0.0 else 0.0

    def observe(self, busy_seconds: float, trained_steps: int) -> None:
        """Fold one measured window (``busy_seconds`` in which ``trained_steps`` steps trained) into ``c_i``."""
        if busy_seconds <= 0.0:
            return
        if trained_steps > 0:
            self._last_window = busy_seconds / trained_steps
        if self._trained == 0.0:
            if trained_steps > 0:
                self._busy, self._trained = busy_seconds, float(trained_steps)
            return
        self._busy += self.smoothing * (busy_seconds - self._busy)
        self._trained += self.smoothing * (trained_steps - self._trained)

    def adapt(self, seconds_per_trained_step_of_ranks: Sequence[float]) -> None:
        """Set the work fraction from every rank's ``c_j`` (zeros: ranks not measured yet are left out)."""
        known = sorted(value for value in seconds_per_trained_step_of_ranks if value > 0.0)
        own = self.seconds_per_trained_step
        if not known or own <= 0.0:
            return
        reference = known[(len(known) - 1) // 2]
        limit = (1.0 + self.slack) * reference
        if own <= limit:
            self.fraction, self._windows_over = 1.0, 0
            return
        self._windows_over = self._windows_over + 1 if self._last_window > limit else 0
        if self.fraction < 1.0 or self._windows_over >= self.patience:
            self.fraction = max(self.min_work, reference / own)

    def next_step_trains(self) -> bool:
        """Whether the next optimizer step trains (``True``) or is skipped: every step adds ``f_i`` to a credit and
        trains when the credit reaches one, so trained steps are spread evenly."""
        self._credit += self.fraction
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False
