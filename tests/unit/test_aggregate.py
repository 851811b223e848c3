"""Tests for lightning_dopt.aggregate: AdaCons coefficients, subspace momentum (with the permutation fix), guarded
consensus weights, the single-process reference against the closed form and an independent loop implementation,
layer-wise segments, degenerate inputs and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adacons_oracles import adacons_reference, closed_form
from lightning_dopt.aggregate import (
    GUARDS,
    SubspaceMomentum,
    consensus_weights,
    subspace_coefficients,
    worker_multipliers,
)

TINY_EPS = 1e-300  # makes eps vanish next to O(1) norms in fp64, for comparisons with eps-free formulas


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def aligned_gradients(n: int, d: int, seed: int, noise: float = 0.5) -> torch.Tensor:
    """``n`` fp64 gradients = a common direction + noise, scaled per worker; every ⟨ḡ, g_i⟩ > 0 is asserted."""
    g = gen(seed)
    common = torch.randn(d, generator=g, dtype=torch.float64)
    common /= common.norm()
    noise_part = noise * torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    scales = torch.exp(torch.randn(n, 1, generator=g, dtype=torch.float64))
    gradients = scales * (common + noise_part)
    assert (gradients @ gradients.mean(0) > 0).all()
    return gradients


def loop_adacons(gradients: torch.Tensor, guard: str, eps: float, layer_sizes: list[int] | None = None,
                 preserve_scale: bool = False) -> np.ndarray:
    """An independent implementation with explicit Python loops over workers and segments (numpy fp64)."""
    g = gradients.double().numpy()
    n, d = g.shape
    sizes = [d] if layer_sizes is None else layer_sizes
    out = np.zeros(d)
    start = 0
    for size in sizes:
        seg = g[:, start:start + size]
        mean = sum(seg[i] for i in range(n)) / n
        norms = [math.sqrt(sum(x * x for x in seg[i])) for i in range(n)]
        a = [float(np.dot(mean, seg[i])) / (norms[i] + eps) for i in range(n)]
        if guard == "shift":
            low = min(a)
            if low < 0:
                a = [x - low for x in a]
            total = sum(a)
            alpha = [x / total for x in a] if total > eps else [1.0 / n] * n
        else:
            total = sum(a)
            alpha = [x / total for x in a] if (min(a) >= 0 and total > eps) else [1.0 / n] * n
        part = sum(alpha[i] / (norms[i] + eps) * seg[i] for i in range(n))
        if preserve_scale and np.linalg.norm(part) > 0:
            part = part * np.linalg.norm(mean) / np.linalg.norm(part)
        out[start:start + size] = part
        start += size
    return out


# ----------------------------------------------------------------------------------------------------------------
# reference vs closed form, hand example, loop implementation


@pytest.mark.parametrize("seed", range(12))
def test_reference_equals_closed_form_without_momentum(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(2, 9)), int(rng.integers(1, 501))
    gradients = aligned_gradients(n, d, seed)
    for guard in GUARDS:
        result = adacons_reference(gradients, guard=guard, eps=TINY_EPS)
        assert result.dtype == torch.float64
        torch.testing.assert_close(result, closed_form(gradients), rtol=0, atol=1e-10)
    # with the default eps the difference is O(eps / ‖g_i‖)
    torch.testing.assert_close(adacons_reference(gradients), closed_form(gradients), rtol=0, atol=1e-6)


def test_reference_on_a_hand_computed_example():
    gradients = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    mean = torch.tensor([1.0, 0.5], dtype=torch.float64)
    a = torch.tensor([1.0, 1.5 / math.sqrt(2)], dtype=torch.float64)  # ⟨ḡ, ĝ_i⟩
    alpha = a / a.sum()
    expected = alpha[0] * torch.tensor([1.0, 0.0], dtype=torch.float64) + alpha[1] * torch.tensor(
        [1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    torch.testing.assert_close(adacons_reference(gradients, eps=TINY_EPS), expected, rtol=0, atol=1e-15)
    scaled = adacons_reference(gradients, preserve_scale=True, eps=TINY_EPS)
    torch.testing.assert_close(scaled, expected * mean.norm() / expected.norm(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_loop_implementation(guard, seed):
    """Mixed-sign coefficients (pure noise gradients) exercise the guards; default eps."""
    n, d = 2 + seed % 5, 3 + 17 * seed
    gradients = torch.randn(n, d, generator=gen(100 + seed), dtype=torch.float64)
    gradients[0] *= -3.0  # make worker 0 anti-aligned with the mean more often
    for preserve_scale in (False, True):
        result = adacons_reference(gradients, guard=guard, preserve_scale=preserve_scale)
        np.testing.assert_allclose(result.numpy(), loop_adacons(gradients, guard, 1e-8, None, preserve_scale),
                                   rtol=1e-12, atol=1e-14)


def test_pipeline_functions_compose_to_the_reference():
    """What the strategy does per rank (coefficients, weights, own multiplier, sum) equals the reference."""
    gradients = torch.randn(5, 40, generator=gen(7), dtype=torch.float64)
    mean = gradients.sum(0) / 5
    dots = torch.stack([mean @ gradients[i] for i in range(5)])
    norms = torch.stack([gradients[i].norm() for i in range(5)])
    weights = consensus_weights(subspace_coefficients(dots, norms), "shift")
    total = sum(worker_multipliers(weights, norms)[i] * gradients[i] for i in range(5))
    torch.testing.assert_close(total, adacons_reference(gradients), rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# scale


@pytest.mark.parametrize("n", [1, 2, 7])
def test_identical_gradients_give_unit_direction_and_preserve_scale_restores_mean_norm(n):
    g = 31.5 * torch.randn(123, generator=gen(n), dtype=torch.float64) / math.sqrt(123)
    gradients = g.expand(n, -1).clone()
    result = adacons_reference(gradients, eps=TINY_EPS)
    torch.testing.assert_close(result, g / g.norm(), rtol=0, atol=1e-14)
    assert abs(result.norm().item() - 1.0) < 1e-14
    scaled = adacons_reference(gradients, preserve_scale=True)
    assert abs(scaled.norm().item() - g.norm().item()) < 1e-12
    torch.testing.assert_close(scaled, g, rtol=0, atol=1e-12)


def test_output_norm_at_most_one_and_preserve_scale_matches_mean_norm():
    for seed in range(5):
        gradients = 100.0 * torch.randn(6, 50, generator=gen(seed), dtype=torch.float64)
        assert adacons_reference(gradients).norm().item() <= 1.0 + 1e-12
        scaled = adacons_reference(gradients, preserve_scale=True)
        assert abs(scaled.norm().item() - gradients.mean(0).norm().item()) < 1e-10


def test_bf16_inputs_are_computed_in_fp32():
    gradients = torch.randn(4, 64, generator=gen(3)).to(torch.bfloat16)
    result = adacons_reference(gradients)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, adacons_reference(gradients.float()), rtol=0, atol=0)
    assert subspace_coefficients(torch.ones(3, dtype=torch.bfloat16), torch.ones(3)).dtype == torch.float32
    assert consensus_weights(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# subspace momentum


def brute_force_momentum(steps: list[torch.Tensor], beta: float) -> list[torch.Tensor]:
    """EMA on sorted values, mapped back with explicit loops: out[perm[k]] = m[k]."""
    outputs, m = [], None
    for a in steps:
        values = sorted(a.tolist())
        perm = sorted(range(len(a)), key=lambda i: a[i].item())
        m = values if m is None else [beta * m[k] + (1 - beta) * values[k] for k in range(len(a))]
        out = [0.0] * len(a)
        for k in range(len(a)):
            out[perm[k]] = m[k]
        outputs.append(torch.tensor(out, dtype=torch.float64))
    return outputs


def is_involution(perm: torch.Tensor) -> bool:
    return bool((perm[perm] == torch.arange(len(perm))).all())


def test_momentum_matches_brute_force_on_non_involution_permutations():
    steps = [torch.tensor(v, dtype=torch.float64) for v in (
        [3.0, 1.0, 2.0],      # sort permutation [1, 2, 0]: a 3-cycle
        [0.5, 4.0, -1.0],     # [2, 0, 1]: the other 3-cycle
        [2.0, 3.0, 1.0],      # [2, 0, 1]
        [10.0, 0.0, 5.0],     # [1, 2, 0]
    )]
    perms = [torch.sort(a).indices for a in steps]
    assert not any(is_involution(p) for p in perms)
    beta = 0.9
    momentum = SubspaceMomentum(beta)
    outputs = [momentum(a) for a in steps]
    for got, want in zip(outputs, brute_force_momentum(steps, beta)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    # the first call smooths nothing: the output is the input itself (the buggy m[perm] already permutes it)
    torch.testing.assert_close(outputs[0], steps[0], rtol=0, atol=0)

    # the reference code's mapping m[perm] gives different results for these permutations
    m = None
    for a, got in zip(steps, outputs):
        values, perm = torch.sort(a)
        m = values if m is None else beta * m + (1 - beta) * values
        assert not torch.allclose(m[perm], got)


@pytest.mark.parametrize("seed", range(4))
def test_momentum_matches_brute_force_on_random_steps(seed):
    g = gen(seed)
    steps = [torch.randn(8, generator=g, dtype=torch.float64) for _ in range(6)]
    assert sum(not is_involution(torch.sort(a).indices) for a in steps) >= 4
    momentum = SubspaceMomentum(0.7)
    for a, want in zip(steps, brute_force_momentum(steps, 0.7)):
        torch.testing.assert_close(momentum(a), want, rtol=0, atol=1e-14)


def test_momentum_beta_zero_returns_input_and_keeps_no_state():
    a = torch.tensor([3.0, -1.0, 2.0])
    momentum = SubspaceMomentum(0.0)
    assert momentum(a) is a
    assert momentum.state_dict() == {"m": None}


def test_momentum_is_independent_per_column():
    g = gen(11)
    steps = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    joint = SubspaceMomentum(0.8)
    separate = [SubspaceMomentum(0.8) for _ in range(4)]
    for a in steps:
        out = joint(a)
        expected = torch.stack([separate[t](a[:, t]) for t in range(4)], dim=1)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert joint.state_dict()["m"].shape == (6, 4)


def test_momentum_state_dict_round_trip_and_shape_change():
    g = gen(5)
    steps = [torch.randn(5, 2, generator=g) for _ in range(4)]
    original = SubspaceMomentum(0.9)
    for a in steps[:2]:
        original(a)
    restored = SubspaceMomentum(0.9)
    restored.load_state_dict(original.state_dict())
    for a in steps[2:]:
        torch.testing.assert_close(restored(a), original(a), rtol=0, atol=0)
    with pytest.raises(ValueError, match="world size or the number of tensors"):
        restored(torch.randn(6, 2, generator=g))
    restored.load_state_dict({"m": None})
    restored(torch.randn(6, 2, generator=g))  # a fresh start accepts the new shape
    with pytest.raises(ValueError, match="single key 'm'"):
        restored.load_state_dict({"m": None, "beta": 0.9})
    with pytest.raises(ValueError, match="tensor or None"):
        restored.load_state_dict({"m": [1.0, 2.0]})


# ----------------------------------------------------------------------------------------------------------------
# consensus weights and guards


def test_weights_are_normalized_coefficients_when_positive():
    a = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    for guard in GUARDS:
        torch.testing.assert_close(consensus_weights(a, guard), a / 8, rtol=0, atol=0)


@pytest.mark.parametrize("coefficients, shift, mean", [
    ([-1.0, 2.0, 3.0], [0.0, 3 / 7, 4 / 7], [1 / 3] * 3),         # most negative worker gets 0 under shift
    ([-1.0, -1.0, 2.0], [0.0, 0.0, 1.0], [1 / 3] * 3),
    ([-2.0, -2.0, -2.0], [1 / 3] * 3, [1 / 3] * 3),               # all equal: zero after the shift
    ([-3.0, -1.0, -2.0], [0.0, 2 / 3, 1 / 3], [1 / 3] * 3),        # all negative
    ([1.0, -1.0], [1.0, 0.0], [0.5, 0.5]),                         # sum exactly 0
    ([0.0, 0.0], [0.5, 0.5], [0.5, 0.5]),                          # all zero
    ([1e-9, 0.0], [0.5, 0.5], [0.5, 0.5]),                         # sum <= eps
    ([float("nan"), 1.0], [0.5, 0.5], [0.5, 0.5]),                 # non-finite
    ([float("inf"), 1.0], [0.5, 0.5], [0.5, 0.5]),
    ([1e308, 1e308], [0.5, 0.5], [0.5, 0.5]),                      # sum overflows
    ([4.0], [1.0], [1.0]),                                         # one worker
])
def test_guards(coefficients, shift, mean):
    a = torch.tensor(coefficients, dtype=torch.float64)
    for guard, expected in (("shift", shift), ("mean", mean)):
        weights = consensus_weights(a, guard)
        torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)
        assert torch.isfinite(weights).all() and (weights >= 0).all()
        assert abs(weights.sum().item() - 1.0) < 1e-15


def test_weights_are_independent_per_column():
    a = torch.randn(7, 9, generator=gen(2), dtype=torch.float64)
    a[:, 3] = 0.0
    a[:, 4] = -1.0
    a[0, 5] = float("nan")
    for guard in GUARDS:
        weights = consensus_weights(a, guard)
        expected = torch.stack([consensus_weights(a[:, t], guard) for t in range(9)], dim=1)
        torch.testing.assert_close(weights, expected, rtol=0, atol=0, equal_nan=False)
        torch.testing.assert_close(weights.sum(0), torch.ones(9, dtype=torch.float64), rtol=0, atol=1e-15)


def degenerate_cases() -> dict[str, torch.Tensor]:
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    y = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # orthogonal to x
    return {
        "orthogonal": torch.stack([x, y]),
        "opposite": torch.stack([x, -x]),
        "all_zero": torch.zeros(3, 4, dtype=torch.float64),
        "one_zero": torch.stack([x, torch.zeros(4, dtype=torch.float64), 0.5 * x + y]),
        "negative": torch.stack([x, x, -1.5 * x + 0.1 * y]),
    }


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("case", list(degenerate_cases()))
def test_degenerate_gradients_give_finite_normalized_weights(case, guard):
    gradients = degenerate_cases()[case]
    mean = gradients.mean(0)
    norms = gradients.norm(dim=1)
    coefficients = subspace_coefficients(gradients @ mean, norms)
    weights = consensus_weights(coefficients, guard)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert abs(weights.sum().item() - 1.0) < 1e-15
    result = adacons_reference(gradients, guard=guard)
    assert torch.isfinite(result).all()
    np.testing.assert_allclose(result.numpy(), loop_adacons(gradients, guard, 1e-8), rtol=1e-12, atol=1e-15)
    for preserve in (False, True):
        assert torch.isfinite(adacons_reference(gradients, guard=guard, preserve_scale=preserve)).all()
    n = gradients.shape[0]
    if case in ("opposite", "all_zero"):  # coefficients all zero: uniform, and the result is zero
        torch.testing.assert_close(weights, torch.full((n,), 1 / n, dtype=torch.float64), rtol=0, atol=0)
        assert result.abs().max().item() == 0.0
    if case == "negative":
        assert coefficients[2] < 0 < coefficients[0]
        if guard == "shift":  # the anti-aligned worker gets weight 0, the two others share the rest
            assert weights[2].item() == 0.0
            torch.testing.assert_close(weights[:2], torch.tensor([0.5, 0.5], dtype=torch.float64))
            torch.testing.assert_close(result, gradients[0] / (gradients[0].norm() + 1e-8), rtol=1e-15, atol=0)
        else:
            torch.testing.assert_close(weights, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=0)
    if case == "one_zero":  # the zero gradient contributes nothing
        assert coefficients[1].item() == 0.0


def test_overflowing_norms_keep_weights_finite():
    """fp32 gradients near 1e22: ‖g_0‖² and ⟨ḡ, g_0⟩ overflow to inf (torch's vector_norm does not rescale), so a_0 is
    NaN; the column falls back to uniform weights, worker 0's multiplier is 0, and the output stays finite."""
    gradients = torch.tensor([[-3.9351e21, -1.4842e22], [3.5012e15, -2.1227e15]], dtype=torch.float32)
    norms = torch.linalg.vector_norm(gradients, dim=1)
    coefficients = subspace_coefficients(gradients @ (gradients.sum(0) / 2), norms)
    assert torch.isinf(norms[0]) and torch.isnan(coefficients[0])
    for guard in GUARDS:
        weights = consensus_weights(coefficients, guard)
        torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]), rtol=0, atol=0)
        assert worker_multipliers(weights, norms)[0].item() == 0.0
        result = adacons_reference(gradients, guard=guard)
        torch.testing.assert_close(result, 0.5 * gradients[1] / (norms[1] + 1e-8), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# layer-wise


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("preserve_scale", [False, True])
def test_layerwise_reference_equals_global_per_segment(guard, preserve_scale):
    sizes = [5, 1, 30, 0, 12]
    gradients = torch.randn(4, sum(sizes), generator=gen(21), dtype=torch.float64)
    gradients[:, 6:36] += 2.0  # one well-aligned segment among noisy ones
    result = adacons_reference(gradients, guard=guard, layer_sizes=sizes, preserve_scale=preserve_scale)
    expected = torch.cat([adacons_reference(seg, guard=guard, preserve_scale=preserve_scale)
                          for seg in gradients.split(sizes, dim=1)])
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(result.numpy(), loop_adacons(gradients, guard, 1e-8, sizes, preserve_scale),
                               rtol=1e-12, atol=1e-14)
    # and it differs from global weights
    assert not torch.allclose(result, adacons_reference(gradients, guard=guard, preserve_scale=preserve_scale))


def test_layerwise_momentum_equals_one_global_momentum_per_segment():
    sizes = [3, 8, 4]
    joint, separate = SubspaceMomentum(0.5), [SubspaceMomentum(0.5) for _ in sizes]
    g = gen(31)
    for _ in range(4):
        gradients = torch.randn(5, sum(sizes), generator=g, dtype=torch.float64) + 0.3
        result = adacons_reference(gradients, momentum=joint, layer_sizes=sizes)
        expected = torch.cat([adacons_reference(seg, momentum=m)
                              for seg, m in zip(gradients.split(sizes, dim=1), separate)])
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-15)
    assert joint.state_dict()["m"].shape == (5, 3)
    assert separate[0].state_dict()["m"].shape == (5, 1)


def test_reference_with_momentum_differs_from_without_after_first_step():
    momentum = SubspaceMomentum(0.9)
    g = gen(41)
    first = torch.randn(4, 20, generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(adacons_reference(first, momentum=momentum), adacons_reference(first),
                               rtol=0, atol=0)
    second = torch.randn(4, 20, generator=g, dtype=torch.float64) + 0.5
    assert not torch.allclose(adacons_reference(second, momentum=momentum), adacons_reference(second))


# ----------------------------------------------------------------------------------------------------------------
# validation


def test_validation_errors():
    with pytest.raises(ValueError, match="'shift', 'mean'.*'median'"):
        consensus_weights(torch.ones(3), guard="median")
    with pytest.raises(ValueError, match="'shift', 'mean'"):
        adacons_reference(torch.ones(2, 3), guard="sum")
    for beta in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
            SubspaceMomentum(beta)
    with pytest.raises(ValueError, match="beta must be a number"):
        SubspaceMomentum("high")
    with pytest.raises(ValueError, match="dots and norms must have the same shape"):
        subspace_coefficients(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="weights and norms must have the same shape"):
        worker_multipliers(torch.ones(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="eps must be > 0"):
        subspace_coefficients(torch.ones(3), torch.ones(3), eps=0.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        adacons_reference(torch.ones(2, 3), eps=-1e-8)
    with pytest.raises(ValueError, match=r"shape \[N\] or \[N, T\]"):
        consensus_weights(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match=r"shape \[N\] or \[N, T\]"):
        consensus_weights(torch.ones(0))
    with pytest.raises(ValueError, match=r"shape \[N\] or \[N, T\]"):
        SubspaceMomentum(0.5)(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match=r"gradients must have shape \[N, D\]"):
        adacons_reference(torch.ones(5))
    with pytest.raises(ValueError, match=r"gradients must have shape \[N, D\]"):
        closed_form(torch.ones(5))
    with pytest.raises(ValueError, match="layer_sizes must be non-negative sizes summing to D = 6"):
        adacons_reference(torch.ones(2, 6), layer_sizes=[2, 3])
    with pytest.raises(ValueError, match="layer_sizes must be non-negative sizes summing to D = 6"):
        adacons_reference(torch.ones(2, 6), layer_sizes=[7, -1])


# ----------------------------------------------------------------------------------------------------------------
# properties


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 16), d=st.integers(1, 64), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]), exponent=st.floats(-1.0, 1.0),
       spread=st.floats(0.0, 1.0), guard=st.sampled_from(GUARDS), layerwise=st.booleans(), beta=st.sampled_from(
           [0.0, 0.9]))
def test_random_inputs_give_finite_outputs_and_normalized_weights(n, d, seed, dtype, exponent, spread, guard,
                                                                   layerwise, beta):
    """Scales 10^±12 (fp32) or 10^±140 (fp64), per-worker magnitudes spread over ±4 more orders: as far as squared
    norms and dot products stay representable (beyond: test_overflowing_norms_keep_weights_finite)."""
    max_exp = 12 if dtype == torch.float32 else 140
    g = gen(seed)
    worker_exp = exponent * max_exp + spread * 8 * (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5)
    gradients = (torch.randn(n, d, generator=g, dtype=torch.float64) * 10.0 ** worker_exp).to(dtype)
    if seed % 3 == 0:
        gradients[seed % n] = 0.0
    sizes = None
    if layerwise:
        cut = seed % (d + 1)
        sizes = [cut, d - cut]
    momentum = SubspaceMomentum(beta) if beta else None
    for preserve_scale in (False, True):
        result = adacons_reference(gradients, momentum=momentum, guard=guard, layer_sizes=sizes,
                                   preserve_scale=preserve_scale)
        assert result.shape == (d,) and result.dtype == dtype
        assert torch.isfinite(result).all()
    segments = gradients.split(sizes or [d], dim=1)
    mean = gradients.sum(0) / n
    dots = torch.stack([seg @ m for seg, m in zip(segments, mean.split(sizes or [d]))], dim=1)
    norms = torch.stack([torch.linalg.vector_norm(seg, dim=1) for seg in segments], dim=1)
    coefficients = subspace_coefficients(dots, norms)
    if momentum is not None:
        coefficients = SubspaceMomentum(beta)(coefficients)
    weights = consensus_weights(coefficients, guard)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(weights.sum(0), torch.ones(weights.shape[1], dtype=dtype), rtol=0, atol=tol)
    multipliers = worker_multipliers(weights, norms)
    assert torch.isfinite(multipliers).all()
    # ‖Σ_i α_i g_i / (‖g_i‖ + eps)‖ ≤ Σ_i α_i ‖g_i‖ / (‖g_i‖ + eps) ≤ 1 per segment
    for seg in adacons_reference(gradients, guard=guard, layer_sizes=sizes).split(sizes or [d]):
        assert torch.linalg.vector_norm(seg).item() <= 1.0 + 10 * tol
