"""The library refuses what the command line refuses, in the same words: non-finite or
out-of-range arguments to convert, build_model and the losses are ValueErrors saying what is
allowed; a -network model file that fails is one line naming the file and what build() must return.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from test_faults import digits_args
from torch import nn

import feedalign
from feedalign.cli import EXIT_USAGE, main
from feedalign.models import ModelFileError


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def digits_cli(tmp_path, *extra: str) -> list[str]:
    return digits_args(tmp_path, tmp_path / "run", "-epoch", "1", *extra)


CONVERT_CASES = [("rfb_mag", float("nan")), ("rfb_mag", float("inf")), ("rfb_mag", -1.0), ("rfb_mag", "0.1"),
                 ("seed", -1), ("seed", 2**64), ("seed", 1.5)]  # fmt: skip


@pytest.mark.parametrize("rule", ["fa", "dfa"])
@pytest.mark.parametrize("name,value", CONVERT_CASES)
def test_convert_refuses_what_the_command_line_refuses(tmp_path, caplog, rule, name, value):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        feedalign.convert(model, rule, **{name: value})
    assert str(err.value).startswith(f"{name} {value!r} is not allowed; it must be ")
    assert feedalign.rule_of(model) == "bp" and model.state_dict().keys() == before.keys()  # left as it was
    if not isinstance(value, str) and value != 1.5:  # what argparse lets by ("0.1" is a number there)
        assert main(digits_cli(tmp_path, f"-{name}", str(value), "-gradient", rule)) == EXIT_USAGE
        assert errors(caplog) == [f"error: -{err.value}"]
        assert not (tmp_path / "run").exists()


MODEL_CASES = [dict(heads=0), dict(dropout_rate=float("nan")), dict(dropout_rate=1.0), dict(seed=-3),
               dict(input_shape=(1, 0, 8)), dict(input_shape=())]  # fmt: skip


@pytest.mark.parametrize("kw", MODEL_CASES)
def test_build_model_refuses_out_of_range_arguments(kw):
    args = {"input_shape": (1, 8, 8)} | kw
    with pytest.raises(ValueError) as err:
        feedalign.build_model("mlp", args.pop("input_shape"), 10, **args)
    ((name, value),) = kw.items()
    assert str(err.value).startswith(f"{name} {value!r} is not allowed; it must be ")


OUTSIDE, NOT_INDICES = "a target class lies outside 0..9", "the target must be class indices, an int64"


@pytest.mark.parametrize("loss", ["bce", "ce"])
@pytest.mark.parametrize("target,expect", [([1, 2, 12], OUTSIDE), ([1, -1, 2], OUTSIDE),
                                           ([1.0, 2.0, 3.0], NOT_INDICES)])  # fmt: skip
def test_the_losses_refuse_targets_that_are_not_class_indices(loss, target, expect):
    out = torch.randn(3, 10, requires_grad=True).log_softmax(1)
    with pytest.raises(ValueError, match=f"^{loss}: {expect}"):
        feedalign.make_criterion(loss)(out, torch.tensor(target))
    masked = torch.tensor([1, -100, 2])  # ce's ignore_index: a masked row, allowed
    if loss == "ce":
        expected = -(out[0, 1] + out[2, 2]) / 2
        torch.testing.assert_close(feedalign.make_criterion(loss)(out, masked), expected)


MODEL_FILES = {
    "returns_int": ("def build(input_shape, n_classes, **options):\n    return 3\n",
                    "returned int (3), not a torch.nn.Module; it must return the network"),
    "raises": ("def build(input_shape, n_classes, **options):\n    return 1 / 0\n",
               "raised ZeroDivisionError: division by zero (line 2); it must return the network"),
    "syntax": ("def build(input_shape, n_classes, **options)\n    return 1\n",
               "importing it raised SyntaxError"),
    "no_build": ("from torch import nn\n", "must define build(input_shape, n_classes, **options)"),
    "no_layer": ("from torch import nn\ndef build(input_shape, n_classes, **options):\n"
                 "    return nn.Sequential(nn.Flatten(), nn.ReLU())\n",
                 "its network cannot learn by -gradient dfa: dfa: the model has no weight layer"),
}  # fmt: skip


@pytest.mark.parametrize("name", MODEL_FILES)
def test_a_model_file_that_fails_is_one_line_naming_it(tmp_path, caplog, name):
    text, expect = MODEL_FILES[name]
    folder = tmp_path / "M"
    folder.mkdir()
    (folder / f"{name}.py").write_text(text)
    argv = digits_args(
        tmp_path, tmp_path / "run", "-epoch", "1", "-network", name, "-modelsFolder", str(folder)
    )
    assert main(argv) == EXIT_USAGE
    (message,) = errors(caplog)
    assert message.startswith(f"error: {folder / name}.py") and expect in message, message
    assert not (tmp_path / "run").exists()
    if name != "no_layer":  # the library says the same, as a ModelFileError (a ValueError)
        with pytest.raises(ModelFileError, match=re.escape(expect)):
            feedalign.build_model(name, (1, 8, 8), 10, models_folder=folder)
