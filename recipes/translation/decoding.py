"""Batched greedy decoding and beam search with a GNMT length penalty.

Both return ``(tokens, scores)``: ``tokens`` (B, L) holds each output ``y_1 … y_n eos`` padded with pad (no bos;
no eos if the length limit was hit first), ``scores`` (B,) its log-probability ``Σ_t log p(y_t | y_<t, x)``
(eos included). The encoder runs once per batch; the decoder runs one token per step with cached keys/values
(:meth:`~recipes.translation.model.Seq2SeqTransformer.decode_step`).

Beam search keeps ``beam_size`` live hypotheses per sentence. At each step it takes the ``2·beam_size`` best
one-token extensions over all live beams; an extension ending in eos among the first ``beam_size`` of them is
finished, the best ``beam_size`` others stay live. A sentence is done when it has ``beam_size`` finished
hypotheses (live ones are added at the length limit); the answer is the finished hypothesis with the highest
``score / lp(n)``, ``lp(n) = ((5 + n) / 6)^α`` (Wu et al., 2016; ``α = 0`` compares raw log-probabilities).
With ``beam_size = 1`` this is exactly greedy decoding.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from recipes.translation.model import DecoderState
from recipes.translation.tokenizer import BOS_ID, EOS_ID, PAD_ID


class EncoderDecoder(Protocol):
    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]: ...

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_padding: Tensor) -> Tensor: ...

    def start_decoding(self, memory: Tensor, memory_padding: Tensor) -> DecoderState: ...

    def decode_step(self, state: DecoderState, tokens: Tensor) -> tuple[Tensor, DecoderState]: ...


def max_output_length(src: Tensor, ratio: float = 1.5, extra: int = 10) -> int:
    """Length limit for a batch: ``ratio × longest source + extra`` tokens (eos included)."""
    return int(ratio * int(src.ne(PAD_ID).sum(1).max()) + extra)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length normalizer ``((5 + length) / 6)^alpha``."""
    return ((5.0 + length) / 6.0) ** alpha


def _step(model: EncoderDecoder, state: DecoderState, tokens: Tensor) -> tuple[Tensor, DecoderState]:
    logits, state = model.decode_step(state, tokens)
    return F.log_softmax(logits.float(), dim=-1), state


@torch.no_grad()
def greedy_decode(model: EncoderDecoder, src: Tensor, max_length: int) -> tuple[Tensor, Tensor]:
    """Pick ``argmax_v p(v | y_<t, x)`` at every step until every sentence emitted eos or ``max_length`` tokens."""
    state = model.start_decoding(*model.encode(src))
    batch = src.size(0)
    prefix = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=src.device)
    scores = torch.zeros(batch, device=src.device)
    done = torch.zeros(batch, dtype=torch.bool, device=src.device)
    for _ in range(max_length):
        log_probs, state = _step(model, state, prefix[:, -1])
        best, token = log_probs.max(dim=-1)
        scores = scores + best.masked_fill(done, 0.0)
        token = token.masked_fill(done, PAD_ID)
        prefix = torch.cat([prefix, token.unsqueeze(1)], dim=1)
        done = done | token.eq(EOS_ID)
        if bool(done.all()):
            break
    return prefix[:, 1:], scores


@torch.no_grad()
def beam_search(model: EncoderDecoder, src: Tensor, beam_size: int, max_length: int,
                alpha: float = 0.6) -> tuple[Tensor, Tensor]:
    """Beam search (see the module docstring); returns the chosen hypotheses and their raw log-probabilities."""
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1; got {beam_size!r}")
    batch, k = src.size(0), beam_size
    memory, padding = model.encode(src)
    state = model.start_decoding(memory.repeat_interleave(k, dim=0), padding.repeat_interleave(k, dim=0))
    prefix = torch.full((batch * k, 1), BOS_ID, dtype=torch.long, device=src.device)
    scores = torch.zeros(batch, k, device=src.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_length):
        log_probs, state = _step(model, state, prefix[:, -1])
        vocab = log_probs.size(-1)
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, k * vocab)
        top_scores, top_ids = candidates.topk(min(2 * k, k * vocab), dim=1)
        top_scores, top_beams, top_tokens = top_scores.tolist(), (top_ids // vocab).tolist(), (top_ids % vocab).tolist()
        rows, tokens, new_scores = [], [], []
        for b in range(batch):
            live: list[tuple[int, int, float]] = []
            for rank, (score, beam, token) in enumerate(zip(top_scores[b], top_beams[b], top_tokens[b])):
                if done[b] or len(live) == k or score == float("-inf"):
                    break
                if token == EOS_ID:
                    if rank < k:
                        hypothesis = prefix[b * k + beam, 1:].tolist() + [EOS_ID]
                        finished[b].append((score / length_penalty(step + 1, alpha), score, hypothesis))
                else:
                    live.append((b * k + beam, token, score))
            done[b] = done[b] or len(finished[b]) >= k
            if done[b] or not live:  # keep the row count fixed; these rows are never read again
                done[b] = True
                live = [(b * k, PAD_ID, float("-inf"))]
            live += [live[-1][:2] + (float("-inf"),)] * (k - len(live))
            for row, token, score in live:
                rows.append(row)
                tokens.append(token)
                new_scores.append(score)
        if all(done):
            break
        index = torch.tensor(rows, device=src.device)
        prefix = torch.cat([prefix[index], torch.tensor(tokens, device=src.device).unsqueeze(1)], dim=1)
        state = state.select(index)
        scores = torch.tensor(new_scores, device=src.device).reshape(batch, k)
    for b in range(batch):
        if not done[b]:  # length limit: the live hypotheses compete with the finished ones
            for beam in range(k):
                score = float(scores[b, beam])
                if score > float("-inf"):
                    finished[b].append((score / length_penalty(prefix.size(1) - 1, alpha), score,
                                        prefix[b * k + beam, 1:].tolist()))
    best = [max(hypotheses, key=lambda h: h[0]) for hypotheses in finished]
    width = max(len(h[2]) for h in best)
    out = torch.full((batch, width), PAD_ID, dtype=torch.long, device=src.device)
    for b, (_, _, hypothesis) in enumerate(best):
        out[b, : len(hypothesis)] = torch.tensor(hypothesis, dtype=torch.long)
    return out, torch.tensor([h[1] for h in best], device=src.device)


@torch.no_grad()
def sequence_log_prob(model: EncoderDecoder, src: Tensor, tokens: Tensor) -> Tensor:
    """``Σ_t log p(y_t | y_<t, x)`` of given outputs (B, L) (pad positions ignored), by teacher forcing."""
    memory, padding = model.encode(src)
    prefix = torch.cat([torch.full_like(tokens[:, :1], BOS_ID), tokens[:, :-1]], dim=1)
    log_probs = F.log_softmax(model.decode(prefix, memory, padding).float(), dim=-1)
    picked = log_probs.gather(2, tokens.clamp_min(0).unsqueeze(2)).squeeze(2)
    return picked.masked_fill(tokens.eq(PAD_ID), 0.0).sum(1)


__all__ = ["beam_search", "greedy_decode", "length_penalty", "max_output_length", "sequence_log_prob"]
