"""The phantom's anatomy as a table: one row (:class:`Part`) per structure, read by :meth:`Anatomy.shapes`.

Anatomy lives in a *body frame*: ``z`` is mm below the vertex of a reference adult (head 0-215, neck 215-285,
chest 285-500, abdomen 500-740, pelvis 740-900, thighs 900-1300), ``x`` runs to the patient's left, ``y`` to
posterior (image columns / rows of an axial DICOM slice). Every structure is a superellipse: a row names its
tissue, centre, semi-axes, angle, squareness, the term it shows and where along z it exists. Sizes that swell and
fade along z use the row's *profile* ``F`` (0..1, :func:`profile`), and each patient varies each structure a
little (:class:`Variation`: size ``S``, offsets ``DX`` / ``DY`` / ``DZ``, boundary harmonics ``H``).

The rows' geometry is written with the slice quantities below (``0.3 * CA + DX``): arithmetic on them records
the expression, evaluated per slice exactly as written. Per slice (:meth:`Anatomy.frame`): ``Z``; the body
outline's semi-axes ``A`` / ``B`` and subcutaneous fat ``FAT``; the body cavity's ``CA`` / ``CB``; the spine's
``YS`` (its y), ``VR`` (vertebral body radius) and ``DISC`` (the slice cuts an intervertebral disc); ``R``, the
thigh radius. Per patient: ``PFAT`` (fat before clipping to the outline), ``DEPTH``. Per row: ``SIDE`` (-1 the
patient's right, +1 left, 0 midline), its variation, ``F``, and in a row drawn *within* another, that parent's
``PCX`` / ``PCY`` / ``PA`` / ``PB`` (its ``F`` carries over).

Rows are grouped in :data:`SECTIONS` (head, neck, chest, abdomen, pelvis, thighs) and listed back to front: a
later row paints over an earlier one.
"""
from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from dompre.synth.phantom import PatientParams

HEAD_END, NECK_END, CHEST_END, ABDOMEN_END, PELVIS_END, BODY_END = 215.0, 285.0, 500.0, 740.0, 900.0, 1300.0

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


def region_of(z: float) -> str:
    """Region name at body-frame z: head, neck, chest, abdomen, pelvis, thigh or outside."""
    for name, end in (("head", HEAD_END), ("neck", NECK_END), ("chest", CHEST_END), ("abdomen", ABDOMEN_END),
                      ("pelvis", PELVIS_END), ("thigh", BODY_END)):
        if 0 <= z < end:
            return name
    return "outside"


# -------------------------------------------------------------------------------------- slice quantities
class Q:
    """A quantity of the slice being drawn; ``q(values)`` evaluates it from a dict of the symbols' values.

    Arithmetic with numbers and other Qs builds a new Q that performs the same operations in the same order,
    so a row computes bit for bit what the written formula would. ``names`` are the symbols it reads.
    """

    __slots__ = ("fn", "names", "text")

    def __init__(self, fn: Callable[[dict], Any], names: frozenset[str], text: str):
        self.fn, self.names, self.text = fn, names, text

    def __call__(self, values: dict) -> Any:
        return self.fn(values)

    def __repr__(self) -> str:
        return self.text

    def __bool__(self) -> bool:  # `lo < Z < hi` or `if q:` would silently be True
        raise TypeError(f"{self.text} has no truth value before a slice evaluates it; combine conditions with &")

    def __neg__(self) -> Q:
        return apply(operator.neg, self, text=f"-{self.text}")

    def __abs__(self) -> Q:
        return apply(abs, self)

    def __invert__(self) -> Q:
        return apply(operator.not_, self, text=f"not {self.text}")

    def __getitem__(self, index) -> Q:
        return apply(operator.getitem, self, index, text=f"{self.text}[{index}]")


def _operator(op: Callable, sign: str) -> tuple[Callable, Callable]:
    def forward(x: Q, y: Any) -> Q:
        return _combine(op, sign, x, y)

    def reverse(x: Q, y: Any) -> Q:
        return _combine(op, sign, y, x)
    return forward, reverse


def _combine(op: Callable, sign: str, x: Any, y: Any) -> Q:
    text = f"({x!r} {sign} {y!r})"
    if isinstance(x, Q) and isinstance(y, Q):
        fx, fy = x.fn, y.fn
        return Q(lambda v: op(fx(v), fy(v)), x.names | y.names, text)
    if isinstance(x, Q):
        fx = x.fn
        return Q(lambda v: op(fx(v), y), x.names, text)
    fy = y.fn
    return Q(lambda v: op(x, fy(v)), y.names, text)


for _name, _op, _sign in (("add", operator.add, "+"), ("sub", operator.sub, "-"), ("mul", operator.mul, "*"),
                          ("truediv", operator.truediv, "/"), ("mod", operator.mod, "%"),
                          ("and", operator.and_, "&")):
    _fwd, _rev = _operator(_op, _sign)
    setattr(Q, f"__{_name}__", _fwd)
    setattr(Q, f"__r{_name}__", _rev)
for _name, _op, _sign in (("lt", operator.lt, "<"), ("le", operator.le, "<="), ("gt", operator.gt, ">"),
                          ("ge", operator.ge, ">=")):  # a number on the left reflects to the mirrored comparison
    setattr(Q, f"__{_name}__", _operator(_op, _sign)[0])


def apply(fn: Callable, *args: Any, text: str | None = None) -> Q:
    """``fn(*args)`` evaluated per slice, where any of ``args`` may be a Q."""
    fns = [a.fn if isinstance(a, Q) else None for a in args]
    names = frozenset().union(*(a.names for a in args if isinstance(a, Q)))
    text = text or f"{getattr(fn, '__name__', fn)}({', '.join(map(repr, args))})"
    return Q(lambda v: fn(*[f(v) if f is not None else a for f, a in zip(fns, args)]), names, text)


def _symbol(name: str) -> Q:
    return Q(operator.itemgetter(name), frozenset({name}), name.upper())


Z, A, B, FAT, CA, CB, YS, VR, DISC, R, PFAT, DEPTH, SIDE = map(
    _symbol, ("z", "a", "b", "fat", "ca", "cb", "ys", "vr", "disc", "r", "pfat", "depth", "side"))
S, DX, DY, DZ, H, F = map(_symbol, ("s", "dx", "dy", "dz", "h", "f"))
PCX, PCY, PA, PB = map(_symbol, ("pcx", "pcy", "pa", "pb"))
_PARENT = frozenset({"pcx", "pcy", "pa", "pb"})


def _prof(z: float, z0: float, z1: float, k: float = 0.5) -> float:
    """Smooth 0..1 profile of an organ spanning [z0, z1] (ellipsoid to the power ``k``)."""
    if z1 <= z0 or not z0 < z < z1:
        return 0.0
    return float((1 - ((2 * z - z0 - z1) / (z1 - z0)) ** 2) ** k)


def profile(z0: Any, z1: Any, k: float = 0.5) -> Q:
    """The smooth 0..1 rise and fall of a structure spanning ``z0 < Z < z1`` (0 outside)."""
    return apply(_prof, Z, z0, z1, k, text=f"profile({z0!r}, {z1!r}, {k})")


def _bearing(y: float, x: float) -> float:
    return float(np.degrees(np.arctan2(y, x)))


# ----------------------------------------------------------------------------------------------- the table
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


class Part(NamedTuple):
    """One row of the anatomy: a structure drawn as a :class:`Shape` on the slices where it exists.

    It exists for ``z[0] < Z < z[1]`` (inside its section) when ``when`` holds and, with ``min_size``, both
    semi-axes exceed it. ``grow`` is its profile ``F``; ``vary`` the name of its per-patient variation (default
    ``name``); ``within`` a row drawn before it on the same slice, without which it is not drawn. ``{side}`` in
    ``name`` / ``vary`` / ``within`` becomes the side's -1 / 1 (:func:`mirrored`).
    """
    name: str
    tissue: str  # key of HU
    at: tuple[Any, Any]  # centre (x, y), mm
    size: tuple[Any, Any]  # semi-axes (a, b), mm
    ang: Any = 0  # degrees
    p: float = 2.0  # superellipse exponent (2: an ellipse)
    label: str | None = None
    dhu: float = 0  # added to the tissue's HU
    z: tuple[float, float] = (-math.inf, math.inf)
    grow: Q | None = None
    when: Q | None = None
    min_size: float | None = None
    vary: str | None = None
    within: str | None = None
    side: int = 0


def mirrored(*parts: Part) -> list[Part]:
    """``parts`` on the patient's right (side -1), then the same on the left (+1)."""
    return [on_side(p, side) for side in (-1, 1) for p in parts]


def on_side(part: Part, side: int) -> Part:
    fill = {"side": side}
    return part._replace(name=part.name.format(**fill), side=side,
                         vary=part.vary.format(**fill) if part.vary else None,
                         within=part.within.format(**fill) if part.within else None)


class Section(NamedTuple):
    """The rows of one stretch ``z[0] <= Z < z[1]`` of the body, back to front."""
    name: str
    z: tuple[float, float]
    parts: tuple[Part, ...]


def _trunk(p: float, cavity: float | None) -> list[Part]:
    """Body outline, muscle wall and (below the neck) the body cavity."""
    rows = [Part("body", "fat", at=(0, 0), size=(A, B), p=p),
            Part("wall", "muscle", at=(0, 0), size=(A - FAT, B - FAT), p=p)]
    if cavity is not None:
        rows.append(Part("cavity", "fat", at=(0, -3), size=(CA, CB - 3), p=cavity))
    return rows


def _vertebrae(label: str, transverse: bool) -> list[Part]:
    """One vertebra per slice (a disc where the slice cuts one), with its arch and the muscles beside it."""
    rows = [*mirrored(Part("paraspinal{side}", "muscle", at=(SIDE * (VR + 8), YS + VR + 12), size=(VR + 5, VR + 3))),
            Part("vertebra", "bone", dhu=-50, at=(0, YS), size=(VR + 2, VR), label=label),
            Part("vertebra_in", "disc", at=(0, YS), size=(VR, VR - 2), when=DISC),
            Part("vertebra_in", "cancellous", at=(0, YS), size=(VR, VR - 2), when=~DISC),
            Part("arch", "bone", dhu=-100, at=(0, YS + VR + 8), size=(VR * 0.9, 5), label=label),
            Part("canal", "csf", at=(0, YS + VR + 4), size=(6.5, 5.5)),
            Part("spinous", "bone", dhu=-150, at=(0, YS + VR + 18), size=(3, 8), label=label)]
    if transverse:
        rows += mirrored(Part("transverse{side}", "bone", dhu=-150, at=(SIDE * (VR + 6), YS + VR + 3), size=(8, 3.5),
                              ang=-20 * SIDE))
    return rows


def _ribs() -> list[Part]:
    """Six ribs a side on the cavity's rim, each cut where its phase along z comes round."""
    rows = []
    for t in (35, 60, 85, 110, 135, 158):
        for side in (-1, 1):
            x = side * (CA + 8) * np.sin(np.radians(t))
            y = -(CB + 8) * np.cos(np.radians(t))
            rows.append(Part(f"rib{t}{side}", "bone", dhu=-100, at=(x, y), size=(7, 4.5),
                             ang=apply(_bearing, y, x) + 90, label="rib",
                             when=((Z + 0.45 * t + DZ) / 27) % 1.0 < 0.42, side=side))
    return rows


def _loops(n: int, z0: float, z1: float, ca: Q, cb: Q, label: str | None) -> list[Part]:
    """``n`` bowel loops (wall and a fluid or gas lumen) wandering over the cavity between z0 and z1."""
    rows = []
    for i in range(n):
        key = f"bowel{i}{label}"  # its variation's name ("bowel0None" in the pelvis): it seeds where the loop lies
        u = (H[1, 0] / np.pi - 1) * 0.6 + 0.12 * apply(np.sin, Z / 40 + H[1, 1])
        w = (H[1, 2] / np.pi - 1.2) * 0.45 + 0.1 * apply(np.cos, Z / 35 + H[1, 1])
        r = 10 + 8 * abs(H[0, 0]) / 0.035 % 8
        rows += [Part(f"bowel{i}", "bowel", at=(u * ca, w * cb), size=(r, r * 0.85), label=label, vary=key,
                      when=(z0 + abs(DZ) * 4 < Z) & (Z < z1)),
                 Part(f"lumen{i}", "air", at=(PCX, PCY), size=(PA - 3, PB - 3), vary=key, within=f"bowel{i}",
                      when=S > 1.02),
                 Part(f"lumen{i}", "fluid", at=(PCX, PCY), size=(PA - 3, PB - 3), vary=key, within=f"bowel{i}",
                      when=S <= 1.02)]
    return rows


_TRACHEA_Y = (-0.35 + 0.35 * ((Z - NECK_END) / 97)) * CB  # descends and moves posterior to the carina
_PSOAS_R = apply(min, 6 + 0.15 * (Z - 640), 22)
_ILIAC_ANG = SIDE * (55 - 0.2 * (Z - ABDOMEN_END))
_STERNUM_Y = -B + PFAT + 7
_THIGH_X = SIDE * (R + 3)
_FEMUR_X = _THIGH_X - SIDE * 0.1 * R

HEAD = (
    Part("body", "soft", at=(0, 0), size=(A, B)),
    Part("skull", "bone", dhu=350, at=(0, 0), size=(A - 4, B - 4), label="bone", z=(-math.inf, 185)),
    Part("brain", "brain", at=(0, 0), size=(A - 11, B - 11), z=(6, 185)),
    *mirrored(Part("ventricle{side}", "csf", at=(8 * SIDE, -6), size=(4 * F, 20 * F), ang=-12 * SIDE, z=(60, 120),
                   grow=profile(60, 120))),
    Part("nasal", "air", at=(0, -0.72 * B), size=(6 * F, 14 * F), z=(140, math.inf), grow=profile(140, 205)),
    *mirrored(Part("sinus{side}", "air", at=(24 * SIDE, -0.5 * B), size=(13 * F, 14 * F), z=(140, math.inf),
                   grow=profile(140, 205))),
)
NECK = (
    *_trunk(2.0, None),
    Part("trachea_wall", "cartilage", at=(0, -0.42 * B), size=(11, 10)),
    Part("trachea", "air", at=(0, -0.42 * B), size=(8.5, 7.5)),
    Part("mandible", "bone", at=(0, -0.25 * B), size=(0.8 * A * F, 0.6 * B * F), z=(-math.inf, HEAD_END),
         grow=profile(HEAD_END - 40, HEAD_END + 10)),  # chin / floor of mouth above the neck proper
    Part("mouth", "soft", at=(0, -0.25 * B), size=(PA - 5, PB - 5), within="mandible"),
    Part("pharynx", "air", at=(0, 0.05 * B), size=(9, 5), z=(-math.inf, HEAD_END)),
    *mirrored(Part("thyroid{side}", "thyroid", at=((15 + DX / 3) * SIDE, -0.36 * B), size=(8.5 * F, 14 * F),
                   ang=22 * SIDE, label="thyroid gland", grow=profile(240 + DZ / 2, 285 + DZ / 2, 0.4) * S,
                   when=F > 0, vary="thyroid"),
              Part("carotid{side}", "blood", at=(25 * SIDE, -0.2 * B), size=(4, 4)),
              Part("jugular{side}", "vein", at=(33 * SIDE, -0.26 * B), size=(6, 5))),
    *_vertebrae("spine", transverse=True),
)
CHEST = (
    *_trunk(2.3, 2.3),
    Part("mediastinum", "fat", dhu=20, at=(0, -0.2 * CB), size=(0.26 * CA, 0.7 * CB), label="mediastinum"),
    *(Part(term, "lung", at=(side * (0.5 * CA + DX), 0.06 * CB), size=(w * CA * F, 0.86 * CB * F), ang=side * 4,
           p=2.6, label=term, grow=profile(NECK_END - 2 + DZ / 3, CHEST_END + 8, 0.3) * S, when=F > 0, side=side)
      for side, term, w in ((-1, "right lung", 0.47), (1, "left lung", 0.43))),
    Part("heart", "myo", at=(0.12 * CA, -0.22 * CB), size=(0.3 * CA * F, 0.42 * CB * F), ang=28,
         grow=profile(390 + DZ, 505, 0.6) * S, when=F > 0),
    Part("chambers", "blood", at=(0.12 * CA, -0.22 * CB), size=(PA - 9, PB - 9), ang=28, within="heart"),
    Part("trachea_wall", "cartilage", at=(0, _TRACHEA_Y), size=(11, 10), z=(-math.inf, 382)),
    Part("trachea", "air", at=(0, _TRACHEA_Y), size=(8.5, 8), z=(-math.inf, 382)),
    *mirrored(Part("bronchus{side}", "air", at=(SIDE * (14 + 0.6 * (Z - 382)), 0.0), size=(6, 5),
                   z=(-math.inf, 420), when=Z >= 382)),
    Part("arch", "blood", at=(0.08 * CA, -0.1 * CB), size=(14, 0.32 * CB), ang=25, label="aorta", z=(322, 345)),
    Part("ascending", "blood", at=(-0.03 * CA, -0.3 * CB), size=(14, 14), label="aorta", z=(335, 402)),
    Part("pulmonary", "blood", at=(0.08 * CA, -0.12 * CB), size=(22, 12), ang=-30, z=(365, 395)),
    Part("svc", "vein", at=(-0.16 * CA, -0.24 * CB), size=(9, 9), z=(295, 400)),
    Part("descending", "blood", at=(0.16 * CA, YS - 30), size=(12, 12), label="aorta", z=(325, math.inf)),
    Part("sternum", "bone", at=(0, _STERNUM_Y), size=(15, 6.5), label="sternum", z=(300, 470)),
    Part("sternum_in", "cancellous", at=(0, _STERNUM_Y), size=(12.5, 4), z=(300, 470)),
    *_ribs(),
    *_vertebrae("thoracic spine", transverse=True),
)
_ORGAN = dict(when=F > 0.05, min_size=2)  # how the abdominal organs fade out at their ends
ABDOMEN = (
    *_trunk(2.3, 2.3),
    Part("stomach", "bowel", at=(0.3 * CA + DX, -0.32 * CB + DY), size=(0.27 * CA * F, 0.3 * CB * F), ang=-30,
         label="stomach", z=(-math.inf, 600), grow=profile(490 + DZ, 605 + DZ) * S, **_ORGAN),
    Part("stomach_in", "fluid", at=(PCX, PCY), size=(PA - 4, PB - 4), ang=-30, within="stomach"),
    Part("stomach_gas", "air", at=(PCX + 0.2 * PA, PCY - 0.45 * PB), size=(0.55 * PA, 0.3 * PB), ang=-30,
         within="stomach"),
    Part("liver", "liver", at=(-0.3 * CA + DX, -0.06 * CB + DY), size=(0.6 * CA * F, 0.82 * CB * F), ang=12, p=2.3,
         label="liver", grow=profile(CHEST_END - 8 + DZ, 650 + DZ, 0.4) * S, **_ORGAN),
    Part("gallbladder", "fluid", at=(-0.2 * CA + DX, -0.42 * CB + DY), size=(13 * F, 19 * F), ang=-20,
         label="gallbladder", grow=profile(575 + DZ, 632 + DZ) * S, **_ORGAN),
    Part("spleen", "spleen", at=(0.6 * CA + DX, 0.25 * CB + DY), size=(0.2 * CA * F, 0.38 * CB * F), ang=40,
         label="spleen", grow=profile(CHEST_END - 6 + DZ, 592 + DZ) * S, **_ORGAN),
    Part("pancreas", "pancreas", at=(0.04 * CA + DX, 0.08 * CB + DY), size=(0.34 * CA * F, (0.07 * CB + 4) * F),
         ang=-12, label="pancreas", grow=profile(562 + DZ, 612 + DZ, 0.3) * S, **_ORGAN),
    *(row for side, term, z0 in ((-1, "right kidney", 575), (1, "left kidney", 560)) for row in (
        on_side(Part("adrenal{side}", "adrenal", at=(SIDE * 0.19 * CA + DX, 0.3 * CB + DY), size=(11 * F, 4 * F),
                     ang=60 * SIDE, label="adrenal gland", grow=profile(528 + DZ, 572 + DZ, 0.3) * S, **_ORGAN), side),
        Part(term, "kidney", at=(SIDE * 0.33 * CA + DX, 0.36 * CB + DY), size=(0.14 * CA * F, 0.22 * CB * F),
             ang=25 * SIDE, label=term, grow=profile(z0 + DZ, z0 + 130 + DZ) * S, side=side,
             **_ORGAN),
        on_side(Part("sinus{side}", "fat", dhu=40, at=(PCX - SIDE * 0.35 * PA, PCY), size=(0.35 * PA, 0.4 * PB),
                     ang=25 * SIDE, within=term, when=F > 0.4), side))),
    Part("ivc", "vein", at=(-0.1 * CA + DX, YS - 0.05 * B - 28 + DY), size=(11 * F, 10 * F),
         grow=profile(CHEST_END - 10 + DZ, ABDOMEN_END + 10 + DZ, 0.05) * S, **_ORGAN),
    Part("aorta", "blood", at=(0.06 * CA, YS - 30), size=(11, 11), label="aorta"),
    *_loops(8, 600, ABDOMEN_END, CA, CB, "intestine"),
    *mirrored(Part("psoas{side}", "muscle", at=(SIDE * (0.12 * CA + _PSOAS_R), YS - 4), size=(_PSOAS_R, _PSOAS_R * 1.1),
                   z=(640, math.inf))),
    *_vertebrae("lumbar", transverse=False),
)
PELVIS = (
    *_trunk(2.3, 2.2),
    *mirrored(
        Part("gluteal{side}", "muscle", at=(SIDE * 0.42 * CA, 0.5 * CB), size=(0.38 * CA, 0.38 * CB), z=(760, math.inf)),
        Part("iliopsoas{side}", "muscle", at=(SIDE * (0.12 * CA + 22 + 0.0008 * (Z - 740) * CA), YS - 8),
             size=(22, 22)),
        Part("iliac{side}", "bone", at=(SIDE * 0.5 * CA, 0.22 * CB), size=(0.32 * CA * F, 8), ang=_ILIAC_ANG,
             label="pelvic bone", grow=profile(ABDOMEN_END - 10 + DZ, 850 + DZ), when=F > 0.1),
        Part("iliac_in{side}", "cancellous", at=(PCX, PCY), size=(PA - 3, PB - 3), ang=_ILIAC_ANG,
             within="iliac{side}"),
        Part("iliac_vessel{side}", "blood", at=(SIDE * 0.27 * CA, 0.0), size=(6, 6)),
        Part("acetabulum{side}", "bone", at=(SIDE * 0.45 * CA, 0.08 * CB), size=(25, 25), label="pelvic bone",
             z=(848, math.inf)),
        Part("head{side}", "cancellous", at=(SIDE * 0.45 * CA, 0.08 * CB), size=(20, 20), z=(848, math.inf)),
        Part("pubis{side}", "bone", dhu=-100, at=(SIDE * 0.16 * CA, -0.62 * CB), size=(16, 7), ang=20 * SIDE,
             label="pelvic bone", z=(862, math.inf)),
        Part("ischium{side}", "bone", dhu=-100, at=(SIDE * 0.3 * CA, 0.42 * CB), size=(9, 14), label="pelvic bone",
             z=(862, math.inf))),
    Part("bladder", "fluid", at=(DX, -0.38 * CB), size=(0.27 * CA * F, 0.32 * CB * F), label="urinary bladder",
         grow=profile(815 + DZ, PELVIS_END + 15) * S, when=F > 0.05),
    Part("rectum", "bowel", at=(0, 0.52 * CB), size=(16, 14), z=(780, math.inf)),
    Part("rectum_in", "air", at=(0, 0.52 * CB), size=(12, 10), z=(780, math.inf), vary="rectum", when=S > 1.0),
    Part("rectum_in", "stool", at=(0, 0.52 * CB), size=(12, 10), z=(780, math.inf), vary="rectum", when=S <= 1.0),
    *_loops(3, ABDOMEN_END, 805, CA * 0.7, CB * 0.6, None),
    Part("sacrum", "bone", at=(0, YS), size=(0.25 * B * F + 8, 14 * F + 4), label="sacrum",
         grow=profile(ABDOMEN_END - 1, 860 + DZ), when=F > 0),
    Part("sacrum_in", "cancellous", at=(0, YS), size=(0.25 * B * F + 5, 14 * F + 1), within="sacrum"),
)
THIGHS = tuple(mirrored(
    Part("thigh{side}", "fat", at=(_THIGH_X, 0), size=(R, R * 0.95 * DEPTH), label="thigh"),
    Part("thighm{side}", "muscle", at=(_THIGH_X, 0), size=(R - FAT, R * 0.95 * DEPTH - FAT)),
    Part("femur{side}", "bone", dhu=400, at=(_FEMUR_X, -0.05 * R), size=(14, 14), label="femur"),
    Part("femur_in{side}", "marrow", at=(_FEMUR_X, -0.05 * R), size=(9, 9))))

SECTIONS = (
    Section("head", (0.0, HEAD_END - 25), HEAD),
    Section("neck", (HEAD_END - 25, NECK_END), NECK),
    Section("chest", (NECK_END, CHEST_END), CHEST),
    Section("abdomen", (CHEST_END, ABDOMEN_END), ABDOMEN),
    Section("pelvis", (ABDOMEN_END, PELVIS_END), PELVIS),
    Section("thighs", (PELVIS_END, BODY_END), THIGHS),
)


class _Step(NamedTuple):
    """A row ready to evaluate: its fields as functions of the slice quantities."""
    part: Part
    vary: str | None  # None when the row reads no variation
    grow: Callable | None
    when: Callable | None
    geometry: tuple[Callable, ...]  # cx, cy, a, b, ang


_VARIATION = frozenset({"s", "dx", "dy", "dz", "h"})


def _compile(sections: Iterable[Section]) -> dict[str, tuple[_Step, ...]]:
    """Check that every row reads only the symbols it has (F needs a profile or a parent, PCX .. PB a parent
    drawn before it) and turn its fields into functions."""
    plans = {}
    for sec in sections:
        seen, steps = set(), []
        for part in sec.parts:
            fields = (*part.at, *part.size, part.ang)
            reads = frozenset().union(*(f.names for f in (*fields, part.when) if isinstance(f, Q)))
            names = reads | (part.grow.names if part.grow is not None else frozenset())
            if part.tissue not in HU:
                raise ValueError(f"{sec.name}/{part.name}: unknown tissue {part.tissue!r}")
            if names & _PARENT and part.within is None or part.within is not None and part.within not in seen:
                raise ValueError(f"{sec.name}/{part.name}: a parent's geometry needs an earlier `within` row")
            if "f" in reads and part.grow is None and part.within is None:
                raise ValueError(f"{sec.name}/{part.name}: F needs a profile (grow) or a parent")
            seen.add(part.name)
            steps.append(_Step(part, (part.vary or part.name) if names & _VARIATION else None,
                               part.grow.fn if part.grow is not None else None,
                               part.when.fn if part.when is not None else None,
                               tuple(f.fn if isinstance(f, Q) else (lambda q, c=f: c) for f in fields)))
        plans[sec.name] = tuple(steps)
    return plans


_PLANS = _compile(SECTIONS)


# ---------------------------------------------------------------------------------------------- one patient
class Variation(NamedTuple):
    """How one patient's structure departs from the reference: size, offsets (mm) and boundary harmonics."""
    s: float
    dx: float
    dy: float
    dz: float
    harm: np.ndarray  # (2, 3): amplitudes, phases for k = 2, 3, 4


class Anatomy:
    """Body-frame anatomy of one patient: ``shapes(z)`` lists the superellipses to paint, back to front."""

    def __init__(self, params: PatientParams):
        self.p = params
        self._vars: dict[str, Variation] = {}
        self.ci = int(params.contrast)

    def var(self, name: str) -> Variation:
        """Per-patient variation of one structure, stable whatever order structures are asked for."""
        if name not in self._vars:
            r = np.random.default_rng([self.p.seed, zlib.crc32(name.encode())])
            harm = np.stack([r.normal(0, 0.035, 3), r.uniform(0, 2 * np.pi, 3)])
            self._vars[name] = Variation(float(r.uniform(0.88, 1.12)), float(r.normal(0, 3)), float(r.normal(0, 3)),
                                         float(r.normal(0, 6)), harm)
        return self._vars[name]

    def hu(self, tissue: str) -> float:
        return float(HU[tissue][self.ci])

    def outline(self, z: float) -> tuple[float, float]:
        """Body semi-axes (A, B) in mm at z (before the thighs split)."""
        a = np.interp(z, _OUT_Z, _OUT_A) * self.p.width
        b = np.interp(z, _OUT_Z, _OUT_B) * self.p.depth
        return float(a), float(b)

    def frame(self, z: float) -> dict[str, Any]:
        """The slice quantities at body-frame z (see the module docstring)."""
        p = self.p
        q: dict[str, Any] = {"z": z, "pfat": p.fat, "depth": p.depth}
        if z >= PELVIS_END:
            r = (86 - 28 * ((z - PELVIS_END) / (BODY_END - PELVIS_END))) * p.width
            q.update(r=r, fat=min(p.fat, 0.3 * r))
            return q
        a, b = self.outline(z)
        fat = min(p.fat, 0.3 * a) if z >= NECK_END else min(p.fat, 10.0)
        period = float(np.interp(z, [170, 285, 500, 740], [18, 22, 27, 34]))
        q.update(a=a, b=b, fat=fat, ca=a - fat - 10, cb=b - fat - 10,
                 ys=b - float(np.interp(z, [170, 240, 300, 500, 740, 900], [0.55, 0.55, 0.4, 0.38, 0.42, 0.4])) * b,
                 vr=float(np.interp(z, [170, 285, 500, 740], [10, 13, 17, 21])),
                 disc=((z + self.var("disc").dz) / period) % 1.0 < 0.18)
        return q

    def shapes(self, z: float) -> list[Shape]:
        """All shapes of the slice at body-frame z, in painting order."""
        sec = next((s for s in SECTIONS if s.z[0] <= z < s.z[1]), None)
        if sec is None:
            return []
        q = self.frame(z)
        out: list[Shape] = []
        drawn: dict[str, tuple[Shape, float | None]] = {}
        for step in _PLANS[sec.name]:
            part = step.part
            if not part.z[0] < z < part.z[1]:
                continue
            f = None
            if part.within is not None:
                if part.within not in drawn:
                    continue
                parent, f = drawn[part.within]
                q["pcx"], q["pcy"], q["pa"], q["pb"] = parent.cx, parent.cy, parent.a, parent.b
            if step.vary is not None:
                q["s"], q["dx"], q["dy"], q["dz"], q["h"] = self.var(step.vary)
            q["side"] = part.side
            if step.grow is not None:
                f = step.grow(q)
            q["f"] = f
            if step.when is not None and not step.when(q):
                continue
            fx, fy, fa, fb, fang = step.geometry
            cx, cy, a, b, ang = fx(q), fy(q), fa(q), fb(q), fang(q)
            if part.min_size is not None and not (a > part.min_size and b > part.min_size):
                continue
            shape = Shape(part.name, cx, cy, a, b, ang, self.hu(part.tissue) + part.dhu, part.p, part.label)
            out.append(shape)
            drawn[part.name] = (shape, f)
        return out
