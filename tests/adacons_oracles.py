"""Test oracles for AdaCons: a single-process reference of the distributed procedure and its closed form.

The package combines gradients across ranks (:mod:`lightning_dopt.gradients`); these compute the same result from
all workers' gradients at once, so tests can compare the two.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from lightning_dopt.aggregate import (SubspaceMomentum, _check_eps, _check_guard, _float, consensus_weights,
                                      subspace_coefficients, worker_multipliers)


def adacons_reference(gradients: Tensor, momentum: SubspaceMomentum | None = None, guard: str = "shift",
                      layer_sizes: list[int] | None = None, preserve_scale: bool = False,
                      eps: float = 1e-8) -> Tensor:
    """Single-process AdaCons: all workers' flat gradients ``[N, D]`` → the aggregated ``[D]`` gradient.

    Exactly the distributed procedure: ``ḡ = (Σ_j g_j) / N``; per segment ``t`` (one segment of ``D`` values when
    ``layer_sizes`` is None, else consecutive segments of the given sizes) ``dots[i, t] = ⟨ḡ_t, g_{i,t}⟩`` and
    ``norms[i, t] = ‖g_{i,t}‖``; ``a = subspace_coefficients(dots, norms)``, ``a ← momentum(a)`` if given,
    ``α = consensus_weights(a, guard)``, ``w = worker_multipliers(α, norms)``; result ``Σ_i w[i, t] g_{i,t}``. The
    coefficient table is ``[N, T]`` in both modes (``T = 1`` globally), as the strategy gathers it, so a momentum's
    state matches the strategy's. ``preserve_scale`` multiplies each segment by ``‖ḡ_t‖ / ‖result_t‖`` (a zero
    segment stays zero). Computes in fp64 for fp64 input, else fp32.
    """
    _check_guard(guard)
    _check_eps(eps)
    g = _float(gradients, "gradients")
    if g.dim() != 2 or g.shape[0] == 0:
        raise ValueError(f"gradients must have shape [N, D] with N >= 1 workers, got {tuple(g.shape)}")
    n, d = g.shape
    if momentum is not None and not callable(momentum):
        raise ValueError(f"momentum must be a SubspaceMomentum (or None), got {type(momentum).__name__} {momentum!r}")
    if layer_sizes is None:
        sizes = [d]
    else:
        try:
            if isinstance(layer_sizes, (str, bytes)) or any(isinstance(size, bool) for size in layer_sizes):
                raise TypeError
            sizes = [operator.index(size) for size in layer_sizes]
        except TypeError:
            raise ValueError(f"layer_sizes must be a sequence of ints, got {layer_sizes!r}") from None
        if not sizes or any(size < 0 for size in sizes) or sum(sizes) != d:
            raise ValueError(f"layer_sizes must be non-negative sizes summing to D = {d}, got {sizes}")
    mean = g.sum(dim=0) / n
    segments, mean_segments = g.split(sizes, dim=1), mean.split(sizes)
    dots = torch.stack([seg @ seg_mean for seg, seg_mean in zip(segments, mean_segments)], dim=1)
    norms = torch.stack([torch.linalg.vector_norm(seg, dim=1) for seg in segments], dim=1)
    coefficients = subspace_coefficients(dots, norms, eps)
    if momentum is not None:
        coefficients = momentum(coefficients)
    multipliers = worker_multipliers(consensus_weights(coefficients, guard, eps), norms, eps)
    scaled = g * multipliers.repeat_interleave(torch.tensor(sizes, device=g.device), dim=1, output_size=d)
    result = scaled.sum(dim=0)
    if preserve_scale:
        parts = []
        for seg, seg_mean in zip(result.split(sizes), mean_segments):
            current, target = torch.linalg.vector_norm(seg), torch.linalg.vector_norm(seg_mean)
            factor = torch.where(current > 0, target / torch.where(current > 0, current, 1.0), 0.0)
            parts.append(seg * factor)
        result = torch.cat(parts)
    return result


def closed_form(gradients: Tensor) -> Tensor:
    """The no-momentum AdaCons output in closed form, ``Σ_i p_i / Σ_i ‖p_i‖`` with ``p_i = (⟨ḡ, g_i⟩/‖g_i‖²) g_i``.

    ``p_i`` is the orthogonal projection of ``ḡ`` onto ``span(g_i)``. Equals :func:`adacons_reference` (global
    weights, no momentum) in the limit ``eps → 0`` when every coefficient ``⟨ḡ, g_i⟩ ≥ 0`` and some is ``> 0``.
    ``gradients``: ``[N, D]``. A test reference, not a hot path: it raises ``ValueError`` (with a host sync) where the
    formula is 0/0, i.e. some ``g_i = 0`` or every coefficient is 0 (e.g. two opposite gradients).
    """
    g = _float(gradients, "gradients")
    if g.dim() != 2 or g.shape[0] == 0:
        raise ValueError(f"gradients must have shape [N, D] with N >= 1 workers, got {tuple(g.shape)}")
    mean = g.mean(dim=0)
    squared = (g * g).sum(dim=1)
    if not bool((squared > 0).all()):
        zero = (squared <= 0).nonzero().flatten().tolist()
        raise ValueError(f"closed_form needs every gradient non-zero (and its squared norm finite and > 0); "
                         f"workers {zero} have zero gradients")
    c = (g @ mean) / squared
    projections = c[:, None] * g
    total = (c.abs() * squared.sqrt()).sum()
    if not bool(total > 0):
        raise ValueError("closed_form is undefined (0/0) when every coefficient <mean, g_i> is 0, e.g. for opposite "
                         "gradients; adacons_reference falls back to uniform weights there")
    return projections.sum(dim=0) / total
