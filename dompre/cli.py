"""The ``dompre`` console script (also ``python -m dompre``); the only module that prints.

Each subcommand is one ``_add_<name>(sub)`` function that registers its parser and sets ``func``.
Each ``_run_<name>`` imports the dompre modules its command needs (inside it, on purpose, as measured:
``time python -m dompre --help``, 4 runs each on 2 shared, loaded CPU cores: 4.0-7.3 s wall / 4.1-5.0 s CPU with
these imports in the commands, 6.4-12.3 s wall / 6.3-8.4 s CPU with all of them at the top; a bad flag costs the
same). Of the difference monai, through ``dompre.data.prep``, is ~2.4 s; captum, matplotlib, pandas and accelerate
the rest. What is left is ``import dompre`` itself: ``dompre/__init__`` registers MAKNet, which imports timm and
torch.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from dompre import __version__
from dompre.errors import REPORTED, UserError


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write the built-in synthetic CT cohort (real DICOM / DeepLesion layout)")
    p.add_argument("out_dir", help="cohort folder (dicom/, deeplesion/, truth/, cohort.json)")
    p.add_argument("--patients", type=int, default=10, help="number of phantom patients (default 10)")
    p.add_argument("--seed", type=int, default=0, help="the cohort is a pure function of the seed (default 0)")
    p.add_argument("--layout", choices=["both", "dicom", "deeplesion"], default="both",
                   help="both: labeled share as DeepLesion PNG + labels, the rest as DICOM (default)")
    p.add_argument("--labeled-fraction", type=float, default=0.25, help="labeled share for --layout both")
    p.add_argument("--quirk-rate", type=float, default=0.1,
                   help="per DICOM series: unsigned storage, shuffled InstanceNumber, scout in the folder")
    p.add_argument("--lesions", action=argparse.BooleanOptionalAction, default=True, help="paint lesions")
    p.add_argument("--matrix", type=int, default=256, help="image size in pixels (default 256; 512 works)")
    p.add_argument("--max-slices", type=int, default=240, help="keep each series within about this many slices")
    p.add_argument("--preview", action="store_true", help="also save OUT_DIR/preview.png (a montage per region)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that holds a finished cohort")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    import time

    from dompre.synth.cohort import generate_cohort

    t0 = time.perf_counter()
    meta = generate_cohort(args.out_dir, patients=args.patients, seed=args.seed, layout=args.layout,
                           labeled_fraction=args.labeled_fraction, quirk_rate=args.quirk_rate,
                           lesions=args.lesions, matrix=args.matrix, max_slices=args.max_slices,
                           preview=args.preview,
                           overwrite=args.overwrite)
    c = meta["counts"]
    print(f"dompre synth: {args.patients} patients -> {args.out_dir}: {c['dicom_series']} DICOM series, "
          f"{c['deeplesion_series']} DeepLesion series ({c['dl_lesions']} labeled lesions), {c['slices']} slices, "
          f"{c['lesions']} lesions, quirks {c['quirks']}"
          + (", preview.png" if args.preview else "") + f" in {time.perf_counter() - t0:.1f} s")
    return 0


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="integrated gradients / Grad-CAM / occlusion / perturbation figures for inputs")
    p.add_argument("model", help="checkpoint folder (checkpoint.json) or export folder (config.json)")
    p.add_argument("inputs", nargs="+", help="STORE_DIR:INDEX (or :3,7,9 or :10-19), SERIES_DIR@SLICE, or PNG/JPEG")
    p.add_argument("--method", choices=["ig", "gradcam", "occlusion", "perturb"], default="ig")
    p.add_argument("--out", required=True, help="output folder for the PNGs (and perturbation tables)")
    p.add_argument("--label", default=None, help="label to explain (default: each input's top label)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer name (default: the model's last feature stage)")
    p.add_argument("--view", choices=["gray", "rgb"], default="gray", help="middle slice in gray or 3 slices as RGB")
    p.add_argument("--activation", choices=["sigmoid", "softmax"], default=None,
                   help="confidences: sigmoid (multi-label) or softmax (default: from the model folder, else sigmoid)")
    p.add_argument("--steps", type=int, default=50, help="integrated-gradient steps")
    p.set_defaults(func=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    from dompre.explain import explain_items, load_model, parse_inputs, wrap_model

    lm = load_model(args.model, args.activation)
    items, skipped = parse_inputs(args.inputs, lm.label_names, lm.input_size, lm.prep)
    if not items:
        raise UserError(f"no input could be read ({len(skipped)} skipped: "
                         + "; ".join(f"{s}: {r}" for s, r in skipped[:3]) + ")")
    results, montage, failed = explain_items(wrap_model(lm.model, lm.activation, lm.mean, lm.std), items, lm.label_names,
                                             args.method, args.out, label=args.label, layer=args.layer,
                                             n_steps=args.steps, view=args.view)
    for r in results:
        delta = f"  (IG completeness error {100 * r.ig_delta:.2g}%)" if r.ig_delta is not None else ""
        print(f"{r.name}: explained '{r.target}' ({r.confidence:.3f}) -> {r.png}{delta}")
        if r.table is not None:
            print(f"  perturbation study -> {r.perturb_png}, {r.table_csv}")
            print("  " + r.table.to_string().replace("\n", "\n  "))
    if montage:
        print(f"montage -> {montage}")
    for name, reason in skipped + failed:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(f"explained {len(results)} input(s), skipped {len(skipped) + len(failed)}")
    return 0 if results else 1


def _add_job_options(d: argparse.ArgumentParser, recipe_help: str, example: str) -> None:
    """The options every ingest job takes: workers, recipe, overrides, progress bars."""
    d.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    d.add_argument("--recipe", default=None, help=recipe_help)
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"recipe override, e.g. {example} (repeatable)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    """`dompre ingest SOURCE ...`: a group; `dicom` here, `deeplesion` from `_add_ingest_deeplesion(group)`."""
    p = sub.add_parser("ingest", help="CT archives -> SliceStore of windowed 3-slice inputs (resumable)")
    group = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    d = group.add_parser("dicom", help="a DICOM tree (any folder layout) -> SliceStore; rerun to resume")
    d.add_argument("input_dir", metavar="INPUT_DIR", help="root folder of the DICOM files")
    d.add_argument("store_dir", metavar="STORE_DIR", help="output store (created, or continued)")
    _add_job_options(d, "ingest recipe YAML (prep: window, crop, size, stride, ...)", "prep.min_slices=30")
    d.set_defaults(func=_run_ingest_dicom)
    add_deeplesion = globals().get("_add_ingest_deeplesion")
    if add_deeplesion is not None:
        add_deeplesion(group)


def _run_ingest_dicom(args: argparse.Namespace) -> int:
    from dompre.data.ingest import ingest_dicom, load_ingest_recipe
    recipe = load_ingest_recipe(args.recipe, tuple(args.overrides))
    s = ingest_dicom(args.input_dir, args.store_dir, workers=args.workers, recipe=recipe,
                     progress=not args.no_progress)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["skip_reasons"].items())) or "none"
    print(f"ingest dicom: {s['series_ok']} series ok, {s['series_skipped']} skipped, {s['files_skipped']} "
          f"files skipped ({reasons}); {s['inputs']} inputs from {s['slices']} slices "
          f"({s['resumed_series']} series already done); report: {s['report']}")
    return 0


def _add_ingest_deeplesion(group: argparse._SubParsersAction) -> None:
    """`dompre ingest deeplesion`: registered by `_add_ingest` into its SOURCE group."""
    d = group.add_parser("deeplesion", help="DeepLesion PNGs + LesaNet labels -> labeled SliceStore; rerun to resume")
    d.add_argument("root", metavar="ROOT", help="DeepLesion folder holding DL_info.csv and Images_png/")
    d.add_argument("store_dir", metavar="STORE_DIR", help="output store (created, or continued)")
    d.add_argument("--labels", required=True, metavar="JSON", help="text_mined_labels_171_and_split.json")
    d.add_argument("--ontology", default=None, metavar="FILE", help="lesion_ontology_181022.xlsx (or csv copy)")
    d.add_argument("--classes", default=None, metavar="CLASS",
                   help="keep only this ontology class as labels, e.g. bodypart (default: the whole term list)")
    _add_job_options(d, "recipe YAML (prep:, neighbours, interval_mm, drop_noisy, ...)", "neighbours=interval")
    d.set_defaults(func=_run_ingest_deeplesion)


def _run_ingest_deeplesion(args: argparse.Namespace) -> int:
    from dompre.data.ingest_deeplesion import ingest_deeplesion, load_deeplesion_recipe
    recipe = load_deeplesion_recipe(args.recipe, tuple(args.overrides))
    s = ingest_deeplesion(args.root, args.store_dir, labels=args.labels, ontology=args.ontology,
                          classes=args.classes, workers=args.workers, recipe=recipe, progress=not args.no_progress)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["skip_reasons"].items())) or "none"
    print(f"ingest deeplesion: {s['lesions_ok']} lesions ok, {s['lesions_skipped']} skipped ({reasons}); "
          f"{s['inputs']} inputs over {s['labels']} labels ({s['resumed_lesions']} lesions already done); "
          f"report: {s['report']}")
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune / linear-probe a model on a downstream recipe (Kvasir, "
                                        "ChestX-ray14, pneumonia, LesaNet)")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML, e.g. recipes/kvasir.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. model.init=domain")
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from dompre.train.finetune import load_finetune_recipe, run_finetune
    recipe = load_finetune_recipe(args.recipe, list(args.overrides))
    res = run_finetune(recipe)
    keys = ("auc", "f1", "precision", "recall") if res["task"] == "multilabel" else \
        ("mcc", "accuracy", "f1", "precision", "recall", "specificity", "auc")
    n = res["n"]
    print(f"finetune {res['dataset']} ({res['init']['init']} init, {res['strategy']}, freeze "
          f"{res['freeze_percent']:g}%): train/val/test {n['train']}/{n['val']}/{n['test']}, skipped {res['skipped']}")
    print("test " + ", ".join(f"{k} {res['test'][k]:.4f}" for k in keys) + f", {res['fps']:.1f} frames/s")
    print(f"outputs: {recipe.out_dir}")
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="transfer study: grid of init x freeze x seeds, mean ± std, significance")
    p.add_argument("recipe", metavar="RECIPE", help="fine-tuning recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--init", default="random,domain",
                   help="comma-separated inits (random, domain, file, imagenet, meanvar); the first is the baseline "
                        "of the convergence speed-up")
    p.add_argument("--freeze", default="0", help="comma-separated percents of frozen layers, e.g. 0,50,100")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per cell (default 3)")
    p.add_argument("--strategy", default=None, help="comma-separated: finetune, features (default: recipe's)")
    p.add_argument("--weights", default=None, help="export folder / weights file for non-random inits")
    p.add_argument("--metric", default=None, help="compared metric, e.g. auc_micro, best_epoch (default auc "
                                                  "multi-label, mcc single-label)")
    p.add_argument("--out", default=None, help="study folder (default RECIPE out_dir/study)")
    p.add_argument("--tsne", action="store_true", help="also plot a t-SNE of test features per freeze level (tsne.png)")
    p.set_defaults(func=_run_study)


def _run_study(args: argparse.Namespace) -> int:
    from dompre.train.study import run_study
    try:
        freezes = tuple(float(f) for f in args.freeze.split(","))
    except ValueError:
        raise UserError(f"--freeze {args.freeze!r}: give comma-separated numbers, e.g. 0,50,100") from None
    res = run_study(args.recipe, inits=tuple(args.init.split(",")), freezes=freezes, seeds=args.seeds,
                    strategies=tuple(args.strategy.split(",")) if args.strategy else None, metric=args.metric,
                    weights=args.weights, out_dir=args.out, overrides=tuple(args.overrides), tsne=args.tsne)
    print(res["markdown"], end="")
    print(f"outputs: {res['out_dir']}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint as a timm folder (config.json, model.safetensors, README.md)")
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors + checkpoint.json)")
    p.add_argument("out_dir", help="export folder (new, empty, or an earlier dompre export, which is replaced)")
    p.add_argument("--card-note", default=None, help="a note added to the README.md model card")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR even when it is not a dompre export (deletes everything in it)")
    p.add_argument("--hub-layout", default=None, metavar="OWNER/NAME",
                   help="write exactly the files timm.models.push_to_hf_hub uploads (safetensors, config, card "
                        "naming hf-hub:OWNER/NAME); upload the folder with huggingface_hub")
    p.add_argument("--explain", nargs="+", default=None, metavar="INPUT",
                   help="example inputs (STORE_DIR:3,7,9, SERIES_DIR@SLICE, PNG) whose integrated-gradient "
                        "montage goes into the model card")
    p.set_defaults(func=_run_export)


def _export_montage(args: argparse.Namespace) -> bytes | None:
    """PNG bytes of the integrated-gradient montage of ``--explain`` inputs for the model card, or None."""
    from dompre.checkpoint import load_checkpoint, read_checkpoint_meta
    from dompre.explain import explain_montage, parse_inputs, prep_config

    if args.hub_layout:  # before reading any input: the montage would be thrown away
        print("export: --explain is left out of --hub-layout (push_to_hf_hub uploads no montage)", file=sys.stderr)
        return None
    meta = read_checkpoint_meta(args.checkpoint)
    info = meta.get("info", {})
    size = tuple(info.get("input_size") or (3, *[(info.get("preparation") or {}).get("size") or 256] * 2))[-2:]
    items, skipped = parse_inputs(args.explain, meta.get("label_names") or [], size,
                                  prep_config(info.get("preparation")))
    for spec, reason in skipped:
        print(f"export: skipped explanation input {spec}: {reason}", file=sys.stderr)
    if not items:
        return None
    model, info = load_checkpoint(args.checkpoint)
    label_names = info.get("label_names") or [f"class {i}" for i in range(model.num_classes)]
    with tempfile.TemporaryDirectory() as tmp:
        png = explain_montage(model, np.stack([it.image for it in items]), label_names,
                              Path(tmp) / "explanations.png", method="ig")
        return png.read_bytes()


def _run_export(args: argparse.Namespace) -> int:
    from dompre.export import check_export_target, export_timm

    check_export_target(args.out_dir, overwrite=args.overwrite, hub_repo=args.hub_layout)  # before the montage
    montage = _export_montage(args) if args.explain else None
    r = export_timm(args.checkpoint, args.out_dir, card={"note": args.card_note} if args.card_note else None,
                    montage=montage, overwrite=args.overwrite, hub_repo=args.hub_layout)
    print(f"exported {r['arch']} ({r['params']:,} parameters, {r['num_classes']} outputs) -> {r['out_dir']}")
    print(f"checked: timm.create_model('local-dir:{r['out_dir']}', pretrained=True) gives the same outputs "
          f"(max |diff| {r['max_abs_diff']:.2g})")
    if args.hub_layout:
        print(f"hub layout: upload {r['out_dir']} to {args.hub_layout}; load with "
              f"timm.create_model('hf-hub:{args.hub_layout}', pretrained=True)")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="Noisy Student pretraining (teacher -> pseudo-labels -> students); resumable")
    p.add_argument("recipe", metavar="RECIPE", help="YAML recipe, e.g. recipes/tcia.yaml or recipes/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. output_dir=runs/x")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from dompre.noisy_student import run_recipe
    logging.basicConfig(level=logging.WARNING)
    result = run_recipe(args.recipe, args.overrides)
    for r in result["results"]:
        m = r["metrics"]
        cells = " ".join(f"{s} auc {m[s]['auc']:.4f} f1 {m[s]['f1']:.4f}" for s in ("test", "hand")
                         if m.get(s) and m[s].get("auc") is not None)
        print(f"iteration {r['iteration']} ({r['model']}): {cells or 'no test metrics'}")
    print(f"pretrain: outputs in {result['output_dir']}; table {result['report'].get('md', '')}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    for name, default_out, seeds, text in (
            ("demo", "dompre-demo", 1, "the main job end to end on the synthetic cohort, with the benchmark arms "
                                       "(teacher, students, oracle, plain self-training) scored on held-out truth"),
            ("benchmark", "dompre-benchmark", 3, "the demo over several training seeds: the same report with "
                                                 "intervals over seeds (about 30 minutes on 2 CPU cores)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--out", default=default_out, help=f"output folder (default {default_out}); rerun to resume")
        p.add_argument("--patients", type=int, default=48, help="training cohort patients (default 48)")
        p.add_argument("--heldout-patients", type=int, default=20, help="held-out patients scored against truth "
                                                                        "(default 20)")
        p.add_argument("--seed", type=int, default=0, help="cohort seed and first training seed (default 0)")
        p.add_argument("--seeds", type=int, default=seeds, help=f"training seeds seed, seed+1, ... (default {seeds})")
        p.add_argument("--recipe", default=None, help="pretraining recipe (default recipes/demo.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="pretraining recipe override (repeatable)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from dompre.demo import run_demo
    logging.basicConfig(level=logging.WARNING)
    if args.seeds < 1 or args.patients < 2 or args.heldout_patients < 2:
        raise UserError("--seeds must be >= 1, --patients and --heldout-patients >= 2")
    s = run_demo(args.out, patients=args.patients, seed=args.seed, heldout_patients=args.heldout_patients,
                 seeds=tuple(range(args.seed, args.seed + args.seeds)), recipe=args.recipe,
                 overrides=args.overrides, progress=not args.no_progress)
    b = s["benchmark"]
    for seed in b["seeds"]:
        row = b["per_seed"][str(seed)]
        cells = "; ".join(f"{n} {a['auc']:.4f} [{a['auc_ci'][0]:.4f}, {a['auc_ci'][1]:.4f}]"
                          for n, a in row["arms"].items())
        print(f"seed {seed} held-out test mean AUC: {cells}")
    print(f"{args.command}: {s['verdict']}")
    d = s["downstream"]
    cells = "; ".join(f"{r['init']} init {r['mean']:.4f} ± {r['std']:.4f}" for r in d["summary"])
    print(f"{args.command}: downstream lesion type ({d['metric']}, {len(d['summary'])} inits x "
          f"{d['summary'][0]['n']} seeds): {cells}")
    print(f"{args.command}: report {s['report']}; backbone {s['backbone']}; wall time {s['times_s']['total']} s")
    return 0


COMMANDS = [_add_synth, _add_explain, _add_ingest, _add_finetune, _add_study, _add_export, _add_pretrain, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dompre", description="Semi-supervised domain pretraining for medical imaging (Noisy Student on CT).")
    parser.add_argument("--version", action="version", version=f"dompre {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; user errors (:data:`dompre.errors.REPORTED`) print one line and
    exit 2, any other exception propagates with its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except REPORTED as e:  # anything else is a bug and keeps its traceback
        print(f"dompre {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dompre {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
