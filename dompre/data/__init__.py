"""CT data: DICOM and DeepLesion readers, input preparation, and the SliceStore.

``dompre.data.read_series`` and ``dompre.data.SliceStore`` are the entry points; they are loaded on first
use so that ``import dompre.data`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "read_series": "dompre.data.dicom", "discover_series": "dompre.data.dicom", "CTVolume": "dompre.data.dicom",
    "SliceStore": "dompre.data.store", "StoreWriter": "dompre.data.store",
    "prepare_volume": "dompre.data.prep", "PrepConfig": "dompre.data.prep",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dompre.data' has no attribute {name!r}")
