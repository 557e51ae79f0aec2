"""One typed configuration: every option of the original (docs/original.md §4–6)
under its original name and default, plus what feedalign adds.

Field names keep the original spelling (`LR`, `batchSize`, `epoch_step`, …) so that
`options.json` reads like the original command line. `check()` refuses impossible
values before any data is loaded, listing what is allowed. The allowed choices are
the keys of the registries that implement them (one list per choice), and the
numeric limits shared with `build_model` live in feedalign/checks.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from feedalign import rules
from feedalign.checks import (
    MODEL_LIMITS,
    Limit,
    check_limits,
    finite_above,
    finite_at_least,
    int_at_least,
    probability,
)
from feedalign.checks import one_of as one_of_ints
from feedalign.data import DATASETS
from feedalign.data.text import is_text
from feedalign.dist import THREADS_DEFAULT, default_threads
from feedalign.losses import CRITERIA
from feedalign.models import FEEDBACK_INITS, INITS, NONLINS
from feedalign.models.convert import ERROR_AT
from feedalign.preprocess import FORMATS, NORMALIZATIONS
from feedalign.train.optim import MAX_NORM_OFF, OPTIMIZERS

TYPES = ("float", "cuda")
LR_SCHEDULES = ("none", "cosine")
TAPS = ("macro", "micro")
AMP = ("none", "bf16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")

# Options that `--resume` may change: how the run is executed, not what it computes.
# The device type may not change: a mid-epoch checkpoint continues the epoch's
# shuffle, which is drawn on the run's device.
RESUME_MAY_CHANGE = frozenset({"epoch", "quiet", "threads", "devid", "compile_optimizer", "memory_format"})


class OptionError(ValueError):
    """An option value (or option file) that cannot work; the message lists what is allowed."""


def _choices() -> dict[str, tuple[str, ...]]:
    """Option -> allowed values: the keys of the registry that implements each choice."""
    return {
        "criterion": tuple(CRITERIA), "nonlin": tuple(NONLINS), "gradient": tuple(rules.RULES),
        "optimization": tuple(OPTIMIZERS), "normalization": tuple(NORMALIZATIONS),
        "format": tuple(FORMATS), "type": TYPES, "amp": AMP, "error_at": tuple(ERROR_AT),
        "feedback_init": FEEDBACK_INITS, "memory_format": MEMORY_FORMATS, "init": tuple(INITS),
        "lr_schedule": LR_SCHEDULES, "taps": TAPS,
    }  # fmt: skip


# Numeric options' limits (the model's come from feedalign/checks.py, shared with build_model).
LIMITS: dict[str, Limit] = MODEL_LIMITS | {
    "LR": finite_above(0), "batchSize": int_at_least(1),
    "epoch": (lambda v: isinstance(v, int) and (v == -1 or v >= 1), "-1 or >= 1"),
    "epoch_step": int_at_least(-1), "bias": one_of_ints(0, 1), "accGradient": one_of_ints(0, 1),
    "eps": finite_at_least(0), "LRDecay": finite_at_least(0), "weightDecay": finite_at_least(0),
    "momentum": probability(),
    "maxInNorm": finite_above(0), "maxOutNorm": finite_above(0), "threads": int_at_least(1),
    "devid": (lambda v: isinstance(v, int) and v >= 1, ">= 1 (1-based)"), "nGPU": int_at_least(1),
    "visualize": one_of_ints(0, 1), "alignment": int_at_least(0),
    "lr_gamma": finite_above(0), "resize": int_at_least(0), "jitter": int_at_least(0),
    "context": int_at_least(1), "iterations": int_at_least(0),
    "eval_every": int_at_least(1), "eval_windows": int_at_least(0), "warmup": int_at_least(0),
    "min_lr": finite_at_least(0), "clip": finite_at_least(0),
    "beta1": probability(), "beta2": probability(),
}  # fmt: skip

_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "int | None": (int, type(None))}


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would use, if there is one."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def _default_type() -> str:
    return "cuda" if torch.cuda.is_available() else "float"


def option(default, help: str, *, shown: str | None = None, **kw):
    """A field whose help text (with unit) lives beside its default. `shown`: how the help
    states a default that is not the value itself (a placeholder, or filled in at run time)."""
    return field(default=default, metadata={"help": help, "shown": shown, **kw})


def computed(factory, help: str, *, shown: str):
    """A field whose default depends on the machine (`factory()` at construction)."""
    return field(default_factory=factory, metadata={"help": help, "shown": shown})


@dataclass
class Options:
    # --- model (docs/original.md §2) ---
    modelsFolder: str = option("./Models/", "folder searched for <network>.py model files")
    network: str = option(
        "mlp", "network: mlp | conv (also mlp.lua, conv.lua) | lenet | resnet20 | a file in modelsFolder"
    )
    criterion: str = option("bce", "loss: bce (binary cross-entropy) | ce (cross-entropy)")
    dropout: int = option(
        0, "dropout: 0 off, 1 on; 2 = mlp: input dropout only, conv: conv-layer dropout only"
    )
    batchnorm: int = option(0, "batch normalization: 0 off, 1 on; 2 = conv: second conv only (mlp: none)")
    nonlin: str = option("tanh", "nonlinearity: tanh | sigm | relu")
    num_layers: int = option(2, "hidden layers of mlp (count)")
    num_hidden: int = option(800, "units per hidden layer of mlp (count)")
    bias: int = option(1, "1 = use biases, 0 = biases fixed at zero")
    rfb_mag: float = option(
        0.0,
        "feedback magnitude X: 0 = docs/original.md §1 (fa: copy of the initial W; dfa: "
        "U[±1/sqrt(n_i)], n_i = tap size), X > 0: U[-X, X]",
    )
    gradient: str = option("dfa", f"learning rule: {' | '.join(rules.RULES)} (docs/rules.md)")
    taps: str = option(
        "macro",
        "direct rules (dfa, drtp): macro = one tap per block | micro = also one after each "
        "transformer block's attention (Launay et al. 2020)",
    )
    heads: int = option(4, "attention heads of gpt (count; -num_hidden must be a multiple)")
    context: int = option(64, "language models: window length in characters (tokens)")
    dropout_rate: float = option(
        0.0,
        "dropout probability: language models (nanoGPT's dropout); mlp: after each hidden layer, "
        "instead of -dropout 1's 0.5 (the local-loss recipe: 0.1)",
    )
    # --- optimisation (docs/original.md §4) ---
    eps: float = option(0.0, "adversarial (fast gradient sign) step, in preprocessed input units; 0 off")
    accGradient: int = option(0, "1 = add the clean gradient to the adversarial one (if eps > 0)")
    LR: float = option(1e-4, "learning rate")
    LRDecay: float = option(0.0, "LR decay per step: lr_t = LR / (1 + t·LRDecay) (sgd, adam, adagrad)")
    weightDecay: float = option(
        0.0,
        "L2 penalty added to the gradient (coefficient); adamw: decoupled decay, on weights of ≥ 2 dims only",
    )
    momentum: float = option(0.0, "momentum (sgd only)")
    batchSize: int = option(64, "mini-batch size (samples)")
    optimization: str = option("rmsprop", "optimizer: " + " | ".join(tuple(OPTIMIZERS)))
    epoch: int = option(300, "epochs to train (-1 = unbounded); text data: set from -iterations")
    iterations: int = option(
        0,
        "text data: training iterations, one batch of -batchSize windows each "
        "(required there; image data trains for -epoch)",
    )
    eval_every: int = option(250, "text data: evaluate (and checkpoint) every N iterations")
    eval_windows: int = option(
        0,
        "text data: validation windows per evaluation: 0 = the whole validation split, cut into windows "
        "at a seeded offset (the same for every run); N = a seeded sample of N of them",
    )
    beta1: float = option(0.9, "adam, adamw: first-moment decay β1")
    beta2: float = option(0.999, "adam, adamw: second-moment decay β2")
    warmup: int = option(0, "iterations of linear LR warm-up from LR/(warmup+1) to LR (0 = none)")
    lr_schedule: str = option(
        "none",
        "per-iteration LR decay: none | cosine (from LR after -warmup to -min_lr at the last of -iterations)",
    )
    min_lr: float = option(0.0, "-lr_schedule cosine: the LR reached at the last iteration")
    clip: float = option(0.0, "clip the global L2 norm of the gradient to this before each step (0 = off)")
    epoch_step: int = option(-1, "LR halving: -1 never, 0 auto (on no improvement), k > 0 every k epochs")
    maxInNorm: float = option(
        MAX_NORM_OFF, f"max L2 norm of each weight slice along the last dim ({MAX_NORM_OFF:g} = off)"
    )
    maxOutNorm: float = option(
        MAX_NORM_OFF, f"max L2 norm of each weight slice along dim 0 ({MAX_NORM_OFF:g} = off)"
    )
    # --- data (docs/original.md §5) ---
    dataset: str = option(
        "MNIST",
        "dataset: " + " | ".join(tuple(DATASETS)) + " | a UTF-8 text file (a path ending .txt or with /)",
    )
    datapath: str = option("./Datasets/", "folder holding <dataset>/ with the official files")
    normalization: str = option("scale", "normalization: " + " | ".join(tuple(NORMALIZATIONS)))
    format: str = option("rgb", "colour format: " + " | ".join(FORMATS))
    whiten: bool = option(False, "ZCA-whiten the data (replaces normalization)")
    augment: bool = option(False, "augment training images (random crop, flip, rescale)")
    jitter: int = option(
        0, "shift training images by up to N pixels each way (pad N with the darkest value, random crop)"
    )
    hflip: bool = option(False, "flip training images horizontally with probability 0.5")
    preProcDir: str = option("./PreProcData/", "folder caching fitted preprocessing constants")
    validate: bool = option(False, "hold out the last 10k training images as the test set")
    # --- platform and artefacts (docs/original.md §6) ---
    threads: int = computed(default_threads, "CPU threads for torch (count)",
                            shown=f"{default_threads()} here: {THREADS_DEFAULT}")  # fmt: skip
    type: str = computed(
        _default_type, "float (CPU) | cuda (GPU)", shown="cuda if a GPU is present, else float"
    )
    devid: int = option(1, "GPU id, 1-based as the original")
    nGPU: int = option(1, "processes (GPUs) for data parallelism: N > 1 starts N processes (like torchrun)")
    load: str = option("none", "file with network weights to start from (none = fresh)")
    save: str = option("", "run directory", shown="./runs/<timestamp>")
    visualize: int = option(0, "1 = plot the error curves to errors.png")
    # --- feedalign additions ---
    seed: int | None = option(None, "random seed", shown="drawn, then printed and saved in options.json")
    quiet: bool = option(False, "no progress bar")
    tensorboard: bool = option(False, "also write TensorBoard event files (needs tensorboard)")
    alignment: int = option(0, "every N steps log alignment angles with back-prop (0 = off)")
    error_at: str = option("logits", "dfa error: logits (dL/dy) | output (the original's under ce)")
    feedback_init: str = option(
        "original",
        "per-layer rules' B_0: original (fa: a copy of the initial W; others: random) | "
        "random (drawn like the layer's default init) | weights (a copy of the initial W)",
    )
    svhn_extra: bool = option(True, "SVHN: train on train + extra (as the original)")
    amp: str = option("none", "autocast on cuda: none | bf16")
    compile_optimizer: bool = option(
        False,
        "run the optimizer step as one torch.compile'd kernel (faster; "
        "compiles for ~20 s on first use; needs a C++ compiler on the CPU)",
    )
    lr_milestones: str = option(
        "", "step LR schedule: epochs after which LR is multiplied by lr_gamma, e.g. 50,75 (empty = off)"
    )
    lr_gamma: float = option(0.1, "LR factor applied at each of lr_milestones")
    resize: int = option(0, "resize images to resize×resize (bilinear) before preprocessing; 0 = as stored")
    init: str = option(
        "classic",
        "weight init: classic (U(±1/sqrt(fan_in)), the original's) | xavier (xavier-uniform "
        "weights, zero biases, per-layer rules' feedback drawn and scaled like it: BioTorch's default)",
    )
    memory_format: str = option(
        "auto",
        "conv weights' layout: auto (channels_last for networks with 2-d convolutions on the CPU, "
        "where it is faster) | contiguous | channels_last; the same math either way",
    )

    def check(self) -> Options:
        """Refuse impossible values before any work starts (OptionError lists what is allowed)."""
        self.check_types()
        for name, allowed in _choices().items():
            if getattr(self, name) not in allowed:
                raise OptionError(
                    f"-{name} {getattr(self, name)!r} is not allowed; choose one of {', '.join(allowed)}"
                )
        ds = {d.lower(): d for d in DATASETS}
        if self.dataset.lower() in ds:
            self.dataset = ds[self.dataset.lower()]
        elif not is_text(self.dataset):
            raise OptionError(f"-dataset {self.dataset!r} is unknown; choose one of {', '.join(DATASETS)}, "
                              "or give a text file's path")  # fmt: skip
        check_limits(self.to_dict(), LIMITS, prefix="-", error=OptionError)
        if self.batchnorm and self.batchSize == 1:
            raise OptionError("-batchSize 1 with -batchnorm: BatchNorm cannot normalise a batch of one "
                              "sample; use -batchSize 2 or more, or -batchnorm 0")  # fmt: skip
        self._check_step_schedule()
        self._check_text()
        self._check_files_and_shapes()
        if self.type == "cuda":
            if not torch.cuda.is_available():
                raise OptionError("-type cuda needs a GPU, and none is available; use -type float")
            if self.devid > torch.cuda.device_count():
                raise OptionError(
                    f"-devid {self.devid}: only {torch.cuda.device_count()} GPU(s) present (1-based)"
                )
        if self.type == "cuda" and self.nGPU > torch.cuda.device_count():
            raise OptionError(f"-nGPU {self.nGPU}: only {torch.cuda.device_count()} GPU(s) present")
        if self.amp != "none" and self.type != "cuda":
            raise OptionError("--amp bf16 needs -type cuda")
        if self.compile_optimizer and self.type == "float" and not cxx_compiler():
            raise OptionError(
                "--compile_optimizer on the CPU needs a C++ compiler (g++ or clang++ on "
                "PATH, or $CXX) for torch.compile; install one or leave the option off"
            )
        if self.error_at != "logits" and self.gradient != "dfa":
            raise OptionError("-error_at output only applies to -gradient dfa")
        return self

    def _check_step_schedule(self) -> None:
        """-lr_milestones parses as increasing positive epochs (-lr_gamma, -resize: LIMITS)."""
        from feedalign.train.optim import parse_milestones

        try:
            parse_milestones(self.lr_milestones)
        except ValueError as err:
            raise OptionError(f"-lr_milestones: {err}") from None

    @property
    def text(self) -> bool:
        """Whether -dataset is character-level text (a language-model run, counted in iterations)."""
        return is_text(self.dataset)

    def _check_text(self) -> None:
        """Language models take text and text takes language models; the recipe's options fit."""
        from feedalign.models import LANGUAGE_MODELS, NETWORKS

        network = self.network.removesuffix(".py")
        if network in LANGUAGE_MODELS and not self.text:
            raise OptionError(f"-network {network} is a language model: give a text -dataset "
                              f"(shakespeare_char or a .txt file), not {self.dataset}")  # fmt: skip
        if self.text and network in NETWORKS and network not in LANGUAGE_MODELS:
            raise OptionError(f"-dataset {self.dataset} is text: use -network {' or '.join(LANGUAGE_MODELS)} "
                              f"(or a model file taking token windows), not {network}")  # fmt: skip
        if self.text:
            if self.iterations < 1:
                raise OptionError(f"-dataset {self.dataset} trains for a number of iterations: give "
                                  "-iterations N (nanoGPT's recipe: 2000)")  # fmt: skip
            if self.criterion != "ce":
                raise OptionError("text data is scored in nats per character: use -criterion ce")
            if self.eps > 0 or self.validate or self.whiten or self.augment or self.jitter or self.hflip:
                raise OptionError("-eps, -validate, -whiten, -augment, -jitter and -hflip are for images; "
                                  "text data has a validation split already (its last 10%)")  # fmt: skip
            if self.heads and self.num_hidden % self.heads and network == "gpt":
                raise OptionError(f"-num_hidden {self.num_hidden} must be a multiple of -heads {self.heads}")
        elif self.iterations:
            raise OptionError("-iterations counts text-data iterations; image data trains for -epoch")
        if self.lr_schedule == "cosine" and not self.iterations:
            raise OptionError("-lr_schedule cosine decays over -iterations: give -iterations (text data)")
        if self.dropout_rate and network in NETWORKS and network not in (*LANGUAGE_MODELS, "mlp"):
            raise OptionError(f"-dropout_rate sets the dropout of mlp, gpt and lstm; -network {network} has "
                              "its own (-dropout)")  # fmt: skip
        if self.taps != "macro" and rules.RULES[self.gradient].kind not in ("direct", "local"):
            raise OptionError(f"-taps {self.taps} places the taps of direct and local rules; "
                              f"-gradient {self.gradient} has none")  # fmt: skip

    def _check_files_and_shapes(self) -> None:
        """The network exists, fits the dataset's images, and -load names a file."""
        from feedalign.data import get_dataset
        from feedalign.models import find_network
        from feedalign.models.conv import pooled_size

        try:
            find_network(self.network, self.modelsFolder)
        except ValueError as err:
            raise OptionError(str(err)) from None
        if self.network.removesuffix(".lua") == "conv":
            shape = get_dataset(self.dataset).shape
            h = shape[-1]
            for _ in range(3):
                h = pooled_size(h)
            if h < 1:
                raise OptionError(f"-network conv needs images of at least 15×15 (three 3/2 poolings), "
                                  f"{self.dataset} has {shape}: use -network mlp")  # fmt: skip
        if self.load != "none" and Path(self.load).is_dir():
            raise OptionError(f"-load {self.load}: is a folder; give a weights file (a checkpoint.pt)")
        if self.load != "none" and not Path(self.load).is_file():
            raise OptionError(f"-load {self.load}: no such file")

    def check_types(self) -> None:
        """Each value has its field's type (options.json or a library caller may say "1e-3")."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            wanted = _TYPES[str(f.type)]
            if not isinstance(value, wanted) or (isinstance(value, bool) and f.type != "bool"):
                raise OptionError(f"-{f.name} {value!r}: expected {f.type}, got {type(value).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Options:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OptionError(f"unknown options {unknown}")
        return cls(**d)
