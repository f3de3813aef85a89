"""Write a self-contained zip of a bundle, as Model Zoo download and MONAI Label expect.

``python -m custom_nets.export_bundle bundles/meduet_seg --out dist/`` writes
``dist/meduet_seg.zip`` whose single top folder ``meduet_seg/`` holds the bundle (configs, docs,
LICENSE, models when trained) and a copy of the ``custom_nets`` package. MONAI Label and
``monai.bundle run`` put the bundle folder on ``sys.path``, so the configs' ``custom_nets`` imports
resolve to that copy: nothing outside the zip is needed.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from custom_nets.utils.io import atomic_path

PACKAGE_DIR = Path(__file__).resolve().parent
SKIP_DIRS = {"__pycache__", "runs", "eval", ".pytest_cache"}


def _files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts) and p.suffix != ".pyc"
    )


def export_bundle(bundle_dir: str | Path, out_dir: str | Path, include_models: bool = True) -> Path:
    """Zip ``bundle_dir`` plus ``custom_nets`` into ``out_dir/<bundle name>.zip`` (atomic write).

    Args:
        bundle_dir: a folder with ``configs/metadata.json``.
        out_dir: where the zip goes.
        include_models: also pack ``models/`` (the trained weights) when present.

    Returns:
        The zip path.
    """
    bundle_dir = Path(bundle_dir).resolve()
    if not (bundle_dir / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{bundle_dir}: not a bundle (configs/metadata.json missing)")
    name = bundle_dir.name
    out = Path(out_dir) / f"{name}.zip"
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in _files(bundle_dir):
            rel = f.relative_to(bundle_dir)
            if rel.parts[0] == "models" and not include_models:
                continue
            zf.write(f, f"{name}/{rel.as_posix()}")
        for f in _files(PACKAGE_DIR):
            zf.write(f, f"{name}/custom_nets/{f.relative_to(PACKAGE_DIR).as_posix()}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a self-contained zip of a MeDUET bundle.")
    parser.add_argument("bundle", nargs="+", help="bundle folder(s), e.g. bundles/meduet_seg")
    parser.add_argument("--out", default="dist", help="output folder (default dist/)")
    parser.add_argument("--no-models", action="store_true", help="leave models/ out of the zip")
    args = parser.parse_args(argv)
    for b in args.bundle:
        print(export_bundle(b, args.out, include_models=not args.no_models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
