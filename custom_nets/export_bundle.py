"""Write a self-contained zip of a bundle, as Model Zoo download and MONAI Label expect.

``python -m custom_nets.export_bundle bundles/meduet_seg --out dist/`` writes
``dist/meduet_seg_v<version>.zip`` (the name ``monai.bundle download --source github`` fetches from a
release; the version is metadata.json's) and its ``.sha256`` beside it; the zip's single top folder ``meduet_seg/`` holds the bundle (LICENSE, configs,
docs, large_files.yml, models/ when trained) and a copy of the ``custom_nets`` package. With no
bundle named, every bundle under ``bundles/`` is exported (one zip each).

Nothing outside the bundle folder travels with a Model Zoo zip or a MONAI Label app, and both put
the bundle folder on ``sys.path`` (``monai.bundle run`` does it for the current directory when run
from the bundle folder): the configs' ``custom_nets`` imports resolve to the copy inside the zip.

In the zipped configs the ``bundle_root`` default (``bundles/<name>``, relative to this
repository's root) becomes ``"."``, so that inside the extracted folder
``python -m monai.bundle run --config_file configs/inference.json`` works as written; from
elsewhere pass ``--bundle_root``. A zipped config that has both ``initialize`` and ``run`` gets the
``initialize`` steps at the front of ``run`` instead: MONAI resolves a config's imports (``custom_nets``
among them) at the first step it evaluates, but puts the bundle folder on ``sys.path`` only when
``run`` starts, so from another folder an ``initialize`` step would meet an unimportable
``custom_nets``. The steps and their order are unchanged. ``multi_gpu_train.json`` (an overlay with
``initialize`` and no ``run``) gets ``run`` = its ``initialize`` + ``train.json``'s ``run``. Training state (``models/checkpoints``), TensorBoard folders and
default output folders are left out: a Model Zoo bundle carries the exported weights only
(``models/model.pt`` with its ``model.json``, and ``model.ts`` / ``model.onnx`` when exported).

``python -m custom_nets.export_bundle onnx --model bundles/meduet_seg/models/model.pt --out
bundles/meduet_seg/models/model.onnx`` exports the trained segmenter to ONNX (run it before zipping to
ship the ONNX file too): :func:`export_segmenter_onnx`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from custom_nets.engines.seg.labels import with_labels
from custom_nets.utils.io import atomic_path, read_json

PACKAGE_DIR = Path(__file__).resolve().parent
# never packed: caches, training state, logs and default output folders
SKIP_DIRS = {"__pycache__", ".pytest_cache", "runs", "eval", "outputs", "checkpoints", "mlruns"}
SKIP_SUFFIXES = {".pyc", ".pyo"}
# a zip entry's date (ZIP cannot store earlier dates); fixed so that the same inputs give the same zip
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _files(root: Path) -> list[Path]:
    """Files under ``root`` (sorted), without caches, training state and output folders."""
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
        and p.suffix not in SKIP_SUFFIXES and not p.name.startswith(".")
    )


def _config_bytes(path: Path) -> bytes:
    """A config file as it goes into the zip: JSON configs with a top-level ``bundle_root`` get ``"."``,
    and ``initialize`` moves to the front of ``run`` (module docstring).

    An overlay with ``initialize`` but no ``run`` (``multi_gpu_train.json``, read after ``train.json``)
    gets a ``run`` of its own: its ``initialize`` steps, then the ``run`` of the config it overlays
    (its name without the ``multi_gpu_`` prefix), because the overlay's ``initialize`` replaces
    ``train.json``'s and would otherwise run before the bundle folder is on ``sys.path``.
    """
    raw = path.read_bytes()
    if path.suffix != ".json":
        return raw
    config = json.loads(raw)
    if not isinstance(config, dict):
        return raw
    base = path.with_name(path.name.removeprefix("multi_gpu_"))
    if "bundle_root" not in config and isinstance(config.get("initialize"), list) and "run" not in config \
            and base != path and base.is_file():
        base_run = json.loads(base.read_text()).get("run")
        if not isinstance(base_run, list):
            raise ValueError(f"{path}: overlays {base.name}, whose 'run' is not a list of steps")
        config["run"] = config.pop("initialize") + base_run
        return (json.dumps(config, indent=4) + "\n").encode()
    if "bundle_root" not in config:
        return raw
    config["bundle_root"] = "."
    if isinstance(config.get("initialize"), list) and isinstance(config.get("run"), list):
        config["run"] = config.pop("initialize") + config["run"]
    return (json.dumps(config, indent=4) + "\n").encode()


def _add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def bundle_entries(bundle_dir: Path, models_dir: Path | None, include_models: bool) -> Iterable[tuple[str, Path]]:
    """(path inside the bundle, source file) pairs of a bundle, ``models/`` possibly from elsewhere."""
    for f in _files(bundle_dir):
        rel = f.relative_to(bundle_dir)
        if rel.parts[0] == "models" and (models_dir is not None or not include_models):
            continue
        yield rel.as_posix(), f
    if include_models and models_dir is not None:
        for f in _files(models_dir):
            yield f"models/{f.relative_to(models_dir).as_posix()}", f


def zip_name(bundle_dir: str | Path) -> str:
    """``<name>_v<version>.zip``: the file name Model Zoo's download looks for in a release."""
    bundle_dir = Path(bundle_dir)
    version = json.loads((bundle_dir / "configs" / "metadata.json").read_text())["version"]
    return f"{bundle_dir.name}_v{version}.zip"


def with_crop_size(metadata: dict[str, Any], roi_size: Sequence[int]) -> dict[str, Any]:
    """``metadata`` with the image input's and prediction's ``spatial_shape`` set to ``roi_size``.

    The shipped metadata describes the paper-scale crop (96^3); a packed model trained at another
    crop size (the demo's) takes that one, and Model Zoo's shape check (``verify_net_in_out``) feeds
    the network a tensor of the metadata's shape.
    """
    formats = metadata.get("network_data_format", {})
    for section, key in (("inputs", "image"), ("outputs", "pred")):
        entry = formats.get(section, {}).get(key)
        if isinstance(entry, dict) and "spatial_shape" in entry:
            entry["spatial_shape"] = [int(v) for v in roi_size]
    return metadata


def write_sha256(path: Path) -> Path:
    """``<path>.sha256`` in ``sha256sum`` format (``<hex>  <file name>``), written atomically."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = path.with_name(path.name + ".sha256")
    with atomic_path(out) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n")
    return out


def export_bundle(
    bundle_dir: str | Path,
    out_dir: str | Path,
    include_models: bool = True,
    models_dir: str | Path | None = None,
) -> Path:
    """Zip ``bundle_dir`` plus ``custom_nets`` into ``out_dir/<name>_v<version>.zip`` (atomic write),
    with its sha256 beside it (``.sha256``).

    Args:
        bundle_dir: a folder with ``configs/metadata.json``; its name is the zip's top folder.
        out_dir: where the zip goes.
        include_models: pack the trained weights (``models/``) when present.
        models_dir: take ``models/`` from this folder instead of the bundle's own (for weights
            trained with ``--bundle_root`` elsewhere); same layout (``model.pt``, ``model.json``).

    Returns:
        The zip path.

    Raises:
        FileNotFoundError: ``bundle_dir`` is not a bundle, or ``models_dir`` has no ``model.pt``.
    """
    bundle_dir = Path(bundle_dir).resolve()
    if not (bundle_dir / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{bundle_dir}: not a bundle (configs/metadata.json missing)")
    if models_dir is not None:
        models_dir = Path(models_dir).resolve()
        if not (models_dir / "model.pt").is_file():
            raise FileNotFoundError(f"{models_dir}: no model.pt to pack as the bundle's models/")
    name = bundle_dir.name
    out = Path(out_dir) / zip_name(bundle_dir)
    # the labels the packed model was trained on become the zip's metadata channel_def (what MONAI
    # Label and Model Zoo read), so a model trained on other labels is not served with the defaults;
    # its crop size becomes the metadata's spatial_shape (Model Zoo's shape check feeds that shape)
    model_json = (models_dir or bundle_dir / "models") / "model.json"
    model_meta = read_json(model_json) if include_models and model_json.is_file() else {}
    trained = model_meta.get("labels")
    roi_size = (model_meta.get("network") or {}).get("roi_size")
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for rel, f in bundle_entries(bundle_dir, models_dir, include_models):
            data = _config_bytes(f) if rel.startswith("configs/") else f.read_bytes()
            if rel == "configs/metadata.json" and (trained or roi_size):
                meta = json.loads(data)
                meta = with_labels(meta, trained) if trained else meta
                meta = with_crop_size(meta, roi_size) if roi_size else meta
                data = (json.dumps(meta, indent=4) + "\n").encode()
            _add(zf, f"{name}/{rel}", data)
        for f in _files(PACKAGE_DIR):
            _add(zf, f"{name}/custom_nets/{f.relative_to(PACKAGE_DIR).as_posix()}", f.read_bytes())
    write_sha256(out)
    return out


def export_segmenter_onnx(
    model_path: str | Path,
    out: str | Path,
    opset: int = 18,
    check_atol: float | None = 1e-4,
) -> dict[str, Any]:
    """Export a trained ``meduet_seg`` checkpoint (``model.pt`` + ``model.json``) to ONNX.

    The network is rebuilt from ``model.json``, loaded strictly and exported with PyTorch's
    TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) for one crop of the training
    size, (1, 1, *roi_size) -> (1, num_classes, *roi_size): the ViT's token grid and position table
    are fixed by the crop size, as in sliding-window inference. Every operator of the network (3-D
    convolutions, group/instance norm, scaled dot-product attention, trilinear resizing) exports at
    opsets 17-20. When ``onnxruntime`` is importable the exported file is run on a random crop and
    compared with the eager network.

    Args:
        model_path: the segmenter's ``model.pt`` (``model.json`` beside it).
        out: the ``.onnx`` file to write (atomically).
        opset: ONNX opset version.
        check_atol: largest allowed absolute difference between ONNX Runtime and eager logits
            (None: no check).

    Returns:
        {"path": out, "input_shape": [...], "opset": opset, "max_abs_diff": float or None}.

    Raises:
        CheckpointError: missing or mismatching checkpoint.
        AssertionError: ONNX Runtime's output differs from eager by more than ``check_atol``.
    """
    import warnings

    import torch

    from custom_nets.engines.seg.model import build_segmenter, load_segmenter_weights, require_checkpoint

    require_checkpoint(model_path)
    net = build_segmenter({}, model_ckpt=model_path)
    load_segmenter_weights(net, model_path)
    net.eval()
    shape = [1, net.image_channels, *net.roi_size]
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(net, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["pred"])
    diff = None
    if check_atol is not None:
        try:
            import onnxruntime
        except ImportError:
            onnxruntime = None
        if onnxruntime is not None:
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
            with torch.no_grad():
                want = net(x)
            diff = float((got - want).abs().max())
            if diff > check_atol:
                raise AssertionError(f"{out}: ONNX Runtime differs from eager by {diff:.3g} (> {check_atol})")
    return {"path": Path(out), "input_shape": shape, "opset": opset, "max_abs_diff": diff}


def onnx_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom_nets.export_bundle onnx",
                                     description="Export a trained meduet_seg model.pt to ONNX (checked with ONNX Runtime).")
    parser.add_argument("--model", default="bundles/meduet_seg/models/model.pt", help="meduet_seg model.pt")
    parser.add_argument("--out", default=None, help="output .onnx (default: model.onnx beside the model)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (17-20 tested)")
    parser.add_argument("--atol", type=float, default=1e-4, help="allowed |ONNX - eager| on a random crop")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.model).with_name("model.onnx"))
    info = export_segmenter_onnx(args.model, out, opset=args.opset, check_atol=args.atol)
    diff = "not checked (onnxruntime missing)" if info["max_abs_diff"] is None else f"{info['max_abs_diff']:.3g}"
    print(f"{info['path']}: input {info['input_shape']}, opset {info['opset']}, max |onnx - eager| {diff}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["onnx"]:
        return onnx_main(argv[1:])
    parser = argparse.ArgumentParser(description="Write a self-contained zip of MeDUET bundles (one per bundle); "
                                                 "`onnx --model ...` exports the segmenter to ONNX instead.")
    parser.add_argument("bundle", nargs="*", help="bundle folder(s), e.g. bundles/meduet_seg (default: all under bundles/)")
    parser.add_argument("--out", default="dist", help="output folder (default dist/)")
    parser.add_argument("--no-models", action="store_true", help="leave models/ out of the zip")
    parser.add_argument("--models-dir", default=None,
                        help="pack this folder as models/ (one bundle only), e.g. a --bundle_root's models/")
    args = parser.parse_args(argv)
    bundles = args.bundle or sorted(str(p.parent.parent) for p in Path("bundles").glob("*/configs/metadata.json"))
    if not bundles:
        parser.error("no bundle given and none found under bundles/")
    if args.models_dir and len(bundles) != 1:
        parser.error("--models-dir applies to one bundle; name exactly one")
    for b in bundles:
        try:
            print(export_bundle(b, args.out, include_models=not args.no_models, models_dir=args.models_dir))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
