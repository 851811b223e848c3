"""Property-based robustness tests for lightning_dopt.scaling (issue 9, "Reliability").

Valid input: for every family, parameter shapes (0-d, empty, 1-D, 2-D), dtypes (fp16, bf16, fp32, fp64), any finite
gradients and hyper-parameters, ``D`` matches its formula (computed independently in fp64), is finite and at least
the floor, and ``apply_`` divides by it in the gradient's dtype. Invalid input raises ValueError/TypeError naming the
problem: a NaN/Inf (or overflowing) statistic is refused at ``refresh`` (once per round, ``D`` left unchanged) instead
of turning ``D`` and then every step into NaN; wrong counts, shapes, dtypes, devices, non-tensors and bad
hyper-parameters are refused where they enter.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_dopt.scaling import (
    SCALINGS,
    AdamScaling,
    OASISScaling,
    finite_difference_hvp,
    hessian_vector_product,
    hutchinson_diagonal,
    make_preconditioner,
    rademacher_like,
)

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64
SHAPES = [(), (0,), (1,), (5,), (3, 4), (2, 0, 3)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def feed(pc, grads) -> None:
    if isinstance(pc, OASISScaling):
        pc.accumulate_hessian_diagonal(grads)
    else:
        pc.accumulate(grads)


def expected_diagonal(name: str, history: list[torch.Tensor], beta: float, floor: float,
                      relative_floor: float = 1e-2) -> torch.Tensor:
    """``D`` from its formula, in fp64, with an explicit loop over the steps, then the relative floor
    ``D ≥ relative_floor · mean(D)`` (``make_preconditioner``'s default)."""
    d = _unfloored_diagonal(name, history, beta, floor)
    return d.clamp(min=float(d.mean()) * relative_floor) if d.numel() else d


def _unfloored_diagonal(name: str, history: list[torch.Tensor], beta: float, floor: float) -> torch.Tensor:
    v = torch.zeros_like(history[0], dtype=F64)
    for x in history:
        x = x.double()
        v = beta * v + (1 - beta) * (x if name == "oasis" else x * x)
    t = len(history)
    if name == "adam":
        return (v.clamp(min=0) / (1 - beta**t)).sqrt() + floor
    if name == "rmsprop":
        return v.clamp(min=0).sqrt() + floor
    return (v.abs() / (1 - beta**t)).clamp(min=floor)


@FAST
@given(name=st.sampled_from(SCALINGS), shapes=st.lists(st.sampled_from(SHAPES), min_size=0, max_size=3),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, F64]),
       beta=st.sampled_from([0.0, 0.5, 0.9, 0.999]), floor=st.sampled_from([1e-8, 1e-4, 0.5]),
       steps=st.integers(1, 4), data=st.data(), seed=st.integers(0, 10**6))
def test_d_matches_its_formula_is_finite_and_above_the_floor(name, shapes, dtype, beta, floor, steps, data, seed):
    """Gradient scales 1e-20 up to where the gradient (fp16: 65504) or its square (fp32: 1.8e19) would overflow."""
    exponent = data.draw(st.integers(-20, 3 if dtype == torch.float16 else 12), label="exponent")
    params = [torch.zeros(shape, dtype=dtype) for shape in shapes]
    pc = make_preconditioner(name, params, beta=beta, eps=floor, alpha_min=floor)
    state_dtype = F64 if dtype == F64 else torch.float32
    g = gen(seed)
    history = [[(torch.randn(p.shape, generator=g, dtype=F64) * 10.0**exponent).to(dtype) for p in params]
               for _ in range(steps)]
    for grads in history:
        feed(pc, grads)
    pc.refresh()
    assert pc.steps == steps
    for k, (p, d) in enumerate(zip(params, pc.diagonal())):
        assert d.shape == p.shape and d.dtype == state_dtype
        assert torch.isfinite(d).all() and (d >= torch.tensor(floor, dtype=state_dtype)).all()
        expected = expected_diagonal(name, [grads[k] for grads in history], beta, floor)
        torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=0)
    # apply_: g / D, written back in the gradient's dtype; D stays frozen
    frozen = [d.clone() for d in pc.diagonal()]
    grads = [torch.randn(p.shape, generator=g).to(dtype) for p in params]
    scaled = [x.clone() for x in grads]
    pc.apply_(scaled)
    for x, y, d in zip(grads, scaled, frozen):
        assert y.dtype == dtype
        torch.testing.assert_close(y, (x.to(state_dtype) / d).to(dtype), rtol=0, atol=0)
    feed(pc, grads)
    assert all(torch.equal(a, b) for a, b in zip(pc.diagonal(), frozen))


@FAST
@given(name=st.sampled_from(SCALINGS), steps=st.integers(1, 4), bad_step=st.integers(0, 3), index=st.integers(0, 11),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]), seed=st.integers(0, 1000))
def test_non_finite_statistics_are_refused_at_refresh(name, steps, bad_step, index, bad, seed):
    """Before: D became NaN (or Inf) and every later scaled gradient NaN (or 0), silently. Now refresh raises and
    leaves the previous D in place."""
    params = [torch.zeros(3), torch.zeros(3, 3)]
    pc = make_preconditioner(name, params, beta=0.9)
    feed(pc, [torch.ones(3), torch.ones(3, 3)])
    pc.refresh()
    before = [d.clone() for d in pc.diagonal()]
    g = gen(seed)
    for step in range(steps):
        grads = [torch.randn(3, generator=g), torch.randn(3, 3, generator=g)]
        if step == bad_step % steps:
            target = grads[0] if index < 3 else grads[1]
            target.view(-1)[index % target.numel()] = bad
        feed(pc, grads)
    with pytest.raises(ValueError, match=rf"{name} preconditioner statistics hold NaN or Inf: 1 of 12 values"):
        pc.refresh()
    assert all(torch.equal(a, b) for a, b in zip(pc.diagonal(), before))


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_a_gradient_whose_square_overflows_is_refused(name):
    """3e38 is a finite fp32 gradient, but its square is Inf: D would be Inf and the coordinate frozen forever."""
    pc = make_preconditioner(name, [torch.zeros(2)], beta=0.0)
    pc.accumulate([torch.tensor([3e38, 1.0])])
    with pytest.raises(ValueError, match="or one whose square overflows"):
        pc.refresh()


def test_empty_parameter_lists_and_tensors() -> None:
    for name in SCALINGS:
        for params in ([], [torch.zeros(0)], [torch.zeros(0, 4), torch.zeros(())]):
            pc = make_preconditioner(name, params)
            feed(pc, [torch.ones(p.shape) for p in params])
            pc.refresh()
            grads = [torch.full(p.shape, 2.0) for p in params]
            pc.apply_(grads)
            assert all(torch.isfinite(x).all() for x in grads)


# ------------------------------------------------------------------------------------------------------------------
# invalid input


@pytest.mark.parametrize("name", SCALINGS)
def test_bad_parameters_are_refused(name):
    with pytest.raises(TypeError, match=r"params must be a sequence of tensors .*a single Tensor of shape \(3, 4\)"):
        make_preconditioner(name, torch.zeros(3, 4))  # would silently become three row "parameters"
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor, got float"):
        make_preconditioner(name, [torch.zeros(2), 1.0])
    for dtype in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(ValueError, match=rf"must be floating point, got {dtype}"):
            make_preconditioner(name, [torch.zeros(2, dtype=dtype)])


BAD_GRADIENTS = [
    (lambda: [torch.zeros(3)], ValueError, r"got 1 tensors for 2 parameters"),
    (lambda: [torch.zeros(3), torch.zeros(2, 2), torch.zeros(1)], ValueError, r"got 3 tensors for 2 parameters"),
    (lambda: [torch.zeros(1), torch.zeros(2, 2)], ValueError, r"tensor 0 has shape \(1,\), its parameter \(3,\)"),
    (lambda: [torch.zeros(3), torch.zeros(4)], ValueError, r"tensor 1 has shape \(4,\), its parameter \(2, 2\)"),
    (lambda: [torch.zeros(3), 0.5], TypeError, r"entry 1 must be a torch.Tensor or None, got float"),
    (lambda: [torch.zeros(3, dtype=torch.int64), None], TypeError, r"tensor 0 must be floating point, got torch.int64"),
    (lambda: [None, torch.zeros(2, 2, dtype=torch.complex64)], TypeError, r"tensor 1 must be floating point"),
    (lambda: [torch.zeros(3, dtype=torch.bool), None], TypeError, r"tensor 0 must be floating point, got torch.bool"),
    (lambda: [torch.zeros(3, device="meta"), None], ValueError, r"tensor 0 is on meta, its parameter's state on cpu"),
]


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize(("make", "error", "message"), BAD_GRADIENTS)
def test_bad_gradients_are_refused_before_touching_state(name, make, error, message):
    pc = make_preconditioner(name, [torch.zeros(3), torch.zeros(2, 2)])
    stats = [v.clone() for v in pc.statistics()]
    entry = pc.accumulate_hessian_diagonal if name == "oasis" else pc.accumulate
    with pytest.raises(error, match=message):
        entry(make())
    with pytest.raises(error, match=message):
        pc.apply_(make())  # int gradients used to be divided and truncated back silently
    assert pc.steps == 0 and all(torch.equal(a, b) for a, b in zip(pc.statistics(), stats))


@settings(max_examples=60, deadline=None)
@given(name=st.one_of(st.text(max_size=10), st.none(), st.integers(),
                     st.sampled_from(["Adam", "adamw", "sgd", " adam"])))
def test_unknown_scaling_names_list_the_valid_choices(name):
    assume(name not in SCALINGS)
    with pytest.raises(ValueError, match=r"unknown scaling .*; valid choices: adam, rmsprop, oasis"):
        make_preconditioner(name, [])


bad_numbers = st.sampled_from([float("nan"), float("inf"), -float("inf"), True, False, "0.5", None, [0.5]])


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SCALINGS),
       beta=st.one_of(bad_numbers, st.floats(max_value=-1e-9), st.floats(min_value=1.0, allow_infinity=False)))
def test_bad_beta_is_refused(name, beta):
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\), got"):
        make_preconditioner(name, [], beta=beta)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SCALINGS), which=st.sampled_from(["eps", "alpha_min"]),
       value=st.one_of(bad_numbers, st.floats(max_value=0.0)))
def test_bad_floors_are_refused(name, which, value):
    assume(value is not False)  # False == 0 is refused too, but hypothesis dedups it with 0.0 anyway
    with pytest.raises(ValueError, match=rf"{which} must be a finite number > 0, got"):
        make_preconditioner(name, [], **{which: value})


def test_load_state_dict_refuses_non_finite_and_non_tensor_state():
    pc = AdamScaling([torch.zeros(3)])
    pc.accumulate([torch.ones(3)])
    pc.refresh()
    state = {k: (list(v) if isinstance(v, list) else v) for k, v in pc.state_dict().items()}
    for key in ("statistics", "diagonal"):
        broken = dict(state, **{key: [torch.tensor([1.0, float("nan"), 1.0])]})
        with pytest.raises(ValueError, match=rf"preconditioner state '{key}' hold NaN or Inf: 1 of 3 values"):
            AdamScaling([torch.zeros(3)]).load_state_dict(broken)
        with pytest.raises(TypeError, match="entry 0 must be a torch.Tensor or None, got list"):
            AdamScaling([torch.zeros(3)]).load_state_dict(dict(state, **{key: [[1.0, 1.0, 1.0]]}))


# ------------------------------------------------------------------------------------------------------------------
# Hessian helpers


@FAST
@given(shape=st.sampled_from([(3,), (2, 3), (4, 1)]), wrong=st.sampled_from([(1,), (3, 1), (1, 3), ()]),
       seed=st.integers(0, 100))
def test_hessian_helpers_refuse_broadcastable_shapes(shape, wrong, seed):
    """Each of these used to broadcast silently (e.g. a [1] vector against a [3] parameter)."""
    assume(wrong != shape)
    p = torch.randn(shape, generator=gen(seed), dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=r"vectors have shape .* at index 0; its parameter has shape"):
        hessian_vector_product(lambda: (p**2).sum(), [p], [torch.ones(wrong, dtype=F64)])
    with pytest.raises(ValueError, match=r"vectors have shape .* at index 0; its parameter has shape"):
        finite_difference_hvp(lambda: [2 * p.detach()], [p], [torch.ones(wrong, dtype=F64)])
    with pytest.raises(ValueError, match=r"grad_fn returned shape .* at index 0; its parameter has shape"):
        finite_difference_hvp(lambda: [torch.ones(wrong, dtype=F64)], [p], [torch.ones(shape, dtype=F64)])
    with pytest.raises(ValueError, match=r"hvp returned shape .* at index 0; its probe has shape"):
        hutchinson_diagonal(lambda z: [torch.ones(wrong)], [p.detach()])
    before = p.detach().clone()
    with pytest.raises(ValueError):
        finite_difference_hvp(lambda: [torch.ones(wrong, dtype=F64)], [p], [torch.ones(shape, dtype=F64)])
    assert torch.equal(p.detach(), before)  # parameters restored even when grad_fn's output is refused


def test_hessian_helpers_refuse_non_tensors():
    p = torch.zeros(3)
    with pytest.raises(TypeError, match="hvp returned a float at index 0; expected a torch.Tensor"):
        hutchinson_diagonal(lambda z: [1.0], [p])
    with pytest.raises(TypeError, match="rademacher_like expects a torch.Tensor, got int"):
        rademacher_like(3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        rademacher_like(p, 7)


@FAST
@given(shape=st.sampled_from(SHAPES), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, F64]),
       seed=st.integers(0, 1000))
def test_hutchinson_on_a_diagonal_hessian_is_exact(shape, dtype, seed):
    """z ⊙ (H z) = diag(H) exactly when H is diagonal (z_i² = 1), for any shape including 0-d and empty."""
    p = torch.zeros(shape, dtype=dtype)
    h = torch.arange(math.prod(shape), dtype=dtype).reshape(shape) - 1
    (estimate,) = hutchinson_diagonal(lambda z: [h * z[0]], [p], gen(seed))
    assert estimate.shape == p.shape and estimate.dtype == dtype
    assert torch.equal(estimate, h)
