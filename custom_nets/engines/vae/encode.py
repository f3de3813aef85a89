"""Encode a datalist into the latent cache, and decode cached latents back into NIfTI images.

:class:`LatentCacheEncoder` (meduet_vae ``configs/inference.json``) preprocesses every volume of an
image datalist, encodes it with the tiled posterior-mean encoder, writes one float16 ``.npy`` per
volume with a small JSON record beside it, skips volumes already encoded by the same VAE, and
finally writes the latent datalist (see :mod:`custom_nets.data.latent_cache`).

:class:`LatentCacheDecoder` (``configs/decode.json``) decodes cached latents into NIfTI files on the
preprocessed 1.5 mm grid and, optionally, resampled back onto each source image's original grid.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from tqdm import tqdm

from custom_nets.data.datalist import load_datalist
from custom_nets.data.latent_cache import load_latent_datalist, open_latent, write_latent
from custom_nets.engines.common.outputs import check_output_dir
from custom_nets.nets.vae import DOWNSAMPLE, decode_latent, encode_volume, latent_affine
from custom_nets.utils.checkpoint import read_stage_meta
from custom_nets.utils.errors import InputError
from custom_nets.utils.flags import as_bool
from custom_nets.utils.inputs import is_missing, note_missing
from custom_nets.utils.io import read_json, save_nifti, write_json
from custom_nets.utils.visualize import save_slice_montage

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "testing")
CT_WINDOW = (-175.0, 250.0)  # the preprocessing window; decoding maps 0..1 back onto it


# ---------------------------------------------------------------------------------------------
# Inferers
# ---------------------------------------------------------------------------------------------


class TiledVAEEncoder:
    """Inferer: ``(network, image (B, 1, X, Y, Z)) -> posterior mean (B, C, X/4, Y/4, Z/4)``, tiled.

    Args:
        roi: tile edge in image voxels (``None``: one untiled pass).
        overlap: tile overlap of the sliding-window mode.
        exact: stage-wise exact tiling with whole-volume GroupNorm statistics (default) or MAISI-style
            sliding window with Gaussian blending.
        store_dtype: "float32" or "bfloat16" for the whole-volume intermediates of the exact mode.
        progress: tqdm bars per tile.
        granularity: stage split of the exact mode, "resolution" (least memory) or "block" (least
            recomputation); see :func:`custom_nets.nets.vae.split_stages`.
    """

    def __init__(self, roi: int | None = 128, overlap: float = 0.25, exact: bool = True,
                 store_dtype: str = "float32", progress: bool = False, granularity: str = "resolution") -> None:
        self.roi, self.overlap = roi, float(overlap)
        self.exact, self.progress = as_bool(exact, "exact_tiling"), as_bool(progress, "progress")
        self.store_dtype, self.granularity = getattr(torch, store_dtype), granularity

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        return encode_volume(network, inputs, roi=self.roi, overlap=self.overlap, exact=self.exact,
                             store_dtype=self.store_dtype, progress=self.progress, granularity=self.granularity)


class TiledVAEDecoder:
    """Inferer: ``(network, latent (B, C, x, y, z)) -> image (B, 1, 4x, 4y, 4z)``, tiled (see :class:`TiledVAEEncoder`).

    Args:
        roi: tile edge in latent voxels.
        overlap, exact, store_dtype, progress, granularity: as for :class:`TiledVAEEncoder`; the
            decoder defaults to "block", which spares the full-resolution upsampling convolution
            one recomputation per GroupNorm layer.
        low_memory: exact mode: stages replace their input by their output slab by slab
            (:func:`custom_nets.nets.vae.run_blocks_slabs`; the same image, about half the stored bytes).
        tile_cap: largest tile edge in output voxels of a stage in the low-memory mode.
    """

    def __init__(self, roi: int | None = 32, overlap: float = 0.25, exact: bool = True,
                 store_dtype: str = "float32", progress: bool = False, granularity: str = "block",
                 low_memory: bool = True, tile_cap: int | None = 64) -> None:
        self.roi, self.overlap = roi, float(overlap)
        self.exact, self.progress = as_bool(exact, "exact_tiling"), as_bool(progress, "progress")
        self.store_dtype, self.granularity = getattr(torch, store_dtype), granularity
        self.low_memory, self.tile_cap = as_bool(low_memory, "low_memory_tiling"), tile_cap

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        return decode_latent(network, inputs, roi=self.roi, overlap=self.overlap, exact=self.exact,
                             store_dtype=self.store_dtype, progress=self.progress, granularity=self.granularity,
                             low_memory=self.low_memory, tile_cap=self.tile_cap)


# ---------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------


def datalist_items(datalist: str | Path, splits: Sequence[str] = ("training", "validation"),
                   check_headers: bool = True, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Items of the named splits of an image datalist, validated, each tagged with ``"split"``.

    Splits other than "training" may be absent. The datalist's ``domains`` are kept on each item
    (``"domains"``) so that the latent datalist can list them. ``missing_ok``: a missing datalist
    gives no items (see :func:`custom_nets.utils.inputs.require_inputs`).
    """
    if as_bool(missing_ok, "missing_ok") and is_missing(datalist):
        note_missing(datalist, "datalist")
        return []
    data = load_datalist(datalist, keys=("training",) if "training" in splits else (), check_headers=check_headers)
    items = []
    for split in splits:
        for item in data.get(split) or []:
            items.append({**item, "split": split, "domains": list(data["domains"]), "datalist": str(datalist)})
    if not items:
        raise InputError(datalist, f"no items in splits {list(splits)}")
    return items


def latent_name(item: Mapping[str, Any]) -> str:
    """Cache file name for an item: ``<domain>/<image stem>_<8 hex of the image path>.npy`` (unique per source;
    a random-intensity copy adds ``_copy<k>``, :mod:`custom_nets.data.intensity_copies`)."""
    image = str(item["image"])
    stem = Path(image).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    digest = hashlib.sha1(os.path.abspath(image).encode()).hexdigest()[:8]
    domain = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(item.get("domain", "unknown")))
    copy = f"_copy{int(item['copy_index'])}" if item.get("copy_index") is not None else ""
    return f"{domain}/{stem}_{digest}{copy}.npy"


def _first(batch: list) -> Any:
    """DataLoader collate for batch size 1 that keeps the item (and its MetaTensor meta) as it is."""
    return batch[0]


def _as_list(a: Any) -> list:
    return np.asarray(torch.as_tensor(a).cpu(), dtype=np.float64).tolist()


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


class LatentCacheEncoder:
    """Encode every volume of ``dataset`` into ``output_dir`` and write the latent datalist.

    Args:
        dataset: MONAI ``Dataset`` whose ``data`` are :func:`datalist_items` and whose transform is
            :func:`custom_nets.data.transforms.preprocess_transforms` (``image`` -> MetaTensor).
        network: the VAE (eval mode, weights loaded).
        inferer: :class:`TiledVAEEncoder`.
        output_dir: cache folder (must differ from every input folder).
        vae_ckpt: the checkpoint the network was loaded from (its sha256 tags the cache).
        device: where the network runs.
        latent_datalist: output JSON path (default ``<output_dir>/datalist.json``).
        overwrite: re-encode volumes already encoded with the same VAE.
        num_workers: DataLoader workers that preprocess the next volume while one is encoded.
        progress: tqdm bar over volumes.
        previews: also write ``previews/<latent name>.png``: the preprocessed image's central slices
            above those of each latent channel.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        network: torch.nn.Module,
        inferer: TiledVAEEncoder,
        output_dir: str | Path,
        vae_ckpt: str | Path,
        device: str | torch.device = "cpu",
        latent_datalist: str | Path | None = None,
        overwrite: bool = False,
        num_workers: int = 0,
        progress: bool = True,
        previews: bool = True,
    ) -> None:
        self.dataset, self.network, self.inferer = dataset, network, inferer
        self.previews = as_bool(previews, "latent_previews")
        self.output_dir = Path(output_dir).resolve()
        self.vae_ckpt = Path(vae_ckpt)
        self.device = torch.device(device)
        self.latent_datalist = Path(latent_datalist) if latent_datalist else self.output_dir / "datalist.json"
        self.overwrite, self.num_workers = as_bool(overwrite, "overwrite"), int(num_workers)
        self.progress = as_bool(progress, "progress")

    # the record beside each .npy: what the latent datalist needs, plus the VAE that wrote it
    def _record_path(self, item: Mapping[str, Any]) -> Path:
        return (self.output_dir / latent_name(item)).with_suffix(".json")

    def _is_done(self, item: Mapping[str, Any], sha: str) -> bool:
        rec_path = self._record_path(item)
        if self.overwrite or not rec_path.is_file():
            return False
        try:
            rec = read_json(rec_path)
            arr = open_latent(rec_path.with_suffix(".npy"))
        except InputError:
            return False
        return (rec.get("vae_sha256") == sha and rec.get("image") == str(item["image"])
                and list(arr.shape) == rec.get("shape"))

    def _record(self, item: Mapping[str, Any], image: Any, latent: torch.Tensor, sha: str) -> dict[str, Any]:
        meta = getattr(image, "meta", {}) or {}
        original_affine = np.asarray(meta.get("original_affine", image.affine), dtype=np.float64)
        spacing = np.linalg.norm(original_affine[:3, :3], axis=0)
        record = {
            "latent": latent_name(item),
            "domain": item["domain"],
            "domain_index": int(item["domain_index"]),
            "image": str(item["image"]),
            "modality": item.get("modality", "CT"),
            "spacing": spacing.tolist(),
            "original_affine": original_affine.tolist(),
            "original_shape": [int(s) for s in np.asarray(meta.get("spatial_shape", image.shape[1:])).tolist()],
            "affine": _as_list(image.affine),
            "latent_affine": latent_affine(image.affine),
            "image_shape": [int(s) for s in image.shape[1:]],
            "shape": [int(s) for s in latent.shape],
            "split": item["split"],
            "vae_sha256": sha,
        }
        if item.get("label"):
            record["label"] = str(item["label"])
        if item.get("subject") is not None:  # meduet_ssl's pair_key: renderings of one subject
            record["subject"] = str(item["subject"])
        if item.get("copy_index") is not None:  # a random-intensity copy of the image, not the image
            record["intensity_copy"] = int(item["copy_index"])
        return record

    @torch.no_grad()
    def run(self) -> Path:
        """Encode what is missing, then write the latent datalist. Returns its path."""
        sha = read_stage_meta(self.vae_ckpt, "meduet_vae")["sha256"]
        items = list(self.dataset.data)
        check_output_dir(self.output_dir, [*(it["image"] for it in items), *(it.get("datalist") for it in items)])
        pending = [i for i, it in enumerate(items) if not self._is_done(it, sha)]
        logger.info("latent cache %s: %d of %d volumes to encode", self.output_dir, len(pending), len(items))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.dataset, pending), batch_size=1, num_workers=self.num_workers,
            collate_fn=_first,
        )
        self.network.to(self.device).eval()
        bar = loader
        if self.progress:
            bar = tqdm(loader, total=len(pending), desc="encoding", unit="volume")
        for index, data in zip(pending, bar):
            item, image = items[index], data["image"]
            z = self.inferer(image[None].as_subclass(torch.Tensor) if hasattr(image, "meta") else image[None],
                             self.network)[0]
            record = self._record(item, image, z, sha)
            npy = self.output_dir / record["latent"]
            write_latent(npy, z)
            if self.previews:
                save_slice_montage(self.output_dir / "previews" / (record["latent"][: -len(".npy")] + ".png"),
                                   [image, *z], titles=["image", *[f"latent {c}" for c in range(z.shape[0])]],
                                   vrange=None)
            write_json(npy.with_suffix(".json"), record)  # written last: its presence means "done"
        return self.write_datalist(items, sha)

    def write_datalist(self, items: Sequence[Mapping[str, Any]], sha: str) -> Path:
        """Assemble the latent datalist from the per-volume records (atomically)."""
        meta = read_stage_meta(self.vae_ckpt, "meduet_vae")
        out: dict[str, Any] = {"domains": list(items[0]["domains"]) if items else []}
        root = self.latent_datalist.resolve().parent
        for item in items:
            rec = read_json(self._record_path(item))
            entry = {k: v for k, v in rec.items() if k not in ("split", "vae_sha256")}
            entry.update(domain=item["domain"], domain_index=int(item["domain_index"]))  # may have been renamed
            entry["latent"] = os.path.relpath(self.output_dir / rec["latent"], root)
            out.setdefault(item["split"], []).append(entry)  # the current datalist decides the split
        out["vae"] = {
            "ckpt": str(self.vae_ckpt.resolve()),
            "sha256": sha,
            "latent_channels": int(meta.get("latent_channels", 4)),
            "network": meta.get("network", {}),
            "scale_factor": meta.get("scale_factor"),
            "downsample": DOWNSAMPLE,
        }
        write_json(self.latent_datalist, out)
        logger.info("wrote %s", self.latent_datalist)
        return self.latent_datalist


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


def to_intensity(x: np.ndarray, modality: str) -> np.ndarray:
    """Map decoded 0..1 values back to intensities: CT -> Hounsfield units of the preprocessing window, MR -> 0..1."""
    x = np.clip(x, 0.0, 1.0)
    if str(modality).upper() == "CT":
        lo, hi = CT_WINDOW
        return x * (hi - lo) + lo
    return x


def resample_to_grid(image: np.ndarray, affine: Any, dst_affine: Any, dst_shape: Sequence[int]) -> np.ndarray:
    """Resample a 3-D image from its grid (``affine``) onto another grid (``dst_affine``, ``dst_shape``), bilinear."""
    src = MetaTensor(torch.as_tensor(image, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    out = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
        src, dst_affine=torch.as_tensor(dst_affine, dtype=torch.float64), spatial_size=list(dst_shape)
    )
    return np.asarray(out[0].as_subclass(torch.Tensor))


class LatentCacheDecoder:
    """Decode cached latents into NIfTI images.

    Writes ``<output_dir>/<latent name>_decoded.nii.gz`` on the preprocessed grid (the item's
    ``affine``) and, with ``original_grid``, ``..._decoded_original_grid.nii.gz`` resampled onto the
    source image's grid (``original_affine``, ``original_shape``), so that both overlay the source.

    Args:
        latent_datalist: latent datalist JSON written by :class:`LatentCacheEncoder`.
        network: the VAE (weights loaded); must be the one that wrote the cache.
        inferer: :class:`TiledVAEDecoder`.
        output_dir: where the NIfTI files go.
        vae_ckpt: checkpoint the network was loaded from (checked against the cache).
        splits: which splits to decode.
        max_items: decode at most this many items (None: all).
        original_grid: also write the resampled copy on the source grid.
        intensity: "hu" maps CT back to Hounsfield units of the window; "unit" keeps 0..1.
        device: where the network runs.
    """

    def __init__(
        self,
        latent_datalist: str | Path,
        network: torch.nn.Module,
        inferer: TiledVAEDecoder,
        output_dir: str | Path,
        vae_ckpt: str | Path,
        splits: Sequence[str] = ("training", "validation"),
        max_items: int | None = None,
        original_grid: bool = True,
        intensity: str = "hu",
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        if intensity not in ("hu", "unit"):
            raise ValueError(f"intensity must be 'hu' or 'unit', got {intensity!r}")
        self.latent_datalist, self.network, self.inferer = Path(latent_datalist), network, inferer
        self.output_dir, self.vae_ckpt = Path(output_dir), Path(vae_ckpt)
        self.splits, self.max_items = tuple(splits), max_items
        self.original_grid, self.intensity = as_bool(original_grid, "original_grid"), intensity
        self.device, self.progress = torch.device(device), as_bool(progress, "progress")

    @torch.no_grad()
    def run(self) -> list[Path]:
        """Decode the selected items. Returns the written files."""
        meta = read_stage_meta(self.vae_ckpt, "meduet_vae")
        data = load_latent_datalist(self.latent_datalist, keys=(), vae_sha256=meta["sha256"],
                                    latent_channels=meta.get("latent_channels"))
        items = [it for split in self.splits for it in data.get(split, [])][: self.max_items]
        if not items:
            raise InputError(self.latent_datalist, f"no latents in splits {list(self.splits)}")
        self.network.to(self.device).eval()
        written: list[Path] = []
        bar = items
        if self.progress:
            bar = tqdm(items, desc="decoding", unit="volume")
        for item in bar:
            z = torch.from_numpy(np.asarray(open_latent(item["latent"]), dtype=np.float32))
            x = self.inferer(z[None], self.network)[0, 0].numpy()
            if self.intensity == "hu":
                x = to_intensity(x, item.get("modality", "CT"))
            stem = Path(item["latent"]).name[: -len(".npy")]
            base = self.output_dir / Path(item["latent"]).parent.name / stem
            written.append(save_nifti(f"{base}_decoded.nii.gz", x, item["affine"]))
            if self.original_grid and item.get("original_shape"):
                orig = resample_to_grid(x, item["affine"], item["original_affine"], item["original_shape"])
                written.append(save_nifti(f"{base}_decoded_original_grid.nii.gz", orig, item["original_affine"]))
        return written
