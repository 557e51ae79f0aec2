"""The per-layer rules follow every weight through the calls a forward makes.

`convert` gives torch's layer kinds a twin whose own forward uses B (rules/fa.py), and
a B to every other trainable weight (a parameter of ≥ 2 dims; not an nn.Embedding's
table, which is only indexed). But a forward may use a weight without its layer's
forward: timm's BEiT and torchvision's Swin call `F.linear(x, self.qkv.weight, …)`,
transformers' Conv1D `torch.addmm(b, x, self.weight)`, a tied head `F.linear(h,
wte.weight)`. Left alone, autograd would send the error through that weight's
transpose — back-prop in disguise, while the weight has a B that nothing reads.

So every training forward of a converted model (gradients on, rule active) runs
inside a TorchFunctionMode that sees each torch call:

- a product whose weight operand is (a view or cast of) a weight with a B is
  computed by its route in rules/fa_products.py: the same value, the error to the
  data operand through B viewed as the weight was (w.T → B.T, w[:k] → B[:k]);
- a product taking a weight that has no B (an Embedding's table, a 1-d vector), a
  weight computed from parameters by other ops (`F.conv2d(x, w / w.norm())`), or a
  call no route takes (`F.multi_head_attention_forward`, `torch.tensordot`, …) is
  recorded, and at the end of the forward a ValueError names every such weight
  with the calls it went through;
- anything else runs as it is (elementwise uses of a parameter — a position
  embedding, a LayerScale gamma, norms — learn from the error that reaches them).

Calls inside an autograd Function's forward (the twins' own products) run with
gradients off and pass through untouched. Which weights a forward used through which
calls is kept for `describe()`. The mode is entered by forward hooks on every module
of the model (the outermost call enters it, so a submodule called on its own and the
recomputation of gradient checkpointing are covered too); under torch.compile it is
not entered, and a model known to need it is refused there.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from feedalign.rules.fa import FALayer
from feedalign.rules.fa_products import ROUTES
from feedalign.rules.feedback import feedback_for, feedback_name

# Calls that give a weight in another form: the same call on B gives its B.
TRANSFORMS = frozenset({
    "t", "transpose", "permute", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
    "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "__getitem__", "chunk", "split",
    "tensor_split", "unbind", "movedim", "swapaxes", "swapdims", "contiguous", "clone", "to", "type",
    "type_as", "float", "half", "bfloat16", "double", "T", "mT", "H", "mH",
})  # fmt: skip
# Calls that take weights but that no route computes: refused when they take a model weight.
OPAQUE = frozenset({
    "tensordot", "inner", "outer", "ger", "kron", "chain_matmul", "multi_dot", "addbmm", "addr",
    "scaled_dot_product_attention", "multi_head_attention_forward", "conv_tbc", "lstm", "gru",
    "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "embedding_bag",
})  # fmt: skip
PRODUCTS = frozenset(ROUTES) | OPAQUE


def _name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property of Tensor (w.T, w.mT): its descriptor's name
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


class Weights:
    """The weights of the module a forward entered, by id: those with a B and the rest."""

    def __init__(self, module: nn.Module) -> None:
        self.with_b: dict[int, tuple[nn.Module, str, str]] = {}  # id -> (owner, attribute, name)
        self.other: dict[int, str] = {}  # trainable parameters without a B -> name
        for mname, m in module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                qual = f"{mname}.{pname}" if mname else pname
                if hasattr(m, feedback_name(pname)):
                    self.with_b.setdefault(id(p), (m, pname, qual))
                elif p.requires_grad:
                    self.other.setdefault(id(p), qual)
        for k in self.with_b:  # a tied weight seen first where it has no B
            self.other.pop(k, None)


class FollowCalls(TorchFunctionMode):
    """One training forward: routes the calls that use a weight with a B, records the
    rest (see the module docstring). `reads`: weight name -> calls that read its B."""

    def __init__(self, weights: Weights, reads: dict[str, set[str]]) -> None:
        super().__init__()
        self.weights, self.reads = weights, reads
        # id -> (tensor, root id, replay) for forms of a weight: t = replay of transforms on the root
        self.forms: dict[int, tuple[Tensor, int, tuple]] = {}
        # id -> (tensor, weight name, "op(), op(), ") for weights computed from weights
        self.derived: dict[int, tuple[Tensor, str, str]] = {}
        self.b_cache: dict[int, Tensor] = {}
        self.offences: dict[str, set[str]] = {}  # weight name -> calls it cannot go through

    # -- what an operand is --------------------------------------------------------

    def root(self, t: Tensor) -> int | None:
        """id of the weight `t` is a form of (itself, a recorded transform, or a view)."""
        k = id(t)
        if k in self.weights.with_b or k in self.weights.other:
            return k
        if k in self.forms:
            return self.forms[k][1]
        base = t._base
        if base is not None and (id(base) in self.weights.with_b or id(base) in self.weights.other):
            return id(base)
        return None

    def name(self, k: int) -> str:
        return self.weights.with_b[k][2] if k in self.weights.with_b else self.weights.other[k]

    def feedback(self, t: Tensor) -> Tensor | None:
        """B of operand t, viewed as t is; None if t is not a form of a weight with a B."""
        k = self.root(t)
        if k is None or k not in self.weights.with_b:
            return None
        if id(t) in self.b_cache:
            return self.b_cache[id(t)]
        owner, attr, _ = self.weights.with_b[k]
        if k not in self.b_cache:  # once per forward: brsf draws once however often W is used
            self.b_cache[k] = feedback_for(owner, attr)
        B = self.b_cache[k]
        if id(t) in self.forms:
            for func, rest, kwargs, index in self.forms[id(t)][2]:
                B = func(B, *rest, **kwargs)
                B = B if index is None else B[index]
        elif id(t) != k:  # a view made before the forward began: the same strides on B
            w = t._base
            B = B.as_strided(t.shape, t.stride(), t.storage_offset() - w.storage_offset())
        self.b_cache[id(t)] = B
        return B

    # -- the calls -----------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():  # an autograd Function's forward, or no_grad code
            return func(*args, **kwargs)
        name = _name(func)
        if name == "embedding":  # a table lookup: its rows are data (activations), not a weight
            return func(*args, **kwargs)
        if name in PRODUCTS:
            return self._product(func, name, args, kwargs)
        out = func(*args, **kwargs)
        first = args[0] if args else None
        if name in TRANSFORMS and isinstance(first, Tensor) and self.root(first) is not None:
            self._record_forms(func, first, args[1:], kwargs, out)
        elif isinstance(out, Tensor):
            self._maybe_derived(name, list(_tensors(args, kwargs)), out)
        return out

    def _known(self, t: Tensor) -> bool:
        return self.root(t) is not None or id(t) in self.derived

    def _maybe_derived(self, name: str, operands: list[Tensor], out: Tensor) -> None:
        """Record `out` as a weight computed from weights (w * mask, w / ‖w‖, a @ b): every
        operand a weight, such a computed weight, or a constant without gradient."""
        known = [t for t in operands if self._known(t)]
        if known and all(self._known(t) or not t.requires_grad for t in operands):
            t = known[0]
            weight, how = self.derived[id(t)][1:] if id(t) in self.derived else (self.name(self.root(t)), "")
            self.derived[id(out)] = (out, weight, f"{how}{name}(), ")

    def _record_forms(self, func, first: Tensor, rest: tuple, kwargs: dict, out) -> None:
        k = self.root(first)
        chain = self.forms[id(first)][2] if id(first) in self.forms else ()
        if isinstance(out, Tensor):
            self.forms[id(out)] = (out, k, (*chain, (func, rest, kwargs, None)))
        elif isinstance(out, (tuple, list)):  # chunk, split, unbind
            for i, o in enumerate(out):
                if isinstance(o, Tensor):
                    self.forms[id(o)] = (o, k, (*chain, (func, rest, kwargs, i)))

    def _product(self, func, name: str, args: tuple, kwargs: dict):
        operands = _operands(name, args, kwargs)
        known = [t for t in operands if self._known(t)]
        if not known:  # activations only (attention scores, a user's q @ kᵀ)
            return func(*args, **kwargs)
        slots = _weight_slots(name, args, kwargs)  # the operands in a weight's place
        if slots is None:  # matmul-like: a weight itself (or its form) is the weight; else a computed one
            slots = [t for t in known if self.root(t) is not None] or known
        weights = [t for t in known if any(t is s for s in slots)]
        data = [t for t in operands if not any(t is w for w in weights)]
        if not weights or not data:  # a weight as data (x + pos fed to a layer), or weights alone
            out = func(*args, **kwargs)
            if not data and isinstance(out, Tensor):
                self._maybe_derived(name, operands, out)
            return out
        grad_below = any(t.requires_grad for t in data)
        state = self.feedback_of_root(weights[0]) if len(weights) == 1 and name in ROUTES else None
        if state is not None:
            w = weights[0]
            if not grad_below and not state.requires_grad:
                out = func(*args, **kwargs)  # no error goes below: the weight's gradient is the true one
            else:
                out = ROUTES[name](args, kwargs, self.feedback)
            if out is not None:
                self.reads.setdefault(self.name(self.root(w)), set()).add(f"{name}()")
                return out
        if grad_below:
            for t in weights:
                if id(t) in self.derived:
                    _, weight, how = self.derived[id(t)]
                    self.offences.setdefault(weight, set()).add(f"computed by {how}then {name}()")
                elif self.root(t) not in self.weights.with_b:
                    self.offences.setdefault(self.name(self.root(t)), set()).add(f"{name}() (it has no B)")
                else:
                    self.offences.setdefault(self.name(self.root(t)), set()).add(f"{name}()")
        return func(*args, **kwargs)

    def feedback_of_root(self, t: Tensor) -> Tensor | None:
        """The stored feedback of t's weight (a Parameter under kp, which needs the route
        even where no error goes below: B takes W's gradient); None without one."""
        k = self.root(t)
        if k is None or k not in self.weights.with_b or id(t) in self.derived:
            return None
        owner, attr, _ = self.weights.with_b[k]
        return getattr(owner, feedback_name(attr))


def _operands(name: str, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors a product multiplies (a bias or an added input is not one)."""
    if name in ("linear", "bilinear") or name.startswith("conv"):
        n = 3 if name == "bilinear" else 2
        keys = ("input1", "input2", "weight")[:n] if name == "bilinear" else ("input", "weight")
        return [
            t for t in (*args[:n], *(kwargs.get(k) for k in keys[len(args[:n]) :])) if isinstance(t, Tensor)
        ]
    if name in ("addmm", "baddbmm", "addmv"):
        return [t for t in args[1:3] if isinstance(t, Tensor)]
    if name == "einsum":
        return list(_tensors(args[1:], {}))
    if name == "scaled_dot_product_attention":  # attn_mask is added to the scores (BEiT's position bias)
        qkv = (*args[:3], *(kwargs.get(k) for k in ("query", "key", "value")[len(args[:3]) :]))
        return [t for t in qkv if isinstance(t, Tensor)]
    return list(_tensors(args, kwargs))


def _weight_slots(name: str, args: tuple, kwargs: dict) -> list[Tensor] | None:
    """The operand in a weight's place for calls that have one; None: any operand may be."""
    if name in ("linear", "bilinear") or name.startswith("conv"):
        i = 2 if name == "bilinear" else 1
        return [args[i] if len(args) > i else kwargs.get("weight")]
    return None


class Follower:
    """Per converted model, shared by the hooks of all its modules (in each module's
    __dict__, not a child): enters FollowCalls for the outermost module call."""

    def __init__(self, rule: str) -> None:
        self.rule = rule
        self.rule_active = True
        self.reads: dict[str, set[str]] = {}  # weight name -> calls that read its B (all forwards so far)
        self.checked = False  # an eager training forward has run
        self._module: nn.Module | None = None
        self._depth = 0
        self._mode: FollowCalls | None = None

    def __deepcopy__(self, memo):
        new = Follower(self.rule)
        new.rule_active, new.checked = self.rule_active, self.checked
        new.reads = {k: set(v) for k, v in self.reads.items()}
        return new

    def __getstate__(self):
        return {
            "rule": self.rule,
            "rule_active": self.rule_active,
            "reads": self.reads,
            "checked": self.checked,
        }

    def __setstate__(self, state) -> None:
        self.__init__(state["rule"])
        self.rule_active, self.reads, self.checked = state["rule_active"], state["reads"], state["checked"]

    @property
    def needs_calls(self) -> bool:
        """Some weight's B is read only through the calls this follows (not a twin's forward)."""
        return bool(self.reads)

    def enter(self, module: nn.Module) -> None:
        if self._module is not None:
            self._depth += module is self._module
            return
        if not self.rule_active or not torch.is_grad_enabled():
            return
        if torch.compiler.is_compiling():
            if self.needs_calls:
                raise ValueError(
                    f"{self.rule}: this model uses weights through calls ({', '.join(sorted(self.reads))}) "
                    "that torch.compile hides from the rule; train it without torch.compile"
                )
            return
        self._module, self._depth = module, 1
        self._mode = FollowCalls(Weights(module), self.reads)
        self._mode.__enter__()

    def exit(self, module: nn.Module) -> None:
        if module is not self._module:
            return
        self._depth -= 1
        if self._depth:
            return
        mode, self._mode, self._module = self._mode, None, None
        mode.__exit__(None, None, None)
        if sys.exc_info()[0] is not None:  # the forward raised: let that error through
            return
        self.checked = True
        if mode.offences:
            lines = [f"  {w}: {', '.join(sorted(calls))}" for w, calls in sorted(mode.offences.items())]
            raise ValueError(
                f"{self.rule} cannot train these weights of {type(module).__name__} through the calls its "
                "forward makes, where autograd would train them (and what lies below) by back-propagation:\n"
                + "\n".join(lines)
                + "\nA weight is followed through F.linear, F.bilinear, F.conv*, matmul/mm/bmm/mv, addmm/"
                "baddbmm/addmv and two-operand einsum, as itself or a view or cast of it. Use such a call "
                "(or an nn.Linear sharing the parameter, for a tied embedding), or convert with rule 'bp'"
            )


def _enter(module: nn.Module, args) -> None:
    follower = module.__dict__.get("_fa_calls")
    if follower is not None:
        follower.enter(module)


def _exit(module: nn.Module, args, output) -> None:
    follower = module.__dict__.get("_fa_calls")
    if follower is not None:
        follower.exit(module)


def _torch_own(m: nn.Module) -> bool:
    """A module whose forward is torch.nn's own (or a twin's): it multiplies by no weight
    but its own, each through its twin's forward (or, an Embedding, indexes a table)."""
    return isinstance(m, FALayer) or type(m).__module__.startswith("torch.nn.")


def install(model: nn.Module, rule: str) -> Follower | None:
    """Follow the calls of `model`'s training forwards (hooks on every module). A model made
    of torch.nn's own modules only (nn.Sequential of layers, the paper's networks) has no
    call to follow: every weight is its twin's, so it gets no hooks and pays nothing."""
    if all(_torch_own(m) for m in model.modules()):
        return None
    follower = Follower(rule)
    for m in model.modules():
        m.__dict__["_fa_calls"] = follower
        m.register_forward_pre_hook(_enter)
        m.register_forward_hook(_exit, always_call=True)
    return follower


def follower_of(model: nn.Module) -> Follower | None:
    return model.__dict__.get("_fa_calls")


def rule_weights(model: nn.Module) -> dict[str, tuple[nn.Module, str, str]]:
    """Every weight of `model` that has a B: qualified name -> (owner, attribute, status).
    status: "layer" (a torch layer kind's twin reads its B in its forward), "calls" (read
    through the calls a forward made, rules/calls.py), "unused" (a training forward ran
    and never used it as a weight: it learns from the error that reaches it), "pending"
    (no training forward yet: known at the first)."""
    follower = follower_of(model)
    reads = follower.reads if follower is not None else {}
    checked = follower is not None and follower.checked
    out: dict[str, tuple[nn.Module, str, str]] = {}
    seen: set[int] = set()
    in_layers = {id(c) for m in model.modules() if isinstance(m, FALayer) for c in m.modules()}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen or not hasattr(m, feedback_name(pname)):
                continue
            seen.add(id(p))
            qual = f"{mname}.{pname}" if mname else pname
            if id(m) in in_layers:  # a twin, or attention's out_proj inside one
                status = "layer"
            else:
                status = "calls" if qual in reads else ("unused" if checked else "pending")
            out[qual] = (m, pname, status)
    return out
