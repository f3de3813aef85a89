"""Does the generator follow its conditions? Content and style control of generated latents.

For K content sources and K style sources drawn from the factor bank (spread over the domains),
the trained generator samples one latent per (content, style) pair with the bundle's guided
sampler; the MeDUET encoder then extracts the content and style vectors of every generated latent
(the factor bank's recipe) and we report:

- content: cosine similarity of a sample's content vector to its content source's vector, against
  its mean similarity to every other factor-bank volume, and how often the content source is the
  most similar bank volume (retrieval top-1);
- style: domain accuracy of a style classifier on the samples' style vectors against the
  requested style source's domain (and, for contrast, against the content source's domain when the
  two differ). Classifiers: nearest domain centroid of the bank's style vectors, and the MeDUET
  network's own style domain head.

    python benchmarks/ldm_control.py --model bundles/meduet_ldm/models/model.pt \
        --factor-bank outputs/demo/factors/factor_bank.pt --ssl-ckpt bundles/meduet_ssl/models/model.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from custom_nets.engines.ldm.objective import scheduler_from_args
    from custom_nets.engines.ssl.factor_bank import FactorBank
    from custom_nets.engines.ldm.sample import sample_latents
    from custom_nets.engines.ldm.sources import FactorExtractor, default_rows
    from custom_nets.nets.latent_dit import LatentDiT
    from custom_nets.utils.checkpoint import load_stage_checkpoint, read_stage_meta

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "bundles/meduet_ldm/models/model.pt")
    parser.add_argument("--factor-bank", type=Path, default=ROOT / "outputs/demo/factors/factor_bank.pt")
    parser.add_argument("--ssl-ckpt", type=Path, default=ROOT / "bundles/meduet_ssl/models/model.pt")
    parser.add_argument("--sources", type=int, default=4, help="K content and K style sources")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scale", type=float, default=3.0, help="content and style guidance scale")
    parser.add_argument("--content-scale", type=float, help="content guidance scale (default --scale)")
    parser.add_argument("--style-scale", type=float, help="style guidance scale (default --scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)

    net = LatentDiT(**read_stage_meta(args.model, "meduet_ldm")["network"])
    meta = load_stage_checkpoint(net, args.model, "meduet_ldm")
    net.eval()
    bank = FactorBank.load(args.factor_bank)
    extractor = FactorExtractor(args.ssl_ckpt, expect_ssl_sha256=meta.get("factor_ssl_sha256"),
                                patch_size=bank.meta.get("patch_size", 24), overlap=bank.meta.get("overlap", 0.25))
    scheduler = scheduler_from_args(meta["scheduler"])
    content_scale = args.scale if args.content_scale is None else args.content_scale
    style_scale = args.scale if args.style_scale is None else args.style_scale
    rows = default_rows(bank, 2 * args.sources)
    content_rows, style_rows = rows[0::2][: args.sources], rows[1::2][: args.sources]
    pairs = [(c, s) for c in content_rows for s in style_rows]
    shape = [meta["latent_channels"], *meta["network"]["input_size"]]
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(pairs), *shape, generator=gen)
    content = bank.content[[c for c, _ in pairs]]
    style = bank.style[[s for _, s in pairs]]
    with torch.no_grad():
        z = sample_latents(net, noise, content, style, scheduler, args.steps, args.sampler, content_scale, style_scale)
    z = z / meta["scale_factor"]

    ssl = extractor.ssl_model()
    gen_c, gen_s = zip(*(extractor.factors_of_latent(zi) for zi in z))
    gen_c, gen_s = torch.stack(gen_c), torch.stack(gen_s)

    # content: similarity to the source vs to the other bank volumes
    sims = F.normalize(gen_c, dim=1) @ F.normalize(bank.content, dim=1).T  # (P, N)
    src = torch.tensor([c for c, _ in pairs])
    to_source = sims[torch.arange(len(pairs)), src]
    others = sims.clone()
    others[torch.arange(len(pairs)), src] = float("nan")
    to_others = others.nanmean(dim=1)
    top1 = (sims.argmax(dim=1) == src).float().mean()

    # style: nearest domain centroid and the MeDUET style domain head
    want = bank.domain_index[[s for _, s in pairs]]
    content_dom = bank.domain_index[src]
    domains = sorted(set(bank.domain_index.tolist()))
    centroids = torch.stack([F.normalize(bank.style[bank.domain_index == d], dim=1).mean(0) for d in domains])
    pred_centroid = torch.tensor(domains)[(F.normalize(gen_s, dim=1) @ F.normalize(centroids, dim=1).T).argmax(1)]
    with torch.no_grad():
        pred_head = ssl.style_domain_head(gen_s.to(next(ssl.parameters()).device)).argmax(1).cpu()
    differ = want != content_dom
    res = {
        "pairs": len(pairs), "steps": args.steps, "sampler": args.sampler, "content_scale": content_scale, "style_scale": style_scale,
        "content_cos_to_source": float(to_source.mean()), "content_cos_to_others": float(to_others.mean()),
        "content_retrieval_top1": float(top1), "chance_top1": 1.0 / len(bank),
        "style_acc_centroid_vs_style_source": float((pred_centroid == want).float().mean()),
        "style_acc_head_vs_style_source": float((pred_head == want).float().mean()),
        "style_acc_centroid_vs_content_source": float((pred_centroid[differ] == content_dom[differ]).float().mean()) if differ.any() else None,
        "style_acc_head_vs_content_source": float((pred_head[differ] == content_dom[differ]).float().mean()) if differ.any() else None,
        "chance_style_acc": 1.0 / len(domains),
    }
    for k, v in res.items():
        print(f"{k}: {v if not isinstance(v, float) else round(v, 4)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
