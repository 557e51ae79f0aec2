"""`train(options)`: a whole run — data, model, resume, epochs, evidence (SPEC §4–6).

The run directory (rank 0 writes it):
    options.json   resolved options (seed included)      env.json   versions, device, commit
    metrics.jsonl  one object per epoch                   ErrorRate.log  the original's two columns
    checkpoint.pt  after every epoch and on Ctrl-C        finished.json  why and when it ended
    errors.png     with -visualize 1                      tensorboard/   with --tensorboard
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from feedalign import dist
from feedalign.losses import make_criterion
from feedalign.models import build_model, feedback
from feedalign.train import checkpoint as ckpt
from feedalign.train.config import OptionError, Options
from feedalign.train.loop import Diverged, EpochState, Step, StopFlag, evaluate, train_epoch
from feedalign.train.memory import keep_freed_memory
from feedalign.train.optim import Schedule, Stepper
from feedalign.train.runlog import RunLog, default_run_dir, environment, write_json

log = logging.getLogger("feedalign")


class Interrupted(RuntimeError):
    """Ctrl-C: a checkpoint was written; `feedalign train --resume DIR` continues."""


@dataclass
class Data:
    train_x: Tensor  # (N, C, H, W) float32, preprocessed, on the device
    train_y: Tensor  # (N,) int64
    test_x: Tensor
    test_y: Tensor
    classes: list[str]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def load_data(opts: Options, device: torch.device, *, split: str = "test") -> Data:
    """The dataset as SPEC §5 prepares it, moved to `device` once."""
    from feedalign.data import load_dataset
    from feedalign.preprocess import prepare

    train, test = load_dataset(
        opts.dataset, opts.datapath, validate=opts.validate, svhn_extra=opts.svhn_extra
    )
    train_x, test_x = prepare(
        train.images.to(device), test.images.to(device), dataset=opts.dataset, validate=opts.validate,
        format=opts.format, whiten=opts.whiten, normalization=opts.normalization, cache_dir=opts.preProcDir,
    )  # fmt: skip
    return Data(train_x, train.labels.to(device), test_x, test.labels.to(device), list(train.classes))


def make_model(opts: Options, data: Data, device: torch.device) -> torch.nn.Module:
    model = build_model(
        opts.network, data.input_shape, len(data.classes), rule=opts.gradient, nonlin=opts.nonlin,
        num_layers=opts.num_layers, num_hidden=opts.num_hidden, dropout=opts.dropout,
        batchnorm=opts.batchnorm, bias=bool(opts.bias), rfb_mag=opts.rfb_mag, criterion=opts.criterion,
        seed=opts.seed, models_folder=opts.modelsFolder, error_at=opts.error_at,
    )  # fmt: skip
    return model.to(device)


def resolve(opts: Options) -> Options:
    """Check options and fill in what is drawn (the seed), before any data is loaded."""
    opts.check()
    if opts.seed is None:
        opts.seed = int.from_bytes(os.urandom(4), "little") % 2**31
    if opts.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as err:
            raise OptionError("--tensorboard needs the tensorboard package: pip install tensorboard") from err
    return opts


def train(opts: Options, *, resume: str | Path | None = None, stop_at: tuple[int, int] | None = None) -> Path:
    """Train as SPEC §4 and return the run directory.

    resume: a run directory to continue (its options.json is used; `opts` may only
        change the options in feedalign.train.cli.RESUME_MAY_CHANGE — the CLI enforces it).
    stop_at: (epoch, batch) — behave as if Ctrl-C came after that batch (tests).
    Raises Interrupted (checkpoint written) or Diverged (last good checkpoint kept).
    """
    resolve(opts)
    torch.set_num_threads(opts.threads)
    rt = dist.setup(opts.type, opts.devid)
    opts.seed = rt.agree(opts.seed)  # without -seed every process drew its own: rank 0's for all
    if rt.device.type == "cpu":
        keep_freed_memory()  # no page faults on the buffers every step re-allocates
    if not rt.is_main:  # one voice: rank 0 reports, the others only warn
        logging.getLogger("feedalign").setLevel(logging.WARNING)
    run_dir = Path(resume) if resume else Path(opts.save) if opts.save else default_run_dir()
    saved = ckpt.load(run_dir / ckpt.CHECKPOINT) if resume else None
    if saved is None and (run_dir / ckpt.CHECKPOINT).exists():
        raise OptionError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                          "or choose another -save directory")  # fmt: skip
    if saved is not None and saved.get("world_size", 1) != rt.world_size:
        n = saved.get("world_size", 1)
        how = f"torchrun --nproc-per-node {n} -m feedalign train" if n > 1 else "feedalign train"
        raise OptionError(
            f"{run_dir} was trained by {n} process(es), not {rt.world_size}: its shuffle "
            f"shards and checkpoint are per process. Resume it with: {how} --resume {run_dir}"
        )
    if rt.is_main:
        data = load_data(opts, rt.device)  # rank 0 first: it fits and caches the preprocessing
    rt.barrier()
    if not rt.is_main:
        data = load_data(opts, rt.device)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "finished.json").unlink(missing_ok=True)
        write_json(run_dir / "options.json", opts.to_dict())
        env = environment(rt.device) | {"world_size": rt.world_size}
        write_json(run_dir / ("env.json" if not resume else f"env.resume{int(time.time())}.json"), env)

    model = make_model(opts, data, rt.device)
    if opts.load != "none":
        ckpt.load_weights(model, opts.load)
    criterion = make_criterion(opts.criterion)
    dist.check_same_feedback(rt, feedback(model))
    stepper = Stepper(model.parameters(), opts)
    schedule = Schedule(opts.LR, opts.epoch_step, opts.epoch)
    first_epoch, state = 1, EpochState()
    if saved is not None:
        model.load_state_dict(saved["model"])
        stepper.load_state_dict(saved["stepper"])
        schedule.load_state_dict(saved["schedule"])
        first_epoch = saved["epoch"] + 1
        state = EpochState(**saved["epoch_state"])
        if state.wrong is not None:  # the epoch's partial sums (over all ranks) restart on rank 0
            keep = 1.0 if rt.is_main else 0.0
            state.wrong, state.loss_sum = (
                state.wrong.to(rt.device) * keep,
                state.loss_sum.to(rt.device) * keep,
            )
            state.seen = state.seen if rt.is_main else 0
        ckpt.set_rng_state(saved["rng"][rt.rank] if rt.distributed else saved["rng"][0], rt.device)
        log.info(f"resuming {run_dir} at epoch {first_epoch}, batch {state.batch}")
    else:
        torch.manual_seed(opts.seed + 7919 * rt.rank)  # dropout masks: seeded, different per rank
    ddp_model = dist.wrap(model, rt, batch_reduction=getattr(criterion, "batch_reduction", "mean"))
    step = Step(ddp_model, criterion, stepper, schedule, eps=opts.eps, acc_gradient=bool(opts.accGradient),
                max_out=opts.maxOutNorm, max_in=opts.maxInNorm, bias=bool(opts.bias),
                amp=torch.bfloat16 if opts.amp == "bf16" else None)  # fmt: skip
    from feedalign.data import EpochLoader

    per_rank = -(-len(data.train_x) // rt.world_size)
    lone = opts.batchnorm > 0 and per_rank % opts.batchSize == 1  # BatchNorm cannot normalise 1 sample
    if lone and rt.is_main:
        log.warning("the last batch of each epoch would hold a single sample, which BatchNorm cannot "
                    "normalise: it is left out")  # fmt: skip
    loader = EpochLoader(data.train_x, data.train_y, opts.batchSize, seed=opts.seed, augment=opts.augment,
                         rank=rt.rank, world_size=rt.world_size, drop_last=lone)  # fmt: skip
    test_x, test_y = data.test_x[rt.rank :: rt.world_size], data.test_y[rt.rank :: rt.world_size]
    runlog = RunLog(run_dir, resume_epoch=first_epoch - 1, visualize=opts.visualize == 1,
                    tensorboard=opts.tensorboard) if rt.is_main else None  # fmt: skip
    reduce = rt.reduce if rt.distributed else None
    progress = not opts.quiet and sys.stderr.isatty() and rt.is_main
    if rt.is_main:
        log.info(f"{opts.dataset}: {len(data.train_x)} training / {len(data.test_x)} test samples "
                 f"{data.input_shape}; {opts.network} learning by {opts.gradient}; {rt.world_size} "
                 f"process(es) on {rt.device}; run directory {run_dir}")  # fmt: skip

    def save(epoch: int, st: EpochState) -> None:
        rngs = [ckpt.rng_state(rt.device)]
        if rt.distributed:  # every rank's RNG, so that each resumes its own dropout stream
            rngs = [None] * rt.world_size
            torch.distributed.all_gather_object(rngs, ckpt.rng_state(rt.device))
        st_dict = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in st.to_dict().items()}
        if rt.distributed and st.wrong is not None:  # a partial epoch: keep the sums over all ranks
            wrong, loss_sum, seen = _epoch_totals(st, rt)
            st_dict |= {"wrong": torch.tensor(wrong, dtype=torch.float32), "seen": int(seen),
                        "loss_sum": torch.tensor(loss_sum, dtype=torch.float32)}  # fmt: skip
        if not rt.is_main:
            return
        ckpt.save_atomic({"model": model.state_dict(), "stepper": stepper.state_dict(),
                          "schedule": schedule.state_dict(), "epoch": epoch, "epoch_state": st_dict,
                          "rng": rngs, "world_size": rt.world_size, "options": opts.to_dict()},
                         run_dir / ckpt.CHECKPOINT)  # fmt: skip

    on_batch = _alignment_hook(opts, model, criterion, stepper, stop_at, rt)
    epoch = first_epoch
    with StopFlag() as stop:
        while opts.epoch == -1 or epoch <= opts.epoch:
            loader.set_epoch(epoch)
            lr = schedule.lr
            t0 = time.perf_counter()
            try:
                state = train_epoch(step, loader, state, stop=stop, progress=progress, reduce=reduce,
                                    on_batch=on_batch(epoch, state, stop), desc=f"epoch {epoch}")  # fmt: skip
            except Diverged as err:
                path = run_dir / ckpt.CHECKPOINT
                kept = "no checkpoint had been written yet"
                if path.exists():
                    kept = f"the last good checkpoint is kept: {path} (after epoch {epoch - 1} or at Ctrl-C)"
                raise Diverged(f"{err} of epoch {epoch}; stopped, {kept}") from None
            state.seconds += time.perf_counter() - t0
            if state.batch < len(loader):
                save(epoch - 1, state)
                raise Interrupted(f"interrupted at epoch {epoch}, batch {state.batch}; checkpoint written. "
                                  f"Continue with: feedalign train --resume {run_dir}")  # fmt: skip
            wrong, loss_sum, seen = _epoch_totals(state, rt)
            dist.average_batchnorm_statistics(model, rt)  # every rank evaluates and saves the same
            test_error, test_loss = evaluate(model, criterion, test_x, test_y, reduce=reduce, amp=step.amp)
            reason = schedule.update(epoch, wrong / seen)
            record = {"epoch": epoch, "train_error": wrong / seen, "smoothed_error": schedule.smoothed,
                      "train_loss": loss_sum / seen, "test_error": test_error, "test_loss": test_loss,
                      "lr": lr, "seconds": state.seconds} | _means(state.extras)  # fmt: skip
            if rt.is_main:
                log.info(
                    f"epoch {epoch}: train error {100 * record['train_error']:.2f}% (smoothed "
                    f"{100 * schedule.smoothed:.2f}%) loss {record['train_loss']:.4g} lr {lr:.3g} "
                    f"{state.seconds:.1f}s | test error {100 * test_error:.2f}% loss {test_loss:.4g}"
                )
                runlog.add(record)
            state = EpochState()
            save(epoch, state)
            if reason is None and epoch == opts.epoch:
                reason = f"reached -epoch {opts.epoch}"
            if reason is not None:
                if rt.is_main:
                    runlog.finish(reason)
                    log.info(f"finished: {reason}; run directory {run_dir}")
                break
            epoch += 1
    return run_dir


def _epoch_totals(state: EpochState, rt: dist.Runtime) -> list[float]:
    """[misclassified, Σ loss × samples, samples] of the epoch, summed over ranks."""
    seen = torch.tensor(float(state.seen), device=rt.device, dtype=torch.float64)
    return rt.reduce(torch.stack([state.wrong.double(), state.loss_sum.double(), seen])).tolist()


def _means(extras: dict) -> dict:
    """Per-epoch means of diagnostics accumulated as {"layer/metric": [sum, count]}."""
    if not extras:
        return {}
    out: dict[str, dict[str, float]] = {}
    for key, (total, count) in extras.items():
        layer, metric = key.rsplit("/", 1)
        out.setdefault(layer, {})[metric] = total / count
    return {"alignment": out}


def _alignment_hook(opts, model, criterion, stepper, stop_at, rt):
    """Per-batch extras: alignment angles every `opts.alignment` steps (rank 0), the
    tests' simulated Ctrl-C. Returns a factory taking (epoch, state, stop)."""

    def factory(epoch: int, state: EpochState, stop: StopFlag):
        if not opts.alignment and stop_at is None:
            return None

        def on_batch(x: Tensor, y: Tensor, i: int) -> None:
            if opts.alignment and rt.is_main and stepper.steps % opts.alignment == 0:
                from feedalign.metrics.alignment import alignment

                for layer, metrics in alignment(model, x, y, criterion).items():
                    for metric, value in metrics.items():
                        if not math.isfinite(value):  # nan: a zero gradient has no direction
                            continue
                        total = state.extras.setdefault(f"{layer}/{metric}", [0.0, 0])
                        total[0] += value
                        total[1] += 1
            if stop_at == (epoch, i + 1):
                stop.requested = True

        return on_batch

    return factory


def evaluate_run(
    run_dir: str | Path, *, split: str = "test", datapath: str | None = None
) -> tuple[float, float]:
    """(error, loss) of a saved run's checkpoint on its test or training split."""
    run_dir = Path(run_dir)
    opts = Options.from_dict(json.loads((run_dir / "options.json").read_text()))
    if datapath is not None:
        opts.datapath = datapath
    opts.type = "cuda" if torch.cuda.is_available() and opts.type == "cuda" else "float"
    device = dist.device_for(opts.type, min(opts.devid, max(1, torch.cuda.device_count())))
    data = load_data(opts, device)
    model = make_model(opts, data, device)
    ckpt.load_weights(model, run_dir / ckpt.CHECKPOINT)
    x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
    return evaluate(model, make_criterion(opts.criterion), x, y)
