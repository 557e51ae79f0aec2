"""Where the direct rules (dfa, drtp, shallow) put their taps, on any nn.Module.

A tap cuts the graph at every block boundary; the Output after the output layer
broadcasts the signal (feedalign/rules/dfa.py). Which modules are the blocks and the
output layer: feedalign/models/structure.py. How the taps are placed:

1. An nn.Sequential model (nested allowed; no blocks=, output=, taps="micro"): a block
   runs from one trainable child (a weight layer, or a child holding weight layers) up
   to the next; a tap sits right before every trainable child but the first, i.e. after
   the previous block's nonlinearity, dropout and pooling. The last trainable child is
   the output layer. Taps and Output are inserted as children, into nn.Sequentials whose
   forward is torch's only (any other child is one unit).
2. Any other module: a tap at the input of every block and of the output layer,
   attached by forward pre-hooks. taps="micro" adds, in every transformer block, a tap
   at the output of each attention sub-module (Launay et al. 2020): with the tap at the
   block's input, that cuts the residual stream right after the attention; the tap
   after the MLP is the next block's (or the output layer's). The taps are kept in one
   list on the root, `model.dfa_taps`, not inside the modules they cut: a container
   whose forward runs its children (DenseNet's ModuleDict block, any ModuleList or
   Sequential) never sees them. The Output is the output layer's child `dfa_output`
   (its buffer saved as `<output layer>.dfa_output.feedback`) run by a forward hook;
   an nn.Sequential output layer runs it as its last child; another container's goes
   into `dfa_taps`. No parameter changes its state_dict name. A tap fed the model's own
   input (a first block on the images) or token ids gets no columns of B.
3. Taps placed by hand: `feedalign.Tap()` modules in the model and one
   `feedalign.Output()` (or `output=`), used as they are.

An output layer whose output has its classes in dim 1 (a convolution, (N, C, H, W):
squeezenet's 1×1 conv head, pooled and flattened afterwards) has e taken at the model's
output, which must then be (N, C) (checked at the first pass).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from feedalign.models.structure import (
    BlockSpec,
    attention_of,
    classes_first,
    find_blocks,
    find_output,
    holds_weights,
    is_weight_layer,
    iterates,
    runs_children,
)
from feedalign.rules.dfa import SIGNALS, Broadcast, Output, Tap

__all__ = ["BlockSpec", "TAPS", "TapList", "convert_direct"]
TAPS = ("macro", "micro")  # one tap per block; or also one after each attention sub-module
INPUT_NAMES = ("hidden_states", "x", "input")  # a block's input passed by keyword


class TapList(nn.ModuleList):
    """`model.dfa_taps`: the taps placed by hooks, in tap order. Its forward is the
    identity, so that a root nn.Sequential may run it as a layer."""

    def forward(self, x):
        return x


# --- hooks (module-level functions bound by partial: deepcopy and pickle keep them valid) ---


def _cut_input(tap: Tap, module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: the block's input (its first argument, or one of INPUT_NAMES)
    passes through `tap`; every other argument that is the same tensor (attention's key
    and value in self-attention) is cut with it."""
    if args:
        x = args[0]
    else:
        key = next((k for k in INPUT_NAMES if k in kwargs), None)
        if key is None:
            raise RuntimeError(
                f"tap at {tap.site} ({type(module).__name__}): its input must be passed positionally "
                f"or as one of {', '.join(INPUT_NAMES)}; got only keywords {list(kwargs)}"
            )
        x = kwargs[key]
    cut = tap(x)
    if cut is x:  # token ids, no grad, or backprop(): nothing to change
        return None
    if _reentrant_checkpoint(module):  # its parameters get a gradient only from inputs that need one
        cut = cut.requires_grad_()
    return tuple(cut if a is x else a for a in args), {k: cut if v is x else v for k, v in kwargs.items()}


def _reentrant_checkpoint(module: nn.Module) -> bool:
    """transformers' layers with gradient_checkpointing_enable({"use_reentrant": True}): the
    checkpoint runs inside the layer's call, after this hook. A reentrant checkpoint gives its
    parameters no gradient unless an input requires one, so the cut input is made a leaf that
    does (its own gradient is computed, then dropped; the non-reentrant default needs nothing)."""
    if not getattr(module, "gradient_checkpointing", False) or not module.training:
        return False
    func = getattr(module, "_gradient_checkpointing_func", None)
    return bool(getattr(func, "keywords", {}).get("use_reentrant", False))


def _cut_output(tap: Tap, module: nn.Module, args: tuple, out):
    """Forward hook: the sub-module's output (a tensor, or the first item of a tuple, as
    attention modules return (output, weights)) passes through `tap`."""
    if isinstance(out, Tensor):
        return tap(out)
    if type(out) in (tuple, list) and out and isinstance(out[0], Tensor):
        return type(out)([tap(out[0]), *out[1:]])
    raise RuntimeError(
        f"tap at the output of {tap.site} ({type(module).__name__}): expected a tensor or a tuple "
        f"starting with one, got {type(out).__name__}"
    )


def _note_inputs(tap: Tap, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the root, until the feedback is drawn: the model's input
    tensors, so that a tap fed one of them (a first block on the images) gets no columns."""
    b = tap.broadcast
    if b is not None and not b.sizes:
        b.model_inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]


def _emit(output: Output, module: nn.Module, args: tuple, y):
    """Forward hook on the module whose output is y: y passes through the Output."""
    if not isinstance(y, Tensor):
        if output.pooled:
            raise output.unpooled(f"a {type(y).__name__}")
        raise RuntimeError(
            f"{output.rule}: the error is taken at the output of {type(module).__name__}, which must be "
            f'one tensor (the logits), got {type(y).__name__}; name the layer that makes them with output="…"'
        )
    return output(y)


def _seq_first(m: nn.Module) -> bool:
    """(T, N, …) layouts: torch's recurrent and transformer layers without batch_first."""
    if isinstance(m, nn.RNNBase):
        return not m.batch_first
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not m.self_attn.batch_first
    return False


# --- the conversion ---------------------------------------------------------------


def convert_direct(
    model: nn.Module,
    signal: str,
    rfb_mag: float,
    gen: torch.Generator | None,
    *,
    blocks: BlockSpec = None,
    output: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    error_at: str = "logits",
    taps: str = "macro",
    rule: str | None = None,
    new_output: Callable[[], Output] = Output,
    example: Tensor | None = None,
) -> None:
    """Put the taps and the Output of a direct rule on `model`, in place (see the module
    docstring for where). signal: "error" (dfa), "target" (drtp), "none" (shallow), or
    "local" (the local rules, whose `rule` name and `new_output`, a LocalOutput maker, are
    given). taps: "macro" (one per block) or "micro" (also one after each attention sub-module)."""
    if taps not in TAPS:
        raise ValueError(f"taps must be one of {', '.join(TAPS)}, got {taps!r}")
    rule = rule or SIGNALS[signal]
    ref = next(model.parameters(), torch.zeros(()))
    if gen is None:  # a fresh seed from the OS, as fa's: torch's global RNG stays untouched
        gen = torch.Generator()
        gen.seed()
    manual = [(n, m) for n, m in model.named_modules() if isinstance(m, Tap)]
    marked = [(n, m) for n, m in model.named_modules() if isinstance(m, Output)]
    if (manual or marked) and taps != "macro":
        raise ValueError(
            f'taps="{taps}" places the taps itself; this model holds feedalign.Tap()/Output() modules'
        )
    if marked and new_output is not Output:
        raise ValueError(f"{rule}: a hand-placed feedalign.Output() marks dfa's output; remove it and pass "
                         'output="<the output layer\'s name>"')  # fmt: skip
    if runs_children(model) and blocks is None and output is None and taps == "macro" and not manual + marked:
        placed, out = _place_sequential(model, rule, signal, error_at, new_output)
    elif (manual or marked) and signal != "none":
        placed, out = _place_manual(model, manual, marked, output, new_output)
    else:
        placed, out = _place_hooks(model, signal, blocks, output, error_at, taps, new_output)
    if signal == "none":  # shallow: only the output layer (the cut's site) learns
        _freeze_all_but(model, dict(model.named_modules())[placed[-1].site])
    broadcast = Broadcast(len(placed)) if signal != "none" else None
    for i, tap in enumerate(placed):
        tap.connect(rule, i, broadcast)
    if out is not None:
        out.connect(rule, broadcast, signal, rfb_mag, gen.get_state())
        out.feedback = out.feedback.to(dtype=ref.dtype, device=ref.device)
    if input_shape is None and out is not None:
        input_shape = sequential_input(model)  # a float input: the sizes can be learnt now
    if example is not None and out is not None:
        _probe(model, example, ref)
    elif input_shape is not None and out is not None:
        _probe(model, torch.zeros(2, *input_shape, dtype=ref.dtype, device=ref.device), ref)


def sequential_input(model: nn.Module) -> tuple[int, ...] | None:
    """(in_features,) for an nn.Sequential whose first weight layer is a Linear: an input
    shape known without being told; else None."""
    if not isinstance(model, nn.Sequential):
        return None
    first = next((m for m in model.modules() if is_weight_layer(m)), None)
    return (first.in_features,) if isinstance(first, nn.Linear) else None


def _freeze_all_but(model: nn.Module, output_layer: nn.Module) -> None:
    """requires_grad=False outside the output layer: the cut already keeps every hidden
    gradient None; frozen, they are also no unused parameters to DDP and cost autograd nothing."""
    keep = {id(p) for p in output_layer.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _probe(model: nn.Module, x: Tensor, ref: Tensor) -> None:
    """One no-grad forward of the batch x (zeros of input_shape, N = 2, or the example
    given) draws the feedback now."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x.to(ref.device))
    finally:
        model.train(was_training)


def _hold(model: nn.Module, holder: TapList) -> None:
    """model.dfa_taps = holder; a root nn.Sequential runs it last, as the identity."""
    if not len(holder):
        return
    if iterates(model) and not runs_children(model):
        raise ValueError(
            f"{type(model).__name__}: the model is a container whose own forward may run every child it "
            "holds, so it cannot hold the taps; convert a module that calls it instead "
            "(an nn.Module with the model as an attribute)"
        )
    model.dfa_taps = holder


def _attach_output(layer: nn.Module, out: Output, holder: TapList) -> None:
    """`out` after `layer`'s output: an nn.Sequential runs it as its last child; any other
    module by a forward hook, holding it as `dfa_output` unless it iterates its children."""
    if runs_children(layer):
        layer.dfa_output = out
        return
    if iterates(layer):
        holder.append(out)
    else:
        layer.dfa_output = out
    layer.register_forward_hook(partial(_emit, out))


def _place_manual(model, manual, marked, output, new_output):
    if len(marked) > 1:
        raise ValueError(f"the model holds {len(marked)} feedalign.Output() modules; mark one output")
    if marked:
        return [m for _, m in manual], marked[0][1]
    if output is None:
        raise ValueError(
            "the model holds feedalign.Tap() modules but no output: place feedalign.Output() right after "
            'the output layer, or pass output="<module name>"'
        )
    out, holder = new_output(), TapList()
    out.site = find_output(model, [], output)
    _attach_output(dict(model.named_modules())[out.site], out, holder)
    _hold(model, holder)
    return [m for _, m in manual], out


def _place_hooks(model, signal, blocks, output, error_at, taps, new_output):
    found = find_blocks(model, blocks)
    out_name = find_output(model, found, output)
    out_layer = model.get_submodule(out_name)
    hidden = [(n, m) for n, m in found if n != out_name]
    cuts = []  # (site, module, "input" | "output", seq_first), in tap order
    for name, m in hidden:
        cuts.append((name, m, "input", _seq_first(m)))
        if taps == "micro" and signal != "none":
            cuts += [(a, sub, "output", _seq_first(m)) for a, sub in attention_of(name, m)]
    cuts.append((out_name, out_layer, "input", _seq_first(out_layer)))
    if signal == "none":
        cuts = cuts[-1:]  # shallow: one cut, at the output layer's input
    holder = TapList()
    for site, m, at, seq_first in cuts:
        tap = Tap()
        tap.site, tap.cuts, tap.seq_first = site, at, seq_first
        if at == "input":
            m.register_forward_pre_hook(partial(_cut_input, tap), with_kwargs=True)
        else:
            m.register_forward_hook(partial(_cut_output, tap))
        holder.append(tap)
    placed = list(holder)
    out = None
    if signal != "none":
        model.register_forward_pre_hook(partial(_note_inputs, placed[0]), with_kwargs=True)
        out = new_output()
        out.pooled = classes_first(out_layer)  # e at the model's output, which must be (N, C)
        out.site = out_name if error_at == "logits" else ""
        out.blocks = [n for n, _ in hidden]
        _attach_output(model if error_at == "output" or out.pooled else out_layer, out, holder)
    _hold(model, holder)
    return placed, out


def _leaves(seq: nn.Sequential, prefix: str = "") -> list[tuple[nn.Sequential, str, str, nn.Module]]:
    """(parent, key, qualified name, module) in forward order, into nested Sequentials
    whose forward is torch's (any other module is one leaf)."""
    out = []
    for key, m in seq.named_children():
        if runs_children(m):
            out.extend(_leaves(m, f"{prefix}{key}."))
        else:
            out.append((seq, key, f"{prefix}{key}", m))
    return out


def _place_sequential(model: nn.Sequential, rule: str, signal: str, error_at: str, new_output):
    leaves = _leaves(model)
    trainable = [i for i, (*_, m) in enumerate(leaves) if holds_weights(m)]
    if not trainable:
        raise ValueError(f"{rule}: the model has no weight layer (Linear, Conv, recurrent, …)")
    boundaries = trainable[1:] if signal != "none" else trainable[-1:]
    if signal == "local":  # a block's local loss sees its output before dropout, which runs after the cut
        boundaries = [_before_dropout(leaves, i) for i in boundaries]
    before: dict[tuple[int, str], list] = {}  # (id(parent), key) -> modules to insert before that child
    after: dict[tuple[int, str], list] = {}  # … and after it
    parents = {id(parent): parent for parent, *_ in leaves}
    taps = []
    for tap_index, i in enumerate(boundaries):
        parent, key, name, _ = leaves[i]
        tap = Tap()
        tap.site = name
        taps.append(tap)
        before.setdefault((id(parent), key), []).append((f"tap{tap_index}", tap))
    out = None
    if signal != "none":
        out = new_output()
        out_parent, out_key, out.site, out_layer = leaves[trainable[-1]]
        out.blocks = [leaves[i][2] for i in trainable[:-1]]
        out.pooled = classes_first(out_layer)
        if error_at == "logits" and not out.pooled:
            after.setdefault((id(out_parent), out_key), []).append(("dfa_output", out))
        else:  # e at the model's output
            out.site = out.site if error_at == "logits" else ""
            model.add_module("dfa_output", out)
    for pid, parent in parents.items():
        _insert(parent, pid, before, after)
    return taps, out


def _before_dropout(leaves: list, i: int) -> int:
    """The leaf index where a tap cutting before leaves[i] goes when it must precede the
    dropout layers right before it (in the same parent)."""

    def dropout_before(i: int) -> bool:
        same_parent = leaves[i - 1][0] is leaves[i][0]
        return same_parent and isinstance(leaves[i - 1][3], nn.modules.dropout._DropoutNd)

    while i > 0 and dropout_before(i):
        i -= 1
    return i


def _insert(parent: nn.Sequential, pid: int, before: dict, after: dict) -> None:
    """Rebuild parent's children with the extra (name, module) pairs planned for them;
    existing keys stay, so the parameters' state_dict names do not change."""
    new: OrderedDict[str, nn.Module] = OrderedDict()
    for key, m in parent._modules.items():
        new.update(before.get((pid, key), []))
        new[key] = m
        new.update(after.get((pid, key), []))
    parent._modules = new
