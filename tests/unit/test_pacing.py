"""WorkPacer, the partial-work controller of slow ranks (pure Python: simulated step costs, no clocks)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from lightning_dopt.pacing import WorkPacer, check_min_work


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.5", None])
def test_bad_min_work_is_refused_with_the_valid_range(value: Any) -> None:
    with pytest.raises(ValueError, match=r"min_work must be a number in \(0, 1\]"):
        check_min_work(value)


@pytest.mark.parametrize("value", [1, 1.0, 0.25, 1e-3])
def test_good_min_work_is_accepted_as_a_float(value: float) -> None:
    assert check_min_work(value) == float(value)


def run_windows(pacers: list[WorkPacer], trained_cost: list[float], skipped_cost: float, windows: int,
                steps_per_window: int = 1, jitter: float = 0.0, seed: int = 0) -> list[list[bool]]:
    """Simulate ``windows`` rounds: each rank decides its steps, pays ``trained_cost[i]`` per trained step and
    ``skipped_cost`` per skipped one (times a random factor within ``±jitter``), observes, and all ranks adapt to the
    exchanged paces. Returns every rank's train/skip decisions."""
    rng = random.Random(seed)
    decisions: list[list[bool]] = [[] for _ in pacers]
    for _ in range(windows):
        for rank, pacer in enumerate(pacers):
            trained = 0
            busy = 0.0
            for _ in range(steps_per_window):
                trains = pacer.next_step_trains()
                decisions[rank].append(trains)
                trained += trains
                busy += (trained_cost[rank] if trains else skipped_cost) * (1 + rng.uniform(-jitter, jitter))
            pacer.observe(busy, trained)
        paces = [pacer.seconds_per_trained_step for pacer in pacers]
        for pacer in pacers:
            pacer.adapt(paces)
    return decisions


def test_ranks_at_the_same_pace_within_the_slack_never_skip() -> None:
    pacers = [WorkPacer(0.25) for _ in range(4)]
    decisions = run_windows(pacers, [0.10, 0.10, 0.104, 0.106], skipped_cost=0.002, windows=200, jitter=0.02)
    assert all(all(rank) for rank in decisions)
    assert [pacer.fraction for pacer in pacers] == [1.0] * 4


@pytest.mark.parametrize("slowdown", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("steps_per_window", [1, 4])
def test_a_slow_rank_settles_at_the_reference_pace(slowdown: float, steps_per_window: int) -> None:
    fast, skip = 0.10, 0.004
    pacers = [WorkPacer(0.1) for _ in range(4)]
    decisions = run_windows(pacers, [fast, fast, fast, slowdown * fast], skipped_cost=skip, windows=120,
                            steps_per_window=steps_per_window)
    slow = pacers[3]
    # fixed point of f = p / c with c = w + s(1 - f)/f: f = (p - s) / (w - s), so that f·w + (1 - f)·s = p
    expected = (fast - skip) / (slowdown * fast - skip)
    assert slow.fraction == pytest.approx(expected, rel=0.02)
    late = decisions[3][-100 * steps_per_window:]
    time_per_step = (sum(late) * slowdown * fast + (len(late) - sum(late)) * skip) / len(late)
    assert time_per_step == pytest.approx(fast, rel=0.03)
    assert all(all(rank) for rank in decisions[:3])  # the fast ranks trained on every batch
    # no oscillation: once settled, the fraction stays put
    assert max(abs(f - expected) for f in trace_fractions(slowdown, fast, skip, steps_per_window)[60:]) < 0.02


def trace_fractions(slowdown: float, fast: float, skip: float, steps_per_window: int) -> list[float]:
    pacers = [WorkPacer(0.1) for _ in range(4)]
    fractions = []
    for _ in range(120):
        run_windows(pacers, [fast, fast, fast, slowdown * fast], skipped_cost=skip, windows=1,
                    steps_per_window=steps_per_window)
        fractions.append(pacers[3].fraction)
    return fractions


def test_the_fraction_never_goes_below_min_work() -> None:
    pacers = [WorkPacer(0.5), WorkPacer(0.5)]
    decisions = run_windows(pacers, [0.1, 0.5], skipped_cost=0.0, windows=100)
    assert pacers[1].fraction == 0.5
    assert sum(decisions[1][-50:]) == 25


def test_a_rank_that_recovers_trains_on_every_batch_again() -> None:
    pacers = [WorkPacer(0.1) for _ in range(3)]
    run_windows(pacers, [0.1, 0.1, 0.3], skipped_cost=0.0, windows=60)
    assert pacers[2].fraction == pytest.approx(1 / 3, rel=0.02)
    decisions = run_windows(pacers, [0.1, 0.1, 0.1], skipped_cost=0.0, windows=60)
    assert pacers[2].fraction == 1.0
    assert all(decisions[2][-20:])


@pytest.mark.parametrize("paces, skipping", [
    ([0.1, 0.1, 0.2, 0.2], [False, False, True, True]),  # lower median: half the ranks keep 0.1
    ([0.1, 0.2, 0.2, 0.2], [False, False, False, False]),  # a fast minority does not make the majority skip
    ([0.1, 0.3], [False, True]),
])
def test_the_reference_is_the_lower_median_pace(paces: list[float], skipping: list[bool]) -> None:
    pacers = [WorkPacer(0.1) for _ in paces]
    run_windows(pacers, paces, skipped_cost=0.0, windows=30)
    assert [pacer.fraction < 1.0 for pacer in pacers] == skipping


def test_nothing_changes_before_every_input_is_measured() -> None:
    pacer = WorkPacer(0.1, patience=1)
    pacer.adapt([0.1, 0.5])  # own pace unknown
    assert pacer.fraction == 1.0
    pacer.observe(0.0, 0)  # an empty window is ignored
    pacer.observe(0.5, 1)
    pacer.adapt([0.0, 0.0])  # nobody's pace known
    assert pacer.fraction == 1.0
    pacer.adapt([0.1, 0.0, 0.5])  # zeros are left out: the reference is 0.1
    assert pacer.fraction == pytest.approx(0.2)


def test_skipping_starts_only_after_patience_windows_in_a_row_over_the_slack() -> None:
    pacer = WorkPacer(0.1, patience=3)
    fractions = []
    for _ in range(6):
        pacer.observe(0.3, 1)
        pacer.adapt([0.1, 0.3])
        fractions.append(pacer.fraction)
    # the third window over the slack in a row starts the skipping
    assert fractions == [1.0, 1.0, pytest.approx(1 / 3), pytest.approx(1 / 3), pytest.approx(1 / 3),
                         pytest.approx(1 / 3)]


def test_a_one_off_pause_does_not_make_a_rank_skip() -> None:
    pacers = [WorkPacer(0.1) for _ in range(4)]
    run_windows(pacers, [0.1] * 4, skipped_cost=0.0, windows=20)
    run_windows(pacers, [0.1, 0.1, 0.1, 0.5], skipped_cost=0.0, windows=1)  # one window 5x slower (a GC pause)
    decisions = run_windows(pacers, [0.1] * 4, skipped_cost=0.0, windows=40)
    assert all(all(rank) for rank in decisions)


@pytest.mark.parametrize("fraction", [1.0, 0.75, 0.5, 1 / 3, 0.3, 0.1])
def test_trained_steps_are_spread_evenly(fraction: float) -> None:
    pacer = WorkPacer(0.05)
    pacer.fraction = fraction
    decisions = [pacer.next_step_trains() for _ in range(300)]
    assert abs(sum(decisions) - fraction * 300) <= 1
    longest_skip_run = max((len(run) for run in "".join("x" if d else "." for d in decisions).split("x")), default=0)
    assert longest_skip_run <= math.ceil(1 / fraction) - 1
