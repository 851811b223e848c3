"""Property-based robustness tests for lightning_dopt.aggregate (issue 9, "Reliability").

Valid input: for any coefficient table (1-64 workers, 0-4 columns, any dtype, NaN/Inf/huge entries) the weights are
finite, non-negative, sum to 1 per column and are permutation-equivariant; degenerate gradient sets (one rank,
identical, anti-aligned, all zero) give the documented results; subspace momentum survives a non-finite step.
Invalid input (complex, wrong shapes, mismatched shapes or devices, bad eps/beta/guard/layer_sizes/momentum) raises
ValueError naming the problem. NaN/Inf inputs are NOT refused here (that would need a host sync per step, and AMP's
gradient scaler relies on overflowing steps passing through to be skipped): they fall back to uniform weights and a
NaN gradient still gives a NaN result, so nothing is hidden.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adacons_oracles import adacons_reference, closed_form
from lightning_dopt.aggregate import (
    GUARDS,
    SubspaceMomentum,
    consensus_weights,
    subspace_coefficients,
    worker_multipliers,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


any_float = st.one_of(
    st.floats(-1e6, 1e6), st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e38, -1e38,
                                           1e300, 1e-300]))


@st.composite
def tables(draw, finite: bool = False) -> torch.Tensor:
    n = draw(st.integers(1, 64))
    t = draw(st.sampled_from([None, 0, 1, 2, 4]))
    shape = (n,) if t is None else (n, t)
    count = n * (1 if t is None else t)
    element = st.floats(-1e6, 1e6) if finite else any_float
    values = draw(st.lists(element, min_size=count, max_size=count))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    return torch.tensor(values, dtype=F64).reshape(shape).to(dtype)


# ------------------------------------------------------------------------------------------------------------------
# weights


@settings(max_examples=100, deadline=None)
@given(a=tables(), guard=st.sampled_from(GUARDS), seed=st.integers(0, 1000))
def test_weights_are_finite_normalized_and_permutation_equivariant(a: torch.Tensor, guard: str, seed: int) -> None:
    weights = consensus_weights(a, guard)
    assert weights.shape == a.shape and weights.dtype == a.dtype and weights.device == a.device
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    tol = 1e-5 if a.dtype == torch.float32 else 1e-12
    columns = weights.reshape(a.shape[0], -1)
    torch.testing.assert_close(columns.sum(0), torch.ones(columns.shape[1], dtype=a.dtype), rtol=0, atol=tol)
    perm = torch.randperm(a.shape[0], generator=gen(seed))
    torch.testing.assert_close(consensus_weights(a[perm], guard), weights[perm], rtol=tol, atol=tol)
    # a column with a non-finite coefficient, or (mean guard) a negative one, is uniform
    a2 = a.reshape(a.shape[0], -1)
    n = a.shape[0]
    for k in range(a2.shape[1]):
        col = a2[:, k]
        if not torch.isfinite(col).all() or (guard == "mean" and (col < 0).any()):
            assert torch.equal(columns[:, k], torch.full((n,), 1.0 / n, dtype=a.dtype))


@FAST
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool, torch.uint8]),
       n=st.integers(1, 16), seed=st.integers(0, 1000))
def test_half_and_integer_tables_are_computed_in_fp32(dtype: torch.dtype, n: int, seed: int) -> None:
    a = (torch.randn(n, generator=gen(seed)) * 10).to(dtype)
    weights = consensus_weights(a)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, consensus_weights(a.float()), rtol=0, atol=0)
    norms = torch.rand(n, generator=gen(seed)).to(dtype) if dtype.is_floating_point else torch.ones(n, dtype=dtype)
    assert subspace_coefficients(a, norms).dtype == torch.float32
    assert worker_multipliers(weights.to(dtype), norms).dtype == torch.float32


def test_meta_tables_need_no_host_sync() -> None:
    """Weights are computed without .item() or any host copy: meta tensors (no data) go through."""
    a = torch.empty(8, 3, device="meta")
    weights = consensus_weights(SubspaceMomentum(0.9)(subspace_coefficients(a, a)))
    assert weights.device.type == "meta" and weights.shape == (8, 3)
    assert worker_multipliers(weights, a).shape == (8, 3)


# ------------------------------------------------------------------------------------------------------------------
# subspace momentum


@FAST
@given(n=st.integers(1, 12), t=st.integers(1, 3), steps=st.integers(2, 6), beta=st.sampled_from([0.5, 0.9, 0.99]),
       bad_steps=st.sets(st.integers(0, 5)), seed=st.integers(0, 10**6),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_momentum_survives_non_finite_steps(n: int, t: int, steps: int, beta: float, bad_steps: set[int], seed: int,
                                            bad: float) -> None:
    """A step with a NaN/Inf coefficient in a column passes that column through (so its weights are uniform) and does
    not touch its state; finite steps before and after behave as if the bad step never happened. Before the fix one
    NaN stayed in the EMA forever and every later step of that column was silently uniform."""
    g = gen(seed)
    momentum, clean = SubspaceMomentum(beta), SubspaceMomentum(beta)
    for step in range(steps):
        a = torch.randn(n, t, generator=g, dtype=F64)
        if step in bad_steps:
            column = step % t
            poisoned = a.clone()
            poisoned[step % n, column] = bad
            out = momentum(poisoned)
            assert torch.equal(out[:, column].isnan(), poisoned[:, column].isnan())
            assert torch.equal(consensus_weights(out)[:, column], torch.full((n,), 1.0 / n, dtype=F64))
            others = [k for k in range(t) if k != column]
            if others:  # the finite columns of the same step are smoothed as usual
                expected = clean(a)
                torch.testing.assert_close(out[:, others], expected[:, others], rtol=0, atol=0)
                # keep `clean`'s state for the bad column as it was: replay its previous state
                if clean.m is not None and momentum.m is not None:
                    clean.m[:, column] = momentum.m[:, column]
        else:
            out, expected = momentum(a), clean(a)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


@FAST
@given(n=st.integers(1, 16), steps=st.integers(1, 4), beta=st.sampled_from([0.0, 0.5, 0.9]),
       seed=st.integers(0, 10**6))
def test_momentum_is_permutation_equivariant(n: int, steps: int, beta: float, seed: int) -> None:
    """Relabelling the workers (a different permutation at every step) relabels the output: the EMA runs on order
    statistics, so it has no notion of worker identity. Values are distinct (ties would be broken by index)."""
    g = gen(seed)
    plain, shuffled = SubspaceMomentum(beta), SubspaceMomentum(beta)
    for _ in range(steps):
        a = torch.randperm(10 * n, generator=g)[:n].to(F64) + torch.rand(1, generator=g, dtype=F64)
        perm = torch.randperm(n, generator=g)
        torch.testing.assert_close(shuffled(a[perm]), plain(a)[perm], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# the reference on degenerate gradient sets


@st.composite
def gradient_rows(draw, max_d: int = 40) -> torch.Tensor:
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 10**6))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e30]))
    g = torch.randn(d, generator=gen(seed), dtype=F64) * scale
    assume(g.norm() > 0)
    return g


@FAST
@given(g=gradient_rows(), n=st.integers(1, 64), guard=st.sampled_from(GUARDS), preserve=st.booleans())
def test_identical_gradients_give_the_unit_direction(g: torch.Tensor, n: int, guard: str, preserve: bool) -> None:
    """One rank (n = 1) or n identical ranks: the result is g / (‖g‖ + eps), or g itself with preserve_scale; in
    fp64 this holds up to 1e30 (fp32 norms would overflow there)."""
    result = adacons_reference(g.expand(n, -1), guard=guard, preserve_scale=preserve)
    expected = g if preserve else g / (g.norm() + 1e-8)
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=0)


@FAST
@given(g=gradient_rows(), pairs=st.integers(1, 16), guard=st.sampled_from(GUARDS), preserve=st.booleans())
def test_anti_aligned_and_zero_gradients_give_zero(g: torch.Tensor, pairs: int, guard: str, preserve: bool) -> None:
    opposite = torch.stack([g, -g] * pairs)
    for gradients in (opposite, torch.zeros_like(opposite)):
        result = adacons_reference(gradients, guard=guard, preserve_scale=preserve)
        assert torch.isfinite(result).all() and result.abs().max().item() <= 1e-12 * max(1.0, g.abs().max().item())
    with pytest.raises(ValueError, match="undefined"):  # one pair: the mean is exactly 0 (more pairs: rounding)
        closed_form(torch.stack([g, -g]))
    with pytest.raises(ValueError, match=r"workers \[0, 1\] have zero gradients"):
        closed_form(torch.zeros(2, g.numel()))


@FAST
@given(n=st.integers(1, 12), d=st.integers(1, 30), seed=st.integers(0, 10**6), guard=st.sampled_from(GUARDS),
       scale=st.sampled_from([1e-2, 1.0, 1e2]))
def test_reference_is_permutation_invariant_and_scale_invariant(n: int, d: int, seed: int, guard: str,
                                                                  scale: float) -> None:
    g = gen(seed)
    gradients = torch.randn(n, d, generator=g, dtype=F64) * torch.exp(torch.randn(n, 1, generator=g, dtype=F64))
    result = adacons_reference(gradients, guard=guard, eps=1e-300)
    perm = torch.randperm(n, generator=g)
    torch.testing.assert_close(adacons_reference(gradients[perm], guard=guard, eps=1e-300), result,
                               rtol=1e-9, atol=1e-12)
    # AdaCons discards the common magnitude: scaling every gradient by the same factor changes nothing
    torch.testing.assert_close(adacons_reference(gradients * scale, guard=guard, eps=1e-300), result,
                               rtol=1e-9, atol=1e-12)
    assert torch.linalg.vector_norm(result).item() <= 1 + 1e-12


@FAST
@given(n=st.integers(1, 8), d=st.integers(1, 20), dtype=st.sampled_from(
    [torch.float16, torch.bfloat16, torch.float32, F64, torch.int32]), seed=st.integers(0, 1000))
def test_reference_dtypes(n: int, d: int, dtype: torch.dtype, seed: int) -> None:
    gradients = (torch.randn(n, d, generator=gen(seed)) * 4).to(dtype)
    result = adacons_reference(gradients)
    assert result.shape == (d,) and result.dtype == (F64 if dtype == F64 else torch.float32)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, adacons_reference(gradients.to(result.dtype)), rtol=0, atol=0)


@FAST
@given(n=st.integers(1, 8), d=st.integers(1, 20), index=st.integers(0, 10**6),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]), guard=st.sampled_from(GUARDS))
def test_a_non_finite_gradient_shows_in_the_result(n: int, d: int, index: int, bad: float, guard: str) -> None:
    """Not refused (no host sync on the hot path, and AMP skips such steps), but never hidden: NaN/Inf in any worker's
    gradient makes the result non-finite, so a gradient scaler (or the next codec) sees it."""
    gradients = torch.randn(n, d, generator=gen(index), dtype=F64)
    gradients.view(-1)[index % (n * d)] = bad
    result = adacons_reference(gradients, guard=guard)
    assert not torch.isfinite(result).all()


# ------------------------------------------------------------------------------------------------------------------
# invalid input


bad_eps = st.sampled_from([0.0, -1e-8, float("nan"), float("inf"), -float("inf"), True, False, "1e-8", None, [1e-8]])


@settings(max_examples=40, deadline=None)
@given(eps=bad_eps)
def test_bad_eps_is_refused_everywhere(eps) -> None:
    ones = torch.ones(3)
    for call in (lambda: subspace_coefficients(ones, ones, eps), lambda: consensus_weights(ones, "shift", eps),
                 lambda: worker_multipliers(ones, ones, eps), lambda: adacons_reference(torch.ones(2, 3), eps=eps)):
        with pytest.raises(ValueError, match=re.escape(f"eps must be > 0 and finite, got {eps!r}")):
            call()


@settings(max_examples=40, deadline=None)
@given(beta=st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1.0), st.sampled_from(
    [float("nan"), True, False, "0.9", None, [0.9]])))
def test_bad_momentum_beta_is_refused(beta) -> None:
    with pytest.raises(ValueError, match="momentum beta must be"):
        SubspaceMomentum(beta)


@settings(max_examples=60, deadline=None)
@given(guard=st.one_of(st.text(max_size=8), st.none(), st.integers(), st.sampled_from(["Shift", "MEAN", " mean"])))
def test_unknown_guards_list_the_valid_choices(guard) -> None:
    assume(guard not in GUARDS)
    for call in (lambda: consensus_weights(torch.ones(3), guard),
                 lambda: adacons_reference(torch.ones(2, 3), None, guard)):
        with pytest.raises(ValueError, match=r"guard must be one of 'shift', 'mean'; got"):
            call()


@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (2, 2, 2), (1, 1, 1, 1)])
def test_bad_table_shapes_are_refused_naming_the_shape(shape) -> None:
    x = torch.ones(shape)
    message = re.escape(f"must have shape [N] or [N, T] with N >= 1 workers, got {shape}")
    for call in (lambda: consensus_weights(x), lambda: SubspaceMomentum(0.5)(x), lambda: subspace_coefficients(x, x),
                 lambda: worker_multipliers(x, x)):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("shape", [(3,), (1,), (2, 0, 3), ()])
def test_bad_gradient_shapes_are_refused(shape) -> None:
    for call in (lambda: adacons_reference(torch.ones(shape)), lambda: closed_form(torch.ones(shape))):
        with pytest.raises(ValueError, match=r"gradients must have shape \[N, D\]"):
            call()
    with pytest.raises(ValueError, match=r"gradients must have shape \[N, D\] with N >= 1 workers, got \(0, 4\)"):
        adacons_reference(torch.ones(0, 4))


def test_mismatched_pairs_complex_and_non_tensors_are_refused() -> None:
    for function, names in ((subspace_coefficients, "dots and norms"), (worker_multipliers, "weights and norms")):
        with pytest.raises(ValueError, match=rf"{names} must have the same shape, got \(3,\) and \(3, 1\)"):
            function(torch.ones(3), torch.ones(3, 1))
        with pytest.raises(ValueError, match=rf"{names} must be on the same device, got cpu and meta"):
            function(torch.ones(3), torch.ones(3, device="meta"))
        with pytest.raises(ValueError, match="must be real, got torch.complex64"):
            function(torch.ones(3, dtype=torch.complex64), torch.ones(3))
        with pytest.raises(ValueError, match="must be a torch.Tensor, got list"):
            function([1.0, 2.0], torch.ones(2))
    for call in (lambda: consensus_weights(torch.ones(3, dtype=torch.complex128)),
                 lambda: adacons_reference(torch.ones(2, 3, dtype=torch.complex64)),
                 lambda: SubspaceMomentum(0.5)(torch.ones(3, dtype=torch.complex64))):
        with pytest.raises(ValueError, match="must be real"):
            call()
    with pytest.raises(ValueError, match="must be a torch.Tensor, got float"):
        consensus_weights(1.0)


@pytest.mark.parametrize("sizes", [[1.7, 1.3], [2.0, 1.0], "21", [True, 2], [1, None], 3, [b"1"]])
def test_layer_sizes_must_be_ints(sizes) -> None:
    """Before the fix, float sizes were truncated (e.g. [1.7, 2.9] for D = 3 silently became [1, 2]) and a string
    was split into digits."""
    with pytest.raises(ValueError, match="layer_sizes must be a sequence of ints"):
        adacons_reference(torch.ones(2, 3), layer_sizes=sizes)


@pytest.mark.parametrize("sizes", [[], [4], [2, 2], [5, -2], [1, 1]])
def test_layer_sizes_must_sum_to_d(sizes) -> None:
    with pytest.raises(ValueError, match="layer_sizes must be non-negative sizes summing to D = 3"):
        adacons_reference(torch.ones(2, 3), layer_sizes=sizes)


@pytest.mark.parametrize("momentum", [0.9, "0.9", 1])
def test_momentum_must_be_a_subspace_momentum(momentum) -> None:
    with pytest.raises(ValueError, match="momentum must be a SubspaceMomentum"):
        adacons_reference(torch.ones(2, 3), momentum=momentum)
