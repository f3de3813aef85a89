"""How good can a style swap be on the disentanglement benchmark's data? Oracle restyles of A.

The swap test of ``benchmarks/disentanglement.py`` asks that decode(content A, style B) be closer to
the noise-averaged truth (A's anatomy in B's style) than both trivial answers (A and B themselves,
raw or rebuilt) in at least 75 % of held-out pairs. This script measures, on the same data, pairs
and image-space error, what restyles that are *given more than the method has* achieve, so that
the threshold can be read against an upper bound:

- ``domain_affine``: A's latent standardised per channel with the training statistics of A's domain
  and rescaled with those of B's (the best a per-channel moment criterion could ask of a swap);
- ``domain_shift``: the same, means only;
- ``volume_adain``: A's latent with B's own per-channel volume moments (AdaIN);
- ``token_restyle``: a network fitted on the *paired* training anatomies (every training anatomy is
  rendered in every style) that maps A's latent, voxel by voxel, to the same anatomy in B's style,
  told only B's domain (a one-hot channel); kernel 1: no spatial context;
- ``context_restyle``: the same with 3^3 convolutions (context of 7^3 latent voxels), so it can also
  average the noise that the truth has averaged out.

The fitted oracles use supervision the method never has (the same anatomy in two styles). If even
they do not beat the trivial answers in 75 % of pairs, the threshold is out of reach on this data
whatever the disentanglement, and the failure of the swaps says nothing about the method.

Usage (reads the data cached by a disentanglement run, or renders it)::

    python benchmarks/swap_oracles.py --out outputs/disentanglement_cubes \\
        --results benchmarks/results/swap_oracles.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import disentanglement as dis
from report_tools import machine

from custom_nets.data.latent_cache import open_latent
from custom_nets.utils.io import write_json

ORACLES = ("domain_affine", "domain_shift", "volume_adain", "token_restyle", "context_restyle")


def log(msg: str) -> None:
    print(f"[swap_oracles {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load(path: str | Path) -> torch.Tensor:
    return torch.from_numpy(np.array(open_latent(path), dtype=np.float32))


class Restyler(torch.nn.Module):
    """(latent, one-hot target domain) -> latent in the target domain; ``kernel`` 1 is voxel-wise.

    Args:
        channels: latent channels.
        domains: number of domains (the one-hot condition).
        width: hidden channels.
        kernel: spatial kernel of the two hidden convolutions (1 or 3).
    """

    def __init__(self, channels: int, domains: int, width: int = 32, kernel: int = 3) -> None:
        super().__init__()
        pad = kernel // 2
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(channels + domains, width, kernel, padding=pad, padding_mode="replicate"), torch.nn.GELU(),
            torch.nn.Conv3d(width, width, kernel, padding=pad, padding_mode="replicate"), torch.nn.GELU(),
            torch.nn.Conv3d(width, channels, 1),
        )
        torch.nn.init.zeros_(self.body[-1].weight)  # starts as the identity (the residual below)
        torch.nn.init.zeros_(self.body[-1].bias)
        self.domains = domains

    def forward(self, latent: torch.Tensor, target_domain: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(target_domain, self.domains).float()
        cond = onehot[:, :, None, None, None].expand(-1, -1, *latent.shape[2:])
        return latent + self.body(torch.cat([latent, cond], 1))


def fit_restyler(pairs: Sequence[tuple[torch.Tensor, int, torch.Tensor]], domains: int, kernel: int, seed: int,
                 steps: int, batch: int = 16, lr: float = 2e-3) -> Restyler:
    """Fit a :class:`Restyler` on (source latent, target domain, target latent) training pairs."""
    torch.manual_seed(seed)
    net = Restyler(pairs[0][0].shape[0], domains, kernel=kernel)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    src = torch.stack([p[0] for p in pairs])
    dom = torch.tensor([p[1] for p in pairs])
    tgt = torch.stack([p[2] for p in pairs])
    for _ in range(steps):
        idx = torch.randint(len(pairs), (batch,), generator=gen)
        loss = (net(src[idx], dom[idx]) - tgt[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def training_pairs(datalist: dict[str, Any], root: Path, styles: Sequence[str]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Every ordered pair of two different styles of the same training anatomy."""
    by_anatomy: dict[str, dict[str, torch.Tensor]] = {}
    for it in datalist["training"]:
        by_anatomy.setdefault(it["content_id"], {})[it["domain"]] = load(root / it["latent"])
    return [(vols[a], styles.index(b), vols[b]) for vols in by_anatomy.values() for a in vols for b in vols if a != b]


def domain_moments(datalist: dict[str, Any], root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per training domain: per-channel mean and standard deviation over its volumes' voxels."""
    vols: dict[str, list[torch.Tensor]] = {}
    for it in datalist["training"]:
        vols.setdefault(it["domain"], []).append(load(root / it["latent"]))
    out = {}
    for d, v in vols.items():
        x = torch.stack(v)
        out[d] = (x.mean(dim=(0, 2, 3, 4)).view(-1, 1, 1, 1), x.std(dim=(0, 2, 3, 4)).view(-1, 1, 1, 1))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "disentanglement_cubes",
                   help="a disentanglement run's working folder (its data are reused; rendered if missing)")
    p.add_argument("--results", type=Path, default=None, help="results JSON (default <out>/swap_oracles.json)")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the fitted oracles")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of each fitted oracle")
    p.add_argument("--max-pairs", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = args.out.resolve()
    dargs = dis.parse_args(["--out", str(out), "--max-pairs", str(args.max_pairs)])
    data = dis.build_data(out, dargs)
    datalist = json.loads(Path(data["latent_datalist"]).read_text())
    root = Path(data["latent_datalist"]).parent
    styles = list(data["styles"])
    tok = data["tokenizer"]
    moments = domain_moments(datalist, root)
    train = training_pairs(datalist, root, styles)
    log(f"{len(train)} paired training volumes; fitting {args.seeds} seed(s) x 2 restylers, {args.steps} steps each")
    fitted: dict[str, list[Restyler]] = {"token_restyle": [], "context_restyle": []}
    for seed in range(args.seeds):
        for name, kernel in (("token_restyle", 1), ("context_restyle", 3)):
            fitted[name].append(fit_restyler(train, len(styles), kernel, seed, args.steps))
    eval_by, pairs = dis.swap_pairs(data, args.max_pairs)
    mse = lambda a, b: float((a.float() - b.float()).pow(2).mean())
    rows = []
    with torch.no_grad():
        for a, b in pairs:
            ia, ib, it_truth = eval_by[a], eval_by[b], eval_by[(a[0], b[1])]
            za, zb = load(ia["latent_path"]), load(ib["latent_path"])
            truth = torch.from_numpy(data["gt"][(a[0], b[1])][0])
            (ma, sa), (mb, sb) = moments[ia["domain"]], moments[ib["domain"]]
            va = (za.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1), za.std(dim=(1, 2, 3)).view(-1, 1, 1, 1))
            vb = (zb.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1), zb.std(dim=(1, 2, 3)).view(-1, 1, 1, 1))
            answers = {
                "a_raw": za, "b_raw": zb, "truth_one_rendering": load(it_truth["latent_path"]),
                "domain_affine": (za - ma) / sa * sb + mb,
                "domain_shift": za - ma + mb,
                "volume_adain": (za - va[0]) / va[1] * vb[1] + vb[0],
            }
            d = torch.tensor([styles.index(ib["domain"])])
            row = {k: mse(tok.decode(v), truth) for k, v in answers.items()}
            for name, nets in fitted.items():
                for seed, net in enumerate(nets):
                    row[f"{name}_s{seed}"] = mse(tok.decode(net(za[None], d)[0]), truth)
            rows.append(row)
    keys = list(rows[0])
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    beats = {k: float(np.mean([r[k] < min(r["a_raw"], r["b_raw"]) for r in rows]))
             for k in keys if k not in ("a_raw", "b_raw")}
    result = {
        "pairs": len(rows), "image_mse_to_truth": mean, "beats_both_raw": beats,
        "threshold": 0.75, "seeds": args.seeds, "steps": args.steps, "training_pairs": len(train),
        "seconds": time.perf_counter() - t0, "machine": machine(),
        "command": "python benchmarks/swap_oracles.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_json(args.results or out / "swap_oracles.json", result)
    for k in keys:
        log(f"{k:24s} image MSE {mean[k]:.4f}" + (f"  beats both raw {beats[k]:.2f}" if k in beats else ""))
    return result


if __name__ == "__main__":
    main()
