"""What the BioTorch suites need from the trainer: the step LR schedule (-lr_milestones,
-lr_gamma), -resize, and the `lenet` network — each against hand-computed values."""

from __future__ import annotations

import pytest
import torch

import feedalign
from feedalign.models import build_model
from feedalign.models.lenet import lenet, lenet_size
from feedalign.preprocess import prepare, resize_images
from feedalign.train.config import OptionError, Options
from feedalign.train.optim import Schedule, parse_milestones

# --- step schedule ------------------------------------------------------------------


def test_step_schedule_lr_per_epoch_follows_the_formula():
    """Epoch e (1-based) trains at LR · γ^#{m in milestones : m < e}."""
    lr, gamma, milestones = 0.1, 0.1, (50, 75)
    schedule = Schedule(lr, epoch_step=-1, epochs=100, milestones=milestones, gamma=gamma)
    for epoch in range(1, 101):
        expected = lr * gamma ** sum(1 for m in milestones if m < epoch)
        assert schedule.lr == pytest.approx(expected, rel=1e-12), epoch
        assert schedule.update(epoch, train_error=0.5) is None
    assert schedule.lr == pytest.approx(1e-3, rel=1e-12)  # after epoch 100: 0.1 · 0.1², no third milestone


def test_step_schedule_composes_with_halving_and_survives_a_checkpoint():
    schedule = Schedule(1.0, epoch_step=2, epochs=10, milestones=(3,), gamma=0.5)
    lrs = []
    for epoch in range(1, 6):
        lrs.append(schedule.lr)
        schedule.update(epoch, train_error=0.5)
    # halving after epochs 2 and 4, ×0.5 after epoch 3
    assert lrs == [1.0, 1.0, 0.5, 0.25, 0.125]
    resumed = Schedule(1.0, epoch_step=2, epochs=10, milestones=(3,), gamma=0.5)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.lr == schedule.lr == 0.125  # nothing happens after epoch 5


def test_milestones_are_parsed_and_checked():
    assert parse_milestones("") == () and parse_milestones("50,75") == (50, 75)
    for bad in ("75,50", "0,5", "a", "5,5"):
        with pytest.raises(ValueError, match="50,75|increasing"):
            parse_milestones(bad)
    with pytest.raises(OptionError, match="-lr_milestones.*increasing"):
        Options(lr_milestones="75,50", type="float").check()
    with pytest.raises(OptionError, match="-lr_gamma 0.0"):
        Options(lr_gamma=0.0, type="float").check()
    with pytest.raises(OptionError, match="-resize -1"):
        Options(resize=-1, type="float").check()
    Options(lr_milestones="50,75", resize=32, network="lenet", type="float").check()


# --- lenet --------------------------------------------------------------------------


def test_lenet_shapes_and_parameter_count():
    model = lenet((1, 32, 32), 10, nonlin=torch.nn.ReLU)
    x = torch.zeros(2, 1, 32, 32)
    shapes = []
    for layer in model:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(6, 28, 28), (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 10, 10), (16, 5, 5),
                      (120, 1, 1), (120, 1, 1), (120,), (84,), (84,), (10,)]  # fmt: skip
    # conv 1·6·25+6, conv 6·16·25+16, conv 16·120·25+120, fc 120·84+84, fc 84·10+10
    assert sum(p.numel() for p in model.parameters()) == 156 + 2416 + 48120 + 10164 + 850 == 61706
    assert lenet_size(32) == 1 and lenet_size(28) == 0
    with pytest.raises(ValueError, match="too small.*-resize 32"):
        lenet((1, 28, 28), 10, nonlin=torch.nn.ReLU)


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa"])
def test_lenet_trains_under_each_rule(rule):
    torch.manual_seed(0)
    model = build_model("lenet", (1, 32, 32), 10, rule=rule, nonlin="relu", criterion="ce", seed=1)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.nll_loss(model(x), y)
    loss.backward()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


# --- resize -------------------------------------------------------------------------


def test_resize_is_bilinear_with_half_pixel_centres():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    out = resize_images(image, 4)
    # output pixel i samples source x = (i + 0.5)/2 − 0.5 = −0.25, 0.25, 0.75, 1.25, clamped to [0, 1]
    row0 = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = torch.stack([row0, row0 + 0.5, row0 + 1.5, row0 + 2.0])  # rows: y weights as x, ×2
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0], expected)


def test_prepare_resizes_both_splits_and_caches_under_its_own_name(tmp_path):
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=gen)
    test = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=gen)
    tr, te = prepare(train, test, dataset="MNIST", validate=False, normalization="simple",
                     cache_dir=tmp_path, resize=32)  # fmt: skip
    assert tr.shape == (5, 1, 32, 32) and te.shape == (3, 1, 32, 32)
    # "simple": one mean and std over the resized training images
    assert tr.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert tr.std().item() == pytest.approx(1.0, abs=1e-4)
    assert [p.name.split("_")[2:4] for p in (tmp_path / "MNIST").iterdir()] == [["simple", "resize32"]]


def test_a_training_run_applies_the_step_schedule_and_resize(tmp_path):
    """End to end on the small `digits` set (8×8): LR per epoch in metrics.jsonl follows
    the milestones, and the network sees the resized images."""
    from feedalign.train.runlog import read_metrics
    from feedalign.train.session import train

    opts = Options(dataset="digits", datapath=str(tmp_path / "D"), preProcDir=str(tmp_path / "P"), epoch=3,
                   LR=1e-3, num_hidden=16, seed=5, quiet=True, threads=1, type="float",
                   save=str(tmp_path / "run"), lr_milestones="1,2", lr_gamma=0.5, resize=12)  # fmt: skip
    run = train(opts)
    assert [r["lr"] for r in read_metrics(run)] == [1e-3, 5e-4, 2.5e-4]
    from feedalign.train import checkpoint

    first = checkpoint.load(run / "checkpoint.pt")["model"]
    assert next(v for k, v in first.items() if k.endswith("weight")).shape[1] == 12 * 12


@pytest.mark.parametrize("rule", ["bp", "fa", "usf", "dfa"])
def test_resnet20_has_the_papers_size_and_every_rule_trains_it(rule):
    """He et al.'s CIFAR ResNet-20 with option-A shortcuts: 0.27M parameters; every rule
    gives every parameter a gradient; dfa taps the input of the 9 BasicBlocks and of fc."""
    model = build_model("resnet20", (3, 32, 32), 10, rule=rule, nonlin="relu", criterion="ce", seed=1)
    weights = [p for n, p in model.named_parameters() if "feedback" not in n]
    stem = 3 * 16 * 9 + 2 * 16  # conv 3×3 (no bias) + BatchNorm's γ, β
    stage1 = 3 * (2 * 16 * 16 * 9 + 4 * 16)
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 4 * 32) + 2 * (2 * 32 * 32 * 9 + 4 * 32)
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 4 * 64) + 2 * (2 * 64 * 64 * 9 + 4 * 64)
    assert sum(p.numel() for p in weights) == stem + stage1 + stage2 + stage3 + 64 * 10 + 10 == 269_722
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    torch.nn.functional.nll_loss(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    if rule == "dfa":
        assert [tuple(b.shape) for b in feedalign.feedback(model)][:1] == [(10, 16 * 32 * 32)]
        assert len(feedalign.feedback(model)) == 10  # the input of each of the 9 blocks and of fc
