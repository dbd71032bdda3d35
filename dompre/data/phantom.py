"""Analytic CT phantom: smooth anatomy from head to thighs, per-slice body-part truth and lesions with boxes.

Anatomy lives in a *body frame*: ``z`` is mm below the vertex of a reference adult (head 0-215, neck 215-285,
chest 285-500, abdomen 500-740, pelvis 740-900, thighs 900-1300), ``x`` runs to the patient's left, ``y`` to
posterior (image columns / rows of an axial DICOM slice). Each organ is a superellipse whose size follows a smooth
z profile and whose boundary is perturbed by low-order harmonics drawn per patient. A patient
(:class:`PatientParams`) scales, shifts and rotates that body, picks a scan coverage, slice thickness, pixel
spacing, noise and contrast; :func:`make_phantom` renders it slice by slice onto a table in air.

Labels are the names of the real DeepLesion term list. A term is present on a slice when its structure covers at
least ``MIN_AREA_MM2`` there; region terms (neck / chest / abdomen / pelvis / thigh) follow the z landmarks and
never overlap; every term brings its ancestors within :data:`BODY_TERMS`. Slice-level truth lists every body
part on the slice, so pairs that the ontology calls exclusive *for one lesion* (right lung / left lung, bone /
aorta) can appear together.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from dompre.data.synthetic_terms import TERMS

HEAD_END, NECK_END, CHEST_END, ABDOMEN_END, PELVIS_END, BODY_END = 215.0, 285.0, 500.0, 740.0, 900.0, 1300.0
COVERAGES = {  # body-frame z range (mm below vertex) of each scan protocol
    "head": (-8.0, 225.0), "chest": (262.0, 560.0), "abdomen-pelvis": (480.0, 935.0),
    "chest-abdomen-pelvis": (262.0, 935.0), "whole-body": (-8.0, 1060.0),
}
BODY_PART_EXAMINED = {"head": "HEAD", "chest": "CHEST", "abdomen-pelvis": "ABDOMEN",
                      "chest-abdomen-pelvis": "CHEST", "whole-body": "WHOLEBODY"}
MIN_AREA_MM2 = 40.0
_ROW = {r[2]: r for r in TERMS}
BODY_TERMS = [r[2] for r in TERMS if r[1] == "bodypart" and r[2] not in {
    "lymph node", "mediastinum lymph node", "abdomen lymph node", "retroperitoneum lymph node",
    "pelvis lymph node", "soft tissue", "subcutaneous"}]
ANCESTORS = {r[2]: tuple(r[6]) for r in TERMS}

# HU (non-contrast, contrast-enhanced)
HU = {"air": (-1000, -1000), "fat": (-100, -100), "muscle": (50, 55), "lung": (-850, -850),
      "blood": (40, 260), "vein": (40, 170), "myo": (45, 110), "liver": (58, 115), "spleen": (50, 125),
      "kidney": (35, 175), "pancreas": (45, 100), "adrenal": (30, 60), "bowel": (40, 90), "fluid": (8, 8),
      "bone": (750, 750), "cancellous": (230, 230), "disc": (90, 90), "marrow": (-30, -30), "brain": (33, 38),
      "csf": (8, 8), "thyroid": (90, 170), "soft": (40, 45), "stool": (-150, -150), "cartilage": (100, 100)}
# outline semi-axes (A: left-right, B: antero-posterior) of the reference body along z
_OUT_Z = [0, 15, 50, 100, 150, 190, 215, 240, 280, 300, 330, 450, 500, 600, 740, 820, 900]
_OUT_A = [10, 50, 70, 76, 73, 66, 58, 55, 60, 110, 160, 168, 165, 158, 165, 175, 172]
_OUT_B = [10, 62, 88, 95, 92, 85, 70, 58, 60, 85, 105, 115, 118, 115, 110, 112, 108]


class Shape(NamedTuple):
    """One superellipse in the body frame; ``label`` is the term it shows (None for unlabeled tissue)."""
    name: str
    cx: float
    cy: float
    a: float
    b: float
    ang: float  # degrees
    val: float
    p: float = 2.0
    label: str | None = None


@dataclass(frozen=True)
class PatientParams:
    """Everything that makes one phantom patient; :func:`make_phantom` is a pure function of it."""
    seed: int
    coverage: str = "chest"
    height: float = 1.0  # z scale of the body
    width: float = 1.0  # left-right scale
    depth: float = 1.0  # antero-posterior scale
    fat: float = 14.0  # subcutaneous fat, mm
    rot: float = 0.0  # in-plane rotation, degrees
    shift: tuple[float, float] = (0.0, 0.0)  # mm, image frame
    thickness: float = 2.5  # slice thickness = interval, mm
    pixel: float = 1.6  # pixel spacing, mm
    matrix: int = 256
    noise: float = 12.0  # HU, std
    contrast: bool = True
    sex: str = "F"
    age: int = 60
    z_top: float = 1700.0  # patient z (mm) of the vertex


@dataclass
class Lesion:
    """A 3-D ellipsoidal lesion in the body frame with its DeepLesion terms and coarse type (1..8)."""
    kind: str
    organ: str
    z: float
    cx: float
    cy: float
    r: tuple[float, float, float]  # (x, y, z) semi-axes, mm
    val: float
    terms: tuple[str, ...]
    coarse_type: int


@dataclass
class Phantom:
    """A rendered patient: HU volume (z, y, x), slice index 0 most inferior, with per-slice truth."""
    hu: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # ImagePositionPatient (x, y, z) of slice 0
    labels: list[list[str]]
    body_z: np.ndarray  # body-frame z of every slice
    lesions: list[Lesion] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)  # lesion, slice, x1,y1,x2,y2
    params: PatientParams | None = None


def region_of(z: float) -> str:
    """Region name at body-frame z: head, neck, chest, abdomen, pelvis, thigh or outside."""
    for name, end in (("head", HEAD_END), ("neck", NECK_END), ("chest", CHEST_END), ("abdomen", ABDOMEN_END),
                      ("pelvis", PELVIS_END), ("thigh", BODY_END)):
        if 0 <= z < end:
            return name
    return "outside"


def close_terms(terms: set[str] | list[str]) -> list[str]:
    """``terms`` plus all their ancestors, in :data:`TERMS` order."""
    out = set(terms)
    for t in terms:
        out.update(ANCESTORS[t])
    return [r[2] for r in TERMS if r[2] in out]


def sample_patient(rng: np.random.Generator, *, matrix: int = 256, coverage: str | None = None,
                   max_slices: int = 240) -> PatientParams:
    """Draw one patient: body size/shape, pose, coverage, thickness 1-5 mm, pixel spacing, noise, contrast.

    The slice thickness is drawn among 1, 1.25, 2, 2.5, 3, 5 mm from those that keep the scan within about
    ``max_slices`` slices (5 mm when none does).
    """
    if coverage is None:
        names = list(COVERAGES)
        coverage = names[rng.choice(len(names), p=[0.15, 0.3, 0.25, 0.15, 0.15])]
    if coverage not in COVERAGES:
        raise ValueError(f"unknown coverage {coverage!r}; choose one of {sorted(COVERAGES)}")
    width = float(rng.uniform(0.85, 1.15))
    z0, z1 = COVERAGES[coverage]
    fov = (250.0 if coverage == "head" else 2 * 175 * width + 70) * float(rng.uniform(1.0, 1.12))
    min_thick = (z1 - z0) * 1.1 / max_slices
    thick = [t for t in (1.0, 1.25, 2.0, 2.5, 3.0, 5.0) if t >= min_thick] or [max(5.0, min_thick)]
    return PatientParams(
        seed=int(rng.integers(2**31)), coverage=coverage, height=float(rng.uniform(0.9, 1.1)), width=width,
        depth=float(rng.uniform(0.85, 1.15)), fat=float(rng.uniform(6, 30)), rot=float(rng.uniform(-6, 6)),
        shift=(float(rng.uniform(-15, 15)), float(rng.uniform(-10, 10))), thickness=float(rng.choice(thick)),
        pixel=round(fov / matrix, 4), matrix=matrix, noise=float(rng.uniform(6, 25)),
        contrast=bool(rng.random() < 0.6), sex="F" if rng.random() < 0.5 else "M", age=int(rng.integers(25, 85)),
        z_top=float(rng.uniform(1500, 1900)))


def _prof(z: float, z0: float, z1: float, k: float = 0.5) -> float:
    """Smooth 0..1 profile of an organ spanning [z0, z1] (ellipsoid to the power ``k``)."""
    if z1 <= z0 or not z0 < z < z1:
        return 0.0
    return float((1 - ((2 * z - z0 - z1) / (z1 - z0)) ** 2) ** k)


class _Var(NamedTuple):
    s: float
    dx: float
    dy: float
    dz: float
    harm: np.ndarray  # (2, 3): amplitudes, phases for k = 2, 3, 4


class Anatomy:
    """Body-frame anatomy of one patient: ``shapes(z)`` lists the superellipses to paint, back to front."""

    def __init__(self, params: PatientParams):
        self.p = params
        self._vars: dict[str, _Var] = {}
        self.ci = int(params.contrast)

    def var(self, name: str) -> _Var:
        """Per-patient variation of one structure, stable whatever order structures are asked for."""
        if name not in self._vars:
            r = np.random.default_rng([self.p.seed, zlib.crc32(name.encode())])
            harm = np.stack([r.normal(0, 0.035, 3), r.uniform(0, 2 * np.pi, 3)])
            self._vars[name] = _Var(float(r.uniform(0.88, 1.12)), float(r.normal(0, 3)), float(r.normal(0, 3)),
                                    float(r.normal(0, 6)), harm)
        return self._vars[name]

    def hu(self, tissue: str) -> float:
        return float(HU[tissue][self.ci])

    def outline(self, z: float) -> tuple[float, float]:
        """Body semi-axes (A, B) in mm at z (before the thighs split)."""
        a = np.interp(z, _OUT_Z, _OUT_A) * self.p.width
        b = np.interp(z, _OUT_Z, _OUT_B) * self.p.depth
        return float(a), float(b)

    def spine_y(self, z: float, b: float) -> float:
        return b - float(np.interp(z, [170, 240, 300, 500, 740, 900], [0.55, 0.55, 0.4, 0.38, 0.42, 0.4])) * b

    def shapes(self, z: float) -> list[Shape]:
        """All shapes of the slice at body-frame z, in painting order."""
        if z < 0 or z >= BODY_END:
            return []
        if z >= PELVIS_END:
            return self._thighs(z)
        a, b = self.outline(z)
        if z < HEAD_END - 25:
            return self._head(z, a, b)
        fat = min(self.p.fat, 0.3 * a) if z >= NECK_END else min(self.p.fat, 10.0)
        out = [Shape("body", 0, 0, a, b, 0, self.hu("fat"), 2.3 if z >= NECK_END else 2.0),
               Shape("wall", 0, 0, a - fat, b - fat, 0, self.hu("muscle"), 2.3 if z >= NECK_END else 2.0)]
        ca, cb = a - fat - 10, b - fat - 10
        if z < NECK_END:
            out += self._neck(z, a, b)
        elif z < CHEST_END:
            out.append(Shape("cavity", 0, -3, ca, cb - 3, 0, self.hu("fat"), 2.3))
            out += self._chest(z, ca, cb, b)
        elif z < ABDOMEN_END:
            out.append(Shape("cavity", 0, -3, ca, cb - 3, 0, self.hu("fat"), 2.3))
            out += self._abdomen(z, ca, cb, b)
        else:
            out.append(Shape("cavity", 0, -3, ca, cb - 3, 0, self.hu("fat"), 2.2))
            out += self._pelvis(z, ca, cb, b)
        out += self._spine(z, b)
        return out

    def _head(self, z: float, a: float, b: float) -> list[Shape]:
        out = [Shape("body", 0, 0, a, b, 0, self.hu("soft"))]
        if z < 185:
            out.append(Shape("skull", 0, 0, a - 4, b - 4, 0, self.hu("bone") + 350, label="bone"))
            if z > 6:
                out.append(Shape("brain", 0, 0, a - 11, b - 11, 0, self.hu("brain")))
            if 60 < z < 120:
                f = _prof(z, 60, 120)
                out += [Shape(f"ventricle{s}", 8 * s, -6, 4 * f, 20 * f, -12 * s, self.hu("csf")) for s in (-1, 1)]
        if z > 140:
            f = _prof(z, 140, 205)
            out += [Shape("nasal", 0, -0.72 * b, 6 * f, 14 * f, 0, -1000)]
            out += [Shape(f"sinus{s}", 24 * s, -0.5 * b, 13 * f, 14 * f, 0, -1000) for s in (-1, 1)]
        return out

    def _neck(self, z: float, a: float, b: float) -> list[Shape]:
        v = self.var("thyroid")
        out = [Shape("trachea_wall", 0, -0.42 * b, 11, 10, 0, self.hu("cartilage")),
               Shape("trachea", 0, -0.42 * b, 8.5, 7.5, 0, -1000)]
        if z < HEAD_END:  # chin / floor of mouth above the neck proper
            f = _prof(z, HEAD_END - 40, HEAD_END + 10)
            out += [Shape("mandible", 0, -0.25 * b, 0.8 * a * f, 0.6 * b * f, 0, self.hu("bone")),
                    Shape("mouth", 0, -0.25 * b, 0.8 * a * f - 5, 0.6 * b * f - 5, 0, self.hu("soft")),
                    Shape("pharynx", 0, 0.05 * b, 9, 5, 0, -1000)]
        f = _prof(z, 240 + v.dz / 2, 285 + v.dz / 2, 0.4) * v.s
        for s in (-1, 1):
            if f > 0:
                out.append(Shape(f"thyroid{s}", (15 + v.dx / 3) * s, -0.36 * b, 8.5 * f, 14 * f, 22 * s,
                                 self.hu("thyroid"), label="thyroid gland"))
            out += [Shape(f"carotid{s}", 25 * s, -0.2 * b, 4, 4, 0, self.hu("blood")),
                    Shape(f"jugular{s}", 33 * s, -0.26 * b, 6, 5, 0, self.hu("vein"))]
        return out

    def _chest(self, z: float, ca: float, cb: float, b: float) -> list[Shape]:
        out, ys = [], self.spine_y(z, b)
        out.append(Shape("mediastinum", 0, -0.2 * cb, 0.26 * ca, 0.7 * cb, 0, self.hu("fat") + 20,
                         label="mediastinum"))
        for side, term, w in ((-1, "right lung", 0.47), (1, "left lung", 0.43)):
            v = self.var(term)
            lp = _prof(z, NECK_END - 2 + v.dz / 3, CHEST_END + 8, 0.3) * v.s
            if lp > 0:
                out.append(Shape(term, side * (0.5 * ca + v.dx), 0.06 * cb, w * ca * lp, 0.86 * cb * lp,
                                 side * 4, self.hu("lung"), 2.6, term))
        v = self.var("heart")
        hp = _prof(z, 390 + v.dz, 505, 0.6) * v.s
        if hp > 0:
            out += [Shape("heart", 0.12 * ca, -0.22 * cb, 0.3 * ca * hp, 0.42 * cb * hp, 28, self.hu("myo")),
                    Shape("chambers", 0.12 * ca, -0.22 * cb, 0.3 * ca * hp - 9, 0.42 * cb * hp - 9, 28,
                          self.hu("blood"))]
        if z < 382:  # trachea descends and moves posterior to the carina
            t = (z - NECK_END) / 97
            out += [Shape("trachea_wall", 0, (-0.35 + 0.35 * t) * cb, 11, 10, 0, self.hu("cartilage")),
                    Shape("trachea", 0, (-0.35 + 0.35 * t) * cb, 8.5, 8, 0, -1000)]
        elif z < 420:
            out += [Shape(f"bronchus{s}", s * (14 + 0.6 * (z - 382)), 0.0, 6, 5, 0, -1000) for s in (-1, 1)]
        if 322 < z < 345:
            out.append(Shape("arch", 0.08 * ca, -0.1 * cb, 14, 0.32 * cb, 25, self.hu("blood"), label="aorta"))
        if 335 < z < 402:
            out.append(Shape("ascending", -0.03 * ca, -0.3 * cb, 14, 14, 0, self.hu("blood"), label="aorta"))
        if 365 < z < 395:
            out.append(Shape("pulmonary", 0.08 * ca, -0.12 * cb, 22, 12, -30, self.hu("blood")))
        if 295 < z < 400:
            out.append(Shape("svc", -0.16 * ca, -0.24 * cb, 9, 9, 0, self.hu("vein")))
        if z > 325:
            out.append(Shape("descending", 0.16 * ca, ys - 30, 12, 12, 0, self.hu("blood"), label="aorta"))
        if 300 < z < 470:
            y = -b + self.p.fat + 7
            out += [Shape("sternum", 0, y, 15, 6.5, 0, self.hu("bone"), label="sternum"),
                    Shape("sternum_in", 0, y, 12.5, 4, 0, self.hu("cancellous"))]
        out += self._ribs(z, ca + 8, cb + 8)
        return out

    def _ribs(self, z: float, ra: float, rb: float) -> list[Shape]:
        out = []
        for t in (35, 60, 85, 110, 135, 158):
            for s in (-1, 1):
                ph = self.var(f"rib{t}{s}").dz
                if ((z + 0.45 * t + ph) / 27) % 1.0 < 0.42:
                    th = np.radians(t)
                    x, y = s * ra * np.sin(th), -rb * np.cos(th)
                    out.append(Shape(f"rib{t}{s}", x, y, 7, 4.5, float(np.degrees(np.arctan2(y, x))) + 90,
                                     self.hu("bone") - 100, label="rib"))
        return out

    def _spine(self, z: float, b: float) -> list[Shape]:
        if z < 170:
            return []
        term = {"head": "spine", "neck": "spine", "chest": "thoracic spine", "abdomen": "lumbar",
                "pelvis": "sacrum"}[region_of(z)]
        ys = self.spine_y(z, b)
        if region_of(z) == "pelvis":
            v = self.var("sacrum")
            f = _prof(z, ABDOMEN_END - 1, 860 + v.dz, 0.5)
            if f <= 0:
                return []
            return [Shape("sacrum", 0, ys, 0.25 * b * f + 8, 14 * f + 4, 0, self.hu("bone"), label=term),
                    Shape("sacrum_in", 0, ys, 0.25 * b * f + 5, 14 * f + 1, 0, self.hu("cancellous"))]
        r = float(np.interp(z, [170, 285, 500, 740], [10, 13, 17, 21]))
        period = float(np.interp(z, [170, 285, 500, 740], [18, 22, 27, 34]))
        disc = ((z + self.var("disc").dz) / period) % 1.0 < 0.18
        out = [Shape(f"paraspinal{s}", s * (r + 8), ys + r + 12, r + 5, r + 3, 0, self.hu("muscle"))
               for s in (-1, 1)]
        out += [Shape("vertebra", 0, ys, r + 2, r, 0, self.hu("bone") - 50, label=term),
                Shape("vertebra_in", 0, ys, r, r - 2, 0, self.hu("disc") if disc else self.hu("cancellous")),
                Shape("arch", 0, ys + r + 8, r * 0.9, 5, 0, self.hu("bone") - 100, label=term),
                Shape("canal", 0, ys + r + 4, 6.5, 5.5, 0, self.hu("csf")),
                Shape("spinous", 0, ys + r + 18, 3, 8, 0, self.hu("bone") - 150, label=term)]
        if region_of(z) != "abdomen":
            out += [Shape(f"transverse{s}", s * (r + 6), ys + r + 3, 8, 3.5, -20 * s, self.hu("bone") - 150)
                    for s in (-1, 1)]
        return out

    def _abdomen(self, z: float, ca: float, cb: float, b: float) -> list[Shape]:
        out, ys = [], self.spine_y(z, b)

        def organ(name, z0, z1, cx, cy, a, bb, ang, tissue, label=None, k=0.5, p=2.0):
            v = self.var(name)
            f = _prof(z, z0 + v.dz, z1 + v.dz, k) * v.s
            if f > 0.05 and a * f > 2 and bb * f > 2:
                out.append(Shape(name, cx + v.dx, cy + v.dy, a * f, bb * f, ang,
                                 self.hu(tissue) if tissue in HU else float(tissue), p, label))
            return f

        if z < 600:
            organ("stomach", 490, 605, 0.3 * ca, -0.32 * cb, 0.27 * ca, 0.3 * cb, -30, "bowel", "stomach")
            if out and out[-1].name == "stomach":
                s = out[-1]
                out += [s._replace(name="stomach_in", a=s.a - 4, b=s.b - 4, val=self.hu("fluid"), label=None),
                        s._replace(name="stomach_gas", cx=s.cx + 0.2 * s.a, cy=s.cy - 0.45 * s.b, a=0.55 * s.a,
                                   b=0.3 * s.b, val=-1000.0, label=None)]
        organ("liver", CHEST_END - 8, 650, -0.3 * ca, -0.06 * cb, 0.6 * ca, 0.82 * cb, 12, "liver", "liver", 0.4, 2.3)
        organ("gallbladder", 575, 632, -0.2 * ca, -0.42 * cb, 13, 19, -20, "fluid", "gallbladder")
        organ("spleen", CHEST_END - 6, 592, 0.6 * ca, 0.25 * cb, 0.2 * ca, 0.38 * cb, 40, "spleen", "spleen")
        organ("pancreas", 562, 612, 0.04 * ca, 0.08 * cb, 0.34 * ca, 0.07 * cb + 4, -12, "pancreas", "pancreas", 0.3)
        for s in (-1, 1):
            organ(f"adrenal{s}", 528, 572, s * 0.19 * ca, 0.3 * cb, 11, 4, 60 * s, "adrenal", "adrenal gland", 0.3)
            kz = 15 if s < 0 else 0
            term = "right kidney" if s < 0 else "left kidney"
            f = organ(term, 560 + kz, 690 + kz, s * 0.33 * ca, 0.36 * cb, 0.14 * ca, 0.22 * cb, 25 * s, "kidney", term)
            if f > 0.4:
                k = out[-1]
                out.append(k._replace(name=f"sinus{s}", cx=k.cx - s * 0.35 * k.a, a=0.35 * k.a, b=0.4 * k.b,
                                      val=self.hu("fat") + 40, label=None))
        organ("ivc", CHEST_END - 10, ABDOMEN_END + 10, -0.1 * ca, ys - 0.05 * b - 28, 11, 10, 0, "vein", None, 0.05)
        out.append(Shape("aorta", 0.06 * ca, ys - 30, 11, 11, 0, self.hu("blood"), label="aorta"))
        out += self._bowel(z, ca, cb, 600, ABDOMEN_END, 8, "intestine")
        if z > 640:
            r = min(6 + 0.15 * (z - 640), 22)
            out += [Shape(f"psoas{s}", s * (0.12 * ca + r), ys - 4, r, r * 1.1, 0, self.hu("muscle")) for s in (-1, 1)]
        return out

    def _bowel(self, z, ca, cb, z0, z1, n, label) -> list[Shape]:
        out = []
        for i in range(n):
            v = self.var(f"bowel{i}{label}")
            zi0 = z0 + abs(v.dz) * 4
            if not zi0 < z < z1:
                continue
            u = (v.harm[1, 0] / np.pi - 1) * 0.6 + 0.12 * np.sin(z / 40 + v.harm[1, 1])
            w = (v.harm[1, 2] / np.pi - 1.2) * 0.45 + 0.1 * np.cos(z / 35 + v.harm[1, 1])
            r = 10 + 8 * abs(v.harm[0, 0]) / 0.035 % 8
            gas = v.s > 1.02
            out += [Shape(f"bowel{i}", u * ca, w * cb, r, r * 0.85, 0, self.hu("bowel"), label=label),
                    Shape(f"lumen{i}", u * ca, w * cb, r - 3, r * 0.85 - 3, 0,
                          -1000 if gas else self.hu("fluid"))]
        return out

    def _pelvis(self, z: float, ca: float, cb: float, b: float) -> list[Shape]:
        out, ys = [], self.spine_y(z, b)
        for s in (-1, 1):
            if z > 760:
                out.append(Shape(f"gluteal{s}", s * 0.42 * ca, 0.5 * cb, 0.38 * ca, 0.38 * cb, 0, self.hu("muscle")))
            r = 22
            out.append(Shape(f"iliopsoas{s}", s * (0.12 * ca + r + 0.0008 * (z - 740) * ca), ys - 8, r, r, 0,
                             self.hu("muscle")))
            v = self.var(f"iliac{s}")
            f = _prof(z, ABDOMEN_END - 10 + v.dz, 850 + v.dz, 0.5)
            if f > 0.1:
                ang = s * (55 - 0.2 * (z - ABDOMEN_END))
                for nm, val, da in (("iliac", self.hu("bone"), 0), ("iliac_in", self.hu("cancellous"), 3)):
                    out.append(Shape(f"{nm}{s}", s * 0.5 * ca, 0.22 * cb, 0.32 * ca * f - da, 8 - da, ang, val,
                                     label="pelvic bone" if not da else None))
            out.append(Shape(f"iliac_vessel{s}", s * 0.27 * ca, 0.0, 6, 6, 0, self.hu("blood")))
            if z > 848:
                out += [Shape(f"acetabulum{s}", s * 0.45 * ca, 0.08 * cb, 25, 25, 0, self.hu("bone"), label="pelvic bone"),
                        Shape(f"head{s}", s * 0.45 * ca, 0.08 * cb, 20, 20, 0, self.hu("cancellous"))]
            if z > 862:
                out += [Shape(f"pubis{s}", s * 0.16 * ca, -0.62 * cb, 16, 7, 20 * s, self.hu("bone") - 100, label="pelvic bone"),
                        Shape(f"ischium{s}", s * 0.3 * ca, 0.42 * cb, 9, 14, 0, self.hu("bone") - 100, label="pelvic bone")]
        v = self.var("bladder")
        f = _prof(z, 815 + v.dz, PELVIS_END + 15, 0.5) * v.s
        if f > 0.05:
            out.append(Shape("bladder", v.dx, -0.38 * cb, 0.27 * ca * f, 0.32 * cb * f, 0, self.hu("fluid"),
                             label="urinary bladder"))
        if z > 780:
            gas = self.var("rectum").s > 1.0
            out += [Shape("rectum", 0, 0.52 * cb, 16, 14, 0, self.hu("bowel")),
                    Shape("rectum_in", 0, 0.52 * cb, 12, 10, 0, -1000 if gas else self.hu("stool"))]
        out += self._bowel(z, ca * 0.7, cb * 0.6, ABDOMEN_END, 805, 3, None)
        return out

    def _thighs(self, z: float) -> list[Shape]:
        t = (z - PELVIS_END) / (BODY_END - PELVIS_END)
        r = (86 - 28 * t) * self.p.width
        fat = min(self.p.fat, 0.3 * r)
        out = []
        for s in (-1, 1):
            cx = s * (r + 3)
            out += [Shape(f"thigh{s}", cx, 0, r, r * 0.95 * self.p.depth, 0, self.hu("fat"), label="thigh"),
                    Shape(f"thighm{s}", cx, 0, r - fat, r * 0.95 * self.p.depth - fat, 0, self.hu("muscle")),
                    Shape(f"femur{s}", cx - s * 0.1 * r, -0.05 * r, 14, 14, 0, self.hu("bone") + 400, label="femur"),
                    Shape(f"femur_in{s}", cx - s * 0.1 * r, -0.05 * r, 9, 9, 0, self.hu("marrow"))]
        return out


# ----------------------------------------------------------------------------------------------- lesions
_LESION_Z = {"lung": (300, 490), "liver": (515, 630), "kidney": (585, 675), "spleen": (510, 580),
             "mediastinal_ln": (330, 430), "abdominal_ln": (600, 725), "pelvic_ln": (760, 880),
             "bone": (292, 730), "soft": (20, 1250), "thyroid": (248, 280), "neck_ln": (222, 282),
             "femur": (905, 1250)}


def _find(shapes: list[Shape], *names: str, min_size: float = 6.0) -> Shape | None:
    cands = [s for s in shapes if s.name in names and min(s.a, s.b) > min_size]
    return cands[0] if cands else None


def _lesion(kind: str, z: float, anat: Anatomy, rng: np.random.Generator) -> Lesion | None:
    """One lesion of ``kind`` centred at body-frame z, or None when its organ is too small there."""
    sh = anat.shapes(z)
    u, w = rng.uniform(-1, 1, 2)
    if kind in ("lung", "liver", "kidney", "spleen"):
        side = "right" if rng.random() < 0.5 else "left"
        name = {"lung": f"{side} lung", "kidney": f"{side} kidney"}.get(kind, kind)
        s = _find(sh, name)
        if s is None:
            return None
        r = float(rng.uniform(3, max(3.5, min(14, 0.35 * min(s.a, s.b)))))
        cx, cy = s.cx + 0.5 * u * (s.a - r), s.cy + 0.5 * w * (s.b - r)
        if kind == "lung":
            big = rng.random() < 0.2 and min(s.a, s.b) > 40
            r = float(rng.uniform(15, 22)) if big else r
            calc = rng.random() < 0.1
            terms = (name, "mass", "lung mass", "large") if big else (name, "nodule", "lung nodule")
            return Lesion(kind, name, z, cx, cy, (r, r, r), 450.0 if calc else 35.0,
                          terms + (("calcified",) if calc else ()) + (("tiny",) if r < 5 else ()), 5)
        if kind == "liver":
            sub = rng.choice(["hypo", "cyst", "hyper"] if anat.ci else ["hypo", "cyst"])
            size = ("nodule",) if r < 10 else ("mass", "liver mass")
            val, terms = {"hypo": (s.val - 45, ("hypoattenuation",) + size), "cyst": (5.0, ("cyst", "hypoattenuation")),
                          "hyper": (s.val + 70, ("hyperattenuation", "enhancing") + size)}[sub]
            return Lesion(kind, name, z, cx, cy, (r, r * 0.9, r), float(val), ("liver",) + terms, 4)
        if kind == "kidney":
            return Lesion(kind, name, z, cx, cy, (r, r, r), 5.0, (name, "cyst", "kidney cyst", "hypoattenuation"), 6)
        return Lesion(kind, name, z, cx, cy, (r, r, r), s.val - 40, ("spleen", "nodule", "hypoattenuation"), 2)
    r = float(rng.uniform(6, 14))
    ln = ("lymph node", "lymphadenopathy") + (("large",) if r > 12 else ())
    val = 45.0 + 25 * anat.ci
    if kind == "mediastinal_ln":
        s = _find(sh, "mediastinum")
        if s is None:
            return None
        return Lesion(kind, "mediastinum lymph node", z, s.cx + 0.45 * u * s.a, s.cy + 0.4 * w * s.b - 0.2 * s.b,
                      (r, r * 0.8, r), val, ("mediastinum lymph node",) + ln, 3)
    if kind == "abdominal_ln":
        s, side = _find(sh, "aorta"), (1 if u > 0 else -1)
        if s is None:
            return None
        return Lesion(kind, "retroperitoneum lymph node", z, s.cx + side * (s.a + r + 2), s.cy + 3 * w,
                      (r, r * 0.8, r), val, ("retroperitoneum lymph node", "abdomen lymph node") + ln, 2)
    if kind == "pelvic_ln":
        side = 1 if u > 0 else -1
        s = _find(sh, f"iliac_vessel{side}", min_size=3.0)
        if s is None:
            return None
        return Lesion(kind, "pelvis lymph node", z, s.cx + side * (s.a + r + 2), s.cy + 4 * w, (r, r * 0.8, r),
                      val, ("pelvis lymph node",) + ln, 8)
    if kind == "neck_ln":
        side = 1 if u > 0 else -1
        s = _find(sh, f"jugular{side}", min_size=3.0)
        if s is None:
            return None
        return Lesion(kind, "neck", z, s.cx + side * (s.a + r / 2 + 2), s.cy + 3 * w, (r / 2, r * 0.4, r / 2),
                      val, ("neck",) + ln, 7)
    if kind == "thyroid":
        s = _find(sh, "thyroid1" if u > 0 else "thyroid-1", min_size=4.0)
        if s is None:
            return None
        r = float(rng.uniform(2.5, max(3.0, 0.6 * min(s.a, s.b))))
        return Lesion(kind, "thyroid gland", z, s.cx + 0.3 * w * s.a, s.cy + 0.3 * w * s.b, (r, r, r),
                      s.val - 60, ("thyroid gland", "nodule", "hypoattenuation"), 7)
    if kind == "femur":
        s = _find(sh, "femur1" if u > 0 else "femur-1")
        if s is None:
            return None
        r = float(rng.uniform(0.35, 0.6) * s.a)
        scl = rng.random() < 0.5
        return Lesion(kind, "femur", z, s.cx + 0.3 * w * s.a, s.cy + 0.3 * u * s.b, (r, r, 2 * r),
                      1050.0 if scl else 60.0, ("femur", "sclerotic" if scl else "lytic"), 1)
    if kind == "bone":
        s = _find(sh, "vertebra")
        if s is None:
            return None
        r = float(rng.uniform(0.3, 0.55) * min(s.a, s.b))
        scl = rng.random() < 0.5
        return Lesion(kind, s.label or "spine", z, s.cx + 0.3 * u * s.a, s.cy + 0.3 * w * s.b, (r, r, r),
                      1050.0 if scl else 60.0, ("bone", s.label or "spine", "sclerotic" if scl else "lytic"), 1)
    s = _find(sh, "body", "thigh-1")
    if s is None or anat.p.fat < 9:
        return None
    th = rng.uniform(-2.2, 2.2)
    r = float(rng.uniform(4, min(12.0, 0.45 * anat.p.fat)))
    rr = 1 - 0.5 * anat.p.fat / min(s.a, s.b)
    return Lesion(kind, "subcutaneous", z, s.cx + rr * s.a * np.sin(th), s.cy - rr * s.b * np.cos(th),
                  (r, r, r), 40.0, ("soft tissue", "subcutaneous", "nodule"), 7)


def make_lesions(params: PatientParams, z_range: tuple[float, float],
                 n: int | tuple[int, int] | None = None) -> list[Lesion]:
    """Draw ``n`` lesions (an int, a (low, high) range, default 2-6) of organs inside the scanned z range."""
    rng = np.random.default_rng([params.seed, 1])
    anat = Anatomy(params)
    lo, hi = min(z_range) + 8, max(z_range) - 8
    kinds = [k for k, (a, b) in _LESION_Z.items() if min(b, hi) - max(a, lo) > 5]
    lo_n, hi_n = (2, 6) if n is None else (n, n) if isinstance(n, int) else n
    n = int(rng.integers(lo_n, hi_n + 1))
    out: list[Lesion] = []
    for _ in range(n * 4):
        if len(out) >= n or not kinds:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        a, b = _LESION_Z[kind]
        les = _lesion(kind, float(rng.uniform(max(a, lo), min(b, hi))), anat, rng)
        if les is not None:
            out.append(les)
    return out


# --------------------------------------------------------------------------------------------- rendering
def _paint(img: np.ndarray, xs: np.ndarray, s: Shape, harm: np.ndarray | None, z: float,
           edge: float = 0.7) -> tuple[np.ndarray, int, int] | None:
    """Blend one shape (image frame) into ``img``; return its soft mask and the mask's top-left pixel.

    Superellipse squareness and the boundary harmonics are evaluated from (cos, sin) of the polar angle with
    products only (no pow / arctan2), which keeps a 256x256 slice at a few ms.
    """
    rad = max(s.a, s.b) * (1.12 if harm is None else 1.25) + 2
    c0, c1 = np.searchsorted(xs, [s.cx - rad, s.cx + rad])
    r0, r1 = np.searchsorted(xs, [s.cy - rad, s.cy + rad])
    if c1 <= c0 or r1 <= r0 or s.a <= 0 or s.b <= 0:
        return None
    x = xs[c0:c1][None, :] - np.float32(s.cx)
    y = xs[r0:r1][:, None] - np.float32(s.cy)
    ca, sa = np.float32(np.cos(np.radians(s.ang))), np.float32(np.sin(np.radians(s.ang)))
    u, v = (x * ca + y * sa) * np.float32(1 / s.a), (y * ca - x * sa) * np.float32(1 / s.b)
    r = np.sqrt(u * u + v * v)
    if harm is not None or s.p != 2.0:
        inv = 1 / np.maximum(r, np.float32(1e-6))
        c, sn = u * inv, v * inv
        c2, s2 = c * c - sn * sn, 2 * c * sn
        g = np.float32(1.0)  # boundary radius along this direction, in units of the ellipse
        if s.p != 2.0:  # superellipse: the boundary reaches further along the diagonals
            g = 1 + np.float32(2 ** (0.5 - 1 / s.p) - 1) * s2 * s2
        if harm is not None:
            c3, s3 = c2 * c - s2 * sn, s2 * c + c2 * sn
            c4, s4 = c2 * c2 - s2 * s2, 2 * c2 * s2
            ph = harm[1] + z / 60
            amp_c, amp_s = (harm[0] * np.cos(ph)).astype(np.float32), (harm[0] * np.sin(ph)).astype(np.float32)
            g = g * (1 + amp_c[0] * c2 - amp_s[0] * s2 + amp_c[1] * c3 - amp_s[1] * s3
                     + amp_c[2] * c4 - amp_s[2] * s4)
        r = r / g
    m = np.clip((1 - r) * np.float32(min(s.a, s.b) / edge) + np.float32(0.5), 0, 1)
    sub = img[r0:r1, c0:c1]
    sub += m * (np.float32(s.val) - sub)
    return m, int(r0), int(c0)


def _background(params: PatientParams, xs: np.ndarray, y_table: float) -> np.ndarray:
    """Air with a curved CT table (foam core, dense skins) under the patient."""
    x, y = xs[None, :], xs[:, None]
    top = y_table + 1.5 - 0.0005 * x**2
    img = np.full((xs.size, xs.size), -1000.0, np.float32)
    inside = (np.abs(x) < 210) & (y >= top) & (y < top + 14)
    img[inside] = -750.0
    img[inside & ((y < top + 2) | (y >= top + 12))] = 250.0
    return img


def render_slice(anat: Anatomy, z: float, xs: np.ndarray, bg: np.ndarray, y_table: float,
                 lesions: list[Lesion] = ()) -> tuple[np.ndarray, list[str], list[tuple[int, int, int, int, int]]]:
    """One noiseless slice at body-frame z: (HU image, body-part terms, lesion boxes (i, x1, y1, x2, y2))."""
    p = anat.p
    img = bg.copy()
    shapes = anat.shapes(z)
    bottom = max((s.cy + s.b for s in shapes if s.name in ("body", "thigh-1")), default=0.0)
    oy = y_table - bottom - 1.0
    ca, sa = np.cos(np.radians(p.rot)), np.sin(np.radians(p.rot))

    def place(s: Shape) -> Shape:
        return s._replace(cx=ca * s.cx - sa * s.cy + p.shift[0], cy=sa * s.cx + ca * s.cy + oy, ang=s.ang + p.rot)

    area: dict[str, float] = {}
    px2 = float(xs[1] - xs[0]) ** 2
    for s in shapes:
        nested = s.name in ("body", "wall", "cavity", "skull", "brain")  # one outline: layers stay nested
        harm = anat.var("body" if nested else s.name).harm if (s.label or nested) else None
        res = _paint(img, xs, place(s), harm, z)
        if res is not None and s.label:
            area[s.label] = area.get(s.label, 0.0) + float(res[0].sum()) * px2
    terms = {t for t, a in area.items() if a >= MIN_AREA_MM2}
    reg = region_of(z)
    if shapes and reg in ("neck", "chest", "abdomen", "pelvis"):
        terms.add(reg)
    boxes = []
    for i, les in enumerate(lesions):
        dz = (z - les.z) / les.r[2]
        if abs(dz) >= 1:
            continue
        f = float(np.sqrt(1 - dz * dz))
        res = _paint(img, xs, place(Shape("lesion", les.cx, les.cy, les.r[0] * f, les.r[1] * f, 0, les.val)), None, z)
        if res is not None:
            m, r0, c0 = res
            rows, cols = np.nonzero(m > 0.5)
            if rows.size:
                boxes.append((i, c0 + int(cols.min()), r0 + int(rows.min()), c0 + int(cols.max()), r0 + int(rows.max())))
    return img, close_terms(terms), boxes


def slice_positions(params: PatientParams) -> np.ndarray:
    """Body-frame z of every slice of the patient's scan, index 0 the most inferior."""
    z0, z1 = COVERAGES[params.coverage]
    n = int((z1 - z0) * params.height / params.thickness) + 1
    return z1 - np.arange(n) * params.thickness / params.height


def make_phantom(params: PatientParams, *, lesions: bool = True, contrast: bool | None = None,
                 lesions_per_patient: tuple[int, int] = (2, 6)) -> Phantom:
    """Render one patient as an HU volume with per-slice body-part terms and lesion boxes.

    Args:
        params: the patient (see :func:`sample_patient`).
        lesions: paint lesions of organs inside the scan range (``lesions_per_patient``: how many, low-high).
        contrast: override ``params.contrast`` (e.g. a non-contrast series of the same anatomy).
    """
    if contrast is not None and contrast != params.contrast:
        params = PatientParams(**{**params.__dict__, "contrast": contrast})
    anat = Anatomy(params)
    zs = slice_positions(params)
    n = params.matrix
    xs = ((np.arange(n) - (n - 1) / 2) * params.pixel).astype(np.float32)
    z0, z1 = COVERAGES[params.coverage]
    zz = np.linspace(max(z0, 0), min(z1, PELVIS_END - 1), 12)
    b_max = max(anat.outline(float(z))[1] for z in zz)
    y_table = b_max * 0.98 + 12 + params.shift[1]
    bg = _background(params, xs, y_table)
    les = make_lesions(params, (float(zs.min()), float(zs.max())), tuple(lesions_per_patient)) if lesions else []
    hu = np.empty((len(zs), n, n), np.float32)
    labels, boxes = [], []
    noise_rng = np.random.default_rng([params.seed, 2])
    for k, z in enumerate(zs):
        img, terms, bx = render_slice(anat, float(z), xs, bg, y_table, les)
        noise = noise_rng.standard_normal((n, n), dtype=np.float32)
        noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1) + np.roll(noise, (1, 1), (0, 1))) * 0.5
        hu[k] = img + params.noise * noise
        labels.append(terms)
        boxes += [(i, k, *b) for i, *b in bx]
    origin = (float(xs[0]), float(xs[0]), params.z_top - float(zs[0]) * params.height)
    return Phantom(hu, (params.thickness, params.pixel, params.pixel), origin, labels, zs, les, boxes, params)
