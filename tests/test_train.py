"""The trainer: options, docs/original.md §4's loop semantics, run directory, resume, Ctrl-C, NaN."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feedalign
from feedalign.cli import build_parser
from feedalign.train import checkpoint as ckpt
from feedalign.train.cli import options_from_args
from feedalign.train.config import OptionError, Options, cxx_compiler
from feedalign.train.loop import Diverged, TrainingStep
from feedalign.train.optim import Schedule, max_norm_
from feedalign.train.session import Interrupted, evaluate_run, train

# Every option of the original's table with a valid non-default value.
ORIGINAL = {
    "modelsFolder": "./Models/", "network": "mlp.lua", "criterion": "ce", "eps": "0.08", "dropout": "1",
    "batchnorm": "1", "nonlin": "relu", "num_layers": "3", "num_hidden": "100", "bias": "0",
    "rfb_mag": "1", "LR": "0.001", "LRDecay": "0.0001", "weightDecay": "0.0005", "momentum": "0.9",
    "batchSize": "32", "optimization": "sgd", "epoch": "-1", "epoch_step": "0", "gradient": "fa",
    "maxInNorm": "3", "maxOutNorm": "4", "accGradient": "1", "threads": "2", "type": "float",
    "devid": "1", "load": "none", "save": "somewhere", "dataset": "cifar10", "datapath": "./D/",
    "normalization": "channel", "format": "yuv", "preProcDir": "./P/", "visualize": "1",
}  # fmt: skip
FLAGS = ["whiten", "augment", "validate"]


def parse(argv: list[str]) -> Options:
    return options_from_args(build_parser("train").parse_args(["train", *argv]))


def test_every_original_option_is_accepted_in_every_spelling():
    argv = [a for k, v in ORIGINAL.items() for a in (f"-{k}", v)] + [f"-{f}" for f in FLAGS]
    opts = parse(argv).check()
    assert opts.LR == 0.001 and opts.batchSize == 32 and opts.epoch_step == 0 and opts.maxInNorm == 3
    assert opts.dataset == "Cifar10" and opts.whiten and opts.augment and opts.validate
    again = parse(["--LR", "0.001", "--batch-size", "32", "--epoch-step", "0", "--lr-decay", "0.1",
                   "--max-in-norm", "3", "--pre-proc-dir", "x", "--whiten", "false"])  # fmt: skip
    assert (again.LR, again.batchSize, again.epoch_step, again.LRDecay, again.maxInNorm) == (
        0.001, 32, 0, 0.1, 3)  # fmt: skip
    assert again.whiten is False and again.preProcDir == "x"


def test_defaults_are_the_originals():
    o = Options()
    assert (o.network, o.criterion, o.nonlin, o.num_layers, o.num_hidden, o.LR, o.batchSize) == (
        "mlp", "bce", "tanh", 2, 800, 1e-4, 64)  # fmt: skip
    assert (o.optimization, o.epoch, o.epoch_step, o.gradient, o.maxInNorm, o.eps) == (
        "rmsprop", 300, -1, "dfa", 400, 0)  # fmt: skip
    assert o.type == ("cuda" if torch.cuda.is_available() else "float")
    for f in dataclasses.fields(Options):  # every option documents itself
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["-dataset", "ImageNet"], "MNIST, FashionMNIST, Cifar10"),
        (["-network", "resnet"], "choose one of mlp, conv"),
        (["-optimization", "lbfgs"], "sgd, rmsprop, adam"),
        (["-criterion", "mse"], "bce, ce"),
        (["-nonlin", "gelu"], "tanh, sigm, relu"),
        (["-gradient", "hebb"], "bp, fa, usf, frsf, brsf, kp, dfa, drtp, shallow"),
        (["-LR", "0"], "> 0"),
        (["-LR", "-1"], "> 0"),
        (["-batchSize", "0"], ">= 1"),
        (["-dropout", "3"], "0, 1 or 2"),
        (["-epoch", "0"], "-1 or >= 1"),
        (["-momentum", "1.5"], "[0, 1)"),
        (["-normalization", "zscore"], "scale, simple, channel, image"),
        (["-format", "hsv"], "rgb, yuv"),
        (["-type", "double"], "float, cuda"),
    ],
)
def test_impossible_values_are_refused_before_any_data_is_loaded(argv, expect, tmp_path):
    # the datapath does not exist: reaching the data would give another error
    opts = parse([*argv, "-datapath", str(tmp_path / "nowhere"), "-save", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=expect.replace("[", r"\[").replace(")", r"\)")):
        train(opts)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_refused():
    with pytest.raises(ValueError, match="needs a GPU"):
        Options(type="cuda").check()


def test_cli_reports_errors_with_exit_code(tmp_path):
    from feedalign.cli import main

    assert main(["train", "-LR", "-3", "-save", str(tmp_path / "r")]) == 2


def test_schedule_auto_halving_and_stopping_rules():
    s = Schedule(1.0, epoch_step=0, epochs=300)
    assert s.update(1, 0.5) is None and s.lr == 1.0  # m = 0.875 > 0.5
    s.smoothed = 0.1
    assert s.update(2, 0.2) is None and s.lr == 0.5  # err 0.2 >= m 0.125: halve
    for _ in range(7):
        s.smoothed = 0.1
        s.update(3, 0.2)
    assert s.halvings == 8 and s.lr == 1 / 256
    assert s.update(4, 0.2) == "learning rate halved 8 times"
    z = Schedule(1.0, epoch_step=0, epochs=300)
    z.smoothed = 0.0
    assert z.update(1, 0.0) == "zero training error reached"


def test_schedule_fixed_steps_constant_and_zero_error_stop():
    s = Schedule(1.0, epoch_step=3, epochs=10)
    lrs = []
    for e in range(1, 8):
        s.update(e, 0.5)
        lrs.append(s.lr)
    assert lrs == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    c = Schedule(1.0, epoch_step=-1, epochs=300)
    errors = [0.5, 0.1] + [0.0] * 60
    reasons = [c.update(e, err) for e, err in enumerate(errors, 1)]
    assert c.lr == 1.0
    # by hand: m_2 = 0.75·(0.75 + 0.125) + 0.025 = 0.68125, then m_k = 0.75^(k-2)·m_2 ≤ 1e-4
    # first at k = 33 (0.75^31 · 0.68125 = 9.7e-5; 0.75^30 · 0.68125 = 1.3e-4)
    assert reasons[:32] == [None] * 32 and reasons[32] == "zero training error reached"
    u = Schedule(1.0, epoch_step=-1, epochs=-1)  # epoch_step < epoch is false: no zero-error stop
    u.smoothed = 0.0
    assert u.update(1, 0.0) is None


class Recorder:
    """A Optimizer stand-in that records the gradients it would apply."""

    def __init__(self, model):
        self.model, self.grads, self.steps = model, None, 0

    def zero_grad(self):
        for p in self.model.parameters():
            p.grad = None

    def step(self, lr):
        self.grads = [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.model.parameters()
        ]
        self.steps += 1


def _small(rule, seed=0):
    model = feedalign.build_model("mlp", (6,), 3, rule=rule, num_hidden=5, nonlin="relu", seed=seed)
    return model.double()


@pytest.mark.parametrize("rule", ["fa", "dfa"])
@pytest.mark.parametrize("acc", [0, 1])
def test_adversarial_step(rule, acc):
    torch.manual_seed(0)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    model, crit = _small(rule), feedalign.BCE()
    rec = Recorder(model)
    TrainingStep(model, crit, rec, Schedule(0.1, -1, 1), eps=0.1, acc_gradient=bool(acc))(x, y)
    # expected, by hand: true back-prop input gradient, then the rule on x + eps·sign
    rec.zero_grad()
    xg = x.clone().requires_grad_()
    with feedalign.backprop(model):
        crit(model(xg), y).backward()
    clean = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    crit(model(x + 0.1 * xg.grad.sign()), y).backward()
    adv = [p.grad.clone() for p in model.parameters()]
    for got, c, a in zip(rec.grads, clean, adv):
        torch.testing.assert_close(got, a + c if acc else a)


def test_max_norm_limits_hold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    max_norm_(model, max_out=1.5, max_in=0.7)
    for p in model.parameters():
        if p.dim() >= 2:
            assert (p.norm(dim=tuple(range(p.dim() - 1))) <= 0.7 + 1e-5).all()  # last-dim slices
            assert (p.norm(dim=tuple(range(1, p.dim()))) <= 1.5 + 1e-5).all()  # dim-0 slices
        else:
            assert p.abs().max() > 1  # biases untouched
    # in the loop: the step uses renormalised weights, so after a tiny sgd step the limit holds
    opts = Options(optimization="sgd", LR=1e-9, type="float")
    from feedalign.train.optim import Optimizer

    model2 = _small("bp")
    with torch.no_grad():
        for p in model2.parameters():
            p.mul_(50)
    step = TrainingStep(model2, feedalign.BCE(), Optimizer(model2.parameters(), opts), Schedule(1e-9, -1, 1),
                max_out=2.0, max_in=1.0)  # fmt: skip
    step(torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    for p in model2.parameters():
        if p.dim() >= 2:
            assert p.norm(dim=0).max() <= 1.0 + 1e-6 and p.norm(dim=1).max() <= 2.0 + 1e-6


def test_bias_zero_and_loss_gradient_semantics_end_to_end():
    from feedalign.train.optim import Optimizer

    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    for criterion, log_softmax in (("bce", False), ("ce", True)):
        layers = [nn.Linear(4, 3)] + ([nn.LogSoftmax(1)] if log_softmax else [])
        model = nn.Sequential(*layers).double()
        w0 = model[0].weight.detach().clone()
        logits = model[0](x)  # the pre-softmax output under both criteria
        onehot = F.one_hot(y, 3).double()
        e = torch.sigmoid(logits) - onehot if criterion == "bce" else (torch.softmax(logits, 1) - onehot) / 5
        opts = Options(optimization="sgd", LR=0.5, type="float")
        step = TrainingStep(model, feedalign.make_criterion(criterion), Optimizer(model.parameters(), opts),
                    Schedule(0.5, -1, 1), train_biases=False)  # fmt: skip
        step(x, y)
        torch.testing.assert_close(model[0].weight, w0 - 0.5 * e.detach().T @ x)
        assert model[0].bias.abs().sum() == 0


def digits_opts(tmp_path: Path, **kw) -> Options:
    base = dict(dataset="digits", datapath=str(tmp_path / "D"), preProcDir=str(tmp_path / "P"), epoch=3,
                LR=1e-3, num_hidden=64, seed=5, quiet=True, threads=1, type="float",
                save=str(tmp_path / "run"))  # fmt: skip
    return Options(**(base | kw))


def test_run_directory_contents_and_eval(tmp_path):
    run = train(digits_opts(tmp_path, visualize=1))
    names = {p.name for p in run.iterdir()}
    assert {"options.json", "env.json", "metrics.jsonl", "ErrorRate.log", "checkpoint.pt", "finished.json",
            "errors.png"} <= names  # fmt: skip
    assert not [n for n in names if ".tmp" in n]
    opts = json.loads((run / "options.json").read_text())
    assert opts["seed"] == 5 and opts["LR"] == 1e-3 and opts["dataset"] == "digits"
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env
    assert env["threads"] == 1 and env["usable_cores"] >= 1 and "at most 8" in env["threads_default"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"epoch", "train_error", "test_error", "train_loss", "test_loss", "lr", "seconds"} <= set(r)
        assert 0 <= r["train_error"] <= 1 and 0 <= r["test_error"] <= 1
    assert rows[-1]["train_error"] < rows[0]["train_error"]  # it learns
    log = (run / "ErrorRate.log").read_text().splitlines()
    assert log[0] == "Training Error\tTest Error" and len(log) == 4
    saved = _checkpoint(run)
    assert saved["epoch"] == 3 and "dfa_output.feedback" in saved["model"]
    assert json.loads((run / "finished.json").read_text())["epochs"] == 3
    error, loss = evaluate_run(run)
    assert error == pytest.approx(rows[-1]["test_error"]) and loss == pytest.approx(rows[-1]["test_loss"])


def _checkpoint(run: Path) -> dict:
    return ckpt.load(run / "checkpoint.pt")


def _weights(run: Path) -> dict:
    return _checkpoint(run)["model"]


@pytest.mark.parametrize("stop_at", [(2, 7), (1, 24)])  # mid-epoch, and the last batch of an epoch
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, stop_at):
    kw = dict(dropout=1, optimization="adam")  # dropout: the RNG state must survive too
    ref = train(digits_opts(tmp_path / "a", **kw))
    with pytest.raises(Interrupted, match="--resume"):
        train(digits_opts(tmp_path / "b", **kw), stop_at=stop_at)
    part = tmp_path / "b" / "run"
    resumed = train(Options.from_dict(json.loads((part / "options.json").read_text())), resume=part)
    a, b = _weights(ref), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = lambda r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(metrics(ref)) == strip(metrics(resumed))


def test_same_seed_same_metrics(tmp_path):
    a = train(digits_opts(tmp_path / "a", epoch=2))
    b = train(digits_opts(tmp_path / "b", epoch=2))
    c = train(digits_opts(tmp_path / "c", epoch=2, seed=6))

    def read(run):
        return [(x["train_error"], x["test_loss"]) for x in map(json.loads, (run / "metrics.jsonl").open())]

    assert read(a) == read(b) != read(c)


def test_nan_stops_with_epoch_and_batch_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import feedalign.train.session as session
    from feedalign.data import EpochLoader, load_dataset

    opts = digits_opts(tmp_path)
    train_split, test_split = load_dataset(opts.dataset, opts.datapath)
    batches = len(EpochLoader(train_split.images, train_split.labels, opts.batchSize, seed=0))
    evaluations = -(-len(test_split.labels) // 1000)  # evaluate()'s batches of 1000
    poison_after = batches + evaluations + 5  # the 6th batch of epoch 2

    class Poisoned(feedalign.BCE):
        calls = 0

        def forward(self, logits, target):
            Poisoned.calls += 1
            if Poisoned.calls > poison_after:
                logits = logits * float("nan")
            return super().forward(logits, target)

    monkeypatch.setattr(session, "make_criterion", lambda name, **kw: Poisoned())
    with pytest.raises(Diverged, match=r"nan at batch \d+ of epoch 2.*last good checkpoint is kept"):
        train(opts)
    run = tmp_path / "run"
    assert _checkpoint(run)["epoch"] == 1
    assert torch.isfinite(_weights(run)["1.weight"]).all()
    assert not (run / "finished.json").exists()


def test_load_refuses_weights_of_another_network(tmp_path):
    run = train(digits_opts(tmp_path, epoch=1))
    with pytest.raises(ValueError, match="different network"):
        train(digits_opts(tmp_path / "x", load=str(run / "checkpoint.pt"), num_hidden=32))
    ok = train(digits_opts(tmp_path / "y", load=str(run / "checkpoint.pt"), epoch=1))
    assert (ok / "finished.json").exists()


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "feedalign", "train", "-dataset", "digits", "-datapath", str(tmp_path),
           "-preProcDir", str(tmp_path / "P"), "-epoch", "-1", "-num_hidden", "32", "-seed", "1",
           "-threads", "1", "-type", "float", "-save", str(run), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert f"feedalign train --resume {run}" in out
    state = _checkpoint(run)
    assert state["epoch"] >= 1
    assert not [p for p in os.listdir(run) if ".tmp" in p]
    resume = [
        sys.executable,
        "-m",
        "feedalign",
        "train",
        "--resume",
        str(run),
        "-epoch",
        str(state["epoch"] + 1),
    ]
    res = subprocess.run(resume, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (run / "finished.json").exists()


@pytest.mark.slow
def test_mnist_one_epoch_dfa_reaches_under_10_percent(shared_data, tmp_path):
    opts = Options(dataset="MNIST", datapath=str(shared_data), preProcDir=str(tmp_path / "P"), epoch=1,
                   seed=1, quiet=True, threads=2, type="float", save=str(tmp_path / "run"))  # fmt: skip
    run = train(opts)
    (row,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["test_error"] < 0.10


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")
    run = train(digits_opts(tmp_path, epoch=1, tensorboard=True))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "kw,expect",
    [
        (dict(network="conv"), "at least 15×15"),
        (dict(load="/nonexistent/weights.pt"), "no such file"),
    ],
)
def test_impossible_combinations_are_refused_before_loading(tmp_path, kw, expect):
    with pytest.raises(OptionError, match=expect):
        train(digits_opts(tmp_path, **kw))
    assert not (tmp_path / "run").exists()


def test_fresh_run_refuses_a_directory_holding_a_run(tmp_path):
    train(digits_opts(tmp_path, epoch=1))
    with pytest.raises(OptionError, match="already holds a run; continue it with --resume"):
        train(digits_opts(tmp_path, epoch=1))


def test_batchnorm_with_a_one_sample_last_batch_and_bias_zero(tmp_path):
    # 1497 digits, batch 4: the last batch would hold one sample
    run = train(digits_opts(tmp_path, epoch=1, batchnorm=1, batchSize=4, bias=0))
    weights = _weights(run)
    bn_biases = [k for k in weights if k.endswith("bias")]
    assert bn_biases and all(weights[k].abs().sum() == 0 for k in bn_biases)  # BatchNorm β held at 0 too


def _rmsprop_by_hand(w, grads, lrs):
    """docs/original.md §4's RMSprop: m = 0.99·m + 0.01·g², w -= lr·g / (sqrt(m) + 1e-8), m_0 = 0."""
    m = torch.zeros_like(w)
    for g, lr in zip(grads, lrs):
        m = 0.99 * m + 0.01 * g * g
        w = w - lr * g / (m.sqrt() + 1e-8)
    return w


NO_COMPILER = pytest.mark.skipif(cxx_compiler() is None, reason="torch.compile on the CPU needs a C++ "
                                 "compiler (g++ or clang++ on PATH, or $CXX)")  # fmt: skip


@pytest.mark.slow
@NO_COMPILER
def test_compiled_optimizer_follows_the_update_rule_and_lr_changes_do_not_recompile():
    import torch._dynamo

    from feedalign.train.optim import Optimizer

    torch.manual_seed(0)
    w0 = torch.randn(7, 5, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    stepper = Optimizer([p], Options(compile_optimizer=True))
    grads = [torch.randn(7, 5, dtype=torch.float64) for _ in range(4)]
    lrs = [1e-2, 1e-2, 5e-3, 2.5e-3]  # the schedule halves the LR twice
    for i, (g, lr) in enumerate(zip(grads, lrs)):
        p.grad = g.clone()
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            stepper.step(lr)
    torch.testing.assert_close(p.detach(), _rmsprop_by_hand(w0, grads, lrs), rtol=1e-12, atol=1e-12)
    # its state (LR now a tensor) survives a weights_only round trip into an eager stepper
    buf = io.BytesIO()
    torch.save(stepper.state_dict(), buf)
    buf.seek(0)
    q = nn.Parameter(p.detach().clone())
    eager = Optimizer([q], Options())
    eager.load_state_dict(torch.load(buf, weights_only=True))
    assert eager.steps == 4
    q.grad = g5 = torch.randn(7, 5, dtype=torch.float64)
    eager.step(1e-3)  # continues the same update from the loaded state
    expect = _rmsprop_by_hand(w0, [*grads, g5], [*lrs, 1e-3])
    torch.testing.assert_close(q.detach(), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@NO_COMPILER
def test_resuming_with_a_compiled_optimizer_continues_the_same_run(tmp_path):
    ref = train(digits_opts(tmp_path / "a", epoch=2))
    with pytest.raises(Interrupted):
        train(digits_opts(tmp_path / "b", epoch=2), stop_at=(1, 10))
    part = tmp_path / "b" / "run"
    args = build_parser("train").parse_args(["train", "--resume", str(part), "--compile_optimizer"])
    opts = options_from_args(args)
    assert opts.compile_optimizer and opts.seed == 5
    resumed = train(opts, resume=part)
    a, b = _weights(ref), _weights(resumed)
    for k in a:  # same update rule, last-bit rounding aside
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert json.loads((part / "options.json").read_text())["compile_optimizer"] is True


def test_compile_optimizer_without_a_compiler_is_refused(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(OptionError, match="needs a C.. compiler"):
        Options(type="float", compile_optimizer=True).check()


FAULTS = """
import resource, sys, torch
from torch import nn
from feedalign.train.memory import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported")  # not glibc: nothing to measure
    sys.exit(0)
model = nn.Sequential(nn.Linear(784, 800), nn.Tanh(), nn.Linear(800, 800), nn.Tanh(), nn.Linear(800, 10))
opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)
x, y = torch.rand(64, 784), torch.randint(0, 10, (64,))
def step():
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_keeping_freed_memory_removes_the_page_faults_of_each_step():
    def faults(mode: str) -> str:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    kept = faults("keep")
    if kept == "unsupported":
        pytest.skip("this libc has no mallopt (not glibc)")
    default = float(faults("default"))
    if default < 100:  # e.g. jemalloc/tcmalloc preloaded, or glibc tuned by MALLOC_* variables
        pytest.skip(f"this platform's allocator already reuses freed memory ({default:.0f} faults per step)")
    # by default MBs of gradients and optimizer temporaries are faulted in again every step
    assert float(kept) < 0.05 * default


def test_train_itself_refuses_changing_a_non_resumable_option_on_resume(tmp_path):
    with pytest.raises(Interrupted):
        train(digits_opts(tmp_path, epoch=2), stop_at=(1, 5))
    run = tmp_path / "run"
    saved = json.loads((run / "options.json").read_text())
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    allowed = "compile_optimizer, devid, epoch, memory_format, quiet, threads"
    with pytest.raises(OptionError, match=rf"only {allowed} may change, not LR 0.5 \(run: 0.001\)"):
        train(Options.from_dict(saved | {"LR": 0.5}), resume=run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    resumed = train(Options.from_dict(saved | {"threads": 2, "seed": None}), resume=run)  # allowed
    assert json.loads((resumed / "finished.json").read_text())["epochs"] == 2


PUBLIC_API = """
import feedalign
names = sorted(set(feedalign.__all__) | set(feedalign._LAZY))
for name in names:
    assert getattr(feedalign, name) is not None, name
import feedalign.train.loop  # importing the subpackage must not shadow the function
assert callable(feedalign.run_training) and feedalign.run_training.__module__ == "feedalign.train.session"
ns = {}
exec("from feedalign import *", ns)
assert set(feedalign.__all__) <= set(ns)
print(len(names))
"""


def test_every_public_name_works_in_a_fresh_process():
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", PUBLIC_API], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"PYTHONPATH": repo})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(set(feedalign.__all__))


@pytest.mark.parametrize(
    "cores,local_world,expected", [(2, None, 2), (64, None, 8), (16, "4", 4), (2, "4", 1)]
)
def test_threads_default_to_the_usable_cores_at_most_8(monkeypatch, cores, local_world, expected):
    """The original's 8 threads oversubscribe a 2-core machine: the default is the cores
    this process may use (its affinity), shared among torchrun's local processes."""
    from feedalign import dist

    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert dist.default_threads() == expected and Options().threads == expected


def test_results_go_to_stdout_and_logs_to_stderr(tmp_path):
    """`feedalign train ... > log` keeps what the run is, each epoch and how it ended;
    the data and cache notes (and progress bars, warnings, errors) stay on stderr."""
    cmd = [sys.executable, "-m", "feedalign", "train", "-dataset", "digits", "-datapath", str(tmp_path / "D"),
           "-preProcDir", str(tmp_path / "P"), "-epoch", "2", "-num_hidden", "16", "-seed", "7",
           "-threads", "1", "-type", "float", "-save", str(tmp_path / "run")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert (
        out[0].startswith("digits: 1497 training / 300 test samples") and "seed 7 (-seed 7 repeats" in out[0]
    )
    assert out[1].startswith("Sequential learning by dfa") and "e·B_0 trains block 1" in res.stdout
    assert [x.split(":")[0] for x in out if x.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]
    assert out[-1].startswith("finished: reached -epoch 2. Test error ") and "s of training" in out[-1]
    assert "epoch 1" not in res.stderr and "finished" not in res.stderr and "preprocessing:" in res.stderr
