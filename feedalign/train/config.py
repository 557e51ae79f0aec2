"""One typed configuration: every option of the original (SPEC §4–6, ORIGINAL_README
option table) under its original name and default, plus what feedalign adds.

Field names keep the original spelling (`LR`, `batchSize`, `epoch_step`, …) so that
`options.json` reads like the original command line. `check()` refuses impossible
values before any data is loaded, listing what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from feedalign.losses import CRITERIA
from feedalign.models import NONLINS
from feedalign.rules import RULES

OPTIMIZERS = ("sgd", "rmsprop", "adam", "adagrad", "adadelta", "adamax")
NORMALIZATIONS = ("scale", "simple", "channel", "image")
FORMATS = ("rgb", "yuv")
TYPES = ("float", "cuda")
AMP = ("none", "bf16")
DATASETS = ("MNIST", "FashionMNIST", "Cifar10", "Cifar100", "SVHN", "STL10", "digits")


class OptionError(ValueError):
    """An option value (or option file) that cannot work; the message lists what is allowed."""


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would use, if there is one."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def _default_type() -> str:
    return "cuda" if torch.cuda.is_available() else "float"


def opt(default, help: str, **kw):
    """A field whose help text (with unit) lives beside its default."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Options:
    # --- model (SPEC §2) ---
    modelsFolder: str = opt("./Models/", "folder searched for <network>.py model files")
    network: str = opt("mlp", "network: mlp | conv (also mlp.lua, conv.lua) | a file in modelsFolder")
    criterion: str = opt("bce", "loss: bce (binary cross-entropy) | ce (cross-entropy)")
    dropout: int = opt(0, "dropout: 0 off, 1 on; 2 = mlp: input dropout only, conv: conv-layer dropout only")
    batchnorm: int = opt(0, "batch normalization: 0 off, 1 on; 2 = conv: second conv only (mlp: none)")
    nonlin: str = opt("tanh", "nonlinearity: tanh | sigm | relu")
    num_layers: int = opt(2, "hidden layers of mlp (count)")
    num_hidden: int = opt(800, "units per hidden layer of mlp (count)")
    bias: int = opt(1, "1 = use biases, 0 = biases fixed at zero")
    rfb_mag: float = opt(
        0.0,
        "feedback magnitude X: 0 = SPEC §1 (fa: copy of the initial W; dfa: "
        "U[±1/sqrt(n_i)], n_i = tap size), X > 0: U[-X, X]",
    )
    gradient: str = opt("dfa", f"learning rule: {' | '.join(RULES)} (docs/rules.md)")
    # --- optimisation (SPEC §4) ---
    eps: float = opt(0.0, "adversarial (fast gradient sign) step, in preprocessed input units; 0 off")
    accGradient: int = opt(0, "1 = add the clean gradient to the adversarial one (if eps > 0)")
    LR: float = opt(1e-4, "learning rate")
    LRDecay: float = opt(0.0, "LR decay per step: lr_t = LR / (1 + t·LRDecay) (sgd, adam, adagrad)")
    weightDecay: float = opt(0.0, "L2 penalty added to the gradient (coefficient)")
    momentum: float = opt(0.0, "momentum (sgd only)")
    batchSize: int = opt(64, "mini-batch size (samples)")
    optimization: str = opt("rmsprop", "optimizer: " + " | ".join(OPTIMIZERS))
    epoch: int = opt(300, "epochs to train (-1 = unbounded)")
    epoch_step: int = opt(-1, "LR halving: -1 never, 0 auto (on no improvement), k > 0 every k epochs")
    maxInNorm: float = opt(400.0, "max L2 norm of each weight slice along the last dim (400 = off)")
    maxOutNorm: float = opt(400.0, "max L2 norm of each weight slice along dim 0 (400 = off)")
    # --- data (SPEC §5) ---
    dataset: str = opt("MNIST", "dataset: " + " | ".join(DATASETS))
    datapath: str = opt("./Datasets/", "folder holding <dataset>/ with the official files")
    normalization: str = opt("scale", "normalization: " + " | ".join(NORMALIZATIONS))
    format: str = opt("rgb", "colour format: rgb | yuv")
    whiten: bool = opt(False, "ZCA-whiten the data (replaces normalization)")
    augment: bool = opt(False, "augment training images (random crop, flip, rescale)")
    preProcDir: str = opt("./PreProcData/", "folder caching fitted preprocessing constants")
    validate: bool = opt(False, "hold out the last 10k training images as the test set")
    # --- platform and artefacts (SPEC §6) ---
    threads: int = opt(8, "CPU threads for torch (count)")
    type: str = field(
        default_factory=_default_type,
        metadata={"help": "float (CPU) | cuda (GPU); default cuda if a GPU is present"},
    )
    devid: int = opt(1, "GPU id, 1-based as the original")
    nGPU: int = opt(1, "processes (GPUs) for data parallelism: N > 1 launches torchrun")
    load: str = opt("none", "file with network weights to start from (none = fresh)")
    save: str = opt("", "run directory (default: ./runs/<timestamp>)")
    visualize: int = opt(0, "1 = plot the error curves to errors.png")
    # --- feedalign additions ---
    seed: int | None = opt(None, "random seed (default: drawn, then saved in options.json)")
    quiet: bool = opt(False, "no progress bar")
    tensorboard: bool = opt(False, "also write TensorBoard event files (needs tensorboard)")
    alignment: int = opt(0, "every N steps log alignment angles with back-prop (0 = off)")
    error_at: str = opt("logits", "dfa error: logits (dL/dy) | output (the original's under ce)")
    svhn_extra: bool = opt(True, "SVHN: train on train + extra (as the original)")
    amp: str = opt("none", "autocast on cuda: none | bf16")
    compile_optimizer: bool = opt(
        False,
        "run the optimizer step as one torch.compile'd kernel (faster; "
        "compiles for ~20 s on first use; needs a C++ compiler on the CPU)",
    )

    def check(self) -> Options:
        """Refuse impossible values before any work starts (ValueError lists what is allowed)."""
        choices = {
            "criterion": tuple(CRITERIA), "nonlin": tuple(NONLINS), "gradient": tuple(RULES),
            "optimization": OPTIMIZERS, "normalization": NORMALIZATIONS, "format": FORMATS,
            "type": TYPES, "amp": AMP, "error_at": ("logits", "output"),
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise OptionError(
                    f"-{name} {getattr(self, name)!r} is not allowed; choose one of {', '.join(allowed)}"
                )
        ds = {d.lower(): d for d in DATASETS}
        if self.dataset.lower() not in ds:
            raise OptionError(f"-dataset {self.dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
        self.dataset = ds[self.dataset.lower()]
        ranges = [
            ("LR", self.LR > 0, "> 0"), ("batchSize", self.batchSize >= 1, ">= 1"),
            ("epoch", self.epoch == -1 or self.epoch >= 1, "-1 or >= 1"),
            ("epoch_step", self.epoch_step >= -1, "-1, 0 or > 0"),
            ("dropout", self.dropout in (0, 1, 2), "0, 1 or 2"),
            ("batchnorm", self.batchnorm in (0, 1, 2), "0, 1 or 2"),
            ("num_layers", self.num_layers >= 1, ">= 1"), ("num_hidden", self.num_hidden >= 1, ">= 1"),
            ("bias", self.bias in (0, 1), "0 or 1"), ("accGradient", self.accGradient in (0, 1), "0 or 1"),
            ("eps", self.eps >= 0, ">= 0"), ("rfb_mag", self.rfb_mag >= 0, ">= 0"),
            ("LRDecay", self.LRDecay >= 0, ">= 0"), ("weightDecay", self.weightDecay >= 0, ">= 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("maxInNorm", self.maxInNorm > 0, "> 0"), ("maxOutNorm", self.maxOutNorm > 0, "> 0"),
            ("threads", self.threads >= 1, ">= 1"), ("devid", self.devid >= 1, ">= 1 (1-based)"),
            ("nGPU", self.nGPU >= 1, ">= 1"), ("visualize", self.visualize in (0, 1), "0 or 1"),
            ("alignment", self.alignment >= 0, ">= 0"),
        ]  # fmt: skip
        for name, ok, allowed in ranges:
            if not ok:
                raise OptionError(f"-{name} {getattr(self, name)!r} is not allowed; it must be {allowed}")
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
        if self.load != "none" and not Path(self.load).is_file():
            raise OptionError(f"-load {self.load}: no such file")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Options:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OptionError(f"unknown options {unknown}")
        return cls(**d)
