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


def _add_ingest_deeplesion(group: argparse._SubParsersAction) -> None:
    """`dompre ingest deeplesion`: registered by `_add_ingest` into its SOURCE group."""
    d = group.add_parser("deeplesion", help="DeepLesion PNGs + LesaNet labels -> labeled SliceStore; rerun to resume")
    d.add_argument("root", metavar="ROOT", help="DeepLesion folder holding DL_info.csv and Images_png/")
    d.add_argument("store_dir", metavar="STORE_DIR", help="output store (created, or continued)")
    d.add_argument("--labels", required=True, metavar="JSON", help="text_mined_labels_171_and_split.json")
    d.add_argument("--ontology", default=None, metavar="FILE", help="lesion_ontology_181022.xlsx (or csv copy)")
    d.add_argument("--classes", default=None, metavar="CLASS",
                   help="keep only this ontology class as labels, e.g. bodypart (default: the whole term list)")
    d.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    d.add_argument("--recipe", default=None, help="recipe YAML (prep:, neighbours, interval_mm, drop_noisy, ...)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. neighbours=interval (repeatable)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_run_ingest_deeplesion)


def _run_ingest_deeplesion(args: argparse.Namespace) -> int:
    from dompre.data.ingest_deeplesion import ingest_deeplesion, load_deeplesion_recipe
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be >= 1")
    recipe = load_deeplesion_recipe(args.recipe, tuple(args.overrides))
    s = ingest_deeplesion(args.root, args.store_dir, labels=args.labels, ontology=args.ontology,
                          classes=args.classes, workers=args.workers, recipe=recipe, progress=not args.no_progress)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["skip_reasons"].items())) or "none"
    print(f"ingest deeplesion: {s['lesions_ok']} lesions ok, {s['lesions_skipped']} skipped ({reasons}); "
          f"{s['inputs']} inputs over {s['labels']} labels ({s['resumed_lesions']} lesions already done); "
          f"report: {s['report']}")
    return 0


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
