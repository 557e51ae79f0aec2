"""`feedalign train` and `feedalign eval`.

Every option of the original under its own spelling (`-LR`, `-batchSize`,
`-epoch_step`, also with two dashes) and a lowercase form (`--lr`,
`--batch-size`, `--epoch-step`). Help texts come from `Options`, so they cannot
drift from the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

from feedalign.train.config import RESUME_MAY_CHANGE, OptionError, Options

log = logging.getLogger("feedalign")
TRUST_HELP = ("import the Python model file (network + modelsFolder) that the run directory's "
              "options.json names; without it such a run is refused (docs/faults.md)")  # fmt: skip


def kebab(name: str) -> str:
    """LR -> lr, batchSize -> batch-size, epoch_step -> epoch-step, nGPU -> n-gpu."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|_", "-", name)
    return re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "-", s).lower()


# The help's groups, as docs/original.md §9's option table reads: title -> the Options fields
# shown under it, in that order. A field missing here is shown under "other" (a test
# keeps that group empty).
GROUPS: dict[str, tuple[str, ...]] = {
    "model (docs/original.md §2)": (
        "network", "modelsFolder", "num_layers", "num_hidden", "nonlin", "dropout", "dropout_rate",
        "batchnorm", "bias", "init", "heads", "context"),
    "learning rule (docs/rules.md)": ("gradient", "rfb_mag", "feedback_init", "taps", "error_at"),
    "optimisation (docs/original.md §4)": (
        "criterion", "optimization", "LR", "batchSize", "epoch", "iterations", "momentum", "weightDecay",
        "LRDecay", "beta1", "beta2", "epoch_step", "lr_milestones", "lr_gamma", "warmup", "lr_schedule",
        "min_lr", "clip", "maxInNorm", "maxOutNorm", "eps", "accGradient"),
    "data (docs/original.md §5, docs/data.md)": (
        "dataset", "datapath", "normalization", "format", "whiten", "augment", "jitter", "hflip", "resize",
        "validate", "svhn_extra", "preProcDir", "eval_windows"),
    "run: where it is written, what it records (docs/design.md)": (
        "save", "seed", "load", "eval_every", "visualize", "quiet", "tensorboard", "alignment"),
    "platform (docs/original.md §6)": ("threads", "type", "devid", "nGPU", "amp", "compile_optimizer",
                                       "memory_format"),
}  # fmt: skip
OTHER = "other"


def grouped_fields() -> dict[str, list[dataclasses.Field]]:
    """GROUPS' titles -> their Options fields; fields GROUPS does not name under OTHER."""
    fields = {f.name: f for f in dataclasses.fields(Options)}
    out = {title: [fields[n] for n in names if n in fields] for title, names in GROUPS.items()}
    named = {n for names in GROUPS.values() for n in names}
    out[OTHER] = [f for name, f in fields.items() if name not in named]
    return out


def add_option_arguments(parser: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """One argument per Options field, in GROUPS' groups; unset ones stay absent (SUPPRESS)
    so that we know what the user gave. `hidden`: accepted but left out of the help."""
    for title, fields in grouped_fields().items():
        if fields:
            _add_group(parser if hidden else parser.add_argument_group(title), fields, hidden)


def _add_group(group, fields: list[dataclasses.Field], hidden: bool) -> None:
    for f in fields:
        names = [f"-{f.name}", f"--{f.name}"]
        if kebab(f.name) != f.name:
            names.append(f"--{kebab(f.name)}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f.metadata.get("shown") or (default if default != "" else "none")
        helptext = f"{f.metadata['help']} (default: {shown})"
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS,
                    "help": argparse.SUPPRESS if hidden else helptext}  # fmt: skip
        if f.type in ("bool", bool):
            kw |= {"nargs": "?", "const": True, "type": _bool, "metavar": "BOOL"}
        elif f.type in ("int", int):
            kw |= {"type": int}
        elif f.type in ("float", float):
            kw |= {"type": float}
        elif f.name == "seed":
            kw |= {"type": int}
        group.add_argument(*names, **kw)


def _bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0), got {s!r}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a network by one rule (the original's Main.lua)",
                       allow_abbrev=False, description=train_description(),
                       usage="feedalign train [-h] [-OPTION VALUE ...] [--resume DIR [--trust-model-file]]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_option_arguments(p)
    resume = p.add_argument_group("resume")
    resume.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    resume.add_argument("--trust-model-file", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=run_train)
    e = sub.add_parser("eval", help="test (or training) error and loss of a saved run", allow_abbrev=False)
    e.add_argument("run_dir", help="a run directory holding options.json and checkpoint.pt")
    e.add_argument("--split", choices=("test", "train"), default="test", help="which split (default test)")
    e.add_argument("--datapath", help="dataset folder, if it moved since training")
    e.add_argument("--trust-model-file", action="store_true", help=TRUST_HELP)
    e.set_defaults(func=run_eval)


def train_description() -> str:
    """`feedalign train --help`'s opening: every rule of the table, by kind."""
    import textwrap

    from feedalign.rules import RULES

    kinds = {"bp": "the reference", "per-layer": "the error goes down through a B per layer",
             "direct": "taps after the hidden blocks receive a projected signal",
             "local": "each hidden block learns from a loss of its own"}  # fmt: skip
    lines = ["Train a network with one learning rule (-gradient, default dfa):"]
    for kind, what in kinds.items():
        names = [name for name, rule in RULES.items() if rule.kind == kind]
        if names:
            lines.append(textwrap.fill(f"{', '.join(names)}: {what}", 88, initial_indent="  ",
                                       subsequent_indent="    "))  # fmt: skip
    lines += ["(docs/rules.md: each rule's equation and when to use it). Every option of the original",
              "is accepted under its own name, with one or two dashes, and in lowercase (--lr,",
              "--batch-size). Example:",
              "  feedalign train -dataset MNIST -network mlp -gradient fa -LR 1e-4"]  # fmt: skip
    return "\n".join(lines)


def options_from_args(args: argparse.Namespace) -> Options:
    """The options given, or with --resume the run's options.json with the given ones on top
    (only RESUME_MAY_CHANGE may be given)."""
    from feedalign.train.rundir import options_from_run

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if hasattr(args, f.name)}
    if not args.resume:
        return Options(**given)
    if not (Path(args.resume) / "checkpoint.pt").exists() and (Path(args.resume) / "options.json").exists():
        raise OptionError(f"--resume {args.resume}: no checkpoint.pt yet; start the run again instead")
    refused = sorted(set(given) - RESUME_MAY_CHANGE)
    if refused:
        raise OptionError(f"--resume keeps the run's options; only {', '.join(sorted(RESUME_MAY_CHANGE))} "
                          f"may change, not {', '.join(refused)}")  # fmt: skip
    return options_from_run(Path(args.resume), given)


def run_train(args: argparse.Namespace) -> int:
    """`feedalign train`; errors propagate to feedalign.cli.main, which maps them to exit codes."""
    from feedalign import dist
    from feedalign.train.session import Interrupted, preflight, train

    opts = options_from_args(args)
    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if opts.nGPU > 1 and not launched:  # the original's -nGPU N: N processes, one GPU each
        from feedalign.launch import launch

        preflight(opts, resume=args.resume, trust_model_file=args.trust_model_file)
        # the command line is passed on whole: -nGPU stays in options.json, so a plain
        # `feedalign train --resume DIR` of such a run launches N processes again
        return launch(opts.nGPU, getattr(args, "argv", sys.argv[1:]))
    agreed = False  # whether every rank ends here the same way (dist.teardown)
    try:
        train(opts, resume=args.resume, trust_model_file=args.trust_model_file)
        agreed = True
    except Interrupted:  # the ranks stop together, at a sync point
        agreed = True
        raise
    finally:
        dist.teardown(agreed=agreed)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from feedalign.train.session import evaluate_run

    error, loss = evaluate_run(args.run_dir, split=args.split, datapath=args.datapath,
                               trust_model_file=args.trust_model_file)  # fmt: skip
    print(f"{args.run_dir}: {args.split} error {100 * error:.2f}%  loss {loss:.4g}")
    return 0
