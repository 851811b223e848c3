"""Translation recipe, model side: label-smoothed loss, LR schedule, model shapes, greedy vs beam decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recipes.translation.decoding import beam_search, greedy_decode, length_penalty, sequence_log_prob
from recipes.translation.model import Seq2SeqTransformer, label_smoothed_nll, sinusoidal_positions
from recipes.translation.module import TranslationModule, lr_factor
from recipes.translation.tokenizer import EOS_ID, PAD_ID


# ------------------------------------------------------------------------------------------------- loss
def test_label_smoothed_loss_matches_torch_and_ignores_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    target = torch.randint(1, 11, (3, 5))
    target[0, 3:] = PAD_ID
    target[2, 1:] = PAD_ID
    for epsilon in (0.0, 0.1, 0.3):
        loss, nll, tokens = label_smoothed_nll(logits, target, epsilon)
        reference = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), ignore_index=PAD_ID,
                                    label_smoothing=epsilon, reduction="sum")
        assert tokens.item() == int(target.ne(PAD_ID).sum()) == 9
        assert torch.allclose(loss, reference, atol=1e-5)
        assert torch.allclose(nll, F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1),
                                                   ignore_index=PAD_ID, reduction="sum"), atol=1e-5)
    # uniform logits: every token costs log V whatever the smoothing
    loss, _, tokens = label_smoothed_nll(torch.zeros(1, 4, 7), torch.tensor([[1, 2, 3, 4]]), 0.2)
    assert torch.allclose(loss / tokens, torch.tensor(math.log(7.0)))
    # a confident correct prediction costs more with smoothing than without
    sharp = torch.full((1, 1, 7), -10.0)
    sharp[0, 0, 3] = 10.0
    target = torch.tensor([[3]])
    assert label_smoothed_nll(sharp, target, 0.1)[0] > label_smoothed_nll(sharp, target, 0.0)[0]
    with pytest.raises(ValueError, match=r"label smoothing must be in \[0, 1\)"):
        label_smoothed_nll(logits, target, 1.0)


# --------------------------------------------------------------------------------------------- schedule
def test_lr_factor_schedules() -> None:
    assert [lr_factor(s, "inverse_sqrt", 4, 0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(15, "inverse_sqrt", 4, 0) == pytest.approx(math.sqrt(4 / 16))
    assert lr_factor(3, "linear", 4, 10) == 1.0 and lr_factor(10, "linear", 4, 10) == 0.0
    assert lr_factor(6, "linear", 4, 10) == pytest.approx(4 / 7)
    assert lr_factor(0, "constant", 0, 0) == 1.0 and lr_factor(100, "constant", 10, 0) == 1.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"optimizer": "adam"}, "unknown optimizer 'adam'; valid choices: adamw, sgd"),
    ({"schedule": "cosine"}, "unknown schedule 'cosine'; valid choices: inverse_sqrt, linear, constant"),
    ({"label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\)"),
    ({"test_beam_size": 0}, "test_beam_size must be an integer >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"positions": "rotary"}, "unknown positions 'rotary'; valid choices: sinusoidal, learned"),
    ({"d_model": 30, "nhead": 4}, r"d_model \(30\) must be even and divisible by nhead \(4\)"),
])
def test_module_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TranslationModule(vocab_size=50, d_model=kwargs.pop("d_model", 16), **kwargs)


# ------------------------------------------------------------------------------------------------ model
def test_sinusoidal_positions_formula() -> None:
    table = sinusoidal_positions(6, 8)
    assert table[0, 0::2].abs().max() == 0 and torch.all(table[0, 1::2] == 1)
    assert torch.isclose(table[5, 2], torch.tensor(math.sin(5 / 10000 ** (2 / 8))))
    assert torch.isclose(table[5, 3], torch.tensor(math.cos(5 / 10000 ** (2 / 8))))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_model_shapes_causality_and_tying(tie: bool, positions: str) -> None:
    torch.manual_seed(0)
    model = Seq2SeqTransformer(30, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                               dim_feedforward=32, dropout=0.0, positions=positions, tie_embeddings=tie).eval()
    src = torch.tensor([[5, 6, 7, EOS_ID], [8, 9, EOS_ID, PAD_ID]])
    tgt = torch.tensor([[2, 10, 11, 12], [2, 13, 14, 15]])
    logits = model(src, tgt)
    assert logits.shape == (2, 4, 30)
    changed = tgt.clone()
    changed[:, 3] = 20  # a later target token must not change earlier predictions
    assert torch.allclose(model(src, changed)[:, :3], logits[:, :3], atol=1e-5)
    padded = torch.cat([src, torch.full((2, 3), PAD_ID)], dim=1)  # extra source padding changes nothing
    assert torch.allclose(model(padded, tgt), logits, atol=1e-5)
    assert (model.output.weight is model.src_embed.weight) == tie
    assert (model.tgt_embed is model.src_embed) == tie


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_cached_decode_steps_equal_full_decoding(positions: str) -> None:
    torch.manual_seed(1)
    model = Seq2SeqTransformer(30, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
                               dim_feedforward=32, dropout=0.1, positions=positions).eval()
    src = torch.tensor([[5, 6, 7, EOS_ID], [8, 9, EOS_ID, PAD_ID]])
    tgt = torch.tensor([[2, 10, 11, 12, 13], [2, 13, 14, 15, 16]])
    memory, padding = model.encode(src)
    full = model.decode(tgt, memory, padding)
    state = model.start_decoding(memory, padding)
    for t in range(tgt.size(1)):
        logits, state = model.decode_step(state, tgt[:, t])
        assert torch.allclose(logits, full[:, t], atol=1e-5)
    reordered = state.select(torch.tensor([1, 1, 0]))
    assert reordered.self_keys[0].shape[0] == 3 and torch.equal(reordered.self_keys[1][2], state.self_keys[1][0])


# --------------------------------------------------------------------------------------------- decoding
@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models on a busy 2-core machine run far faster on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _decoding_model(seed: int = 0, eos_bias: float = 3.0) -> tuple[Seq2SeqTransformer, torch.Tensor]:
    """A random model whose final-norm bias points at eos, so that hypotheses end at different lengths."""
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(12, d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
                               dim_feedforward=64, dropout=0.0).eval()
    with torch.no_grad():
        eos = model.output.weight[EOS_ID]
        model.decoder.norm.bias.copy_(eos_bias * eos / eos.norm())
    src = torch.randint(4, 12, (16, 6))
    src[:, -1] = EOS_ID
    src[::3, 4:] = PAD_ID
    return model, src


def test_beam_of_one_equals_greedy() -> None:
    model, src = _decoding_model()
    greedy_tokens, greedy_scores = greedy_decode(model, src, max_length=12)
    beam_tokens, beam_scores = beam_search(model, src, beam_size=1, max_length=12, alpha=0.6)
    assert torch.equal(greedy_tokens, beam_tokens)
    assert torch.allclose(greedy_scores, beam_scores, atol=1e-5)
    lengths = {int(row.ne(PAD_ID).sum()) for row in greedy_tokens}
    assert len(lengths) > 1  # the test covers sentences that end at different steps


@pytest.mark.parametrize(("seed", "eos_bias"), [(0, 3.0), (1, 2.0)])
def test_beam_finds_a_sequence_at_least_as_likely_as_greedy(seed: int, eos_bias: float) -> None:
    model, src = _decoding_model(seed, eos_bias)
    greedy_tokens, greedy_scores = greedy_decode(model, src, max_length=12)
    beam_tokens, beam_scores = beam_search(model, src, beam_size=4, max_length=12, alpha=0.0)
    assert torch.all(beam_scores >= greedy_scores - 1e-5)  # not guaranteed in general; holds on these models
    assert torch.any(beam_scores > greedy_scores + 1e-3)  # and strictly better somewhere
    # the reported scores are the log-probabilities of the returned sequences
    assert torch.allclose(sequence_log_prob(model, src, beam_tokens), beam_scores, atol=1e-4)
    assert torch.allclose(sequence_log_prob(model, src, greedy_tokens), greedy_scores, atol=1e-4)


def test_decoding_runs_under_bf16_autocast() -> None:
    model, src = _decoding_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, scores = beam_search(model, src, beam_size=2, max_length=6)
    assert tokens.shape[0] == src.shape[0] and torch.isfinite(scores).all()


def test_length_penalty_prefers_longer_hypotheses() -> None:
    assert length_penalty(7, 0.0) == 1.0 and length_penalty(1, 0.6) == 1.0
    assert -6.0 / length_penalty(10, 1.0) > -4.0 / length_penalty(3, 1.0)  # −2.4 vs −3.0
    with pytest.raises(ValueError, match="beam_size must be an integer >= 1"):
        beam_search(*_decoding_model(), beam_size=0, max_length=5)
