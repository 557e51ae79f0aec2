"""`feedalign train -nGPU N`: N data-parallel processes of one command line, and one
process between them and the user (what torchrun does, with feedalign's exit codes).

The launcher holds the rendezvous store (127.0.0.1, a port the kernel picks; the ranks join
it as torchrun's agent store) and starts ranks 0..N-1 as `python -m feedalign <argv>`:

- Signals. The ranks run in a session of their own, so a Ctrl-C in the terminal reaches only
  the launcher, which passes each SIGINT or SIGTERM on, once, to every rank, a rank started
  after the signal came included: they stop at the same batch, rank 0 writes one checkpoint
  and prints one resume line. A second Ctrl-C stops them at once. The launcher exits as the
  ranks did: 130 (Ctrl-C) or 143 (SIGTERM).
- A rank's start-up. Each rank starts with SIGINT and SIGTERM blocked (held, not lost) and
  unblocks them once its handlers are in place (`as_rank`, from feedalign.cli): a signal
  that comes while its Python starts is answered in one line, never a traceback.
- A lost rank. A rank killed by a signal the launcher did not pass on (SIGKILL, the kernel's
  out-of-memory killer) is named; the others notice at their next collective (gloo: at once)
  and stop, the lowest of them saying so with the resume command. Any rank still running
  GRACE_S seconds after the first one ended is killed. The exit code is the first failing
  rank's own (a rank killed: EXIT_LOST).
- The launcher's own end. On Linux each rank is killed with it (PR_SET_PDEATHSIG, set by the
  rank itself): no rank trains on, orphaned, if the launcher is killed; otherwise the
  launcher's `finally` ends them.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time

log = logging.getLogger("feedalign")
GRACE_S = 30.0  # after the first rank ends in failure: how long the others get to stop by themselves
POLL_S = 0.1
EXIT_LOST = 6  # feedalign.cli.EXIT_LOST (not imported: the launcher stays light)
FORWARDED = (signal.SIGINT, signal.SIGTERM)
LAUNCHER = "FEEDALIGN_LAUNCHER_PID"  # in each rank's environment: the pid of the launcher that started it


def launch(n: int, argv: list[str]) -> int:
    """Run `feedalign <argv>` as ranks 0..n-1 and return the exit code the user should see."""
    log.info(f"running {n} processes (ranks 0-{n - 1}) of: feedalign {shlex.join(argv)}")
    return run_ranks(n, [sys.executable, "-m", "feedalign", *argv])


def run_ranks(n: int, cmd: list[str]) -> int:
    """Run `cmd` as ranks 0..n-1 of one process group (RANK, WORLD_SIZE, MASTER_PORT, … set);
    the exit code to report (module docstring)."""
    from torch.distributed import TCPStore

    sent: list[int] = []  # every SIGINT / SIGTERM the launcher got, in order
    handlers = {sig: signal.signal(sig, lambda signum, frame: sent.append(signum))
                for sig in FORWARDED if signal.getsignal(sig) is not signal.SIG_IGN}  # fmt: skip
    # blocked from before the store's threads start until every rank is started: the ranks
    # inherit the mask (feedalign.cli unblocks it); a signal meanwhile is recorded all the same
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    ranks: list[subprocess.Popen] = []
    store = None
    try:
        store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": str(n),
                            "LOCAL_WORLD_SIZE": str(n), "TORCHELASTIC_USE_AGENT_STORE": "True",
                            LAUNCHER: str(os.getpid())}  # fmt: skip
        for rank in range(n):
            ranks.append(subprocess.Popen(cmd, env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          start_new_session=True))  # fmt: skip
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return _wait(ranks, sent)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.wait()
        del store


def as_rank() -> None:
    """At the start of a process that run_ranks started (feedalign.cli, once its signal handlers
    are in place): die with the launcher (Linux), then take the signals held since start-up."""
    launcher = int(os.environ.pop(LAUNCHER, "0"))  # popped: the rank's own children are no ranks
    if not launcher:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's `finally` ends the ranks
        pass
    if os.getppid() != launcher:  # it died before the line above: nobody would stop this rank
        log.error(f"the launcher (pid {launcher}) of this rank is gone; stopped")
        sys.exit(EXIT_LOST)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


def _wait(ranks: list[subprocess.Popen], sent: list[int]) -> int:
    """Pass each signal in `sent` on to every rank, once; wait for every rank; name one killed
    by a signal the launcher did not send; kill those still running GRACE_S after the first
    failure. Returns the exit code to report."""
    passed = [0] * len(ranks)  # how many of `sent` each rank has had (the handler only appends)
    failures: list[tuple[int, int]] = []  # (rank, code), in the order seen
    killed: set[int] = set()  # ranks the launcher killed itself
    first_failure_at = None
    while True:
        for rank, p in enumerate(ranks):
            while passed[rank] < len(sent):
                if p.poll() is None:
                    p.send_signal(sent[passed[rank]])
                passed[rank] += 1
        codes = [p.poll() for p in ranks]
        for rank, code in enumerate(codes):
            if code not in (None, 0) and rank not in (r for r, _ in failures):
                failures.append((rank, code))
                first_failure_at = first_failure_at or time.monotonic()
                if code < 0 and -code not in sent and rank not in killed:
                    how = signal.Signals(-code).name
                    log.error(f"rank {rank} (pid {ranks[rank].pid}) was killed by {how} (the out-of-memory "
                              "killer sends SIGKILL); the other ranks stop")  # fmt: skip
        if all(code is not None for code in codes):
            break
        if first_failure_at is not None and time.monotonic() - first_failure_at > GRACE_S:
            for rank, p in enumerate(ranks):
                if p.poll() is None and rank not in killed:
                    log.error(f"rank {rank} (pid {p.pid}) did not stop within {GRACE_S:.0f} s: killed")
                    killed.add(rank)
                    p.kill()
        time.sleep(POLL_S)
    if not failures:
        return 0
    own = [code for _, code in failures if code > 0 and code != EXIT_LOST]  # a rank's own reason first
    if own:
        return own[0]
    code = failures[0][1]
    if code < 0:
        return 128 - code if -code in sent else EXIT_LOST
    return code
