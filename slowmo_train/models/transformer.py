"""Encoder-decoder transformer for translation (Vaswani et al., NeurIPS 2017), on torch.nn.

The SlowMo paper's WMT16 En-De job (Wang et al., ICLR 2020, Sec. 5) trains fairseq's
``transformer_vaswani_wmt_en_de_big`` (Ott et al., 2018): 6 + 6 layers, d_model 1024, 16 heads, FFN
4096, dropout 0.3. fairseq cannot be installed next to Hydra 1.3, so this module writes the same
shape on ``torch.nn`` with ``F.scaled_dot_product_attention`` (no hand-written attention kernel).

Choices (documented because they differ between implementations):

- **Pre-norm** residual blocks (LayerNorm before each sub-layer, a final LayerNorm on the encoder and
  decoder outputs; Wang et al., ACL 2019 "Learning Deep Transformer Models"). Pre-norm trains stably
  with the short warm-ups a CPU run needs; fairseq's big preset is post-norm.
- **One shared vocabulary** for source and target (a joint sentencepiece model), and one embedding
  matrix shared by the encoder input, the decoder input and the output projection (Press & Wolf, 2017).
  Embeddings are scaled by sqrt(d_model).
- **Sinusoidal positions** (Vaswani et al., 2017), computed on the fly, so any length decodes.
- **Incremental decoding**: ``decode(..., cache=...)`` feeds one target token per call and keeps each
  decoder layer's self-attention keys/values (and the projected encoder keys/values) in ``cache``,
  so beam search does not recompute the prefix (see ``slowmo_train/beam_search.py``).

    python -c "from slowmo_train.models.transformer import transformer; print(transformer('transformer_small', 8000))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from slowmo_train.data.vocab import PAD


@dataclass(frozen=True)
class TransformerShape:
    layers_enc: int
    layers_dec: int
    d_model: int
    heads: int
    ffn: int
    dropout: float
    #: dropout on attention weights and after the FFN activation (fairseq's big preset: 0.1 / 0)
    attention_dropout: float = 0.0


PRESETS: dict[str, TransformerShape] = {
    # the SlowMo paper's model (fairseq transformer_vaswani_wmt_en_de_big, Ott et al. 2018)
    "transformer_big": TransformerShape(6, 6, 1024, 16, 4096, 0.3, 0.1),
    # Vaswani et al. (2017) base
    "transformer_base": TransformerShape(6, 6, 512, 8, 2048, 0.1),
    # trains on a CPU: Multi30k in minutes per epoch with one thread per worker
    "transformer_small": TransformerShape(3, 3, 256, 4, 1024, 0.1),
}


def scaled_shape(arch: str, width: float = 1.0, dropout: float | None = None) -> TransformerShape:
    """The ``arch`` preset with d_model and FFN scaled by ``width`` (d_model rounded to a multiple of
    the heads) and, if given, its dropout replaced."""
    if arch not in PRESETS:
        raise ValueError(f"model.arch={arch!r} is not a transformer preset; choose one of {', '.join(PRESETS)}")
    s = PRESETS[arch]
    d_model = max(s.heads, round(s.d_model * width / s.heads) * s.heads)
    ffn = max(1, round(s.ffn * width))
    return replace(s, d_model=d_model, ffn=ffn, dropout=s.dropout if dropout is None else dropout)


def sinusoidal_positions(start: int, length: int, dim: int, device: torch.device) -> torch.Tensor:
    """(length, dim) sinusoidal encodings of positions start..start+length-1 (sin | cos halves)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None] * freq[None, :]
    out = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        out = F.pad(out, (0, 1))
    return out


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``, with an optional cache.

    ``cache`` (a dict owned by the caller) holds this layer's keys/values: for self-attention the
    new keys/values are appended to it; for cross-attention (``static_kv``) they are computed once
    from the encoder output and reused at every later step."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D/H)
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: dict | None = None,
        static_kv: bool = False,
    ) -> torch.Tensor:
        q = self._split(self.q(x))
        if cache is not None and static_kv and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = (self._split(t) for t in self.kv(memory).chunk(2, dim=-1))
            if cache is not None:
                if not static_kv and "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        # with a cache, the one new query may attend to every cached key: no causal mask needed
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal and cache is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        b, h, t, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, h * dh))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, ffn: int, dropout: float):
        super().__init__(nn.Linear(d_model, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d_model))


class EncoderLayer(nn.Module):
    def __init__(self, s: TransformerShape):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(s.d_model), nn.LayerNorm(s.d_model)
        self.attn = Attention(s.d_model, s.heads, s.attention_dropout)
        self.ffn = FeedForward(s.d_model, s.ffn, s.attention_dropout)
        self.drop = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, s: TransformerShape):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(s.d_model) for _ in range(3))
        self.self_attn = Attention(s.d_model, s.heads, s.attention_dropout)
        self.cross_attn = Attention(s.d_model, s.heads, s.attention_dropout)
        self.ffn = FeedForward(s.d_model, s.ffn, s.attention_dropout)
        self.drop = nn.Dropout(s.dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, cache: dict | None = None
    ) -> torch.Tensor:
        h = self.norm1(x)
        self_cache = None if cache is None else cache.setdefault("self", {})
        x = x + self.drop(self.self_attn(h, h, causal=True, cache=self_cache))
        x = x + self.drop(
            self.cross_attn(
                self.norm2(x),
                memory,
                memory_mask,
                cache=None if cache is None else cache.setdefault("cross", {}),
                static_kv=True,
            )
        )
        return x + self.drop(self.ffn(self.norm3(x)))


class Transformer(nn.Module):
    """``forward(src, prev)`` -> logits (B, T, vocab); padding id 0, right-padded batches."""

    def __init__(self, shape: TransformerShape, vocab_size: int):
        super().__init__()
        self.shape, self.vocab_size = shape, vocab_size
        self.embed = nn.Embedding(vocab_size, shape.d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, mean=0.0, std=shape.d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.encoder = nn.ModuleList(EncoderLayer(shape) for _ in range(shape.layers_enc))
        self.decoder = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.layers_dec))
        self.enc_norm, self.dec_norm = nn.LayerNorm(shape.d_model), nn.LayerNorm(shape.d_model)
        self.drop = nn.Dropout(shape.dropout)
        for name, p in self.named_parameters():
            if p.dim() == 2 and not name.startswith("embed"):
                nn.init.xavier_uniform_(p)

    def _embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.embed(tokens) * math.sqrt(self.shape.d_model)
        positions = sinusoidal_positions(start, tokens.shape[1], self.shape.d_model, tokens.device)
        return self.drop(x + positions.to(x.dtype))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, S, D) and the attention mask (B, 1, 1, S), True where a key is a token."""
        mask = (src != PAD)[:, None, None, :]
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def decode(
        self,
        prev: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: list[dict] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for the target prefix ``prev``. With ``cache`` (one dict per layer,
        empty at the first call) ``prev`` holds only the new tokens, at positions start, start+1..."""
        x = self._embed(prev, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory, memory_mask, None if cache is None else cache[i])
        return F.linear(self.dec_norm(x), self.embed.weight)

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.decoder]

    @staticmethod
    def reorder_cache(cache: list[dict], order: torch.Tensor) -> None:
        """Keep rows ``order`` of every cached tensor (beam search: surviving beams, active sentences)."""
        for layer in cache:
            for part in layer.values():
                for key in part:
                    part[key] = part[key].index_select(0, order)

    def forward(self, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        memory, mask = self.encode(src)
        return self.decode(prev, memory, mask)


def transformer(arch: str, vocab_size: int, width: float = 1.0, dropout: float | None = None) -> Transformer:
    return Transformer(scaled_shape(arch, width, dropout), vocab_size)
