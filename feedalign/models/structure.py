"""What the direct rules read off a model's module tree: its weight layers, its blocks, its
output layer and, inside a transformer block, its attention (docs/models.md, "Which modules
are blocks"). Nothing here changes the model; feedalign/models/blocks.py places the taps.

The blocks, found top-down (a block is not searched inside), in registration order:

1. named kinds: nn.TransformerEncoderLayer / DecoderLayer, nn.RNN / LSTM / GRU, a class
   whose name ends in "Block" or "Bottleneck" and holds a weight layer, a module with
   children `attn` and `mlp`;
2. repeated units: a class of which ≥ 2 instances sit one after the other in a container
   (nn.Sequential / ModuleList / ModuleDict), each holding weight layers without being
   one (Hugging Face's `layers` / `layer` / `h`, the blocks of torchvision's and timm's
   stages). Every instance of such a class is then a block, also alone in its stage
   (EfficientNet's first MBConv). Nested repetitions give the inner one, one tap per
   residual block: a plain container (or an nn.Sequential subclass with torch's forward)
   is looked into, never taken for a unit, and so is a unit holding a chain of blocks
   (a stage module); only a run of plain containers with no block inside makes each of
   them a block. A class seen repeating only inside another repeated class's modules
   (conv-norm-act pairs inside an inverted residual) is not one;
3. none of these: every weight layer not inside another, Embeddings left out (their
   input is token ids: a tap there would cut nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

WEIGHT_LAYERS = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase, nn.Embedding, nn.MultiheadAttention
)  # fmt: skip
BLOCK_TYPES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.RNNBase)
BLOCK_SUFFIXES = ("Block", "Bottleneck")
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
ATTENTION_WORDS = ("attn", "attention")  # in a child's attribute or class name: micro's attention
BlockSpec = Sequence[str] | Callable[[str, nn.Module], bool] | None


def is_weight_layer(m: nn.Module) -> bool:
    """torch's weight layers, a converted layer, or any leaf module with a weight matrix
    of its own (transformers' Conv1D, a hand-written projection)."""
    if isinstance(m, WEIGHT_LAYERS) or hasattr(m, "feedback_rule"):
        return True
    w = m._parameters.get("weight")
    if w is None or isinstance(w, nn.parameter.UninitializedParameter) or m._modules:
        return False
    return w.dim() >= 2


def holds_weights(m: nn.Module) -> bool:
    return any(is_weight_layer(c) for c in m.modules())


def is_plain(m: nn.Module) -> bool:
    """torch's own containers, or an nn.Sequential subclass keeping torch's forward
    (torchvision's Conv2dNormActivation, RegNet's AnyStage): looked into, never a unit."""
    return type(m) in CONTAINERS or runs_children(m)


def iterates(m: nn.Module) -> bool:
    """Whether m's forward may run every child it holds (a DenseNet block iterates its
    ModuleDict; an nn.Sequential runs each child): it must never be given one."""
    return isinstance(m, CONTAINERS)


def runs_children(m: nn.Module) -> bool:
    """An nn.Sequential (or a subclass) whose forward is torch's: each child, in order."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def is_block(name: str, m: nn.Module) -> bool:
    """The named kinds (rule 1 above)."""
    if isinstance(m, BLOCK_TYPES):
        return True
    if type(m).__name__.endswith(BLOCK_SUFFIXES) and holds_weights(m):
        return True
    children = dict(m.named_children())
    return "attn" in children and "mlp" in children


def _is_unit(m: nn.Module) -> bool:
    return not is_plain(m) and not is_weight_layer(m) and holds_weights(m)


def _chain(m: nn.Module) -> bool:
    """Whether m holds ≥ 2 units of one class in a row in an nn.Sequential."""
    if not isinstance(m, nn.Sequential):
        return False
    return any(len(run) > 1 and _is_unit(run[0][1]) for run in _stretches(list(m.named_children())))


def _is_stage(m: nn.Module) -> bool:
    """A unit that holds a chain of blocks (timm's ConvNeXtStage, Hugging Face's
    ResNetStage): looked into, so that each block in it gets its tap. A single block
    inside (Mixtral's MoE "Block" as a decoder layer's MLP) or an expert bank (a
    ModuleList of MLPs) is no chain."""
    return any(c is not m and _chain(c) for c in m.modules())


def _stretches(kids: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """Maximal stretches of consecutive children of one class (length 1 included)."""
    out: list[list[tuple[str, nn.Module]]] = []
    for key, child in kids:
        if out and type(out[-1][0][1]) is type(child):
            out[-1].append((key, child))
        else:
            out.append([(key, child)])
    return out


def repeated_classes(model: nn.Module) -> set[type]:
    """The classes of rule 2 above."""
    seen: list[tuple[str, type]] = []  # (qualified name, class) of every unit in a run

    def walk(module: nn.Module, prefix: str) -> None:
        kids = list(module.named_children())
        members = set()
        if iterates(module):
            for run in _stretches(kids):
                if len(run) > 1 and _is_unit(run[0][1]) and not _is_stage(run[0][1]):
                    members.update(k for k, _ in run)
                    seen.extend((prefix + k, type(c)) for k, c in run)
        for key, child in kids:
            if key not in members and not is_block(prefix + key, child):
                walk(child, f"{prefix}{key}.")

    walk(model, "")
    classes = {cls for _, cls in seen}
    holders = [(n, type(m)) for n, m in model.named_modules() if type(m) in classes]

    def outside_others(name: str, cls: type) -> bool:
        return not any(name.startswith(h + ".") and c is not cls for h, c in holders)

    return {cls for cls in classes if any(c is cls and outside_others(n, cls) for n, c in seen)}


def find_blocks(model: nn.Module, spec: BlockSpec) -> list[tuple[str, nn.Module]]:
    """(name, module) of the blocks, top-down in registration order: `spec`'s (module
    names, or a predicate (name, module) -> bool), or the automatic rules above."""
    modules = dict(model.named_modules())
    if spec is not None and not callable(spec):
        unknown = [n for n in spec if n not in modules or n == ""]
        if unknown:
            raise ValueError(f"blocks: no module named {unknown}; modules are e.g. {list(modules)[1:8]}")
        return [(n, modules[n]) for n in spec]
    if callable(spec):
        pick = spec
    else:
        classes = repeated_classes(model)

        def pick(name: str, m: nn.Module) -> bool:
            return is_block(name, m) or type(m) in classes

    found: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for stretch in _stretches(list(module.named_children())):
            start = len(found)
            for key, child in stretch:
                if pick(prefix + key, child):
                    found.append((prefix + key, child))
                else:
                    walk(child, f"{prefix}{key}.")
            plain_run = (
                len(stretch) > 1 and is_plain(stretch[0][1]) and all(holds_weights(c) for _, c in stretch)
            )
            if spec is None and plain_run and len(found) == start:  # stages with no block inside: each is one
                found.extend((prefix + k, c) for k, c in stretch)

    walk(model, "")
    if not found and spec is None:  # rule 3: every weight layer (not inside another) is a block
        found = [
            (n, m) for n, m in modules.items()
            if n and is_weight_layer(m) and not isinstance(m, nn.Embedding) and not _inside(n, modules)
        ]  # fmt: skip
    return found


def _inside(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether `name` sits inside another weight layer (e.g. attention's out_proj)."""
    parts = name.split(".")
    return any(is_weight_layer(modules[".".join(parts[:i])]) for i in range(1, len(parts)))


def find_output(model: nn.Module, blocks: list[tuple[str, nn.Module]], output: str | None) -> str:
    """`output`, or the last weight layer (in registration order, not an Embedding) outside the blocks."""
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
    if not candidates and blocks and (is_weight_layer(blocks[-1][1]) or is_plain(blocks[-1][1])):
        candidates = [blocks[-1][0]]  # every weight layer (or stage) was a block: the last is the output
    if not candidates:
        raise ValueError(
            f"{type(model).__name__}: no output layer found outside the blocks {inside}; "
            'name it with output="<module name>"'
        )
    return candidates[-1]


def classes_first(m: nn.Module) -> bool:
    """Whether m's output has its classes in dim 1, (N, C, *spatial): its last weight layer
    is a convolution (squeezenet's 1×1 conv head)."""
    last = [c for c in m.modules() if is_weight_layer(c)]
    return bool(last) and isinstance(last[-1], nn.modules.conv._ConvNd)


def attention_of(name: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of transformer block `name`'s attention sub-modules, for taps="micro".

    Looked for among the block's children (and one level into a plain container, T5's
    `layer` list) that hold weight layers: an nn.MultiheadAttention, or a child whose
    attribute or class name contains "attn" or "attention" (attn, self_attn, attention,
    crossattention, LlamaAttention, BertAttention, …). The block must also hold a weight
    child that is none of these: its MLP (mlp, feed_forward, intermediate + output, …).
    """
    kids: list[tuple[str, nn.Module]] = []
    for key, child in block.named_children():
        inner = list(child.named_children()) if is_plain(child) else []
        kids += [(f"{key}.{k}", c) for k, c in inner] if inner else [(key, child)]
    weighted = [(k, c) for k, c in kids if holds_weights(c)]
    attention = [(k, c) for k, c in weighted if _is_attention(k, c)]
    mlp = [k for k, c in weighted if all(k != a for a, _ in attention)]
    if not attention or not mlp:
        missing = "attention" if not attention else "MLP"
        children = ", ".join(f"{k} ({type(c).__name__})" for k, c in block.named_children()) or "none"
        raise ValueError(
            f'taps="micro": block {name} ({type(block).__name__}) has no {missing} sub-module to tap; its '
            f"children are {children}. Recognised: attention = nn.MultiheadAttention or a child named or "
            f'classed *attn* / *attention*, MLP = any other child holding weights. Use taps="macro" '
            "(one tap per block), or blocks= naming transformer blocks only"
        )
    return [(f"{name}.{k}", c) for k, c in attention]


def _is_attention(key: str, m: nn.Module) -> bool:
    if isinstance(m, nn.MultiheadAttention):
        return True
    names = (key.rsplit(".", 1)[-1].lower(), type(m).__name__.lower())
    return any(word in n for word in ATTENTION_WORDS for n in names)
