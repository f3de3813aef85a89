"""Convergence of the latent generator: MeDUET initialisation versus random initialisation.

Runs the meduet_ldm training config twice with the demo overlay, through ``python -m monai.bundle
run`` exactly as a user would, on the same latent cache, factor bank, seed and number of steps;
the only difference is ``init_from_ssl``. The validation flow-matching loss (fixed noise and
timesteps, logged to TensorBoard per training epoch and converted to steps here) of both runs is printed as a
Markdown table and plotted.

It needs the demo's upstream outputs (latent cache, factor bank and a trained MeDUET encoder whose
width and depth match the demo generator), e.g. from ``python -m meduet_demo.run``:

    python benchmarks/ldm_convergence.py --demo-dir outputs/demo --max-steps 200 --val-interval 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report_tools import bundle_run_command, run_bundle  # noqa: E402  (same folder)


def run_training(out: Path, init: bool, args: argparse.Namespace) -> Path:
    """One training run; returns its TensorBoard folder."""
    configs = [str(ROOT / "bundles/meduet_ldm/configs/train.json"), str(ROOT / "bundles/meduet_ldm/configs/demo.json")]
    run_dir = out / ("meduet_init" if init else "random_init")
    cmd = bundle_run_command(
        configs, ROOT / "bundles/meduet_ldm", latent_datalist=args.demo_dir / "latents/datalist.json",
        factor_bank=args.demo_dir / "factors/factor_bank.pt", ssl_ckpt=args.ssl_ckpt, init_from_ssl=init,
        output_dir=run_dir, ckpt_dir=run_dir / "models" / "checkpoints", model_path=run_dir / "models" / "model.pt",
        max_steps=args.max_steps, steps_per_epoch=args.steps_per_epoch, val_interval=args.val_interval, seed=args.seed)
    print("$", " ".join(cmd), f"(log {run_dir / 'train.log'})", flush=True)
    run_bundle(cmd, run_dir / "train.log", f"meduet_ldm training ({run_dir.name})")
    return run_dir / "tensorboard"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=ROOT / "outputs/demo", help="output folder of meduet_demo.run")
    parser.add_argument("--ssl-ckpt", type=Path, default=ROOT / "bundles/meduet_ssl/models/model.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/bench/ldm_convergence")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--val-interval", type=int, default=2, help="epochs between validations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for need in (args.demo_dir / "latents/datalist.json", args.demo_dir / "factors/factor_bank.pt", args.ssl_ckpt):
        if not need.is_file():
            sys.exit(f"{need}: not found; run `python -m meduet_demo.run` (or the meduet_vae/meduet_ssl demo configs) first")

    from custom_nets.utils.report import read_scalars

    curves = {}
    for init in (True, False):
        logdir = run_training(args.out, init, args)
        series = read_scalars(logdir)
        if "val_loss" not in series:
            sys.exit(f"{logdir}: no val_loss series written")
        # validation is logged per training epoch of steps_per_epoch steps
        curves["MeDUET init" if init else "random init"] = {e * args.steps_per_epoch: v for e, v in series["val_loss"]}
    steps = sorted(set().union(*[c.keys() for c in curves.values()]))
    print("\n| training step | " + " | ".join(curves) + " |")
    print("|---|" + "---|" * len(curves))
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{curves[k].get(s, float('nan')):.4f}" for k in curves) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, c in curves.items():
        xs = sorted(c)
        ax.plot(xs, [c[x] for x in xs], marker=".", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation flow-matching loss")
    ax.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "ldm_convergence.png", dpi=100)
    (args.out / "ldm_convergence.json").write_text(json.dumps({k: sorted(v.items()) for k, v in curves.items()}, indent=1))
    print(f"\nplot: {args.out / 'ldm_convergence.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
