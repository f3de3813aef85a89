"""Bookkeeping of benchmarks/seg_benchmark.py: latent-grid label sampling, paired bootstrap, run plan, worker locks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import seg_benchmark as sb  # noqa: E402


def test_latent_labels_read_the_image_at_4k_plus_offset() -> None:
    lab = np.zeros((16, 16, 16), dtype=np.int16)
    lab[7, 7, 7] = 2  # image voxel 7 = 4 * 1 + 3
    assert sb.latent_labels(lab, 3)[1, 1, 1] == 2
    assert sb.latent_labels(lab, 1)[1, 1, 1] == 0  # the align_corners=False placement misses it
    assert sb.latent_labels(lab, 5).shape == (4, 4, 4)  # the last index is clamped, not dropped
    big = np.zeros((16, 16, 16), dtype=np.int16)
    big[4:8, 4:8, 4:8] = 3
    assert sb.latent_labels(big, "block")[1, 1, 1] == 3


def test_dice_and_paired_bootstrap() -> None:
    ref = torch.zeros(8, 8, 8, dtype=torch.long)
    ref[:4] = 1
    pred = ref.clone()
    pred[:2] = 0
    d = sb.dice_per_label(pred, ref, num_classes=3)
    assert d[0] == pytest.approx(2 * 128 / (128 + 256)) and d[1] is None
    a = [{"anatomy": i, "style": "ct_sharp", "dice": {"body": 0.8 + 0.01 * i}} for i in range(6)]
    b = [{"anatomy": i, "style": "ct_sharp", "dice": {"body": 0.7}} for i in range(6)]
    res = sb.paired_bootstrap(a, b, ["ct_sharp"])
    assert res["n"] == 6 and res["mean"] == pytest.approx(0.125)
    assert 0.1 <= res["ci95"][0] <= res["mean"] <= res["ci95"][1] <= 0.15
    assert sb.paired_bootstrap(a, b, ["mr_t2like"]) == {}


def test_plan_puts_the_decisive_set_first_and_extra_seeds_only_there() -> None:
    args = sb.parse_args(["--labelled", "8,3,1", "--seeds", "0,1"])
    runs = sb.plan(args)
    assert runs[:3] == [("unet_small", 8, 0), ("latent_meduet", 8, 0), ("latent_random", 8, 0)]
    second = [r for r in runs if r[2] == 1]
    assert {m for m, _, _ in second} == set(sb.DECISIVE) and {n for _, n, _ in second} == {3, 8}
    with pytest.raises(SystemExit):
        sb.plan(sb.parse_args(["--models", "swinunetr"]))


def test_worker_lock_is_exclusive_and_taken_over_from_a_dead_process(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "LOCK"
    assert sb.acquire(lock)
    assert lock.read_text() == str(os.getpid())
    assert not sb.acquire(lock)  # held by a live process (this one)
    lock.write_text("999999999")  # no such process
    assert sb.acquire(lock)


def test_structure_ceilings_reward_grid_aligned_structures_only() -> None:
    """A cube on the 4-voxel latent grid is reachable exactly; the same cube shifted by 2 voxels is
    not, and a structure below one latent voxel is listed by size without a ceiling."""
    lab = torch.zeros(24, 24, 24, dtype=torch.long)
    lab[4:12, 4:12, 4:12] = 1  # aligned 8^3 cube
    lab[14:22, 14:22, 14:22] = 2  # 8^3 cube at offset 2
    lab[0, 0, 0] = 3
    r = sb.structure_ceilings(lab, {1: "aligned", 2: "shifted"})
    assert r["structures"]["aligned"]["majority_nearest"] == 1.0
    assert r["structures"]["shifted"]["majority_nearest"] < 0.9
    assert r["structures"]["3"] == {"voxels": 1}
    assert r["grid_shape"] == [24, 24, 24] and r["mean_majority_nearest_large"] is None


def test_markdown_shows_probe_diagnostics_and_real_ct_ceilings() -> None:
    row = {"body": 0.9, "liver": 0.5}
    doc = {"runs": [], "probe_diagnostics": {"linear_1x1": row, "mlp_1x1_64": row, "image_blocks_1x1": row,
                                             "linear_1x1_per_style": {"ct_sharp": row},
                                             "image_blocks_1x1_per_style": {"mr_t1like": row}},
           "real_ct_ceilings": {"grid_shape": [8, 8, 8], "spacing_mm": 1.5, "mean_majority_nearest": 0.7,
                                "mean_fraction_trilinear": 0.8, "mean_majority_nearest_large": None,
                                "mean_fraction_trilinear_large": None,
                                "structures": {"liver": {"voxels": 100, "majority_nearest": 0.9, "fraction_trilinear": 0.95},
                                               "tiny": {"voxels": 3}}}}
    md = sb.markdown(doc)
    assert "| mlp_1x1_64 | 0.900 | 0.500 |" in md and "linear_1x1 within ct_sharp" in md
    assert "| image_blocks_1x1 | 0.900 | 0.500 |" in md and "image_blocks_1x1 within mr_t1like" in md
    assert "| liver | 100 | 0.900 | 0.950 |" in md and "tiny" not in md


def test_image_blocks_put_each_block_on_its_latent_voxel() -> None:
    """The raw-input baseline of the probes: voxel (4a + i, 4b + j, 4c + l) becomes channel 16i + 4j + l
    at latent voxel (a, b, c), and the channel mean is the block mean."""
    import torch

    img = np.zeros((8, 12, 16), np.float32)
    img[4 * 1 + 2, 4 * 2 + 3, 4 * 3 + 1] = 5.0
    blocks = sb.image_blocks([img, 2 * img])
    assert blocks.shape == (2, 64, 2, 3, 4)
    assert blocks[0, 16 * 2 + 4 * 3 + 1, 1, 2, 3] == 5.0 and blocks[0].sum() == 5.0 and blocks[1].sum() == 10.0
    rnd = np.random.default_rng(0).standard_normal((8, 8, 8)).astype(np.float32)
    pooled = torch.nn.functional.avg_pool3d(torch.as_tensor(rnd)[None, None], 4)[0, 0]
    assert torch.allclose(sb.image_blocks([rnd])[0].mean(0), pooled, atol=1e-6)


def test_lr_check_scores_the_validation_anatomies_only(tmp_path: Path) -> None:
    """Each learning rate trains its own run and is scored on data["val"], never on the test set."""
    from meduet_demo.phantoms import get_style, make_anatomy, render, render_seed

    def item(seed: int, style: str = "ct_sharp") -> dict:
        lab = make_anatomy(seed, sb.SHAPE).astype(np.int16)
        img = sb.normalise(render(lab, get_style(style), render_seed(seed, style)), get_style(style).modality)
        return {"image": img, "label": lab, "style": style, "anatomy": seed}

    data = {"labelled": [item(0), item(1)], "val": [item(100)], "test": [item(200)]}
    args = sb.parse_args(["--lrs", "1e-3,1e-2", "--lr-steps", "2", "--lr-models", "unet_small", "--ckpt-every", "100"])
    doc = sb.lr_check(tmp_path, data, args, vae_result={}, ssl_result=None)
    assert [r["lr"] for r in doc["rows"]] == [1e-3, 1e-2] and set(doc["best_lr"]) == {"unet_small"}
    for lr in ("0.001", "0.01"):
        r = json.loads((tmp_path / "lr_check" / f"unet_small_L8_seed0_steps2_lr{lr}" / "result.json").read_text())
        assert r["eval_split"] == "val" and {v["anatomy"] for v in r["volumes"]} == {100} and r["lr"] == float(lr)
    assert (tmp_path / "lr_check.json").is_file() and not (tmp_path / "runs").exists()


def _fake_result(model: str, seed: int, dice: float, upstream: str | None) -> dict:
    volumes = [{"anatomy": a, "style": s, "dice": {"body": dice + 0.01 * a, "liver": dice}}
               for a in range(4) for s in (*sb.TRAIN_STYLES, *sb.UNSEEN_STYLES)]
    keys = ("wall_s", "cpu_s", "eval_s", "peak_rss_mb", "params_trainable", "params_total", "macs_per_step",
            "constant_frequency_loss", "loss_first20", "loss_last100", "loss_crosses_constant_at_step")
    return {k: 1 for k in keys} | {"model": model, "labelled": 8, "seed": seed, "steps": 5, "curve": [],
                                   "volumes": volumes, "upstream_id": upstream}


def test_report_keeps_archived_and_earlier_runs_and_pairs_latent_runs_of_one_upstream(tmp_path: Path) -> None:
    """Runs survive the working folder (archive, then the previous JSON); a rerun on the same upstream
    replaces its archived copy, one on another upstream is kept beside it; latent runs on different
    upstreams are not paired, the UNet baseline is paired with any."""
    out, archive, js = tmp_path / "out", tmp_path / "archive", tmp_path / "bench.json"
    sb.write_json(archive / "unet_small_L8_seed0_steps5.json", _fake_result("unet_small", 0, 0.5, None))
    sb.write_json(archive / "latent_random_L8_seed0_steps5_upold.json", _fake_result("latent_random", 0, 0.6, "old"))
    sb.write_json(archive / "latent_meduet_L8_seed0_steps5_upold.json", _fake_result("latent_meduet", 0, 0.1, "old"))
    sb.write_json(archive / "latent_meduet_L8_seed1_steps5_upnew.json", _fake_result("latent_meduet", 1, 0.1, "new"))
    # this sitting: seed 0 on a new upstream, seed 1 rerun on the same one
    sb.write_json(out / "runs" / "latent_meduet_L8_seed0_steps5" / "result.json", _fake_result("latent_meduet", 0, 0.7, "new"))
    sb.write_json(out / "runs" / "latent_meduet_L8_seed1_steps5" / "result.json", _fake_result("latent_meduet", 1, 0.3, "new"))
    earlier = {"model": "unet_aug", "labelled": 8, "seed": 1, "steps": 5, "dice_seen": {"mean": 0.4}}
    js.write_text(json.dumps({"runs": [earlier]}))
    args = sb.parse_args(["--steps", "5", "--archive", str(archive), "--json", str(js)])
    doc = sb.report(out, args, None, {})
    runs = {(e["model"], e["seed"], e.get("upstream_id")): e for e in doc["runs"]}
    assert set(runs) == {("unet_small", 0, None), ("latent_random", 0, "old"), ("latent_meduet", 0, "old"),
                         ("latent_meduet", 0, "new"), ("latent_meduet", 1, "new"), ("unet_aug", 1, None)}
    new, old = runs[("latent_meduet", 0, "new")], runs[("latent_meduet", 0, "old")]
    assert new["dice_seen"]["liver"] == pytest.approx(0.7) and old["dice_seen"]["liver"] == pytest.approx(0.1)
    assert new["vs_unet_small_seen"]["mean"] == pytest.approx(0.2) and "vs_latent_random_seen" not in new
    assert old["vs_latent_random_seen"]["mean"] == pytest.approx(-0.5)
    assert runs[("latent_meduet", 1, "new")]["dice_seen"]["liver"] == pytest.approx(0.3)
    assert runs[("unet_aug", 1, None)]["per_volume_kept"] is False
    assert json.loads(js.read_text())["runs"] == doc["runs"]
    kept = {p.stem: json.loads(p.read_text()) for p in archive.glob("*.json")}
    assert set(kept) == {"unet_small_L8_seed0_steps5", "latent_random_L8_seed0_steps5_upold",
                         "latent_meduet_L8_seed0_steps5_upold", "latent_meduet_L8_seed0_steps5_upnew",
                         "latent_meduet_L8_seed1_steps5_upnew"}
    assert kept["latent_meduet_L8_seed1_steps5_upnew"]["volumes"][0]["dice"]["liver"] == pytest.approx(0.3)


def test_report_pairs_style_augmentation_with_its_meduet_run(tmp_path: Path) -> None:
    out, archive = tmp_path / "out", tmp_path / "archive"
    sb.write_json(archive / "a.json", _fake_result("latent_meduet", 0, 0.5, "u1"))
    sb.write_json(archive / "b.json", _fake_result("latent_meduet_style", 0, 0.6, "u1"))
    sb.write_json(archive / "c.json", _fake_result("latent_meduet_style", 1, 0.6, "u1"))
    sb.write_json(archive / "d.json", _fake_result("latent_meduet", 1, 0.5, "u2"))  # another upstream
    args = sb.parse_args(["--steps", "5", "--archive", str(archive), "--json", str(tmp_path / "b.json")])
    runs = {(e["model"], e["seed"]): e for e in sb.report(out, args, None, {})["runs"]}
    assert runs[("latent_meduet_style", 0)]["vs_latent_meduet_unseen"]["mean"] == pytest.approx(0.1)
    assert "vs_latent_meduet_unseen" not in runs[("latent_meduet_style", 1)]


def test_intensity_augmented_latent_run_is_paired_with_unet_aug_and_its_meduet_run(tmp_path: Path) -> None:
    """latent_meduet_aug trains with unet_aug's image augmentation; the report pairs it with unet_aug on
    unseen styles, with the plain MeDUET run of its own upstream, and with the random ViT trained with
    the same augmentation (not the unaugmented one)."""
    assert set(sb.INTENSITY_AUG) == {"unet_aug", "latent_meduet_aug", "latent_random_aug"}
    assert {"latent_meduet_aug", "latent_random_aug"} <= set(sb.MODELS)
    out, archive = tmp_path / "out", tmp_path / "archive"
    sb.write_json(archive / "a.json", _fake_result("unet_aug", 0, 0.5, None))
    sb.write_json(archive / "b.json", _fake_result("latent_meduet", 0, 0.4, "u1"))
    sb.write_json(archive / "c.json", _fake_result("latent_meduet_aug", 0, 0.45, "u1"))
    sb.write_json(archive / "d.json", _fake_result("latent_random", 0, 0.1, "u1"))
    sb.write_json(archive / "e.json", _fake_result("latent_random_aug", 0, 0.42, "u1"))
    args = sb.parse_args(["--steps", "5", "--archive", str(archive), "--json", str(tmp_path / "b.json")])
    runs = {e["model"]: e for e in sb.report(out, args, None, {})["runs"]}
    assert runs["latent_meduet_aug"]["vs_unet_aug_unseen"]["mean"] == pytest.approx(-0.05)
    assert runs["latent_meduet_aug"]["vs_latent_meduet_unseen"]["mean"] == pytest.approx(0.05)
    # MeDUET's share under augmentation: against the random ViT trained with the same augmentation
    assert runs["latent_meduet_aug"]["vs_latent_random_unseen"]["mean"] == pytest.approx(0.03)
    assert runs["latent_meduet"]["vs_latent_random_unseen"]["mean"] == pytest.approx(0.3)


def test_finished_runs_are_archived_with_their_upstream(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "out"
    assert sb.upstream_id(out) is None
    for name in ("vae/vae.pt", "ssl/ssl.pt"):
        (out / name).parent.mkdir(parents=True)
        torch.save({"state_dict": {"w": torch.ones(3)}, "cpu_s": 1.0, "latent_scale": 0.5}, out / name)
    uid = sb.upstream_id(out)
    assert uid is not None and len(uid) == 12
    # a rebuild with the same weights that took another time: the same upstream
    torch.save({"state_dict": {"w": torch.ones(3)}, "cpu_s": 2.0, "latent_scale": 0.5}, out / "ssl" / "ssl.pt")
    assert sb.upstream_id(out) == uid
    torch.save({"state_dict": {"w": torch.ones(3) * 2}, "cpu_s": 2.0, "latent_scale": 0.5}, out / "ssl" / "ssl.pt")
    assert sb.upstream_id(out) != uid
    sb.archive_result(str(tmp_path / "archive"), {"model": "unet_small"}, "unet_small_L8_seed0_steps5")
    assert sb.archived_results(str(tmp_path / "archive")) == {"unet_small_L8_seed0_steps5": {"model": "unet_small"}}
    sb.archive_result("", {"model": "x"}, "ignored")  # '' keeps none
    assert not (tmp_path / "ignored.json").exists()


def test_equal_budget_pairs_runs_of_other_step_counts(tmp_path: Path) -> None:
    """--budget-pairs sets a latent run beside the UNet run named for the same labelled set and seed,
    whatever their step counts, with per-label paired differences and the CPU-seconds ratio."""
    out, archive = tmp_path / "out", tmp_path / "archive"
    lat = _fake_result("latent_meduet_aug", 0, 0.80, "u1") | {"steps": 3, "cpu_s": 90.0}
    unet = _fake_result("unet_small", 0, 0.90, None) | {"cpu_s": 100.0}  # 5 steps
    for v in unet["volumes"]:
        v["dice"]["body"] = 0.95  # latent body 0.80-0.83: more than 0.05 below
    sb.write_json(archive / "lat.json", lat)
    sb.write_json(out / "runs" / "unet_small_L8_seed0_steps5" / "result.json", unet)
    sb.write_json(archive / "other_seed.json", _fake_result("unet_small", 1, 0.5, None))
    args = sb.parse_args(["--steps", "5", "--archive", str(archive), "--json", str(tmp_path / "b.json"),
                          "--budget-pairs", "latent_meduet_aug:3=unet_small:5, latent_meduet_aug:1500=unet_small:5000"])
    doc = sb.report(out, args, None, {})
    [e] = doc["equal_budget"]
    assert (e["latent_steps"], e["unet_steps"], e["seed"], e["upstream_id"]) == (3, 5, 0, "u1")
    assert e["cpu_ratio"] == pytest.approx(0.9)
    assert e["liver"]["diff"]["mean"] == pytest.approx(-0.10) and e["body"]["diff"]["mean"] == pytest.approx(-0.135)
    assert e["liver"]["latent"] == pytest.approx(0.80) and e["within_0.05"] is False
    # unseen styles: mean Dice of (body 0.80 + 0.01 a, liver 0.80) against (0.95, 0.90), a = 0..3
    assert e["mean_unseen"]["diff"]["mean"] == pytest.approx(-0.1175) and e["mean_unseen"]["unet"] == pytest.approx(0.925)
    assert e["mean_unseen"]["diff"]["n"] == 4 * len(sb.UNSEEN_STYLES)
    assert "body, liver within 0.05" in sb.markdown(doc) and "| unseen diff |" in sb.markdown(doc)
    with pytest.raises(SystemExit, match="not 'latent_model:steps"):
        sb.parse_budget_pairs("latent_meduet_aug:450")
    assert sb.parse_budget_pairs("latent_meduet:1500=unet_small:1500@0.003") == [
        (("latent_meduet", 1500, 1e-3), ("unet_small", 1500, 3e-3))]


def test_runs_at_another_learning_rate_stay_out_of_the_main_table(tmp_path: Path) -> None:
    """A run at a learning rate other than the main table's is named for it, archived, kept out of the
    main table (which pairs every model with unet_small at 1e-3) and reachable through --budget-pairs."""
    assert sb.run_name("unet_small", 8, 1, 1500) == "unet_small_L8_seed1_steps1500"
    assert sb.run_name("unet_small", 8, 1, 1500, 3e-3) == "unet_small_L8_seed1_steps1500_lr0.003"
    assert sb.run_name("unet_small", 8, 0, 500, 1e-3, check=True) == "unet_small_L8_seed0_steps500_lr0.001"
    out, archive = tmp_path / "out", tmp_path / "archive"
    sb.write_json(archive / "unet_small_L8_seed0_steps5.json", _fake_result("unet_small", 0, 0.5, None))
    sb.write_json(archive / "latent_meduet_L8_seed0_steps5_upu.json", _fake_result("latent_meduet", 0, 0.6, "u"))
    fast = _fake_result("unet_small", 0, 0.7, None) | {"lr": 3e-3}
    sb.write_json(out / "runs" / "unet_small_L8_seed0_steps5_lr0.003" / "result.json", fast)
    args = sb.parse_args(["--steps", "5", "--archive", str(archive), "--json", str(tmp_path / "b.json"),
                          "--budget-pairs", "latent_meduet:5=unet_small:5@0.003"])
    doc = sb.report(out, args, None, {})
    [unet] = [e for e in doc["runs"] if e["model"] == "unet_small"]
    assert unet["dice_seen"]["liver"] == pytest.approx(0.5)
    [lat] = [e for e in doc["runs"] if e["model"] == "latent_meduet"]
    assert lat["vs_unet_small_seen"]["mean"] == pytest.approx(0.1)
    [pair] = doc["equal_budget"]
    assert pair["unet_lr"] == 3e-3 and pair["liver"]["diff"]["mean"] == pytest.approx(-0.1)
    assert (archive / "unet_small_L8_seed0_steps5_lr0.003.json").is_file()
    with pytest.raises(SystemExit, match="unknown models"):
        sb.parse_budget_pairs("latent_vit:450=unet_small:1500")
