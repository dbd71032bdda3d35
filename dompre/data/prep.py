"""CT volume -> network inputs with MONAI transforms: HU window, body crop, resize, 3-slice stacks.

The small public functions (:func:`window_hu`, :func:`crop_body`, :func:`resize_slices`,
:func:`resample_z`, :func:`make_stacks`) are reused for DeepLesion lesion inputs; :func:`prepare_volume`
chains them for a whole series. Slices are handled channel-first, (z, y, x), so one MONAI call transforms
every slice of a volume with the same crop box.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from monai.transforms import CropForeground, Resize, ScaleIntensityRange, SpatialPad
from scipy import ndimage


@dataclass(frozen=True)
class PrepConfig:
    """How a CT volume becomes inputs (the ``prep`` section of an ingest recipe)."""
    window: tuple[float, float] = (-1024.0, 3071.0)   # HU mapped to 0..255, clipped outside (LesaNet default)
    window_source: Literal["fixed", "series"] = "fixed"  # "series": the series' own DICOM window when present
    body_threshold: float = -500.0     # HU above which a voxel may belong to the body
    crop_margin: int = 4               # pixels kept around the body box
    crop: bool = True                  # crop to the body (largest connected component) before resizing
    size: int = 256                    # output height = width
    keep_aspect: bool = False          # resize the longest side to `size` and pad the other with 0 (black)
    stride: int = 3                    # slices between the first slices of consecutive stacks (3 = no overlap)
    slice_interval: float | None = None  # resample along z to this interval in mm before stacking (None: keep)
    min_slices: int = 50               # volumes with fewer slices are skipped (seed paper: more than 50)

    def __post_init__(self) -> None:
        lo, hi = self.window
        if not hi > lo:
            raise ValueError(f"prep.window {self.window!r}: high must exceed low, e.g. [-1024, 3071]")
        for name in ("size", "stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"prep.{name} = {getattr(self, name)!r} must be >= 1")
        if self.crop_margin < 0 or self.min_slices < 1:
            raise ValueError("prep.crop_margin must be >= 0 and prep.min_slices >= 1")
        if self.slice_interval is not None and self.slice_interval <= 0:
            raise ValueError(f"prep.slice_interval = {self.slice_interval!r} must be > 0 mm or null")


def _np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def window_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU -> float32 in [0, 255]: ``window[0]`` -> 0, ``window[1]`` -> 255, clipped outside.

    The same map as ``ScaleIntensityRange(lo, hi, 0, 255, clip=True)`` (a test checks they agree), fused
    into one multiply-add and an in-place clip: on a full-resolution volume MONAI's chain of array
    temporaries cost as much as decoding the DICOM files (see tools/bench_ingest.py).
    """
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window {window!r}: high must exceed low")
    hu = _np(hu)
    scale = np.float32(255.0 / (hi - lo))
    out = np.multiply(hu, scale, dtype=np.float32)
    out -= np.float32(lo) * scale
    return np.clip(out, 0.0, 255.0, out=out)


def window_hu_monai(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """:func:`window_hu` through MONAI ``ScaleIntensityRange`` (reference implementation)."""
    return _np(ScaleIntensityRange(float(window[0]), float(window[1]), 0.0, 255.0, clip=True)(hu)).astype(
        np.float32, copy=False)


def body_mask_fn(threshold: float = -500.0) -> Callable[[np.ndarray], np.ndarray]:
    """A ``CropForeground`` select_fn: the largest connected component of (any slice > threshold).

    The mask is computed on the projection over channels (slices), so one box serves the whole stack;
    the table and air outside the body fall away when they do not touch the body. With no voxel above
    the threshold the whole image is kept. The mask has shape (1, y, x), which ``CropForeground`` accepts.
    """
    def select(img) -> np.ndarray:
        arr = _np(img)
        proj = arr.max(axis=0) > threshold  # one pass, no volume-sized mask (HU data hold no NaN)
        lab, n = ndimage.label(proj)
        if n == 0:
            return np.ones((1,) + arr.shape[1:], dtype=bool)
        counts = np.bincount(lab.ravel())
        counts[0] = 0
        return (lab == int(np.argmax(counts)))[None]  # (1, y, x): MONAI reduces over channels anyway
    return select


def crop_box(hu: np.ndarray, threshold: float = -500.0, margin: int = 4) -> tuple[int, int, int, int]:
    """The body box (y0, y1, x0, x1) of a (z, y, x) HU volume, as :func:`crop_body` would cut it."""
    start, end = _cropper(threshold, margin).compute_bounding_box(hu)
    return int(start[0]), int(end[0]), int(start[1]), int(end[1])


def _cropper(threshold: float, margin: int) -> CropForeground:
    return CropForeground(select_fn=body_mask_fn(threshold), margin=margin, allow_smaller=True)


def crop_body(hu: np.ndarray, threshold: float = -500.0, margin: int = 4) -> np.ndarray:
    """Crop a (z, y, x) HU volume to the body (``CropForeground`` with :func:`body_mask_fn`)."""
    if hu.ndim != 3:
        raise ValueError(f"crop_body expects (z, y, x), got shape {hu.shape}")
    return _np(_cropper(threshold, margin)(hu))


def resize_slices(x: np.ndarray, size: int = 256, keep_aspect: bool = False) -> np.ndarray:
    """Resize (z, h, w) to (z, size, size) with ``Resize`` (area); keep_aspect pads the short side with 0."""
    if x.ndim != 3:
        raise ValueError(f"resize_slices expects (z, h, w), got shape {x.shape}")
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    if keep_aspect:
        t = SpatialPad((size, size), mode="constant")(Resize(size, size_mode="longest", mode="area")(t))
    else:
        t = Resize((size, size), mode="area")(t)
    return _np(t.as_tensor() if hasattr(t, "as_tensor") else t)


def resample_z(x: np.ndarray, z: np.ndarray, interval: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling along axis 0 to positions ``z[0], z[0]+interval, ...``; returns (volume, new z)."""
    z = np.asarray(z, dtype=np.float64)
    new_z = np.arange(z[0], z[-1] + 1e-6, interval)
    pos = np.interp(new_z, z, np.arange(len(z)))
    i0 = np.clip(np.floor(pos).astype(int), 0, len(z) - 1)
    i1 = np.clip(i0 + 1, 0, len(z) - 1)
    w = (pos - i0).astype(np.float32)[:, None, None]
    return x[i0] * (1 - w) + x[i1] * w, new_z


def make_stacks(slices: np.ndarray, stride: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(z, h, w) -> stacks (n, 3, h, w) of consecutive slices starting every ``stride``; returns (stacks, center z index)."""
    starts = np.arange(0, slices.shape[0] - 2, stride)
    if starts.size == 0:
        return np.empty((0, 3) + slices.shape[1:], slices.dtype), np.empty(0, np.int64)
    idx = starts[:, None] + np.arange(3)
    return slices[idx], starts + 1


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round [0, 255] floats to uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


_BLOCK = 16  # slices windowed and resized together by prepare_volume


def prepare_volume(hu: np.ndarray, spacing: tuple[float, float, float], cfg: PrepConfig = PrepConfig(), *,
                   z: np.ndarray | None = None, window: tuple[float, float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A (z, y, x) HU volume -> (stacks uint8 (n, 3, size, size), z_index of each stack's middle slice).

    Args:
        hu: float HU volume, z-ordered.
        spacing: (z, y, x) mm; with ``z`` not given, slices are ``spacing[0]`` apart.
        cfg: the preparation settings.
        z: slice positions in mm, used by ``cfg.slice_interval`` resampling.
        window: the series' own (low, high) window, used when ``cfg.window_source == "series"``.

    Returns:
        stacks and, per stack, the index of its middle slice in ``hu`` (float64; fractional after
        resampling). ``np.interp(z_index, arange(len(z)), z)`` gives its position in mm.
    """
    n = hu.shape[0]
    z = np.arange(n) * float(spacing[0]) if z is None else np.asarray(z, dtype=np.float64)
    if hu.ndim != 3:
        raise ValueError(f"prepare_volume expects (z, y, x), got shape {hu.shape}")
    if cfg.crop:  # a view of the body box: only body pixels are windowed and resized
        y0, y1, x0, x1 = crop_box(hu, cfg.body_threshold, cfg.crop_margin)
        hu = hu[:, y0:y1, x0:x1]
    win = window if (cfg.window_source == "series" and window is not None) else cfg.window
    x = np.empty((n, cfg.size, cfg.size), np.float32)
    for i in range(0, n, _BLOCK):  # per block of slices: temporaries stay small and in cache
        x[i:i + _BLOCK] = resize_slices(window_hu(hu[i:i + _BLOCK], win), cfg.size, cfg.keep_aspect)
    grid = np.arange(n, dtype=np.float64)
    if cfg.slice_interval is not None and n > 1:
        x, new_z = resample_z(x, z, cfg.slice_interval)
        grid = np.interp(new_z, z, grid)
    stacks, center = make_stacks(to_uint8(x), cfg.stride)
    return stacks, grid[center]
