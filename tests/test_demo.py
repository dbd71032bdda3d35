"""The README's main job, `dompre demo`, end to end on a tiny cohort (every stage, short schedules)."""
from __future__ import annotations

import json

import pytest
import timm
from timm.models import save_for_hf

from _downstream_layouts import make_deeplesion

from dompre.demo import run_demo, run_synthetic_downstream


@pytest.mark.slow
def test_demo_runs_every_stage_and_the_benchmark_arms(tmp_path):
    from dompre.checkpoint import read_checkpoint_meta

    overrides = ["iterations=1", "teacher.epochs=1", "student.labeled_epochs=1", "model.img_size=32"]
    s = run_demo(tmp_path / "demo", patients=8, labeled_fraction=0.5, heldout_patients=4, overrides=overrides,
                 progress=False, downstream_epochs=1, downstream_patients=4, replicates=20,
                 synth_options={"matrix": 64, "max_slices": 60, "labeled_lesions": (3, 4)})
    assert [r["iteration"] for r in s["results"]] == [0, 1]
    assert s["unlabeled_inputs"] > 0 and s["labeled_train_inputs"] > 0
    assert s["heldout"]["val"]["inputs"] > 0 and s["heldout"]["test"]["inputs"] > 0
    arms = s["benchmark"]["per_seed"]["0"]["arms"]
    assert set(arms) == {"teacher", "student-1", "oracle", "plain"}
    for a in arms.values():
        assert 0 <= a["auc_ci"][0] <= a["auc"] <= a["auc_ci"][1] <= 1 and a["n_inputs"] == s["heldout"]["test"]["inputs"]
    run = tmp_path / "demo" / "run" / "seed-0"
    oracle = read_checkpoint_meta(run / "arm-oracle" / "checkpoint")["info"]
    plain = read_checkpoint_meta(run / "arm-plain" / "checkpoint")["info"]
    assert oracle["pseudo"]["source"] == "truth" and oracle["pseudo"]["used"] == s["unlabeled_inputs"]
    assert plain["noise"] is False and oracle["noise"] is True
    report = (tmp_path / "demo" / "report" / "README.md").read_text()
    for text in ("## Result", "gap closed", "| 0 | oracle |", "| 0 | plain |", "## Pseudo-labels against truth",
                 "## Downstream", "random", "domain", "## Exported backbone", "arms.png"):
        assert text in report, text
    assert (tmp_path / "demo" / "report" / "arms.png").is_file()
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
    chosen = s["benchmark"]["per_seed"]["0"]["arms"][s["chosen"]]
    assert f"{chosen['auc']:.4f}" in card  # the card quotes the held-out test figure of the exported model


def test_synthetic_downstream_random_vs_domain(tmp_path):
    make_deeplesion(tmp_path / "cohort" / "deeplesion", n=12)
    save_for_hf(timm.create_model("test_resnet", num_classes=3), tmp_path / "export", safe_serialization=True)
    res = run_synthetic_downstream(tmp_path / "cohort", tmp_path / "export", tmp_path / "demo", epochs=1, seeds=1,
                                   image_size=32, overrides=("train.max_steps_per_epoch=1",))
    assert res["arch"] == "test_resnet" and {r["init"] for r in res["runs"]} == {"random", "domain"}
    assert sum(res["n"].values()) == 12 and (tmp_path / "demo" / "summary.md").is_file()
