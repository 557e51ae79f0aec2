"""Runs of a reproduction: rows × rules × seeds, each a `feedalign train` subprocess.

Run directories are `<out>/runs/<row>/<rule>/seed<k>`. What happens to one is
decided from what it holds (`decide`):
    finished.json                        -> skip (done)
    finished.json, budget now larger     -> extend (--resume with the new -epoch)
    checkpoint.pt, no finished.json      -> resume (--resume)
    anything else                        -> fresh (-save DIR)
so re-running the same command after a crash or Ctrl-C continues where it stopped.

`execute` keeps J trainers running at a time. Each child runs in its own session,
so a Ctrl-C at the terminal reaches only this process, which then sends each child
exactly one SIGINT (the trainer checkpoints and exits; a second SIGINT would abort it
without a checkpoint) and waits for them. The runner also writes `runner.json` into
each run directory: the command, its pid and exit status.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from feedalign.dist import usable_cores
from feedalign.reproduce.experiments import Row
from feedalign.rules import RULES
from feedalign.train.config import RESUME_MAY_CHANGE, Options
from feedalign.train.runlog import write_json

log = logging.getLogger("feedalign")

TRAINER = (sys.executable, "-m", "feedalign", "train")
GRACE_S = 300.0  # seconds children get to write their checkpoint after SIGINT
RUNNER_JSON = "runner.json"


@dataclass(frozen=True)
class Run:
    row: str
    rule: str
    seed: int
    dir: Path
    options: dict  # every train option of a fresh start except save and threads

    @property
    def label(self) -> str:
        return f"{self.row}/{self.rule}/seed{self.seed}"

    @property
    def epochs(self) -> int:
        return int(self.options["epoch"])


def plan(rows: Sequence[Row], *, rules: Sequence[str] | None, seeds: int | None, out: Path,
         epochs: int | None = None, overrides: dict | None = None) -> list[Run]:  # fmt: skip
    """Expand rows × rules × seeds 1..`seeds` (None: each row's own `seeds`) into runs.
    `rules` filters each row's own rules (a row the paper reports for dfa only gets no
    bp/fa runs); `epochs` replaces the rows' budget; `overrides` (e.g. datapath, type)
    apply to every run."""
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    runs = []
    for row in rows:
        missing = [r for r in row.rules if r not in RULES and (not rules or r in rules)]
        if missing:
            log.warning(f"{row.suite}/{row.name}: rule(s) {', '.join(missing)} are not in this feedalign "
                        f"(it has {', '.join(RULES)}); skipped")  # fmt: skip
        for rule in row.rules:
            if (rules and rule not in rules) or rule not in RULES:
                continue
            for seed in range(1, (seeds or row.seeds) + 1):
                options = {**row.options_for(rule), **(overrides or {}), "gradient": rule, "seed": seed}
                if epochs is not None:
                    options["epoch"] = epochs
                options.setdefault("epoch", 300)
                run_dir = out / "runs" / row.name / rule / f"seed{seed}"
                runs.append(Run(row.name, rule, seed, run_dir, options))
    return runs


def missing_networks(rows: Sequence[Row], models_folder: str | None = None) -> list[str]:
    """For every row whose network this feedalign cannot build: "row: network"."""
    from feedalign.models import find_network

    missing = []
    for row in rows:
        network = row.options.get("network", "mlp")
        try:
            find_network(network, models_folder or row.options.get("modelsFolder", "./Models/"))
        except ValueError:
            missing.append(f"{row.name}: {network}")
    return missing


def decide(run: Run) -> str:
    """ "skip", "extend", "resume" or "fresh" from what `run.dir` holds (module docstring)."""
    if (run.dir / "finished.json").exists():
        if not (run.dir / "checkpoint.pt").exists():
            return "skip"
        done = json.loads((run.dir / "finished.json").read_text())
        budget = _saved_budget(run.dir)
        # extend only a run that stopped because its budget ran out, not by its stopping rule
        if budget is not None and done.get("epochs", 0) >= budget and budget < run.epochs:
            return "extend"
        return "skip"
    if (run.dir / "checkpoint.pt").exists():
        return "resume"
    return "fresh"


def _saved_budget(run_dir: Path) -> int | None:
    path = run_dir / "options.json"
    if not path.exists():
        return None
    epoch = json.loads(path.read_text()).get("epoch")
    return None if epoch in (None, -1) else int(epoch)


def option_args(options: dict) -> list[str]:
    """Options as `feedalign train` arguments: `-name value`; True booleans as a bare
    `-name` flag, False ones as `-name false` (omitted where False is the default)."""
    fields = {f.name: f for f in dataclasses.fields(Options)}
    args: list[str] = []
    for name, value in options.items():
        if name not in fields:
            raise ValueError(f"unknown train option {name!r}; use Options field names")
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                args.append(f"-{name}")
            elif fields[name].default is not False:
                args += [f"-{name}", "false"]
            continue
        args += [f"-{name}", str(value)]
    return args


def command(run: Run, action: str, *, threads: int, trainer: Sequence[str] = TRAINER) -> list[str]:
    """The trainer's command line for `action` ("fresh", "resume" or "extend")."""
    common = ["-threads", str(threads), "--quiet"]
    if action == "fresh":
        options = {k: v for k, v in run.options.items() if k not in ("threads", "quiet")}
        return [*trainer, *option_args(options), "-save", str(run.dir), *common]
    if action in ("resume", "extend"):
        # a resumed run keeps its options.json; only these may be given again
        keep = {k: v for k, v in run.options.items() if k in RESUME_MAY_CHANGE - {"threads", "quiet"}}
        return [*trainer, "--resume", str(run.dir), *option_args(keep), *common]
    raise ValueError(f"no command for action {action!r}; expected fresh, resume or extend")


def default_jobs(n_runs: int) -> int:
    return max(1, min(usable_cores(), n_runs))


@dataclass
class _Child:
    run: Run
    action: str
    proc: subprocess.Popen
    log_file: object
    started: float


def execute(work: Sequence[tuple[Run, str]], *, jobs: int, threads: int, trainer: Sequence[str] = TRAINER,
            poll_s: float = 0.5, grace_s: float = GRACE_S) -> dict[str, int]:  # fmt: skip
    """Run every (run, action) with at most `jobs` at a time; returns {run label: exit code}.

    Ctrl-C (or SIGTERM): every child gets one SIGINT and `grace_s` to checkpoint, then
    KeyboardInterrupt propagates. A second Ctrl-C while waiting kills the children.
    """
    pending = deque(work)
    active: list[_Child] = []
    results: dict[str, int] = {}
    total = len(pending)
    previous_term = _raise_on_sigterm()
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run, action = pending.popleft()
                active.append(_start(run, action, threads, trainer))
                log.info(f"[{len(results)}/{total} done, {len(active)} running] start {run.label} ({action})")
            for child in [c for c in active if c.proc.poll() is not None]:
                active.remove(child)
                results[child.run.label] = _finish(child)
                log.info(f"[{len(results)}/{total} done, {len(active)} running] {_outcome(child)}")
            if active:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        log.warning(f"interrupted: asking {len(active)} run(s) to checkpoint (Ctrl-C again to kill them)")
        _stop(active, grace_s)
        for child in active:
            results[child.run.label] = _finish(child)
        raise
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return results


def _raise_on_sigterm():
    """SIGTERM (a scheduler stopping us) is handled like Ctrl-C; returns the old handler."""
    try:
        return signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        return None


def _start(run: Run, action: str, threads: int, trainer: Sequence[str]) -> _Child:
    run.dir.mkdir(parents=True, exist_ok=True)
    cmd = command(run, action, threads=threads, trainer=trainer)
    log_file = open(run.dir / "train.log", "a")  # noqa: SIM115 (closed in _finish)
    log_file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {action}: {' '.join(cmd)}\n")
    log_file.flush()
    # own session: the terminal's Ctrl-C reaches the runner only, which forwards one SIGINT
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    _write_runner_json(run.dir, {"action": action, "command": cmd, "pid": proc.pid, "returncode": None,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")})  # fmt: skip
    return _Child(run, action, proc, log_file, time.monotonic())


def _finish(child: _Child) -> int:
    rc = child.proc.wait()
    child.log_file.close()
    path = child.run.dir / RUNNER_JSON
    info = json.loads(path.read_text()) if path.exists() else {}
    info |= {"returncode": rc, "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "seconds": round(time.monotonic() - child.started, 1)}  # fmt: skip
    _write_runner_json(child.run.dir, info)
    return rc


def _outcome(child: _Child) -> str:
    rc = child.proc.returncode
    minutes = (time.monotonic() - child.started) / 60
    if rc == 0:
        return f"done {child.run.label} ({minutes:.1f} min)"
    tail = (child.run.dir / "train.log").read_text(errors="replace").strip().splitlines()[-5:]
    return f"FAILED {child.run.label} (exit {rc}, {minutes:.1f} min); end of train.log:\n  " + "\n  ".join(
        tail
    )


def _stop(active: list[_Child], grace_s: float) -> None:
    """One SIGINT each (the trainer checkpoints at the next batch), wait; kill on timeout
    or on a second Ctrl-C."""
    for child in active:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    try:
        for child in active:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(f"{child.run.label} did not stop within {grace_s:.0f} s; killing it")
                child.proc.kill()
    except KeyboardInterrupt:
        log.warning("second interrupt: killing the runs (each keeps its last epoch's checkpoint)")
        for child in active:
            if child.proc.poll() is None:
                child.proc.kill()


def _write_runner_json(run_dir: Path, info: dict) -> None:
    write_json(run_dir / RUNNER_JSON, info)
