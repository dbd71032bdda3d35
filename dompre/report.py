"""The demo / benchmark report (``report/README.md``): setup, arms x seeds against truth, choices, downstream."""
from __future__ import annotations

ARM_TEXT = {
    "teacher": "supervised on the labeled share only (iteration 0)",
    "oracle": "the student recipe with the truth labels of the unlabeled inputs (the ceiling)",
    "plain": "student 1 without input noise, dropout and drop path (plain self-training)",
}


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(pair) -> str:
    return "n/a" if not pair else f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def arms_table(bench: dict) -> str:
    """Markdown: one row per seed and arm (validation AUC, test AUC with interval, taught-label AUC, F1)."""
    lines = ["| seed | arm | val AUC | test AUC (95% CI) | test AUC, taught labels (95% CI) | test F1 (95% CI) |",
             "|---|---|---|---|---|---|"]
    for seed in bench["seeds"]:
        row = bench["per_seed"][str(seed)]  # the summary as written to JSON: seeds are string keys
        for name, a in row["arms"].items():
            mark = " (chosen)" if name == row["chosen"] else ""
            lines.append(f"| {seed} | {name}{mark} | {_f(a['val_auc'])} | {_f(a['auc'])} {_ci(a['auc_ci'])} | "
                         f"{_f(a['auc_taught'])} {_ci(a['auc_taught_ci'])} | {_f(a['f1'])} {_ci(a['f1_ci'])} |")
    return "\n".join(lines)


def gap_table(bench: dict) -> str:
    """Markdown: per seed, student - teacher (paired patient interval), plain - teacher and gap closed."""
    lines = ["| seed | chosen student | student - teacher (95% CI) | plain - teacher (95% CI) | gap closed | "
             "gap closed, taught labels |", "|---|---|---|---|---|---|"]
    for seed in bench["seeds"]:
        r = bench["per_seed"][str(seed)]
        d, p = r.get("student_minus_teacher_all"), r.get("plain_minus_teacher_all")
        if not d:
            continue
        lines.append(f"| {seed} | {r['chosen']} | {d['value']:+.4f} {_ci(d['ci'])} | "
                     f"{(p or {}).get('value', float('nan')):+.4f} {_ci((p or {}).get('ci'))} | "
                     f"{_pct(r.get('gap_closed_all'))} | {_pct(r.get('gap_closed_taught'))} |")
    g, d = bench.get("gap_closed_all"), bench.get("student_minus_teacher_all")
    if g and d:
        lines.append(f"| mean | | {d['mean']:+.4f} {_ci(d['ci'])} | | {_pct(g['mean'])} "
                     f"{'(t-interval ' + _pct(g['ci'][0]) + ' to ' + _pct(g['ci'][1]) + ')' if g.get('ci') else ''} | "
                     f"{_pct((bench.get('gap_closed_taught') or {}).get('mean'))} |")
    return "\n".join(lines)


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.0%}"


def pseudo_table(bench: dict) -> str:
    """Markdown: quality of every iteration's kept pseudo-labels against the unlabeled inputs' truth."""
    lines = ["| seed | pseudo-labels from | precision | recall | labels per input (truth) | inputs kept |",
             "|---|---|---|---|---|---|"]
    for seed in bench["seeds"]:
        r = bench["per_seed"][str(seed)]
        for p in r["pseudo"]:
            lines.append(f"| {seed} | {p['from']} | {p['precision']:.3f} | {p['recall']:.3f} | "
                         f"{p['labels_per_input']:.1f} ({p['truth_per_input']:.1f}) | {p['inputs_kept']} of {p['inputs']} |")
    return "\n".join(lines)


def sources_table(sources: dict) -> str:
    """Markdown: body fraction, mean grey and body box per source store."""
    lines = ["| source | inputs | body fraction (10th pct) | mean grey | body box h x w (source px) |",
             "|---|---|---|---|---|"]
    for name, r in sources.items():
        box = f"{r['box_h']:.0f} x {r['box_w']:.0f}" if "box_h" in r else "not recorded"
        lines.append(f"| {name} | {r['inputs']} | {r['body_fraction']:.3f} ({r['body_fraction_p10']:.3f}) | "
                     f"{r['mean_grey']:.1f} | {box} |")
    return "\n".join(lines)


def demo_markdown(s: dict, lesanet_table: str, rec) -> str:
    """The whole report from the demo's result dict, the LesaNet-protocol table and the recipe."""
    times = ", ".join(f"{k} {v} s" for k, v in s["times_s"].items())
    b = s["benchmark"]
    lab = s["labeled_train_inputs"]
    share = lab / (lab + s["unlabeled_inputs"])
    h = s["heldout"]
    return f"""# dompre demo report

Noisy Student domain pretraining on the built-in synthetic CT cohort, scored against the cohort's truth on
held-out patients. Synthetic data only: nothing here says anything about real CT.

## Result

{s['verdict'][0].upper() + s['verdict'][1:]}

![held-out test AUC of every arm](arms.png)

{arms_table(b)}

{gap_table(b)}

- Arms (same model {rec.model.name}, schedule and seed): `teacher` {ARM_TEXT['teacher']}; `student-k` the
  Noisy Student iterations (teacher k-1 pseudo-labels the unlabeled inputs, a noised student trains on labeled +
  pseudo-labeled batches); `oracle` {ARM_TEXT['oracle']}; `plain` {ARM_TEXT['plain']}.
- Gap closed = (student - teacher) / (oracle - teacher) on test mean AUC, for the student chosen by
  **validation** AUC. Intervals: 2.5-97.5 percentiles of {_reps(b)} bootstrap replicates that resample test
  patients (the same draws for every arm, so differences are paired); over seeds, a t-interval of the mean.
- "Taught labels": the {len(s['taught'])} of {len(s['label_names'])} labels with at least 3 positives among the
  labeled training inputs; "all labels": every label with a positive and a negative among the test inputs.

## Setup

- Training cohort: {lab} labeled training inputs (lesion key slices of the DeepLesion-layout share, {share:.1%} of
  all training inputs; per split {s['labeled']}) and {s['unlabeled_inputs']} unlabeled DICOM inputs.
- Held-out patients (a separate cohort, in neither share, written as DICOM and ingested like the unlabeled
  inputs, labels from the cohort's per-slice truth): validation {h['val']['inputs']} inputs of
  {h['val']['patients']} patients (per-label thresholds, the choice of student), test {h['test']['inputs']} inputs
  of {h['test']['patients']} patients (the figures).
- Every input, labeled or not, is prepared by one function (`dompre.data.prep.prepare_stack`: body box of its three
  slices, HU window, resize to {rec.model.img_size} px).
- Teacher {rec.teacher.epochs} epochs at lr {rec.optim_for('teacher').lr} (batch {rec.teacher.batch_size}); students
  {rec.student.labeled_epochs} labeled epochs at lr {rec.optim_for('student').lr} with {rec.student.labeled_batch} labeled +
  {rec.student.pseudo_batch} pseudo-labeled inputs a step, init `{rec.student.init}`; pseudo-labels top-{rec.pseudo.top_k}
  above {rec.pseudo.threshold}{' and the validation threshold' if rec.pseudo.val_thresholds else ''}, labels not
  kept: `{rec.pseudo.unkept}`. How these were chosen: `recipes/demo.yaml` (every choice was made on the held-out
  validation patients, never on the test patients).
- Seeds: {', '.join(map(str, s['seeds']))} (training seeds; one cohort). Wall time: {times}.

Inputs per source, one preparation for all (a sample of up to 400 inputs each; body = grey > 40):

{sources_table(s.get('sources') or {})}

## Pseudo-labels against truth

{pseudo_table(b)}

## LesaNet protocol on the labeled share (seed {s['seeds'][0]})

The labeled share's own val/test/hand-labeled splits (LesaNet protocol: thresholds on val, mean over labels).
These sets hold few inputs, so their figures move a lot between runs; the held-out figures above are the result.

{lesanet_table}
![metrics per iteration](metrics.png)

## Downstream: lesion type from random vs domain initialisation

The exported {s['downstream']['arch']} is fine-tuned to predict lesion type (`Coarse_lesion_type`) on a separate
DeepLesion-layout cohort of held-out synthetic patients (inputs per split {s['downstream']['n']}), from random weights
and from the pretrained backbone, three seeds each; the metric is {s['downstream']['metric']}. Runs in
`{s['downstream']['out_dir']}`.

{s['downstream']['markdown'].replace('## ', '### ', 1)}

## Exported backbone

`backbone/` ({s['chosen']} of seed {s['seeds'][0]}) loads with
`import dompre, timm; timm.create_model('local-dir:{s['backbone']}')`; its model card quotes the held-out figures.
"""


def _reps(b: dict) -> str:
    first = next(iter(b["per_seed"].values()))
    return str(next(iter(first["arms"].values()))["replicates"])
