"""Bounded mutation fuzzer of dompre's DICOM scan and read over real files.

Seeds: the DICOM files pydicom ships (``pydicom/data/test_files``, real scanner output among them), those of
the pylibjpeg test-data packages when installed, and small CT series written by ``dompre.synth.dicom``
(signed, unsigned, RLE, enhanced multi-frame). Each case applies one mutation to one file: truncation, bit
flips, an element's length, an element's VR, a semantic value (Rows, Columns, BitsAllocated, BitsStored,
NumberOfFrames, PixelRepresentation, SamplesPerPixel, RescaleSlope/Intercept, ImagePositionPatient,
PixelSpacing) or undefined-length sequences nested up to 3,000 deep.

Contract checked on every case (a breach is a "problem"; the exit status is 1 when there is any):
  * ``scan_file`` returns (header, "") or (None, reason); ``read_header`` and the read path raise only
    ``SeriesError``;
  * no case takes over ``--max-seconds`` (5);
  * no allocation before a size is validated: the process runs under an address-space limit
    (``--memory-mb`` above what it uses at start), so an allocation of what a header claims but the file
    does not hold ends as MemoryError, a problem;
  * where pydicom decodes a file, dompre's stored values equal ``pixel_array`` and its HU equal
    ``pixel_array * slope + intercept`` (in float32, as dompre computes them) exactly.

Run: OMP_NUM_THREADS=1 .venv/bin/python tools/fuzz_dicom.py --cases 2000 --seed 0 [--save DIR]
"""
from __future__ import annotations

import argparse
import io
import os
import random
import re
import resource
import shutil
import struct
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom

from dompre.data import dicom as dm
from dompre.data import dicom_header as dh

SEMANTIC = {
    "Rows": [0, 1, 2, 255, 4096, 65535], "Columns": [0, 1, 3, 65535],
    "BitsAllocated": [0, 1, 7, 8, 12, 16, 32, 64, 65535], "BitsStored": [0, 1, 8, 12, 16, 17, 33],
    "NumberOfFrames": [0, -1, 2, 3, 1000, 100_000_000, "x", "1.5"], "PixelRepresentation": [None, 0, 1, 2],
    "SamplesPerPixel": [0, 2, 3], "RescaleSlope": ["NaN", "inf", "-inf", 0, -1, "1e38", "abc", None],
    "RescaleIntercept": ["NaN", "inf", "1e39", "-1024", "x", None],
    "ImagePositionPatient": [["NaN", 0, 0], ["inf", 0, 0], [0, 0], ["a", "b", "c"], None],
    "ImageOrientationPatient": [[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], ["NaN", 0, 0, 0, 1, 0], None],
    "PixelSpacing": [["inf", 1], [0, 0], [-1, 1], ["NaN", "NaN"], None],
}
VRS = [b"SQ", b"UN", b"OB", b"OW", b"UT", b"US", b"UL", b"DS", b"xx", b"\x00\x00"]
LENGTHS = [0, 1, 3, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x10000000]
STATS: Counter = Counter()  # what the cases exercised: refused at scan, series read, HU compared, ...


def seed_files(work: Path) -> list[Path]:
    """pydicom's (and pylibjpeg's) shipped DICOM files plus synthetic CT series (one file each)."""
    from pydicom.uid import RLELossless

    from dompre.synth.dicom import write_dicom_series
    files = sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm"))
    for pkg in ("ljdata", "ojdata", "rledata"):
        try:
            files += sorted(Path(__import__(pkg).__file__).parent.rglob("*.dcm"))
        except ImportError:
            pass
    hu = np.full((3, 32, 32), -1000.0, np.float32)
    hu[:, 6:26, 4:28] = 40.0 + 100 * np.arange(3)[:, None, None]
    for name, kw in {"signed": {}, "unsigned": {"unsigned": True}, "rle": {"transfer_syntax": RLELossless},
                     "multiframe": {"multiframe": True}, "implicit": {}}.items():
        written = write_dicom_series(work / "seeds" / name, hu, spacing=(2.0, 0.7, 0.7), patient_id=name, **kw)
        if name == "implicit":
            for f in written:
                ds = pydicom.dcmread(f)
                ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
                ds.save_as(f, enforce_file_format=True)
        files += written[:1]
    return files


_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _walk(raw: bytes, pos: int, explicit: bool, meta: bool, out: list) -> int:
    while pos + 8 <= len(raw) and len(out) < 2000:
        group, elem = struct.unpack_from("<HH", raw, pos)
        if meta != (group == 2):
            break
        vr = raw[pos + 4:pos + 6] if explicit else None
        if vr in _LONG:
            length, hdr = struct.unpack_from("<I", raw, pos + 8)[0], 12
        elif vr is None:
            length, hdr = struct.unpack_from("<I", raw, pos + 4)[0], 8
        else:
            length, hdr = struct.unpack_from("<H", raw, pos + 6)[0], 8
        out.append((pos, group << 16 | elem, vr, length, hdr))
        if length == 0xFFFFFFFF or (group << 16 | elem) >= 0x7FE00010:
            break
        pos += hdr + length
    return pos


def elements(raw: bytes) -> list[tuple[int, int, bytes | None, int, int]]:
    """(position, tag, VR, length, header length) of the top-level dataset elements of a Part 10 file in a
    little-endian syntax, as far as they parse (the meta group is Explicit VR; the dataset as its syntax says)."""
    meta: list = []
    data: list = []
    try:
        pos = _walk(raw, 132, True, True, meta)
        ts = next((raw[p + h:p + h + n] for p, t, _, n, h in meta if t == 0x00020010), b"").rstrip(b"\x00 ")
        _walk(raw, pos, ts != b"1.2.840.10008.1.2", False, data)
    except struct.error:  # mutations only need the elements that parse
        pass
    return data


def mutate(raw: bytes, src: Path, rng: random.Random, work: Path) -> tuple[str, bytes] | None:
    """One mutation of ``raw``: (description, new bytes), or None when it does not apply to this file."""
    kind = rng.choice(["truncate", "bitflip", "length", "vr", "semantic", "semantic", "nest"])
    els = elements(raw)
    if kind == "truncate":
        n = rng.choice([rng.randrange(len(raw)), rng.randrange(120, min(400, len(raw)))])
        return f"truncate at {n}", raw[:n]
    if kind == "bitflip":
        b = bytearray(raw)
        flips = [rng.randrange(len(b)) for _ in range(rng.randint(1, 8))]
        for i in flips:
            b[i] ^= 1 << rng.randrange(8)
        return f"bit flips at {flips}", bytes(b)
    if not els:
        return None
    pos, tag, vr, length, hdr = rng.choice(els)
    if kind == "length":
        new = rng.choice(LENGTHS + [length + rng.randint(-8, 8)]) & 0xFFFFFFFF
        b = bytearray(raw)
        if hdr == 12:
            b[pos + 8:pos + 12] = struct.pack("<I", new)
        elif vr is None:
            b[pos + 4:pos + 8] = struct.pack("<I", new)
        else:
            b[pos + 6:pos + 8] = struct.pack("<H", new & 0xFFFF)
        return f"length of ({tag >> 16:04X},{tag & 0xFFFF:04X}) -> {new:#x}", bytes(b)
    if kind == "vr":
        if vr is None:
            return None
        new_vr = rng.choice(VRS)
        return (f"VR of ({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr!r} -> {new_vr!r}",
                raw[:pos + 4] + new_vr + raw[pos + 6:])
    if kind == "nest":
        at = next((p for p, t, *_ in els if t >= 0x7FE00010), None)
        if at is None or vr is None:
            return None
        depth = rng.choice([1, 5, 31, 33, 200, 3000])
        nest = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                              0xFFFFFFFF)
        tail = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        return f"{depth} nested undefined-length sequences", raw[:at] + nest * depth + tail * depth + raw[at:]
    key = rng.choice(sorted(SEMANTIC))
    value = rng.choice(SEMANTIC[key])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(raw), force=True)
            if value is None:
                if key not in ds:
                    return None
                delattr(ds, key)
            else:
                setattr(ds, key, value)
            buf = io.BytesIO()
            ds.save_as(buf)
    except Exception:  # noqa: BLE001 - a value pydicom will not write is no case
        return None
    return f"{key} = {value!r}", buf.getvalue()


def _pydicom_pixels(path: Path) -> tuple[np.ndarray, pydicom.Dataset] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            return ds.pixel_array, ds
    except Exception:  # noqa: BLE001 - pydicom does not decode it: nothing to compare
        return None


def check(path: Path, series: list[Path] | None) -> tuple[list[str], float]:
    """The contract's breaches on one mutated file (and the series it belongs to, when it has one), and the
    seconds dompre's scan and read took (pydicom's reference decoding not counted)."""
    problems = []
    t0 = time.perf_counter()
    try:
        header, reason = dm.scan_file(path)
        if (header is None) != bool(reason):
            problems.append(f"scan_file gave header {header is not None} with reason {reason!r}")
    except BaseException as e:  # noqa: BLE001 - any exception is the breach being looked for
        return [f"scan_file raised {type(e).__name__}: {e}"], time.perf_counter() - t0
    try:
        dh.read_header(path)
    except dh.SeriesError:
        pass
    except BaseException as e:  # noqa: BLE001
        return problems + [f"read_header raised {type(e).__name__}: {e}"], time.perf_counter() - t0
    spent = time.perf_counter() - t0
    if header is None:
        STATS["refused at scan"] += 1
        return problems, spent
    STATS["header ok"] += 1
    ref = _pydicom_pixels(path)
    t0 = time.perf_counter()
    STATS["pydicom decodes"] += ref is not None
    try:
        if series is not None and header.modality == "CT":
            vol = dm.read_series(series)
            _ = vol.hu
            spent += time.perf_counter() - t0
            files = [Path(f) for f in vol.meta["files"]]
            if ref is not None and path in files and header.frames == 1:
                k = files.index(path)
                arr, ds = ref
                if not np.array_equal(vol.stored[k], arr):
                    problems.append("stored values differ from pydicom's pixel_array")
                try:
                    slope = np.float32(float(ds.get("RescaleSlope", 1) or 1))
                    inter = np.float32(float(ds.get("RescaleIntercept", 0) or 0))
                except Exception:  # noqa: BLE001 - no scalar rescale for pydicom either
                    problems.append(f"read a series whose rescale pydicom cannot convert: "
                                    f"{ds.get('RescaleSlope')!r}, {ds.get('RescaleIntercept')!r}")
                else:
                    if not np.array_equal(vol.hu[k], arr.astype(np.float32) * slope + inter):
                        problems.append("HU differ from pydicom's pixel_array * slope + intercept")
                    STATS["HU compared with pydicom"] += 1
        else:
            decoded: dict = {}
            slices = dm._slices_of(path, header)
            for s in slices:
                if s.file not in decoded:
                    decoded[s.file] = dm._decode(s)
            spent += time.perf_counter() - t0
            for s in slices:
                plane = decoded[s.file]
                plane = plane[s.frame] if s.frame is not None and plane.ndim == 3 else plane
                if ref is not None:
                    arr = ref[0][s.frame] if s.frame is not None and ref[0].ndim >= 3 and header.frames > 1 else ref[0]
                    STATS["values compared with pydicom"] += 1
                    if plane.shape == arr.shape and not np.array_equal(plane, arr):
                        problems.append(f"decoded values differ from pydicom's pixel_array (frame {s.frame})")
                        break
    except dm.SeriesError:
        STATS["refused at read"] += 1
        spent += time.perf_counter() - t0
    except BaseException as e:  # noqa: BLE001
        problems.append(f"read raised {type(e).__name__}: {e}")
    return problems, spent


def limit_memory(mb: int) -> None:
    """Cap the address space at what the process maps now plus ``mb`` MiB."""
    vm = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + mb * 2**20, hard))


def run(cases: int, seed: int, max_seconds: float, memory_mb: int | None, save: Path | None,
        work: Path) -> dict:
    """Run ``cases`` seeded cases; returns counts, the slowest case and the problems found."""
    seeds = seed_files(work)
    synth = {f: sorted(f.parent.glob("*.dcm")) for f in seeds if "seeds" in f.parts}
    problems = []
    for src in seeds:  # each unmutated seed once (it must pass too), which also loads every decoder and
        found = check(src, synth.get(src))[0]  # BLAS's buffers before the memory limit
        if found:
            problems.append({"case": -1, "seed_file": src.name, "mutation": "none", "problems": found})
    if memory_mb:
        limit_memory(memory_mb)
    rng = random.Random(seed)
    STATS.clear()
    kinds, slowest, done = Counter(), (0.0, ""), 0
    case_dir = work / "case"
    while done < cases:
        src = rng.choice(sorted(synth)) if rng.random() < 0.35 else rng.choice(seeds)  # CT series: HU checked
        raw = src.read_bytes()
        m = mutate(raw, src, rng, work)
        if m is None:
            continue
        desc, data = m
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir()
        series = None
        if src in synth:  # the mutated file takes its place in a copy of its series
            for f in synth[src]:
                shutil.copy(f, case_dir / f.name)
            series = sorted(case_dir.glob("*.dcm"))
        path = case_dir / src.name
        path.write_bytes(data)
        if os.environ.get("FUZZ_TRACE"):  # a case that kills the process is then in FUZZ_TRACE's folder
            print(f"case {done} {src.name}: {desc}", file=sys.stderr, flush=True)
            shutil.copy(path, Path(os.environ["FUZZ_TRACE"]) / "last.dcm")
        found, dt = check(path, series)
        if dt > max_seconds:
            found.append(f"took {dt:.1f} s (limit {max_seconds} s)")
        slowest = max(slowest, (dt, f"{src.name}: {desc}"))
        kinds[desc.split(" ")[0] if not desc[0].isdigit() else "nest"] += 1
        if found:
            problems.append({"case": done, "seed_file": src.name, "mutation": desc, "problems": found})
            if save is not None:
                save.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, save / f"case{done:05d}-{src.name}")
        done += 1
    return {"cases": done, "kinds": dict(kinds), "outcomes": dict(STATS), "slowest_s": round(slowest[0], 3),
            "slowest": slowest[1],
            "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=5.0)
    ap.add_argument("--memory-mb", type=int, default=1024, help="address space above the start (0: no limit)")
    ap.add_argument("--save", type=Path, default=None, help="copy each breaching case here")
    a = ap.parse_args()
    import logging
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = run(a.cases, a.seed, a.max_seconds, a.memory_mb or None, a.save, Path(tmp))
    print(f"fuzz_dicom: {res['cases']} cases (seed {a.seed}) in {time.perf_counter() - t:.1f} s; kinds "
          f"{res['kinds']}; outcomes {res['outcomes']}; slowest {res['slowest_s']} s ({res['slowest']}); "
          f"{len(res['problems'])} problem case(s)")
    for p in res["problems"][:50]:
        print(f"  case {p['case']} {p['seed_file']}: {p['mutation']}: " + "; ".join(p["problems"]))
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
