"""The translation transformer, beam search and BLEU (single process, random tiny models).

.venv/bin/python -m pytest -q tests/test_transformer.py
"""

from __future__ import annotations

import pytest
import torch

from slowmo_train.beam_search import beam_search
from slowmo_train.config import ModelConfig
from slowmo_train.data.vocab import BOS, EOS, PAD
from slowmo_train.models import build_model
from slowmo_train.models.transformer import PRESETS, Transformer, scaled_shape, transformer
from slowmo_train.tasks.wmt16 import corpus_bleu

VOCAB = 40


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return transformer("transformer_small", VOCAB, width=kw.pop("width", 0.125), **kw).eval()


def random_src(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(EOS + 1, VOCAB, (rows, length), generator=g)
    for r in range(rows):  # ragged, right-padded, each ending with EOS
        n = length - r % 3
        src[r, n - 1] = EOS
        src[r, n:] = PAD
    return src


def built_shape(model: Transformer) -> tuple:
    """What the modules of ``model`` are: layers, width, heads, FFN width, dropouts."""
    layer = model.encoder[0]
    return (
        len(model.encoder),
        len(model.decoder),
        model.embed.embedding_dim,
        layer.attn.heads,
        layer.ffn[0].out_features,
        model.drop.p,
        layer.attn.dropout,
    )


def test_width_one_builds_the_papers_models():
    """The presets at width 1 build the papers' models (on the meta device: no memory is allocated)."""
    with torch.device("meta"):
        big = build_model(ModelConfig(arch="transformer_big", width=1.0), "wmt16", vocab_size=VOCAB)
        base = build_model(ModelConfig(arch="transformer_base", width=1.0), "wmt16", vocab_size=VOCAB)
    assert built_shape(big) == (6, 6, 1024, 16, 4096, 0.3, 0.1)  # fairseq transformer_vaswani_wmt_en_de_big
    assert built_shape(base) == (6, 6, 512, 8, 2048, 0.1, 0.0)  # Vaswani et al. (2017) base


def test_width_scales_d_model_to_a_multiple_of_heads_and_dropout_overrides():
    s = scaled_shape("transformer_big", width=0.1, dropout=0.05)
    assert s.d_model % s.heads == 0 and s.d_model == 96  # 102.4 -> 6 x 16
    assert s.ffn == round(4096 * 0.1) and s.dropout == 0.05 and s.layers_enc == 6
    assert scaled_shape("transformer_small", 0.001).d_model == PRESETS["transformer_small"].heads
    with pytest.raises(ValueError, match="model.arch='transformer_huge'"):
        scaled_shape("transformer_huge")


def test_build_model_table_and_tied_embeddings():
    model = build_model(ModelConfig(arch="transformer_base", width=0.125, dropout=0.0), "wmt16", vocab_size=VOCAB)
    assert isinstance(model, Transformer) and model.shape.dropout == 0.0
    # the only (vocab x d_model) matrix is the shared embedding: the output projection reuses it
    shaped = [n for n, p in model.named_parameters() if p.shape == (VOCAB, model.shape.d_model)]
    assert shaped == ["embed.weight"]
    logits = model(random_src(2, 5), torch.tensor([[BOS, 5, 6], [BOS, 7, 8]]))
    logits.sum().backward()
    assert logits.shape == (2, 3, VOCAB) and model.embed.weight.grad.abs().sum() > 0


def test_decoder_is_causal_and_source_padding_is_ignored():
    model = tiny()
    src = random_src(2, 6)
    prev = torch.tensor([[BOS, 5, 6, 7], [BOS, 8, 9, 10]])
    out = model(src, prev)
    changed = prev.clone()
    changed[:, 3] = 11
    assert torch.allclose(model(src, changed)[:, :3], out[:, :3], atol=1e-5)
    padded = torch.cat([src, torch.full((2, 4), PAD)], dim=1)
    assert torch.allclose(model(padded, prev), out, atol=1e-5)


def test_incremental_decoding_gives_the_full_decoders_logits():
    model = tiny()
    src = random_src(3, 7)
    prev = torch.randint(EOS + 1, VOCAB, (3, 6))
    prev[:, 0] = BOS
    memory, mask = model.encode(src)
    full = model.decode(prev, memory, mask)
    cache = model.new_cache()
    steps = [model.decode(prev[:, t : t + 1], memory, mask, cache, start=t) for t in range(prev.shape[1])]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("beam", [1, 4])
def test_beam_search_incremental_equals_full_re_decoding(beam):
    model = tiny(seed=3)
    src = random_src(5, 8, seed=4)
    cached = beam_search(model, src, beam=beam, lenpen=0.6, max_len_a=1.0, max_len_b=3)
    full = beam_search(model, src, beam=beam, lenpen=0.6, max_len_a=1.0, max_len_b=3, incremental=False)
    assert cached == full
    for row, hyp in zip(src, cached):
        n = int((row != PAD).sum())
        assert len(hyp) < n + 3 and all(t not in (PAD, BOS, EOS) for t in hyp)


def test_beam_one_is_greedy_decoding():
    model = tiny(seed=5)
    src = random_src(3, 6, seed=6)
    memory, mask = model.encode(src)
    greedy = []
    for r in range(src.shape[0]):
        tokens = [BOS]
        limit = int((src[r] != PAD).sum() * 1.0 + 4)
        while len(tokens) <= limit:
            lp = torch.log_softmax(model.decode(torch.tensor([tokens]), memory[r : r + 1], mask[r : r + 1])[0, -1], -1)
            lp[PAD] = lp[BOS] = float("-inf")
            if len(tokens) == limit:
                break
            nxt = int(lp.argmax())
            if nxt == EOS:
                break
            tokens.append(nxt)
        greedy.append(tokens[1:])
    assert beam_search(model, src, beam=1, lenpen=1.0, max_len_a=1.0, max_len_b=4) == greedy


@pytest.mark.slow
def test_beam_search_learns_to_copy():
    """A model trained (~1 minute) to copy its input decodes the copy exactly."""
    torch.manual_seed(0)
    model = transformer("transformer_small", 12, width=0.25, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        body = torch.randint(EOS + 1, 12, (32, 5), generator=g)
        src = torch.cat([body, torch.full((32, 1), EOS)], 1)
        prev = torch.cat([torch.full((32, 1), BOS), body], 1)
        loss = torch.nn.functional.cross_entropy(model(src, prev).reshape(-1, 12), src.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    body = torch.randint(EOS + 1, 12, (4, 5), generator=g)
    hyps = beam_search(model, torch.cat([body, torch.full((4, 1), EOS)], 1), beam=3)
    assert hyps == body.tolist()


def test_bleu_of_a_reference_against_itself_is_100():
    refs = ["Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.", "Zwei Hunde spielen im Schnee."]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert corpus_bleu(["Ein Hund.", "Katzen schlafen."], refs) < 10
