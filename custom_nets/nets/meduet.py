"""MeDUET pretraining network: latent ViT encoder, content/style factor heads, fusion, mask-token decoder.

Sections: size factory, token-mixing helpers, the network (embedding and mixing, factor heads,
fusion, decoder, the student and teacher passes of one training step).

Token demixing (METHOD.md section 3): a batch x of B latent crops is paired i <-> B-1-i (the batch
reversed). A per-sample 0/1 mask M over the N tokens (exactly ``N - int(N * (1 - mix_ratio))``
ones) mixes the embedded tokens, ``tokens(x) * (1 - M) + tokens(x reversed) * M``; source 1 of
sample i is x_i (where M_i = 0), source 2 is x_{B-1-i} (where M_i = 1). The encoder output is split
back by M into the two sources' token sequences, each in ascending token order (``split_ids``).

Style smoothing (a depthwise Conv1d, kernel 3, along the token sequence) is always applied on the
full token grid order, so that a kernel tap means the same neighbour (the previous/next token of
the raster order) in the mixed pass and in the plain (unmixed) passes used for re-encoding,
distillation targets and the factor bank. For one source of a mixture, the other source's tokens
are zeros while smoothing (they are padding, as at the sequence ends); the smoothed values are then
gathered at the source's own positions. (The authors' code smooths the gathered sub-sequence, where
a kernel tap is the next token *of the same source*, which lies anywhere in the grid.)

The decoder sees the N tokens without a cls token: visible tokens are the fused factors of one
source at that source's positions, all other positions hold the learned mask token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from custom_nets.losses.domain import grad_reverse
from custom_nets.nets.vit import (
    Block,
    LatentViTEncoder,
    init_vit_weights,
    patchify,
    run_blocks,
    sincos_pos_embed_3d,
    unpatchify,
    vit_encoder_config,
)
from custom_nets.utils.checkpoint import load_stage_network

__all__ = ["MeDUET", "load_meduet", "meduet_config", "random_mix_mask", "split_ids", "gather_tokens", "mix_tokens"]

CHECKPOINT_PARTS = ("mixture", "decoder")
STYLE_MODES = ("token", "global")

# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


#: The stage whose checkpoints hold a MeDUET network.
STAGE = "meduet_ssl"


def meduet_config(size: str = "paper") -> dict[str, Any]:
    """Constructor arguments of :class:`MeDUET` for named sizes.

    "paper" (also "B") is the paper's network (ViT-B encoder on 4 x 24^3 latents, decoder 8 x 384, about 105 M
    parameters); "demo" is a tiny network with the same structure for CPU demos and tests.
    """
    if size in ("paper", "B"):
        encoder = dict(vit_encoder_config("B"), grid=[6, 6, 6])
        return dict(
            encoder=encoder, style_ratio=0.25, decoder_embed_dim=384, decoder_depth=8, decoder_num_heads=12,
            decoder_mlp_ratio=4.0, n_domains=10, mix_ratio=0.5, grl_lambda=1.0, style_kernel=3,
        )
    if size == "demo":
        encoder = dict(in_channels=4, patch_size=4, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.0, grid=[6, 6, 6])
        return dict(
            encoder=encoder, style_ratio=0.25, decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4,
            decoder_mlp_ratio=4.0, n_domains=10, mix_ratio=0.5, grl_lambda=1.0, style_kernel=3,
        )
    raise ValueError(f"unknown MeDUET size {size!r}; expected 'paper' (or 'B') or 'demo'")


# --------------------------------------------------------------------------------------------
# Token mixing helpers
# --------------------------------------------------------------------------------------------


def random_mix_mask(
    batch: int, n_tokens: int, mix_ratio: float = 0.5, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random 0/1 token mask, the same number of ones in every row.

    Args:
        batch: B.
        n_tokens: N.
        mix_ratio: fraction of tokens taken from the partner (M = 1); ``N - int(N * (1 - ratio))`` ones.
        generator: CPU generator (the mask is drawn on the CPU, then moved, so that it is the same
            on every device for a given seed).
        device: device of the result.

    Returns:
        (B, N) float32 mask; 0 = source 1 (the sample), 1 = source 2 (its partner B-1-i).
    """
    n_keep = int(n_tokens * (1.0 - mix_ratio))
    if not 0 < n_keep < n_tokens:
        raise ValueError(f"mix_ratio {mix_ratio} leaves no token to one of the two sources (N={n_tokens})")
    noise = torch.rand(batch, n_tokens, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each token's noise within its row
    return (rank >= n_keep).float().to(device)


def split_ids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions of each source, ascending.

    Args:
        mask: (B, N) 0/1 mask with the same number of ones in every row.

    Returns:
        ids1 (B, N1) positions where M = 0 and ids2 (B, N2) positions where M = 1, int64.
    """
    counts = mask.sum(dim=1)
    if not torch.all(counts == counts[0]):
        raise ValueError("every mask row must hold the same number of ones")
    n2 = int(counts[0].item())
    order = mask.argsort(dim=1, stable=True)  # zeros first, each group in ascending position
    n1 = mask.shape[1] - n2
    return order[:, :n1], order[:, n1:]


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens, (B, n) positions -> (B, n, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def mix_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token demixing input: (B, N, D) tokens, (B, N) mask -> tokens * (1 - M) + tokens.flip(0) * M."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return tokens * (1.0 - m) + tokens.flip(0) * m


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear-ReLU stack through ``dims`` (no activation after the last linear)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class MeDUET(nn.Module):
    """MeDUET pretraining network (METHOD.md section 2).

    Args:
        encoder: :class:`~custom_nets.nets.vit.LatentViTEncoder` constructor arguments (paper: ViT-B,
            patch 4, 4 latent channels, grid 6^3).
        style_ratio: style width / encoder width (192 / 768).
        decoder_embed_dim: decoder width (divisible by 6 for 3D sin-cos positions).
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads.
        decoder_mlp_ratio: decoder MLP hidden width / decoder width.
        n_domains: number of domains (source collections) of the domain classifiers.
        mix_ratio: fraction of tokens a sample takes from its partner in token demixing.
        grl_lambda: gradient-reversal strength in front of the content domain classifier.
        style_kernel: kernel of the depthwise style smoothing along the token sequence (odd).
        style_mode: ``"token"`` (the paper: one style vector per token, smoothed along the
            sequence) or ``"global"``: one style vector per volume (per source of a mixture), the
            mean of the style head over that volume's tokens, given to every token. A global style
            cannot carry spatial (anatomical) detail, which the decoder must then take from content.

    Submodules: ``encoder``, ``content_head``, ``style_head``, ``style_smooth``, ``fusion``,
    ``decoder_embed``, ``mask_token``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``,
    ``content_domain_head``, ``style_domain_head``; buffer ``decoder_pos_embed`` (fixed, not saved).

    Runtime switch (not a constructor argument): ``checkpointing``, a set of parts among
    ``"mixture"`` (the encoder pass on the mixture) and ``"decoder"`` whose blocks recompute
    their activations in backward (less memory, same results).
    """

    def __init__(
        self,
        encoder: Mapping[str, Any] | None = None,
        style_ratio: float = 0.25,
        decoder_embed_dim: int = 384,
        decoder_depth: int = 8,
        decoder_num_heads: int = 12,
        decoder_mlp_ratio: float = 4.0,
        n_domains: int = 10,
        mix_ratio: float = 0.5,
        grl_lambda: float = 1.0,
        style_kernel: int = 3,
        style_mode: str = "token",
    ) -> None:
        super().__init__()
        if style_mode not in STYLE_MODES:
            raise ValueError(f"style_mode must be one of {STYLE_MODES}, got {style_mode!r}")
        self.style_mode = style_mode
        enc_args = dict(meduet_config("B")["encoder"] if encoder is None else encoder)
        if not 0.0 < style_ratio <= 1.0:
            raise ValueError(f"style_ratio must be in (0, 1], got {style_ratio}")
        if not 0.0 < mix_ratio < 1.0:
            raise ValueError(f"mix_ratio must be in (0, 1), got {mix_ratio}")
        if n_domains < 1:
            raise ValueError(f"n_domains must be >= 1, got {n_domains}")
        if style_kernel < 1 or style_kernel % 2 == 0:
            raise ValueError(f"style_kernel must be odd and positive, got {style_kernel}")
        self.encoder = LatentViTEncoder(**enc_args)
        dim = self.encoder.embed_dim
        self.content_dim = dim
        self.style_dim = int(dim * style_ratio)
        self.mix_ratio = float(mix_ratio)
        self.grl_lambda = float(grl_lambda)
        p, c = self.encoder.patch_size, self.encoder.in_channels

        # factor heads (shared over tokens) and fusion
        self.content_head = nn.Linear(dim, self.content_dim, bias=False)
        self.style_head = nn.Linear(dim, self.style_dim, bias=False)
        self.style_smooth = nn.Conv1d(
            self.style_dim, self.style_dim, style_kernel, padding=style_kernel // 2, groups=self.style_dim, bias=False
        )
        self.fusion = nn.Linear(self.content_dim + self.style_dim, dim)
        if style_mode == "global":  # unused there; frozen so that DistributedDataParallel expects no gradient
            self.style_smooth.requires_grad_(False)

        # mask-token decoder
        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_3d(decoder_embed_dim, self.encoder.grid)[None], persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, p**3 * c)

        # domain classifiers on token-pooled factors
        self.content_domain_head = _mlp([self.content_dim, 2 * self.content_dim, 2 * self.content_dim, n_domains])
        self.style_domain_head = _mlp([self.style_dim, 2 * self.style_dim, 2 * self.style_dim, n_domains])

        self.checkpointing: set[str] = set()
        self.initialize_weights()

    # ---------------------------------------------------------------- init / config
    def initialize_weights(self) -> None:
        """Xavier linears with zero bias and unit LayerNorms everywhere but the encoder (which
        initialises itself); mask token N(0, 0.02); style smoothing keeps PyTorch's Conv1d init."""
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def set_checkpointing(self, parts: Sequence[str] = ()) -> None:
        """Choose the parts whose blocks recompute activations in backward (see class docstring)."""
        unknown = set(parts) - set(CHECKPOINT_PARTS)
        if unknown:
            raise ValueError(f"unknown checkpointing parts {sorted(unknown)}; expected a subset of {CHECKPOINT_PARTS}")
        self.checkpointing = set(parts)

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    # ---------------------------------------------------------------- patches
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) latents -> (B, N, p^3 * C) patch values (the reconstruction target)."""
        return patchify(x, self.patch_size)

    def unpatchify(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(B, N, p^3 * C) -> (B, C, X, Y, Z) for token grid ``grid``."""
        return unpatchify(tokens, self.patch_size, grid, self.encoder.in_channels)

    # ---------------------------------------------------------------- encoder
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) latents -> (B, N, D) patch embeddings + positions."""
        return self.encoder.embed(x)

    def encode_tokens(self, tokens: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        """(B, N, D) embedded (possibly mixed) tokens -> (B, N, D) encoder output (cls dropped)."""
        previous = self.encoder.use_checkpoint
        self.encoder.use_checkpoint = use_checkpoint
        try:
            return self.encoder.forward_tokens(tokens)
        finally:
            self.encoder.use_checkpoint = previous

    # ---------------------------------------------------------------- factors
    def smooth_style(self, style: torch.Tensor) -> torch.Tensor:
        """(B, N, Ds) style tokens in grid order -> (B, N, Ds) smoothed along the token sequence."""
        return self.style_smooth(style.transpose(1, 2)).transpose(1, 2)

    def factorize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of full (unmixed) token sequences.

        Args:
            z: (B, N, D) encoder output.

        Returns:
            content (B, N, Dc), style (B, N, Ds) (smoothed; with ``style_mode="global"`` the
            per-volume mean given to every token).
        """
        if self.style_mode == "global":
            style = self.style_head(z)
            return self.content_head(z), style.mean(dim=1, keepdim=True).expand_as(style)
        return self.content_head(z), self.smooth_style(self.style_head(z))

    def factorize_mixture(
        self, z: torch.Tensor, mask: torch.Tensor, ids1: torch.Tensor, ids2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a mixture's encoder output by source and factorize each part.

        Args:
            z: (B, N, D) encoder output of the mixture.
            mask: (B, N) mixing mask.
            ids1, ids2: (B, n) positions of source 1 / source 2 (:func:`split_ids`).

        Returns:
            c1 (B, n, Dc), s1 (B, n, Ds), c2, s2: factors in each source's ascending token order;
            style smoothed on the full grid with the other source's tokens set to zero.
        """
        content = self.content_head(z)
        style = self.style_head(z)
        if self.style_mode == "global":  # each source's mean style over its own tokens
            s1, s2 = gather_tokens(style, ids1), gather_tokens(style, ids2)
            s1 = s1.mean(dim=1, keepdim=True).expand_as(s1)
            s2 = s2.mean(dim=1, keepdim=True).expand_as(s2)
            return gather_tokens(content, ids1), s1, gather_tokens(content, ids2), s2
        m = mask.unsqueeze(-1).to(style.dtype)
        smoothed = self.smooth_style(torch.cat([style * (1.0 - m), style * m], dim=0))
        s_one, s_two = smoothed.chunk(2, dim=0)
        return gather_tokens(content, ids1), gather_tokens(s_one, ids1), gather_tokens(content, ids2), gather_tokens(s_two, ids2)

    def encode_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain (unmixed) encoding: (B, C, X, Y, Z) latents -> content (B, N, Dc), style (B, N, Ds)."""
        return self.factorize(self.encode_tokens(self.embed(x)))

    def fuse(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """("entanglement") content (..., Dc) and style (..., Ds) -> (..., D)."""
        return self.fusion(torch.cat([content, style], dim=-1))

    def domain_logits(self, content: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Domain classifiers on token-pooled factors.

        Args:
            content: (b, n, Dc) factor tokens; mean-pooled, then gradient-reversed (``grl_lambda``).
            style: (b, n, Ds) factor tokens; mean-pooled (no reversal).

        Returns:
            content logits (b, n_domains), style logits (b, n_domains).
        """
        c = grad_reverse(content.mean(dim=1), self.grl_lambda)
        return self.content_domain_head(c), self.style_domain_head(style.mean(dim=1))

    # ---------------------------------------------------------------- decoder
    def decoder_pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """(1, N, Dd) fixed decoder positions for ``grid``."""
        if tuple(grid) == self.encoder.grid:
            return self.decoder_pos_embed
        return sincos_pos_embed_3d(self.decoder_pos_embed.shape[-1], grid)[None].to(self.decoder_pos_embed)

    def decode(self, visible: torch.Tensor, ids: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Predict every token's latent patch from the visible ones.

        Args:
            visible: (b, n, D) fused tokens, placed at positions ``ids``.
            ids: (b, n) token positions of ``visible``; every other position holds the mask token.
            grid: token grid (gx, gy, gz), N = gx * gy * gz.

        Returns:
            (b, N, p^3 * C) predicted patch values.
        """
        b = visible.shape[0]
        n_tokens = int(grid[0] * grid[1] * grid[2])
        emb = self.decoder_embed(visible)
        tokens = self.mask_token.to(emb.dtype).expand(b, n_tokens, -1)
        tokens = tokens.scatter(1, ids.unsqueeze(-1).expand(-1, -1, emb.shape[-1]), emb)
        tokens = tokens + self.decoder_pos_embed_for(grid)
        tokens = run_blocks(self.decoder_blocks, tokens, "decoder" in self.checkpointing)
        return self.decoder_pred(self.decoder_norm(tokens))

    # ---------------------------------------------------------------- training passes
    def random_mix_mask(
        self, batch: int, n_tokens: int, generator: torch.Generator | None = None, device: Any = None
    ) -> torch.Tensor:
        """(B, N) mixing mask with this network's ``mix_ratio`` (:func:`random_mix_mask`)."""
        return random_mix_mask(batch, n_tokens, self.mix_ratio, generator, device)

    def encode_mixture(self, x: torch.Tensor, mask: torch.Tensor, with_clean: bool = False) -> dict[str, torch.Tensor]:
        """Token demixing: encode the mixture of ``x`` and its partner batch, split it by source, factorize.

        Args:
            x: (B, C, X, Y, Z) latent crops.
            mask: (B, N) mixing mask.
            with_clean: also encode the clean batch, in the same 2B encoder pass.

        Returns:
            "ids1", "ids2" (B, n); "content1", "style1", "content2", "style2" (B, n, .); with
            ``with_clean`` also "content" (B, N, Dc) and "style" (B, N, Ds) of the clean batch.
        """
        tokens = self.embed(x)
        mixed = mix_tokens(tokens, mask)
        b = x.shape[0]
        out: dict[str, torch.Tensor] = {}
        if with_clean:  # one 2B pass: [clean batch, mixture]
            z_all = self.encode_tokens(torch.cat([tokens, mixed], dim=0), "mixture" in self.checkpointing)
            out["content"], out["style"] = self.factorize(z_all[:b])
            z = z_all[b:]
        else:
            z = self.encode_tokens(mixed, "mixture" in self.checkpointing)
        ids1, ids2 = split_ids(mask)
        out["ids1"], out["ids2"] = ids1, ids2
        out["content1"], out["style1"], out["content2"], out["style2"] = self.factorize_mixture(z, mask, ids1, ids2)
        return out

    def decode_streams(
        self, f: Mapping[str, torch.Tensor], grid: Sequence[int], reconstruct: bool = True, swap: bool = True
    ) -> dict[str, torch.Tensor]:
        """Decode the dual streams and/or the style swaps of a mixture's factors as one batch.

        Args:
            f: "content1", "style1", "content2", "style2" (B, n, .) and "ids1", "ids2" (B, n).
            grid: token grid.
            reconstruct: decode stream A (source 1's fused tokens visible) and stream B (source 2's).
            swap: decode x12 = (content 1, style 2) at source 1's positions and x21 = (content 2,
                style 1) at source 2's positions (tokens paired by rank in their source's order).

        Returns:
            "pred" (2B, N, p^3 C) = [stream A; stream B] and/or "swap_pred" (2B, N, p^3 C) = [x12; x21].
        """
        c1, s1, c2, s2, ids1, ids2 = f["content1"], f["style1"], f["content2"], f["style2"], f["ids1"], f["ids2"]
        if swap and c1.shape[1] != c2.shape[1]:
            raise ValueError("style swapping needs the same number of tokens from both sources (mix_ratio 0.5)")
        visible, ids = [], []
        if reconstruct:
            visible += [self.fuse(c1, s1), self.fuse(c2, s2)]
            ids += [ids1, ids2]
        if swap:
            visible += [self.fuse(c1, s2), self.fuse(c2, s1)]
            ids += [ids1, ids2]
        if not visible:
            return {}
        pred = self.decode(torch.cat(visible, dim=0), torch.cat(ids, dim=0), grid)
        b = c1.shape[0]
        out: dict[str, torch.Tensor] = {}
        if reconstruct:
            out["pred"] = pred[: 2 * b]
        if swap:
            out["swap_pred"] = pred[-2 * b :]
        return out

    def reencode(self, pred: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain factors of decoded latents: (b, N, p^3 C) predictions -> content (b, N, Dc), style (b, N, Ds)."""
        return self.encode_factors(self.unpatchify(pred, grid))

    def forward_pretrain(
        self, x: torch.Tensor, mask: torch.Tensor, swap_styles: bool = True, with_clean: bool = False,
        self_reconstruct: bool = False, windows: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The student's pass of one pretraining step up to the decoded latents.

        Re-encoding the reconstructions (MFTD) and the swaps (SiQC) is left to the caller
        (:meth:`reencode`; the training step streams it in chunks, see
        :mod:`custom_nets.engines.ssl.step`).

        Args:
            x: (B, C, X, Y, Z) latent crops; sample i is paired with B-1-i.
            mask: (B, N) mixing mask (:meth:`random_mix_mask`).
            swap_styles: also decode the style swaps (SiQC).
            with_clean: also the clean (unmixed) factors "content", "style" (B, N, .), from the same
                2B encoder pass as the mixture (the clean-pass domain losses need them).
            self_reconstruct: also decode the clean factors with every fused token visible,
                "self_pred" (B, N, p^3 C) (the all-visible reconstruction; implies ``with_clean``).
            windows: (B', C, X', Y', Z') fixed windows of the volumes (any size the patch divides):
                also their plain content "window_content" (B', N', Dc), in the same forward so that
                a DistributedDataParallel wrapper sees one pass.

        Returns:
            dict with "ids1", "ids2" (B, n); "content1", "style1", "content2", "style2" (B, n, .)
            factors of the two sources; "domain_content", "domain_style" (2B, n_domains) logits for
            [source 1; source 2]; "pred" (2B, N, p^3 C): stream A (rows :B) and stream B (rows B:);
            with ``swap_styles`` "swap_pred" (2B, N, p^3 C) = [x12; x21]. Streams and swaps are
            decoded as one batch.
        """
        grid = self.encoder.grid_of(x.shape[2:])
        out = self.encode_mixture(x, mask, with_clean=with_clean or self_reconstruct)
        c_logits, s_logits = self.domain_logits(
            torch.cat([out["content1"], out["content2"]], dim=0), torch.cat([out["style1"], out["style2"]], dim=0)
        )
        out["domain_content"], out["domain_style"] = c_logits, s_logits
        out.update(self.decode_streams(out, grid, reconstruct=True, swap=swap_styles))
        if self_reconstruct:
            n = out["content"].shape[1]
            ids = torch.arange(n, device=x.device).expand(x.shape[0], n)
            out["self_pred"] = self.decode(self.fuse(out["content"], out["style"]), ids, grid)
        if windows is not None:
            out["window_content"] = self.content_head(
                self.encode_tokens(self.embed(windows), "mixture" in self.checkpointing))
        return out

    @torch.no_grad()
    def forward_teacher(self, x: torch.Tensor, mask: torch.Tensor, clean: bool = True, swap: bool = True) -> dict[str, torch.Tensor]:
        """The EMA teacher's pass of one pretraining step (no gradient).

        The clean batch and the mixture share one encoder pass. The teacher's factors of the
        partner batch x.flip(0) are the flipped factors of x, so they are not computed again.

        Args:
            x: (B, C, X, Y, Z) latent crops.
            mask: (B, N) the teacher's mixing mask (the complement 1 - M of the student's).
            clean: compute plain factors of x (MFTD targets).
            swap: compute the mixture, its style swaps and their plain factors (SiQC keys).

        Returns:
            with ``clean`` "content" (B, N, Dc), "style" (B, N, Ds); with ``swap`` the mixture's
            "content1", "style1", "content2", "style2" (B, n, .) and "swap_content",
            "swap_style" (2B, N, .) for [x12; x21].
        """
        if not swap:
            content, style = self.encode_factors(x)
            return {"content": content, "style": style}
        grid = self.encoder.grid_of(x.shape[2:])
        out = self.encode_mixture(x, mask, with_clean=clean)
        out["swap_content"], out["swap_style"] = self.reencode(self.decode_streams(out, grid, False, True)["swap_pred"], grid)
        return out

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, swap_styles: bool = True, with_clean: bool = False,
        self_reconstruct: bool = False, windows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        """Without ``mask``: :meth:`encode_factors` (content, style tokens). With ``mask``:
        :meth:`forward_pretrain` (the training pass goes through ``forward`` so that a
        DistributedDataParallel wrapper sees it)."""
        if mask is None:
            return self.encode_factors(x)
        return self.forward_pretrain(x, mask, swap_styles, with_clean, self_reconstruct, windows)


def load_meduet(ssl_ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[MeDUET, dict[str, Any]]:
    """The MeDUET network of a meduet_ssl checkpoint, built from its ``model.json`` and loaded strictly
    (eval mode, no gradients), with the checkpoint's metadata (:func:`~custom_nets.utils.checkpoint.load_stage_network`).

    Returns:
        ``(network, metadata)``.
    """
    return load_stage_network(ssl_ckpt, STAGE, lambda args: MeDUET(**args), device)  # type: ignore[return-value]
