"""Generation that follows its sources, judged on phantoms whose answer is known (issue 15, item 7).

For each MeDUET arm of ``benchmarks/disentanglement.py`` (its trained encoder, its phantom latents),
the chain that a user runs is run on the arm's factors: the meduet_ssl factor bank of the training
latents, then a meduet_ldm generator trained on those latents conditioned on the bank. The generator
then samples one latent per (content source, style source) pair, where the content source is
anatomy X rendered in style a and the style source another anatomy Y rendered in style b != a. The
phantoms give the right answer: X rendered in style b. Every measure compares latents, so none
depends on the encoder being judged:

- ``beats_both_sources``: the sample is closer (latent MSE) to the truth X_b than either source is,
  i.e. it is a better answer than copying the content source X_a or the style source Y_b (the swap
  test's criterion; a sample far from everything does not pass it);
- ``anatomy_retrieval``: among every anatomy of the set rendered in style b, the nearest to the sample
  is X (chance 1 / anatomies);
- ``style_retrieval``: among X rendered in each style, the nearest to the sample is X_b (chance 1 /
  styles); ``style_of_content_source``: it is X_a instead (the sample kept the content source's
  appearance).

The same measures on samples conditioned on the truth's own content and style (same noise) give the
generator's ceiling (``truth_factors``): what a perfect content/style split could reach with it.

Pairs come from training anatomies (which the generator saw, in every style) and from held-out
anatomies (rendered with a fresh noise seed; their factors come from the encoder on the fly). The
generator starts at random here (patch 4 and width 192, not the encoder's patch 2 and width 72: a
patch-2 generator is about 6x slower on a CPU, and at width 72 a 256-value patch-4 token did not
learn), so the arms differ only in the factors that condition it. Each finished arm+seed is kept in
``<out>/results/<arm>_s<seed>.json`` and skipped when the command is rerun.

    python benchmarks/ldm_control_phantoms.py --disentanglement outputs/disentanglement_cubes \
        --arms paper_longer,combined+domain_mean+self_rec+domain_window+domain_token+paired_longer --seeds 0,1 \
        --out outputs/ldm_control_phantoms --results benchmarks/results/ldm_control_phantoms.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from meduet_demo.run import bundle_cmd  # noqa: E402
from report_tools import machine, run_bundle  # noqa: E402  (same folder)

LATENT = re.compile(r"^(a\d{3})_(.+)_n(\d+)\.npy$")


def log(msg: str) -> None:
    print(f"[ldm_control_phantoms {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def phantom_latents(data_dir: Path, styles: list[str]) -> dict[str, dict[str, dict[str, Path]]]:
    """The disentanglement benchmark's latents by set, anatomy and style.

    Training anatomies carry noise draw 0, held-out ones draw 1 (draws 2+ are the swap test's truth
    draws and are not used here).

    Returns:
        {"training" | "held_out": {anatomy: {style: path}}}, only anatomies present in every style.

    Raises:
        SystemExit: no latents in ``data_dir`` (run benchmarks/disentanglement.py first).
    """
    sets: dict[str, dict[str, dict[str, Path]]] = {"training": {}, "held_out": {}}
    for path in sorted(data_dir.glob("a*_n*.npy")):
        m = LATENT.match(path.name)
        if not m or m.group(2) not in styles or m.group(3) not in ("0", "1"):
            continue
        which = "training" if m.group(3) == "0" else "held_out"
        sets[which].setdefault(m.group(1), {})[m.group(2)] = path
    for which in sets:
        sets[which] = {a: v for a, v in sets[which].items() if len(v) == len(styles)}
    if not sets["training"] or not sets["held_out"]:
        raise SystemExit(f"{data_dir}: no phantom latents of both sets; run benchmarks/disentanglement.py first")
    return sets


def control_pairs(anatomies: list[str], styles: list[str], n_content: int) -> list[tuple[str, str, str, str]]:
    """(content anatomy X, its style a, style anatomy Y, requested style b) for the first ``n_content``
    anatomies: a cycles over the styles, b runs over every other style, Y is the next anatomy."""
    pairs = []
    for i, x in enumerate(anatomies[:n_content]):
        a = styles[i % len(styles)]
        y = anatomies[(i + 1) % len(anatomies)]
        pairs += [(x, a, y, b) for b in styles if b != a]
    return pairs


def control_scores(samples: torch.Tensor, pairs: list[tuple[str, str, str, str]],
                   latents: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """The three latent-space measures of the module docstring, over ``pairs``.

    Args:
        samples: (P, C, X, Y, Z) generated latents (unscaled), one per pair.
        pairs: (X, a, Y, b) as from :func:`control_pairs`.
        latents: {anatomy: {style: latent}} of the set the pairs come from.

    Returns:
        rates in [0, 1] and mean MSEs, plus the chance levels.
    """
    def mse(u: torch.Tensor, v: torch.Tensor) -> float:
        return float((u.float() - v.float()).pow(2).mean())

    anatomies = sorted(latents)
    styles = sorted(next(iter(latents.values())))
    both = anat = sty = kept = 0
    to_truth, content_to_truth, style_to_truth = [], [], []
    for z, (x, a, y, b) in zip(samples, pairs):
        truth = latents[x][b]
        t, c, s = mse(z, truth), mse(latents[x][a], truth), mse(latents[y][b], truth)
        to_truth.append(t), content_to_truth.append(c), style_to_truth.append(s)
        both += t < min(c, s)
        anat += min(anatomies, key=lambda o: mse(z, latents[o][b])) == x
        nearest_style = min(styles, key=lambda o: mse(z, latents[x][o]))
        sty += nearest_style == b
        kept += nearest_style == a
    n = len(pairs)
    return {"pairs": n, "beats_both_sources": both / n, "anatomy_retrieval": anat / n, "style_retrieval": sty / n,
            "style_of_content_source": kept / n,
            "anatomy_chance": 1.0 / len(anatomies), "style_chance": 1.0 / len(styles),
            "mse_sample_to_truth": float(np.mean(to_truth)), "mse_content_source_to_truth": float(np.mean(content_to_truth)),
            "mse_style_source_to_truth": float(np.mean(style_to_truth))}


def last_val_loss(log_file: Path) -> float | None:
    """The generator's last validation flow-matching loss, as its StatsHandler logged it in ``log_file``."""
    found = re.findall(r"val_loss: ([0-9.eE+-]+)", log_file.read_text()) if log_file.is_file() else []
    return float(found[-1]) if found else None


def markdown_table(entries: list[dict[str, Any]]) -> str:
    """REPORT.md table: one row per arm, seed and set; the truth-factor ceiling beside each measure."""
    head = ("| arm | seed | set | val. flow loss | beats both sources (truth's factors) | anatomy retrieval "
            "(truth's factors; chance) | style retrieval (truth's factors; chance) | kept the content source's style "
            "| latent MSE to truth: sample (truth's factors) / content source / style source |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in entries:
        for which in ("training", "held_out"):
            m, t = e[which], e[which]["truth_factors"]
            loss = "n/a" if e.get("val_flow_loss") is None else f"{e['val_flow_loss']:.3f}"
            arm = e["arm"] + (" (content map)" if e.get("content_conditioning") == "map" else "")
            rows.append(
                f"| {arm} | {e['seed']} | {which.replace('_', '-')} | {loss} "
                f"| {m['beats_both_sources']:.2f} ({t['beats_both_sources']:.2f}) "
                f"| {m['anatomy_retrieval']:.2f} ({t['anatomy_retrieval']:.2f}; {m['anatomy_chance']:.2f}) "
                f"| {m['style_retrieval']:.2f} ({t['style_retrieval']:.2f}; {m['style_chance']:.2f}) "
                f"| {m['style_of_content_source']:.2f} "
                f"| {m['mse_sample_to_truth']:.3f} ({t['mse_sample_to_truth']:.3f}) / "
                f"{m['mse_content_source_to_truth']:.3f} / {m['mse_style_source_to_truth']:.3f} |")
    return "\n".join(rows)


def load_latent(path: Path) -> torch.Tensor:
    """A cached latent as a float32 tensor (C, X, Y, Z)."""
    from custom_nets.data.latent_cache import open_latent

    return torch.from_numpy(np.asarray(open_latent(path), dtype=np.float32))


def train_chain(run_dir: Path, datalist: Path, ssl_ckpt: Path, seed: int, args: argparse.Namespace) -> Path:
    """Factor bank and generator of one arm+seed (each skipped when already done); returns the generator."""
    bank = run_dir / "factors" / "factor_bank.pt"
    if not bank.is_file():
        log(f"factor bank: {run_dir.name}")
        run_bundle(bundle_cmd("meduet_ssl", ["inference.json"], latent_datalist=datalist, ssl_ckpt=ssl_ckpt,
                              output_dir=run_dir / "factors", crop=args.crop, splits="['training']", device="cpu"),
                   run_dir / "chain.log", f"factor bank of {run_dir.name}")
    model = run_dir / "ldm" / "models" / "model.pt"
    if not (run_dir / "ldm" / "done").is_file():
        log(f"generator: {run_dir.name}, {args.ldm_steps} steps")
        size = {"hidden_size": args.width, "depth": args.depth, "num_heads": args.heads}
        run_bundle(bundle_cmd("meduet_ldm", ["train.json"], latent_datalist=datalist, factor_bank=bank, ssl_ckpt=ssl_ckpt,
                              init_from_ssl="false", output_dir=run_dir / "ldm", ckpt_dir=run_dir / "ldm/models/checkpoints",
                              model_path=model, latent_crop="[16,16,16]", model_config=repr(size), batch_size=8,
                              num_workers=0, max_steps=args.ldm_steps, steps_per_epoch=args.ldm_steps // 4, val_interval=2,
                              learning_rate=args.lr, ema_decay=0.999, seed=seed, device="cpu",
                              content_conditioning=args.content_conditioning),
                   run_dir / "chain.log", f"generator of {run_dir.name}")
        (run_dir / "ldm" / "done").write_text("ok\n")
    from custom_nets.utils.checkpoint import read_stage_meta

    if bool(read_stage_meta(model, "meduet_ldm")["network"].get("content_map")) != (args.content_conditioning == "map"):
        raise SystemExit(f"{model}: trained with another content_conditioning than {args.content_conditioning!r}; "
                         "use another --out")
    return model


class PairSampler:
    """One arm+seed's generator, its scheduler and the encoder's factor extractor, loaded once."""

    def __init__(self, model: Path, ssl_ckpt: Path, bank_path: Path, args: argparse.Namespace) -> None:
        from custom_nets.engines.ldm.objective import scheduler_from_args
        from custom_nets.engines.ldm.sources import FactorExtractor
        from custom_nets.engines.ssl.factor_bank import FactorBank
        from custom_nets.nets.latent_dit import LatentDiT
        from custom_nets.utils.checkpoint import load_stage_checkpoint, read_stage_meta

        self.net = LatentDiT(**read_stage_meta(model, "meduet_ldm")["network"])
        self.meta = load_stage_checkpoint(self.net, model, "meduet_ldm")
        self.net.eval()
        self.scheduler = scheduler_from_args(self.meta["scheduler"])
        bank = FactorBank.load(bank_path)
        self.extractor = FactorExtractor(ssl_ckpt, expect_ssl_sha256=bank.meta.get("ssl_sha256"),
                                         patch_size=bank.meta["patch_size"], overlap=bank.meta["overlap"])
        self.args = args

    @torch.no_grad()
    def __call__(self, pairs: list[tuple[str, str, str, str]],
                 latents: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        """One sample per pair, conditioned on the content of X_a and the style of Y_b (unscaled latents).

        The noise of pair k is drawn from seed ``args.sample_seed + k``, the same for every arm."""
        from custom_nets.engines.ldm.sample import sample_latents

        maps = bool(self.meta["network"].get("content_map"))
        factors: dict[tuple[str, str], tuple[torch.Tensor, ...]] = {}
        for x, a, y, b in pairs:
            for key in ((x, a), (y, b)):
                if key not in factors:
                    factors[key] = self.extractor.factors_of_latent(latents[key[0]][key[1]], content_map=maps)
        content = torch.stack([factors[(x, a)][0] for x, a, _, _ in pairs])
        style = torch.stack([factors[(y, b)][1] for _, _, y, b in pairs])
        # content maps ("map" generators): the content source's token map over the whole volume
        content_map = torch.stack([factors[(x, a)][2] for x, a, _, _ in pairs]) if maps else None
        shape = (self.meta["latent_channels"], *self.meta["network"]["input_size"])
        noise = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(self.args.sample_seed + k))
                             for k in range(len(pairs))])
        z = sample_latents(self.net, noise, content, style, self.scheduler, self.args.sample_steps,
                           "euler", self.args.scale, self.args.scale, content_map=content_map)
        return z / self.meta["scale_factor"]


def evaluate(arm: str, seed: int, model: Path, ssl_ckpt: Path, bank: Path,
             sets: dict[str, dict[str, dict[str, Path]]], styles: list[str], args: argparse.Namespace
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scores of one arm+seed on both sets, and the samples (for the figures)."""
    entry: dict[str, Any] = {"arm": arm, "seed": seed, "ldm_steps": args.ldm_steps, "guidance": args.scale,
                             "sample_steps": args.sample_steps, "content_conditioning": args.content_conditioning}
    samples = {}
    sample = PairSampler(model, ssl_ckpt, bank, args)
    for which, paths in sets.items():
        anatomies = sorted(paths)
        pairs = control_pairs(anatomies, styles, args.content_sources)
        latents = {an: {st: load_latent(p) for st, p in paths[an].items()} for an in anatomies}
        z = sample(pairs, latents)
        entry[which] = control_scores(z, pairs, latents)
        # the generator's ceiling: both factors taken from the truth X_b itself (same noise), scored
        # against the same sources, so a miss here is the generator's, not the factors'
        own = sample([(x, b, x, b) for x, _, _, b in pairs], latents)
        entry[which]["truth_factors"] = control_scores(own, pairs, latents)
        samples[which] = (z, pairs, latents)
    return entry, samples


def save_grid(path: Path, z: torch.Tensor, pairs: list[tuple[str, str, str, str]],
              latents: dict[str, dict[str, torch.Tensor]], rows: int, title: str) -> None:
    """Montage: per content anatomy (rows) its samples in every requested style, and the truths below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_x: dict[str, list[int]] = {}
    for k, (x, *_rest) in enumerate(pairs):
        by_x.setdefault(x, []).append(k)
    xs = list(by_x)[:rows]
    cols = max(len(v) for v in by_x.values())
    fig, ax = plt.subplots(2 * len(xs), cols + 1, figsize=(1.6 * (cols + 1), 1.6 * 2 * len(xs)))
    mid = z.shape[-1] // 2
    # one grey scale for the whole figure (the truths' range), so appearance can be compared
    truths = torch.stack([v[0, :, :, mid] for per in latents.values() for v in per.values()])
    show = dict(cmap="gray", origin="lower", vmin=float(truths.min()), vmax=float(truths.max()))
    short = lambda st: st.replace("_nobias", "")  # noqa: E731
    for r, x in enumerate(xs):
        a = pairs[by_x[x][0]][1]
        ax[2 * r, 0].imshow(latents[x][a][0, :, :, mid].T, **show)
        ax[2 * r, 0].set_title(f"content: {x}\n{short(a)}", fontsize=6)
        ax[2 * r + 1, 0].axis("off")
        for c, k in enumerate(by_x[x]):
            _, _, y, b = pairs[k]
            ax[2 * r, c + 1].imshow(z[k, 0, :, :, mid].T, **show)
            ax[2 * r, c + 1].set_title(f"sample, style of {y}\n{short(b)}", fontsize=6)
            ax[2 * r + 1, c + 1].imshow(latents[x][b][0, :, :, mid].T, **show)
            ax[2 * r + 1, c + 1].set_title(f"truth: {x} {short(b)}", fontsize=6)
    for a_ in ax.flat:
        a_.set_xticks([]), a_.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from custom_nets.utils.io import read_json, write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--disentanglement", type=Path, default=ROOT / "outputs" / "disentanglement_cubes",
                   help="--out of benchmarks/disentanglement.py (its data/ and runs/)")
    p.add_argument("--arms", default="paper_longer,combined+domain_mean+self_rec+domain_window+domain_token+paired_longer")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "ldm_control_phantoms")
    p.add_argument("--results", type=Path, default=None, help="results JSON of every finished arm+seed")
    p.add_argument("--crop", type=int, default=8, help="factor-bank cube side (the disentanglement network's crop)")
    p.add_argument("--ldm-steps", type=int, default=6000)
    p.add_argument("--width", type=int, default=192, help="generator width; the encoder's 72 did not learn at patch 4, whose tokens hold 256 values (REPORT.md)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--content-sources", type=int, default=8, help="content anatomies per set (x 3 requested styles)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=3.0, help="content and style guidance scale")
    p.add_argument("--content-conditioning", choices=("vector", "map"), default="vector",
                   help="meduet_ldm content_conditioning: one pooled content vector per volume (the paper) or "
                        "also the content token map (use another --out: the runs are kept per folder)")
    p.add_argument("--reevaluate", action="store_true",
                   help="sample and score the finished generators again (no training; unfinished arms are skipped)")
    args = p.parse_args(argv)

    data = args.disentanglement / "data"
    datalist = data / "datalist.json"
    if not datalist.is_file():
        raise SystemExit(f"{datalist}: not found; run benchmarks/disentanglement.py --out {args.disentanglement} first")
    styles = list(read_json(datalist)["domains"])
    sets = phantom_latents(data, styles)
    log(f"{len(sets['training'])} training and {len(sets['held_out'])} held-out anatomies, {len(styles)} styles")
    entries = []
    for arm in args.arms.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            ssl_ckpt = args.disentanglement / "runs" / f"{arm}_s{seed}" / "models" / "model.pt"
            if not ssl_ckpt.is_file():
                raise SystemExit(f"{ssl_ckpt}: no trained encoder for arm {arm} seed {seed}")
            run_dir = args.out / f"{arm}_s{seed}"
            done = args.out / "results" / f"{arm}_s{seed}.json"
            if done.is_file() and not args.reevaluate:
                entries.append(read_json(done))
                continue
            t0 = time.time()
            if args.reevaluate and not (run_dir / "ldm" / "done").is_file():
                log(f"{arm} seed {seed}: no finished generator to re-evaluate; skipped")
                continue
            model = train_chain(run_dir, datalist, ssl_ckpt, seed, args)
            entry, samples = evaluate(arm, seed, model, ssl_ckpt, run_dir / "factors" / "factor_bank.pt", sets, styles, args)
            entry["val_flow_loss"] = last_val_loss(run_dir / "chain.log")
            if args.reevaluate and done.is_file():
                entry["seconds"] = read_json(done)["seconds"]  # the training run's, not the re-evaluation's
            else:
                entry["seconds"] = time.time() - t0
            for which, (z, pairs, latents) in samples.items():
                save_grid(args.out / "figures" / f"ldm_control_{arm}_s{seed}_{which}.png", z, pairs, latents, 4,
                          f"{arm} seed {seed}, {which} anatomies: samples (upper rows) and truths (lower rows), "
                          "latent channel 0, mid slice")
            write_json(done, entry)
            log(json.dumps(entry))
            entries.append(entry)
    if args.results:
        write_json(args.results, {"machine": machine(), "command": " ".join(sys.argv), "entries": entries})
    if entries:
        print(markdown_table(entries))
    for e in entries:
        print(f"{e['arm']} s{e['seed']}: " + "; ".join(
            f"{w}: beats both {e[w]['beats_both_sources']:.2f} anatomy {e[w]['anatomy_retrieval']:.2f} "
            f"(chance {e[w]['anatomy_chance']:.2f}) style {e[w]['style_retrieval']:.2f}, with the truth's own "
            f"factors: beats both {e[w]['truth_factors']['beats_both_sources']:.2f}" for w in ("training", "held_out")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
