"""Character-level language models: a GPT shaped as nanoGPT's model.py, and an LSTM.

Both map token ids (B, T) to per-position scores (B, T, V) — logits, or log-probabilities
with log_softmax (criterion ce) — and are written once: a learning rule is put on them
by `convert` like on any model (feedalign/models/structure.py finds their blocks:
GPT's `Block`s, the LSTM's layers; the output layer is the head).

GPT (Radford et al. 2019 as nanoGPT writes it): token + learned position embeddings,
pre-norm blocks x + attn(ln_1(x)), x + mlp(ln_2(x)) with causal self-attention and a
4×-wide GELU MLP, a final LayerNorm, and a head tied to the token embedding. bias=False
drops the biases of every Linear and LayerNorm. Initialised as nanoGPT: N(0, 0.02),
the residual projections N(0, 0.02/√(2L)), biases zero.

LSTM: token embedding, L single-layer nn.LSTMs (one block each, so a direct rule taps
every layer), dropout between them, a Linear head. PyTorch's default initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, bias: bool, dropout: float) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"gpt: the width {d} (-num_hidden) must be a multiple of -heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)  # q, k, v of every head at once
        self.c_proj = nn.Linear(d, d, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d)
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v)
        )  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    def __init__(self, d: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.c_proj = nn.Linear(4 * d, d, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One transformer layer: what taps="macro" cuts at its input, taps="micro" also after attn."""

    def __init__(self, d: int, heads: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.attn = CausalSelfAttention(d, heads, bias, dropout)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.mlp = MLP(d, bias, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, layers: int, d: int, heads: int, bias: bool, dropout: float,
                 log_softmax: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.context, self.log_softmax = context, log_softmax
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(d, heads, bias, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one Parameter, as nanoGPT

    def init_weights(self, gen: torch.Generator | None) -> None:
        """nanoGPT's initialisation, drawn from `gen` (build_model's seeded generator)."""
        std = 0.02
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    scale = 1 / math.sqrt(2 * len(self.h)) if name.endswith("c_proj") else 1.0
                    m.weight.normal_(0.0, std * scale, generator=gen)
                if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
                    m.bias.zero_()

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) int64 -> (B, T, V)
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"gpt: a sequence of {t} tokens is longer than the context of {self.context}")
        x = self.drop(self.wte(ids) + self.wpe(torch.arange(t, device=ids.device)))  # (B, T, d)
        for block in self.h:
            x = block(x)
        y = self.lm_head(self.ln_f(x))
        return F.log_softmax(y, dim=-1) if self.log_softmax else y


class LSTMLM(nn.Module):
    def __init__(self, vocab: int, context: int, layers: int, d: int, bias: bool, dropout: float,
                 log_softmax: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.context, self.log_softmax = context, log_softmax
        self.wte = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.LSTM(d, d, batch_first=True, bias=bias) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, vocab, bias=bias)

    def init_weights(self, gen: torch.Generator | None) -> None:
        """PyTorch's defaults, drawn from `gen`: embedding N(0, 1); LSTM weights and biases
        U(±1/√d); head U(±1/√d), its bias likewise."""
        with torch.no_grad():
            self.wte.weight.normal_(0.0, 1.0, generator=gen)
            bound = 1 / math.sqrt(self.wte.embedding_dim)
            for p in [*self.layers.parameters(), *self.head.parameters()]:
                p.uniform_(-bound, bound, generator=gen)

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) int64 -> (B, T, V)
        x = self.drop(self.wte(ids))  # (B, T, d)
        for lstm in self.layers:
            x = self.drop(lstm(x)[0])
        y = self.head(x)
        return F.log_softmax(y, dim=-1) if self.log_softmax else y


def _context(input_shape) -> int:
    if len(input_shape) != 1:
        raise ValueError(f"a language model takes token windows (T,), got input shape {tuple(input_shape)}")
    return int(input_shape[0])


def gpt(input_shape, n_classes, *, num_layers=4, num_hidden=128, heads=4, bias=True, dropout_rate=0.0,
        log_softmax=False, **_unused) -> GPT:  # fmt: skip
    """input_shape (context,), n_classes = vocabulary size; num_layers × num_hidden, heads heads."""
    return GPT(
        n_classes, _context(input_shape), num_layers, num_hidden, heads, bias, dropout_rate, log_softmax
    )


def lstm(input_shape, n_classes, *, num_layers=2, num_hidden=128, bias=True, dropout_rate=0.0,
         log_softmax=False, **_unused) -> LSTMLM:  # fmt: skip
    """input_shape (context,), n_classes = vocabulary size; num_layers LSTM layers of num_hidden units."""
    return LSTMLM(n_classes, _context(input_shape), num_layers, num_hidden, bias, dropout_rate, log_softmax)
