"""The direct rules: dfa, drtp and shallow — taps and the output broadcast (docs/original.md §1).

A network whose hidden part is cut into blocks, and an output layer with logits y.
With e = dL/dy (the output error, shape (N, C), or (N, *P, C) for per-position
outputs such as a sequence model's (N, T, C)):

    output layer:    trained with the true error e
    hidden tap i:    dfa   receives  e · B_i                  (B_i: (C, n_i))
                     drtp  receives  −s·y* · B_i              (y* the one-hot target, s the loss's scale)
                     shallow         nothing (the graph is cut; hidden parameters get no gradient)

n_i is the tap input's elements per sample (per position when y has position
dims P: then e is projected at every position, e[n, p] · B_i). Each tap's
gradient then flows back through the block that produced the tap input, and
no further: the graph is cut at every tap.

How it sits in one autograd graph, with no wasted work:

    Tap (at a block boundary), forward: records its input h_i and passes on
        h_i.detach() — nothing from above ever reaches the block below through
        a transposed weight (autograd does not even form that product).
    Output (right after the output layer), forward: y -> DFAFunction(y, B, h_1..h_L),
        the identity on y whose backward turns e into e·[B_1 … B_L] with ONE
        matrix product and hands each slice to its h_i as that tap's gradient.

Taps and their Output share a `Broadcast` (a plain object, not a module) holding
the recorded h_i of the current forward pass. The sizes n_i are learnt at the
first forward pass; the feedback buffer B = [B_1 … B_L] (C, Σ n_i) is drawn
then, from the generator state saved at conversion (same seed, same B).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from feedalign.rules.feedback import dfa_bound, uniform

SIGNALS = {"error": "dfa", "target": "drtp", "none": "shallow"}  # signal -> rule name
IDS = "ids"  # a tap fed token ids (or the model's own input): nothing upstream learns, no columns of B


def target_signal(e: Tensor, y: Tensor) -> Tensor:
    """−s·y*, read exactly from the output error e = s·(p(y) − y*) of a cross-entropy.

    e, y: (M, C); y the output layer's output (logits). y* is one-hot, so its class is
    the one negative entry of every row of e (p ∈ (0, 1)). A confident row whose
    p(target) rounds to exactly 1 (float32 saturates within the first epoch of a
    LeNet) has no negative entry: its target entry is exactly 0, the row's minimum,
    and its target is the largest logit among the entries at 0. The scale s is the
    loss's: bce (sigmoid, summed over the batch, feedalign.BCE): s = 1; ce (softmax,
    mean over M rows): s = 1/M; an error already taken at the log-softmax output
    (error_at="output": p = 0) is −s·y* itself. When every row is saturated there is
    no scale to read, and ce's mean-reduction s = 1/M is taken.

    A row of zeros whose softmax (or sigmoid) is not exactly one-hot is a masked
    position (ignore_index, Hugging Face's label -100): its target row is zero, it sends
    no signal, and M counts the other rows only (ce's mean over the unmasked positions).
    """
    y = y.detach().to(e.dtype)
    zero = ~e.bool().any(-1)
    if not bool(zero.any()):
        return _target(e, y)
    saturated = _one_hot(torch.softmax(y[zero], -1)) | _one_hot(torch.sigmoid(y[zero]))
    masked = zero.clone()
    masked[zero] = ~saturated
    out = torch.zeros_like(e)
    if not bool(masked.all()):
        out[~masked] = _target(e[~masked], y[~masked])
    return out


def _one_hot(p: Tensor) -> Tensor:
    """(M, C) -> (M,): whether each row is exactly one-hot."""
    return ((p == 0) | (p == 1)).all(-1) & ((p == 1).sum(-1) == 1)


def _target(e: Tensor, y: Tensor) -> Tensor:
    """target_signal on rows that are not masked; y: detached, in e's dtype."""
    negative = e < 0
    count = negative.sum(-1)
    saturated = count == 0
    if bool((count > 1).any()) or bool((e[saturated] != 0).all(-1).any()):
        raise RuntimeError(
            "drtp reads the target from the output error, which must be that of a sigmoid or softmax "
            "cross-entropy (feedalign.BCE, log-softmax + NLLLoss, F.cross_entropy): one negative entry "
            "per row (or, where p(target) = 1 exactly, a zero); this error has rows with neither, or several"
        )
    if bool(saturated.any()):
        at_zero = torch.where(e == 0, y, torch.finfo(e.dtype).min)
        target = at_zero.argmax(-1)
        negative = negative | (saturated[:, None] & nn.functional.one_hot(target, e.shape[-1]).bool())
    onehot = negative.to(e.dtype)
    rest = e * (1 - onehot)  # s·p_c at the other classes
    if not bool(rest.any()) and not bool(saturated.any()):
        return e  # error_at="output": e = −s·y* already
    tol = 1e-3 * float(e.abs().max())
    if torch.allclose(torch.sigmoid(y) - e, onehot, rtol=0, atol=max(tol, 1e-5)):
        return -onehot  # bce: e = σ(y) − y*, s = 1
    p = torch.softmax(y, dim=-1)
    others = float((p * (1 - onehot)).sum())
    if float(rest.abs().sum()) == 0 or others == 0:
        return -onehot / len(e)  # every row saturated: no scale to read; ce's mean (s = 1/M)
    s = float(rest.sum()) / others
    if not torch.allclose(s * (p - onehot), e, rtol=1e-2, atol=tol):
        raise RuntimeError("drtp: the output error is neither sigmoid(y) − y* nor s·(softmax(y) − y*)")
    for exact in (1.0 / len(e), 1.0):  # the mean or the sum over the M rows: exactly, not to rounding
        if abs(s / exact - 1) < 1e-3:
            s = exact
    return -s * onehot


class DFAFunction(torch.autograd.Function):
    """Forward: y (identity). Backward: e -> (e, signal(e)·B split and reshaped to each h_i).

    y: (N, *P, C); each tap h_i: (N, *P, …) with n_i elements per position;
    B: (C, Σ n_i). signal(e) = e (dfa) or −s·y* (drtp, see target_signal).
    """

    @staticmethod
    def forward(ctx, y: Tensor, feedback: Tensor, signal: str, *taps: Tensor) -> Tensor:
        ctx.save_for_backward(feedback, y if signal == "target" else None)
        ctx.signal = signal
        ctx.shapes = [t.shape for t in taps]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, e: Tensor):
        feedback, y = ctx.saved_tensors  # (C, Σ n_i)
        if not any(ctx.needs_input_grad[3:]):  # no tap input needs a gradient (e.g. all integer)
            return (e, None, None, *[None] * len(ctx.shapes))
        flat = e.reshape(-1, e.shape[-1])  # (M, C), M = N·|P| positions
        if ctx.signal == "target":
            flat = target_signal(flat, y.reshape(flat.shape))
        projected = flat @ feedback.to(e.dtype)  # (M, C) @ (C, Σ n_i) -> (M, Σ n_i)
        m = flat.shape[0]
        sizes = [s.numel() // m for s in ctx.shapes]
        grads = [p.reshape(s) for p, s in zip(projected.split(sizes, dim=1), ctx.shapes)]
        return (e, None, None, *grads)


class Broadcast:
    """The tap inputs h_1..h_L of the forward pass in flight (index = tap order),
    and, until the feedback is drawn, the shapes seen by each tap."""

    def __init__(self, n_taps: int) -> None:
        self.inputs: list[Tensor | None] = [None] * n_taps
        # per tap: None (not seen yet), IDS (fed integers: token ids), or h's shape
        self.shapes: list[torch.Size | str | None] = [None] * n_taps
        self.sizes: list[int] = []  # n_i, fixed when the feedback is drawn
        self.where: list[str] = [""] * n_taps  # "input of layers.0", for messages
        self.model_inputs: list[Tensor] = []  # the model's inputs during the first pass (hooked taps)

    def __deepcopy__(self, memo):  # copies of a model must not share recorded tensors
        new = Broadcast(len(self.inputs))
        new.shapes, new.sizes, new.where = list(self.shapes), list(self.sizes), list(self.where)
        return new


class Tap(nn.Module):
    """A cut in the graph where a direct rule delivers its signal.

    Place `feedalign.Tap()` in a custom forward (`x = self.tap1(x)`) at each block
    boundary, mark the output with `feedalign.Output()`, then convert. Before
    conversion, under `feedalign.backprop` and without grad it is the identity.
    Forward when active: records h, returns h.detach(); in backward h receives
    its slice of the projected signal. A non-floating input (token ids) passes untouched;
    a tap fed the model's own input (convert's hooked taps) gets no columns of B either.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rule: str | None = None  # set by convert
        self.rule_active = True
        self.index = -1
        self.broadcast: Broadcast | None = None
        self.seq_first = False  # h is (T, N, …): transposed to batch-first when recorded
        self.site = ""  # the module whose input (or output, see cuts) this tap cuts (set by convert)
        self.cuts = "input"  # "output": taps="micro"'s cut after an attention sub-module

    def connect(self, rule: str, index: int, broadcast: Broadcast | None) -> None:
        self.rule, self.index, self.broadcast = rule, index, broadcast

    def forward(self, h: Tensor) -> Tensor:
        if self.rule is None:
            return h
        if not isinstance(h, Tensor):
            raise TypeError(
                f"{self.rule}: the tap at the {self.cuts} of {self.site or 'a hand-placed Tap'} got a "
                f"{type(h).__name__}, not a tensor; choose blocks whose input is one tensor (blocks=...)"
            )
        b = self.broadcast
        ids = not h.is_floating_point()
        first = h if ids or not self.seq_first else h.transpose(0, 1)
        if b is not None and not b.sizes:  # sizes are learnt at the first pass
            given = any(h is x for x in b.model_inputs)  # the model's own input: nothing upstream learns
            b.shapes[self.index] = IDS if ids or given else first.shape
            b.where[self.index] = f"{self.cuts} of {self.site}" if self.site else ""
        if ids or not self.rule_active or not torch.is_grad_enabled():
            return h
        if b is not None:
            b.inputs[self.index] = first
        return h.detach()

    def extra_repr(self) -> str:
        if self.rule is None:
            return "not converted"
        sizes = self.broadcast.sizes if self.broadcast is not None else []
        n = sizes[self.index] if self.index < len(sizes) else "?"
        where = f", {self.cuts} of {self.site}" if self.site else ""
        if self.broadcast is None:
            return f"{self.rule}, cut{where}"
        return f"{self.rule}, index={self.index}, n={n}{where}"


class Output(nn.Module):
    """Marks the output layer's output y (place it right after that layer). Holds the
    feedback buffer `feedback` (C, Σ n_i) and broadcasts the signal to every tap."""

    def __init__(self) -> None:
        super().__init__()
        self.rule: str | None = None
        self.rule_active = True
        self.broadcast: Broadcast | None = None
        self.signal = "error"
        self.rfb_mag = 0.0
        self.gen_state: Tensor | None = None  # the generator's state at conversion
        self.site = ""  # the output layer's name ("": the model's output)
        self.blocks: list[str] = []  # the hidden blocks' names, for describe()
        self.pooled = False  # the output layer is a convolution: y (the model's output) must be (N, C)
        self.register_buffer("feedback", torch.zeros(0, 0))

    def connect(
        self, rule: str, broadcast: Broadcast, signal: str, rfb_mag: float, gen_state: Tensor
    ) -> None:
        self.rule, self.broadcast, self.signal = rule, broadcast, signal
        self.rfb_mag, self.gen_state = rfb_mag, gen_state

    def forward(self, y: Tensor) -> Tensor:
        b = self.broadcast
        if b is None:
            return y
        if not b.sizes:
            self._draw(y)
        if not self.rule_active or not torch.is_grad_enabled():
            return y
        used = [(i, h) for i, (h, n) in enumerate(zip(b.inputs, b.sizes)) if n]
        missing = [i for i, h in used if h is None]
        if missing:
            raise RuntimeError(
                f"{self.rule}: taps {missing} saw no input with gradients on in this forward pass (a tap "
                "inside torch.utils.checkpoint(use_reentrant=True) runs with them off: use "
                "use_reentrant=False)"
            )
        b.inputs = [None] * len(b.inputs)  # drop references; the next pass starts clean
        taps = [h for _, h in used]
        self._check(y, taps)
        return self.broadcast_signal(y, taps)

    def broadcast_signal(self, y: Tensor, taps: list[Tensor]) -> Tensor:
        """y, passed on; in backward each tap input gets its slice of signal(e)·B."""
        return DFAFunction.apply(y, self.feedback, self.signal, *taps)

    def _sizes(self, y: Tensor, shapes: list) -> list[int]:
        """n_i per position of y's leading dims (N, *P); a tap must carry those dims."""
        lead = y.shape[:-1]
        sizes = []
        for i, s in enumerate(shapes):
            if s is None:
                raise RuntimeError(f"{self.rule}: tap {i} saw no input in the first forward pass")
            if s == IDS:
                sizes.append(0)
                continue
            if tuple(s[: len(lead)]) != tuple(lead):
                where = self.broadcast.where[i] or "placed by hand"
                raise RuntimeError(
                    f"{self.rule}: tap {i} ({where}) sees shape {tuple(s)}, output is {tuple(y.shape)}: "
                    f"a tap must start with the output's batch (and position) dims {tuple(lead)}. A module "
                    'that regroups the batch (windowed attention) cannot be cut there: use taps="macro", or '
                    "blocks= naming modules whose input carries the batch"
                )
            sizes.append(s[len(lead) :].numel())
        return sizes

    def _check(self, y: Tensor, taps: list[Tensor]) -> None:
        expected = [n for n in self.broadcast.sizes if n]
        if y.shape[-1] != self.feedback.shape[0] or self._sizes(y, [t.shape for t in taps]) != expected:
            raise RuntimeError(
                f"{self.rule}: output {tuple(y.shape)} and taps {[tuple(t.shape) for t in taps]} do not "
                f"match the feedback drawn at the first pass ({self.feedback.shape[0]} classes, "
                f"n_i = {self.broadcast.sizes})"
            )

    def _draw(self, y: Tensor) -> None:
        """Draw B = [B_1 … B_L], B_i ~ U[±1/sqrt(n_i)] (or ±rfb_mag), from the saved
        generator state, once the first pass has shown the sizes n_i."""
        if self.pooled and y.dim() != 2:
            raise self.unpooled(str(tuple(y.shape)))
        sizes = self._sizes(y, self.broadcast.shapes)
        self.make_feedback(y, sizes)
        self.broadcast.sizes = sizes
        self.broadcast.model_inputs = []

    def make_feedback(self, y: Tensor, sizes: list[int]) -> None:
        """B = [B_1 … B_L] for taps of n_i = `sizes` elements per position of y."""
        n_out = y.shape[-1]
        if tuple(self.feedback.shape) != (0, 0):  # a state_dict was loaded before the first pass: keep its B
            if tuple(self.feedback.shape) != (n_out, sum(sizes)):
                raise RuntimeError(
                    f"{self.rule}: loaded feedback {tuple(self.feedback.shape)} does not fit this model "
                    f"({n_out} classes, n_i = {sizes})"
                )
        else:
            gen = torch.Generator().set_state(self.gen_state)
            ref = self.feedback
            blocks = [uniform((n_out, n), dfa_bound(n, self.rfb_mag), gen) for n in sizes if n]
            drawn = torch.cat(blocks, dim=1) if blocks else torch.zeros(n_out, 0, dtype=torch.float64)
            self.feedback = drawn.to(dtype=ref.dtype, device=ref.device)

    def unpooled(self, got: str) -> ValueError:
        """The refusal of a convolutional output layer whose output is not reduced to (N, C)."""
        return ValueError(
            f"{self.rule}: the output layer {self.site} is a convolution, whose output has its classes in "
            f"dim 1, so the error is taken at the model's output; that must be (N, C), and it is {got}. "
            "Reduce the positions in the model (pool and flatten, as squeezenet does), or name an output "
            'layer with output="…" whose output is (N, C) or (N, *P, C), classes last; per-position '
            "convolutional heads (N, C, H, W) are not supported"
        )

    @property
    def ready(self) -> bool:
        return self.broadcast is not None and bool(self.broadcast.sizes)

    def split(self) -> list[Tensor]:
        """Views B_i (C, n_i) of the concatenated buffer, in tap order."""
        if not self.ready:
            raise RuntimeError(
                f"{self.rule}: the feedback is drawn at the first forward pass; run one batch first "
                "(or convert with input_shape=...)"
            )
        return [b for b in self.feedback.split(self.broadcast.sizes, dim=1) if b.shape[1]]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Before the first pass the buffer is a placeholder (0, 0): take the saved B's shape.
        saved = state_dict.get(prefix + "feedback")
        if isinstance(saved, Tensor) and saved.shape != self.feedback.shape and not self.ready:
            self.feedback = torch.empty_like(saved, dtype=self.feedback.dtype, device=self.feedback.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        if self.broadcast is None:
            return "not converted"
        n_out = self.feedback.shape[0] if self.ready else "?"
        site = self.site or "model"
        return f"{self.rule}, n_out={n_out}, taps={len(self.broadcast.inputs)}, output of {site}"


ErrorTap = Tap  # the names the first versions used
DFAOutput = Output
