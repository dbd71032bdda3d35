"""One parse per DICOM file: the header values dompre needs, and where native pixel data lie.

A scan of an archive reads every header once (:func:`scan_file`). For Part 10 files in Explicit or Implicit
VR Little Endian (and the compressed syntaxes, whose headers are Explicit VR Little Endian), which is
nearly all CT, a small parser walks the top-level elements up to Pixel Data
with ``struct`` over one read of the file's first kilobytes: pydicom's ``dcmread(stop_before_pixels=True)``
spends about 10 µs of Python per element, which made the scan the costliest step of ingest. Anything the
parser does not handle exactly (no preamble, big endian, deflate, non-ASCII text, a wanted value with an
unexpected VR, elements out of order, a truncated header) goes to pydicom instead; tests check that both
paths give identical headers on pydicom's own test files, and ``tools/fuzz_dicom.py`` checks it on mutated ones.

Nothing in a file is trusted: every length is compared with the file's size before anything is read or
allocated (pydicom's own reads go through :class:`SizedFile`, which never asks for more than the file
holds), the pixel data a header claims (Rows x Columns x frames x bits) must fit in the file, and a file
that is not usable DICOM gives a reason (:func:`scan_file`) or :class:`SeriesError` (:func:`read_header`),
never another exception.
"""
from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from struct import unpack_from
from typing import Any, Callable

import numpy as np
import pydicom
import pydicom.charset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

_KEYS = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "SeriesDescription", "BodyPartExamined",
         "NumberOfFrames", "SOPInstanceUID", "ImageType", "ImagePositionPatient", "ImageOrientationPatient",
         "InstanceNumber", "RescaleSlope", "RescaleIntercept", "PixelSpacing", "WindowCenter", "WindowWidth", "Rows",
         "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel")
_TAG = {k: tag_for_keyword(k) for k in _KEYS}
_WANTED = {t: (k, dictionary_VR(t).encode()) for k, t in _TAG.items()}
_LONG_VR = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_CHUNK = 16384
_VRS = frozenset(v.encode() for v in ("AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV "
                                      "TM UC UI UL UN UR US UT UV").split())
_MAX_ELEMENTS = 100_000   # top-level elements before Pixel Data; real CT headers hold a few hundred
_MAX_DEPTH = 32           # nested undefined-length sequences the parser walks (deeper: pydicom, then a reason)


class SeriesError(ValueError):
    """A file or series that cannot be used; ``str(e)`` is the reason written to the ingest report."""


class SizedFile(io.BufferedReader):
    """A file opened for reading whose ``read(n)`` never asks for more than what is left in it: pydicom reads
    an element's value with one ``read(length)``, and a buffered read allocates ``length`` bytes before it
    reads, so a length field of 4 GiB in a 40 KB file would allocate 4 GiB. Results are those of a plain read."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(io.FileIO(path, "rb"), 65536)
        self.size = os.fstat(self.raw.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n > 65536:  # smaller reads allocate no more than the buffer anyway
            n = min(n, max(self.size - self.tell(), 0))
            if n == 0:
                return b""
        return super().read(n)


@dataclass(slots=True)
class FileHeader:
    """Everything one header parse of a file gives: its series keys, the slice's geometry and rescale, and
    where its pixel data lie when they are native (uncompressed little-endian), so that reading a series
    never parses a header a second time. Values are None where the tag is absent or unreadable."""
    series_uid: str
    study_uid: str = ""
    patient: str = ""
    modality: str = ""
    description: str = ""
    body_part: str = ""
    frames: int = 1
    sop_uid: str = ""
    localizer: bool = False
    position: tuple[float, ...] | None = None       # ImagePositionPatient
    orientation: tuple[float, ...] | None = None    # ImageOrientationPatient
    instance: int = 0
    slope: float | str | None = None                # a string when the value is not a number
    intercept: float | str | None = None
    pixel_spacing: tuple[float, ...] | None = None
    window: tuple[float, float] | None = None       # (low, high) HU from the first WindowCenter/Width
    signed: bool | None = False                     # PixelRepresentation 1; None when absent
    native: tuple[int, str, int, int, int] | None = None  # (offset, dtype, rows, cols, bits stored) of raw pixels

    @property
    def multiframe(self) -> bool:
        return self.frames > 1


class _Fallback(Exception):
    """This file is left to pydicom."""


class _Window:
    """Bytes of an open file by absolute position, read in chunks (elements that are skipped are never read)."""

    def __init__(self, f, size: int) -> None:
        self.f, self.base, self.buf, self.size = f, 0, f.read(_CHUNK), size

    def get(self, pos: int, n: int) -> bytes:
        if pos + n > self.size:
            raise EOFError
        if pos < self.base or pos + n > self.base + len(self.buf):
            self.f.seek(pos)
            self.base, self.buf = pos, self.f.read(max(n, _CHUNK))
            if len(self.buf) < n:
                raise EOFError
        return self.buf[pos - self.base:pos - self.base + n]


def _element(w: _Window, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, header length) of the element at ``pos``."""
    group, elem, rest = unpack_from("<HHI", w.get(pos, 8))
    tag = group << 16 | elem
    if tag in (_ITEM, _ITEM_END, _SEQ_END) or not explicit:
        return tag, None, rest, 8
    vr = w.get(pos + 4, 2)
    if vr not in _VRS:  # pydicom guesses (implicit switch, 2-byte length); so does it here
        raise _Fallback
    if vr in _LONG_VR:
        return tag, vr, unpack_from("<I", w.get(pos + 8, 4))[0], 12
    return tag, vr, unpack_from("<H", w.get(pos + 6, 2))[0], 8


def _skip_items(w: _Window, pos: int, explicit: bool) -> int:
    """The position after an undefined-length sequence (or encapsulated data) whose first item is at ``pos``;
    nested undefined-length sequences are walked with a stack of at most ``_MAX_DEPTH`` levels."""
    depth, in_item = 1, [False]  # per open sequence: inside an item of undefined length?
    while True:
        tag, vr, length, hdr = _element(w, pos, explicit)
        if not in_item[-1]:  # between the items of a sequence
            pos += 8
            if tag == _SEQ_END:
                depth -= 1
                in_item.pop()
                if depth == 0:
                    return pos
                continue
            if tag != _ITEM:
                raise _Fallback
            if length == _UNDEFINED:
                in_item[-1] = True
            else:
                pos += length
            continue
        if tag == _ITEM_END:  # inside an item of undefined length: its elements, up to the item delimiter
            pos += 8
            in_item[-1] = False
        elif length == _UNDEFINED:
            if vr == b"UN" or depth >= _MAX_DEPTH:  # UN: its content is Implicit VR whatever the file's syntax
                raise _Fallback
            pos += hdr
            depth += 1
            in_item.append(False)
        else:
            pos += hdr + length


def _check_charset(w: _Window, pos: int, vr: bytes | None, length: int, hdr: int) -> None:
    """Leave the file to pydicom unless its Specific Character Set is one pydicom accepts."""
    if vr not in (None, b"CS") or length == _UNDEFINED or length > 1024:
        raise _Fallback
    try:
        text = w.get(pos + hdr, length).decode("ascii")
        pydicom.charset.convert_encodings([t.strip(" \x00") for t in text.split("\\")])
    except Exception:  # noqa: BLE001 - whatever pydicom makes of it, it is pydicom's to decide
        raise _Fallback from None


def _parse(f, size: int) -> tuple[dict[str, bytes], str, bool, int | None, bytes]:
    """(wanted values as raw bytes, transfer syntax, implicit VR?, position of Pixel Data or None, its first 12
    bytes) of a file of ``size`` bytes. Raises _Fallback (or EOFError) for anything pydicom should decide."""
    w = _Window(f, size)
    if w.get(128, 4) != b"DICM":
        raise _Fallback
    pos, ts = 132, ""
    while pos + 8 <= size and w.get(pos, 2) == b"\x02\x00":  # file meta: group 0002, Explicit VR Little Endian
        tag, vr, length, hdr = _element(w, pos, True)
        if length == _UNDEFINED or pos + hdr + length > size:
            raise _Fallback
        if tag == 0x00020010:
            ts = w.get(pos + hdr, length).rstrip(b"\x00 ").decode("ascii", "replace")
        pos += hdr + length
    uid = UID(ts)  # compressed syntaxes encode the dataset as Explicit VR Little Endian: parsed here too
    if not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian:
        raise _Fallback
    explicit, values, last = not uid.is_implicit_VR, {}, -1
    if pos + 6 <= size:  # pydicom's own check of the first element: a VR where the syntax says none, or none
        raw = w.get(pos + 4, 2)  # where it says one, makes pydicom read the other encoding (with a warning)
        if (0x40 < raw[0] < 0x5B and 0x40 < raw[1] < 0x5B) != explicit:
            raise _Fallback
    for _ in range(_MAX_ELEMENTS):
        if pos == size:  # the end of the file, between elements: no pixel data
            return values, ts, not explicit, None, b""
        tag, vr, length, hdr = _element(w, pos, explicit)  # EOFError: cut inside an element header
        if tag <= last:
            raise _Fallback
        last = tag
        if tag == _PIXEL_DATA:
            return values, ts, not explicit, pos, w.get(pos, 12 if explicit else 8)
        if tag in (0x7FE00008, 0x7FE00009):  # float pixel data: pydicom stops here too
            return values, ts, not explicit, None, b""
        if tag > _PIXEL_DATA:  # pydicom reads on (it does not check the order)
            raise _Fallback
        wanted = _WANTED.get(tag)
        if tag == 0x00080005:  # pydicom decodes the character set first: a broken one fails the whole file
            _check_charset(w, pos, vr, length, hdr)
        if length == _UNDEFINED:
            if wanted or (explicit and vr != b"SQ"):  # UN: Implicit VR content; others: pydicom's own rules
                raise _Fallback
            pos = _skip_items(w, pos + hdr, explicit)
            continue
        if pos + hdr + length > size:  # a value cut by the end of the file: pydicom reads what is there
            raise _Fallback
        if wanted:
            if (explicit and vr != wanted[1]) or length > _CHUNK:  # wanted values are short text
                raise _Fallback
            value = w.get(pos + hdr, length)
            if wanted[1] != b"US" and not value.isascii():  # a character set to decode: pydicom
                raise _Fallback
            values[wanted[0]] = value
        pos += hdr + length
    raise _Fallback


# Values are bytes as stored (both parsers), or Python values where pydicom had to convert them.
def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("ascii").strip(" \x00")
    return "" if v is None else str(v)


def _numbers(v: Any) -> tuple[float, ...] | str | None:
    """A DS/IS value as a tuple of floats; the text itself when it is not numbers; None when absent/empty."""
    if v is None:
        return None
    if isinstance(v, bytes):
        text = v.decode("latin-1").strip(" \x00")
        if not text:
            return None
        try:
            return tuple(float(x) for x in text.split("\\"))
        except ValueError:
            return text
    try:
        return tuple(float(x) for x in (v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v]))
    except (TypeError, ValueError):
        return str(v)


def _us(v: Any) -> int | None:
    if isinstance(v, bytes):
        return int.from_bytes(v[:2], "little") if len(v) >= 2 else None
    return None if v is None else int(v)


def _vector(v: Any, n: int) -> tuple[float, ...] | None:
    return v if isinstance(v, tuple) and len(v) == n else None


def _scalar(v: Any) -> float | str | None:
    return v[0] if isinstance(v, tuple) else v


def _pixels(get: Callable[[str], Any], ts: str, implicit: bool, at: int | None, head: bytes, size: int,
            frames: int) -> tuple[int, str, int, int, int] | None:
    """Check that the pixel data the header claims fit in the file (before anything is allocated for them) and
    return where the raw values of a native single-frame, single-sample image start, from the Pixel Data
    element's own header at ``at``; None for anything pydicom must decode. Raises SeriesError."""
    if at is None or len(head) < 8:
        raise SeriesError("no Pixel Data (not an image, or the file ends before its pixels)")
    rows, cols, bits, stored = (_us(get(k)) for k in ("Rows", "Columns", "BitsAllocated", "BitsStored"))
    samples, rep = _us(get("SamplesPerPixel")), _us(get("PixelRepresentation"))
    if not rows or not cols or not bits:
        raise SeriesError(f"Rows {rows}, Columns {cols}, BitsAllocated {bits}: the image size is missing or 0")
    uid = UID(ts)
    little = not uid.is_transfer_syntax or uid.is_little_endian
    order = "little" if little else "big"
    if implicit:
        length, offset = int.from_bytes(head[4:8], order), at + 8
    elif head[4:6] in _LONG_VR:
        if len(head) < 12:
            raise SeriesError("no Pixel Data (the file ends inside its element header)")
        length, offset = int.from_bytes(head[8:12], order), at + 12
    else:
        length, offset = int.from_bytes(head[6:8], order), at + 8
    left = size - offset
    if length == _UNDEFINED:  # encapsulated: each frame takes one item (8 bytes) at least
        if frames * 8 > left:
            raise SeriesError(f"NumberOfFrames {frames} cannot fit in the {left} bytes of encapsulated pixel data")
        return None
    if length > left:
        raise SeriesError(f"truncated: Pixel Data of {length} bytes at offset {offset} run past the end of the "
                          f"file ({size} bytes)")
    need = (rows * cols * frames * bits + 7) // 8  # a lower bound whatever the samples and their subsampling
    if not uid.is_compressed and need > length:
        raise SeriesError(f"Pixel Data hold {length} bytes, fewer than the {need} that Rows {rows} x Columns "
                          f"{cols} x {frames} frame(s) x BitsAllocated {bits} need")
    if (frames != 1 or ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or bits not in (8, 16, 32)
            or (samples or 1) != 1 or rep not in (0, 1)
            or head[:4] != b"\xe0\x7f\x10\x00" or (not implicit and head[4:6] not in (b"OW", b"OB"))
            or (stored is not None and not 0 < stored <= bits)):
        return None
    dtype = np.dtype(f"<{'i' if rep == 1 else 'u'}{bits // 8}").str
    return offset, dtype, rows, cols, stored if stored else bits


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or np.isfinite(v) else None


def _header(get: Callable[[str], Any], ts: str, implicit: bool, at: int | None, head: bytes,
            size: int) -> FileHeader:
    """The FileHeader of the wanted values ``get(keyword)``; raises SeriesError when the file is no usable image."""
    frames = _scalar(_numbers(get("NumberOfFrames")))
    valid_frames = frames is None or (isinstance(frames, float) and frames >= 1 and frames.is_integer())
    n_frames = int(frames) if valid_frames and frames is not None else 1
    image_type = _text(get("ImageType")).upper().split("\\")
    center, width = _scalar(_numbers(get("WindowCenter"))), _scalar(_numbers(get("WindowWidth")))
    window = (center - width / 2.0, center + width / 2.0) if (
        isinstance(center, float) and isinstance(width, float) and width > 0
        and np.isfinite(center) and np.isfinite(width)) else None
    instance = _finite(_scalar(_numbers(get("InstanceNumber"))))
    rep = _us(get("PixelRepresentation"))
    series_uid = _text(get("SeriesInstanceUID"))
    if not series_uid:
        raise SeriesError("not a DICOM image (no SeriesInstanceUID)")
    native = _pixels(get, ts, implicit, at, head, size, n_frames)
    return FileHeader(
        series_uid=series_uid, study_uid=_text(get("StudyInstanceUID")),
        patient=_text(get("PatientID")), modality=_text(get("Modality")),
        description=_text(get("SeriesDescription")), body_part=_text(get("BodyPartExamined")),
        frames=n_frames, sop_uid=_text(get("SOPInstanceUID")),
        localizer="LOCALIZER" in image_type or "SCOUT" in image_type,
        position=_vector(_numbers(get("ImagePositionPatient")), 3),
        orientation=_vector(_numbers(get("ImageOrientationPatient")), 6),
        instance=int(instance) if isinstance(instance, float) else 0,
        slope=_scalar(_numbers(get("RescaleSlope"))), intercept=_scalar(_numbers(get("RescaleIntercept"))),
        pixel_spacing=_vector(_numbers(get("PixelSpacing")), 2), window=window,
        signed=None if rep is None else rep == 1,
        native=native if valid_frames else None)


def _pydicom_getter(ds: pydicom.Dataset) -> Callable[[str], Any]:
    """Raw bytes where pydicom left them raw, little-endian and ASCII; its converted value otherwise."""
    def get(key: str) -> Any:
        elem = ds.get_item(_TAG[key])
        if elem is None:
            return None
        if isinstance(elem, RawDataElement) and elem.VR is not None and elem.VR != _WANTED[_TAG[key]][1].decode():
            return ds[_TAG[key]].value  # the VR the file declares, as pydicom converts it (or refuses it)
        v = elem.value
        if isinstance(v, bytes) and (getattr(elem, "is_little_endian", True) is False
                                     or (_WANTED[_TAG[key]][1] != b"US" and not v.isascii())):
            return ds[_TAG[key]].value
        return v
    return get


class _Stop:
    """pydicom's ``stop_when``: stop before pixel data (as ``stop_before_pixels`` does), and after
    ``_MAX_ELEMENTS`` top-level elements (a zero-filled file is millions of empty elements)."""

    def __init__(self) -> None:
        self.n, self.tag = 0, None

    def __call__(self, tag: int, vr: Any, length: int) -> bool:
        self.n += 1
        if self.n > _MAX_ELEMENTS:
            raise SeriesError(f"more than {_MAX_ELEMENTS} elements before any pixel data; not a DICOM image")
        t = int(tag)  # pydicom's BaseTag compares in Python: one int() is cheaper
        if t >= 0x7FE00008 and t in (0x7FE00010, 0x7FE00009, 0x7FE00008):
            self.tag = t
            return True
        return False


def _pydicom_header(f: SizedFile) -> FileHeader:
    """pydicom's reading of the header (through ``f``, whose reads never exceed the file)."""
    from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble
    head = f.read(132)
    groups = (int.from_bytes(head[:2], "little"), int.from_bytes(head[:2], "big"))
    if head[128:132] != b"DICM" and not any(g and g % 2 == 0 and g <= 0x7FE0 for g in groups):
        raise SeriesError("not DICOM (no DICM marker at byte 128 and no dataset at the start)")
    f.seek(0)
    read_preamble(f, True)
    if _read_file_meta_info(f).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        raise SeriesError("deflated transfer syntax (never used for CT; not inflated: it could be a zip bomb)")
    if f.read(2) == b"\x00\x00":  # pydicom reads command-group elements without its element limit
        raise SeriesError("dataset starts with group 0000 (a network command, or zeros); not a DICOM image")
    f.seek(0)
    stop = _Stop()
    ds = read_partial(f, stop, force=True, specific_tags=list(_TAG.values()))
    at = f.tell() if stop.tag == _PIXEL_DATA else None
    head = f.read(12) if at is not None else b""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    raw = ds.get_item(_TAG["SeriesInstanceUID"])  # read as pydicom found it (it switches on a wrong syntax)
    implicit = raw.is_implicit_VR if isinstance(raw, RawDataElement) else bool(ds.original_encoding[0])
    return _header(_pydicom_getter(ds), ts, implicit, at, head, f.size)


def read_header(path: str | Path, *, fast: bool = True) -> FileHeader:
    """The :class:`FileHeader` of one file (dompre's parser, or pydicom where it declines or ``fast=False``).

    Raises:
        SeriesError: the file is not a usable DICOM image (the message says why); nothing else, except
            OSError when it cannot be opened.
    """
    with SizedFile(path) as f:
        if fast:
            try:
                values, ts, implicit, at, head = _parse(f, f.size)
                return _header(values.get, ts, implicit, at, head, f.size)
            except (_Fallback, EOFError, UnicodeDecodeError):
                f.seek(0)
        try:
            return _pydicom_header(f)
        except (SeriesError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - whatever pydicom raises on a broken file is a reason
            raise SeriesError(f"not readable as DICOM ({type(e).__name__}: {str(e)[:200]})") from None


def scan_file(path: str | Path) -> tuple[FileHeader | None, str]:
    """The header of one file, or (None, reason) when it is not usable DICOM. One parse, up to the pixel data.

    Never raises for what a file holds (MemoryError excepted: nothing is allocated before its size is checked)."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            return None, f"not a regular file ({_kind(st.st_mode)})"
        if st.st_size == 0:
            return None, "zero-byte file"
        return read_header(path), ""
    except SeriesError as e:
        return None, str(e)
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"
