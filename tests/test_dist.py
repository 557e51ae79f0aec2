"""Data parallelism on CPU with gloo: N ranks × batch B step like one process with
batch N·B; feedback mismatches are caught; only rank 0 writes; resume works; the
batch loop reads nothing back to the host between sync points."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import feedalign
from feedalign import dist
from feedalign.data import EpochLoader
from feedalign.train import checkpoint as ckpt
from feedalign.train.config import Options
from feedalign.train.loop import SYNC_EVERY, EpochState, StopFlag, TrainingStep, train_epoch
from feedalign.train.optim import Optimizer, Schedule


class Store:
    """A rendezvous store bound to port 0 (the kernel picks a free port, and no other
    process can take it before the ranks connect: no probe-then-bind race)."""

    def __init__(self) -> None:
        self.store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.port = self.store.port


def spawn(worker, *args) -> None:
    """Run `worker(rank, 2, port, *args)` in two processes around a fresh store."""
    store = Store()
    mp.spawn(worker, args=(2, store.port, *args), nprocs=2)
    del store  # the ranks have left the group: the store may go


def _env(rank: int, world: int, port: int) -> None:
    """Join the group through the parent's store; dist.setup then finds it initialised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    if world > 1:
        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False)
        torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world)


def _steps(rank, world, port, criterion, rule, batch, k, out, seed_offset=0):
    """K sgd steps of a small mlp on fixed synthetic data; rank 0 saves the weights."""
    _env(rank, world, port)
    rt = dist.setup("float", 1)
    try:
        _train_k_steps(rt, criterion, rule, batch, k, out, seed_offset)
    except RuntimeError as err:
        Path(f"{out}.rank{rank}.err").write_text(str(err))
    finally:  # the DDP model is gone by now: tearing the group down under it can abort the process
        dist.teardown()


def _train_k_steps(rt, criterion, rule, batch, k, out, seed_offset):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 10, generator=g), torch.randint(0, 4, (256,), generator=g)
    model = feedalign.build_model("mlp", (10,), 4, rule=rule, nonlin="relu", num_hidden=16,
                                  criterion=criterion, seed=1 + seed_offset * rt.rank)  # fmt: skip
    crit = feedalign.make_criterion(criterion)
    dist.check_same_feedback(rt, feedalign.feedback(model))
    ddp = dist.wrap(model, rt, batch_reduction=getattr(crit, "batch_reduction", "mean"))
    opts = Options(optimization="sgd", LR=0.05, type="float")
    step = TrainingStep(ddp, crit, Optimizer(model.parameters(), opts), Schedule(0.05, -1, 1))
    loader = EpochLoader(x, y, batch, seed=3, rank=rt.rank, world_size=rt.world_size)
    loader.set_epoch(1)
    for i, (xb, yb) in enumerate(loader):
        if i == k:
            break
        step(xb, yb)
    rt.barrier()
    if rt.is_main:
        torch.save(model.state_dict(), out)


def _single(criterion, rule, batch, k, out):
    saved = dict(os.environ)
    try:
        _steps(0, 1, 0, criterion, rule, batch, k, out)
    finally:  # leave no WORLD_SIZE / RANK behind for the other tests
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.slow
@pytest.mark.parametrize(
    "criterion,rule",
    [
        ("bce", "dfa"),
        ("ce", "fa"),
        ("bce", "bp"),
        ("bce", "brsf"),
        ("bce", "kp"),
        ("ce", "pred"),
        ("ce", "pred-bio"),
    ],
)  # not sim: its similarity matrices are taken over each rank's own batch, as the reference's
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, criterion, rule):
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    spawn(_steps, criterion, rule, 16, 6, str(two))
    _single(criterion, rule, 32, 6, str(one))
    a = torch.load(two, weights_only=True)
    b = torch.load(one, weights_only=True)
    init = feedalign.build_model("mlp", (10,), 4, rule=rule, nonlin="relu", num_hidden=16,
                                 criterion=criterion, seed=1).state_dict()  # fmt: skip
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it did train


@pytest.mark.slow
def test_feedback_mismatch_between_ranks_is_caught(tmp_path):
    out = tmp_path / "x.pt"
    spawn(_steps, "bce", "dfa", 16, 1, str(out), 1)
    errors = [Path(f"{out}.rank{r}.err").read_text() for r in (0, 1)]  # FeedbackMismatch, a RuntimeError
    assert all("feedback matrices differ between ranks" in e and "-seed" in e for e in errors)
    assert not out.exists()


def _train_worker(rank, world, port, base, save_per_rank, stop_at, resume, seed=4):
    _env(rank, world, port)
    from feedalign.train.session import Interrupted, train

    save = f"{base}/run_rank{rank}" if save_per_rank else f"{base}/run"
    opts = Options(dataset="digits", datapath=f"{base}/D", preProcDir=f"{base}/P", epoch=2, num_hidden=32,
                   batchSize=16, seed=seed, quiet=True, threads=1, type="float", save=save)  # fmt: skip
    try:
        train(opts, resume=save if resume else None, stop_at=stop_at)
    except Interrupted:
        Path(f"{base}/interrupted{rank}").touch()
    finally:
        dist.teardown()


@pytest.mark.slow
def test_only_rank_zero_writes_and_a_distributed_run_resumes(tmp_path):
    spawn(_train_worker, str(tmp_path), True, None, False)
    assert (tmp_path / "run_rank0" / "finished.json").exists()
    assert not (tmp_path / "run_rank1").exists()
    env = json.loads((tmp_path / "run_rank0" / "env.json").read_text())
    assert env["world_size"] == 2
    ref = ckpt.load(tmp_path / "run_rank0" / "checkpoint.pt")["model"]
    # interrupt at a sync point of epoch 2 (the ranks agree there), then resume
    spawn(_train_worker, str(tmp_path), False, (2, SYNC_EVERY), False)
    assert (tmp_path / "interrupted0").exists() and (tmp_path / "interrupted1").exists()
    spawn(_train_worker, str(tmp_path), False, None, True)
    got = ckpt.load(tmp_path / "run" / "checkpoint.pt")["model"]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    # one process may not resume a 2-process run: its shards and partial sums are per rank
    from feedalign.train.config import OptionError
    from feedalign.train.session import train

    opts = Options.from_dict(json.loads((tmp_path / "run" / "options.json").read_text()) | {"epoch": 3})
    with pytest.raises(OptionError, match=r"trained by 2 process\(es\), not 1.*torchrun --nproc-per-node 2"):
        train(opts, resume=tmp_path / "run")


def test_batch_loop_reads_the_host_only_at_sync_points(monkeypatch):
    """On a GPU every .item()/.tolist() is a synchronisation; count them on CPU."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64 * 100, 10, generator=g), torch.randint(0, 4, (6400,), generator=g)
    model = feedalign.build_model("mlp", (10,), 4, rule="dfa", num_hidden=8, seed=0)
    opts = Options(type="float")
    step = TrainingStep(model, feedalign.BCE(), Optimizer(model.parameters(), opts), Schedule(1e-4, -1, 1))
    loader = EpochLoader(x, y, 64, seed=0)
    loader.set_epoch(1)
    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            reads["n"] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    state = train_epoch(step, loader, EpochState(), stop=StopFlag(), progress=True)
    assert state.batch == 100
    sync_points = 100 // SYNC_EVERY
    assert reads["n"] <= 3 * sync_points, f"{reads['n']} host reads in 100 batches"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_epoch_has_no_hidden_synchronisation():
    device = torch.device("cuda")
    x, y = torch.randn(6400, 1, 28, 28, device=device), torch.randint(0, 10, (6400,), device=device)
    model = feedalign.build_model("mlp", (1, 28, 28), 10, rule="dfa", seed=0).to(device)
    step = TrainingStep(
        model, feedalign.BCE(), Optimizer(model.parameters(), Options(type="cuda")), Schedule(1e-4, -1, 1)
    )
    loader = EpochLoader(x, y, 64, seed=0, augment=False)
    loader.set_epoch(1)
    train_epoch(step, loader, EpochState(), stop=StopFlag(), progress=False)  # warm-up
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call outside sync points raises
    try:
        loader.set_epoch(2)
        state = EpochState(wrong=torch.zeros((), device=device), loss_sum=torch.zeros((), device=device))
        it = iter(loader)
        for _ in range(SYNC_EVERY - 1):
            xb, yb = next(it)
            step(xb, yb)
            state.wrong += (step.model(xb).argmax(1) != yb).sum()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _bn_worker(rank, world, port, out):
    """Each rank updates BatchNorm statistics on its own data, then the ranks average them."""
    _env(rank, world, port)
    rt = dist.setup("float", 1)
    try:
        model = feedalign.build_model("mlp", (6,), 3, rule="bp", batchnorm=1, num_hidden=5, seed=1)
        x = torch.randn(32, 6, generator=torch.Generator().manual_seed(10 + rank)) * (1 + rank) + rank
        model.train()
        model(x)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
        before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
        dist.average_batchnorm_statistics(model, rt)
        after = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
        torch.save({"before": before, "after": after}, f"{out}.rank{rank}")
    finally:
        dist.teardown()


@pytest.mark.slow
def test_batchnorm_statistics_are_averaged_over_ranks(tmp_path):
    spawn(_bn_worker, str(tmp_path / "bn"))
    r0, r1 = (torch.load(tmp_path / f"bn.rank{r}", weights_only=True) for r in (0, 1))
    assert len(r0["before"]) >= 2
    for (m0, v0), (m1, v1), (a0, w0), (a1, w1) in zip(r0["before"], r1["before"], r0["after"], r1["after"]):
        assert not torch.allclose(m0, m1)  # the shards' statistics differed
        torch.testing.assert_close(a0, (m0 + m1) / 2)
        torch.testing.assert_close(w0, (v0 + v1) / 2)
        assert torch.equal(a0, a1) and torch.equal(w0, w1)


@pytest.mark.slow
def test_ranks_agree_on_a_drawn_seed(tmp_path):
    # no -seed: each process draws one; the run must use rank 0's everywhere (same feedback)
    spawn(_train_worker, str(tmp_path), True, None, False, None)
    assert (tmp_path / "run_rank0" / "finished.json").exists()
    assert isinstance(json.loads((tmp_path / "run_rank0" / "options.json").read_text())["seed"], int)
