"""Tiny copies of the real downstream dataset layouts (synthetic pixels, real structure), for the tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dompre.data.downstream import KVASIR_V2_CLASSES, MEDICO_2018_CLASSES

COLORS = np.random.default_rng(0).integers(0, 255, (16, 3))


def _img(path: Path, value, size: int = 32, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    if mode == "RGB":
        arr = np.clip(np.asarray(value)[None, None] + rng.integers(-10, 10, (size, size, 3)), 0, 255)
    else:
        arr = np.clip(value + rng.integers(-10, 10, (size, size)), 0, 255)
    Image.fromarray(arr.astype(np.uint8), mode).save(path)


def make_kvasir(root: Path, per_class: int = 4, medico: bool = False) -> Path:
    """``root/kvasir-dataset-v2/<class>/<i>.jpg``, one colour per class."""
    classes = MEDICO_2018_CLASSES if medico else KVASIR_V2_CLASSES
    for k, c in enumerate(classes):
        for i in range(per_class):
            _img(root / "kvasir-dataset-v2" / c / f"{c[:3]}{i:04d}.jpg", COLORS[k])
    return root


def make_pneumonia(root: Path, n: dict | None = None) -> Path:
    """``root/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``; dark NORMAL, bright PNEUMONIA."""
    n = n or {"train": 6, "val": 1, "test": 3}
    for split, count in n.items():
        for i in range(count):
            _img(root / "chest_xray" / split / "NORMAL" / f"IM-{split[:2]}{i:02d}-0001.jpeg", 60, mode="L")
            _img(root / "chest_xray" / split / "PNEUMONIA" / f"person{i}{split}_bacteria_{i}.jpeg", 190, mode="L")
    return root


CXR_FINDINGS = ["Cardiomegaly", "No Finding", "Effusion|Mass", "No Finding", "Cardiomegaly|Effusion", "Mass",
                "No Finding", "Effusion", "Cardiomegaly", "Mass|Nodule", "No Finding", "Effusion"]


def make_chestxray14(root: Path, official: bool = True, missing: int = 1) -> Path:
    """``Data_Entry_2017.csv`` with the real headers (trailing comma, ``058Y`` ages), ``images_001/images``,
    and the official lists; ``missing`` csv rows have no image file."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"]
    names = []
    for i, f in enumerate(CXR_FINDINGS + ["Hernia"] * missing):
        patient = i // 2 + 1
        name = f"{patient:08d}_{i % 2:03d}.png"
        names.append(name)
        lines.append(f"{name},{f},{i % 2},{patient},0{50 + i}Y,{'MF'[i % 2]},PA,1024,1024,0.143,0.143,")
        if i < len(CXR_FINDINGS):
            _img(root / "images_001" / "images" / name, 80 + 10 * ("Cardiomegaly" in f), mode="L")
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    if official:
        (root / "train_val_list.txt").write_text("\n".join(names[:8]) + "\n")
        (root / "test_list.txt").write_text("\n".join(names[8:]) + "\n")
    return root


DL_HEADER = ("File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,Bounding_boxes,"
             "Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range,"
             "Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test")
TERMS = ["chest", "abdomen", "lung", "liver", "nodule"]


def make_deeplesion(root: Path, n: int = 12, size: int = 64) -> Path:
    """``Images_png/<pat>_01_01/<k>.png`` (slices 1..5, constant HU per slice: -1024, -1024, 0, 3071, 3071 so the
    key slice 3 and its 2 mm neighbours are distinct), ``DL_info.csv`` (boxes 20..30, 1-based; spacing 1×1×2 mm;
    types cycle 1..4; split by row) and a LesaNet ``labels.json`` over :data:`TERMS` (lesion 0 has one uncertain
    label)."""
    hus = {1: -1024, 2: -1024, 3: 0, 4: 3071, 5: 3071}
    rows = [DL_HEADER]
    for i in range(n):
        folder = root / "Images_png" / f"{i + 1:06d}_01_01"
        folder.mkdir(parents=True, exist_ok=True)
        for k, hu in hus.items():
            img = np.full((size, size), hu + 32768, np.uint16)
            img[20:30, 20:30] += 100 * (i % 4)  # a lesion whose brightness depends on its type
            Image.fromarray(img).save(folder / f"{k:03d}.png")
        split = 1 if i < n // 2 else (2 if i < 3 * n // 4 else 3)
        rows.append(f'{i + 1:06d}_01_01_003.png,{i + 1},1,1,3,"20, 20, 30, 30","20, 20, 30, 30","10, 10",'
                    f'"0.5, 0.5, 0.5",{i % 4 + 1},0,"1, 5","1, 1, 2","{size}, {size}","-1024, 3071",M,50,{split}')
    (root / "DL_info.csv").write_text("\n".join(rows) + "\n")
    half = n // 2
    idx = {"train": list(range(half)), "val": list(range(half, 3 * n // 4)), "test": list(range(3 * n // 4, n))}
    labels = {"term_list": TERMS}
    for s, ids in idx.items():
        labels[f"{s}_lesion_idxs"] = ids
        labels[f"{s}_relevant_labels"] = [[0, 2] if i % 2 else [1, 3, 3] for i in ids]
        labels[f"{s}_uncertain_labels"] = [[4] if i == 0 else [] for i in ids]
    (root / "labels.json").write_text(json.dumps(labels))
    (root / "ontology.csv").write_text(
        "id,class,term,synonyms,num_detected,term_exclusive,term_parents,term_children\n"
        "1,bodypart,chest,,5,abdomen,,lung\n2,bodypart,abdomen,,5,chest,,liver\n3,bodypart,lung,,5,,chest,\n"
        "4,bodypart,liver,,5,,abdomen,\n5,type,nodule,,5,,,\n")
    return root
