"""nn.MultiheadAttention trained by feedback alignment.

The four projections are fa linear maps (rules/fa.py): the error reaching the
attention output goes back through B_out in place of out_proj.weight, and the
errors of q, k and v go to query/key/value through their B's in place of the
packed in_proj_weight (or q/k/v_proj_weight when kdim/vdim differ from
embed_dim). The parameter-free part — scaled dot products, masks, softmax,
dropout — keeps its true derivative. With every B equal to its W this is
back-propagation.

The training forward is written here (N = batch, L = target length, S = source
length, E = embed_dim, H = heads, d = E/H) with torch's semantics: batch_first,
unbatched inputs, key_padding_mask and attn_mask (bool or float, 2-d or 3-d),
need_weights / average_attn_weights, add_bias_kv, add_zero_attn, is_causal.
Without gradients (inference, also torch's Transformer fast path) or inside
`feedalign.backprop` it is torch's own forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feedalign.rules.fa import FALayer, Slot, fa_linear
from feedalign.rules.feedback import feedback_for, init_bound


def _xavier_bound(weight: Tensor) -> float:
    """xavier_uniform's bound for a (fan_out, fan_in) weight: sqrt(6 / (fan_in + fan_out))."""
    return math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Bool masks (True = not allowed) become additive -inf masks; float masks stay."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class FAMultiheadAttention(FALayer, nn.MultiheadAttention):
    """nn.MultiheadAttention whose projections learn by fa (B's: `in_proj_weight_feedback`
    or `{q,k,v}_proj_weight_feedback`, and `out_proj.feedback`)."""

    def fa_slots(self) -> list[Slot]:
        names = ["in_proj_weight"] if self._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight",
                                                                      "v_proj_weight"]  # fmt: skip
        slots: list[Slot] = [(self, n, _xavier_bound(getattr(self, n))) for n in names]
        return slots + [(self.out_proj, "weight", init_bound(self.out_proj.weight))]  # Linear's default

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (sequence-first) through the fa input projections."""
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if not self._qkv_same_embed_dim:
            names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            return tuple(fa_linear(x, getattr(self, n), b, feedback_for(self, n, used=x.requires_grad))
                         for x, n, b in zip((query, key, value), names, biases))  # fmt: skip
        # used=False where no input has a gradient (attention on raw embeddings that are
        # not trained): the backward never reads B, so the sign rules skip building it
        used = any(x.requires_grad for x in (query, key, value))
        weight, fb = self.in_proj_weight, feedback_for(self, "in_proj_weight", used=used)
        if query is key and key is value:  # self-attention: one (3E, E) product
            return fa_linear(query, weight, self.in_proj_bias, fb).chunk(3, dim=-1)
        # an unused stand-in may have any shape (usf's is its 0-dim scale); a B of W's
        # shape is split, also when unused, since kp's B takes a gradient per block
        fbs = fb.chunk(3) if fb.shape == weight.shape else (fb,) * 3
        inputs = zip((query, key, value), weight.chunk(3), biases, fbs)
        return tuple(fa_linear(x, w, b, B) for x, w, b, B in inputs)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        if not self._fa_on():
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)  # fmt: skip
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (L, 1, E); key_padding_mask (S,) -> (1, S)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # work sequence-first, as torch does
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal, need_weights)
        if need_weights:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        if not batched:
            return out.squeeze(1), weights
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal,
                need_weights) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """Sequence-first attention: out (L, N, E) and weights (N, H, L, S) or None."""
        L, N, E = query.shape
        H, d = self.num_heads, self.head_dim
        q, k, v = self._in_projection(query, key, value)
        mask = _float_mask(attn_mask, q.dtype)  # (L, S) or (N·H, L, S)
        if mask is None and is_causal:  # torch wants the mask given; build it when it is not
            mask = torch.full((L, key.shape[0]), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        pad = _float_mask(key_padding_mask, q.dtype)  # (N, S)
        if self.bias_k is not None:  # one learned key/value appended to the source
            k = torch.cat([k, self.bias_k.expand(1, N, E)])
            v = torch.cat([v, self.bias_v.expand(1, N, E)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        q = q.reshape(L, N * H, d).transpose(0, 1)  # (N·H, L, d), row n·H + h
        k = k.reshape(k.shape[0], N * H, d).transpose(0, 1)  # (N·H, S, d)
        v = v.reshape(v.shape[0], N * H, d).transpose(0, 1)
        if self.add_zero_attn:  # one zero key/value appended after the projections
            k = torch.cat([k, k.new_zeros(N * H, 1, d)], dim=1)
            v = torch.cat([v, v.new_zeros(N * H, 1, d)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        S = k.shape[1]
        bias = None if mask is None else (mask if mask.dim() == 3 else mask.unsqueeze(0))  # (N·H|1, L, S)
        if pad is not None:
            pad = pad.view(N, 1, 1, S).expand(N, H, 1, S).reshape(N * H, 1, S)
            bias = pad if bias is None else bias + pad
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(1, 2) / math.sqrt(d)  # (N·H, L, S)
            weights = torch.softmax(scores if bias is None else scores + bias, dim=-1)
            weights = F.dropout(weights, dropout) if dropout > 0 else weights
            out = weights @ v  # (N·H, L, d)
            weights = weights.view(N, H, L, S)
        else:  # the same attention by torch's fused kernel (its backward is the true derivative)
            if bias is not None:  # (N·H|1, L|1, S) -> (N|1, H|1, L|1, S)
                bias = bias.view(*((N, H) if bias.shape[0] == N * H else (1, 1)), *bias.shape[1:])
            q4, k4, v4 = q.view(N, H, L, d), k.view(N, H, S, d), v.view(N, H, S, d)
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias, dropout_p=dropout)
            out = out.view(N * H, L, d)
        out = out.transpose(0, 1).reshape(L, N, E)  # (L, N·H, d) -> (L, N, E)
        out = fa_linear(out, self.out_proj.weight, self.out_proj.bias, feedback_for(self.out_proj))
        return out, weights
