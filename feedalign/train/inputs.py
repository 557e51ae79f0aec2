"""The inputs of a run: its data (loaded and preprocessed once, on the device) and its
model (built from the options, in the memory layout that suits the device)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from feedalign.models import ModelFileError, build_model
from feedalign.train.config import Options
from feedalign.train.rundir import is_builtin


@dataclass
class Data:
    """Images: (N, C, H, W) float32 preprocessed and (N,) int64 labels. Text: train_x is the
    training split's character ids (L,) int64 (the loader cuts windows), train_y empty;
    test_x, test_y the fixed validation windows and their next characters, (n, context)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]  # class names; text: the vocabulary, one character each
    context: int = 0  # text: window length; 0 for images

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.context,) if self.context else tuple(self.train_x.shape[1:])


def load_data(opts: Options, device: torch.device) -> Data:
    """The dataset as docs/original.md §5 prepares it, moved to `device` once; text as
    feedalign/data/text.py splits it, with the fixed validation windows."""
    if opts.text:
        return load_text_data(opts, device)
    from feedalign.data import load_dataset
    from feedalign.preprocess import prepare

    train, test = load_dataset(
        opts.dataset, opts.datapath, validate=opts.validate, svhn_extra=opts.svhn_extra
    )
    train_x, test_x = prepare(
        train.images.to(device), test.images.to(device), dataset=opts.dataset, validate=opts.validate,
        format=opts.format, whiten=opts.whiten, normalization=opts.normalization, cache_dir=opts.preProcDir,
        resize=opts.resize,
    )  # fmt: skip
    return Data(train_x, train.labels.to(device), test_x, test.labels.to(device), list(train.classes))


def load_text_data(opts: Options, device: torch.device) -> Data:
    from feedalign.data.text import eval_windows, load_text

    text = load_text(opts.dataset, opts.datapath, context=opts.context)
    val_x, val_y = eval_windows(text.val, opts.context, opts.eval_windows)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    val_x, val_y = val_x.to(device), val_y.to(device)
    return Data(text.train.to(device), empty, val_x, val_y, list(text.vocab), opts.context)


def make_model(opts: Options, data: Data, device: torch.device) -> nn.Module:
    """The network of the options on `device`; a model file's network that the rule cannot
    take (convert's ValueError) is a ModelFileError naming the file."""
    try:
        model = _build(opts, data)
    except ModelFileError:
        raise
    except ValueError as err:
        if is_builtin(opts.network):
            raise
        file = Path(opts.modelsFolder) / f"{opts.network.removesuffix('.py')}.py"
        raise ModelFileError(f"{file}: its network cannot learn by -gradient {opts.gradient}: {err}") from err
    model = model.to(device)
    if use_channels_last(opts.memory_format, model, device):
        model = model.to(memory_format=torch.channels_last)  # 4-d weights and B's; inputs may stay NCHW
    return model


def _build(opts: Options, data: Data) -> nn.Module:
    return build_model(
        opts.network, data.input_shape, len(data.classes), rule=opts.gradient, nonlin=opts.nonlin,
        num_layers=opts.num_layers, num_hidden=opts.num_hidden, dropout=opts.dropout,
        batchnorm=opts.batchnorm, bias=bool(opts.bias), rfb_mag=opts.rfb_mag, criterion=opts.criterion,
        seed=opts.seed, models_folder=opts.modelsFolder, error_at=opts.error_at,
        feedback_init=opts.feedback_init, init=opts.init, heads=opts.heads, dropout_rate=opts.dropout_rate,
        taps=opts.taps,
    )  # fmt: skip


def use_channels_last(memory_format: str, model: nn.Module, device: torch.device) -> bool:
    """`auto`: on the CPU, for a network with 2-d convolutions. Measured there with one
    thread (`python bench/conv_layout.py`, BENCHMARKS.md): LeNet steps ~15–25% faster,
    the paper's CIFAR conv network ~10% (bp). On a GPU the cuDNN defaults are kept."""
    if memory_format != "auto":
        return memory_format == "channels_last"
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
