"""Encoder-decoder Transformer (pre-LayerNorm ``torch.nn`` layers) and the label-smoothed cross-entropy.

The model computes ``p(y_t | y_<t, x)`` for a source ``x`` and a target prefix; ids 0 (pad) are masked out of the
encoder's keys. Token embeddings are scaled by ``√d_model`` and added to sinusoidal (Vaswani et al., 2017) or
learned position embeddings. With ``tie_embeddings`` one matrix serves as source embedding, target embedding and
output projection (a joint vocabulary, as the recipe's tokenizer builds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.translation.tokenizer import PAD_ID

POSITIONS = ("sinusoidal", "learned")


@dataclass
class DecoderState:
    """What incremental decoding keeps between steps, per row (hypothesis): the projected self-attention keys and
    values of every decoder layer (B, heads, t, d/heads), the cross-attention keys and values of the encoder
    states, the attention mask over the source (B, 1, 1, S; True = attend) and the number of tokens fed so far."""

    self_keys: list[Tensor]
    self_values: list[Tensor]
    cross_keys: list[Tensor]
    cross_values: list[Tensor]
    source_mask: Tensor
    length: int = 0

    def select(self, rows: Tensor) -> DecoderState:
        """The state of rows ``rows`` (beam search keeps, duplicates and drops hypotheses)."""
        def pick(tensors: list[Tensor]) -> list[Tensor]:
            return [t.index_select(0, rows) for t in tensors]

        return DecoderState(pick(self.self_keys), pick(self.self_values), pick(self.cross_keys),
                            pick(self.cross_values), self.source_mask.index_select(0, rows), self.length)


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.view(x.size(0), x.size(1), heads, -1).transpose(1, 2)


def _keys_values(attention: nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, Tensor]:
    """Key and value projections of ``x`` (B, t, d) by ``attention``'s packed weights, split into heads."""
    d = attention.embed_dim
    keys, values = F.linear(x, attention.in_proj_weight[d:], attention.in_proj_bias[d:]).chunk(2, dim=-1)
    return _heads(keys, attention.num_heads), _heads(values, attention.num_heads)


def _attend(attention: nn.MultiheadAttention, x: Tensor, keys: Tensor, values: Tensor,
            mask: Tensor | None = None) -> Tensor:
    """``attention(x, keys, values)`` for already projected keys/values: what ``nn.MultiheadAttention`` computes."""
    d = attention.embed_dim
    query = _heads(F.linear(x, attention.in_proj_weight[:d], attention.in_proj_bias[:d]), attention.num_heads)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
    return attention.out_proj(out.transpose(1, 2).reshape(x.size(0), x.size(1), d))


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """``P[p, 2i] = sin(p / 10000^(2i/d))``, ``P[p, 2i+1] = cos(p / 10000^(2i/d))``, shape (length, dim)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class Seq2SeqTransformer(nn.Module):
    """Transformer encoder-decoder over a shared (joint) vocabulary.

    Args:
        vocab_size: number of token ids (pad is id 0).
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: as in ``nn.Transformer``.
        positions: ``"sinusoidal"`` (fixed) or ``"learned"`` position embeddings.
        max_positions: longest sequence the position table covers.
        tie_embeddings: share one matrix between source/target embeddings and the output projection.
    """

    def __init__(self, vocab_size: int, d_model: int = 256, nhead: int = 4, num_encoder_layers: int = 3,
                 num_decoder_layers: int = 3, dim_feedforward: int = 1024, dropout: float = 0.1,
                 positions: str = "sinusoidal", max_positions: int = 512, tie_embeddings: bool = True) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; valid choices: {', '.join(POSITIONS)}")
        if d_model % nhead or d_model % 2:
            raise ValueError(f"d_model ({d_model}) must be even and divisible by nhead ({nhead})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        self.d_model, self.max_positions = d_model, max_positions
        self.src_embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        self.tgt_embed = self.src_embed if tie_embeddings else nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        for embedding in (self.src_embed, self.tgt_embed):
            nn.init.normal_(embedding.weight, std=d_model ** -0.5)
            nn.init.zeros_(embedding.weight[PAD_ID])
        if positions == "sinusoidal":
            self.register_buffer("position_table", sinusoidal_positions(max_positions, d_model), persistent=False)
            self.learned_positions = None
        else:
            self.learned_positions = nn.Embedding(max_positions, d_model)
            nn.init.normal_(self.learned_positions.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        encoder_layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                                   norm_first=True)
        decoder_layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                                   norm_first=True)
        self.encoder = nn.TransformerEncoder(encoder_layer, num_encoder_layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(decoder_layer, num_decoder_layers, norm=nn.LayerNorm(d_model))
        self.output = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.output.weight = self.src_embed.weight

    def _embed(self, embedding: nn.Embedding, ids: Tensor) -> Tensor:
        length = ids.size(1)
        if length > self.max_positions:
            raise ValueError(f"sequence of {length} tokens is longer than max_positions={self.max_positions}")
        if self.learned_positions is None:
            position = self.position_table[:length]
        else:
            position = self.learned_positions.weight[:length]
        return self.dropout(embedding(ids) * math.sqrt(self.d_model) + position)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder states (B, S, d) and the source padding mask (B, S), True at pad."""
        padding = src.eq(PAD_ID)
        return self.encoder(self._embed(self.src_embed, src), src_key_padding_mask=padding), padding

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_padding: Tensor) -> Tensor:
        """Next-token logits (B, T, V) for every prefix of ``tgt_in`` (causal self-attention)."""
        length = tgt_in.size(1)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tgt_in.device), diagonal=1)
        hidden = self.decoder(self._embed(self.tgt_embed, tgt_in), memory, tgt_mask=causal, tgt_is_causal=True,
                              memory_key_padding_mask=memory_padding)
        return self.output(hidden)

    def start_decoding(self, memory: Tensor, memory_padding: Tensor) -> DecoderState:
        """Empty incremental-decoding state for encoder states ``memory`` (cross-attention keys/values computed
        once)."""
        cross = [_keys_values(layer.multihead_attn, memory) for layer in self.decoder.layers]
        empty = cross[0][0][:, :, :0]  # no cached tokens yet; dtype of the projections (bf16 under autocast)
        layers = len(self.decoder.layers)
        return DecoderState([empty] * layers, [empty] * layers, [k for k, _ in cross], [v for _, v in cross],
                            (~memory_padding)[:, None, None, :])

    def decode_step(self, state: DecoderState, tokens: Tensor) -> tuple[Tensor, DecoderState]:
        """Logits (B, V) of the token after ``tokens`` (B,), the last input of each row, and the updated state.

        The same computation as :meth:`decode`'s last position (pre-LN layers, eval mode), but each layer only
        projects the new token and attends over cached keys/values: O(t) per step instead of O(t²)."""
        if state.length + 1 > self.max_positions:
            raise ValueError(f"cannot decode beyond max_positions={self.max_positions} tokens")
        x = self.tgt_embed(tokens.unsqueeze(1)) * math.sqrt(self.d_model)
        if self.learned_positions is None:
            x = x + self.position_table[state.length]
        else:
            x = x + self.learned_positions.weight[state.length]
        self_keys, self_values = [], []
        for i, layer in enumerate(self.decoder.layers):
            h = layer.norm1(x)
            keys, values = _keys_values(layer.self_attn, h)
            self_keys.append(torch.cat([state.self_keys[i], keys], dim=2))
            self_values.append(torch.cat([state.self_values[i], values], dim=2))
            x = x + _attend(layer.self_attn, h, self_keys[i], self_values[i])
            x = x + _attend(layer.multihead_attn, layer.norm2(x), state.cross_keys[i], state.cross_values[i],
                            state.source_mask)
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        logits = self.output(self.decoder.norm(x)).squeeze(1)
        return logits, DecoderState(self_keys, self_values, state.cross_keys, state.cross_values, state.source_mask,
                                    state.length + 1)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, padding = self.encode(src)
        return self.decode(tgt_in, memory, padding)


def label_smoothed_nll(logits: Tensor, target: Tensor, epsilon: float,
                       ignore_index: int = PAD_ID) -> tuple[Tensor, Tensor, Tensor]:
    """Summed label-smoothed loss, summed NLL and the number of non-ignored target tokens.

    With ``q = (1 − ε)·onehot(y) + ε/V`` (the smoothing of ``F.cross_entropy(label_smoothing=ε)``), the loss of a
    token is ``−Σ_v q_v log p_v = (1 − ε)·(−log p_y) + ε·mean_v(−log p_v)``; ignored tokens contribute
    nothing."""
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1); got {epsilon!r}")
    log_probs = F.log_softmax(logits.float(), dim=-1).flatten(0, -2)
    target = target.reshape(-1)
    keep = target.ne(ignore_index)
    nll = -log_probs.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=-1)
    loss = (1.0 - epsilon) * nll + epsilon * uniform
    return loss[keep].sum(), nll[keep].sum(), keep.sum()


__all__ = ["POSITIONS", "DecoderState", "Seq2SeqTransformer", "label_smoothed_nll", "sinusoidal_positions"]
