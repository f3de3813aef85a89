"""Content/style swaps of whole latent volumes with a pretrained MeDUET, decoded by the VAE.

For a pair (A, B): A's content with B's style, and B's content with A's style, token by token.

- B's latent is resampled (trilinear) onto A's latent grid when their shapes differ, so that every
  token of A has a token of B at the same relative position (style is spatially smooth: bias
  fields, texture, contrast); on equal grids nothing is resampled.
- Both volumes are cut into overlapping cubes of the pretraining crop size (padded at the far end
  by repeating the border when smaller or not a multiple of the token size). For each cube the
  encoder runs on the unmixed tokens of A and of B, the factor heads give content and style
  tokens, the fusion layer joins A's content with B's style token by token, and the MeDUET
  decoder predicts the latent in its training regime: two passes with complementary random halves
  of the fused tokens visible (mask tokens elsewhere), each token taken from the pass where it was
  hidden (:func:`decode_factors`; ``"all_visible"`` decodes every fused token in one pass instead). Cube outputs are blended with Gaussian weights that peak at each cube's centre (cube
  placement as in the factor bank: :func:`custom_nets.engines.ssl.factor_bank.cube_starts`).
- The VAE decodes the swapped latents (tiled) to images on A's (preprocessed, 1.5 mm) image grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from custom_nets.data.latent_cache import open_latent
from custom_nets.engines.common.outputs import OutputLedger, check_output_dir
from custom_nets.engines.ssl.factor_bank import cube_starts, pad_latent, padded_shape
from custom_nets.nets.meduet import gather_tokens, random_mix_mask, split_ids
from custom_nets.nets.vae import decode_latent
from custom_nets.utils.errors import InputError
from custom_nets.utils.io import save_nifti, write_json
from custom_nets.utils.visualize import save_slice_montage

logger = logging.getLogger(__name__)

#: names of the latents :func:`swap_latents` returns
A_CONTENT_B_STYLE = "a_content_b_style"
B_CONTENT_A_STYLE = "b_content_a_style"
A_SELF = "a_self"


DECODE_MODES = ("complementary", "all_visible")


def decode_factors(
    network: torch.nn.Module,
    content: torch.Tensor,
    style: torch.Tensor,
    grid: Sequence[int],
    mode: str = "complementary",
    draws: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fuse content and style tokens and decode them into latents.

    Args:
        network: a MeDUET.
        content: (B, N, Dc) content tokens.
        style: (B, N, Ds) style tokens.
        grid: token grid (N = product).
        mode: ``"complementary"`` (default): the decoder's training regime. A random half of the
            fused tokens is visible (mask tokens elsewhere) in one pass and the other half in a
            second pass; every token is taken from the pass in which it was hidden, i.e.
            predicted from its context, which is what the demixing loss trains. ``"all_visible"``:
            one pass with every fused token visible and no mask token (a regime the decoder never
            sees in training; measured worse in benchmarks/REPORT.md).
        draws: complementary mask pairs averaged (``"complementary"`` only).
        generator: CPU generator of the masks.

    Returns:
        (B, C, X, Y, Z) predicted latents.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    b, n = content.shape[:2]
    fused = network.fuse(content, style)
    if mode == "all_visible":
        ids = torch.arange(n, device=content.device).expand(b, n)
        return network.unpatchify(network.decode(fused, ids, grid), grid)
    total = None
    for _ in range(max(1, int(draws))):
        mask = random_half_mask(b, n, generator, content.device)
        ids0, ids1 = split_ids(mask)
        visible = torch.cat([gather_tokens(fused, ids0), gather_tokens(fused, ids1)])
        pred = network.decode(visible, torch.cat([ids0, ids1]), grid)
        m = mask.unsqueeze(-1).to(pred.dtype)
        pred = pred[:b] * m + pred[b:] * (1.0 - m)  # pass 1 sees M=0 and predicts M=1, pass 2 the converse
        total = pred if total is None else total + pred
    return network.unpatchify(total / max(1, int(draws)), grid)


def random_half_mask(batch: int, n_tokens: int, generator: torch.Generator | None, device: Any) -> torch.Tensor:
    """(B, N) 0/1 mask with N // 2 ones per row (random positions)."""
    return random_mix_mask(batch, n_tokens, 0.5, generator, device)


def cube_weights(patch: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """(patch, patch, patch) separable Gaussian weights, 1 at the centre (cube borders, where a
    token sees fewer neighbours, count least)."""
    t = torch.arange(patch, dtype=torch.float32) - (patch - 1) / 2
    g = torch.exp(-0.5 * (t / (sigma_scale * patch)) ** 2)
    return (g[:, None, None] * g[None, :, None] * g[None, None, :]).clamp_min(1e-3)


def blend_cubes(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, patch: int, overlap: float, token: int, cube_batch: int = 4
) -> torch.Tensor:
    """Apply ``fn`` to overlapping cubes of ``x`` and blend the outputs with :func:`cube_weights`.

    Args:
        fn: (P, C, p, p, p) -> (P, C', p, p, p).
        x: (1, C, X, Y, Z) padded volume (sides >= ``patch``, multiples of ``token``).
        patch: cube side.
        overlap: requested overlap (:func:`custom_nets.engines.ssl.factor_bank.cube_starts`).
        token: token size (cube starts are multiples of it).
        cube_batch: cubes per call of ``fn``.

    Returns:
        (1, C', X, Y, Z) on ``x``'s device.
    """
    starts = cube_starts(x.shape[2:], patch, overlap, token)
    w = cube_weights(patch).to(x.device)
    out: torch.Tensor | None = None
    norm = torch.zeros(x.shape[2:], device=x.device)
    for i in range(0, len(starts), cube_batch):
        chunk = starts[i : i + cube_batch]
        y = fn(torch.cat([x[:, :, a : a + patch, b : b + patch, c : c + patch] for a, b, c in chunk]))
        if out is None:
            out = torch.zeros((1, y.shape[1], *x.shape[2:]), device=x.device)
        for (a, b, c), yi in zip(chunk, y):
            out[0, :, a : a + patch, b : b + patch, c : c + patch] += yi.float() * w
            norm[a : a + patch, b : b + patch, c : c + patch] += w
    assert out is not None  # a padded volume always holds at least one cube
    return out / norm


@torch.no_grad()
def swap_latents(
    network: torch.nn.Module,
    latent_a: torch.Tensor,
    latent_b: torch.Tensor,
    patch: int = 24,
    overlap: float = 0.25,
    with_self: bool = False,
    cube_batch: int = 4,
    decode_mode: str = "complementary",
    mask_draws: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Swap content and style between two latent volumes (module docstring).

    Args:
        network: a MeDUET in eval mode.
        latent_a: (C, X, Y, Z) latent of A.
        latent_b: (C, X', Y', Z') latent of B (resampled onto A's grid if the shapes differ).
        patch: cube side in latent voxels (the pretraining crop).
        overlap: fraction of a cube shared with its neighbour.
        with_self: also return A's content with A's own style (the decoder's reconstruction of A,
            a reference for the swap error).
        cube_batch: cubes per forward pass.
        decode_mode: how the decoder sees the fused tokens (:func:`decode_factors`).
        mask_draws: complementary mask pairs averaged.
        seed: seed of the decoding masks (the same call gives the same result).

    Returns:
        ``{"a_content_b_style": (C, X, Y, Z), "b_content_a_style": (C, X, Y, Z), ["a_self": ...]}``
        float32 on CPU, on A's latent grid.
    """
    net = getattr(network, "module", network)
    device = next(net.parameters()).device
    a = latent_a.float()[None]
    b = latent_b.float()[None]
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"latents have {a.shape[1]} and {b.shape[1]} channels")
    spatial = tuple(a.shape[2:])
    if tuple(b.shape[2:]) != spatial:
        b = F.interpolate(b, size=spatial, mode="trilinear", align_corners=False)
    token = int(net.encoder.patch_size)
    padded = padded_shape(spatial, patch, token)
    x = pad_latent(torch.cat([a, b], dim=1), padded).to(device)
    c = a.shape[1]
    grid = net.encoder.grid_of((patch,) * 3)
    n_out = 3 if with_self else 2
    gen = torch.Generator().manual_seed(int(seed))

    def fn(cubes: torch.Tensor) -> torch.Tensor:
        ca, sa = net.encode_factors(cubes[:, :c])
        cb, sb = net.encode_factors(cubes[:, c:])
        contents, styles = [ca, cb], [sb, sa]
        if with_self:
            contents.append(ca)
            styles.append(sa)
        y = decode_factors(net, torch.cat(contents), torch.cat(styles), grid, decode_mode, mask_draws, gen)
        return torch.cat(y.chunk(n_out, dim=0), dim=1)

    out = blend_cubes(fn, x, patch, overlap, token, cube_batch)
    out = out[(0, slice(None), *(slice(0, s) for s in spatial))].float().cpu()
    names = [A_CONTENT_B_STYLE, B_CONTENT_A_STYLE] + ([A_SELF] if with_self else [])
    return {name: out[i * c : (i + 1) * c].contiguous() for i, name in enumerate(names)}


def auto_pairs(items: Sequence[Mapping[str, Any]], count: int = 1) -> list[tuple[int, int]]:
    """Up to ``count`` distinct pairs (A, B) of item indices, B from another domain than A where
    one exists (else the next volume); a pair and its mirror (B, A) count as one."""
    if len(items) < 2:
        raise ValueError(f"a swap needs two volumes, the list holds {len(items)}")
    pairs: list[tuple[int, int]] = []
    seen: set[frozenset[int]] = set()
    for i, a in enumerate(items):
        others = [j for j, b in enumerate(items) if j != i and b.get("domain") != a.get("domain")]
        others += [j for j in range(len(items)) if j != i and j not in others]
        j = next((j for j in others if frozenset((i, j)) not in seen), None)
        if j is None:
            continue
        seen.add(frozenset((i, j)))
        pairs.append((i, j))
        if len(pairs) == count:
            break
    return pairs


def _stem(item: Mapping[str, Any]) -> str:
    return Path(str(item["latent"])).name.split(".")[0]


class SwapRunner:
    """Swap content and style for pairs of latent volumes; write NIfTI images and PNG montages.

    Per pair (A, B), into ``output_dir``: ``<A>__content_<A>__style_<B>.nii.gz`` (A's content,
    B's style) and ``<A>__content_<B>__style_<A>.nii.gz`` (B's content, A's style, on A's grid),
    both with A's image affine; ``<A>__<B>_swap.png`` with rows A, B, A-content/B-style,
    B-content/A-style (A and B shown as VAE reconstructions of their latents, so that every row
    went through the same decoder); and ``swaps.json`` listing what was written.

    Args:
        network: MeDUET (eval).
        vae: the VAE that encoded the latents (eval).
        items: latent datalist items (``latent`` absolute, ``affine`` 4x4 image grid, ``domain``).
        output_dir: destination folder.
        pairs: list of ``[a, b]`` indices into ``items``, or ``"auto"`` (:func:`auto_pairs`).
        num_pairs: pairs chosen by ``"auto"``.
        patch: cube side (pretraining crop).
        overlap: cube overlap.
        vae_roi: VAE decoding tile edge in latent voxels (:func:`custom_nets.nets.vae.decode_latent`);
            None decodes each volume in one pass (small volumes).
        decode_mode: MeDUET decoding regime (:func:`decode_factors`).
        mask_draws: complementary mask pairs averaged.
        ledger: :class:`~custom_nets.engines.common.outputs.OutputLedger` of ``output_dir``: a pair
            whose three files exist and were made with the ledger's settings (checkpoints, decoding)
            is skipped unless the ledger says ``overwrite``; None recomputes every pair.
        inputs: input files/folders that ``output_dir`` must differ from (the latents' folders are
            always checked).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        vae: torch.nn.Module,
        items: Sequence[Mapping[str, Any]],
        output_dir: str | Path,
        pairs: Sequence[Sequence[int]] | str = "auto",
        num_pairs: int = 1,
        patch: int = 24,
        overlap: float = 0.25,
        vae_roi: int | None = 32,
        decode_mode: str = "complementary",
        mask_draws: int = 1,
        ledger: OutputLedger | None = None,
        inputs: Sequence[str | Path] = (),
    ) -> None:
        self.network, self.vae, self.items = network, vae, list(items)
        self.ledger, self.inputs = ledger, list(inputs)
        self.output_dir = Path(output_dir)
        if pairs == "auto":
            self.pairs = auto_pairs(self.items, num_pairs)
        else:
            self.pairs = [(int(p[0]), int(p[1])) for p in pairs]  # type: ignore[index]
            bad = [p for p in self.pairs if not all(0 <= i < len(self.items) for i in p)]
            if bad:
                raise ValueError(f"swap pairs {bad} index outside the {len(self.items)} volumes")
        self.patch, self.overlap = patch, overlap
        self.vae_roi = None if vae_roi is None else int(vae_roi)
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        self.decode_mode, self.mask_draws = decode_mode, int(mask_draws)

    def _load(self, item: Mapping[str, Any]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(open_latent(item["latent"]), dtype=np.float32))

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        return decode_latent(self.vae, latent, roi=self.vae_roi)

    def run(self) -> list[dict[str, Any]]:
        """Process every pair; returns the records written to ``swaps.json``."""
        check_output_dir(self.output_dir, [*self.inputs, *(it["latent"] for it in self.items)])
        records = []
        for ia, ib in self.pairs:
            a, b = self.items[ia], self.items[ib]
            if "affine" not in a:
                raise InputError(a["latent"], "latent datalist item has no 'affine' (image grid) to write NIfTI with")
            sa, sb = _stem(a), _stem(b)
            names = (f"{sa}__content_{sa}__style_{sb}.nii.gz", f"{sa}__content_{sb}__style_{sa}.nii.gz", f"{sa}__{sb}_swap.png")
            record = {
                "a": {"latent": a["latent"], "domain": a.get("domain")},
                "b": {"latent": b["latent"], "domain": b.get("domain")},
                "a_content_b_style": names[0], "b_content_a_style": names[1], "montage": names[2],
            }
            records.append(record)
            if self.ledger is not None and self.ledger.all_done(names):
                logger.info("swap %s / %s already written with this checkpoint and settings (skipped; set overwrite "
                            "true to redo it)", sa, sb)
                continue
            za, zb = self._load(a), self._load(b)
            swapped = swap_latents(self.network, za, zb, self.patch, self.overlap, decode_mode=self.decode_mode,
                                   mask_draws=self.mask_draws)
            images = {
                "A": self._decode(za),
                "B": self._decode(F.interpolate(zb[None], size=za.shape[1:], mode="trilinear", align_corners=False)[0]
                                  if zb.shape != za.shape else zb),
                "A content / B style": self._decode(swapped[A_CONTENT_B_STYLE]),
                "B content / A style": self._decode(swapped[B_CONTENT_A_STYLE]),
            }
            save_nifti(self.output_dir / names[0], images["A content / B style"], a["affine"])
            save_nifti(self.output_dir / names[1], images["B content / A style"], a["affine"])
            save_slice_montage(self.output_dir / names[2], [v[0] for v in images.values()], titles=list(images),
                               vrange=(0.0, 1.0))
            if self.ledger is not None:
                self.ledger.mark_done(*names)
        write_json(self.output_dir / "swaps.json", {"pairs": records})
        return records
