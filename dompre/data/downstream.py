"""Downstream datasets: Kvasir / Medico 2018, NIH ChestX-ray14, pediatric pneumonia, DeepLesion (+ LesaNet labels).

One constructor shape for every dataset, in the spirit of torchxrayvision's ``datasets.py``::

    ds = Kvasir(root, image_size=224, channels=3, transform=None)

Every dataset has the same documented attributes:

- ``label_names``: list[str], the columns of ``labels``.
- ``task``: ``"multiclass"`` (one label per sample, ``labels`` one-hot) or ``"multilabel"``.
- ``meta``: pandas DataFrame, one row per sample, aligned with ``labels``; always has ``path`` (image file),
  ``split`` (``"train"`` / ``"val"`` / ``"test"`` from the dataset's official split, ``""`` when it has none)
  and ``group`` (patient, or the sample itself when unknown: splits never put one group on both sides).
- ``labels``: float32 array (N, L); 1 / 0, NaN for unknown (e.g. LesaNet's uncertain labels).
- ``skipped``: list of ``(item, reason)`` for entries that could not be used (e.g. a csv row without image).

``ds[i]`` returns ``{"image": uint8 tensor (C, H, W), "label": float32 tensor (L,), "index": i}`` (plus
``"box"`` for DeepLesion); grayscale images are repeated to 3 channels unless ``channels=1`` (then the model is
built with ``in_chans=1`` and timm adapts its first convolution). Normalisation happens in the trainer with the
model's own mean/std. :func:`make_splits` turns ``meta`` into train/val/test indices (official split when the
dataset has one, otherwise stratified, grouped by patient; optional k-fold).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, StratifiedGroupKFold, train_test_split
from torchvision import tv_tensors
from torchvision.transforms import v2

from dompre.data import deeplesion as dl
from dompre.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
KVASIR_V2_CLASSES = ("dyed-lifted-polyps", "dyed-resection-margins", "esophagitis", "normal-cecum",
                     "normal-pylorus", "normal-z-line", "polyps", "ulcerative-colitis")
MEDICO_2018_CLASSES = tuple(sorted(KVASIR_V2_CLASSES + (
    "blurry-nothing", "colon-clear", "instruments", "out-of-patient", "retroflex-rectum", "retroflex-stomach",
    "stool-inclusions", "stool-plenty")))
CHESTXRAY14_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                      "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                      "Hernia")
DEEPLESION_TYPES = ("bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft tissue", "pelvis")
LESANET_WINDOW = (-1024.0, 3071.0)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


class DownstreamDataset(torch.utils.data.Dataset):
    """Base class: subclasses fill ``label_names``, ``task``, ``meta``, ``labels`` in ``__init__``."""

    label_names: list[str]
    task: str
    meta: pd.DataFrame
    labels: np.ndarray
    skipped: list[tuple[str, str]]
    grayscale: bool = False  # True when the source images are single-channel

    def __init__(self, root: str | Path, *, image_size: int = 224, channels: int = 3,
                 transform: Callable | None = None) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"{type(self).__name__}: dataset folder {self.root} does not exist; "
                                    f"set data.root to the unpacked dataset")
        if channels not in (1, 3):
            raise UserError(f"channels={channels!r}: use 3 (grayscale repeated) or 1 (model in_chans=1)")
        self.image_size, self.channels, self.transform = image_size, channels, transform
        self.skipped = []

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def targets(self) -> np.ndarray:
        """Class index per sample for multiclass tasks (-1 where unknown)."""
        known = ~np.isnan(self.labels).any(1)
        return np.where(known, np.nan_to_num(self.labels).argmax(1), -1)

    def load_image(self, i: int) -> np.ndarray:
        """uint8 (C, H, W) image of sample ``i`` resized to ``image_size``."""
        with Image.open(self.meta["path"].iat[i]) as im:
            im = im.convert("L" if (self.grayscale or self.channels == 1) else "RGB")
            im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
            arr = np.array(im, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if self.channels == 3 and arr.shape[0] == 1:
            arr = np.repeat(arr, 3, axis=0)
        return arr

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(np.ascontiguousarray(self.load_image(i)))
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": torch.from_numpy(self.labels[i]), "index": i}

    def _finish(self, rows: list[dict], labels: np.ndarray) -> None:
        self.meta = pd.DataFrame(rows, columns=sorted({k for r in rows for k in r} | {"path", "split", "group"}))
        self.labels = np.asarray(labels, dtype=np.float32).reshape(len(rows), len(self.label_names))
        if not rows:
            raise UserError(f"{type(self).__name__}: no usable images under {self.root}; "
                             f"check the folder layout (see docs of {type(self).__name__})")


def _one_hot(targets: list[int], k: int) -> np.ndarray:
    out = np.zeros((len(targets), k), np.float32)
    out[np.arange(len(targets)), targets] = 1
    return out


class Kvasir(DownstreamDataset):
    """Kvasir v2 (8 classes × 1,000 JPEGs) or the 16-class Medico 2018 development set.

    Layout: ``ROOT/<class>/<name>.jpg`` (ROOT is ``kvasir-dataset-v2`` or the folder holding it). The class list is
    the sub-folders present; ``variant`` says ``"kvasir-v2"``, ``"medico2018"`` or ``"custom"``. No official
    split: :func:`make_splits` stratifies. Source: https://datasets.simula.no/kvasir/ (Pogorelov et al., 2017).
    """
    task = "multiclass"

    def __init__(self, root: str | Path, *, image_size: int = 224, channels: int = 3,
                 transform: Callable | None = None) -> None:
        super().__init__(root, image_size=image_size, channels=channels, transform=transform)
        base = self.root / "kvasir-dataset-v2" if (self.root / "kvasir-dataset-v2").is_dir() else self.root
        classes = sorted(d.name for d in base.iterdir() if d.is_dir() and _images_in(d))
        self.label_names = classes
        self.variant = ("kvasir-v2" if set(classes) == set(KVASIR_V2_CLASSES) else
                        "medico2018" if set(classes) == set(MEDICO_2018_CLASSES) else "custom")
        rows, targets = [], []
        for k, c in enumerate(classes):
            for p in _images_in(base / c):
                rows.append({"path": str(p), "split": "", "group": f"{c}/{p.name}"})
                targets.append(k)
        self._finish(rows, _one_hot(targets, len(classes)))


class PediatricPneumonia(DownstreamDataset):
    """Pediatric chest X-ray pneumonia (Kermany et al., 2018), 5,863 JPEGs, NORMAL vs PNEUMONIA.

    Layout: ``ROOT/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (ROOT may be ``chest_xray`` itself).
    The official split is kept; its ``val`` has only 16 images, so :func:`make_splits` can move a stratified
    share of ``train`` to ``val`` (``min_val``). ``group`` is the patient parsed from the file name
    (``person12_bacteria_1`` -> ``person12``; ``IM-0115-0001`` -> ``IM-0115``).
    """
    task = "multiclass"
    grayscale = True
    label_names = ["NORMAL", "PNEUMONIA"]

    def __init__(self, root: str | Path, *, image_size: int = 224, channels: int = 3,
                 transform: Callable | None = None) -> None:
        super().__init__(root, image_size=image_size, channels=channels, transform=transform)
        base = self.root / "chest_xray" if (self.root / "chest_xray").is_dir() else self.root
        rows, targets = [], []
        for split in ("train", "val", "test"):
            for k, c in enumerate(self.label_names):
                folder = base / split / c
                if not folder.is_dir():
                    continue
                for p in _images_in(folder):
                    group = p.stem.split("_")[0] if p.stem.startswith("person") else re.sub(r"-\d+$", "", p.stem)
                    rows.append({"path": str(p), "split": split, "group": f"{c}/{group}"})
                    targets.append(k)
        if not rows:
            raise FileNotFoundError(f"PediatricPneumonia: no {base}/{{train,val,test}}/{{NORMAL,PNEUMONIA}}/*.jpeg; "
                                    f"point data.root at the chest_xray folder")
        self._finish(rows, _one_hot(targets, 2))


class ChestXray14(DownstreamDataset):
    """NIH ChestX-ray14: 112,120 frontal X-rays (1024² PNG) of 30,805 patients, 14 findings (multi-label).

    Layout: ``ROOT/Data_Entry_2017_v2020.csv`` or ``ROOT/Data_Entry_2017.csv``, images in ``ROOT/images*/``
    (also ``images_001/images/``), optional official ``train_val_list.txt`` / ``test_list.txt``. The csv's
    two-value headers (``OriginalImage[Width, Height]``) become ``width``/``height`` and ``spacing_x``/
    ``spacing_y``. Without the lists, :func:`make_splits` splits by patient. Rows whose image is missing are
    skipped and listed in ``skipped``. Source: https://nihcc.app.box.com/v/ChestXray-NIHCC (Wang et al., 2017).
    """
    task = "multilabel"
    grayscale = True
    label_names = list(CHESTXRAY14_LABELS)

    def __init__(self, root: str | Path, *, image_size: int = 224, channels: int = 3,
                 transform: Callable | None = None, csv: str | Path | None = None) -> None:
        super().__init__(root, image_size=image_size, channels=channels, transform=transform)
        table = read_chestxray14_csv(csv or self._find_csv())
        files = {p.name: p for d in self.root.glob("images*") for p in d.rglob("*.png")}
        split_of = {}
        for fname, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
            if (self.root / fname).is_file():
                split_of.update({n.strip(): split for n in (self.root / fname).read_text().split() if n.strip()})
        rows, labels = [], []
        for rec in table.itertuples(index=False):
            path = files.get(rec.image)
            if path is None:
                self.skipped.append((rec.image, "image file not found under images*/"))
                continue
            found = set(str(rec.findings).split("|")) - {"No Finding"}
            unknown = found - set(self.label_names)
            if unknown:
                self.skipped.append((rec.image, f"unknown finding(s) {sorted(unknown)}"))
                continue
            rows.append({"path": str(path), "split": split_of.get(rec.image, ""), "group": str(rec.patient),
                         "view": rec.view, "age": rec.age, "sex": rec.sex})
            labels.append([float(n in found) for n in self.label_names])
        if self.skipped:
            log.warning("ChestXray14: skipped %d csv rows (first: %s)", len(self.skipped), self.skipped[0])
        self._finish(rows, np.asarray(labels, np.float32))

    def _find_csv(self) -> Path:
        for name in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"):
            if (self.root / name).is_file():
                return self.root / name
        raise FileNotFoundError(f"ChestXray14: no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv in {self.root}")


def read_chestxray14_csv(path: str | Path) -> pd.DataFrame:
    """Read ``Data_Entry_2017*.csv`` into columns image, findings, followup, patient, age, sex, view, width,
    height, spacing_x, spacing_y (the odd two-value headers are split; ages like ``058Y`` become 58)."""
    df = pd.read_csv(path)
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed")]]
    df.columns = [str(c).strip() for c in df.columns]
    names = {"Image Index": "image", "Finding Labels": "findings", "Follow-up #": "followup",
             "Patient ID": "patient", "Patient Age": "age", "Patient Gender": "sex", "View Position": "view",
             "OriginalImage[Width": "width", "Height]": "height",
             "OriginalImagePixelSpacing[x": "spacing_x", "y]": "spacing_y"}
    missing = [c for c in list(names)[:7] if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; expected the Data_Entry_2017 headers {list(names)}")
    df = df.rename(columns=names)
    df["age"] = pd.to_numeric(df["age"].astype(str).str.extract(r"(\d+)")[0], errors="coerce")
    return df


class DeepLesion(DownstreamDataset):
    """DeepLesion lesions (Yan et al., 2018; 32,735 lesions), as 3-slice patches around each lesion box.

    Layout: ``ROOT/DL_info.csv`` and ``ROOT/Images_png/<pat>_<study>_<series>/<slice:03d>.png`` (HU + 32768).
    ``target="type"``: multiclass ``Coarse_lesion_type`` 1..8 (:data:`DEEPLESION_TYPES`; rows with -1, i.e. the
    real train split, are skipped as unlabeled). ``target="lesanet"``: multi-label over the LesaNet term list of
    ``labels_json`` (``text_mined_labels_171_and_split.json``; uncertain = NaN) and its splits; ``terms`` picks a
    subset (e.g. the 115 body parts). ``Possibly_noisy`` lesions are skipped.

    Each input, as LesaNet builds it: the planes 2 mm before and after the key slice and the key slice
    (``dompre.data.deeplesion.load_lesion_slices``: interpolated, nearest existing slice where one is missing),
    windowed to [-1024, 3071] HU; a square crop centred on the box with
    side = longest box side + 2 × ``context`` mm, resized to ``patch`` pixels. ``ds[i]["box"]`` is the lesion box
    (x1, y1, x2, y2) in patch pixels.
    """
    grayscale = True

    def __init__(self, root: str | Path, *, image_size: int = 120, channels: int = 3,
                 transform: Callable | None = None, target: str = "type", labels_json: str | Path | None = None,
                 terms: list[str] | None = None, context: float = 60.0, slice_gap_mm: float = 2.0,
                 return_box: bool = True) -> None:
        super().__init__(root, image_size=image_size, channels=channels, transform=transform)
        self._dl, self.context, self.slice_gap_mm, self.return_box = dl, context, slice_gap_mm, return_box
        info = dl.read_dl_info(self.root / "DL_info.csv")
        if target == "type":
            self.task, self.label_names = "multiclass", list(DEEPLESION_TYPES)
            rows, targets = [], []
            for idx in range(len(info)):
                t = int(info["Coarse_lesion_type"].iat[idx])
                if 1 <= t <= 8 and self._usable(info, idx):
                    rows.append(self._row(info, idx, {1: "train", 2: "val", 3: "test"}.get(
                        int(info["Train_Val_Test"].iat[idx]), "")))
                    targets.append(t - 1)
            self._finish(rows, _one_hot(targets, 8))
        elif target == "lesanet":
            if labels_json is None:
                raise UserError("DeepLesion(target='lesanet') needs labels_json "
                                 "(text_mined_labels_171_and_split.json)")
            lab = dl.load_lesanet_labels(labels_json)
            raw = json.loads(Path(labels_json).read_text())
            self.task = "multilabel"
            self.label_names = list(terms) if terms else list(raw["term_list"])
            rows, mats = [], []
            for split in ("train", "val", "test"):
                idxs = raw.get(f"{split}_lesion_idxs", [])
                mat = np.asarray(lab.matrix(split, self.label_names), np.float32)
                for j, idx in enumerate(idxs):
                    if idx >= len(info):
                        self.skipped.append((f"lesion {idx}", f"not a row of {self.root / 'DL_info.csv'}"))
                    elif self._usable(info, idx):
                        rows.append(self._row(info, idx, split))
                        mats.append(mat[j])
            self._finish(rows, np.asarray(mats, np.float32).reshape(len(rows), len(self.label_names)))
        else:
            raise UserError(f"DeepLesion: target={target!r}; use 'type' or 'lesanet'")

    def _usable(self, info: pd.DataFrame, idx: int) -> bool:
        noisy = info["Possibly_noisy"].iat[idx] if "Possibly_noisy" in info else 0
        if noisy and float(noisy) > 0:
            self.skipped.append((str(info["File_name"].iat[idx]), "Possibly_noisy"))
            return False
        return True

    def _row(self, info: pd.DataFrame, idx: int, split: str) -> dict:
        fname = str(info["File_name"].iat[idx])
        folder, sl = fname.rsplit("_", 1)
        return {"path": str(self.root / "Images_png" / folder / sl), "split": split,
                "group": str(info["Patient_index"].iat[idx]), "lesion_idx": idx,
                "box": _floats(info["Bounding_boxes"].iat[idx]), "spacing": _floats(info["Spacing_mm_px_"].iat[idx]),
                "slice_range": _floats(info["Slice_range"].iat[idx])}

    def load_lesion(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (3, P, P) patch, float32 box (4,) in patch pixels) of sample ``i``."""
        row = self.meta.iloc[i]
        key_path = Path(row["path"])
        sx, sy, sz = (list(row["spacing"]) + [1.0, 1.0, float("nan")])[:3]
        vol = self._dl.load_lesion_slices(key_path.parent, int(key_path.stem), sz, neighbours="interval",
                                          interval_mm=self.slice_gap_mm)
        a, b = LESANET_WINDOW
        img = (np.clip((vol - a) / (b - a), 0, 1) * 255).astype(np.uint8)
        x1, y1, x2, y2 = np.asarray(row["box"], np.float64)[:4]  # 0-based (read_dl_info converts)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = max((x2 - x1) * sx, (y2 - y1) * sy) / 2 + self.context  # mm
        hx, hy = half / sx, half / sy
        crop = (cx - hx, cy - hy, cx + hx, cy + hy)
        h, w = img.shape[1:]
        pad = int(np.ceil(max(0.0, -crop[0], -crop[1], crop[2] - w, crop[3] - h)))  # outside the image: air (0)
        img = np.pad(img, ((0, 0), (pad, pad), (pad, pad))) if pad else img
        shifted = tuple(v + pad for v in crop)
        p = self.image_size
        chans = [np.asarray(Image.fromarray(c).resize((p, p), Image.BILINEAR, box=shifted)) for c in img]
        box = np.array([(x1 - crop[0]) / (2 * hx) * p, (y1 - crop[1]) / (2 * hy) * p,
                        (x2 - crop[0]) / (2 * hx) * p, (y2 - crop[1]) / (2 * hy) * p], np.float32)
        return np.stack(chans), box

    def __getitem__(self, i: int) -> dict:
        patch, box = self.load_lesion(i)
        image = torch.from_numpy(patch if self.channels == 3 else patch[1:2].copy())
        if self.transform is not None:
            image = self.transform(image)
        item = {"image": image, "label": torch.from_numpy(self.labels[i]), "index": i}
        if self.return_box:
            item["box"] = torch.from_numpy(box)
        return item


class Clahe:
    """Contrast-limited adaptive histogram equalisation of a uint8 (C, H, W) tensor (``data.clahe``), OpenCV's
    ``createCLAHE``.

    OpenCV rather than scikit-image: it equalises the uint8 images these datasets yield as they are (scikit-image
    converts to float and back), it is one wheel with no further dependencies, and it is much faster per image.
    Grayscale and slice stacks are equalised channel by channel; colour images (``color=True``) on the L channel
    of Lab, so hues are kept.

    Args:
        clip_limit: OpenCV clip limit (contrast cap per tile).
        tiles: tiles per side of the grid.
        color: treat 3 channels as RGB (equalise lightness only).
    """

    def __init__(self, clip_limit: float = 2.0, tiles: int = 8, color: bool = False) -> None:
        if clip_limit <= 0 or tiles < 1:
            raise UserError(f"CLAHE: clip_limit={clip_limit} must be > 0 and tiles={tiles} >= 1")
        self.clip_limit, self.tiles, self.color = clip_limit, tiles, color

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tiles, self.tiles))
        arr = image.numpy()
        if self.color and arr.shape[0] == 3:
            lab = cv2.cvtColor(np.ascontiguousarray(arr.transpose(1, 2, 0)), cv2.COLOR_RGB2LAB)
            lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
            out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).transpose(2, 0, 1)
        else:
            out = np.stack([clahe.apply(np.ascontiguousarray(c)) for c in arr])
        return torch.from_numpy(np.ascontiguousarray(out))


class BoxAugment:
    """Box-aware augmentation of a lesion patch (``train.box_augment``): random shift (±``translate`` of the side),
    scale and horizontal / vertical flips applied to the image and its lesion box together (torchvision v2 with
    ``tv_tensors.BoundingBoxes``), the box clamped to the patch.

    Call with ``(image uint8 (C, H, W), box (4,) x1, y1, x2, y2)``; returns both transformed.
    """
    takes_box = True

    def __init__(self, translate: float = 0.1, scale: tuple[float, float] = (0.8, 1.2), flip: bool = True) -> None:
        ops = [v2.RandomAffine(degrees=0, translate=(translate, translate), scale=scale)]
        if flip:
            ops += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        self.transform = v2.Compose(ops + [v2.ClampBoundingBoxes()])

    def __call__(self, image: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = tv_tensors.BoundingBoxes(box.reshape(1, 4).float(), format="XYXY", canvas_size=image.shape[-2:])
        image, boxes = self.transform(tv_tensors.Image(image), boxes)
        return image.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor).reshape(4)


def _floats(cell) -> list[float]:
    """A DL_info list cell (``"1.5, 2"`` or an already parsed sequence) as floats."""
    if isinstance(cell, str):
        return [float(v) for v in cell.replace(";", ",").split(",") if v.strip()]
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    return [float(v) for v in np.ravel(cell)]


def _split_off(idx: np.ndarray, fraction: float, y: np.ndarray | None, groups: np.ndarray,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, part) with ``fraction`` in part, stratified by ``y`` and grouped by ``groups``."""
    if fraction <= 0 or len(idx) < 2:
        return idx, idx[:0]
    g = groups[idx]
    if y is not None and len(np.unique(g)) == len(g):  # one sample a group: exact stratified fraction
        try:
            rest, part = train_test_split(idx, test_size=fraction, stratify=y[idx], random_state=seed)
            return np.sort(rest), np.sort(part)
        except ValueError:  # a class with one member, or fewer test samples than classes
            pass
    n_splits = min(max(2, int(round(1 / fraction))), len(np.unique(g)))
    if y is not None:
        n_splits = min(n_splits, int(np.bincount(y[idx]).max()))
    if y is not None and n_splits >= 2:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        rest, part = next(splitter.split(idx, y[idx], g))
    else:
        rest, part = next(GroupShuffleSplit(1, test_size=fraction, random_state=seed).split(idx, groups=g))
    return idx[rest], idx[part]


def make_splits(ds: DownstreamDataset, *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                folds: int = 0, fold: int = 0, min_val: int = 100) -> dict[str, np.ndarray]:
    """Train / val / test indices of ``ds``.

    The dataset's official split is used where it has one; a missing (or smaller than ``min_val``) val set is
    carved from train, a missing test set from the rest. New splits are stratified by class (multiclass) and
    never put one ``group`` (patient) on both sides. With ``folds`` = k > 1, k-fold cross-validation: the pool
    of all samples is cut into k stratified, grouped folds, fold ``fold`` is the test set (the official test
    split is ignored), and val is carved from the other folds.
    """
    n = len(ds)
    y = ds.targets if ds.task == "multiclass" else None
    groups = pd.factorize(ds.meta["group"].astype(str))[0]
    split = ds.meta["split"].to_numpy()
    idx = np.arange(n)
    if folds > 1:
        if not 0 <= fold < folds:
            raise UserError(f"fold={fold} is outside 0..{folds - 1} for folds={folds}")
        splitter = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if y is not None
                    else GroupKFold(folds))
        rest, test = list(splitter.split(idx, y, groups))[fold]
        train, val = _split_off(rest, val_fraction, y, groups, seed)
        return {"train": train, "val": val, "test": test}
    test = idx[split == "test"]
    pool = idx[(split == "train") | (split == "")] if len(test) else idx
    if not len(test):
        pool, test = _split_off(pool, test_fraction, y, groups, seed)
    val = idx[split == "val"]
    if len(val) < min_val:
        pool = np.sort(np.concatenate([pool, val]))
        pool, val = _split_off(pool, val_fraction, y, groups, seed)
    return {"train": np.sort(pool), "val": np.sort(val), "test": np.sort(test)}


def build_dataset(kind: str, root: str | Path, **kwargs) -> DownstreamDataset:
    """Dataset by recipe name: kvasir, pneumonia, chestxray14, deeplesion_type, lesanet."""
    if kind == "kvasir":
        return Kvasir(root, **kwargs)
    if kind == "pneumonia":
        return PediatricPneumonia(root, **kwargs)
    if kind == "chestxray14":
        return ChestXray14(root, **kwargs)
    if kind in ("deeplesion_type", "lesanet"):
        return DeepLesion(root, target="type" if kind == "deeplesion_type" else "lesanet", **kwargs)
    raise UserError(f"data.kind={kind!r}; choose kvasir, pneumonia, chestxray14, deeplesion_type or lesanet")
