"""The DeepLesion ingest job: labeled lesions -> a labeled SliceStore, parallel and resumable.

``dompre ingest deeplesion ROOT STORE_DIR --labels JSON --ontology FILE [--classes bodypart]``.
Every lesion of the LesaNet label file is one work unit of the store (key ``lesion-<idx>``), holding one
input: the key slice with its neighbours, prepared like the DICOM inputs, labeled over the term list (or one
ontology class of it) with 1 relevant / NaN uncertain / 0 otherwise. A rerun skips committed lesions. Bad
lesions (missing or unreadable PNG, a row missing from ``DL_info.csv``) are skipped with their reason, as are
lesions flagged ``Possibly_noisy`` and, by default, lesions with no relevant label among the label columns
(both dropped by LesaNet too); ``STORE_DIR/report.json`` lists every lesion with its status.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from dompre.data.deeplesion import (LesionInputConfig, build_lesion_input, load_lesanet_labels, load_ontology,
                                    read_dl_info)
from dompre.data.ingest import check_workers, worker_pool
from dompre.data.prep import PrepConfig
from dompre.data.store import StoreWriter, write_report
from dompre.errors import UserError
from dompre.recipes import load_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeepLesionIngestRecipe:
    """``dompre ingest deeplesion --recipe R``: how lesions become inputs and which lesions are kept."""
    prep: PrepConfig = field(default_factory=PrepConfig)  # window [-1024, 3071], body crop, 256x256
    neighbours: Literal["consecutive", "interval"] = "consecutive"  # key -/+ 1 slice, or -/+ interval_mm
    interval_mm: float = 2.0          # LesaNet: neighbours 2 mm away, linearly interpolated
    drop_noisy: bool = True           # skip lesions with Possibly_noisy > 0 in DL_info.csv
    drop_unlabeled: bool = True       # skip lesions with no relevant label among the label columns
    shard_size: int = 1024            # inputs per shard file

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise UserError(f"shard_size = {self.shard_size!r} must be >= 1")
        if not self.interval_mm > 0:
            raise UserError(f"interval_mm = {self.interval_mm!r} must be > 0 mm")

    @property
    def lesion(self) -> LesionInputConfig:
        """The per-lesion part of the recipe."""
        return LesionInputConfig(self.neighbours, self.interval_mm, self.prep)


def load_deeplesion_recipe(path: str | Path | None = None, overrides: tuple[str, ...] = ()
                           ) -> DeepLesionIngestRecipe:
    """Read a DeepLesion ingest recipe (YAML); None gives the defaults."""
    return load_recipe(path, DeepLesionIngestRecipe, overrides)


def process_lesion(task: dict) -> dict[str, Any]:
    """Build one lesion's input (runs in a worker); returns status ok with the input, or skipped + reason."""
    res = {"lesion_idx": task["lesion_idx"], "split": task["split"], "file": task["file"],
           "status": "skipped", "reason": ""}
    try:
        item = build_lesion_input(task["root"], task["info"], task["lesion_idx"], cfg=task["cfg"],
                                  split=task["split"], labels=task["labels"])
    except FileNotFoundError as e:
        res["reason"] = f"missing PNG: {e}"
        return res
    except Exception as e:  # noqa: BLE001 - one bad lesion must never stop the batch
        log.warning("lesion %s failed: %r", task["lesion_idx"], e)
        res["reason"] = f"unreadable: {type(e).__name__}: {e}"
        return res
    res.update(status="ok", image=item.image, meta=item.meta, labels=item.labels)
    return res


def _label_columns(labels, ontology_path: str | Path | None, classes: str | None) -> list[str]:
    """The store's label columns: the term list, or its terms of one ontology class (checked against it)."""
    if ontology_path is None:
        if classes is not None:
            raise UserError(f"--classes {classes}: needs --ontology to know each term's class")
        return list(labels.term_list)
    onto = load_ontology(ontology_path)
    missing = [t for t in labels.term_list if t not in onto.term_class]
    if missing:
        raise UserError(f"{ontology_path}: term(s) {missing[:5]} of {labels.path} are not in the ontology; "
                         "pass the ontology that matches the label file")
    if classes is None:
        return list(labels.term_list)
    names = onto.select(classes, within=labels.term_list)
    if not names:
        raise UserError(f"--classes {classes}: no term of {labels.path} has that class")
    return names


def _tasks(root: Path, info, labels, names: list[str], recipe: DeepLesionIngestRecipe, done) -> tuple[list, list]:
    """Per lesion of the label file: a task to run, or a ready 'skipped' result."""
    tasks, skipped = [], []
    noisy = info["Possibly_noisy"].to_numpy() > 0
    for split, idxs in labels.lesion_idxs.items():
        mat = labels.matrix(split, names)
        for j, idx in enumerate(idxs):
            if done(f"lesion-{idx}"):
                continue
            base = {"lesion_idx": idx, "split": split, "status": "skipped", "file": ""}
            if not 0 <= idx < len(info):
                skipped.append({**base, "reason": f"not a row of DL_info.csv ({len(info)} rows)"})
                continue
            base["file"] = f"Images_png/{info['folder'].iat[idx]}/{info['slice_file'].iat[idx]}"
            if recipe.drop_noisy and noisy[idx]:
                skipped.append({**base, "reason": "possibly noisy (Possibly_noisy > 0)"})
            elif recipe.drop_unlabeled and not np.nansum(mat[j]) > 0:
                skipped.append({**base, "reason": "no relevant label among the label columns"})
            else:
                tasks.append({"root": str(root), "info": info.iloc[[idx]], "lesion_idx": idx, "split": split,
                              "file": base["file"], "cfg": recipe.lesion, "labels": mat[j]})
    return tasks, skipped


def ingest_deeplesion(root: str | Path, store_dir: str | Path, *, labels: str | Path,
                      ontology: str | Path | None = None, classes: str | None = None, workers: int = 1,
                      recipe: DeepLesionIngestRecipe | None = None, progress: bool = True) -> dict[str, Any]:
    """Ingest the labeled DeepLesion lesions under ``root`` into the SliceStore ``store_dir`` (resuming it).

    Args:
        root: DeepLesion folder with ``DL_info.csv`` and ``Images_png/``.
        store_dir: store folder; created, or continued when made with the same settings.
        labels: LesaNet label file (``text_mined_labels_171_and_split.json`` layout).
        ontology: lesion ontology (xlsx or csv); needed for ``classes``.
        classes: keep only the terms of this ontology class (e.g. ``bodypart``) as label columns.
        workers: processes (1 = in this process).
        recipe: preparation and lesion filters (default :class:`DeepLesionIngestRecipe()`).
        progress: show a tqdm bar.

    Returns:
        The summary written into ``report.json`` (counts, skip reasons, report path).
    """
    check_workers(workers)
    recipe = recipe or DeepLesionIngestRecipe()
    root, store_dir = Path(root), Path(store_dir)
    if not (root / "Images_png").is_dir():
        raise FileNotFoundError(f"{root / 'Images_png'} not found; ROOT must be the DeepLesion folder holding "
                                "DL_info.csv and Images_png/")
    info = read_dl_info(root / "DL_info.csv")
    lab = load_lesanet_labels(labels)
    names = _label_columns(lab, ontology, classes)
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"store folder {store_dir} cannot be created ({e.strerror})") from None
    if not os.access(store_dir, os.W_OK):
        raise PermissionError(f"store folder {store_dir} is not writable; choose a writable STORE_DIR")
    desc = {"source": "deeplesion", "classes": classes, **dataclasses.asdict(recipe)}
    pool = worker_pool(workers)
    try:
        with StoreWriter(store_dir, image_size=recipe.prep.size, label_names=names,
                         shard_size=recipe.shard_size, info=desc) as w:
            resumed = len(w.units)
            tasks, skipped = _tasks(root, info, lab, names, recipe, w.is_done)
            for res in skipped:
                w.commit_unit(f"lesion-{res['lesion_idx']}", info=res)
            results = pool.map(process_lesion, tasks, chunksize=4) if pool else map(process_lesion, tasks)
            for res in tqdm(results, total=len(tasks), desc="lesions", unit="lesion", disable=not progress):
                image, meta, labels_row = res.pop("image", None), res.pop("meta", None), res.pop("labels", None)
                if image is not None:
                    w.add(image, meta=meta, labels=labels_row)
                w.commit_unit(f"lesion-{res['lesion_idx']}", info=res)
            units = w.units
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return _write_report(root, store_dir, units, recipe, names, resumed, len(info))


def _write_report(root: Path, store_dir: Path, units: dict[str, dict], recipe: DeepLesionIngestRecipe,
                  names: list[str], resumed: int, n_rows: int) -> dict[str, Any]:
    rows = sorted(units.values(), key=lambda r: (r.get("split", ""), r.get("lesion_idx", -1)))
    skipped = [r for r in rows if r.get("status") != "ok"]
    kinds = Counter(r.get("reason", "").split(":")[0].split(" (")[0] for r in skipped)
    summary = {"lesions_ok": len(rows) - len(skipped), "lesions_skipped": len(skipped),
               "inputs": sum(r.get("n", 0) for r in rows), "labels": len(names), "dl_info_rows": n_rows,
               "resumed_lesions": resumed, "skip_reasons": dict(kinds),
               "splits": dict(Counter(r.get("split", "") for r in rows if r.get("status") == "ok"))}
    report = {"input": str(root.resolve()), "store": str(store_dir.resolve()),
              "recipe": dataclasses.asdict(recipe), "label_names": names, "summary": summary, "lesions": rows}
    return write_report(store_dir, report, summary)
