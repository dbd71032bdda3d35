"""The ``dompre`` console script (also ``python -m dompre``); the only module that prints.

Each subcommand is one ``_add_<name>(sub)`` function that registers its parser and sets ``func``;
heavy imports happen inside the command so ``dompre --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys

from dompre import __version__
from dompre.recipes import RecipeError


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write the built-in synthetic CT cohort (real DICOM / DeepLesion layout)")
    p.set_defaults(func=_not_yet("synth"))


def _not_yet(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"dompre {name}: not implemented in this version", file=sys.stderr)
        return 2
    return run


COMMANDS = [_add_synth]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dompre", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dompre {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (RecipeError, ValueError, FileNotFoundError, KeyError, PermissionError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"dompre {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dompre {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
