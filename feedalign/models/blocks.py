"""Where the direct rules (dfa, drtp, shallow) put their taps, on any nn.Module.

A tap sits at every block boundary and cuts the graph there; the output layer's
output gets the `Output` that broadcasts the signal (feedalign/rules/dfa.py).
Which modules are blocks (docs/models.md, "Your own model"):

1. nn.Sequential (nested allowed; today's behaviour): a block runs from one
   trainable child (a weight layer, or a child holding weight layers) up to the
   next; a tap sits right before every trainable child but the first, i.e. after
   the previous block's nonlinearity, dropout and pooling. The last trainable
   child is the output layer. Taps and Output are inserted as children.
2. Any other module: the blocks are `blocks=` (module names, or a predicate
   `(name, module) -> bool`), or, found top-down (a block is not searched inside):
   nn.TransformerEncoderLayer / DecoderLayer, nn.RNN / LSTM / GRU, a module whose
   class name ends in "Block" or "Bottleneck" (torchvision's BasicBlock and
   Bottleneck, timm's Block), a module with children `attn` and `mlp`; if there is
   none, every weight layer (Linear, Conv, recurrent) is a block. The output layer
   is `output=` or the last weight layer (in registration order) outside the blocks.
   A tap sits at the input of every block and of the output layer, attached with
   forward hooks; the modules are added as children `dfa_tap` / `dfa_output` (so
   they show in the model's repr; an nn.Sequential takes them as its first / last
   child, since its forward runs every child) and no parameter changes its state_dict name.
3. Taps placed by hand: `feedalign.Tap()` modules in the model and one
   `feedalign.Output()` (or `output=`) — used as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from feedalign.rules.dfa import SIGNALS, Broadcast, Output, Tap

WEIGHT_LAYERS = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase, nn.Embedding, nn.MultiheadAttention
)  # fmt: skip
BLOCK_TYPES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.RNNBase)
BLOCK_SUFFIXES = ("Block", "Bottleneck")
BlockSpec = Sequence[str] | Callable[[str, nn.Module], bool] | None


def is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, WEIGHT_LAYERS) or hasattr(m, "feedback_rule")


def holds_weights(m: nn.Module) -> bool:
    return any(is_weight_layer(c) for c in m.modules())


def is_block(name: str, m: nn.Module) -> bool:
    """The automatic rule (2) above."""
    if isinstance(m, BLOCK_TYPES):
        return True
    if type(m).__name__.endswith(BLOCK_SUFFIXES) and holds_weights(m):
        return True
    children = dict(m.named_children())
    return "attn" in children and "mlp" in children


def find_blocks(model: nn.Module, spec: BlockSpec) -> list[tuple[str, nn.Module]]:
    """(name, module) of the blocks, top-down in registration order."""
    modules = dict(model.named_modules())
    if spec is not None and not callable(spec):
        unknown = [n for n in spec if n not in modules or n == ""]
        if unknown:
            raise ValueError(f"blocks: no module named {unknown}; modules are e.g. {list(modules)[1:8]}")
        return [(n, modules[n]) for n in spec]
    pick = spec if callable(spec) else is_block
    found: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for key, child in module.named_children():
            name = f"{prefix}{key}"
            if pick(name, child):
                found.append((name, child))
            else:
                walk(child, name + ".")

    walk(model, "")
    if not found and spec is None:  # no recognised block: every weight layer is one
        found = [(n, m) for n, m in modules.items() if n and is_weight_layer(m) and not _inside(n, modules)]
    return found


def _inside(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether `name` sits inside another weight layer (e.g. attention's out_proj)."""
    parts = name.split(".")
    return any(is_weight_layer(modules[".".join(parts[:i])]) for i in range(1, len(parts)))


def find_output(model: nn.Module, blocks: list[tuple[str, nn.Module]], output: str | None) -> str:
    modules = dict(model.named_modules())
    if output is not None:
        if output not in modules or output == "":
            raise ValueError(f"output: no module named {output!r}; modules are e.g. {list(modules)[1:8]}")
        return output
    inside = [n for n, _ in blocks]
    candidates = [
        n for n, m in modules.items()
        if n and is_weight_layer(m) and not isinstance(m, nn.Embedding)
        and not any(n == b or n.startswith(b + ".") for b in inside) and not _inside(n, modules)
    ]  # fmt: skip
    if not candidates and blocks and is_weight_layer(blocks[-1][1]):
        candidates = [blocks[-1][0]]  # every weight layer was a block: the last one is the output
    if not candidates:
        raise ValueError(
            f"{type(model).__name__}: no output layer found outside the blocks {inside}; "
            'name it with output="<module name>"'
        )
    return candidates[-1]


# --- hooks (module-level functions: deepcopy and pickle keep them valid) -----------


def _tap_input(module: nn.Module, args: tuple, kwargs: dict):
    """Cut the block's input; every other argument that is the same tensor (attention's
    key and value in self-attention) is cut with it."""
    if not args:
        raise RuntimeError(f"tap on {type(module).__name__}: its input must be passed positionally")
    x = args[0]
    cut = module.dfa_tap(x)
    args = tuple(cut if a is x else a for a in args)
    return args, {k: cut if v is x else v for k, v in kwargs.items()}


def _output_hook(module: nn.Module, args: tuple, out):
    if not isinstance(out, Tensor):
        raise RuntimeError(f"output layer {type(module).__name__} must return one tensor, got {type(out)}")
    return module.dfa_output(out)


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
) -> None:
    """Put the taps and the Output of a direct rule on `model`, in place (see the
    module docstring for where). signal: "error" (dfa), "target" (drtp), "none" (shallow)."""
    rule = SIGNALS[signal]
    ref = next(model.parameters(), torch.zeros(()))
    if gen is None:  # a fresh seed from the OS, as fa's: torch's global RNG stays untouched
        gen = torch.Generator()
        gen.seed()
    manual = [(n, m) for n, m in model.named_modules() if isinstance(m, Tap)]
    marked = [(n, m) for n, m in model.named_modules() if isinstance(m, Output)]
    if isinstance(model, nn.Sequential) and blocks is None and output is None and not manual + marked:
        taps, out = _place_sequential(model, rule, signal, error_at)
    elif (manual or marked) and signal != "none":
        taps, out = _place_manual(model, manual, marked, output)
    else:
        taps, out = _place_hooks(model, rule, signal, blocks, output, error_at)
    if signal == "none":  # shallow: only the output layer (the cut's site) learns
        _freeze_all_but(model, dict(model.named_modules())[taps[-1].site])
    broadcast = Broadcast(len(taps)) if signal != "none" else None
    for i, tap in enumerate(taps):
        tap.connect(rule, i, broadcast)
    if out is not None:
        out.connect(rule, broadcast, signal, rfb_mag, gen.get_state())
        out.feedback = out.feedback.to(dtype=ref.dtype, device=ref.device)
    if input_shape is None and isinstance(model, nn.Sequential) and out is not None:
        first = next((m for m in model.modules() if is_weight_layer(m)), None)
        if isinstance(first, nn.Linear):
            input_shape = (first.in_features,)  # a float input: the sizes can be learnt now
    if input_shape is not None and out is not None:
        _probe(model, input_shape, ref)


def _freeze_all_but(model: nn.Module, output_layer: nn.Module) -> None:
    """requires_grad=False outside the output layer: the cut already keeps every hidden
    gradient None; frozen, they are also no unused parameters to DDP and cost autograd nothing."""
    keep = {id(p) for p in output_layer.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _probe(model: nn.Module, input_shape: tuple[int, ...], ref: Tensor) -> None:
    """One no-grad forward on zeros (N = 2) draws the feedback now (input_shape given)."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, dtype=ref.dtype, device=ref.device))
    finally:
        model.train(was_training)


def _place_manual(model, manual, marked, output):
    if len(marked) > 1:
        raise ValueError(f"the model holds {len(marked)} feedalign.Output() modules; mark one output")
    if marked:
        return [m for _, m in manual], marked[0][1]
    if output is None:
        raise ValueError(
            "the model holds feedalign.Tap() modules but no output: place feedalign.Output() right after "
            'the output layer, or pass output="<module name>"'
        )
    out = Output()
    out.site = find_output(model, [], output)
    _attach_output(dict(model.named_modules())[out.site], out)
    return [m for _, m in manual], out


def _place_hooks(model, rule, signal, blocks, output, error_at):
    found = find_blocks(model, blocks)
    out_name = find_output(model, found, output)
    modules = dict(model.named_modules())
    sites = [(n, m) for n, m in found if n != out_name] + [(out_name, modules[out_name])]
    if signal == "none":
        sites = sites[-1:]  # shallow: one cut, at the output layer's input
    taps = []
    for name, m in sites:
        tap = Tap()
        tap.site, tap.seq_first = name, _seq_first(m)
        if isinstance(m, nn.Sequential):  # its forward runs its children: the tap goes first
            m._modules = OrderedDict([("dfa_tap", tap), *m._modules.items()])
        else:
            m.dfa_tap = tap
            m.register_forward_pre_hook(_tap_input, with_kwargs=True)
        taps.append(tap)
    if signal == "none":
        return taps, None
    out = Output()
    out.site = out_name if error_at == "logits" else ""
    out.blocks = [n for n, _ in found if n != out_name]
    _attach_output(modules[out_name] if error_at == "logits" else model, out)
    return taps, out


def _attach_output(holder: nn.Module, out: Output) -> None:
    holder.dfa_output = out  # a Sequential runs it last by itself; any other module by the hook
    if not isinstance(holder, nn.Sequential):
        holder.register_forward_hook(_output_hook)


def _leaves(seq: nn.Sequential, prefix: str = "") -> list[tuple[nn.Sequential, str, str, nn.Module]]:
    """(parent, key, qualified name, module) in forward order, into nested Sequentials."""
    out = []
    for key, m in seq.named_children():
        if isinstance(m, nn.Sequential):
            out.extend(_leaves(m, f"{prefix}{key}."))
        else:
            out.append((seq, key, f"{prefix}{key}", m))
    return out


def _place_sequential(model: nn.Sequential, rule: str, signal: str, error_at: str):
    leaves = _leaves(model)
    trainable = [i for i, (*_, m) in enumerate(leaves) if holds_weights(m)]
    if not trainable:
        raise ValueError(f"{rule}: the model has no weight layer (Linear, Conv, recurrent, …)")
    boundaries = trainable[1:] if signal != "none" else trainable[-1:]
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
        out = Output()
        out_parent, out_key, out.site, _ = leaves[trainable[-1]]
        out.blocks = [leaves[i][2] for i in trainable[:-1]]
        if error_at == "logits":
            after.setdefault((id(out_parent), out_key), []).append(("dfa_output", out))
        else:
            out.site = ""
            model.add_module("dfa_output", out)
    for pid, parent in parents.items():
        _insert(parent, pid, before, after)
    return taps, out


def _insert(parent: nn.Sequential, pid: int, before: dict, after: dict) -> None:
    """Rebuild parent's children with the extra (name, module) pairs planned for them;
    existing keys stay, so the parameters' state_dict names do not change."""
    new: OrderedDict[str, nn.Module] = OrderedDict()
    for key, m in parent._modules.items():
        new.update(before.get((pid, key), []))
        new[key] = m
        new.update(after.get((pid, key), []))
    parent._modules = new
