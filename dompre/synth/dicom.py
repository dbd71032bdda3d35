"""Real CT DICOM files written from a float HU volume (the synthetic cohort's scanner).

``write_dicom_series`` writes a volume as CT Image Storage files (one per slice) or one Enhanced CT Image Storage
file; ``write_scout`` a coronal localizer beside it. Compression uses pydicom 3's own encoders: RLE Lossless
always works (pure Python/numpy); JPEG 2000 Lossless needs ``pylibjpeg-openjpeg`` (installed with dompre);
JPEG-LS would need ``pyjpegls`` (not a dompre dependency) and JPEG Lossless (process 14) has no pydicom encoder at
all, so those two raise a ValueError naming the missing encoder. Every file is written atomically
(:func:`dompre._io.atomic_open`, without an fsync each: the files are many and regenerable).

Geometry: ``hu[k]`` is the slice at ImagePositionPatient ``origin + (0, 0, k * spacing[0])`` with
ImageOrientationPatient ``1\\0\\0\\0\\1\\0`` (axial, LPS: columns run to the patient's left, rows to posterior),
so sorting the files by position along the slice normal gives back ``hu`` in index order.
"""
from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    generate_uid,
)

from dompre._io import atomic_open

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
UNSIGNED_INTERCEPT = -1024.0
_STUDY_DATE = datetime.date(2020, 1, 6)

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "derive_uid",
    "stored_values",
    "write_dicom_series",
    "write_scout",
]


def derive_uid(*parts: object) -> str:
    """A DICOM UID that is a pure function of ``parts`` (pydicom's hashed-entropy UID)."""
    return generate_uid(entropy_srcs=["dompre-synth", *(str(p) for p in parts)])


def stored_values(hu: np.ndarray, unsigned: bool = False) -> tuple[np.ndarray, float, int]:
    """HU -> (stored integers, RescaleIntercept, BitsStored) exactly as ``write_dicom_series`` stores them.

    Signed storage is ``int16(round(hu))`` with intercept 0; unsigned is ``uint16(round(hu) + 1024)`` with
    intercept -1024 (HU below -1024 clip to -1024). BitsStored is the smallest of 12..16 that holds the data.
    """
    r = np.rint(np.asarray(hu, dtype=np.float64))
    if unsigned:
        v = np.clip(r - UNSIGNED_INTERCEPT, 0, 65535).astype(np.uint16)
        hi = int(v.max()) if v.size else 0
        bits = next(b for b in range(12, 17) if hi < 2**b)
        return v, UNSIGNED_INTERCEPT, bits
    v = np.clip(r, -32768, 32767).astype(np.int16)
    lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
    bits = next(b for b in range(12, 17) if -(2 ** (b - 1)) <= lo and hi < 2 ** (b - 1))
    return v, 0.0, bits


def _uid_source(rng: np.random.Generator | None, *parts: object) -> str:
    if rng is None:
        return generate_uid()
    return derive_uid(int(rng.integers(2**63)), *parts)


def _base_dataset(sop_class: UID, sop_uid: str, transfer_syntax: UID) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def _fill_common(ds: Dataset, *, patient_id: str, study_uid: str, series_uid: str, frame_uid: str,
                 body_part: str, series_number: int, description: str) -> None:
    """Patient / study / series / equipment modules shared by slices, scouts and enhanced files."""
    date = _STUDY_DATE.strftime("%Y%m%d")
    ds.PatientName = f"SYNTH^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC CT"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "dompre"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.KVP = 120
    ds.ConvolutionKernel = "STANDARD"


def _fill_pixels(ds: Dataset, values: np.ndarray, intercept: float, bits: int, frames: int = 1) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(values.shape[-2]), int(values.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if values.dtype == np.int16 else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    else:
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(values).tobytes()


def _save(ds: FileDataset, path: Path, transfer_syntax: UID | None) -> None:
    """Compress ``ds`` (if asked) and write it to ``path`` atomically."""
    if transfer_syntax is not None and transfer_syntax != ExplicitVRLittleEndian:
        try:
            ds.compress(transfer_syntax, generate_instance_uid=False)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            raise ValueError(
                f"cannot encode {path.name} with transfer syntax {transfer_syntax} ({transfer_syntax.name}): "
                f"{e}; use pydicom.uid.RLELossless (always available) or JPEG2000Lossless "
                "(needs pylibjpeg-openjpeg)") from e
    with atomic_open(path, fsync=False) as f:  # one of thousands of regenerable slices: see dompre._io
        ds.save_as(f, enforce_file_format=True)


def _ds(values: Sequence[float]) -> list[str]:
    return [f"{float(v):.6g}" for v in values]


def write_dicom_series(
    folder: str | Path,
    hu: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    patient_id: str = "P0000",
    study_uid: str | None = None,
    series_uid: str | None = None,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    body_part: str = "CHEST",
    window: Sequence[float] = (40, 400),
    unsigned: bool = False,
    shuffle_instance: bool = False,
    transfer_syntax: str | UID | None = None,
    multiframe: bool = False,
    rng: np.random.Generator | None = None,
    series_number: int = 2,
    description: str = "AXIAL",
) -> list[Path]:
    """Write a float HU volume as a real CT DICOM series.

    Args:
        folder: output folder (created); slice files are ``IM0001.dcm`` ... in slice order.
        hu: HU volume ``(z, y, x)``; stored rounded to integers (see :func:`stored_values`).
        spacing: ``(z, y, x)`` voxel spacing in mm; z is SliceThickness and the slice interval.
        patient_id, study_uid, series_uid: identifiers; missing UIDs are derived from ``rng``
            (deterministic) or random when ``rng`` is None.
        origin: ImagePositionPatient ``(x, y, z)`` in mm of the first voxel of slice 0.
        body_part: BodyPartExamined.
        window: ``(center, width)`` in HU for WindowCenter / WindowWidth.
        unsigned: store uint16 with RescaleIntercept -1024 instead of int16 with intercept 0.
        shuffle_instance: InstanceNumber follows a random permutation (a scanner quirk); file names and
            positions stay in slice order.
        transfer_syntax: e.g. ``pydicom.uid.RLELossless`` or ``JPEG2000Lossless`` to compress; None writes
            Explicit VR Little Endian.
        multiframe: write one Enhanced CT Image Storage file ``IM0001.dcm`` with per-frame functional groups.
        rng: numpy Generator for UIDs and the instance shuffle.
        series_number, description: SeriesNumber and SeriesDescription.

    Returns:
        The written file paths.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"write_dicom_series: hu must be a non-empty (z, y, x) volume, got shape {hu.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"write_dicom_series: spacing must be three positive mm values (z, y, x), got {spacing}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ts = UID(str(transfer_syntax)) if transfer_syntax is not None else None
    study_uid = study_uid or _uid_source(rng, patient_id, "study")
    series_uid = series_uid or _uid_source(rng, patient_id, "series")
    frame_uid = derive_uid(study_uid, "frame-of-reference")
    values, intercept, bits = stored_values(hu, unsigned)
    common = dict(patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid,
                  body_part=body_part, series_number=series_number, description=description)
    dz, dy, dx = (float(s) for s in spacing)
    positions = [(float(origin[0]), float(origin[1]), float(origin[2]) + k * dz) for k in range(hu.shape[0])]
    if multiframe:
        path = folder / "IM0001.dcm"
        ds = _base_dataset(ENHANCED_CT_IMAGE_STORAGE, derive_uid(series_uid, "enhanced"), ExplicitVRLittleEndian)
        _fill_common(ds, **common)
        _fill_enhanced(ds, values, intercept, bits, positions, (dy, dx), dz, window)
        _save(ds, path, ts)
        return [path]
    order = np.arange(hu.shape[0])
    if shuffle_instance:
        order = (rng or np.random.default_rng()).permutation(hu.shape[0])
    ds = _slice_template(common, dy, dx, dz, window)
    paths = []
    for k in range(hu.shape[0]):  # one template, only the per-slice tags change (uncompressed writes)
        path = folder / f"IM{k + 1:04d}.dcm"
        if ts is not None:  # compression rewrites the dataset in place: start each slice afresh
            ds = _slice_template(common, dy, dx, dz, window)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derive_uid(series_uid, "slice", k)
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = _ds(positions[k])
        ds.SliceLocation = f"{positions[k][2]:.6g}"
        _fill_pixels(ds, values[k], intercept, bits)
        _save(ds, path, ts)
        paths.append(path)
    return paths


def _slice_template(common: dict, dy: float, dx: float, dz: float, window: Sequence[float]) -> FileDataset:
    """CT Image Storage dataset with everything but the per-slice tags and pixels."""
    ds = _base_dataset(CT_IMAGE_STORAGE, "", ExplicitVRLittleEndian)
    _fill_common(ds, **common)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = _ds((1, 0, 0, 0, 1, 0))
    ds.PixelSpacing = _ds((dy, dx))
    ds.SliceThickness = ds.SpacingBetweenSlices = f"{dz:.6g}"
    ds.WindowCenter, ds.WindowWidth = f"{window[0]:.6g}", f"{window[1]:.6g}"
    return ds


def _fill_enhanced(ds: FileDataset, values: np.ndarray, intercept: float, bits: int,
                   positions: list[tuple[float, float, float]], pixel_spacing: tuple[float, float],
                   thickness: float, window: Sequence[float]) -> None:
    """Enhanced CT image modules: shared orientation, per-frame position / measures / rescale groups."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ImagePositionPatient = _ds(positions[0])  # convenience copy; readers use the per-frame groups
    orient = Dataset()
    orient.ImageOrientationPatient = _ds((1, 0, 0, 0, 1, 0))
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = f"{window[0]:.6g}", f"{window[1]:.6g}"
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.FrameVOILUTSequence = DicomSequence([voi])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k, pos in enumerate(positions):
        plane, measures, rescale, content, ftype = Dataset(), Dataset(), Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = _ds(pos)
        measures.PixelSpacing = _ds(pixel_spacing)
        measures.SliceThickness = f"{thickness:.6g}"
        measures.SpacingBetweenSlices = f"{thickness:.6g}"
        rescale.RescaleIntercept = f"{intercept:.6g}"
        rescale.RescaleSlope = "1"
        rescale.RescaleType = "HU"
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        ftype.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([plane])
        item.PixelMeasuresSequence = DicomSequence([measures])
        item.PixelValueTransformationSequence = DicomSequence([rescale])
        item.FrameContentSequence = DicomSequence([content])
        item.CTImageFrameTypeSequence = DicomSequence([ftype])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    dim_uid = derive_uid(ds.SeriesInstanceUID, "dimension")
    dims = []
    for pointer, group in (("StackID", "FrameContentSequence"), ("InStackPositionNumber", "FrameContentSequence")):
        d = Dataset()
        d.DimensionOrganizationUID = dim_uid
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = group
        dims.append(d)
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = DicomSequence([org])
    ds.DimensionIndexSequence = DicomSequence(dims)
    _fill_pixels(ds, values, intercept, bits, frames=len(positions))


def write_scout(
    folder: str | Path,
    hu: np.ndarray,
    *,
    spacing: Sequence[float],
    patient_id: str,
    study_uid: str,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    body_part: str = "CHEST",
    rng: np.random.Generator | None = None,
    name: str = "SC0001.dcm",
) -> Path:
    """Write a coronal localizer (ImageType ``ORIGINAL\\PRIMARY\\LOCALIZER``) projected from ``hu``.

    The scout gets its own SeriesInstanceUID (SeriesNumber 1) but may share the axial series' folder, as
    real exports do. Its pixels are the mean attenuation along the antero-posterior axis, head at the top.
    """
    hu = np.asarray(hu, dtype=np.float32)
    dz, dy, dx = (float(s) for s in spacing)
    proj = np.clip(hu + 1000.0, 0, None).mean(axis=1)[::-1] - 1000.0  # (z, x), superior row first
    values, intercept, bits = stored_values(proj, unsigned=False)
    series_uid = _uid_source(rng, patient_id, "scout")
    ds = _base_dataset(CT_IMAGE_STORAGE, derive_uid(series_uid, "scout"), ExplicitVRLittleEndian)
    _fill_common(ds, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
                 frame_uid=derive_uid(study_uid, "frame-of-reference"), body_part=body_part,
                 series_number=1, description="SCOUT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = 1
    top = float(origin[2]) + (hu.shape[0] - 1) * dz
    ds.ImagePositionPatient = _ds((origin[0], origin[1] + hu.shape[1] * dy / 2, top))
    ds.ImageOrientationPatient = _ds((1, 0, 0, 0, 0, -1))
    ds.PixelSpacing = _ds((dz, dx))
    ds.SliceThickness = f"{hu.shape[1] * dy:.6g}"
    ds.WindowCenter, ds.WindowWidth = "-200", "1200"
    _fill_pixels(ds, values, intercept, bits)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    _save(ds, path, None)
    return path
