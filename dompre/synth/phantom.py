"""Phantom patients: sampled body and scan, lesions with boxes, rendered as an HU volume with per-slice truth.

A patient (:class:`PatientParams`) scales, shifts and rotates the reference body of :mod:`dompre.synth.anatomy`,
picks a scan coverage, slice thickness, pixel spacing, noise and contrast; :func:`make_phantom` renders it slice
by slice onto a table in air, with lesions of the organs inside the scan range.

Labels are the names of the real DeepLesion term list. A term is present on a slice when its structure covers at
least ``MIN_AREA_MM2`` there; region terms (neck / chest / abdomen / pelvis / thigh) follow the z landmarks and
never overlap; every term brings its ancestors within :data:`BODY_TERMS`. Slice-level truth lists every body
part on the slice, so pairs that the ontology calls exclusive *for one lesion* (right lung / left lung, bone /
aorta) can appear together.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dompre.errors import UserError
from dompre.synth.anatomy import PELVIS_END, Anatomy, Shape, region_of
from dompre.synth.terms import TERMS

COVERAGES = {  # body-frame z range (mm below vertex) of each scan protocol
    "head": (-8.0, 225.0), "chest": (262.0, 560.0), "abdomen-pelvis": (480.0, 935.0),
    "chest-abdomen-pelvis": (262.0, 935.0), "whole-body": (-8.0, 1060.0),
}
BODY_PART_EXAMINED = {"head": "HEAD", "chest": "CHEST", "abdomen-pelvis": "ABDOMEN",
                      "chest-abdomen-pelvis": "CHEST", "whole-body": "WHOLEBODY"}
MIN_AREA_MM2 = 40.0
BODY_TERMS = [r[2] for r in TERMS if r[1] == "bodypart" and r[2] not in {
    "lymph node", "mediastinum lymph node", "abdomen lymph node", "retroperitoneum lymph node",
    "pelvis lymph node", "soft tissue", "subcutaneous"}]
ANCESTORS = {r[2]: tuple(r[6]) for r in TERMS}


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
        raise UserError(f"unknown coverage {coverage!r}; choose one of {sorted(COVERAGES)}")
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
