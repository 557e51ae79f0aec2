"""Language-model runs end to end on a small text written here: the recipe's options, the
metrics (nats and bits per character, tokens/s), bit-exact resume, Ctrl-C, NaN, refusals,
and `feedalign sample`."""

from __future__ import annotations

import json
import math
import random
import types
from pathlib import Path

import pytest
import torch

from feedalign.cli import main
from feedalign.train import checkpoint as ckpt
from feedalign.train.config import OptionError, Options
from feedalign.train.loop import Diverged
from feedalign.train.optim import OPTIMIZERS, Optimizer
from feedalign.train.sample import sample
from feedalign.train.session import Interrupted, train

WORDS = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]


def corpus(tmp_path: Path) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(120)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def lm_opts(tmp_path: Path, **kw) -> Options:
    base = dict(dataset=str(corpus(tmp_path)), network="gpt", criterion="ce", num_layers=2, num_hidden=16,
                heads=2, context=8, batchSize=4, bias=0, optimization="adamw", LR=3e-3, beta2=0.99,
                weightDecay=0.1, warmup=2, lr_schedule="cosine", min_lr=3e-4, clip=1.0, iterations=10,
                eval_every=4, gradient="bp", seed=3, quiet=True, threads=1, type="float",
                save=str(tmp_path / "run"))  # fmt: skip
    return Options(**(base | kw))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_records_nats_bits_and_tokens_per_second(tmp_path):
    run = train(lm_opts(tmp_path))
    got = records(run)
    assert [r["iteration"] for r in got] == [4, 8, 10]  # the last interval is shorter
    for r in got:
        assert r["train_bpc"] == pytest.approx(r["train_loss"] / math.log(2))
        assert r["test_bpc"] == pytest.approx(r["test_loss"] / math.log(2))
        assert r["tokens_per_s"] > 0
    assert got[-1]["test_loss"] < math.log(len(json.loads((run / "vocab.json").read_text())["vocab"]))
    assert json.loads((run / "options.json").read_text())["epoch"] == 3  # ceil(10 / 4) intervals
    assert (run / "finished.json").exists()


@pytest.mark.parametrize("rule", ["bp", "dfa", "kp"])
def test_an_lstm_learns_by_each_kind_of_rule(tmp_path, rule):
    run = train(lm_opts(tmp_path, network="lstm", gradient=rule, iterations=16, eval_every=8, LR=1e-2))
    first, last = records(run)
    vocab = len(json.loads((run / "vocab.json").read_text())["vocab"])
    assert last["test_loss"] < first["test_loss"] and last["test_loss"] < math.log(vocab)  # below uniform


@pytest.mark.parametrize("rule, taps", [("bp", "macro"), ("dfa", "micro"), ("fa", "macro")])
@pytest.mark.parametrize("stop_at", [(2, 1), (1, 4)])  # mid-interval, and at an interval's last batch
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, rule, taps, stop_at):
    kw = dict(gradient=rule, taps=taps, dropout_rate=0.1)  # dropout: the RNG state must survive too
    ref = train(lm_opts(tmp_path / "a", **kw))
    with pytest.raises(Interrupted, match="--resume"):
        train(lm_opts(tmp_path / "b", **kw), stop_at=stop_at)
    part = tmp_path / "b" / "run"
    resumed = train(Options.from_dict(json.loads((part / "options.json").read_text())), resume=part)
    a, b = ckpt.load(ref / "checkpoint.pt")["model"], ckpt.load(resumed / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in rows]  # noqa: E731
    assert strip(records(ref)) == strip(records(resumed))


def test_nan_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import feedalign.train.session as session
    from feedalign.losses import make_criterion

    class Poisoned(torch.nn.Module):
        calls = 0

        def __init__(self):
            super().__init__()
            self.inner = make_criterion("ce", per_position=True)

        def forward(self, out, target):
            Poisoned.calls += 1
            return self.inner(
                out * float("nan") if Poisoned.calls > 6 else out, target
            )  # batch 2 of interval 2

    monkeypatch.setattr(session, "make_criterion", lambda name, **kw: Poisoned())
    with pytest.raises(Diverged, match="last good checkpoint is kept"):
        train(lm_opts(tmp_path))
    assert ckpt.load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dataset="MNIST"), "-network gpt is a language model: give a text -dataset"),
        (dict(network="mlp"), "is text: use -network gpt or lstm"),
        (dict(iterations=0), "give -iterations N"),
        (dict(criterion="bce"), "use -criterion ce"),
        (dict(gradient="fa", taps="micro"), "-gradient fa has none"),
        (dict(num_hidden=15), "multiple of -heads 2"),
        (
            dict(dataset="MNIST", network="mlp", iterations=5, lr_schedule="none"),
            "image data trains for -epoch",
        ),
        (dict(validate=True), "validation split already"),
    ],
)
def test_impossible_options_are_refused_before_anything_is_written(tmp_path, kw, message):
    with pytest.raises(OptionError, match=message):
        train(lm_opts(tmp_path, **kw))
    assert not (tmp_path / "run").exists()


def test_a_missing_text_file_exits_4_naming_it(tmp_path, capsys):
    gone = tmp_path / "gone.txt"
    code = main(["train", "-dataset", str(gone), "-network", "gpt", "-criterion", "ce", "-iterations", "2",
                 "-save", str(tmp_path / "run"), "-quiet"])  # fmt: skip
    assert code == 4
    assert not (tmp_path / "run").exists()


def test_schedule_and_adamw_groups_follow_nanogpt():
    o = types.SimpleNamespace(optimization="adamw", LR=1e-3, beta1=0.9, beta2=0.99, weightDecay=0.1,
                              LRDecay=0.0, compile_optimizer=False, warmup=100, min_lr=1e-4, iterations=2000,
                              lr_schedule="cosine")  # fmt: skip
    matrix, vector = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(3))
    opt = Optimizer([matrix, vector], o)
    decays = {id(p): g["weight_decay"] for g in opt.optimizer.param_groups for p in g["params"]}
    assert decays == {id(matrix): 0.1, id(vector): 0.0}
    assert opt.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert opt.lr_at(1e-3, 0) == pytest.approx(1e-3 / 101) and opt.lr_at(1e-3, 99) == pytest.approx(
        1e-3 * 100 / 101
    )
    mid = 100 + (2000 - 100) // 2
    assert opt.lr_at(1e-3, mid) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 950 / 1900)) * 9e-4)
    assert opt.lr_at(1e-3, 2000) == pytest.approx(1e-4) and opt.lr_at(1e-3, 5000) == pytest.approx(1e-4)
    assert "adamw" in OPTIMIZERS


def test_sample_is_seeded_and_refuses_unknown_characters(tmp_path, capsys, caplog):
    run = train(lm_opts(tmp_path, gradient="dfa"))
    capsys.readouterr()  # the run's own lines
    a = sample(run, tokens=30, prompt="To", seed=1)
    assert a.startswith("To") and len(a) == 32 and a == sample(run, tokens=30, prompt="To", seed=1)
    assert main(["sample", str(run), "--tokens", "30", "--prompt", "To", "--seed", "1"]) == 0
    assert capsys.readouterr().out == a + "\n"
    assert main(["sample", str(run), "--prompt", "Zebra"]) == 2
    assert "never seen: ['Z']" in caplog.text
    assert main(["sample", str(run), "--temperature", "0"]) == 2


def _fake_run(root: Path, row: str, rule: str, losses: list[float], finished: bool) -> None:
    run = root / "runs" / row / rule / "seed1"
    run.mkdir(parents=True)
    options = {"gradient": rule, "dataset": "shakespeare_char", "iterations": 2000, "epoch": 8, "seed": 1}
    (run / "options.json").write_text(json.dumps(options))
    lines = [json.dumps({"epoch": i + 1, "iteration": 250 * (i + 1), "test_loss": x, "train_loss": x,
                         "test_bpc": x / math.log(2), "test_error": 0.5, "train_error": 0.5,
                         "tokens_per_s": 1000.0 + i}) for i, x in enumerate(losses)]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (run / "finished.json").write_text(json.dumps({"reason": "reached -epoch 8"}))


def test_language_model_report_table(tmp_path):
    from feedalign.reproduce.experiments import load_suite
    from feedalign.reproduce.report import write_report

    rows = load_suite("shakespeare-char")
    _fake_run(tmp_path, "gpt", "bp", [2.5, 2.0, 1.9, 1.91, 1.90, 1.89, 1.88, 1.87], True)
    _fake_run(tmp_path, "gpt", "dfa", [3.0, 2.8, 2.7], False)
    _fake_run(tmp_path, "gpt-micro", "dfa", [3.0, 2.6, 2.5, 2.4, 2.4, 2.3, 2.3, 2.2], True)
    text = write_report(tmp_path, rows=rows, title="t").read_text()
    table = {
        tuple(c.strip() for c in line.split("|")[1:3]): line
        for line in text.splitlines()
        if line.startswith("| gpt")
    }
    assert (
        "| 1.870 | 1.870 (2000) | 2.698 | 1004 | — | 1.88 | -0.010 (within ±0.05) | 2000/2000 |"
        in table[("gpt", "bp")]
    )
    assert "| 2.700 | 2.700 (750) |" in table[("gpt", "dfa")] and "+0.830" in table[("gpt", "dfa")]
    assert "750/2000 *partial*" in table[("gpt", "dfa")]
    assert "+0.330" in table[("gpt-micro", "dfa")]  # the gap to the recipe's bp, from the first row
    assert (tmp_path / "report.png").exists()
