"""AdaCons weights: pure tensor math on the gathered per-worker scalars. No communication happens here.

AdaCons (Choukroun, Azoulay, Kisilev, "Adaptive Consensus Gradients Aggregation for Scaled Distributed Training",
arXiv 2411.03742) replaces the plain mean ``ḡ = (1/N) Σ_i g_i`` of the ``N`` workers' gradients by a weighted sum of
the normalized gradients ``ĝ_i = g_i / ‖g_i‖``, with weights from the *subspace coefficients*::

    a_i = ⟨ḡ, ĝ_i⟩ = ⟨ḡ, g_i⟩ / ‖g_i‖                 (subspace_coefficients; eps in the denominator)
    a   ← momentum on the sorted a (optional)          (SubspaceMomentum)
    α_i = a_i / Σ_j a_j          (Σ_i α_i = 1)         (consensus_weights, with a guard, below)
    w_i = α_i / ‖g_i‖                                  (worker_multipliers: what rank i scales its gradient by)
    AdaCons(g_1..g_N) = Σ_i w_i g_i = Σ_i α_i ĝ_i

``a_i`` is the first-order optimal step along ``ĝ_i`` when minimizing ``f(x − Σ_i c_i ĝ_i)`` over the subspace the
workers' gradients span, with ``ḡ`` standing in for the true gradient. When every ``a_i ≥ 0`` the result has a closed
form (``closed_form`` in the tests' ``adacons_oracles``): with ``p_i = (⟨ḡ, g_i⟩ / ‖g_i‖²) g_i`` the projection of
``ḡ`` onto ``span(g_i)``, ``AdaCons = Σ_i p_i / Σ_i ‖p_i‖``. A worker aligned with the consensus counts more; in
raw-gradient terms a worker is down-weighted by ``1/‖g_i‖²``.

**Subspace momentum on order statistics.** Workers are exchangeable (i.i.d. shards), so "worker i's coefficient" has
no identity across steps. The EMA runs on the *sorted* coefficients: with ``v = sort(a)``, ``v[k] = a[π[k]]``,
``m ← β m + (1 − β) v`` (``m = v`` at the first call), smoothing the shape of the weight distribution while the
current step's ranking decides which worker receives which smoothed value: ``a'[π[k]] = m[k]`` (a scatter with ``π``,
i.e. ``m`` indexed by the *inverse* permutation). The authors' reference code computes ``m[π]`` instead, which equals
the correct mapping only when ``π`` is an involution, so it hands smoothed weights to the wrong workers (even at the
first call). For layer-wise ``[N, T]`` coefficients each column is sorted and smoothed independently.

**Guards.** ``Σ a`` can be ≈ 0 or negative, and single ``a_i`` negative, when workers disagree (non-IID data, tiny
batches); then ``α`` explodes or flips sign. Per column:

* ``"shift"`` (the production TF/HCCL variant): if ``min(a) < 0``, ``a ← a − min(a)``, so the most anti-aligned
  worker gets weight exactly 0; if then ``Σ a ≤ eps`` (all zero, or all equal before the shift) → uniform ``1/N``.
* ``"mean"``: any ``a_i < 0`` or ``Σ a ≤ eps`` → uniform ``1/N``.

Either way a column with a non-finite coefficient (or a sum that overflows) also falls back to ``1/N`` (a NaN gradient
still yields a NaN result through ``w_i``, so nothing is hidden). Weights are always finite, ``≥ 0`` and sum to 1.
Uniform weights give the mean of the normalized gradients ``(1/N) Σ_i ĝ_i``, the same scale as AdaCons proper.

**Scale.** ``Σ_i α_i ĝ_i`` is a convex combination of unit vectors, so ``‖AdaCons‖ ≤ 1``; identical gradients ``g``
give ``g / ‖g‖`` exactly. The gradient magnitude is discarded: harmless for scale-invariant optimizers (Adam, LAMB,
LARS up to their ε), but for plain or momentum SGD it silently changes the effective learning rate (``η`` instead of
``η‖ḡ‖``), which also shifts the balance with weight decay. ``preserve_scale`` rescales the result to ``‖ḡ‖`` (per
segment in layer-wise mode), keeping AdaCons' direction with DDP's magnitude. ``eps`` (default ``1e-8``) sits in
every denominator as in the reference code, so gradients with ``‖g_i‖ ≲ eps`` are not fully normalized.

**Communication** (paid by the strategy, not here): one all-reduce of the gradients for ``ḡ``, a gather of ``N``
scalars (``N·T`` layer-wise), and a second all-reduce of ``w_i g_i``: about twice DDP's gradient traffic. With stale
weights (the previous step's ``α``) only one gradient all-reduce per step remains.

Everything is pure torch on the inputs' device (no ``.item()``, no host sync), computes in the inputs' precision when
that is fp32 or fp64, and in fp32 for half-precision or integer inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

GUARDS: tuple[str, ...] = ("shift", "mean")
"""Guards :func:`consensus_weights` accepts for negative coefficients or a coefficient sum ≤ eps."""


def _float(x: Tensor, name: str) -> Tensor:
    """``x`` as fp32/fp64 (half precision and integers are promoted to fp32; fp32/fp64 pass through)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype in (torch.float32, torch.float64):
        return x
    if x.is_complex():
        raise ValueError(f"{name} must be real, got {x.dtype}")
    return x.to(torch.float32)


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:  # also rejects NaN
        raise ValueError(f"eps must be > 0 and finite, got {eps!r}")


def _check_guard(guard: str) -> None:
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {', '.join(map(repr, GUARDS))}; got {guard!r}")


def _check_table(x: Tensor, name: str) -> None:
    """A coefficient-like table: ``[N]`` or ``[N, T]`` with ``N ≥ 1``."""
    if x.dim() not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N] or [N, T] with N >= 1 workers, got {tuple(x.shape)}")


def _check_pair(x: Tensor, y: Tensor, x_name: str, y_name: str) -> None:
    """Two ``[N]`` or ``[N, T]`` tables of the same shape on the same device."""
    _check_table(x, x_name)
    if x.shape != y.shape:
        raise ValueError(f"{x_name} and {y_name} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{x_name} and {y_name} must be on the same device, got {x.device} and {y.device}")


def subspace_coefficients(dots: Tensor, norms: Tensor, eps: float = 1e-8) -> Tensor:
    """Subspace coefficients ``a = dots / (norms + eps)``, elementwise.

    With ``dots_i = ⟨ḡ, g_i⟩`` and ``norms_i = ‖g_i‖`` this is ``a_i = ⟨ḡ, ĝ_i⟩``, the coefficient of the consensus
    gradient along worker ``i``'s normalized gradient. Shapes ``[N]`` (global) or ``[N, T]`` (one column per tensor).
    """
    _check_eps(eps)
    dots, norms = _float(dots, "dots"), _float(norms, "norms")
    _check_pair(dots, norms, "dots", "norms")
    return dots / (norms + eps)


class SubspaceMomentum:
    """EMA on the sorted coefficients (order statistics), mapped back with the INVERSE permutation.

    Per column of ``a`` (``[N]`` or ``[N, T]``, sorted along dim 0): ``v, π = sort(a)`` so that ``v[k] = a[π[k]]``;
    ``m = v`` at the first call, then ``m ← β m + (1 − β) v``; the output ``a'`` has ``a'[π[k]] = m[k]`` (a scatter,
    i.e. ``m[π⁻¹]``; NOT ``m[π]``, the reference code's bug). The sort is stable, so ties map deterministically and
    every rank, given the same gathered table, returns the same result. ``β = 0`` returns the input unchanged (the
    mapping is then the identity) and keeps no state.

    A column holding NaN/Inf (e.g. an overflowing fp16 step that a gradient scaler will skip) is returned unchanged, so
    :func:`consensus_weights` gives it uniform weights, and leaves that column's state untouched; a column whose state
    is non-finite (its first step was) restarts from the next finite step. Without this one bad step would poison the
    EMA forever and silently turn AdaCons into the uniform mean for the rest of the run.
    """

    def __init__(self, beta: float) -> None:
        if isinstance(beta, (bool, str)):
            raise ValueError(f"momentum beta must be a number in [0, 1), got {beta!r}")
        try:
            beta = float(beta)
        except (TypeError, ValueError):
            raise ValueError(f"momentum beta must be a number in [0, 1), got {beta!r}") from None
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.m: Tensor | None = None

    def __call__(self, coefficients: Tensor) -> Tensor:
        coefficients = _float(coefficients, "coefficients")
        _check_table(coefficients, "coefficients")
        if self.beta == 0.0:
            return coefficients
        values, perm = torch.sort(coefficients.detach(), dim=0, stable=True)
        finite = torch.isfinite(values).all(dim=0)  # per column; no host sync
        if self.m is None:
            m = values
        else:
            if self.m.shape != values.shape:
                raise ValueError(f"subspace momentum state has shape {tuple(self.m.shape)} but the coefficients have "
                                 f"{tuple(values.shape)} (did the world size or the number of tensors change?); "
                                 "reset it with load_state_dict({'m': None})")
            previous = self.m.to(device=values.device, dtype=values.dtype)
            m = torch.where(torch.isfinite(previous).all(dim=0), self.beta * previous + (1.0 - self.beta) * values,
                            values)
            m = torch.where(finite, m, previous)
        self.m = m
        return torch.where(finite, torch.empty_like(m).scatter_(0, perm, m), coefficients)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"m"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"subspace momentum state must be a dict with the single key 'm', got {keys}")
        m = state["m"]
        if m is not None:
            if not isinstance(m, Tensor):
                raise ValueError(f"subspace momentum state 'm' must be a tensor or None, got {type(m).__name__}")
            m = _float(m, "m")
            _check_table(m, "subspace momentum state 'm'")
            m = m.detach().clone()
        self.m = m


def consensus_weights(coefficients: Tensor, guard: str = "shift", eps: float = 1e-8) -> Tensor:
    """Weights ``α = a / Σ a`` along dim 0 (each column sums to 1), with a guard; ``[N]`` or ``[N, T]``.

    * ``guard="shift"``: where ``min(a) < 0``, ``a ← a − min(a)`` (the most anti-aligned worker gets weight 0); a
      column whose sum is then ``≤ eps`` gets uniform ``1/N``.
    * ``guard="mean"``: a column with any ``a_i < 0`` or sum ``≤ eps`` gets uniform ``1/N``.

    A column with a non-finite coefficient or sum also gets ``1/N``. The result is finite, non-negative and sums to 1
    per column. Vectorized over columns (no Python loop, no host sync).
    """
    _check_guard(guard)
    _check_eps(eps)
    a = _float(coefficients, "coefficients")
    _check_table(a, "coefficients")
    finite = torch.isfinite(a).all(dim=0)
    a = torch.where(finite, a, torch.zeros_like(a))
    lowest = a.amin(dim=0)
    if guard == "shift":
        a = a - lowest.clamp(max=0.0)
        total = a.sum(dim=0)
        usable = finite & torch.isfinite(total) & (total > eps)
    else:
        total = a.sum(dim=0)
        usable = finite & torch.isfinite(total) & (total > eps) & (lowest >= 0)
    safe_total = torch.where(usable, total, torch.ones_like(total))
    uniform = torch.full_like(a, 1.0 / a.shape[0])
    return torch.where(usable, a / safe_total, uniform)


def worker_multipliers(weights: Tensor, norms: Tensor, eps: float = 1e-8) -> Tensor:
    """What each worker scales its raw gradient by: ``w = α / (norms + eps)`` (so ``Σ_i w_i g_i = Σ_i α_i ĝ_i``)."""
    _check_eps(eps)
    weights, norms = _float(weights, "weights"), _float(norms, "norms")
    _check_pair(weights, norms, "weights", "norms")
    return weights / (norms + eps)
