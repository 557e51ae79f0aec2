"""`train(options)`: a whole run — data, model, resume, epochs, evidence (docs/original.md §4–6).

Read `train()` top to bottom: open the run directory, restore, load the data, build
the run, then one epoch after another, each ending with a record and a checkpoint.
Distributed details (RNG gathering, partial sums, BatchNorm averaging) live in
feedalign/dist.py; the run directory's checks and lock in rundir.py.

The run directory (rank 0 writes it):
    options.json   resolved options (seed included)      env.json   versions, device, commit
    metrics.jsonl  one object per epoch                   ErrorRate.log  the original's two columns
    checkpoint.pt  after every epoch and on Ctrl-C        finished.json  why and when it ended
    errors.png     with -visualize 1                      tensorboard/   with --tensorboard
    .lock          held by the process training in it
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from feedalign import dist
from feedalign.describe import describe
from feedalign.losses import make_criterion
from feedalign.models import feedback
from feedalign.train import checkpoint as ckpt
from feedalign.train import rundir
from feedalign.train.config import OptionError, Options
from feedalign.train.inputs import Data, load_data, make_model
from feedalign.train.loop import Diverged, EpochState, StopFlag, TrainingStep, evaluate, train_epoch
from feedalign.train.memory import keep_freed_memory
from feedalign.train.optim import Optimizer, Schedule, parse_milestones
from feedalign.train.runlog import (
    FINISHED,
    METRICS,
    RunLog,
    default_run_dir,
    environment,
    read_metrics,
    say,
    summary,
    write_json,
)

log = logging.getLogger("feedalign")
VOCAB = "vocab.json"  # text runs: the characters, in id order


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM: a checkpoint was written (or the last one kept); the message
    says how to continue. `signum` is the signal that stopped the run."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


def resolve(opts: Options) -> Options:
    """Check options and fill in what is drawn (the seed), before any data is loaded."""
    opts.check()
    if opts.text:  # one "epoch" of the run directory's records = one evaluation interval
        opts.epoch = math.ceil(opts.iterations / opts.eval_every)
    if opts.seed is None:
        opts.seed = int.from_bytes(os.urandom(4), "little") % 2**31
    if opts.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as err:
            raise OptionError("--tensorboard needs the tensorboard package: pip install tensorboard") from err
    return opts


def resume_command(run_dir: Path, world_size: int = 1, n_gpu: int = 1) -> str:
    """The shell command that continues `run_dir` (quoted: paths may hold spaces). A run of
    several processes started by torchrun itself (not by -nGPU, which options.json keeps)
    resumes under torchrun with as many processes."""
    how = "feedalign train"
    if world_size > 1 and n_gpu != world_size:
        how = f"torchrun --nproc-per-node {world_size} -m feedalign train"
    return f"{how} --resume {shlex.quote(str(run_dir))}"


def what_is_kept(run_dir: Path | None, *, resume: str = "", when: str = "", good: bool = False) -> str:
    """The end of the message of a run stopped early, one wording for every way it stops: which
    checkpoint is left (`when` it was written), and with `resume` the command that continues it."""
    path = None if run_dir is None else run_dir / ckpt.CHECKPOINT
    if path is None or not path.exists():
        again = ": start the run again (the same command)" if resume else ""
        return f"no checkpoint had been written yet{again}"
    kept = f"the last {'good ' if good else ''}checkpoint is kept: {path}{when}"
    return f"{kept}. Continue with: {resume}" if resume else kept


def train(opts: Options, *, resume: str | Path | None = None, stop_at: tuple[int, int] | None = None,
          trust_model_file: bool = False) -> Path:  # fmt: skip
    """Train as docs/original.md §4 and return the run directory.

    resume: a run directory to continue. `opts` must be its options (options.json)
        except for those in config.RESUME_MAY_CHANGE; other changes are refused. A
        finished run is left as it is unless a larger `epoch` extends it.
    stop_at: (epoch, batch) — behave as if Ctrl-C came after that batch (tests).
    trust_model_file: on resume, allow importing the model file the run directory
        names (network + modelsFolder); without it such a run is refused.
    Raises Interrupted (checkpoint written), Diverged (last good checkpoint kept),
    RunDirBusy (another process trains there), OptionError and friends (nothing written).
    """
    named = Path(resume) if resume else Path(opts.save) if opts.save else None
    before = _check_resume(opts, named, trust_model_file) if resume else None
    rt = _start(opts)
    run_dir = named
    try:
        run_dir = _agree(opts, rt, named)
        return _train(opts, rt, run_dir, resume, before, stop_at)
    except RuntimeError as err:  # a collective failed: another rank is gone?
        lost = dist.peer_lost(rt, err)
        if lost is None:
            raise
        kept = what_is_kept(run_dir, resume=resume_command(run_dir, rt.world_size, opts.nGPU))
        raise dist.PeerLost(f"{lost}; {kept}", quiet=lost.quiet) from None


def _check_resume(opts: Options, run_dir: Path, trust_model_file: bool) -> dict:
    """The run's saved options, once `opts` may continue it (the seed filled in from them)."""
    before = rundir.saved_options(run_dir)
    rundir.check_trusted(opts, run_dir, trust_model_file)  # before check() imports anything
    rundir.check_resume_options(opts, before, run_dir)
    return before


def preflight(opts: Options, *, resume: str | Path | None = None, trust_model_file: bool = False) -> None:
    """The checks train() makes before the processes meet, made once by a launcher of several
    processes (one message, not one per rank); `opts` is left as it was."""
    opts = dataclasses.replace(opts)
    if resume:
        _check_resume(opts, Path(resume), trust_model_file)
    opts.check()


def _train(opts: Options, rt: dist.Runtime, run_dir: Path, resume: str | Path | None, before: dict | None,
           stop_at: tuple[int, int] | None) -> Path:  # fmt: skip
    """train()'s work once the run directory is named and the processes have met."""
    resume_line = resume_command(run_dir, rt.world_size, opts.nGPU)
    with rundir.owned(run_dir, is_main=rt.is_main):
        saved = _restore_point(run_dir, resume, rt)
        if resume and rundir.already_finished(opts, before, saved["epoch"], (run_dir / FINISHED).exists()):
            if rt.is_main:
                say(f"{run_dir} has finished ({saved['epoch']} epochs); nothing to do. A larger -epoch "
                    "extends it")  # fmt: skip
            return run_dir
        if resume and rt.is_main:
            read_metrics(run_dir)  # unreadable or damaged: said now, before the data loads or a file changes
        data = _load_data_in_rank_order(opts, rt)
        run = Run.build(opts, rt, run_dir, data, saved)  # refuses a checkpoint of another network
        on_batch = _batch_hook(opts, run, stop_at)
        with StopFlag() as stop:  # from the first write on, Ctrl-C ends in a checkpoint
            if rt.is_main:  # all checks passed: the first writes
                _record_start(run_dir, opts, rt, resumed=resume is not None, vocab=data.classes)
                run.runlog = RunLog(run_dir, resume_epoch=run.first_epoch - 1, visualize=opts.visualize == 1,
                                    tensorboard=opts.tensorboard)  # fmt: skip
            try:
                epoch = run.first_epoch
                while (opts.epoch == -1 or epoch <= opts.epoch) and not run.epoch(epoch, stop, on_batch):
                    epoch += 1
            except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep the last checkpoint
                kept = what_is_kept(run_dir, resume=resume_line)
                raise Interrupted(f"interrupted again: stopped at once; {kept}") from None
    return run_dir


def _start(opts: Options) -> dist.Runtime:
    """Options resolved, this process's runtime set up."""
    resolve(opts)
    torch.set_num_threads(opts.threads)
    rt = dist.setup(opts.type, opts.devid)
    if rt.device.type == "cpu":
        keep_freed_memory()  # no page faults on the buffers every step re-allocates
    return rt


def _agree(opts: Options, rt: dist.Runtime, named: Path | None) -> Path:
    """Rank 0's seed and run directory on every rank (`named`, or a default name rank 0
    picks), its paths checked: nothing is written or printed before every rank knows it."""
    opts.seed = rt.agree(opts.seed)  # without -seed every process drew its own: rank 0's for all
    run_dir = named or Path(rt.broadcast(str(default_run_dir()) if rt.is_main else None))
    rundir.check_paths(opts, run_dir)
    rt.one_voice()
    return run_dir


def _restore_point(run_dir: Path, resume: str | Path | None, rt: dist.Runtime) -> dict | None:
    """The checkpoint to continue from (verified), or None for a fresh run."""
    path = run_dir / ckpt.CHECKPOINT
    if not resume:
        if path.exists():
            raise OptionError(f"{run_dir} already holds a run; continue it with --resume "
                              f"{shlex.quote(str(run_dir))}, or choose another -save directory")  # fmt: skip
        return None
    saved = ckpt.load(path)
    n = saved.get("world_size", 1)
    if n != rt.world_size:
        how = f"torchrun --nproc-per-node {n} -m feedalign train" if n > 1 else "feedalign train"
        raise OptionError(
            f"{run_dir} was trained by {n} process(es), not {rt.world_size}: its shuffle shards and "
            f"checkpoint are per process. Resume it with: {how} --resume {shlex.quote(str(run_dir))}"
        )
    return saved


def _load_data_in_rank_order(opts: Options, rt: dist.Runtime) -> Data:
    """Rank 0 first: it fits and caches the preprocessing the others then read."""
    data = load_data(opts, rt.device) if rt.is_main else None
    rt.barrier()
    return data if data is not None else load_data(opts, rt.device)


def _record_start(run_dir: Path, opts: Options, rt: dist.Runtime, *, resumed: bool, vocab: list[str]) -> None:
    (run_dir / FINISHED).unlink(missing_ok=True)  # an extended run is no longer finished
    write_json(run_dir / "options.json", opts.to_dict())
    if opts.text:  # what `feedalign sample` decodes with (JSON: data, never executed)
        write_json(run_dir / VOCAB, {"vocab": "".join(vocab)})
    env = environment(rt.device) | {"world_size": rt.world_size}
    write_json(run_dir / ("env.json" if not resumed else f"env.resume{int(time.time())}.json"), env)


@dataclass
class Run:
    """What a run holds while it trains; its methods are the steps of an epoch."""

    opts: Options
    rt: dist.Runtime
    dir: Path
    model: nn.Module
    optimizer: Optimizer
    schedule: Schedule
    step: TrainingStep
    loader: object  # feedalign.data.EpochLoader
    test: tuple[Tensor, Tensor]  # this rank's share of the test set
    first_epoch: int = 1
    state: EpochState = field(default_factory=EpochState)
    runlog: RunLog | None = None  # rank 0, once the run directory is written

    @classmethod
    def build(cls, opts: Options, rt: dist.Runtime, run_dir: Path, data: Data, saved: dict | None) -> Run:
        model = make_model(opts, data, rt.device)
        if opts.load != "none":
            ckpt.load_weights(model, opts.load)
        criterion = make_criterion(opts.criterion, per_position=opts.text)
        dist.check_same_feedback(rt, feedback(model))
        optimizer = Optimizer(model.parameters(), opts)
        schedule = Schedule(opts.LR, opts.epoch_step, opts.epoch,
                            milestones=parse_milestones(opts.lr_milestones), gamma=opts.lr_gamma)  # fmt: skip
        first_epoch, state = _restore(saved, model, optimizer, schedule, rt, run_dir, opts.seed)
        step = TrainingStep(
            dist.wrap(model, rt, batch_reduction=getattr(criterion, "batch_reduction", "mean")), criterion,
            optimizer, schedule, eps=opts.eps, acc_gradient=bool(opts.accGradient), max_out=opts.maxOutNorm,
            max_in=opts.maxInNorm, train_biases=bool(opts.bias),
            amp=torch.bfloat16 if opts.amp == "bf16" else None, clip=opts.clip,
        )  # fmt: skip
        test = (data.test_x[rt.rank :: rt.world_size], data.test_y[rt.rank :: rt.world_size])
        what = f"{len(data.train_x)} training / {len(data.test_x)} test samples {data.input_shape}"
        if opts.text:
            what = (f"{len(data.train_x)} training characters / {len(data.test_x)} validation windows of "
                    f"{opts.context}, vocabulary {len(data.classes)}")  # fmt: skip
        threads = f", {torch.get_num_threads()} thread(s)" if rt.device.type == "cpu" else ""
        if rt.is_main:  # what the run is, on standard output with its results
            say(f"{opts.dataset}: {what}; {opts.network} learning by {opts.gradient}; {rt.world_size} "
                f"process(es) on {rt.device}{threads}; seed {opts.seed} (-seed {opts.seed} repeats the "
                f"run); run directory {run_dir}")  # fmt: skip
            say(describe(model))  # which rule trains which parameter
        return cls(opts, rt, run_dir, model, optimizer, schedule, step, _loader(opts, data, rt), test,
                   first_epoch, state)  # fmt: skip

    def epoch(self, epoch: int, stop: StopFlag, on_batch) -> str | None:
        """Train epoch `epoch`, record it and checkpoint; return why the run ends, or None."""
        self.loader.set_epoch(epoch)
        lr = self.schedule.lr
        t0 = time.perf_counter()
        progress = not self.opts.quiet and sys.stderr.isatty() and self.rt.is_main
        try:
            self.state = train_epoch(self.step, self.loader, self.state, stop=stop, progress=progress,
                                     reduce=self.rt.reducer, on_batch=on_batch(epoch, self.state, stop),
                                     desc=f"epoch {epoch}")  # fmt: skip
        except Diverged as err:
            kept = what_is_kept(self.dir, when=f" (after epoch {epoch - 1} or at Ctrl-C)", good=True)
            raise Diverged(f"{err} of epoch {epoch}; stopped, {kept}") from None
        self.state.seconds += time.perf_counter() - t0
        if self.state.batch < len(self.loader):
            self.checkpoint(epoch - 1, self.state)
            raise Interrupted(f"interrupted at epoch {epoch}, batch {self.state.batch}; checkpoint written. "
                              f"Continue with: {self.resume_line}", stop.signum)  # fmt: skip
        reason = self.record(epoch, lr)
        self.state = EpochState()
        self.checkpoint(epoch, self.state)
        if reason is None and epoch == self.opts.epoch:
            reason = f"reached -epoch {self.opts.epoch}"
        if reason is not None and self.runlog is not None:
            self.runlog.finish(reason)
            say(summary(self.runlog.records, reason, self.dir))
        if reason is None and self._stop_agreed(stop):  # Ctrl-C while evaluating: this checkpoint will do
            raise Interrupted(f"interrupted after epoch {epoch}; checkpoint written. Continue with: "
                              f"{self.resume_line}", stop.signum)  # fmt: skip
        return reason

    def _stop_agreed(self, stop: StopFlag) -> bool:
        """Whether a stop was asked, on any rank (every rank then stops here)."""
        if not self.rt.distributed:
            return stop.requested
        return self.rt.reduce(torch.tensor(float(stop.requested))).item() > 0

    @property
    def resume_line(self) -> str:
        return resume_command(self.dir, self.rt.world_size, self.opts.nGPU)

    def record(self, epoch: int, lr: float) -> str | None:
        """Evaluate, log and append the epoch's record; the schedule's verdict (None: go on)."""
        st = self.state
        wrong, loss_sum, seen = dist.epoch_totals(self.rt, st.wrong, st.loss_sum, st.seen)
        dist.average_batchnorm_statistics(self.model, self.rt)  # every rank evaluates and saves the same
        test_error, test_loss = evaluate(self.model, self.step.criterion, *self.test, reduce=self.rt.reducer,
                                         amp=self.step.amp)  # fmt: skip
        reason = self.schedule.update(epoch, wrong / seen)
        record = {"epoch": epoch, "train_error": wrong / seen, "smoothed_error": self.schedule.smoothed,
                  "train_loss": loss_sum / seen, "test_error": test_error, "test_loss": test_loss,
                  "lr": lr, "seconds": st.seconds} | _means(st.extras)  # fmt: skip
        if self.opts.text:
            record |= _text_metrics(self.opts, epoch, record, seen, st.seconds)
            line = (f"iteration {record['iteration']}: train loss {record['train_loss']:.4f} "
                    f"({record['train_bpc']:.3f} bits/char) | validation {test_loss:.4f} "
                    f"({record['test_bpc']:.3f}) | {record['tokens_per_s']:.0f} tokens/s")  # fmt: skip
        else:
            of = f"/{self.opts.epoch}" if self.opts.epoch != -1 else ""
            line = (f"epoch {epoch}{of}: train error {100 * record['train_error']:.2f}% loss "
                    f"{record['train_loss']:.4g} | test error {100 * test_error:.2f}% loss {test_loss:.4g} | "
                    f"lr {lr:.3g} | {st.seconds:.1f} s")  # fmt: skip
            if self.opts.epoch_step == 0:  # the auto schedule halves the LR when an epoch does not beat it
                line += f" | smoothed train error {100 * self.schedule.smoothed:.2f}%"
        if self.runlog is not None:
            say(line)
            with self.writing(self.dir / METRICS, "the epoch's record; the previous checkpoint is kept"):
                self.runlog.add(record)
        return reason

    def checkpoint(self, epoch: int, st: EpochState) -> None:
        """Save after `epoch` (and `st.batch` batches of the next); every rank takes part."""
        rngs = self.rt.gather(ckpt.rng_state(self.rt.device))  # each rank resumes its own dropout stream
        sums = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in st.to_dict().items()}
        if st.wrong is not None:  # a partial epoch: keep the sums over all ranks
            wrong, loss_sum, seen = dist.epoch_totals(self.rt, st.wrong, st.loss_sum, st.seen)
            sums |= {"wrong": torch.tensor(wrong, dtype=torch.float64), "seen": int(seen),
                     "loss_sum": torch.tensor(loss_sum, dtype=torch.float64)}  # fmt: skip
        if not self.rt.is_main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "epoch": epoch, "epoch_state": sums, "rng": rngs,
                 "world_size": self.rt.world_size, "options": self.opts.to_dict()}  # fmt: skip
        with self.writing(self.dir / ckpt.CHECKPOINT, "the checkpoint; the previous one is kept"):
            ckpt.save(state, self.dir / ckpt.CHECKPOINT)

    @contextlib.contextmanager
    def writing(self, path: Path, what: str) -> Iterator[None]:
        """The OS refusing a write (disk full, a file-size limit) stops the run with one line naming
        the file, what was kept and how to continue."""
        try:
            yield
        except OSError as err:
            raise OSError(err.errno, f"{err.strerror} while writing {what}. Free space (or raise the "
                          f"file-size limit) and continue with: {self.resume_line}",
                          err.filename or str(path)) from None  # fmt: skip


def _restore(saved: dict | None, model: nn.Module, optimizer: Optimizer, schedule: Schedule,
             rt: dist.Runtime, run_dir: Path, seed: int) -> tuple[int, EpochState]:  # fmt: skip
    """(first epoch, epoch state) after loading `saved` into the pieces; a fresh run seeds them."""
    if saved is None:
        torch.manual_seed(seed + 7919 * rt.rank)  # dropout masks: seeded, different per rank
        return 1, EpochState()
    ckpt.check_same_network(model, saved["model"], run_dir / ckpt.CHECKPOINT)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"] if "optimizer" in saved else saved["stepper"])
    schedule.load_state_dict(saved["schedule"])
    state = EpochState(**saved["epoch_state"])
    if state.wrong is not None:
        state.wrong, state.loss_sum, state.seen = dist.restart_partial_sums(
            rt, state.wrong, state.loss_sum, state.seen
        )
    ckpt.set_rng_state(saved["rng"][rt.rank], rt.device)
    log.info(f"resuming {run_dir} at epoch {saved['epoch'] + 1}, batch {state.batch}")
    return saved["epoch"] + 1, state


def _loader(opts: Options, data: Data, rt: dist.Runtime):
    from feedalign.data import EpochLoader

    if opts.text:  # random windows of the training characters, eval_every batches per interval
        from feedalign.data.text import WindowLoader

        last = opts.iterations - (opts.epoch - 1) * opts.eval_every
        return WindowLoader(data.train_x, opts.batchSize, opts.context, opts.eval_every, seed=opts.seed,
                            rank=rt.rank, last_steps=last, epochs=opts.epoch)  # fmt: skip
    per_rank = -(-len(data.train_x) // rt.world_size)
    lone = opts.batchnorm > 0 and per_rank % opts.batchSize == 1  # BatchNorm cannot normalise 1 sample
    if lone:
        log.warning("the last batch of each epoch would hold a single sample, which BatchNorm cannot "
                    "normalise: it is left out")  # fmt: skip
    return EpochLoader(data.train_x, data.train_y, opts.batchSize, seed=opts.seed, augment=opts.augment,
                       jitter=opts.jitter, hflip=opts.hflip, rank=rt.rank, world_size=rt.world_size,
                       drop_last=lone)  # fmt: skip


def _text_metrics(opts: Options, epoch: int, record: dict, seen: float, seconds: float) -> dict:
    """Text runs: iterations done, the losses (nats per character) in bits per character,
    and training characters (tokens) per second of this interval's training steps."""
    return {"iteration": min(epoch * opts.eval_every, opts.iterations),
            "train_bpc": record["train_loss"] / math.log(2), "test_bpc": record["test_loss"] / math.log(2),
            "tokens_per_s": seen / max(seconds, 1e-9)}  # fmt: skip


def _means(extras: dict) -> dict:
    """Per-epoch means of diagnostics accumulated as {"layer/metric": [sum, count]}."""
    if not extras:
        return {}
    out: dict[str, dict[str, float]] = {}
    for key, (total, count) in extras.items():
        layer, metric = key.rsplit("/", 1)
        out.setdefault(layer, {})[metric] = total / count
    return {"alignment": out}


def _batch_hook(opts: Options, run: Run, stop_at: tuple[int, int] | None):
    """Per-batch extras: alignment angles every `opts.alignment` steps (rank 0), the
    tests' simulated Ctrl-C. Returns a factory taking (epoch, state, stop)."""

    def factory(epoch: int, state: EpochState, stop: StopFlag):
        if not opts.alignment and stop_at is None:
            return None

        def on_batch(x: Tensor, y: Tensor, i: int) -> None:
            if opts.alignment and run.rt.is_main and run.optimizer.steps % opts.alignment == 0:
                _add_alignment(state, run.model, x, y, run.step.criterion)
            if stop_at == (epoch, i + 1):
                stop.requested = True

        return on_batch

    return factory


def _add_alignment(state: EpochState, model: nn.Module, x: Tensor, y: Tensor, criterion: nn.Module) -> None:
    from feedalign.metrics.alignment import alignment

    for layer, metrics in alignment(model, x, y, criterion).items():
        for metric, value in metrics.items():
            if not math.isfinite(value):  # nan: a zero gradient has no direction
                continue
            total = state.extras.setdefault(f"{layer}/{metric}", [0.0, 0])
            total[0] += value
            total[1] += 1


def evaluate_run(run_dir: str | Path, *, split: str = "test", datapath: str | None = None,
                 trust_model_file: bool = False) -> tuple[float, float]:  # fmt: skip
    """(error, loss) of a saved run's checkpoint on its test or training split. The run
    directory is data: a model file it names is imported only with trust_model_file."""
    run_dir = Path(run_dir)
    opts = rundir.options_from_run(run_dir)
    rundir.check_trusted(opts, run_dir, trust_model_file)
    if datapath is not None:
        opts.datapath = datapath
    opts.type = "cuda" if torch.cuda.is_available() and opts.type == "cuda" else "float"
    opts.load, opts.compile_optimizer = "none", False  # the weights come from the checkpoint
    opts.check()
    device = dist.device_for(opts.type, min(opts.devid, max(1, torch.cuda.device_count())))
    state = ckpt.load(run_dir / ckpt.CHECKPOINT)  # verified before the data is loaded
    data = load_data(opts, device)
    model = make_model(opts, data, device)
    weights = state.get("model", state)
    ckpt.check_same_network(model, weights, run_dir / ckpt.CHECKPOINT)
    model.load_state_dict(weights)
    x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
    return evaluate(model, make_criterion(opts.criterion, per_position=opts.text), x, y)
