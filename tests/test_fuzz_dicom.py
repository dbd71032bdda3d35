"""A seeded few-hundred-case run of tools/fuzz_dicom.py: its contract holds on mutated real DICOM files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_seeded_fuzz_run_finds_no_breach():
    """scan/read raise nothing but SeriesError (scan: a reason), no allocation beyond what the file backs
    (run under an address-space limit), HU equal pydicom's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "fuzz_dicom.py"), "--cases", "300",
                          "--seed", "0", "--max-seconds", "60"], capture_output=True, text=True, env=env,
                         timeout=600)
    summary = [line for line in out.stdout.splitlines() if line.startswith(("fuzz_dicom:", "  case"))]
    assert out.returncode == 0 and "0 problem case(s)" in summary[0], "\n".join(summary) + out.stderr[-3000:]
    assert "'HU compared with pydicom'" in summary[0] and "'refused at scan'" in summary[0]
