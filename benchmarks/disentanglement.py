"""Disentanglement of MeDUET factors on synthetic phantoms, where content and style are known.

Pipeline (one command):
1. Phantoms: ``--subjects`` anatomies, each rendered in every style of ``--styles`` (each style
   is a domain), 64^3 voxels at 1.5 mm; the last quarter of the subjects is held out of
   pretraining (validation split).
2. Tokenizer (``--tokenizer``):
   - ``pool`` (default): a fixed, training-free 4x "latent": per 4^3 block the mean intensity, the
     standard deviation, the mean in-plane gradient magnitude and the mean through-plane gradient
     magnitude (4 channels, the VAE's latent shape); decoding = trilinear upsampling of the mean
     channel. Anatomy lives in the spatial pattern, style in tissue contrast (mean), noise (std)
     and resolution / slice thickness (gradients). Used because a demo VAE trained for minutes on
     a 2-core CPU reconstructs too little to carry either factor.
   - ``vae``: the meduet_vae checkpoint given by ``--vae-ckpt`` (posterior mean; VAE decoding), or,
     without one, a demo-size VAE trained here through the meduet_vae bundle (``--vae-epochs``).
3. Latents: each phantom preprocessed as the VAE bundle does (RAS, 1.5 mm, per-modality intensity
   normalisation, pad to a multiple of 4) but without foreground cropping, so every rendering of
   an anatomy shares one grid; a latent cache + latent datalist in the contract's format.
4. MeDUET pretraining through the meduet_ssl bundle (train.json + demo.json), once with random
   mixing pairs and once with cross-domain pairs, same seed and epochs.
5. For each run, with the exported EMA teacher:
   - global content and style vectors of every volume (the factor bank's recipe);
   - linear-probe domain accuracy from content and from style, logistic regression, 4 folds
     split by subject (no anatomy in both train and test); and the converse, anatomy (subject)
     accuracy from content and from style with folds split by style;
   - swap error on held-out subjects: content of A (anatomy a, style s) with style of B
     (anatomy b != a, style t != s) against the ground truth, anatomy a rendered in style t; next
     to the trivial answers "A unchanged" and "B unchanged" and to the decoder's reconstruction of
     the ground truth from its own factors (the floor). In latent space (MSE over latent voxels)
     and in image space (MSE of the VAE decodings against the preprocessed ground-truth image; the
     trivial answers are the real images of A and B).

    python benchmarks/disentanglement.py --out outputs/disentanglement [--quick] [--vae-ckpt FILE]
        [--report benchmarks/REPORT.md]

``--quick`` shrinks everything (8 subjects, 3 styles, fewer epochs) for a smoke run. Results go to
``<out>/results.json``, figures to ``<out>/*.png``; ``--report`` writes (or replaces) the
"## Disentanglement" section of the given Markdown file and copies the figures beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meduet_demo.phantoms import DOMAIN_STYLES, write_phantom_collection  # noqa: E402
from custom_nets.engines.ssl.disentangle import mse, probe_accuracy  # noqa: E402
from custom_nets.engines.ssl.factor_bank import meduet_factor_fn, volume_factors  # noqa: E402
from custom_nets.engines.ssl.swap import A_CONTENT_B_STYLE, A_SELF, swap_latents  # noqa: E402
from custom_nets.utils.io import write_json  # noqa: E402
from report_tools import write_report  # noqa: E402  (same folder)

MODES = ("random", "cross_domain")
SECTION = "## Disentanglement"


def log(msg: str) -> None:
    print(f"[disentanglement] {msg}", flush=True)


def bundle_run(bundle: str, configs: Sequence[str], logfile: Path, **overrides: Any) -> float:
    """Run ``python -m monai.bundle run`` for a bundle (as a user would); returns seconds. Raises on failure."""
    files = [f"bundles/{bundle}/configs/{c}" for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files), "--bundle_root", f"bundles/{bundle}"]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    log(" ".join(cmd))
    t0 = time.perf_counter()
    with open(logfile, "a") as f:
        f.write("\n$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(logfile.read_text().splitlines()[-30:])
        raise SystemExit(f"{bundle} run failed (exit {proc.returncode}); see {logfile}:\n{tail}")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Data: phantoms, VAE, latents
# --------------------------------------------------------------------------------------------


def make_phantoms(out: Path, subjects: int, styles: Sequence[str], seed: int) -> dict[str, Any]:
    path = out / "phantoms" / "datalist.json"
    if not path.is_file():
        write_phantom_collection(out / "phantoms", subjects, styles, shape=(64, 64, 64), spacing=1.5, seed=seed,
                                 all_styles=True, val_fraction=0.25)
    datalist = json.loads(path.read_text())
    for split in ("training", "validation"):
        for it in datalist[split]:
            it["image"] = str((path.parent / it["image"]).resolve())
            if it.get("label"):
                it["label"] = str((path.parent / it["label"]).resolve())
    return datalist


class PoolTokenizer:
    """Training-free 4x tokenizer (module docstring): image (X, Y, Z) -> latent (4, X/4, Y/4, Z/4).

    Channels are standardised with the mean and standard deviation of each feature over all
    phantoms (:meth:`fit`), so that, like VAE latents, they have unit scale: the reconstruction
    loss then weighs against the other MeDUET losses as it does on VAE latents.
    """

    name = "pool4"
    latent_channels = 4

    def __init__(self) -> None:
        self.mean = torch.zeros(4, 1, 1, 1)
        self.std = torch.ones(4, 1, 1, 1)

    @staticmethod
    @torch.no_grad()
    def features(image: torch.Tensor) -> torch.Tensor:
        x = image.float().reshape(1, 1, *image.shape[-3:])
        pool = lambda t: torch.nn.functional.avg_pool3d(t, 4)  # noqa: E731
        mean = pool(x)
        std = (pool(x * x) - mean * mean).clamp_min(0).sqrt()
        d = [torch.diff(x, dim=k, append=x.narrow(k, x.shape[k] - 1, 1)).abs() for k in (2, 3, 4)]
        return torch.cat([mean, std, pool(d[0] + d[1]), pool(d[2])], dim=1)[0]

    def fit(self, images: Sequence[torch.Tensor]) -> PoolTokenizer:
        """Per-channel mean and standard deviation of the features of ``images``."""
        f = torch.stack([self.features(im) for im in images])
        self.mean = f.mean(dim=(0, 2, 3, 4)).reshape(4, 1, 1, 1)
        self.std = f.std(dim=(0, 2, 3, 4)).clamp_min(1e-6).reshape(4, 1, 1, 1)
        return self

    def record(self) -> dict[str, Any]:
        return {"pooling": 4, "channel_mean": self.mean.flatten().tolist(), "channel_std": self.std.flatten().tolist()}

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return (self.features(image) - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        z = (latent.float()[:1] * self.std[0] + self.mean[0])[None]
        return torch.nn.functional.interpolate(z, scale_factor=4, mode="trilinear", align_corners=False)[0, 0]


class VaeTokenizer:
    """A meduet_vae checkpoint: posterior-mean encoding, untiled decoding (64^3 phantoms are small)."""

    latent_channels = 4

    def __init__(self, ckpt: Path) -> None:
        from custom_nets.nets.vae import load_vae

        self.vae, self.meta = load_vae(ckpt, "cpu")
        self.name = f"vae:{ckpt}"

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        from custom_nets.nets.vae import encode_volume

        return encode_volume(self.vae, image.reshape(1, *image.shape[-3:]), roi=None)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        from custom_nets.nets.vae import decode_latent

        return decode_latent(self.vae, latent, roi=None)[0]


def get_tokenizer(args: argparse.Namespace, out: Path, logfile: Path) -> tuple[Any, dict[str, Any], str]:
    """The tokenizer, its latent-datalist "vae" record and a sentence saying what it is."""
    if args.tokenizer == "pool":
        return PoolTokenizer(), {"ckpt": None, "sha256": "pool4-mean-std-gradients", "latent_channels": 4}, (
            "the training-free 4x pooling tokenizer of benchmarks/disentanglement.py (per 4^3 block: mean, standard "
            "deviation, in-plane and through-plane gradient magnitude, each channel standardised over all phantoms; "
            "decoded by trilinear upsampling of the mean)")
    from custom_nets.utils.checkpoint import file_sha256

    ckpt, note = get_vae(args, out, logfile)
    tok = VaeTokenizer(ckpt)
    return tok, {"ckpt": str(ckpt), "sha256": file_sha256(ckpt), "latent_channels": int(tok.meta.get("latent_channels", 4)),
                 "network": tok.meta.get("network", {})}, note


def get_vae(args: argparse.Namespace, out: Path, logfile: Path) -> tuple[Path, str]:
    """The VAE checkpoint to use and a sentence saying where it came from."""
    if args.vae_ckpt:
        return Path(args.vae_ckpt), f"the given VAE checkpoint `{args.vae_ckpt}`"
    ckpt = out / "vae" / "model.pt"
    if not ckpt.is_file():
        bundle_run("meduet_vae", ["train.json", "demo.json"], logfile, datalist=out / "phantoms" / "datalist.json",
                   output_dir=out / "vae", ckpt_dir=out / "vae" / "checkpoints", model_path=ckpt,
                   max_epochs=args.vae_epochs, val_interval=max(1, args.vae_epochs // 2), seed=args.seed)
    return ckpt, (f"a demo-size MAISI-architecture VAE trained here on the phantoms through the meduet_vae bundle "
                  f"(train.json + demo.json, {args.vae_epochs} epochs)")


def encode_phantoms(datalist: dict[str, Any], tokenizer: Any, vae_record: dict[str, Any], out: Path
                    ) -> tuple[Path, dict[str, np.ndarray]]:
    """Latent cache + latent datalist of every phantom; returns it and the preprocessed images by name."""
    from custom_nets.data.latent_cache import write_latent
    from custom_nets.data.transforms import preprocess_transforms
    from custom_nets.nets.vae import latent_affine

    pre = preprocess_transforms(crop_foreground=False, min_size=64)
    domains = list(datalist["domains"])
    lat_dir = out / "latents"
    images: dict[str, np.ndarray] = {}
    affines: dict[str, list] = {}
    for split in ("training", "validation"):
        for it in datalist[split]:
            name = Path(it["image"]).name.split(".")[0]
            img = pre({"image": it["image"], "modality": it.get("modality", "CT")})["image"]
            images[name] = np.asarray(img[0], dtype=np.float32)
            affines[name] = np.asarray(img.affine, dtype=np.float64).tolist()
    if hasattr(tokenizer, "fit"):
        tokenizer.fit([torch.from_numpy(v) for v in images.values()])
        vae_record = {**vae_record, "network": tokenizer.record()}
    latent_list: dict[str, Any] = {"training": [], "validation": [], "domains": domains, "vae": vae_record}
    for split in ("training", "validation"):
        for it in datalist[split]:
            name = Path(it["image"]).name.split(".")[0]
            path = lat_dir / f"{name}.npy"
            if not path.is_file():
                write_latent(path, tokenizer.encode(torch.from_numpy(images[name])))
            z = np.load(path, mmap_mode="r")
            affine = affines[name]
            latent_list[split].append({
                "latent": path.name, "domain": it["domain"], "domain_index": domains.index(it["domain"]),
                "image": it["image"], "label": it.get("label"), "modality": it.get("modality", "CT"),
                "spacing": [1.5, 1.5, 1.5], "original_affine": affine, "affine": affine,
                "latent_affine": latent_affine(affine), "shape": list(z.shape),
                "content_id": it["content_id"], "style": it["style"],
            })
    path = write_json(lat_dir / "datalist.json", latent_list)
    return path, images


# --------------------------------------------------------------------------------------------
# Evaluation of one pretrained network
# --------------------------------------------------------------------------------------------


def evaluate(ssl_ckpt: Path, latent_datalist: Path, images: dict[str, np.ndarray], tokenizer: Any, max_pairs: int,
             crop: int, seed: int, out: Path, tag: str) -> dict[str, Any]:
    from custom_nets.data.latent_cache import load_latent_datalist
    from custom_nets.engines.ssl.model import load_meduet
    from custom_nets.utils.visualize import save_slice_montage

    net, meta = load_meduet(ssl_ckpt)
    lat = load_latent_datalist(latent_datalist, keys=("training", "validation"))
    items = [dict(it, split=s) for s in ("training", "validation") for it in lat[s]]
    name = lambda it: Path(it["latent"]).stem  # noqa: E731
    z = {name(it): torch.from_numpy(np.load(it["latent"]).astype(np.float32)) for it in items}
    fn = meduet_factor_fn(net)

    # --- linear probes on global factors (all volumes; folds split by subject)
    content, style = [], []
    for it in items:
        f = volume_factors(fn, z[name(it)], patch=crop, overlap=0.25, token=net.encoder.patch_size)
        content.append(f["content"])
        style.append(f["style"])
    content_t, style_t = torch.stack(content), torch.stack(style)
    labels = [it["domain_index"] for it in items]
    groups = [it["content_id"] for it in items]
    n_dom = len(lat["domains"])
    subjects = sorted(set(groups))
    subject_idx = [subjects.index(g) for g in groups]
    styles = [it["style"] for it in items]
    n_styles = len(set(styles))
    probe = {
        # domain from each factor, folds split by anatomy
        "content": probe_accuracy(content_t, labels, groups, n_dom),
        "style": probe_accuracy(style_t, labels, groups, n_dom),
        # anatomy from each factor, folds split by style (recognise an anatomy in an unseen style)
        "anatomy_from_content": probe_accuracy(content_t, subject_idx, styles, len(subjects), k=n_styles),
        "anatomy_from_style": probe_accuracy(style_t, subject_idx, styles, len(subjects), k=n_styles),
    }

    # --- swaps on held-out subjects
    val = [it for it in items if it["split"] == "validation"]
    by_key = {(it["content_id"], it["style"]): it for it in val}
    pairs = [(a, b) for a in val for b in val if a["content_id"] != b["content_id"] and a["style"] != b["style"]
             and (a["content_id"], b["style"]) in by_key]
    rng = np.random.default_rng(seed)
    if len(pairs) > max_pairs:
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    decoded: dict[str, torch.Tensor] = {}

    def dec(key: str, latent: torch.Tensor) -> torch.Tensor:
        if key not in decoded:
            decoded[key] = tokenizer.decode(latent)
        return decoded[key]

    rows = []
    example = None
    for a, b in pairs:
        gt = by_key[(a["content_id"], b["style"])]
        za, zb, zg = z[name(a)], z[name(b)], z[name(gt)]
        s = swap_latents(net, za, zb, patch=crop, overlap=0.25, with_self=True)
        g_self = swap_latents(net, zg, zg, patch=crop, overlap=0.25, with_self=True)[A_SELF]
        s_all = swap_latents(net, za, zb, patch=crop, overlap=0.25, decode_mode="all_visible")
        g_all = swap_latents(net, zg, zg, patch=crop, overlap=0.25, with_self=True, decode_mode="all_visible")[A_SELF]
        img_gt = torch.from_numpy(images[name(gt)])
        swap_img = tokenizer.decode(s[A_CONTENT_B_STYLE])
        # style change the swap makes (vs the decoder's own rebuild of A) against the true change
        true_change = zg - za
        explained = lambda change: 1.0 - mse(change, true_change) / max(float(true_change.pow(2).mean()), 1e-12)  # noqa: E731
        rows.append({
            "style_change_r2": {"swap": explained(s[A_CONTENT_B_STYLE] - s[A_SELF]), "b_unchanged": explained(zb - za),
                                "a_unchanged": 0.0},
            "latent": {"swap": mse(s[A_CONTENT_B_STYLE], zg), "a_unchanged": mse(za, zg), "b_unchanged": mse(zb, zg),
                       "floor": mse(g_self, zg), "swap_all_visible": mse(s_all[A_CONTENT_B_STYLE], zg),
                       "floor_all_visible": mse(g_all, zg)},
            "image": {"swap": mse(swap_img, img_gt), "a_unchanged": mse(torch.from_numpy(images[name(a)]), img_gt),
                      "b_unchanged": mse(torch.from_numpy(images[name(b)]), img_gt),
                      "floor": mse(dec("self:" + name(gt), g_self), img_gt),
                      "tokenizer_floor": mse(dec(name(gt), zg), img_gt)},
        })
        if example is None:
            example = (a, b, gt, swap_img)
    spaces = ("latent", "image", "style_change_r2")
    summary = {space: {k: float(np.mean([r[space][k] for r in rows])) for k in rows[0][space]} for space in spaces}
    sds = {space: {k: float(np.std([r[space][k] for r in rows])) for k in rows[0][space]} for space in spaces}
    wins = {space: float(np.mean([r[space]["swap"] < min(r[space]["a_unchanged"], r[space]["b_unchanged"]) for r in rows]))
            for space in ("latent", "image")}
    montage = None
    if example is not None:
        a, b, gt, swap_img = example
        montage = out / f"disentanglement_swap_{tag}.png"
        save_slice_montage(montage, [torch.from_numpy(images[name(a)]), torch.from_numpy(images[name(b)]), swap_img,
                                     torch.from_numpy(images[name(gt)])],
                           titles=[f"A {a['content_id']} {a['style']}", f"B {b['content_id']} {b['style']}",
                                   "A content / B style", f"truth {gt['content_id']} {gt['style']}"])
    return {"probe": probe, "swap_mean": summary, "swap_sd": sds, "swap_beats_both_trivial": wins,
            "pairs": len(rows), "volumes": len(items), "ssl_sha256": meta["sha256"],
            "montage": str(montage) if montage else None}


# --------------------------------------------------------------------------------------------
# Figures and report
# --------------------------------------------------------------------------------------------


def plot_summary(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in results["runs"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    x = np.arange(len(modes))
    probes = (("content", "domain | content"), ("style", "domain | style"),
              ("anatomy_from_content", "anatomy | content"), ("anatomy_from_style", "anatomy | style"))
    for k, (key, label) in enumerate(probes):
        axes[0].bar(x + (k - 1.5) * 0.2, [results["runs"][m]["probe"][key]["accuracy"] for m in modes], 0.2, label=label)
    axes[0].axhline(results["runs"][modes[0]]["probe"]["content"]["chance"], color="k", ls="--", lw=1, label="domain chance")
    axes[0].axhline(results["runs"][modes[0]]["probe"]["anatomy_from_content"]["chance"], color="grey", ls=":", lw=1,
                    label="anatomy chance")
    axes[0].set_xticks(x, modes)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("linear-probe accuracy")
    axes[0].legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    for ax, space in zip(axes[1:], ("latent", "image")):
        keys = ["swap", "a_unchanged", "b_unchanged", "floor"]
        for k, key in enumerate(keys):
            ax.bar(x + (k - 1.5) * 0.2, [results["runs"][m]["swap_mean"][space][key] for m in modes], 0.2,
                   yerr=[results["runs"][m]["swap_sd"][space][key] for m in modes], label=key.replace("_", " "), capsize=2)
        ax.set_xticks(x, modes)
        ax.set_title(f"swap MSE vs ground truth ({space})")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_section(results: dict[str, Any], command: str, figures: dict[str, str]) -> str:
    s = results["settings"]
    lines = [SECTION, "",
             f"Command: `{command}`", "",
             f"Machine: {s['machine']}; wall time {results['seconds'] / 60:.1f} min. Phantoms: {s['subjects']} anatomies x "
             f"{len(s['styles'])} styles ({', '.join(s['styles'])}; each style a domain), 64^3 at 1.5 mm, "
             f"{s['held_out_subjects']} anatomies held out of pretraining. Latents: {s['vae']}. "
             f"MeDUET: bundle demo overlay (demo-size network, crop {s['crop']}), {s['ssl_epochs']} epochs, seed {s['seed']}, "
             f"once per pairing mode.", "",
             "Linear probes (logistic regression on the global vectors of every volume). Domain: 4 folds split "
             "by anatomy; a disentangled content should sit near chance and style near 1. Anatomy (which subject): "
             "folds split by style, i.e. recognise an anatomy rendered in a style the probe never saw; content "
             "should be high and style low:", "",
             "| pairing | domain from content | domain from style | domain chance | anatomy from content | "
             "anatomy from style | anatomy chance |", "|---|---|---|---|---|---|---|"]
    for m in MODES:
        if m in results["runs"]:
            p = results["runs"][m]["probe"]
            lines.append(f"| {m} | {p['content']['accuracy']:.3f} | {p['style']['accuracy']:.3f} | "
                         f"{p['content']['chance']:.3f} | {p['anatomy_from_content']['accuracy']:.3f} | "
                         f"{p['anatomy_from_style']['accuracy']:.3f} | {p['anatomy_from_content']['chance']:.3f} |")
    lines += ["", "Swap error on held-out anatomies: content of A with style of B against the ground truth (A's anatomy "
              "rendered in B's style), mean (sd) over pairs; 'floor' = the ground truth rebuilt from its own factors; "
              "'beats both' = fraction of pairs where the swap is closer to the truth than both trivial answers:", "",
              "| pairing | space | swap | A unchanged | B unchanged | floor | beats both |", "|---|---|---|---|---|---|---|"]
    for m in MODES:
        if m not in results["runs"]:
            continue
        r = results["runs"][m]
        for space in ("latent", "image"):
            mean, sd = r["swap_mean"][space], r["swap_sd"][space]
            cell = lambda k: f"{mean[k]:.4f} ({sd[k]:.4f})"  # noqa: E731
            lines.append(f"| {m} | {space} | {cell('swap')} | {cell('a_unchanged')} | {cell('b_unchanged')} | "
                         f"{cell('floor')} | {r['swap_beats_both_trivial'][space]:.2f} |")
    lines += ["", "Style change reproduced (latent space, independent of how sharply the decoder rebuilds a volume): "
                  "R^2 = 1 - |predicted change - true change|^2 / |true change|^2, where the true change is ground "
                  "truth minus A and the swap's change is the swap minus the decoder's rebuild of A from its own "
                  "factors; 'B unchanged' predicts the change B - A, 'A unchanged' predicts no change (R^2 = 0):", "",
              "| pairing | swap | B unchanged | A unchanged |", "|---|---|---|---|"]
    for m in MODES:
        if m in results["runs"]:
            r2, sd = results["runs"][m]["swap_mean"]["style_change_r2"], results["runs"][m]["swap_sd"]["style_change_r2"]
            lines.append(f"| {m} | {r2['swap']:.3f} ({sd['swap']:.3f}) | {r2['b_unchanged']:.3f} ({sd['b_unchanged']:.3f}) | 0 |")
    lines += ["", "Decoding regime of the swap (latent MSE; the config default is 'complementary': two passes with "
                  "complementary random halves of the fused tokens visible, each token taken from the pass where it "
                  "was hidden, the decoder's training regime; 'all visible': one pass, no mask tokens):", "",
              "| pairing | swap, complementary | swap, all visible | floor, complementary | floor, all visible |",
              "|---|---|---|---|---|"]
    for m in MODES:
        if m in results["runs"]:
            lat = results["runs"][m]["swap_mean"]["latent"]
            lines.append(f"| {m} | {lat['swap']:.4f} | {lat['swap_all_visible']:.4f} | {lat['floor']:.4f} | "
                         f"{lat['floor_all_visible']:.4f} |")
    first = next(iter(results["runs"].values()))
    lines += ["", f"Tokenizer reconstruction error of the ground truth itself (image MSE): "
                  f"{first['swap_mean']['image']['tokenizer_floor']:.4f}; no latent-space answer can go below it in image space."]
    lines += ["", "Reading: " + " ".join(reading(results))]
    lines += [""] + [f"![{k}]({v})" for k, v in figures.items()] + [""]
    return "\n".join(lines)


def reading(results: dict[str, Any]) -> list[str]:
    """Plain sentences computed from the numbers (what they show, and how far one run goes)."""
    s, runs = results["settings"], results["runs"]
    out = [f"One seed, a demo-size network and {s['ssl_epochs']} epochs on a CPU (the paper: ~105 M parameters, "
           f"~200k steps on 4 GPUs), so these figures test the pipeline and compare the pairings at this scale only."]
    for m, r in runs.items():
        p = r["probe"]
        dc, ch = p["content"]["accuracy"], p["content"]["chance"]
        ac, ach = p["anatomy_from_content"]["accuracy"], p["anatomy_from_content"]["chance"]
        lat = r["swap_mean"]["latent"]
        verdict = "invariant to the domain" if dc < ch + 0.5 * (1 - ch) else "still linearly predictive of the domain"
        swap_vs = ("closer to the truth than both trivial answers" if lat["swap"] < min(lat["a_unchanged"], lat["b_unchanged"])
                   else "not closer to the truth than the better trivial answer")
        out.append(f"{m} pairing: content is {verdict} (probe {dc:.2f}, chance {ch:.2f}); it identifies the anatomy "
                   f"across styles at {ac:.2f} (chance {ach:.2f}); the swap is on average {swap_vs} "
                   f"(latent MSE {lat['swap']:.3f} vs {lat['a_unchanged']:.3f} / {lat['b_unchanged']:.3f}).")
    if all(m in runs for m in MODES):
        a, b = (runs[m]["swap_mean"]["latent"]["swap"] for m in MODES)
        sd = max(runs[m]["swap_sd"]["latent"]["swap"] for m in MODES)
        out.append(f"Swap error, cross-domain minus random pairing: {b - a:+.3f} (pair-to-pair sd up to {sd:.3f}).")
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "disentanglement")
    p.add_argument("--quick", action="store_true", help="8 subjects, 3 styles, few epochs (smoke run)")
    p.add_argument("--subjects", type=int, default=None, help="anatomies (default 16; --quick 8)")
    p.add_argument("--styles", default=None, help="comma-separated styles (default all; --quick 3)")
    p.add_argument("--tokenizer", choices=["pool", "vae"], default="pool", help="latents: fixed pooling or a VAE")
    p.add_argument("--vae-ckpt", default=None, help="with --tokenizer vae: meduet_vae model.pt (default: train a demo VAE)")
    p.add_argument("--vae-epochs", type=int, default=None, help="demo VAE epochs (default 20; --quick 4)")
    p.add_argument("--ssl-epochs", type=int, default=None, help="MeDUET epochs (default 150; --quick 20)")
    p.add_argument("--max-pairs", type=int, default=None, help="swap pairs evaluated (default 40; --quick 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--report", type=Path, default=None, help="Markdown file whose Disentanglement section is (re)written")
    p.add_argument("--from-results", action="store_true",
                   help="only redraw the summary figure and rewrite the report section from <out>/results.json")
    args = p.parse_args(argv)
    defaults = dict(subjects=16, styles=",".join(DOMAIN_STYLES), vae_epochs=20, ssl_epochs=150, max_pairs=40)
    if args.quick:
        defaults.update(subjects=8, styles="ct_sharp,ct_lowdose,mr_t1like", vae_epochs=4, ssl_epochs=20, max_pairs=12)
    for k, v in defaults.items():  # explicit options win over --quick
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        results = json.loads((out / "results.json").read_text())
        publish(results, args, out, results["command"])
        return results
    logfile = out / "runs.log"
    styles = [s for s in args.styles.split(",") if s]
    datalist = make_phantoms(out, args.subjects, styles, args.seed)
    tokenizer, vae_record, vae_note = get_tokenizer(args, out, logfile)
    latent_datalist, images = encode_phantoms(datalist, tokenizer, vae_record, out)
    log(f"latent cache: {latent_datalist}")
    crop = 16
    modes = [m for m in args.modes.split(",") if m]
    runs = {}
    for mode in modes:
        run_dir = out / f"ssl_{mode}"
        ckpt = run_dir / "models" / "model.pt"
        if not ckpt.is_file():
            bundle_run("meduet_ssl", ["train.json", "demo.json"], logfile, latent_datalist=latent_datalist,
                       output_dir=run_dir, ckpt_dir=run_dir / "checkpoints", model_path=ckpt, pair_sampling=mode,
                       seed=args.seed,
                       max_epochs=args.ssl_epochs, val_interval=max(1, args.ssl_epochs // 5),
                       save_interval=args.ssl_epochs, mftd_start_epoch=args.ssl_epochs // 5,
                       warmup_epochs=max(1, args.ssl_epochs // 50))
        log(f"evaluating {mode}")
        runs[mode] = evaluate(ckpt, latent_datalist, images, tokenizer, args.max_pairs, crop, args.seed, out, mode)
        log(json.dumps(runs[mode]["probe"]))
    results = {
        "settings": {"subjects": args.subjects, "styles": styles, "held_out_subjects": args.subjects - round(args.subjects * 0.75),
                     "vae": vae_note, "ssl_epochs": args.ssl_epochs, "crop": crop, "seed": args.seed,
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"},
        "runs": runs, "seconds": time.perf_counter() - t0,
    }
    results["command"] = ("python benchmarks/disentanglement.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    write_json(out / "results.json", results)
    publish(results, args, out, results["command"])
    log(f"done in {results['seconds'] / 60:.1f} min; results in {out / 'results.json'}")
    return results


def publish(results: dict[str, Any], args: argparse.Namespace, out: Path, command: str) -> None:
    """Summary figure, and with ``--report`` the report section with the figures copied beside it."""
    summary_png = plot_summary(results, out / "disentanglement_summary.png")
    if not args.report:
        return
    fig_dir = args.report.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = {"summary": summary_png}
    runs = results["runs"]
    figures.update({f"swap example ({m})": Path(runs[m]["montage"]) for m in runs if runs[m]["montage"]})
    rel = {}
    for k, src in figures.items():
        dst = fig_dir / Path(src).name
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        rel[k] = os.path.relpath(dst, args.report.parent)
    write_report(args.report, report_section(results, command, rel))
    log(f"wrote the {SECTION[3:]} section of {args.report}")


if __name__ == "__main__":
    main()
