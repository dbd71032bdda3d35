"""Editing DICOM files in place, for the DICOM reading and ingest tests."""
from __future__ import annotations

from pathlib import Path

import pydicom


def edit_dicom(path: Path, **changes) -> None:
    """Set each ``keyword=value`` of ``changes`` in the file at ``path`` (``None`` deletes the element)."""
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)
