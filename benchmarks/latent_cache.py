"""Random 24^3 latent crops per second: memory-mapped float16 .npy cache vs gzipped NIfTI latents.

Writes ``--volumes`` synthetic latents of shape 4 x X x Y x Z (default 20 of 4 x 128 x 128 x 96, the
latent of a 512 x 512 x 384 voxel CT at 1.5 mm) in both formats, then streams random crops through
the training path (:class:`custom_nets.data.latent_datasets.LatentCropDataset` with flips and rotations,
a torch DataLoader with ``--workers`` worker processes) and, for NIfTI, the same crops read with
nibabel's array proxy (which has to decompress the gzip stream up to the crop). Results go to the
"## Latent cache" section of benchmarks/REPORT.md.

    OMP_NUM_THREADS=1 python benchmarks/latent_cache.py [--volumes 20] [--workers 2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_nets.data.latent_cache import write_latent
from custom_nets.data.latent_datasets import LatentCropDataset, augment_latent
from report_tools import machine, write_report  # noqa: E402  (same folder)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Latent cache"


class NiftiCropDataset(torch.utils.data.Dataset):
    """The same random crops and augmentation, read from gzipped 4-D NIfTI latents (X, Y, Z, C) with nibabel."""

    def __init__(self, paths: Sequence[Path], crop: int, length: int) -> None:
        self.paths, self.crop, self.length = [str(p) for p in paths], crop, length
        self.rng = np.random.default_rng()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        import nibabel as nib

        img = nib.load(self.paths[index % len(self.paths)])
        starts = [int(torch.randint(0, n - self.crop + 1, (1,))) for n in img.shape[:3]]
        window = img.dataobj[tuple(slice(s, s + self.crop) for s in starts)]
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(window, dtype=np.float32), -1, 0)))
        return {"latent": augment_latent(x, 0.2, 0.2, self.rng), "domain_index": 0}


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by the given live processes (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)
    return total


def crops_per_second(dataset: torch.utils.data.Dataset, workers: int, seconds: float, batch: int = 16
                     ) -> tuple[float, float, int]:
    """Stream batches for about ``seconds`` after a warm-up.

    Returns:
        (crops per wall-clock second, crops per CPU second of the workers and the main process, crops).
        The second figure does not depend on how busy the machine is.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=True,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    it = iter(loader)
    for _ in range(max(1, workers) * 4):
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    n, t0, c0 = 0, time.perf_counter(), _cpu_seconds(pids) + time.process_time()
    for b in it:
        n += b["latent"].shape[0]
        if time.perf_counter() - t0 > seconds:
            break
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(pids) + time.process_time() - c0
    del it
    return n / wall, n / max(cpu, 1e-9), n


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=int, default=20)
    p.add_argument("--shape", default="128,128,96", help="latent X,Y,Z")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--crop", type=int, default=24)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--workdir", type=Path, default=None, help="where the synthetic caches go (default: a temp dir)")
    p.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "REPORT.md")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)

    import nibabel as nib

    torch.set_num_threads(1)
    shape = tuple(int(s) for s in args.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="latent_bench_", dir=args.workdir))
    mach = machine()
    try:
        rng = np.random.default_rng(0)
        npy, gz = [], []
        t0 = time.perf_counter()
        for i in range(args.volumes):
            z = rng.normal(size=(args.channels, *shape)).astype(np.float32)
            npy.append(write_latent(work / f"v{i}.npy", z))
            gz.append(work / f"v{i}.nii.gz")
            nib.save(nib.Nifti1Image(np.moveaxis(z, 0, -1), np.eye(4)), str(gz[-1]))
        write_s = time.perf_counter() - t0
        size_npy = sum(f.stat().st_size for f in npy) / 1e6
        size_gz = sum(f.stat().st_size for f in gz) / 1e6
        items = [{"latent": str(f), "domain_index": 0} for f in npy]
        length = 10**6
        rate_npy, cpu_npy, n_npy = crops_per_second(LatentCropDataset(items, crop=args.crop, samples_per_epoch=length),
                                           args.workers, args.seconds)
        rate_gz, cpu_gz, n_gz = crops_per_second(NiftiCropDataset(gz, args.crop, length), args.workers, args.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    vol = f"{args.channels}x{'x'.join(map(str, shape))}"
    section = "\n".join([
        SECTION,
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/latent_cache.py --volumes {args.volumes} --shape {args.shape} "
        f"--workers {args.workers} --seconds {args.seconds:g}` ({time.strftime('%Y-%m-%d')})",
        "",
        f"Random {args.crop}^3 crops (with the training flips/rotations, p 0.2) from {args.volumes} latents of "
        f"{vol}, streamed by a torch DataLoader with {args.workers} worker processes (batches of 16), page cache warm.",
        "",
        "| cache format | size on disk | crops/s (wall clock, machine as loaded) | crops per CPU second | "
        f"projected crops/s on {args.workers} idle cores | crops timed |",
        "|---|---|---|---|---|---|",
        f"| float16 .npy, memory-mapped (this project) | {size_npy:.0f} MB | **{rate_npy:,.0f}** | {cpu_npy:,.0f} | "
        f"**{args.workers * cpu_npy:,.0f}** | {n_npy} |",
        f"| float32 gzipped NIfTI (nibabel array proxy) | {size_gz:.0f} MB | {rate_gz:,.1f} | {cpu_gz:,.1f} | "
        f"{args.workers * cpu_gz:,.1f} | {n_gz} |",
        "",
        "Crops per CPU second count the CPU time of the worker processes and the main process during the "
        "timed window; the projection multiplies it by the number of workers (what the same work gives when "
        "it has the cores to itself). The wall-clock figure depends on how busy the machine was "
        "(load average below).",
        "",
        f"Speed-up {rate_npy / max(rate_gz, 1e-9):,.0f}x (wall clock). Writing both caches took {write_s:.0f} s. "
        f"Random normal latents compress poorly, so the gzipped files are larger than real ones would be; "
        f"the NIfTI reader still has to inflate the stream up to every crop.",
        f"Machine: {mach}.",
        "",
    ])
    print(section)
    if not args.no_report:
        write_report(args.report, section)
        print(f"updated {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
