"""The local rules: pred, sim, predsim (Nøkland & Eidnes 2019) and their backprop-free
"-bio" variants. Every hidden block learns from a loss of its own; no error crosses a
block boundary, and the output layer learns from the global loss.

The taps and the output mark of the direct rules (rules/dfa.py, placed by
models/blocks.py) carry them: a tap cuts the graph after each block and records its
output h (N, *P, *F: batch, positions, features); `LocalOutput`, right after the output
layer, reads the labels from the output error at backward time (the same exact reading
drtp makes, `target_signal`), runs each block's local loss on its recorded h, and hands
dL_i/dh back to the block. So the training loop stays one loss on the model's output,
one backward, one optimizer over `model.parameters()`, the heads' parameters included.

A head, per block (M rows: the N·|P| positions whose label is not masked; one-hot Y (M, C)):

    pred      ℓ = CE(D·pool(h) + d, y)                      D zero at the start
    sim       ℓ = mean over M×M of (S(T(h)) − S(Y))²        T: Linear(F, F), or a 3×3
                                                            Conv(C, C) on (C, H, W) maps
    predsim   ℓ = (1 − β)·pred + β·sim                      β = 0.99 (predsim-bio: 0.01)

    S(x) = the cosine similarity of the rows of x after each row is centred (x − mean over
    its features); a (C, H, W) map with C > 3 and H > 1 is first reduced to its per-channel
    standard deviation over H×W (the reference's `similarity_matrix`).

The "-bio" variants use no transposed weight anywhere: the labels become a fixed random
projection P (128 × C) of the one-hot, Y_P = Y Pᵀ; sim compares S(pool(h)) with S(Y_P),
with no learned T; pred's decoder (128 outputs) learns by feedback alignment — its weight
gets the true gradient, its input error goes through a fixed random B — against the
binary targets [Y_P > 0] with a sigmoid cross-entropy. pool: for (C, H, W) maps, an
average pooling that brings C·H'·W' down to at most 4,096 inputs (the reference's rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feedalign.rules.dfa import Output, target_signal
from feedalign.rules.fa import fa_linear
from feedalign.rules.feedback import Rule, uniform

DIM_IN_DECODER = 4096  # pred's decoder reads at most this many features of a (C, H, W) map
TARGET_PROJECTION = 128  # -bio: rows of the fixed projection of the one-hot labels
BETA = 0.99  # predsim's weight on sim (train.py's --beta default)
BETA_BIO = 0.01  # predsim-bio's: the reference runs every --bio predsim with --beta 0.01 (run_experiments.sh)


def _weights(beta: float) -> str:
    return f"{1 - beta:g}·pred + {beta:g}·sim"


class LocalRule(Rule):
    """A table entry of the local kind: which loss each block learns from, and whether
    it is the backprop-free variant."""

    def __init__(self, name: str, loss: str, summary: str, *, bio: bool = False, beta: float = BETA) -> None:
        super().__init__(name, "local", summary, signal="local")
        self.loss, self.bio, self.beta = loss, bio, beta


LOCAL_RULES: dict[str, LocalRule] = {
    r.name: r
    for r in (
        LocalRule("pred", "pred", "each block learns from a linear classifier of its own output (local "
                  "cross-entropy); no error crosses blocks (Nøkland & Eidnes 2019)"),
        LocalRule("sim", "sim", "each block matches the similarity matrix of its output to the labels' "
                  "(local similarity matching)"),
        LocalRule("predsim", "predsim", f"each block learns from {_weights(BETA)}: the best local "
                  "loss of Nøkland & Eidnes 2019"),
        LocalRule("pred-bio", "pred", "pred without weight transport: random-projected binary targets, "
                  "the decoder trained by fa", bio=True),
        LocalRule("sim-bio", "sim", "sim without a learned transform, against randomly projected labels",
                  bio=True),
        LocalRule("predsim-bio", "predsim", f"each block learns from {_weights(BETA_BIO)} of the -bio "
                  "losses: predsim's backprop-free variant (the reference's --bio --beta 0.01)",
                  bio=True, beta=BETA_BIO),
    )
}  # fmt: skip


def similarity_matrix(x: Tensor) -> Tensor:
    """(M, *F) -> (M, M): cosine similarity of the centred rows (see the module docstring)."""
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        x = x.flatten(2).std(dim=2)  # (M, C): each channel's spread over the map
    x = x.flatten(1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.t()).clamp(-1, 1)


def decoder_pool(features: tuple[int, ...], limit: int = DIM_IN_DECODER) -> nn.Module | None:
    """The reference's average pooling before pred's decoder of a (C, H, W) map: kernel
    (kh, kw) doubled in turn, height first, until C·⌈H/kh⌉·⌈W/kw⌉ <= limit; padded so
    that the ceiling fits. None when the map is small enough already (or not a map)."""
    if len(features) != 3:
        return None
    c, h, w = features
    kh = kw = 1
    oh, ow = h, w
    while c * oh * ow > limit and kh < h:
        kh *= 2
        oh = math.ceil(h / kh)
        if c * oh * ow > limit:
            kw *= 2
            ow = math.ceil(w / kw)
    if kh == kw == 1:
        return None
    pad = ((kh * (oh - h // kh)) // 2, (kw * (ow - w // kw)) // 2)
    return nn.AvgPool2d((kh, kw), padding=pad)


class LocalHead(nn.Module):
    """One block's local loss (see the module docstring) for its output's features F
    ((C, H, W) maps, or anything else flattened). Parameters are drawn from `gen`:
    decoders D = 0 with bias U(±1/√F) (-bio: 0), T and P as torch's default U(±1/√fan_in)."""

    def __init__(self, features: tuple[int, ...], n_classes: int, rule: LocalRule, gen: torch.Generator,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:  # fmt: skip
        super().__init__()
        self.features, self.loss_name, self.bio, self.beta = tuple(features), rule.loss, rule.bio, rule.beta
        conv = len(self.features) == 3
        kw = dict(dtype=dtype, device=device)
        self.pool = decoder_pool(self.features)
        pooled = self._pooled_features()
        if rule.loss in ("pred", "predsim"):
            width = math.prod(pooled)
            n_out = TARGET_PROJECTION if rule.bio else n_classes
            self.decoder = nn.Linear(width, n_out, **kw)
            with torch.no_grad():
                self.decoder.weight.zero_()
                if rule.bio:  # the reference's fa decoder: zero bias, B ~ U(±1/√width)
                    self.decoder.bias.zero_()
                    b = uniform((n_out, width), 1 / math.sqrt(width), gen, **kw)
                    self.decoder.register_buffer("feedback", b)
                else:
                    self.decoder.bias.copy_(uniform((n_out,), 1 / math.sqrt(width), gen, **kw))
        if rule.loss in ("sim", "predsim") and not rule.bio:
            if conv:
                c = self.features[0]
                self.transform = nn.Conv2d(c, c, 3, padding=1, bias=False, **kw)
            else:
                width = math.prod(self.features)
                self.transform = nn.Linear(width, width, bias=False, **kw)
            with torch.no_grad():
                w = self.transform.weight
                w.copy_(uniform(w.shape, 1 / math.sqrt(w[0].numel()), gen, **kw))
        if rule.bio:  # P: fixed, never trained (the reference's proj_y, whose gradient is always cut)
            p = uniform((TARGET_PROJECTION, n_classes), 1 / math.sqrt(n_classes), gen, **kw)
            self.register_buffer("projection", p)

    def _pooled_features(self) -> tuple[int, ...]:
        if self.pool is None:
            return self.features
        c, h, w = self.features
        probe = torch.zeros(1, 1, h, w)  # shapes only
        return (c, *self.pool(probe).shape[2:])

    def forward(self, h: Tensor, labels: Tensor, n_classes: int) -> Tensor:
        """The local loss of rows h (M, *F) with integer labels (M,)."""
        if len(self.features) != 3:  # not a (C, H, W) map: one vector per row (M, F)
            h = h.flatten(1)
        onehot = F.one_hot(labels, n_classes).to(h.dtype)  # (M, C)
        target = onehot @ self.projection.t() if self.bio else onehot  # (M, 128) or (M, C)
        loss = h.new_zeros(())
        if self.loss_name in ("sim", "predsim"):
            if self.bio:
                seen = self.pool(h) if self.pool is not None else h
            else:
                seen = self.transform(h)
            sim = F.mse_loss(similarity_matrix(seen), similarity_matrix(target))
            loss = loss + (self.beta if self.loss_name == "predsim" else 1.0) * sim
        if self.loss_name in ("pred", "predsim"):
            flat = (self.pool(h) if self.pool is not None else h).flatten(1)
            if self.bio:  # the error reaches h through B, not the decoder's weight
                d = self.decoder
                pred = F.binary_cross_entropy_with_logits(
                    fa_linear(flat, d.weight, d.bias, d.feedback), (target > 0).to(h.dtype)
                )
            else:
                pred = F.cross_entropy(self.decoder(flat), labels)
            loss = loss + ((1 - self.beta) if self.loss_name == "predsim" else 1.0) * pred
        return loss

    def summary(self) -> str:
        """One line: the loss and the modules computing it (describe())."""
        parts = []
        if self.loss_name in ("pred", "predsim"):
            d = self.decoder
            target = "binary targets [Y·Pᵀ > 0] of a fixed P (sigmoid CE)" if self.bio else "the label (CE)"
            pool = f"avg-pooled by {self.pool.kernel_size}, " if self.pool is not None else ""
            how = ", trained by fa (B fixed)" if self.bio else ""
            linear = f"Linear({d.in_features}→{d.out_features})"
            parts.append(f"pred: {pool}decoder {linear}{how} against {target}")
        if self.loss_name in ("sim", "predsim"):
            seen = "S(h)" if self.bio else f"S({type(self.transform).__name__} T(h))"
            labels = "S(Y·Pᵀ), P fixed" if self.bio else "S(Y) of the one-hot labels"
            parts.append(f"sim: MSE of {seen} to {labels}")
        weights = f"{_weights(self.beta)} = " if self.loss_name == "predsim" else ""
        return f"{weights}{'; '.join(parts)}; on h of features {self.features}"

    def extra_repr(self) -> str:
        return f"{self.loss_name}{'-bio' if self.bio else ''}, features={self.features}"


class LocalFunction(torch.autograd.Function):
    """Forward: y (identity). Backward: e -> (e, dℓ_i/dh_i for every tap).

    The labels are read from e (target_signal: a cross-entropy's error has one negative
    entry per row, at the label; masked positions send none). Each head's loss is
    differentiated in a nested backward on leaves cut from the recorded h_i, which also
    accumulates the heads' own parameter gradients; the cut's gradient then continues
    into block i only."""

    @staticmethod
    def forward(ctx, y: Tensor, output: LocalOutput, *taps: Tensor) -> Tensor:
        ctx.save_for_backward(y, *taps)
        ctx.output = output
        return y.view_as(y)

    @staticmethod
    def backward(ctx, e: Tensor):
        y, *taps = ctx.saved_tensors
        out: LocalOutput = ctx.output
        flat = e.reshape(-1, e.shape[-1])  # (M, C), M = N·|P| positions
        signal = target_signal(flat, y.reshape(flat.shape))  # −s·Y, zero rows where masked
        keep = signal.any(-1)
        labels = signal.argmin(-1)[keep]
        rows = int(flat.shape[0])
        leaves = [h.detach().requires_grad_() for h in taps]
        if not bool(keep.any()):  # every position masked: no label, no local loss, no gradient
            out.last_losses = None
            return (e, None, *[torch.zeros_like(h) for h in taps])
        with torch.enable_grad():
            losses = []
            for head, h in zip(out.heads, leaves):
                feats = h.reshape(rows, *h.shape[h.dim() - len(head.features) :])  # (M, *F)
                losses.append(head(feats[keep], labels, out.n_classes))
            torch.autograd.backward(torch.stack(losses).sum())
        out.last_losses = torch.stack(losses).detach()
        return (e, None, *[leaf.grad for leaf in leaves])


class LocalOutput(Output):
    """The output mark of a local rule: holds one LocalHead per tap (`heads`, built at
    the first forward, which `convert` runs) and no feedback matrix."""

    def __init__(self, rule: LocalRule) -> None:
        super().__init__()
        self.local_rule = rule
        self.heads = nn.ModuleList()
        self.n_classes = 0
        self.last_losses: Tensor | None = None  # each head's loss at the last backward

    def make_feedback(self, y: Tensor, sizes: list[int]) -> None:
        """Build the heads (the first pass has shown each tap's features); no B."""
        lead = y.dim() - 1
        gen = torch.Generator().set_state(self.gen_state)
        self.n_classes = int(y.shape[-1])
        ref = self.feedback
        for shape, n in zip(self.broadcast.shapes, sizes):
            if n:
                features = tuple(shape[lead:])
                self.heads.append(
                    LocalHead(features, self.n_classes, self.local_rule, gen, ref.dtype, ref.device)
                )
        self.feedback = torch.zeros(self.n_classes, 0, dtype=ref.dtype, device=ref.device)

    def broadcast_signal(self, y: Tensor, taps: list[Tensor]) -> Tensor:
        return LocalFunction.apply(y, self, *taps)

    def _check(self, y: Tensor, taps: list[Tensor]) -> None:
        if y.shape[-1] != self.n_classes:
            raise RuntimeError(f"{self.rule}: output {tuple(y.shape)}, but the heads were built for "
                               f"{self.n_classes} classes")  # fmt: skip

    def split(self) -> list[Tensor]:
        """The fixed B of each -bio pred decoder (128, n_i), in tap order; none for the
        others: each block's signal is its own loss."""
        return [h.decoder.feedback for h in self.heads if hasattr(getattr(h, "decoder", None), "feedback")]
