"""Diagonal preconditioners for local methods with adaptivity via scaling (SAVIC, arXiv 2406.00846). Pure tensor math.

Every local step on every rank is a scaled SGD step with ONE diagonal preconditioner ``D`` shared by all ranks::

    x ← x − γ · D⁻¹ g                                  (elementwise: x_i ← x_i − γ g_i / D_i)

The strategy calls :meth:`Preconditioner.accumulate` with this rank's gradient after each backward (this updates
the rank's *statistics* ``v``, not ``D``), then :meth:`Preconditioner.apply_` (``g ← g / D`` in place) before clipping
and the user's optimizer (plain SGD, possibly with momentum). At a synchronization round it averages
:meth:`Preconditioner.statistics` across ranks like the parameters and calls :meth:`Preconditioner.refresh`, which
recomputes ``D`` from the averaged statistics. The families, all arithmetic elementwise::

    adam     v ← β v + (1 − β) g²           D = sqrt(max(v, 0) / w) + eps             (bias-corrected)
    rmsprop  v ← β v + (1 − β) g²           D = sqrt(max(v, 0)) + eps                 (no bias correction)
    oasis    v ← β v + (1 − β) z ⊙ (H z)    D = max(|v| / w, alpha_min)               (bias-corrected)
    then, per tensor:                       D ← max(D, relative_floor · mean(D))

``w`` is the bias-correction weight, an EMA of ones updated with the statistics (``w ← β w + (1 − β)``, so
``w = 1 − βᵗ`` after ``t`` accumulate calls). It travels with the statistics (:meth:`Preconditioner.mixed_state`)
and is mixed like them, so ``D`` comes from ``mean v / mean w``: the right bias correction also when ranks
accumulated different numbers of steps (a step skipped for partial work, or because a gradient scaler found
Inf/NaN), and identical on every rank after an exact average.

Defaults: ``β = 0.999``, ``eps = 1e-8``, ``alpha_min = 1e-4``, ``relative_floor = 1e-2``. The exact constants and the
exact UPDATE rule of 2406.00846 were not available (``research/algorithms.md`` §3.2); these are the standard Adam
(second moment only, no first-moment momentum, as in the "Adam-type scaling" analyses), RMSProp and OASIS (Jahani et
al., ICLR 2022) families. For OASIS, ``z`` is a Rademacher vector and ``z ⊙ (H z)`` a one-sample Hutchinson estimate of
the Hessian diagonal (unbiased: ``E[z_i Σ_j H_ij z_j] = H_ii``); see :func:`hutchinson_diagonal`,
:func:`hessian_vector_product` and :func:`finite_difference_hvp`. The estimates can be negative (non-convex curvature),
hence ``|v|``. OASIS is bias-corrected like Adam, as a replacement for the paper's warm-up estimate of ``D₀``: without
it, after the first local phase of ``H`` steps ``v ≈ (1 − β^H)·diag(H)`` (0.8 % of the curvature for ``H = 8, β =
0.999``) and the steps would be over a hundred times too long. ``max(v, 0)`` in Adam/RMSProp only matters for averaged
statistics that went slightly negative (e.g. after a lossy codec); it keeps ``D`` finite. Floors: ``D ≥ eps`` (adam,
rmsprop) and ``D ≥ alpha_min`` (oasis) everywhere, whatever the (finite) statistics, and ``D ≥ relative_floor ·
mean(D)`` within each parameter tensor. The relative floor is what keeps a frozen ``D`` safe: a coordinate whose
statistics are (near) zero, because it had no gradient yet (an unused embedding row) or because they were rounded to
zero, would otherwise get ``D = eps = 1e-8`` and, at its next gradient, a step ``1e8`` times longer than intended. With
``relative_floor = 1e-2`` no coordinate's step exceeds 100 times that of a typical coordinate with the same gradient
(per-step Adam, whose ``v`` contains the current gradient, bounds the ratio by ``1/√(1 − β₂) ≈ 32``). ``relative_floor =
0`` gives the plain formulas.

``D`` is FROZEN within a local phase: it changes only in :meth:`~Preconditioner.refresh` and
:meth:`~Preconditioner.load_state_dict`, never in ``accumulate``. Until the first refresh after at least one
accumulate, ``D = 1`` (identity: plain local SGD). Why frozen and shared: with the same ``D`` on every rank the step
is linear in the gradient, so the average of the replicas moves exactly as ``x̄ ← x̄ − γ D⁻¹ ḡ``, a centralized
scaled SGD step with the averaged gradient, and averaging the models at a round is consistent with that method. If
each rank scaled by its own, continuously updated ``D_m`` (common "Local Adam"), the average would move by
``−γ · mean_m(D_m⁻¹ g_m)``, which is not a scaled method for any single preconditioner.

Communication: the statistics are as large as the model (one value per parameter, fp32; fp64 for fp64 parameters),
plus one value for ``w``. Folded into the round's message they double its size for an fp32 model (triple it for a
bf16 model). With an all-reduce every rank gets the exact mean, so ``D`` is identical on all ranks. With gossip
(pairwise averaging) the statistics are only pulled together, so ``D`` is identical only approximately (exactly at
consensus of the statistics), and the consistency argument above holds only approximately too.

Rounds applied late (``overlap=True``) must not apply the round's change ``m − s`` to statistics that decayed
meanwhile: with ``k`` accumulate calls since the snapshot ``s``, the statistics are ``βᵏ s + u``, and the round's
result belongs at ``βᵏ m + u = v + βᵏ (m − s)``. :meth:`Preconditioner.mark` and
:meth:`Preconditioner.decay_since_mark` give that factor ``βᵏ``; with it, mixed statistics stay convex
combinations of the ranks' statistics (never below zero for adam/rmsprop).

Precision: statistics and ``D`` are fp32 (fp64 for fp64 parameters) even when parameters and gradients are bf16/fp16;
``apply_`` divides in fp32 and writes the result back in the gradient's dtype. Non-finite gradients poison the
statistics (``v`` keeps a NaN forever): do not accumulate on steps a gradient scaler skips, and accumulate unscaled
gradients. :meth:`~Preconditioner.refresh` refuses non-finite statistics with a ``ValueError`` (one reduction per
round) rather than turn ``D``, and then every scaled step, into NaN.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

SCALINGS: tuple[str, ...] = ("adam", "rmsprop", "oasis")
"""Preconditioner family names accepted by :func:`make_preconditioner`."""


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:  # also rejects NaN
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
    return float(beta)


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_relative_floor(value: float, name: str = "relative_floor") -> float:
    """A relative floor must be a number in ``[0, 1)`` (0 disables it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1) (0 disables it), got {value!r}")
    return float(value)


def all_finite(tensors: Sequence[Tensor | None]) -> bool:
    """Whether no tensor holds NaN or ±Inf: one fused reduction per tensor (``_foreach_norm`` with ``ord=inf``, which
    NaN and ±Inf both reach) and one host sync for all of them. ``None``, meta and empty tensors are skipped."""
    checked = [t for t in tensors if t is not None and t.numel() and t.device.type != "meta"]
    if not checked:
        return True
    largest = torch._foreach_norm(checked, ord=math.inf)
    return bool(torch.isfinite(torch.stack([x.to(largest[0].device) for x in largest])).all())


def _check_finite(tensors: Sequence[Tensor], what: str, advice: str) -> None:
    """Raise ``ValueError`` if any tensor holds NaN/Inf (:func:`all_finite`)."""
    if all_finite(tensors):
        return
    checked = [(k, t) for k, t in enumerate(tensors) if t.numel() and t.device.type != "meta"]
    counts = [(k, int((~torch.isfinite(t)).sum())) for k, t in checked]  # error path only: extra syncs are fine
    first = next(k for k, count in counts if count)
    raise ValueError(f"{what} hold NaN or Inf: {sum(c for _, c in counts)} of {sum(t.numel() for _, t in checked)} "
                     f"values, first in tensor {first}; {advice}")


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half precision and fp32, fp64 for fp64."""
    if not dtype.is_floating_point:
        raise ValueError(f"preconditioned parameters must be floating point, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


class Preconditioner(ABC):
    """A diagonal preconditioner ``D`` (one tensor per parameter) computed from EMA statistics ``v``.

    ``params`` only fix the shapes, devices and the statistics' dtype; no reference to them is kept. ``eps`` is the
    floor of ``D`` (for OASIS the floor is ``alpha_min``). See the module docstring for the update rules.
    """

    name: str

    def __init__(self, params: Sequence[Tensor], beta: float = 0.999, eps: float = 1e-8,
                 relative_floor: float = 1e-2) -> None:
        self.beta = _check_beta(beta)
        self.eps = _check_positive(eps, "eps")
        self.relative_floor = check_relative_floor(relative_floor)
        if isinstance(params, Tensor):
            raise TypeError("params must be a sequence of tensors (e.g. list(model.parameters())), got a single "
                            f"Tensor of shape {tuple(params.shape)}; wrap it in a list")
        params = list(params)
        for k, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{k}] must be a torch.Tensor, got {type(p).__name__}")
        self._stats = [torch.zeros(p.shape, dtype=_state_dtype(p.dtype), device=p.device) for p in params]
        self._diag = [torch.ones_like(v) for v in self._stats]
        first = self._stats[0] if self._stats else torch.zeros(())
        self._weight = torch.zeros(1, dtype=first.dtype, device=first.device)
        self._decay = 1.0
        self.steps = 0
        """Number of accumulate calls on this rank."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(beta={self.beta}, floor={self.eps}, relative_floor={self.relative_floor}, "
                f"tensors={len(self._stats)}, steps={self.steps})")

    def statistics(self) -> list[Tensor]:
        """The LIVE statistics tensors, one per parameter in the constructor's order and shapes (the same on every
        rank)."""
        return list(self._stats)

    def mixed_state(self) -> list[Tensor]:
        """What a round mixes across ranks, LIVE: the statistics, then the one-element bias-correction weight ``w``.
        Average them in place (all with the same weights) before :meth:`refresh`."""
        return [*self._stats, self._weight]

    def mark(self) -> None:
        """Start measuring the decay of the statistics (:meth:`decay_since_mark`), e.g. at a round's snapshot."""
        self._decay = 1.0

    def decay_since_mark(self) -> float:
        """``βᵏ`` for the ``k`` accumulate calls since :meth:`mark`: the factor by which the statistics (and ``w``)
        held at the mark have been scaled since. A late round result ``m`` for a snapshot ``s`` belongs at
        ``v + βᵏ (m − s)``."""
        return self._decay

    def diagonal(self) -> list[Tensor]:
        """The LIVE frozen ``D``, one tensor per parameter. :meth:`refresh` overwrites them in place: clone to keep a
        snapshot; do not modify."""
        return list(self._diag)

    def _pairs(self, tensors: Sequence[Tensor | None], what: str,
               targets: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``(given, target)`` lists with the ``None`` entries of ``tensors`` left out; checks count and shapes."""
        tensors = list(tensors)
        if len(tensors) != len(targets):
            raise ValueError(f"{what} got {len(tensors)} tensors for {len(targets)} parameters")
        given, matched = [], []
        for k, (x, target) in enumerate(zip(tensors, targets)):
            if x is None:
                continue
            if not isinstance(x, Tensor):
                raise TypeError(f"{what}: entry {k} must be a torch.Tensor or None, got {type(x).__name__}")
            if not x.dtype.is_floating_point:
                raise TypeError(f"{what}: tensor {k} must be floating point, got {x.dtype}")
            if x.shape != target.shape:
                raise ValueError(f"{what}: tensor {k} has shape {tuple(x.shape)}, its parameter {tuple(target.shape)}")
            if x.device != target.device:
                raise ValueError(f"{what}: tensor {k} is on {x.device}, its parameter's state on {target.device}")
            given.append(x)
            matched.append(target)
        return given, matched

    @torch.no_grad()
    def _ema_(self, values: Sequence[Tensor | None], what: str, square: bool, divisor: float = 1.0) -> None:
        """``v ← β v + (1 − β) x`` with ``x = value / divisor`` (squared if ``square``) for every non-``None`` value;
        counts one step."""
        given, stats = self._pairs(values, what, self._stats)
        if given:
            given = [x.detach().to(v.dtype) for x, v in zip(given, stats)]
            if divisor != 1.0:
                given = torch._foreach_div(given, divisor)
            torch._foreach_mul_(stats, self.beta)
            if square:
                torch._foreach_addcmul_(stats, given, given, value=1.0 - self.beta)
            else:
                torch._foreach_add_(stats, given, alpha=1.0 - self.beta)
        self._weight.mul_(self.beta).add_(1.0 - self.beta)
        self._decay *= self.beta
        self.steps += 1

    def accumulate(self, grads: Sequence[Tensor | None], loss_scale: float = 1.0) -> None:
        """This rank's statistics update from its local gradients (one call per optimizer step): ``v ← β v +
        (1 − β) g²`` with ``g = grads / loss_scale`` (the unscaled gradients of a gradient scaler's scaled ones).
        ``None`` entries (unused parameters) leave their statistics unchanged. ``D`` is not touched."""
        self._ema_(grads, "accumulate", square=True, divisor=_check_positive(loss_scale, "loss_scale"))

    @torch.no_grad()
    def refresh(self) -> None:
        """``D ← f(v, w)`` in place; ``D`` then stays frozen until the next refresh. ``D = 1`` while no step was
        accumulated (``w = 0``: on no rank whose statistics were mixed in).

        Raises ``ValueError`` (leaving ``D`` unchanged) if the statistics hold NaN/Inf, which would make ``D`` NaN or
        Inf and every scaled step NaN or zero: one reduction and two host syncs per refresh, i.e. per round."""
        if not self._diag:
            return
        weight = float(self._weight)
        if not math.isfinite(weight):
            raise ValueError(f"{self.name} preconditioner bias-correction weight is {weight}; a non-finite value was "
                             "mixed in")
        if weight <= 0.0:
            for d in self._diag:
                d.fill_(1.0)
            return
        _check_finite(self._stats, f"{self.name} preconditioner statistics",
                      "a non-finite gradient (or one whose square overflows) was accumulated: accumulate unscaled "
                      "gradients, and not on steps a gradient scaler skips")
        torch._foreach_copy_(self._diag, self._stats)
        self._diagonal_from_statistics_(self._diag, weight)
        if self.relative_floor > 0:
            for d in self._diag:
                if d.numel():
                    d.clamp_min_(d.mean() * self.relative_floor)

    @abstractmethod
    def _diagonal_from_statistics_(self, d: list[Tensor], weight: float) -> None:
        """Turn ``d`` (a copy of the statistics) into the diagonal, in place, with bias-correction weight ``weight``
        and the family's absolute floor."""

    @torch.no_grad()
    def apply_(self, grads: Sequence[Tensor | None]) -> None:
        """``g ← g / D`` in place with the frozen ``D`` (computed in the statistics' dtype, written back in the
        gradient's dtype). ``None`` entries are skipped."""
        given, diag = self._pairs(grads, "apply_", self._diag)
        same = [(g, d) for g, d in zip(given, diag) if g.dtype == d.dtype]
        mixed = [(g, d) for g, d in zip(given, diag) if g.dtype != d.dtype]
        if same:
            torch._foreach_div_([g for g, _ in same], [d for _, d in same])
        if mixed:
            gs = [g for g, _ in mixed]
            torch._foreach_copy_(gs, torch._foreach_div(gs, [d for _, d in mixed]))

    def state_dict(self) -> dict[str, Any]:
        """``{"name", "steps", "statistics", "diagonal", "weight"}``; the tensors are the live ones (like
        ``torch.optim``)."""
        return {"name": self.name, "steps": self.steps, "statistics": list(self._stats), "diagonal": list(self._diag),
                "weight": self._weight}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy statistics, ``D``, ``w`` and the step counter from :meth:`state_dict` output (same family and shapes).
        A state written before ``w`` existed (no ``"weight"`` key) gets ``w = 1 − β^steps``, what it stood for."""
        expected = {"name", "steps", "statistics", "diagonal", "weight"}
        if isinstance(state, dict) and set(state) == expected - {"weight"}:
            state = {**state, "weight": torch.full((1,), 1.0 - self.beta ** state["steps"] if
                                                   isinstance(state["steps"], int) else math.nan)}
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"preconditioner state must be a dict with keys {sorted(expected)}, got {keys}")
        if state["name"] != self.name:
            raise ValueError(f"preconditioner state is for {state['name']!r}, this preconditioner is {self.name!r}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"preconditioner state 'steps' must be an int >= 0, got {steps!r}")
        for key, targets in (("statistics", self._stats), ("diagonal", self._diag)):
            tensors = list(state[key])
            if len(tensors) != len(targets) or any(x is None for x in tensors):
                raise ValueError(f"preconditioner state '{key}' must hold {len(targets)} tensors")
            self._pairs(tensors, f"load_state_dict '{key}'", targets)
            _check_finite(tensors, f"preconditioner state '{key}'", "the checkpoint is corrupt")
        weight = state["weight"]
        if not isinstance(weight, Tensor) or weight.numel() != 1 or not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"preconditioner state 'weight' must be a one-element tensor in [0, 1], got {weight!r}")
        for key, targets in (("statistics", self._stats), ("diagonal", self._diag)):
            for target, x in zip(targets, state[key]):
                target.copy_(x)
        self._weight.copy_(weight.reshape(1))
        self.steps = steps


class AdamScaling(Preconditioner):
    """``v ← β v + (1 − β) g²``, ``D = sqrt(max(v, 0) / w) + eps`` (``w = 1 − βᵗ`` on one rank)."""

    name = "adam"

    def _diagonal_from_statistics_(self, d: list[Tensor], weight: float) -> None:
        torch._foreach_clamp_min_(d, 0.0)
        torch._foreach_div_(d, weight)
        torch._foreach_sqrt_(d)
        torch._foreach_add_(d, self.eps)


class RMSPropScaling(Preconditioner):
    """``v ← β v + (1 − β) g²``, ``D = sqrt(max(v, 0)) + eps`` (no bias correction: ``D`` underestimates ``|g|``
    by ``sqrt(1 − βᵗ)`` early on, so early steps are long; prefer a smaller ``β`` or a warm-up)."""

    name = "rmsprop"

    def _diagonal_from_statistics_(self, d: list[Tensor], weight: float) -> None:
        torch._foreach_clamp_min_(d, 0.0)
        torch._foreach_sqrt_(d)
        torch._foreach_add_(d, self.eps)


class OASISScaling(Preconditioner):
    """``v ← β v + (1 − β) z ⊙ (H z)`` (Hutchinson), ``D = max(|v| / w, alpha_min)``.

    Feed it Hessian-diagonal estimates with :meth:`accumulate_hessian_diagonal`, or let it draw the probe with
    ``generator`` through :meth:`accumulate_hutchinson`. :meth:`accumulate` (squared gradients) is refused.
    """

    name = "oasis"

    def __init__(self, params: Sequence[Tensor], beta: float = 0.999, alpha_min: float = 1e-4,
                 generator: torch.Generator | None = None, relative_floor: float = 1e-2) -> None:
        super().__init__(params, beta, eps=_check_positive(alpha_min, "alpha_min"), relative_floor=relative_floor)
        self.alpha_min = self.eps
        self.generator = generator

    def accumulate(self, grads: Sequence[Tensor | None], loss_scale: float = 1.0) -> None:
        raise TypeError("OASISScaling takes Hessian-diagonal estimates z ⊙ (H z), not gradients: use "
                        "accumulate_hessian_diagonal(estimates) or accumulate_hutchinson(hvp)")

    def accumulate_hessian_diagonal(self, estimates: Sequence[Tensor | None]) -> None:
        """``v ← β v + (1 − β) e`` for this rank's estimates ``e`` (e.g. from :func:`hutchinson_diagonal`); ``None``
        entries leave their statistics unchanged. One call per optimizer step."""
        self._ema_(estimates, "accumulate_hessian_diagonal", square=False)

    def accumulate_hutchinson(self, hvp: Callable[[list[Tensor]], list[Tensor]]) -> None:
        """Draw Rademacher probes ``z`` (statistics' shapes and dtype, ``self.generator``) and accumulate
        ``z ⊙ hvp(z)``."""
        self.accumulate_hessian_diagonal(hutchinson_diagonal(hvp, self._stats, self.generator))

    def _diagonal_from_statistics_(self, d: list[Tensor], weight: float) -> None:
        torch._foreach_abs_(d)
        torch._foreach_div_(d, weight)
        torch._foreach_clamp_min_(d, self.alpha_min)


def rademacher_like(tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A tensor of ``tensor``'s shape, dtype and device with entries ±1, each with probability ½ independently.

    Drawn on the generator's device (the tensor's device without a generator), then moved: a CPU generator works
    for a CUDA tensor, at the cost of one host-to-device copy of an int8 tensor.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"rademacher_like expects a torch.Tensor, got {type(tensor).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else tensor.device
    bits = torch.randint(0, 2, tensor.shape, generator=generator, device=device, dtype=torch.int8)
    return bits.to(device=tensor.device, dtype=tensor.dtype).mul_(2).sub_(1)


def hutchinson_diagonal(hvp: Callable[[list[Tensor]], list[Tensor]], params: Sequence[Tensor],
                        generator: torch.Generator | None = None) -> list[Tensor]:
    """One-sample Hutchinson estimate ``z ⊙ (H z)`` of the Hessian diagonal, ``z`` Rademacher like each parameter.

    ``hvp(z_list)`` must return ``H z`` as a list of the same length (see :func:`hessian_vector_product`,
    :func:`finite_difference_hvp`). Unbiased, with per-coordinate variance ``Σ_{j≠i} H_ij²``.
    """
    probes = [rademacher_like(p, generator) for p in params]
    products = list(hvp(probes))
    if len(products) != len(probes):
        raise ValueError(f"hvp returned {len(products)} tensors for {len(probes)} probes")
    _check_shapes(products, probes, "hvp returned", "probe")
    return [z * hz for z, hz in zip(probes, products)]


def _check_shapes(tensors: Sequence[Any], references: Sequence[Tensor], what: str, reference: str) -> None:
    """Each of ``tensors`` a Tensor of its reference's shape (no silent broadcasting)."""
    for k, (x, ref) in enumerate(zip(tensors, references)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} a {type(x).__name__} at index {k}; expected a torch.Tensor")
        if x.shape != ref.shape:
            raise ValueError(f"{what} shape {tuple(x.shape)} at index {k}; its {reference} has shape "
                             f"{tuple(ref.shape)}")


def hessian_vector_product(loss_fn: Callable[[], Tensor], params: Sequence[Tensor],
                           vectors: Sequence[Tensor]) -> list[Tensor]:
    """Exact ``H v`` by double backward: ``∇_x ⟨∇f(x), v⟩`` with ``f = loss_fn()`` re-evaluated here.

    Parameters that ``f`` does not depend on (or only linearly) get zeros. For tests and single-process use: it needs
    the loss's graph, which an optimizer closure that already ran backward does not keep.
    """
    params, vectors = list(params), list(vectors)
    if len(vectors) != len(params):
        raise ValueError(f"got {len(vectors)} vectors for {len(params)} parameters")
    _check_shapes(vectors, params, "vectors have", "parameter")
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
        terms = [(g * v).sum() for g, v in zip(grads, vectors) if g is not None and g.requires_grad]
        if not terms:
            return [torch.zeros_like(p) for p in params]
        products = torch.autograd.grad(torch.stack(terms).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, products)]


def finite_difference_hvp(grad_fn: Callable[[], list[Tensor]], params: Sequence[Tensor], vectors: Sequence[Tensor],
                          step: float = 1e-3) -> list[Tensor]:
    """Central difference ``H v ≈ (∇f(x + h v) − ∇f(x − h v)) / (2h)``, for where only gradients are available.

    ``grad_fn()`` must return the gradients at the parameters' current values (``None`` for unused ones, read as
    zero); it is called twice, at ``x + h v`` and ``x − h v``, and what it returns is copied at once (returning the
    live ``p.grad`` tensors is fine). The parameters are restored bitwise afterwards, also if ``grad_fn`` raises;
    ``p.grad`` is left as the last call set it. The error is ``O(h²)`` times the third derivative plus rounding
    ``O(ulp(∇f) / h)``; the result is in at least fp32. Parameters must be fp32 or fp64: in bf16/fp16 a step of
    ``1e-3`` is mostly rounded away (bf16 spacing at 1.0 is ``2⁻⁷``) and ``H v`` would come out as zero.
    """
    params, vectors = list(params), list(vectors)
    if len(vectors) != len(params):
        raise ValueError(f"got {len(vectors)} vectors for {len(params)} parameters")
    h = _check_positive(step, "step")
    _check_shapes(vectors, params, "vectors have", "parameter")
    for p in params:
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"finite_difference_hvp needs fp32 or fp64 parameters, got {p.dtype}: a step of {h} is "
                             "rounded away in half precision")

    def gradients() -> list[Tensor]:
        grads = list(grad_fn())
        if len(grads) != len(params):
            raise ValueError(f"grad_fn returned {len(grads)} gradients for {len(params)} parameters")
        _check_shapes([g for g in grads if g is not None], [p for p, g in zip(params, grads) if g is not None],
                      "grad_fn returned", "parameter")
        return [torch.zeros(p.shape, dtype=p.dtype, device=p.device) if g is None
                else g.detach().to(torch.promote_types(g.dtype, torch.float32), copy=True) for p, g in zip(params, grads)]

    originals = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, vectors):
                p.add_(v, alpha=h)
        plus = gradients()
        with torch.no_grad():
            for p, x, v in zip(params, originals, vectors):
                p.copy_(x).sub_(v, alpha=h)
        minus = gradients()
    finally:
        with torch.no_grad():
            for p, x in zip(params, originals):
                p.copy_(x)
    return [(gp - gm).div_(2.0 * h) for gp, gm in zip(plus, minus)]


RandomState = tuple[Tensor, Tensor | None]
"""The default CPU generator's state and, on a CUDA device, that device's generator state."""


def capture_rng_state(device: torch.device) -> RandomState:
    """The random state a forward pass on ``device`` draws from (dropout masks): CPU's, and the device's on CUDA."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def restore_rng_state(state: RandomState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def replayed_closure_hvp(grad_closure: Callable[[], Any], params: Sequence[Tensor], vectors: Sequence[Tensor],
                         rng_state: RandomState, buffers: Sequence[Tensor]) -> list[Tensor]:
    """``H v`` of a step's loss by central differences (:func:`finite_difference_hvp`), re-running the step's
    forward/backward ``grad_closure`` (which leaves the gradients in ``p.grad``) at ``x ± h v`` *as the step ran it*.

    The two probes must differ only in the parameters: before each, the random generators are reset to
    ``rng_state``, captured before the step's own forward pass, so dropout draws the same masks (fresh masks differ
    by O(1) and the ``1/(2h)`` factor makes that a relative error above 10). Afterwards the ``buffers`` (BatchNorm
    running statistics and counters, which each forward pass in training mode advances), the gradients and the
    generators are put back as the step left them. Cost: two forward/backward passes, one copy of the buffers."""
    params = list(params)
    device = params[0].device if params else torch.device("cpu")
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in buffers]
    after_step = capture_rng_state(device)

    def gradients() -> list[Tensor]:
        for param in params:
            param.grad = None
        restore_rng_state(rng_state, device)
        grad_closure()
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]

    try:
        return finite_difference_hvp(gradients, params, vectors)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, saved_buffers):
                buffer.copy_(saved)
        for param, gradient in zip(params, saved_grads):
            param.grad = gradient
        restore_rng_state(after_step, device)


def make_preconditioner(name: str, params: Sequence[Tensor], beta: float = 0.999, eps: float = 1e-8,
                        alpha_min: float = 1e-4, generator: torch.Generator | None = None,
                        relative_floor: float = 1e-2) -> Preconditioner:
    """The preconditioner family ``name`` (one of :data:`SCALINGS`) for ``params``. All of ``beta``, ``eps``,
    ``alpha_min`` and ``relative_floor`` are validated whichever family uses them (``eps`` by adam/rmsprop;
    ``alpha_min`` and ``generator`` by oasis)."""
    if name not in SCALINGS:
        raise ValueError(f"unknown scaling {name!r}; valid choices: {', '.join(SCALINGS)}")
    _check_beta(beta)
    _check_positive(eps, "eps")
    _check_positive(alpha_min, "alpha_min")
    check_relative_floor(relative_floor)
    if name == "adam":
        return AdamScaling(params, beta, eps, relative_floor)
    if name == "rmsprop":
        return RMSPropScaling(params, beta, eps, relative_floor)
    return OASISScaling(params, beta, alpha_min, generator, relative_floor)
