"""`feedalign` command line: train | eval | download | reproduce.

Each subcommand lives beside the code it drives and registers itself here
through a `register(subparsers)` function that sets `func` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> module providing `register(subparsers)`; imported lazily so that
# `feedalign download` does not pay for the trainer's imports.
SUBCOMMANDS = {
    "train": "feedalign.train.cli",
    "eval": "feedalign.train.cli",
    "download": "feedalign.data.download",
    "reproduce": "feedalign.reproduce",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feedalign",
        description="Train networks with back-prop (bp), feedback alignment (fa) "
        "and direct feedback alignment (dfa).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    registered: set[str] = set()
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        if module_name in registered:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # subcommand not built yet
        module.register(sub)
        registered.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
