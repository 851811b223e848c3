"""What happens to gradients at an optimizer step: DDP's mean or the AdaCons combination.

Both run inside the optimizer closure, after backward and before gradient clipping and the update, once per
real optimizer step. Gradients travel as one flat fp32 buffer (dot products and norms in fp32 under bf16).

* :class:`GradientAverager`: ``g ← (1/n) Σ_i g_i``. One all-reduce of ``4P`` bytes (``P`` parameters) plus one
  float per parameter tensor: ``2(n−1)/n · 4(P + m)`` bytes sent per rank.
* :class:`AdaConsCombiner` (Choukroun, Azoulay, Kisilev, arXiv 2411.03742): ``ĝ = Σ_i α_i g_i / ‖g_i‖`` with
  weights ``α`` from the subspace coefficients ``a_i = ⟨ḡ, g_i⟩ / ‖g_i‖`` (see :mod:`lightning_dopt.aggregate`).
  Per step: an all-reduce of the gradients (for ``ḡ``), an all-reduce of ``n·T`` coefficients (``T = 1`` for
  global weights, the number of tensors for layer-wise weights), and an all-reduce of the weighted gradients:
  ``2 · 2(n−1)/n · 4P`` bytes plus the coefficients, about twice DDP. With ``stale_weights`` the previous step's
  weights scale the gradients before the only gradient all-reduce, and the coefficients for the next step are
  computed against its result: about DDP's cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_dopt.aggregate import SubspaceMomentum, consensus_weights, subspace_coefficients, worker_multipliers
from lightning_dopt.comm import Communicator


class _FlatGradients:
    """The gradients of a fixed list of parameters as one flat fp32 buffer, plus a per-tensor presence mask."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"gradient combination needs all parameters on one device per rank; found {devices}")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.sizes = [p.numel() for p in self.params]
        self.buffer = torch.zeros(sum(self.sizes), dtype=torch.float32, device=self.device)
        self.views = list(self.buffer.split(self.sizes))

    @torch.no_grad()
    def pack(self) -> list[bool]:
        """Copy gradients into the buffer (a missing gradient counts as zero); return which were present."""
        present = []
        for param, view in zip(self.params, self.views):
            if param.grad is None:
                view.zero_()
            else:
                view.copy_(param.grad.reshape(-1))
            present.append(param.grad is not None)
        return present

    @torch.no_grad()
    def unpack(self, keep: Sequence[bool]) -> None:
        """Write the buffer back into ``.grad`` of the parameters selected by ``keep``."""
        for param, view, wanted in zip(self.params, self.views, keep):
            if not wanted:
                continue
            if param.grad is None:
                param.grad = torch.empty_like(param)
            param.grad.copy_(view.view_as(param))


class GradientAverager:
    """DDP's gradient step for the parameters of one optimizer: ``g ← (1/n) Σ_i g_i``.

    The trailing ``m`` entries of the message count the ranks that produced each tensor's gradient, so a tensor
    no rank touched keeps ``grad = None`` (a gradient missing on some ranks counts as zero, as in DDP).
    """

    def __init__(self, params: Iterable[Tensor], comm: Communicator, purpose: str = "warmup") -> None:
        self.gradients = _FlatGradients(params)
        self.purpose = purpose
        count = len(self.gradients.params)
        self._message = torch.zeros(self.gradients.buffer.numel() + count, dtype=torch.float32,
                                    device=self.gradients.device)
        self.comm = comm

    @torch.no_grad()
    def average_(self, loss_scale: float | None = None) -> None:
        """``g ← mean_i g_i``. With a gradient scaler's ``loss_scale`` ``S_i`` (the gradients are ``S_i g_i``), every
        rank sends ``g_i`` and gets back ``S_i · mean_j g_j``: the mean of the unscaled gradients, scaled by its own
        ``S_i``, so that its scaler's unscale gives the mean whatever the other ranks' scales. A non-finite gradient
        anywhere makes the mean non-finite everywhere, so every rank's scaler skips the step."""
        present = self.gradients.pack()
        count = len(present)
        message = self._message[: self._message.numel() - count]
        message.copy_(self.gradients.buffer)
        if loss_scale is not None:
            message.div_(loss_scale)
        self._message[self._message.numel() - count:].copy_(torch.tensor(present, dtype=torch.float32))
        self.comm.all_reduce_([self._message], purpose=self.purpose, op="sum")
        self.gradients.buffer.copy_(message).div_(self.comm.world_size)
        if loss_scale is not None:
            self.gradients.buffer.mul_(loss_scale)
        self.gradients.unpack([flag > 0 for flag in self._message[self._message.numel() - count:].tolist()])


class AdaConsCombiner:
    """AdaCons combination of one flat fp32 vector per rank (a gradient, or a pseudo-gradient at a round).

    Args:
        comm: the communicator (all ranks call :meth:`combine_` together).
        segment_sizes: ``None`` for one global weight per rank, else the sizes of consecutive segments (one per
            parameter tensor) that get their own weights (layer-wise mode).
        momentum: β of the subspace momentum on sorted coefficients (0 disables it).
        guard: what to do when coefficients are negative or sum to ≤ eps (:data:`~lightning_dopt.aggregate.GUARDS`).
        preserve_scale: rescale the result (per segment) to the norm of the plain mean ``ḡ``; AdaCons' output has
            norm ≤ 1, which silently changes plain SGD's learning rate.
        stale_weights: use the previous call's weights (one vector all-reduce instead of two).
        purpose: the byte-accounting purpose of the messages.
    """

    def __init__(self, comm: Communicator, segment_sizes: Sequence[int] | None, momentum: float, guard: str,
                 preserve_scale: bool, stale_weights: bool, purpose: str, eps: float = 1e-8) -> None:
        if stale_weights and preserve_scale:
            raise ValueError("stale_weights=True cannot preserve the mean gradient's scale (the mean is never "
                             "computed in that mode); use preserve_scale=False with a scale-invariant optimizer "
                             "such as Adam, or stale_weights=False")
        self.comm = comm
        self.segment_sizes = list(segment_sizes) if segment_sizes is not None else None
        self.momentum = SubspaceMomentum(momentum)
        self.guard = guard
        self.preserve_scale = preserve_scale
        self.stale_weights = stale_weights
        self.purpose = purpose
        self.eps = eps
        self._weights: Tensor | None = None  # [n, T] weights of the previous call (stale mode)

    def _segments(self, vector: Tensor) -> list[Tensor]:
        return list(vector.split(self.segment_sizes)) if self.segment_sizes is not None else [vector]

    def _norms_and_dots(self, vector: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
        mine, reference = self._segments(vector), self._segments(direction)
        norms = torch.stack([torch.linalg.vector_norm(segment) for segment in mine])
        dots = torch.stack([torch.dot(segment, other) for segment, other in zip(mine, reference)])
        return norms, dots

    def _gathered_weights(self, norms: Tensor, dots: Tensor) -> Tensor:
        """All ranks' coefficients (one small all-reduce) → identical ``[n, T]`` weights on every rank."""
        table = torch.zeros(self.comm.world_size, norms.numel(), dtype=torch.float32, device=norms.device)
        table[self.comm.rank] = subspace_coefficients(dots, norms, self.eps)
        self.comm.all_reduce_([table], purpose=self.purpose, op="sum")
        return consensus_weights(self.momentum(table), guard=self.guard, eps=self.eps)

    def _scale_segments_(self, vector: Tensor, factors: Tensor) -> None:
        for segment, factor in zip(self._segments(vector), factors):
            segment.mul_(factor)

    @torch.no_grad()
    def combine_(self, vector: Tensor, skip_nonfinite: bool = False) -> None:
        """``vector`` (this rank's contribution, fp32, 1-D) ← the AdaCons combination of all ranks' vectors.

        With ``skip_nonfinite`` (gradients under a gradient scaler, which skips such steps) a non-finite vector on any
        rank is detected in the first all-reduce (one host sync): ``vector`` becomes that non-finite result on every
        rank, and neither the subspace momentum nor the stale weights take it in."""
        if self.stale_weights and self._weights is not None:
            norms = torch.stack([torch.linalg.vector_norm(s) for s in self._segments(vector)])
            local = vector.clone()
            self._scale_segments_(vector, worker_multipliers(self._weights[self.comm.rank], norms, self.eps))
            self.comm.all_reduce_([vector], purpose=self.purpose, op="sum")
            if skip_nonfinite and not bool(torch.isfinite(vector).all()):
                return
            self._weights = self._gathered_weights(*self._norms_and_dots(local, vector))
            return
        mean = vector.clone()
        self.comm.all_reduce_([mean], purpose=self.purpose, op="mean")
        if skip_nonfinite and not bool(torch.isfinite(mean).all()):
            vector.copy_(mean)
            return
        norms, dots = self._norms_and_dots(vector, mean)
        weights = self._gathered_weights(norms, dots)
        self._scale_segments_(vector, worker_multipliers(weights[self.comm.rank], norms, self.eps))
        self.comm.all_reduce_([vector], purpose=self.purpose, op="sum")
        if self.stale_weights:
            self._weights = weights
        if self.preserve_scale:
            target = torch.stack([torch.linalg.vector_norm(s) for s in self._segments(mean)])
            current = torch.stack([torch.linalg.vector_norm(s) for s in self._segments(vector)])
            self._scale_segments_(vector, torch.where(current > 0, target / current.clamp_min(self.eps),
                                                      torch.zeros_like(current)))

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": self.momentum.state_dict(), "weights": self._weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.momentum.load_state_dict(state["momentum"])
        self._weights = state["weights"]


class AdaConsGradients:
    """Replaces the gradients of one optimizer's parameters by their AdaCons combination over all ranks.

    A gradient missing on a rank counts as zero; one extra all-reduce of ``m`` flags (one per parameter tensor) makes
    every rank write back the same set of gradients, so a tensor touched on some ranks only stays in sync."""

    def __init__(self, params: Iterable[Tensor], comm: Communicator, momentum: float = 0.0, layerwise: bool = False,
                 guard: str = "shift", preserve_scale: bool = False, stale_weights: bool = False) -> None:
        self.gradients = _FlatGradients(params)
        self.combiner = AdaConsCombiner(comm, self.gradients.sizes if layerwise else None, momentum, guard,
                                        preserve_scale, stale_weights, purpose="aggregate")
        self.comm = comm

    @torch.no_grad()
    def combine_(self, loss_scale: float | None = None) -> None:
        """Replace the gradients by their combination. With a gradient scaler's ``loss_scale`` ``S`` the combination is
        of the unscaled gradients, scaled back by ``S`` (so the scaler's unscale yields it), and a non-finite gradient
        on any rank leaves non-finite gradients on every rank (every scaler skips the step) without reaching the
        subspace momentum."""
        present = torch.tensor(self.gradients.pack(), dtype=torch.float32, device=self.gradients.device)
        self.comm.all_reduce_([present], purpose="aggregate", op="max")
        buffer = self.gradients.buffer
        if loss_scale is not None:
            buffer.div_(loss_scale)
        self.combiner.combine_(buffer, skip_nonfinite=loss_scale is not None)
        if loss_scale is not None:
            buffer.mul_(loss_scale)
        self.gradients.unpack([flag > 0 for flag in present.tolist()])
