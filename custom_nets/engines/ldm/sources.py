"""Sources of the generator's content and style conditions (meduet_ldm inference).

A source is a row of the meduet_ssl factor bank (``3``, ``"#3"``, ``"bank3"``), the first row of a
domain (``"domain:NAME"``), or a reference volume (a cached latent ``.npy`` or an image) whose
factors the MeDUET encoder computes on the fly (:class:`FactorExtractor`);
:func:`resolve_sources` turns the user's list into :class:`FactorSource` vectors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from custom_nets.data.latent_cache import open_latent
from custom_nets.data.transforms import preprocess_transforms
from custom_nets.engines.ssl.factor_bank import FactorBank, meduet_factor_fn, volume_factors
from custom_nets.nets.meduet import load_meduet
from custom_nets.nets.vae import encode_volume, load_vae
from custom_nets.utils.checkpoint import check_upstream, read_stage_meta
from custom_nets.utils.errors import InputError

__all__ = ["FactorSource", "bank_source", "content_map_cell", "default_rows", "FactorExtractor", "domain_row",
           "resolve_sources"]


# --------------------------------------------------------------------------------------------
# Factor sources
# --------------------------------------------------------------------------------------------


@dataclass
class FactorSource:
    """Where a content or style vector comes from.

    Attributes:
        name: short label for file names and the grid ("bank12", a reference's stem).
        content: (Dc,) vector; style: (Ds,) vector.
        domain: domain name when known.
        origin: the bank row's latent or the reference file.
        latent: the reference's (C, X, Y, Z) latent when it was computed here (image references);
            bank rows and latent references are read from ``origin`` when needed.
        content_map: (Dc, gx, gy, gz) content token map of the whole volume, for generators
            conditioned on content maps (None otherwise).
    """

    name: str
    content: torch.Tensor
    style: torch.Tensor
    domain: str | None = None
    origin: str = ""
    latent: torch.Tensor | None = None
    content_map: torch.Tensor | None = None


def bank_source(bank: FactorBank, row: int, content_map: bool = False) -> FactorSource:
    """The factor bank's row ``row`` as a source (``content_map``: with the row's content token map)."""
    if not 0 <= row < len(bank):
        raise InputError(bank.path, f"row {row} requested but the factor bank has {len(bank)} rows")
    item = bank.items[row]
    domain = item.get("domain")
    if domain is None and bank.domains:
        domain = bank.domains[int(bank.domain_index[row])]
    latent = Path(str(item.get("latent", "")))
    origin = str(latent if latent.is_absolute() else (bank.path.parent / latent).resolve())
    cmap = None
    if content_map:
        cmap = torch.from_numpy(np.asarray(open_latent(bank.content_map_paths([row])[0]), dtype=np.float32))
    return FactorSource(f"bank{row}", bank.content[row], bank.style[row], domain, origin, content_map=cmap)


def default_rows(bank: FactorBank, n: int) -> list[int]:
    """``n`` bank rows spread over the domains: the first volume of each domain in turn, then the second, ..."""
    by_domain: dict[int, list[int]] = {}
    for row, d in enumerate(bank.domain_index.tolist()):
        by_domain.setdefault(int(d), []).append(row)
    order = [rows[k] for k in range(max(map(len, by_domain.values()), default=0)) for rows in by_domain.values() if k < len(rows)]
    return order[: max(0, n)]


class FactorExtractor:
    """Content and style of a reference volume, computed with the MeDUET encoder on the fly.

    A reference is a cached latent (``.npy``, (C, X, Y, Z)) or an image that the VAE encodes first
    (same preprocessing as meduet_vae inference). Its factors follow the factor bank's recipe
    (:func:`custom_nets.engines.ssl.factor_bank.volume_factors`: mean over tokens and over grid
    cubes of ``patch_size`` with ``overlap``; 24 and 0.25 at paper scale, METHOD.md section 4).

    Args:
        ssl_ckpt: meduet_ssl ``models/model.pt``.
        vae_ckpt: meduet_vae ``models/model.pt`` (needed for image references only).
        device: where the encoders run.
        expect_ssl_sha256: the SSL checkpoint hash the generator's conditions came from; a
            different checkpoint would give factors in another space, so it is refused.
        patch_size: cube side in latent voxels (use the factor bank's ``patch_size``).
        overlap: cube overlap (the factor bank's ``overlap``).
    """

    def __init__(
        self,
        ssl_ckpt: str | Path,
        vae_ckpt: str | Path | None = None,
        device: str | torch.device = "cpu",
        expect_ssl_sha256: str | None = None,
        patch_size: int = 24,
        overlap: float = 0.25,
    ) -> None:
        self.ssl_ckpt, self.vae_ckpt, self.device = Path(ssl_ckpt), vae_ckpt, torch.device(device)
        self.expect_ssl_sha256 = expect_ssl_sha256
        self.patch_size, self.overlap = int(patch_size), float(overlap)
        self._ssl: torch.nn.Module | None = None
        self._vae: torch.nn.Module | None = None

    def ssl_model(self) -> torch.nn.Module:
        """The MeDUET network of ``ssl_ckpt`` (built from its model.json, loaded strictly)."""
        if self._ssl is None:
            meta = read_stage_meta(self.ssl_ckpt, "meduet_ssl")
            check_upstream(
                self.ssl_ckpt, "the generator's factor bank", "meduet_ssl", self.expect_ssl_sha256, meta.get("sha256"),
                f"ssl_ckpt {self.ssl_ckpt}", "point ssl_ckpt at the MeDUET checkpoint whose factors trained this generator",
            )
            self._ssl = load_meduet(self.ssl_ckpt, self.device)[0]
        return self._ssl

    def latent_of(self, path: Path) -> torch.Tensor:
        """(C, X, Y, Z) float32 latent of a reference file."""
        if path.suffix == ".npy":
            return torch.from_numpy(np.asarray(open_latent(path), dtype=np.float32))
        if self.vae_ckpt is None:
            raise InputError(path, "an image reference needs the VAE (set vae_ckpt)")
        if self._vae is None:
            self._vae, _ = load_vae(self.vae_ckpt, self.device)
        try:
            image = preprocess_transforms()({"image": str(path)})["image"]
        except Exception as e:  # unreadable or non-3D files
            raise InputError(path, f"cannot be read as a 3D image ({e})") from e
        return encode_volume(self._vae, torch.as_tensor(image))

    @torch.no_grad()
    def factors_of_latent(self, latent: torch.Tensor, content_map: bool = False) -> tuple[torch.Tensor, ...]:
        """(content (Dc,), style (Ds,)) of a (C, X, Y, Z) latent, and with ``content_map`` its
        content token map (Dc, gx, gy, gz) as third element."""
        net = self.ssl_model()
        out = volume_factors(meduet_factor_fn(net), latent, self.patch_size, self.overlap, int(net.encoder.patch_size),
                             token_maps=content_map)
        vectors = (out["content"].float().cpu(), out["style"].float().cpu())
        return (*vectors, out["content_map"].float().cpu()) if content_map else vectors

    def token_size(self) -> int:
        """Latent voxels per token of the MeDUET encoder (one cell of its content maps)."""
        return int(self.ssl_model().encoder.patch_size)

    def __call__(self, path: str | Path, content_map: bool = False) -> tuple[torch.Tensor, ...]:
        """(content (Dc,), style (Ds,), latent (C, X, Y, Z)) of a reference volume file, and with
        ``content_map`` its content token map as fourth element."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "reference volume not found")
        latent = self.latent_of(path)
        factors = self.factors_of_latent(latent, content_map)
        return (*factors[:2], latent, *factors[2:])


_BANK_ROW = re.compile(r"^(?:bank)?#?(\d+)$")
_DOMAIN_PREFIX = "domain:"


def domain_row(bank: FactorBank | None, domain: str) -> int:
    """The first factor-bank row of ``domain``; an InputError lists the bank's domains otherwise."""
    if bank is None:
        raise InputError("factor_bank", f"source 'domain:{domain}' needs the factor bank")
    if domain in bank.domains:
        rows = (bank.domain_index == bank.domains.index(domain)).nonzero().flatten().tolist()
        if rows:
            return int(rows[0])
    raise InputError(bank.path, f"no volume of domain {domain!r} in the factor bank (domains: {', '.join(bank.domains)})")


def resolve_sources(
    specs: Sequence[int | str] | int,
    bank: FactorBank | None,
    root: str | Path = ".",
    extractor: FactorExtractor | None = None,
    content_maps: bool = False,
) -> list[FactorSource]:
    """Turn the user's list of sources into vectors (and content token maps).

    Args:
        specs: an integer n (n bank rows spread over the domains, :func:`default_rows`), or a list
            whose entries are bank rows (``3``, ``"3"``, ``"#3"``, ``"bank3"``), domains
            (``"domain:NAME"``: the domain's first bank row) or reference volumes (a latent
            ``.npy`` or an image; relative paths are taken from ``root``).
        bank: the factor bank (needed for rows).
        root: folder of relative reference paths (the bundle's ``dataset_dir``).
        extractor: computes factors of reference volumes.
        content_maps: also each source's content token map (generators with ``content_map``).

    A bank that is a missing placeholder (``FactorBank.load(..., missing_ok=True)``) gives no
    sources: the config resolved before its inputs exist, and its run stops in ``require_inputs``.
    """
    if bank is not None and bank.meta.get("missing"):
        return []
    if isinstance(specs, int):
        if bank is None:
            raise InputError("factor_bank", "a number of sources needs the factor bank")
        return [bank_source(bank, r, content_maps) for r in default_rows(bank, specs)]
    out = []
    for spec in specs:
        if isinstance(spec, str) and spec.startswith(_DOMAIN_PREFIX):
            out.append(bank_source(bank, domain_row(bank, spec[len(_DOMAIN_PREFIX):]), content_maps))
            continue
        m = _BANK_ROW.match(str(spec).strip())
        if isinstance(spec, int) or m:
            if bank is None:
                raise InputError("factor_bank", f"source {spec!r} is a bank row but no factor bank is given")
            out.append(bank_source(bank, int(m.group(1)) if m else int(spec), content_maps))
            continue
        path = Path(spec) if Path(spec).is_absolute() else Path(root) / spec
        if extractor is None:
            raise InputError(path, "a reference volume needs the MeDUET checkpoint (set ssl_ckpt)")
        content, style, latent, *cmap = extractor(path, content_maps)
        # an image reference's latent is kept for the grid's source panel (no second encoding)
        kept = None if path.suffix == ".npy" else latent
        out.append(FactorSource(path.name.split(".")[0], content, style, None, str(path), kept, *cmap))
    if not out:
        raise InputError("sources", "no content or style source given")
    return out


def content_map_cell(generator_meta: dict, bank: FactorBank | None, extractor: FactorExtractor | None) -> int:
    """Latent voxels per content-map cell for a generator built with ``content_map`` (the bank's
    token size, else the MeDUET encoder's); 0 for a generator conditioned on vectors only."""
    if not generator_meta.get("network", {}).get("content_map"):
        return 0
    if bank is not None and not bank.meta.get("missing"):
        return bank.token_size()
    if extractor is None:
        raise InputError("ssl_ckpt", "a generator conditioned on content maps needs the factor bank or the MeDUET checkpoint")
    return extractor.token_size()
