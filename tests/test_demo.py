"""The README's main job, `dompre demo`, end to end on a tiny cohort (every stage, short schedules)."""
from __future__ import annotations

import json

import pytest

from dompre.demo import run_demo


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports(tmp_path):
    overrides = ["iterations=1", "teacher.epochs=1", "student.labeled_epochs=1", "model.img_size=32"]
    s = run_demo(tmp_path / "demo", patients=8, labeled_fraction=0.5, overrides=overrides, progress=False,
                 downstream_epochs=1, downstream_patients=4, synth_options={"matrix": 64, "max_slices": 60})
    assert [r["iteration"] for r in s["results"]] == [0, 1]
    assert s["unlabeled_inputs"] > 0 and sum(s["labeled"].values()) > 0
    report = (tmp_path / "demo" / "report" / "README.md").read_text()
    for text in ("## Result", "mean auc", "## Downstream", "random", "domain", "## Exported backbone"):
        assert text in report, text
    assert (tmp_path / "demo" / "report" / "backbone" / "model.safetensors").is_file()
    assert {r["init"] for r in s["downstream"]["summary"]} == {"random", "domain"}
    assert json.loads((tmp_path / "demo" / "report" / "summary.json").read_text())["verdict"] == s["verdict"]
    # the exported backbone's preparation and metrics travelled from the store manifest and the run
    backbone = tmp_path / "demo" / "report" / "backbone"
    cfg = json.loads((backbone / "config.json").read_text())
    prep = json.loads((tmp_path / "demo" / "stores" / "deeplesion" / "manifest.json").read_text())["info"]["prep"]
    assert cfg["dompre"]["hu_window"] == prep["window"] and cfg["dompre"]["preparation"]["stride"] == prep["stride"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    card = (backbone / "README.md").read_text()
    assert "| test auc |" in card and "none recorded" not in card and "- Input: 3x32x32;" in card
