"""Data parallelism on torch.distributed (DDP): gloo on CPU, nccl on GPU.

`torchrun --nproc-per-node N -m feedalign train …` starts N processes; each
reads RANK / WORLD_SIZE / LOCAL_RANK from the environment. Every rank builds the
same model and feedback matrices from the seed; a checksum of the feedback is
compared across ranks before DDP wraps the model (DDP would otherwise silently
overwrite a mismatch with rank 0's buffers). Each rank trains on its shard of
the epoch's shuffled order, gradients are averaged by DDP, metrics are summed
with `reduce`, and only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) of each rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def reducer(self):
        """`reduce` under several processes; None with one (the loop then skips the agreements)."""
        return self.reduce if self.distributed else None

    def reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks (a copy; the identity with one process)."""
        if not self.distributed:
            return t
        t = t.detach().clone().to(self.device)
        dist.all_reduce(t)
        return t

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a run directory's name, which only rank 0 may pick)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def agree(self, value: int) -> int:
        """Rank 0's value of an integer on every rank (a seed each process drew for itself)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (on every rank); [obj] with one process."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def one_voice(self) -> None:
        """Rank 0 reports; the other ranks only warn (one log, not N interleaved)."""
        if not self.is_main:
            logging.getLogger("feedalign").setLevel(logging.WARNING)


def epoch_totals(rt: Runtime, wrong: Tensor, loss_sum: Tensor, seen: int) -> list[float]:
    """[misclassified, Σ loss × samples, samples] of an epoch so far, summed over ranks (float64)."""
    n = torch.tensor(float(seen), device=rt.device, dtype=torch.float64)
    return rt.reduce(torch.stack([wrong.double(), loss_sum.double(), n])).tolist()


def restart_partial_sums(
    rt: Runtime, wrong: Tensor, loss_sum: Tensor, seen: int
) -> tuple[Tensor, Tensor, int]:
    """A checkpoint holds an interrupted epoch's sums over all ranks: on resume rank 0
    continues from them and the other ranks from zero, so that their sum is unchanged."""
    keep = 1.0 if rt.is_main else 0.0
    wrong = wrong.to(rt.device, torch.float64) * keep
    return wrong, loss_sum.to(rt.device, torch.float64) * keep, seen if rt.is_main else 0


ORIGINAL_THREADS = 8  # the original's -threads


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: what taskset, a batch
    scheduler or a container allows), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """-threads when not given: the usable cores, shared among the processes torchrun starts
    on this machine (LOCAL_WORLD_SIZE), at most the original's 8."""
    per_process = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(ORIGINAL_THREADS, per_process))


THREADS_DEFAULT = "the CPU cores this process may use, at most 8 (under torchrun: shared by its processes)"


def device_for(device_type: str, devid: int) -> torch.device:
    """The device of a single process: -type float -> CPU, -type cuda -> GPU devid (1-based)."""
    return torch.device(f"cuda:{devid - 1}") if device_type == "cuda" else torch.device("cpu")


def setup(device_type: str, devid: int) -> Runtime:
    """The process's runtime: a single process, or one rank of a torchrun job."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(device_for(device_type, devid))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device(f"cuda:{local}")  # one GPU per process; -devid is ignored
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rt = Runtime(device, rank, world)
    rt.peers = rt.gather((socket.gethostname(), os.getpid()))  # to name a rank that is lost (peer_lost)
    return rt


def teardown(*, agreed: bool = True) -> None:
    """Destroy the process group; call it once the DDP model is no longer referenced.

    agreed: every rank got here the same way (finished, or stopped at the same sync
    point), so they meet at a barrier first: a rank that closes its connections while
    another is still finishing its last collective can abort that one (gloo, under
    load). After an error on one rank the others may never come, so no barrier then."""
    if dist.is_initialized():
        if agreed and dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":  # names a rank that does not come, after 60 s
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        # a DDP wrapper left in a reference cycle (the training step holds it) must be
        # collected before its process group goes: freed after it, its reducer aborts
        # the process at exit ("terminate called without an active exception")
        gc.collect()
        dist.destroy_process_group()


class PeerLost(RuntimeError):
    """Another process of the run stopped (killed, or failed) while this one needed it.
    `quiet`: a lower live rank says so (one message, not one per survivor)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


# what gloo and NCCL say when a peer's connection goes (the collective then raises a RuntimeError)
PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Read error|Broken pipe|NCCL communicator was "
                       r"aborted|remote process exited|Socket Timeout|timed out", re.IGNORECASE)  # fmt: skip


def peer_lost(rt: Runtime, err: BaseException, *, wait_s: float = 2.0) -> PeerLost | None:
    """`err` as the loss of another rank, naming it, or None if it is not that. A rank on this
    host counts as lost once its process is gone (or a zombie); its connections close as it
    exits, so the check waits up to `wait_s` for the kernel to finish the exit."""
    if not rt.distributed or not (type(err) is RuntimeError or isinstance(err, dist.DistError)):
        return None  # our own RuntimeErrors (Diverged, Interrupted, …) are not a peer's loss
    deadline = time.monotonic() + wait_s
    lost = _gone_ranks(rt)
    while not lost and PEER_GONE.search(str(err)) and time.monotonic() < deadline:
        time.sleep(0.05)
        lost = _gone_ranks(rt)
    if not lost and not PEER_GONE.search(str(err)):
        return None
    alive = [r for r in range(rt.world_size) if r not in lost]
    if lost:
        who = ", ".join(f"rank {r} (pid {rt.peers[r][1]})" for r in lost)
    else:  # on another host, or not gone yet: what the transport said
        who = f"another rank ({str(err).strip().splitlines()[0][:120]})"
    return PeerLost(f"{who} stopped before the others (killed, or failed: see its own message); rank "
                    f"{rt.rank} stops too", quiet=bool(alive) and rt.rank != min(alive))  # fmt: skip


def _gone_ranks(rt: Runtime) -> list[int]:
    here = socket.gethostname()
    return [r for r, (host, pid) in enumerate(rt.peers) if r != rt.rank and host == here and not _alive(pid)]


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet collected by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): it exists
        return True
    return state not in ("Z", "X")


class FeedbackMismatch(RuntimeError):
    """Ranks built different feedback matrices (different seeds)."""


def feedback_checksum(buffers: list[Tensor]) -> Tensor:
    """Float64 sums of each feedback matrix and of its squares: equal seeds, equal sums."""
    if not buffers:
        return torch.zeros(2, dtype=torch.float64)
    flat = torch.cat([b.detach().double().flatten().cpu() for b in buffers])
    weights = torch.arange(1, len(flat) + 1, dtype=torch.float64) / len(flat)
    return torch.stack([flat.sum(), (flat * weights).sum(), (flat * flat).sum()])


def check_same_feedback(rt: Runtime, buffers: list[Tensor]) -> None:
    """Refuse to train if any rank's feedback matrices differ from rank 0's."""
    if not rt.distributed:
        return
    mine = feedback_checksum(buffers).to(rt.device)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    differs = torch.tensor([0.0 if torch.allclose(mine, ref, rtol=0, atol=0) else 1.0], device=rt.device)
    dist.all_reduce(differs)
    if differs.item() > 0:
        raise FeedbackMismatch(
            f"feedback matrices differ between ranks ({int(differs.item())} of {rt.world_size} differ "
            f"from rank 0; rank {rt.rank} checksum {mine.tolist()} vs {ref.tolist()}): every rank must "
            "build the model with the same -seed"
        )


def _sum_hook(state, bucket):
    """All-reduce gradients as a sum (DDP's default divides by the world size)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(model: nn.Module, rt: Runtime, *, batch_reduction: str = "mean") -> nn.Module:
    """DDP around `model`. batch_reduction: how the loss treats the batch — "mean"
    (ce: DDP's average of per-rank means is the global batch's mean) or "sum" (bce,
    docs/original.md §3: gradients summed over the batch, so ranks' gradients are summed too).
    Either way N ranks × batch B step exactly like one process with batch N·B."""
    if not rt.distributed:
        return model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    # broadcast_buffers=False: feedback matrices are equal by construction (checked
    # above) and need no per-step broadcast; BN running statistics are averaged over
    # ranks at each epoch's end (average_batchnorm_statistics), not overwritten by rank 0's.
    ddp_args = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in ddp_args
        else {"broadcast_buffers": False}
    )
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)
    if batch_reduction == "sum":
        ddp.register_comm_hook(None, _sum_hook)
    return ddp


def average_batchnorm_statistics(model: nn.Module, rt: Runtime) -> None:
    """Average BatchNorm running mean and variance over ranks, in place. Each rank's
    were estimated on its own shard; averaged, every rank evaluates with the same
    statistics and rank 0 saves them (as timm's distribute_bn). Called at epoch ends."""
    if not rt.distributed:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for t in (m.running_mean, m.running_var):
                dist.all_reduce(t)
                t.div_(rt.world_size)
