"""Factor bank: one global content vector and one global style vector per latent volume.

A whole latent volume is cut into overlapping cubes of the pretraining crop size (24^3 latent
voxels = 96^3 image voxels at paper scale), every cube goes through the (teacher) encoder on its
unmixed tokens and the factor heads, and the content and style tokens are averaged over the
tokens of each cube and then over the cubes (every cube weighs the same). Optionally the token
maps are stitched over the whole volume (overlapping tokens averaged) and saved per volume.

Cube placement: cubes start on the token grid (multiples of the token size, 4 latent voxels) so
that the tokens of overlapping cubes land on the same cells of one volume-wide token grid; the
stride is ``patch * (1 - overlap)`` rounded down to a multiple of the token size (patch 24,
overlap 0.25 -> stride 16, i.e. at least the requested overlap) and the last cube ends at the
volume's end. Volumes smaller than a cube, or whose side is not a multiple of the token size, are
padded at the far end by repeating the border (``replicate``: a latent has no "zero" background).

Files (contract with meduet_ldm)::

    (:class:`FactorBank`: ``FactorBank.load`` / ``bank.save``)

    factor_bank.pt    {"content": (N, Dc) float32, "style": (N, Ds) float32, "domain_index": (N,) int64}
                      (plain tensors; loads with torch.load(weights_only=True))
    factor_bank.json  {"items": [{"latent", "image", "domain", "split", ["content_map", "style_map"]}],
                       "domains": [...], "ssl_sha256": str, "content_dim": Dc, "style_dim": Ds,
                       "patch_size": 24, "overlap": 0.25, "stride": 16, "token_size": 4}
    token_maps/NNNNN_<name>_{content,style}.npy   float16 (D, gx, gy, gz), with ``token_maps=True``
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import Evaluator
from monai.inferers import Inferer

from custom_nets.engines.common.outputs import check_output_dir, settings_key
from custom_nets.utils.checkpoint import check_upstream, file_sha256, read_stage_meta, save_torch
from custom_nets.utils.errors import InputError, InputErrors
from custom_nets.nets.meduet import meduet_config
from custom_nets.utils.flags import as_bool
from custom_nets.utils.inputs import is_missing, note_missing
from custom_nets.utils.io import atomic_path, read_json, write_json
from custom_nets.utils.visualize import save_factor_scatter

logger = logging.getLogger(__name__)

FACTOR_BANK_PT = "factor_bank.pt"
FACTOR_BANK_JSON = "factor_bank.json"

#: (P, C, p, p, p) latent cubes -> (content (P, N, Dc), style (P, N, Ds)) tokens in vit.py token order.
FactorFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# --------------------------------------------------------------------------------------------
# Cubes over a volume
# --------------------------------------------------------------------------------------------


def padded_shape(spatial: Sequence[int], patch: int, token: int) -> tuple[int, int, int]:
    """Each side raised to at least ``patch`` and to a multiple of ``token``."""
    return tuple(max(patch, math.ceil(int(s) / token) * token) for s in spatial)  # type: ignore[return-value]


def pad_latent(latent: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """Pad ``(B, C, X, Y, Z)`` at the far end of each axis to ``target`` by repeating the border."""
    pads: list[int] = []
    for s, t in zip(reversed(latent.shape[2:]), reversed(list(target))):
        pads += [0, int(t) - int(s)]
    if not any(pads):
        return latent
    return F.pad(latent, pads, mode="replicate")


def cube_starts(spatial: Sequence[int], patch: int = 24, overlap: float = 0.25, token: int = 4) -> list[tuple[int, int, int]]:
    """Start corners of the overlapping cubes covering a (padded) volume.

    Args:
        spatial: padded volume shape (each side >= ``patch`` and a multiple of ``token``).
        patch: cube side in latent voxels (a multiple of ``token``).
        overlap: requested fraction of a cube shared with its neighbour, in [0, 1).
        token: token size; starts are multiples of it.

    Returns:
        Start corners in C order.
    """
    if patch % token:
        raise ValueError(f"patch {patch} must be a multiple of the token size {token}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if any(int(s) < patch or int(s) % token for s in spatial):
        raise ValueError(f"volume {tuple(spatial)} must be padded to >= {patch} and a multiple of {token} first")
    stride = cube_stride(patch, overlap, token)
    axes = [axis_starts(int(s), patch, stride) for s in spatial]
    return [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]


def axis_starts(size: int, patch: int, stride: int) -> list[int]:
    """Starts along one axis every ``stride``; the last cube ends at ``size``."""
    if patch >= size:
        return [0]
    return sorted(set(range(0, size - patch, stride)) | {size - patch})


def cube_stride(patch: int, overlap: float, token: int) -> int:
    """Distance between cube starts: ``patch * (1 - overlap)`` rounded down to the token grid (>= 1 token)."""
    return max(token, int(patch * (1 - overlap)) // token * token)


@torch.no_grad()
def volume_factors(
    factor_fn: FactorFn,
    latent: torch.Tensor,
    patch: int = 24,
    overlap: float = 0.25,
    token: int = 4,
    batch_size: int = 8,
    token_maps: bool = False,
) -> dict[str, Any]:
    """Global content and style vectors of one latent volume (mean over tokens, then over cubes).

    Args:
        factor_fn: cubes -> (content tokens, style tokens), e.g. :func:`meduet_factor_fn`.
        latent: ``(C, X, Y, Z)`` or ``(1, C, X, Y, Z)``.
        patch: cube side in latent voxels.
        overlap: requested overlap between neighbouring cubes.
        token: token size of the encoder (latent voxels per token side).
        batch_size: cubes per forward pass.
        token_maps: also stitch volume-wide token maps.

    Returns:
        ``{"content": (Dc,), "style": (Ds,), "n_cubes": int}`` float32 on CPU, plus
        ``"content_map": (Dc, gx, gy, gz)`` and ``"style_map": (Ds, gx, gy, gz)`` with
        ``token_maps``, where ``g = ceil(side / token)`` covers the unpadded volume.
    """
    x = latent if latent.ndim == 5 else latent[None]
    if x.ndim != 5 or x.shape[0] != 1:
        raise ValueError(f"expected one latent volume (C, X, Y, Z), got shape {tuple(latent.shape)}")
    spatial = tuple(int(s) for s in x.shape[2:])
    padded = padded_shape(spatial, patch, token)
    x = pad_latent(x.float(), padded)
    starts = cube_starts(padded, patch, overlap, token)
    g = patch // token
    content_sum: torch.Tensor | None = None
    style_sum: torch.Tensor | None = None
    maps: dict[str, torch.Tensor] = {}
    hits = torch.zeros(tuple(s // token for s in padded))
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        cubes = torch.cat([x[:, :, a : a + patch, b : b + patch, c : c + patch] for a, b, c in chunk])
        content, style = factor_fn(cubes)
        content, style = content.float().cpu(), style.float().cpu()
        if content.shape[1] != g**3 or style.shape[1] != g**3:
            raise ValueError(f"factor_fn returned {content.shape[1]} tokens per cube, expected {g ** 3}")
        c_sum, s_sum = content.mean(1).sum(0), style.mean(1).sum(0)
        content_sum = c_sum if content_sum is None else content_sum + c_sum
        style_sum = s_sum if style_sum is None else style_sum + s_sum
        if token_maps:
            for name, tok in (("content_map", content), ("style_map", style)):
                if name not in maps:
                    maps[name] = torch.zeros((tok.shape[-1], *hits.shape))
                for (a, b, c), t in zip(chunk, tok):
                    ta, tb, tc = a // token, b // token, c // token
                    maps[name][:, ta : ta + g, tb : tb + g, tc : tc + g] += t.T.reshape(-1, g, g, g)
            for a, b, c in chunk:
                ta, tb, tc = a // token, b // token, c // token
                hits[ta : ta + g, tb : tb + g, tc : tc + g] += 1
    assert content_sum is not None and style_sum is not None  # at least one cube always exists
    out: dict[str, Any] = {"content": content_sum / len(starts), "style": style_sum / len(starts), "n_cubes": len(starts)}
    if token_maps:
        keep = tuple(slice(0, math.ceil(s / token)) for s in spatial)
        for name, m in maps.items():
            out[name] = (m / hits.clamp_min(1))[(slice(None), *keep)]
    return out


def meduet_factor_fn(network: torch.nn.Module) -> FactorFn:
    """Content and style tokens of unmixed latent cubes from a MeDUET network (teacher or student)."""
    net = getattr(network, "module", network)  # DistributedDataParallel

    def fn(cubes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(net.parameters()).device
        return net.encode_factors(cubes.to(device))

    return fn


# --------------------------------------------------------------------------------------------
# Writing and reading a bank
# --------------------------------------------------------------------------------------------


@dataclass
class FactorBank:
    """Per-volume content and style vectors: what meduet_ssl inference writes and meduet_ldm reads.

    Attributes:
        content: (N, content_dim) float32 global content vectors.
        style: (N, style_dim) float32 global style vectors.
        domain_index: (N,) int64 domain index of each volume.
        items: one record per row ({"latent", "image", "domain", ...}), as in factor_bank.json.
        domains: domain names (index -> name).
        meta: the rest of factor_bank.json (``ssl_sha256`` of the SSL checkpoint that produced the
            vectors, cube size, overlap, settings key ...).
        path: the ``factor_bank.pt`` file it was loaded from or saved to.
    """

    content: torch.Tensor
    style: torch.Tensor
    domain_index: torch.Tensor
    items: list[dict]
    domains: list[str]
    meta: dict = field(default_factory=dict)
    path: Path = Path()

    @property
    def content_dim(self) -> int:
        return int(self.content.shape[1])

    @property
    def style_dim(self) -> int:
        return int(self.style.shape[1])

    def __len__(self) -> int:
        return int(self.content.shape[0])

    def save(self, out_dir: str | Path) -> Path:
        """Write ``factor_bank.pt`` and ``factor_bank.json`` atomically (the JSON last, as the commit mark).

        Args:
            out_dir: destination folder.

        Returns:
            Path of ``factor_bank.pt`` (also stored in :attr:`path`).

        Raises:
            ValueError: the tensors and the items disagree in number or rank (nothing is written).
        """
        n = len(self.items)
        c, s, d = self.content, self.style, self.domain_index
        if c.ndim != 2 or s.ndim != 2 or c.shape[0] != n or s.shape[0] != n or d.shape != (n,):
            raise ValueError(
                f"factor bank shapes disagree: content {tuple(c.shape)}, style {tuple(s.shape)}, "
                f"domain_index {tuple(d.shape)}, {n} items"
            )
        out_dir = Path(out_dir)
        pt = out_dir / FACTOR_BANK_PT
        tensors = {
            "content": c.detach().float().cpu().contiguous(),
            "style": s.detach().float().cpu().contiguous(),
            "domain_index": d.detach().long().cpu().contiguous(),
        }
        save_torch(tensors, pt)
        meta = {k: v for k, v in self.meta.items() if k not in ("content_dim", "style_dim")}
        write_json(
            out_dir / FACTOR_BANK_JSON,
            {"items": [dict(it) for it in self.items], "domains": list(self.domains),
             "ssl_sha256": meta.pop("ssl_sha256", None), "content_dim": int(c.shape[1]), "style_dim": int(s.shape[1]),
             **meta},
        )
        self.path = pt
        return pt

    @classmethod
    def load(cls, path: str | Path, missing_ok: bool = False) -> FactorBank:
        """Read a factor bank (its folder or ``factor_bank.pt``) and check that both files agree.

        ``missing_ok``: a missing bank gives an empty one with the paper's factor widths (a config
        resolved before the bank exists; its run stops in :func:`custom_nets.utils.inputs.require_inputs`).

        Raises:
            InputError: a missing or unreadable file, missing tensors, shapes that disagree with
                ``factor_bank.json``, or items without a ``latent`` path (each naming the file).
        """
        if as_bool(missing_ok, "missing_ok") and is_missing(path):
            note_missing(path, "factor bank")
            cfg = meduet_config("paper")
            width = int(cfg["encoder"]["embed_dim"])
            style = int(width * cfg["style_ratio"])
            return cls(torch.zeros(0, width), torch.zeros(0, style), torch.zeros(0, dtype=torch.long), [], [],
                       {"missing": str(path)}, Path(str(path)))
        path = Path(path)
        pt = path / FACTOR_BANK_PT if path.is_dir() else path
        js = pt.with_name(FACTOR_BANK_JSON)
        if not pt.is_file():
            raise InputError(pt, "factor bank not found; run the meduet_ssl inference config first")
        meta = read_json(js)
        try:
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise InputError(pt, f"cannot be loaded as a factor bank ({e})") from e
        problems = [k for k in ("content", "style", "domain_index") if not isinstance(tensors.get(k), torch.Tensor)]
        if problems:
            raise InputError(pt, f"missing tensors {problems}")
        items = meta.get("items", [])
        n = len(items)
        c, s, d = tensors["content"], tensors["style"], tensors["domain_index"]
        if c.shape != (n, meta.get("content_dim")) or s.shape != (n, meta.get("style_dim")) or d.shape != (n,):
            raise InputError(
                pt, f"shapes content {tuple(c.shape)}, style {tuple(s.shape)}, domain_index {tuple(d.shape)} do not "
                f"match {js.name} ({n} items, content_dim {meta.get('content_dim')}, style_dim {meta.get('style_dim')})"
            )
        bad = [i for i, it in enumerate(items) if not isinstance(it, dict) or "latent" not in it]
        if bad:
            raise InputError(js, f"items {bad[:10]} have no 'latent' path")
        rest = {k: v for k, v in meta.items() if k not in ("items", "domains")}
        return cls(c.float(), s.float(), d.long(), list(items), list(meta.get("domains", [])), rest, pt)

    def rows_for(self, latents: Sequence[str | Path]) -> list[int]:
        """Bank rows of the given latent files; InputErrors names every file without a row.

        Paths are compared resolved; a relative latent path in factor_bank.json is taken from the
        bank's folder (meduet_ssl writes absolute ones).
        """
        index: dict[str, int] = {}
        for i, item in enumerate(self.items):
            index.setdefault(str((self.path.parent / item["latent"]).resolve()), i)
        rows, errors = [], []
        for lat in latents:
            key = str(Path(lat).resolve())
            if key in index:
                rows.append(index[key])
            else:
                errors.append(InputError(lat, f"latent has no entry in the factor bank {self.path}; rerun meduet_ssl "
                                              "inference on this latent datalist"))
        if errors:
            raise InputErrors(errors)
        return rows

    def content_map_paths(self, rows: Sequence[int]) -> list[Path]:
        """The content token map files of ``rows`` (relative paths are taken from the bank's folder).

        Raises:
            InputError: the bank was written without token maps, or a map file is missing.
        """
        paths = []
        for r in rows:
            rel = self.items[r].get("content_map")
            if not rel:
                raise InputError(self.path, "the factor bank holds no content token maps; rerun meduet_ssl inference "
                                            "with save_token_maps true")
            p = Path(rel) if Path(rel).is_absolute() else self.path.parent / rel
            if not p.is_file():
                raise InputError(p, "content token map of the factor bank not found; rerun meduet_ssl inference")
            paths.append(p)
        return paths

    def token_size(self) -> int:
        """Latent voxels per token-map cell (the MeDUET encoder's patch size): recorded in the bank,
        else read from the first volume (a map covers ``ceil(side / token)`` cells)."""
        if self.meta.get("token_size"):
            return int(self.meta["token_size"])
        if not self.items:
            raise InputError(self.path, "the factor bank is empty")
        from custom_nets.data.latent_cache import open_latent

        latent = open_latent(self.path.parent / self.items[0]["latent"]).shape[1:]
        cmap = open_latent(self.content_map_paths([0])[0]).shape[1:]
        sizes = {t for t in range(1, max(latent) + 1) if all(math.ceil(n / t) == g for n, g in zip(latent, cmap))}
        if not sizes:
            raise InputError(self.path, f"latent {tuple(latent)} and content map {tuple(cmap)} fit no token size")
        return min(sizes)


# --------------------------------------------------------------------------------------------
# MONAI pieces for the inference config
# --------------------------------------------------------------------------------------------


def check_latents_match_ssl(ssl_ckpt: str | Path, latents: Mapping[str, Any], latent_datalist: str | Path) -> None:
    """Refuse a latent cache encoded by another VAE than the one whose latents trained ``ssl_ckpt``.

    A MeDUET network only understands the latent space it was trained on; factors or swaps of
    another VAE's latents are meaningless, however plausible they look.

    Args:
        ssl_ckpt: the meduet_ssl checkpoint (its model.json ``vae_sha256``).
        latents: the loaded latent datalist (its ``vae.sha256``).
        latent_datalist: the datalist's path, named in the error.

    Raises:
        InputError: naming both VAEs when the two sha256 differ (a side that records none is not checked).
    """
    want = read_stage_meta(ssl_ckpt, "meduet_ssl").get("vae_sha256")
    vae = latents.get("vae") or {}
    check_upstream(
        latent_datalist, "the latent cache", "meduet_vae", vae.get("sha256"), want,
        f"the VAE of the latents ssl_ckpt {ssl_ckpt} was trained on",
        "encode the cache with that VAE (meduet_vae inference) or use the meduet_ssl checkpoint trained on this cache",
        recorded_from=vae.get("ckpt"), error=InputError,
    )


class FactorInferer(Inferer):
    """Inferer that turns one whole latent volume into its global factors (:func:`volume_factors`).

    Args:
        patch_size: cube side in latent voxels (the pretraining crop).
        overlap: requested overlap between cubes.
        sw_batch_size: cubes per forward pass.
        token_maps: also return stitched token maps.
    """

    def __init__(self, patch_size: int = 24, overlap: float = 0.25, sw_batch_size: int = 8, token_maps: bool = False) -> None:
        super().__init__()
        self.patch_size, self.overlap, self.sw_batch_size, self.token_maps = patch_size, overlap, sw_batch_size, token_maps

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``inputs`` (1, C, X, Y, Z) -> ``{"content", "style", "n_cubes", ["content_map", "style_map"]}``."""
        net = getattr(network, "module", network)
        return volume_factors(
            meduet_factor_fn(net), inputs, self.patch_size, self.overlap, int(net.encoder.patch_size),
            self.sw_batch_size, self.token_maps,
        )


class FactorBankWriter:
    """Evaluator handler: collect every volume's factors and write the bank when the run completes.

    Re-running: the bank records a key of the settings that made it (SSL checkpoint sha256, cube
    size, overlap, token maps). With ``overwrite=False`` the rows of an existing bank with the same
    key are kept for the volumes it already holds and only the other volumes are computed
    (:meth:`pending_items`); a bank made with other settings is recomputed whole. Either way the
    new bank replaces the old one atomically and never mixes rows of two settings. Token maps live
    in ``token_maps/<key>/``; maps of other keys are removed once the new bank is written.

    Args:
        output_dir: folder of ``factor_bank.pt`` / ``factor_bank.json`` (and ``token_maps/``).
        items: every item record of the bank (order = bank row).
        domains: domain names of the latent datalist.
        ssl_ckpt: SSL checkpoint used (its sha256 is recorded).
        patch_size: cube side, recorded.
        overlap: requested overlap, recorded.
        token_size: encoder token size, to record the actual stride.
        token_maps: whether the inferer returns token maps (part of the settings key).
        overwrite: recompute every volume even when the existing bank has it.
        inputs: input files/folders ``output_dir`` must differ from (the latent datalist); the
            latents' folders are added.
    """

    def __init__(
        self,
        output_dir: str | Path,
        items: Sequence[Mapping[str, Any]],
        domains: Sequence[str],
        ssl_ckpt: str | Path,
        patch_size: int = 24,
        overlap: float = 0.25,
        token_size: int = 4,
        token_maps: bool = False,
        overwrite: bool = False,
        inputs: Sequence[str | Path] = (),
    ) -> None:
        self.output_dir = Path(output_dir)
        self.items, self.domains, self.ssl_ckpt = list(items), list(domains), Path(ssl_ckpt)
        self.patch_size, self.overlap, self.token_size = patch_size, overlap, token_size
        self.token_maps, self.overwrite = as_bool(token_maps, "save_token_maps"), as_bool(overwrite, "overwrite")
        self.inputs = list(inputs)
        self.results: dict[int, dict[str, Any]] = {}
        self.reused: dict[int, dict[str, Any]] = {}
        self._key: str | None = None

    @property
    def key(self) -> str:
        """Key of the settings (see the class docstring)."""
        if self._key is None:
            self._key = settings_key({"ssl_sha256": file_sha256(self.ssl_ckpt), "patch_size": self.patch_size,
                                      "overlap": self.overlap, "token_maps": self.token_maps})
        return self._key

    def pending_items(self) -> list[dict[str, Any]]:
        """Check ``output_dir``, keep what the existing bank has with these settings (unless
        ``overwrite``) and return the items still to compute, each with its ``bank_index``."""
        check_output_dir(self.output_dir, [*self.inputs, *(it["latent"] for it in self.items)])
        self.reused = {} if self.overwrite else self._reusable_rows()
        todo = [{**it, "bank_index": i} for i, it in enumerate(self.items) if i not in self.reused]
        if self.reused:
            logger.info(
                "%s: %d of %d volumes already in the factor bank with this checkpoint and settings (kept; set "
                "overwrite true to recompute them)", self.output_dir, len(self.reused), len(self.items))
        return todo

    def _reusable_rows(self) -> dict[int, dict[str, Any]]:
        """Rows of the existing bank made with the current key, by new row index."""
        if not (self.output_dir / FACTOR_BANK_JSON).is_file():
            return {}
        try:
            bank = FactorBank.load(self.output_dir)
        except InputError:
            return {}  # unreadable or half-replaced by hand: recompute
        if bank.meta.get("settings_key") != self.key:
            return {}
        old = {str(rec.get("latent")): j for j, rec in enumerate(bank.items)}
        rows: dict[int, dict[str, Any]] = {}
        for i, it in enumerate(self.items):
            j = old.get(str(it["latent"]))
            if j is None:
                continue
            rec = bank.items[j]
            maps = {k: rec[k] for k in ("content_map", "style_map") if k in rec}
            if self.token_maps and (len(maps) < 2 or not all((self.output_dir / m).is_file() for m in maps.values())):
                continue
            rows[i] = {"content": bank.content[j], "style": bank.style[j],
                       "n_cubes": int(rec.get("n_cubes", 0)), **maps}
        return rows

    def attach(self, engine: Evaluator) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.results.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def run(self, evaluator: Evaluator) -> Path | None:
        """Compute the pending volumes with ``evaluator`` (its handlers include this writer), or,
        when none is pending, rewrite the bank only if its item list changed."""
        if len(evaluator.data_loader) > 0:
            evaluator.run()
            return self.output_dir / FACTOR_BANK_PT
        meta = read_json(self.output_dir / FACTOR_BANK_JSON) if (self.output_dir / FACTOR_BANK_JSON).is_file() else {}
        if [str(r.get("latent")) for r in meta.get("items", [])] == [str(it["latent"]) for it in self.items]:
            logger.info("factor bank %s is complete; nothing to do (set overwrite true to recompute it)",
                        self.output_dir)
            return None
        return self.write()

    def collect(self, engine: Evaluator) -> None:
        """Keep this iteration's factors (batch size 1: whole volumes differ in size)."""
        index = int(torch.as_tensor(engine.state.batch["index"]).reshape(-1)[0])
        pred = engine.state.output["pred"]
        self.results[index] = pred
        for name in ("content_map", "style_map"):
            if name in pred:
                rel = (f"token_maps/{self.key}/{index:05d}_{Path(self.items[index]['latent']).name.split('.')[0]}"
                       f"_{name.split('_')[0]}.npy")
                with atomic_path(self.output_dir / rel) as tmp:
                    np.save(tmp, pred[name].numpy().astype(np.float16))
                self.results[index] = {**self.results[index], name: rel}

    def _domain_index(self, item: Mapping[str, Any]) -> int:
        if "domain_index" in item:
            return int(item["domain_index"])
        if item.get("domain") not in self.domains:
            raise InputError(item.get("latent", "?"), f"domain {item.get('domain')!r} is not among {self.domains}")
        return self.domains.index(item["domain"])

    def write(self, engine: Evaluator | None = None) -> Path:
        """Write the bank (all volumes must have been seen or kept from the previous bank)."""
        self.results = {**self.reused, **self.results}
        missing = [i for i in range(len(self.items)) if i not in self.results]
        if missing:
            raise RuntimeError(f"factor bank incomplete: volumes {missing[:10]} were not processed")
        order = range(len(self.items))
        records = []
        for i in order:
            it = self.items[i]
            rec = {k: it[k] for k in ("latent", "image", "domain", "split") if k in it}
            rec.update({k: self.results[i][k] for k in ("content_map", "style_map") if k in self.results[i]})
            rec["n_cubes"] = int(self.results[i]["n_cubes"])
            records.append(rec)
        domain_index = torch.tensor([self._domain_index(self.items[i]) for i in order], dtype=torch.long)
        content = torch.stack([self.results[i]["content"] for i in order])
        style = torch.stack([self.results[i]["style"] for i in order])
        meta = dict(ssl_sha256=file_sha256(self.ssl_ckpt), patch_size=self.patch_size, overlap=self.overlap,
                    stride=cube_stride(self.patch_size, self.overlap, self.token_size), token_size=self.token_size,
                    settings_key=self.key)
        pt = FactorBank(content, style, domain_index, records, self.domains, meta).save(self.output_dir)
        self._remove_stale_token_maps(records)
        # a picture of the bank for a person: style should cluster by domain, content should not
        save_factor_scatter(self.output_dir / "factor_bank.png", {"content": content, "style": style},
                            domain_index, self.domains)
        return pt

    def _remove_stale_token_maps(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Delete token maps the new bank does not reference (earlier settings' folders, files of
        volumes no longer in the bank): only ``.npy`` files under ``token_maps/`` are touched."""
        folder = self.output_dir / "token_maps"
        if not folder.is_dir():
            return
        keep = {(self.output_dir / r[k]).resolve() for r in records for k in ("content_map", "style_map") if k in r}
        for f in folder.rglob("*.npy"):
            if f.resolve() not in keep:
                f.unlink()
        for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
