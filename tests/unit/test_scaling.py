"""Tests for lightning_dopt.scaling: each family against hand arithmetic, the frozen-D rule, floors, Hutchinson and
HVP helpers, Rademacher probes, state round trip, validation, None and bf16 gradients."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dopt.scaling import (
    SCALINGS,
    AdamScaling,
    OASISScaling,
    Preconditioner,
    RMSPropScaling,
    capture_rng_state,
    finite_difference_hvp,
    hessian_vector_product,
    hutchinson_diagonal,
    make_preconditioner,
    rademacher_like,
    replayed_closure_hvp,
    restore_rng_state,
)

F64 = torch.float64
# Three steps of gradients for two parameters (shapes [3] and [2, 2]), fp64.
GRADS = [
    [[0.5, -2.0, 0.0], [[1.0, 3.0], [-0.25, 0.1]]],
    [[-1.5, 0.5, 0.0], [[2.0, -1.0], [0.75, 0.0]]],
    [[0.25, 4.0, 0.0], [[-0.5, 0.5], [1.25, -0.3]]],
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def params64() -> list[torch.Tensor]:
    return [torch.zeros(3, dtype=F64), torch.zeros(2, 2, dtype=F64)]


def step_grads(step: int) -> list[torch.Tensor]:
    return [torch.tensor(g, dtype=F64) for g in GRADS[step]]


def flat(step: int, k: int) -> list[float]:
    """Flattened values of gradient ``k`` at ``step`` as plain Python floats (for the hand arithmetic)."""
    values = GRADS[step][k]
    return [x for row in values for x in row] if isinstance(values[0], list) else list(values)


def hand_ema(beta: float, k: int, square: bool) -> list[float]:
    """v after the three steps, element by element, in plain Python floats."""
    v = [0.0] * len(flat(0, k))
    for step in range(3):
        v = [beta * vi + (1 - beta) * (x * x if square else x) for vi, x in zip(v, flat(step, k))]
    return v


def as_list(x: torch.Tensor) -> list[float]:
    return x.flatten().tolist()


# --- families against hand arithmetic ---------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.9, 0.5, 0.0])
def test_adam_matches_hand_arithmetic_with_bias_correction(beta):
    eps = 1e-3
    pc = AdamScaling(params64(), beta=beta, eps=eps, relative_floor=0.0)
    for step in range(3):
        pc.accumulate(step_grads(step))
    pc.refresh()
    assert pc.steps == 3
    for k in range(2):
        v = hand_ema(beta, k, square=True)
        assert as_list(pc.statistics()[k]) == pytest.approx(v, rel=1e-13, abs=1e-300)
        correction = 1 - beta ** 3
        expected = [math.sqrt(vi / correction) + eps for vi in v]
        assert as_list(pc.diagonal()[k]) == pytest.approx(expected, rel=1e-13)
        assert pc.diagonal()[k].dtype == F64


def test_adam_bias_correction_makes_a_constant_gradient_give_its_magnitude():
    # v_t = (1 - β^t) g², so the corrected D is |g| + eps at every t; without the correction it would be smaller.
    pc = AdamScaling([torch.zeros(2, dtype=F64)], beta=0.999, eps=1e-8)
    g = torch.tensor([3.0, -0.5], dtype=F64)
    for _ in range(5):
        pc.accumulate([g.clone()])
    pc.refresh()
    assert as_list(pc.diagonal()[0]) == pytest.approx([3.0 + 1e-8, 0.5 + 1e-8], rel=1e-12)


@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_rmsprop_matches_hand_arithmetic_without_bias_correction(beta):
    eps = 1e-3
    pc = RMSPropScaling(params64(), beta=beta, eps=eps, relative_floor=0.0)
    for step in range(3):
        pc.accumulate(step_grads(step))
    pc.refresh()
    for k in range(2):
        v = hand_ema(beta, k, square=True)
        expected = [math.sqrt(vi) + eps for vi in v]
        assert as_list(pc.diagonal()[k]) == pytest.approx(expected, rel=1e-13)
    # and it differs from the bias-corrected value where v > 0
    corrected = math.sqrt(hand_ema(beta, 1, True)[0] / (1 - beta ** 3)) + eps
    assert pc.diagonal()[1][0, 0].item() < corrected * (1 - 1e-3)


@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_oasis_matches_hand_arithmetic(beta):
    alpha_min = 0.05
    pc = OASISScaling(params64(), beta=beta, alpha_min=alpha_min, relative_floor=0.0)
    for step in range(3):
        pc.accumulate_hessian_diagonal(step_grads(step))  # the GRADS values used as (signed) estimates
    pc.refresh()
    for k in range(2):
        v = hand_ema(beta, k, square=False)
        assert as_list(pc.statistics()[k]) == pytest.approx(v, rel=1e-13, abs=1e-15)
        expected = [max(abs(vi) / (1 - beta ** 3), alpha_min) for vi in v]
        assert as_list(pc.diagonal()[k]) == pytest.approx(expected, rel=1e-13)
    # some statistics were negative and some below the floor: both rules were exercised
    all_v = hand_ema(beta, 0, False) + hand_ema(beta, 1, False)
    assert min(all_v) < 0
    assert any(abs(vi) / (1 - beta ** 3) < alpha_min for vi in all_v)


def test_oasis_refuses_gradients():
    pc = OASISScaling(params64())
    with pytest.raises(TypeError, match="accumulate_hessian_diagonal"):
        pc.accumulate(step_grads(0))
    assert pc.steps == 0


# --- frozen D, identity before the first refresh, apply_ ---------------------------------------------------------

@pytest.mark.parametrize("name", SCALINGS)
def test_identity_until_the_first_refresh_after_an_accumulate(name):
    pc = make_preconditioner(name, params64())
    pc.refresh()  # nothing accumulated yet: still the identity
    assert all(torch.equal(d, torch.ones_like(d)) for d in pc.diagonal())
    feed(pc, step_grads(0))
    grads = step_grads(1)
    before = [g.clone() for g in grads]
    pc.apply_(grads)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


def feed(pc: Preconditioner, values: list[torch.Tensor]) -> None:
    if isinstance(pc, OASISScaling):
        pc.accumulate_hessian_diagonal(values)
    else:
        pc.accumulate(values)


@pytest.mark.parametrize("name", SCALINGS)
def test_d_is_frozen_between_refreshes_and_apply_divides_by_it(name):
    pc = make_preconditioner(name, params64(), beta=0.5, eps=1e-3, alpha_min=1e-3)
    feed(pc, step_grads(0))
    pc.refresh()
    frozen = [d.clone() for d in pc.diagonal()]
    stats_before = [v.clone() for v in pc.statistics()]
    for step in (1, 2):
        feed(pc, step_grads(step))
    assert not all(torch.equal(v, b) for v, b in zip(pc.statistics(), stats_before))  # statistics moved
    assert all(torch.equal(d, f) for d, f in zip(pc.diagonal(), frozen))             # D did not
    grads = step_grads(2)
    expected = [g / d for g, d in zip(grads, frozen)]
    pc.apply_(grads)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    pc.refresh()
    assert not all(torch.equal(d, f) for d, f in zip(pc.diagonal(), frozen))


def test_statistics_are_live_so_averaging_them_in_place_gives_every_rank_the_same_d():
    # Two simulated ranks with different gradients; the strategy averages statistics() in place, then refreshes.
    ranks = [AdamScaling(params64(), beta=0.9) for _ in range(2)]
    for r, pc in enumerate(ranks):
        for step in range(3):
            pc.accumulate([g * (r + 1) for g in step_grads(step)])
    for k in range(2):
        mean = (ranks[0].statistics()[k] + ranks[1].statistics()[k]) / 2
        for pc in ranks:
            pc.statistics()[k].copy_(mean)
    for pc in ranks:
        pc.refresh()
    for d0, d1 in zip(ranks[0].diagonal(), ranks[1].diagonal()):
        assert torch.equal(d0, d1)
    # the mean of v over ranks with gradients g and 2g is 2.5 · v(g)
    v = hand_ema(0.9, 1, square=True)
    expected = [math.sqrt(2.5 * vi / (1 - 0.9 ** 3)) + 1e-8 for vi in v]
    assert as_list(ranks[0].diagonal()[1]) == pytest.approx(expected, rel=1e-12)


# --- floors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCALINGS)
def test_floor_holds_with_zero_and_negative_statistics(name):
    eps, alpha_min = 1e-6, 1e-2
    pc = make_preconditioner(name, [torch.zeros(5)], beta=0.9, eps=eps, alpha_min=alpha_min, relative_floor=0.0)
    feed(pc, [torch.zeros(5)])
    pc.statistics()[0].copy_(torch.tensor([0.0, -1e-3, -5.0, 1e-12, 4.0]))  # e.g. after a lossy averaging
    pc.refresh()
    d = pc.diagonal()[0]
    assert d.dtype == torch.float32
    assert torch.isfinite(d).all()
    floor = alpha_min if name == "oasis" else eps
    assert (d >= torch.tensor(floor, dtype=torch.float32)).all()
    if name == "oasis":  # |v| / (1 - β): the large negative value counts as large curvature
        assert d[2].item() == pytest.approx(5.0 / 0.1, rel=1e-6)
        assert d[0].item() == pytest.approx(alpha_min, rel=1e-6)
    else:               # max(v, 0) then sqrt: negative and zero statistics sit exactly on the floor
        assert d[0].item() == d[1].item() == d[2].item() == pytest.approx(eps, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(SCALINGS),
       values=st.lists(st.floats(-2.0 ** 100, 2.0 ** 100, allow_nan=False, width=32), min_size=1, max_size=8),
       beta=st.sampled_from([0.0, 0.5, 0.999]))
def test_floor_property(name, values, beta):
    eps, alpha_min = 1e-8, 1e-4
    pc = make_preconditioner(name, [torch.zeros(len(values))], beta=beta, eps=eps, alpha_min=alpha_min)
    feed(pc, [torch.zeros(len(values))])
    pc.statistics()[0].copy_(torch.tensor(values))
    pc.refresh()
    d = pc.diagonal()[0]
    floor = torch.tensor(alpha_min if name == "oasis" else eps, dtype=torch.float32)
    assert not torch.isnan(d).any()
    assert (d >= floor).all()


# --- Hutchinson / HVP ---------------------------------------------------------------------------------------------

def quadratic_matrix(n: int = 20, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    off = torch.rand(n, n, generator=g, dtype=F64) - 0.5
    a = (off + off.T) / 2
    a.diagonal().copy_(torch.linspace(2.0, 10.0, n, dtype=F64) * torch.where(torch.arange(n) % 5 == 0, -1.0, 1.0))
    return a  # symmetric, non-diagonal, indefinite (every fifth diagonal entry negative)


def test_hessian_vector_product_is_exact_on_a_quadratic():
    a = quadratic_matrix()
    x = torch.randn(20, generator=gen(1), dtype=F64, requires_grad=True)
    v = torch.randn(20, generator=gen(2), dtype=F64)
    (hv,) = hessian_vector_product(lambda: 0.5 * x @ a @ x, [x], [v])
    torch.testing.assert_close(hv, a @ v, rtol=1e-12, atol=1e-12)


def test_hessian_vector_product_gives_zeros_for_unused_and_linear_parameters():
    x = torch.randn(3, dtype=F64, requires_grad=True)
    y = torch.randn(2, dtype=F64, requires_grad=True)
    unused = torch.randn(4, dtype=F64, requires_grad=True)
    hv = hessian_vector_product(lambda: (x ** 3).sum() + y.sum(), [x, y, unused],
                                [torch.ones(3, dtype=F64), torch.ones(2, dtype=F64), torch.ones(4, dtype=F64)])
    torch.testing.assert_close(hv[0], 6 * x.detach())
    assert torch.equal(hv[1], torch.zeros(2, dtype=F64)) and torch.equal(hv[2], torch.zeros(4, dtype=F64))
    (linear,) = hessian_vector_product(lambda: y.sum(), [y], [torch.ones(2, dtype=F64)])
    assert torch.equal(linear, torch.zeros(2, dtype=F64))


def test_hutchinson_mean_and_oasis_ema_converge_to_the_hessian_diagonal():
    a = quadratic_matrix()
    x = torch.randn(20, generator=gen(3), dtype=F64, requires_grad=True)

    def hvp(z):
        return hessian_vector_product(lambda: 0.5 * x @ a @ x, [x], z)

    samples = 2000
    g = gen(4)
    total = torch.zeros(20, dtype=F64)
    for _ in range(samples):
        (estimate,) = hutchinson_diagonal(hvp, [x], g)
        total += estimate
    diag = a.diagonal()
    assert (torch.linalg.norm(total / samples - diag) / torch.linalg.norm(diag)).item() < 0.05
    # a single sample is far off (the off-diagonal terms), so the averaging is what the test checks
    (one,) = hutchinson_diagonal(hvp, [x], gen(5))
    assert (torch.linalg.norm(one - diag) / torch.linalg.norm(diag)).item() > 0.05

    # OASIS with β close to 1: the bias-corrected EMA is a near-uniform mean; D = |diag| (all |A_ii| ≥ 2 > alpha_min)
    # (the product A z directly: hessian_vector_product was checked above, and this halves the test's time)
    pc = OASISScaling([x], beta=0.999, generator=gen(6))
    for _ in range(samples):
        pc.accumulate_hutchinson(lambda z: [a @ z[0]])
    pc.refresh()
    (d,) = pc.diagonal()
    assert (torch.linalg.norm(d - diag.abs()) / torch.linalg.norm(diag)).item() < 0.05
    assert (pc.statistics()[0] * diag < 0).sum().item() == 0  # the signs of the curvature survive in v


def test_finite_difference_hvp_matches_exact_hvp_and_restores_parameters_bitwise():
    x = torch.randn(7, generator=gen(7), dtype=F64, requires_grad=True)
    w = torch.randn(3, 2, generator=gen(8), dtype=F64, requires_grad=True)
    params = [x, w]

    def loss():  # smooth, non-quadratic, couples the two parameters
        return torch.log1p(torch.exp(x[:3] @ w)).sum() + torch.sin(x).pow(2).sum() + 0.1 * (x ** 4).sum()

    def grad_fn():  # like an optimizer closure: zeroes p.grad IN PLACE, backward, hands back the LIVE .grad tensors
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        loss().backward()
        return [p.grad for p in params]

    vectors = [torch.randn(7, generator=gen(9), dtype=F64), torch.randn(3, 2, generator=gen(10), dtype=F64)]
    before = [p.detach().clone() for p in params]
    approx = finite_difference_hvp(grad_fn, params, vectors, step=1e-3)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    exact = hessian_vector_product(loss, params, vectors)
    for fd, ex in zip(approx, exact):
        assert (torch.linalg.norm(fd - ex) / torch.linalg.norm(ex)).item() < 1e-4
    # a perturbation that is rounded away would give zeros: make sure these are real differences
    assert all(torch.linalg.norm(fd).item() > 0 for fd in approx)


def test_finite_difference_hvp_restores_parameters_when_grad_fn_raises():
    x = torch.randn(4, generator=gen(11), requires_grad=True)
    before = x.detach().clone()
    calls = []

    def grad_fn():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return [torch.ones(4)]

    with pytest.raises(RuntimeError, match="boom"):
        finite_difference_hvp(grad_fn, [x], [torch.ones(4)])
    assert torch.equal(x.detach(), before)


def test_finite_difference_hvp_refuses_half_precision_parameters():
    x = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="fp32 or fp64"):
        finite_difference_hvp(lambda: [torch.zeros(4)], [x], [torch.ones(4, dtype=torch.bfloat16)])


# --- Rademacher ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rademacher_like(dtype):
    like = torch.empty(100_000, dtype=dtype)
    z = rademacher_like(like, gen(12))
    assert z.dtype == dtype and z.shape == like.shape and z.device == like.device
    assert ((z == 1) | (z == -1)).all()
    assert abs(z.double().mean().item()) < 0.02  # standard deviation of the mean: 1/sqrt(1e5) ≈ 0.003
    assert torch.equal(z, rademacher_like(like, gen(12)))
    assert not torch.equal(z, rademacher_like(like, gen(13)))
    assert rademacher_like(torch.empty(2, 3)).shape == (2, 3)  # global generator


# --- state, validation, None and bf16 ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCALINGS)
def test_state_dict_round_trip(name):
    pc = make_preconditioner(name, params64(), beta=0.7)
    for step in range(2):
        feed(pc, step_grads(step))
    pc.refresh()
    feed(pc, step_grads(2))  # statistics now ahead of D: both must be restored as they are
    buffer = io.BytesIO()
    torch.save(pc.state_dict(), buffer)
    buffer.seek(0)
    restored = make_preconditioner(name, params64(), beta=0.7)
    restored.load_state_dict(torch.load(buffer))
    assert restored.steps == pc.steps == 3
    for a, b in zip(pc.statistics() + pc.diagonal(), restored.statistics() + restored.diagonal()):
        assert torch.equal(a, b)
    pc.refresh()
    restored.refresh()
    assert all(torch.equal(a, b) for a, b in zip(pc.diagonal(), restored.diagonal()))


def test_load_state_dict_rejects_mismatches():
    pc = AdamScaling(params64())
    state = pc.state_dict()
    with pytest.raises(ValueError, match="'adam'"):
        RMSPropScaling(params64()).load_state_dict(state)
    with pytest.raises(ValueError, match="shape"):
        AdamScaling([torch.zeros(4, dtype=F64), torch.zeros(2, 2, dtype=F64)]).load_state_dict(state)
    with pytest.raises(ValueError, match="2 tensors"):
        AdamScaling(params64()).load_state_dict({**state, "statistics": state["statistics"][:1]})
    with pytest.raises(ValueError, match="keys"):
        AdamScaling(params64()).load_state_dict({"steps": 0})


def test_make_preconditioner_names_and_validation():
    params = params64()
    assert [type(make_preconditioner(n, params)) for n in SCALINGS] == [AdamScaling, RMSPropScaling, OASISScaling]
    assert SCALINGS == ("adam", "rmsprop", "oasis")
    with pytest.raises(ValueError, match="valid choices: adam, rmsprop, oasis"):
        make_preconditioner("adamw", params)
    for beta in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="beta"):
            make_preconditioner("adam", params, beta=beta)
    for eps in (0.0, -1e-8, float("inf")):
        with pytest.raises(ValueError, match="eps"):
            make_preconditioner("rmsprop", params, eps=eps)
        with pytest.raises(ValueError, match="eps"):
            AdamScaling(params, eps=eps)
    for alpha_min in (0.0, -1.0):
        with pytest.raises(ValueError, match="alpha_min"):
            make_preconditioner("oasis", params, alpha_min=alpha_min)
        with pytest.raises(ValueError, match="alpha_min"):
            OASISScaling(params, alpha_min=alpha_min)
    pc = make_preconditioner("oasis", params, beta=0.0, alpha_min=0.5)
    assert (pc.beta, pc.alpha_min) == (0.0, 0.5)


def test_count_and_shape_mismatches_are_errors():
    pc = AdamScaling(params64())
    with pytest.raises(ValueError, match="1 tensors for 2 parameters"):
        pc.accumulate([torch.zeros(3, dtype=F64)])
    with pytest.raises(ValueError, match="shape"):
        pc.apply_([torch.zeros(1, dtype=F64), torch.zeros(2, 2, dtype=F64)])  # would broadcast silently otherwise


@pytest.mark.parametrize("name", SCALINGS)
def test_none_gradients_are_skipped(name):
    pc = make_preconditioner(name, params64(), beta=0.5)
    feed(pc, step_grads(0))
    second_before = pc.statistics()[1].clone()
    feed(pc, [step_grads(1)[0], None])
    assert torch.equal(pc.statistics()[1], second_before)  # neither decayed nor updated
    assert not torch.equal(pc.statistics()[1], torch.zeros_like(second_before))
    pc.refresh()
    g = step_grads(2)[0]
    grads = [g.clone(), None]
    pc.apply_(grads)
    assert grads[1] is None and torch.equal(grads[0], g / pc.diagonal()[0])


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_bf16_gradients_keep_fp32_state(name):
    params = [torch.zeros(64, dtype=torch.bfloat16), torch.zeros(8, 8, dtype=torch.bfloat16)]
    pc = make_preconditioner(name, params, beta=0.9)
    grads = [torch.randn(64, generator=gen(14)).bfloat16(), torch.randn(8, 8, generator=gen(15)).bfloat16()]
    pc.accumulate(grads)
    assert all(v.dtype == torch.float32 for v in pc.statistics())
    torch.testing.assert_close(pc.statistics()[0], 0.1 * grads[0].float() ** 2, rtol=1e-6, atol=0)
    pc.refresh()
    assert all(d.dtype == torch.float32 for d in pc.diagonal())
    expected = [(g.float() / d).bfloat16() for g, d in zip(grads, pc.diagonal())]
    pc.apply_(grads)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))


def test_oasis_with_bf16_parameters_and_probes():
    x = torch.zeros(16, dtype=torch.bfloat16)
    pc = OASISScaling([x], beta=0.5, generator=gen(16))
    pc.accumulate_hutchinson(lambda z: [3.0 * zi for zi in z])  # H = 3 I, so z ⊙ Hz = 3 exactly
    pc.refresh()
    assert pc.diagonal()[0].dtype == torch.float32
    assert torch.equal(pc.diagonal()[0], torch.full((16,), 3.0))


# --- relative floor, the bias-correction weight, the decay since a mark --------------------------------------------

@pytest.mark.parametrize("name", SCALINGS)
def test_relative_floor_bounds_the_step_of_a_coordinate_without_statistics(name):
    """A coordinate that has seen no gradient (an unused embedding row) gets D = relative_floor · mean(D), not eps: its
    first gradient then takes a step at most 1/relative_floor times that of a typical coordinate."""
    pc = make_preconditioner(name, [torch.zeros(4), torch.zeros(3)], beta=0.5, eps=1e-8, alpha_min=1e-8)
    feed(pc, [torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([5.0, 5.0, 5.0])])
    pc.refresh()
    plain = make_preconditioner(name, [torch.zeros(4), torch.zeros(3)], beta=0.5, eps=1e-8, alpha_min=1e-8,
                                relative_floor=0.0)
    feed(plain, [torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([5.0, 5.0, 5.0])])
    plain.refresh()
    first, floored = plain.diagonal()[0], pc.diagonal()[0]
    assert first[0].item() <= 1e-8  # the plain formula: a step 1e8 times too long
    assert floored[0].item() == pytest.approx(0.01 * first.mean().item(), rel=1e-6)
    assert torch.equal(floored[1:], first[1:])  # coordinates above the floor are untouched
    assert torch.equal(pc.diagonal()[1], plain.diagonal()[1])  # per tensor: a constant tensor is never floored
    with pytest.raises(ValueError, match=r"relative_floor must be a number in \[0, 1\)"):
        make_preconditioner(name, [torch.zeros(2)], relative_floor=1.0)


@pytest.mark.parametrize("name", ["adam", "oasis"])
def test_bias_correction_uses_the_mixed_weight_so_ranks_with_different_step_counts_agree(name):
    """Rank 1 skipped two of three steps (partial work, or a gradient scaler's Inf step). Averaging mixed_state()
    (statistics and w) gives both ranks the same D = f(mean v / mean w): the per-rank counts 1 − β^t would not."""
    beta = 0.9
    ranks = [make_preconditioner(name, params64(), beta=beta, alpha_min=1e-8, relative_floor=0.0) for _ in range(2)]
    for step in range(3):
        feed(ranks[0], step_grads(step))
    feed(ranks[1], step_grads(0))
    assert [pc.steps for pc in ranks] == [3, 1]
    weights = [float(pc.mixed_state()[-1]) for pc in ranks]
    assert weights == pytest.approx([1 - beta ** 3, 1 - beta], rel=1e-6)
    for k in range(len(ranks[0].mixed_state())):
        mean = (ranks[0].mixed_state()[k] + ranks[1].mixed_state()[k]) / 2
        for pc in ranks:
            pc.mixed_state()[k].copy_(mean)
    for pc in ranks:
        pc.refresh()
    weight = (weights[0] + weights[1]) / 2
    for k in range(2):
        v = [(a + b) / 2 for a, b in zip(hand_ema(beta, k, name == "adam"), hand_ema_steps(beta, k, name == "adam", 1))]
        expected = [math.sqrt(vi / weight) + 1e-8 if name == "adam" else max(abs(vi) / weight, 1e-8) for vi in v]
        for pc in ranks:
            assert as_list(pc.diagonal()[k]) == pytest.approx(expected, rel=1e-12)


def hand_ema_steps(beta: float, k: int, square: bool, steps: int) -> list[float]:
    """v after the first ``steps`` steps of GRADS, in plain Python floats."""
    v = [0.0] * len(flat(0, k))
    for step in range(steps):
        v = [beta * vi + (1 - beta) * (x * x if square else x) for vi, x in zip(v, flat(step, k))]
    return v


def test_decay_since_mark_is_beta_to_the_accumulate_calls():
    pc = AdamScaling(params64(), beta=0.5)
    assert pc.decay_since_mark() == 1.0
    feed(pc, step_grads(0))
    pc.mark()
    feed(pc, step_grads(1))
    feed(pc, [None, None])  # a call without gradients still counts: w and the decay advance
    assert pc.decay_since_mark() == 0.25
    pc.mark()
    assert pc.decay_since_mark() == 1.0


def test_a_state_without_the_weight_loads_with_the_weight_it_stood_for():
    pc = AdamScaling(params64(), beta=0.9)
    for step in range(3):
        pc.accumulate(step_grads(step))
    older = {key: value for key, value in pc.state_dict().items() if key != "weight"}
    restored = AdamScaling(params64(), beta=0.9)
    restored.load_state_dict(older)
    assert float(restored.mixed_state()[-1]) == pytest.approx(1 - 0.9 ** 3, rel=1e-6)
    with pytest.raises(ValueError, match="'weight' must be a one-element tensor in"):
        restored.load_state_dict({**pc.state_dict(), "weight": torch.tensor([1.5])})


# --- OASIS probes replay the step: same dropout masks, BatchNorm statistics untouched ------------------------------

def dropout_batchnorm_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.5),
                                torch.nn.Tanh(), torch.nn.Linear(16, 1)).double().train()
    inputs, targets = torch.randn(32, 6, dtype=F64), torch.randn(32, 1, dtype=F64)
    return model, inputs, targets


def test_replayed_probes_match_the_exact_hessian_vector_product_with_dropout_and_batchnorm():
    model, inputs, targets = dropout_batchnorm_model()
    params = list(model.parameters())
    vectors = [rademacher_like(p, gen(3)) for p in params]

    def loss() -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(inputs), targets)

    def step_closure() -> None:
        loss().backward()

    # the exact H v of the loss the step computed: same dropout masks (generator reset), same batch statistics
    rng_state = capture_rng_state(torch.device("cpu"))
    exact = hessian_vector_product(loss, params, vectors)
    restore_rng_state(rng_state, torch.device("cpu"))
    buffers = list(model.buffers())
    before_step = [b.clone() for b in buffers]
    restore_rng_state(rng_state, torch.device("cpu"))
    step_closure()  # the optimizer step's own forward/backward
    after_step = [b.clone() for b in buffers]
    grads_after_step = [p.grad.clone() for p in params]
    next_draw = torch.get_rng_state()

    estimate = replayed_closure_hvp(step_closure, params, vectors, rng_state, buffers)
    error = sum(float((e - x).norm() ** 2) for e, x in zip(estimate, exact)) ** 0.5
    size = sum(float(x.norm() ** 2) for x in exact) ** 0.5
    assert error < 1e-3 * size, (error, size)  # O(h²) of the central difference
    assert all(torch.equal(b, a) for b, a in zip(buffers, after_step))  # running stats advanced once, by the step
    assert not all(torch.equal(b, a) for b, a in zip(buffers, before_step))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads_after_step))
    assert torch.equal(torch.get_rng_state(), next_draw)  # training continues with the generator the step left

    # probes that draw fresh dropout masks (no replay) are off by far more than the Hessian itself
    def fresh_gradients() -> list[torch.Tensor]:
        for param in params:
            param.grad = None
        step_closure()
        return [p.grad for p in params]

    fresh = finite_difference_hvp(fresh_gradients, params, vectors)
    fresh_error = sum(float((f - x).norm() ** 2) for f, x in zip(fresh, exact)) ** 0.5
    assert fresh_error > 10 * size, (fresh_error, size)
