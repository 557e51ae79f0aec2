"""`feedalign` command line: train | eval | download | reproduce.

Each subcommand lives beside the code it drives and registers itself here
through a `register(subparsers)` function that sets `func` on its parser. Only
the module of the subcommand being run is imported (start-up stays quick and
one subcommand's imports cannot break another's).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> module providing `register(subparsers)`
SUBCOMMANDS = {
    "train": "feedalign.train.cli",
    "eval": "feedalign.train.cli",
    "download": "feedalign.data.download",
    "reproduce": "feedalign.reproduce",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command`, or for all subcommands (help, unknown command)."""
    parser = argparse.ArgumentParser(
        prog="feedalign",
        description="Train networks with back-prop (bp), feedback alignment (fa) "
        "and direct feedback alignment (dfa).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    wanted = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else SUBCOMMANDS.values()
    for module_name in dict.fromkeys(wanted):
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
