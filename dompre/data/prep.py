"""CT volume -> network inputs: body crop (MONAI ``CropForeground``), HU window, 3-slice stacks, resize; and
the stored uint8 input -> the model's normalized float input (:class:`InputPrep`).

ONE preparation for every input: :func:`prepare_stack` turns three consecutive HU slices into one uint8 input
(body box of those three slices, HU window, resize); :func:`prepare_volume` applies it to every 3-slice stack of
a series (DICOM ingest, explanations) and DeepLesion lesion inputs call it on the key slice and its
neighbours. So a labeled and an unlabeled input of the same anatomy are the same array (tested on one phantom
written both ways). Stacks are resized as uint8 images (torchvision's vectorised path): resizing float slices
cost more than decoding the DICOM files (see tools/bench_ingest.py). :class:`InputPrep` is the last step, run on
the accelerator at training, pseudo-labeling, fine-tuning, feature extraction and explanation time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torchvision.transforms.v2 import functional as TF
from monai.transforms import CropForeground, ScaleIntensityRange, SpatialPad
from scipy import ndimage

from dompre.errors import UserError

_BLOCK = 18  # slices windowed (and 3-slice stacks resized) together: temporaries stay small and in cache


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
            raise UserError(f"prep.window {self.window!r}: high must exceed low, e.g. [-1024, 3071]")
        for name in ("size", "stride"):
            if getattr(self, name) < 1:
                raise UserError(f"prep.{name} = {getattr(self, name)!r} must be >= 1")
        if self.crop_margin < 0 or self.min_slices < 1:
            raise UserError("prep.crop_margin must be >= 0 and prep.min_slices >= 1")
        if self.slice_interval is not None and self.slice_interval <= 0:
            raise UserError(f"prep.slice_interval = {self.slice_interval!r} must be > 0 mm or null")


def _np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def window_hu(hu: np.ndarray, window: tuple[float, float],
              rescale: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """HU -> float32 in [0, 255]: ``window[0]`` -> 0, ``window[1]`` -> 255, clipped outside.

    The same map as ``ScaleIntensityRange(lo, hi, 0, 255, clip=True)`` (a test checks they agree), fused
    into one multiply-add and an in-place clip: on a full-resolution volume MONAI's chain of array
    temporaries cost as much as decoding the DICOM files (see tools/bench_ingest.py). With ``rescale``
    = per-slice (slope, intercept), ``hu`` holds stored values and the rescale is folded into the same pass.
    """
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise UserError(f"window {window!r}: high must exceed low")
    gain = np.float32(255.0 / (hi - lo))
    if rescale is None:
        a, b = gain, -np.float32(lo) * gain
    else:
        slope, inter = (np.asarray(r, np.float32)[:, None, None] for r in rescale)
        a, b = slope * gain, (inter - np.float32(lo)) * gain
    out = np.multiply(_np(hu), a, dtype=np.float32)
    out += b
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


def resize_stacks(x: np.ndarray, size: int = 256, keep_aspect: bool = False) -> np.ndarray:
    """Resize uint8 stacks (n, c, h, w), c <= 4 (3 slices), to (n, c, size, size): bilinear with antialiasing,
    through torchvision's vectorised uint8 path (the filter PIL uses; several times faster than resizing floats).

    ``keep_aspect`` resizes the longest side to ``size`` and pads the other with 0 (black) on both sides, as
    MONAI ``Resize(size_mode="longest")`` + ``SpatialPad`` would.
    """
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"resize_stacks expects uint8 (n, c, h, w), got {x.dtype} {x.shape}")
    n, c, h, w = x.shape
    nh, nw = (size, size) if not keep_aspect else (int(round(h * size / max(h, w))), int(round(w * size / max(h, w))))
    t = torch.from_numpy(np.ascontiguousarray(x))
    if (nh, nw) != (h, w):
        t = TF.resize(t, [nh, nw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if (nh, nw) != (size, size):
        t = SpatialPad((size, size), mode="constant")(t.reshape(n * c, nh, nw)).reshape(n, c, size, size)
    return _np(t.as_tensor() if hasattr(t, "as_tensor") else t.contiguous())


def resample_z(x: np.ndarray, z: np.ndarray, interval: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling along axis 0 to positions ``z[0], z[0]+interval, ...``; returns (volume, new z).
    The volume keeps its dtype (integers are rounded); work goes in blocks, so temporaries stay small."""
    z = np.asarray(z, dtype=np.float64)
    new_z = np.arange(z[0], z[-1] + 1e-6, interval)
    pos = np.interp(new_z, z, np.arange(len(z)))
    i0 = np.clip(np.floor(pos).astype(int), 0, len(z) - 1)
    i1 = np.clip(i0 + 1, 0, len(z) - 1)
    w = (pos - i0).astype(np.float32)[:, None, None]
    out = np.empty((len(new_z),) + x.shape[1:], x.dtype)
    for j in range(0, len(new_z), _BLOCK):
        b = slice(j, j + _BLOCK)
        v = x[i0[b]] * (1 - w[b]) + x[i1[b]] * w[b]
        out[b] = np.rint(v) if np.issubdtype(x.dtype, np.integer) else v
    return out, new_z


def _stack_index(n: int, stride: int) -> np.ndarray:
    """(stacks, 3) slice indices of non-overlapping (stride 3) or strided 3-slice stacks of n slices."""
    return np.arange(0, max(n - 2, 0), stride)[:, None] + np.arange(3)


def make_stacks(slices: np.ndarray, stride: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(z, h, w) -> stacks (n, 3, h, w) of consecutive slices starting every ``stride``; returns (stacks, center z index)."""
    idx = _stack_index(slices.shape[0], stride)
    return slices[idx], idx[:, 1]


def prepare_stack(hu: np.ndarray, cfg: PrepConfig = PrepConfig(), *, window: tuple[float, float] | None = None
                  ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """ONE input from three consecutive HU slices (3, y, x): body box, window, resize -> (uint8 (3, size, size), box).

    Every source goes through this function: DICOM series (:func:`prepare_volume`, once per 3-slice stack) and
    DeepLesion lesions (the key slice and its neighbours), so labeled and unlabeled inputs differ only in whether
    a label is known. The body box is the largest connected component above ``cfg.body_threshold`` of the
    projection over the three slices (MONAI ``CropForeground``, ``cfg.crop_margin`` pixels around it): one box
    per input, so an input holds as much body as its own slices do. ``window`` is the series' own DICOM window,
    used when ``cfg.window_source == "series"``. The box is (y0, y1, x0, x1) in the slices' pixels.
    """
    if hu.ndim != 3 or hu.shape[0] != 3:
        raise ValueError(f"prepare_stack expects three slices (3, y, x), got shape {hu.shape}")
    box = crop_box(hu, cfg.body_threshold, cfg.crop_margin) if cfg.crop else (0, hu.shape[1], 0, hu.shape[2])
    y0, y1, x0, x1 = box
    win = window if (cfg.window_source == "series" and window is not None) else cfg.window
    x = window_hu(hu[:, y0:y1, x0:x1], win)
    u8 = np.rint(x, out=x).astype(np.uint8)
    return resize_stacks(u8[None], cfg.size, cfg.keep_aspect)[0], box


def prepare_volume(hu: np.ndarray, spacing: tuple[float, float, float], cfg: PrepConfig = PrepConfig(), *,
                   z: np.ndarray | None = None, window: tuple[float, float] | None = None,
                   rescale: tuple[np.ndarray, np.ndarray] | None = None,
                   alloc: Callable[..., np.ndarray] = np.empty, boxes: list | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A (z, y, x) HU volume -> (stacks uint8 (n, 3, size, size), z_index of each stack's middle slice).

    Slices ``k-1, k, k+1`` (``k`` every ``cfg.stride`` slices) become one input through :func:`prepare_stack`,
    each with its own body box.

    Args:
        hu: HU volume, z-ordered; or, with ``rescale``, stored values (``CTVolume.stored``).
        spacing: (z, y, x) mm; with ``z`` not given, slices are ``spacing[0]`` apart.
        cfg: the preparation settings.
        z: slice positions in mm, used by ``cfg.slice_interval`` resampling.
        window: the series' own (low, high) window, used when ``cfg.window_source == "series"``.
        rescale: per-slice (slope, intercept) when ``hu`` holds stored values: HU = stored * slope + intercept,
            made three slices at a time, so no float volume is made (except to resample along z).
        alloc: ``alloc(shape, dtype)`` for the float32 HU of one stack (the ingest job reuses one buffer).
        boxes: a list that receives each stack's body box (y0, y1, x0, x1), in order (provenance).

    Returns:
        stacks and, per stack, the index of its middle slice in ``hu`` (float64; fractional after
        resampling). ``np.interp(z_index, arange(len(z)), z)`` gives its position in mm.
    """
    if hu.ndim != 3:
        raise ValueError(f"prepare_volume expects (z, y, x), got shape {hu.shape}")
    n = hu.shape[0]
    z = np.arange(n) * float(spacing[0]) if z is None else np.asarray(z, dtype=np.float64)
    slope, inter = (None, None) if rescale is None else (np.asarray(r, np.float32) for r in rescale)
    grid = np.arange(n, dtype=np.float64)
    if cfg.slice_interval is not None and n > 1:  # resample HU (not stored values: rescales may differ)
        vol = np.empty(hu.shape, np.float32)
        for i in range(0, n, _BLOCK):
            b = slice(i, i + _BLOCK)
            vol[b] = hu[b] if slope is None else hu[b] * slope[b, None, None] + inter[b, None, None]
        hu, new_z = resample_z(vol, z, cfg.slice_interval)
        grid, slope = np.interp(new_z, z, grid), None
    idx = _stack_index(hu.shape[0], cfg.stride)
    stacks = np.empty((len(idx), 3, cfg.size, cfg.size), np.uint8)
    buf = alloc((3,) + hu.shape[1:], np.float32)
    for i, rows in enumerate(idx):
        if slope is None:
            np.copyto(buf, hu[rows], casting="unsafe")
        else:
            np.multiply(hu[rows], slope[rows, None, None], out=buf, casting="unsafe")
            buf += inter[rows, None, None]
        stacks[i], box = prepare_stack(buf, cfg, window=window)
        if boxes is not None:
            boxes.append(box)
    return stacks, grid[idx[:, 1]]


class InputPrep:
    """uint8 (B, C, H, W) on device -> normalized float input of ``img_size`` (resized on device if needed).

    The one uint8 -> model-input step: pretraining, pseudo-labeling, fine-tuning and feature extraction all use
    it. ``img_size=None`` keeps the input's size; ``scale`` is what pixel value 1.0 of the mean/std means
    (255 for uint8 pixels, 1 for images already in [0, 1], as explanations pass them).
    """

    def __init__(self, img_size: int | None, mean: Sequence[float], std: Sequence[float],
                 channels_last: bool = False, scale: float = 255.0):
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * scale
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * scale
        self.channels_last = channels_last

    @classmethod
    def for_model(cls, model: torch.nn.Module, img_size: int | None, channels_last: bool = False, *,
                  channels: int | None = None, scale: float = 255.0) -> "InputPrep":
        """Mean/std from the model's timm ``pretrained_cfg`` (ImageNet defaults when absent; a model with a
        ``backbone``, e.g. LesaNet, uses its backbone's). ``channels`` different from the config's: every
        channel gets the mean of the configured means and stds (grayscale input to an RGB-normalized model)."""
        cfg = resolve_data_config({}, model=getattr(model, "backbone", model))
        mean, std = list(cfg["mean"]), list(cfg["std"])
        if channels is not None and len(mean) != channels:
            mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
        return cls(img_size, mean, std, channels_last, scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.img_size is not None and (x.shape[-1] != self.img_size or x.shape[-2] != self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
