"""Latent diffusion transformer conditioned on MeDUET content and style factors (DiT / SiT, 3D).

Sections: embedders (timestep, factor), the adaLN block, the final layer, positions and
initialisation from a MeDUET encoder, size factories.

The network is shared by the DiT and SiT variants; they differ only in the training objective
(``LDM_OBJECTIVES``: DDPM noise prediction for DiT, rectified-flow velocity for SiT), which lives in
:mod:`custom_nets.engines.ldm.train`.

Conditioning (METHOD.md section 4): content (768) and style (192) vectors are L2-normalised, divided
by a learnable temperature (initialised at 0.1), passed through SiLU + linear to the model width.
In every block, shift and scale = f_content(c) + f_style(s); the two gates come from the timestep
embedding alone. All modulation layers start at zero (adaLN-Zero), so an untrained block is the
identity and the untrained model ignores its conditions. Each factor is independently replaced
by a learned null embedding with probability ``condition_dropout`` during training (classifier-free
guidance with separate content and style scales).

Norms: the blocks keep the *affine* LayerNorms of :class:`custom_nets.nets.vit.Block` (DiT uses
non-affine ones) so that a MeDUET encoder's blocks load into them tensor for tensor; adaLN shift /
scale act on top of the affine norm. With zero-initialised modulation the affine norm alone is
what the SSL encoder learned.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from custom_nets.nets.vit import Block, init_vit_weights, patchify, sincos_pos_embed_3d, unpatchify
from custom_nets.utils.checkpoint import load_state_dict, read_stage_meta
from custom_nets.utils.errors import CheckpointError
from custom_nets.utils.flags import as_bool

logger = logging.getLogger(__name__)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens: (B, N, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (in scheduler units, 0..num_train_timesteps) -> (B, D) vectors.

    Sinusoidal features (MONAI's ``get_timestep_embedding``) followed by Linear-SiLU-Linear.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float or int timesteps -> (B, D)."""
        freq = get_timestep_embedding(t.reshape(-1).float(), self.frequency_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class FactorEmbedder(nn.Module):
    """A content or style vector -> (B, D) condition embedding, with dropout to a learned null.

    L2-normalise, divide by a learnable temperature, SiLU, linear to the model width. The null
    embedding (in the output space, like DiT's extra class row) stands for "no condition".

    Args:
        factor_dim: width of the factor vector (768 content, 192 style at paper scale).
        hidden_size: model width.
        dropout_prob: training-time probability of replacing a sample's embedding by the null.
        init_temperature: initial value of the temperature.
    """

    def __init__(self, factor_dim: int, hidden_size: int, dropout_prob: float = 0.2, init_temperature: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"condition dropout must lie in [0, 1), got {dropout_prob}")
        if init_temperature <= 0:
            raise ValueError(f"temperature must be positive, got {init_temperature}")
        self.factor_dim = factor_dim
        self.dropout_prob = dropout_prob
        # log-parametrised so that the temperature stays positive under any update
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.proj = nn.Linear(factor_dim, hidden_size)
        self.null_embedding = nn.Parameter(torch.zeros(hidden_size))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def token_drop(self, emb: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Replace rows of ``emb`` (B, D) by the null embedding.

        Args:
            emb: condition embeddings.
            force_drop: (B,) bool; True -> null. When None, rows are dropped at random with
                ``dropout_prob`` in training mode and never in eval mode.
        """
        if force_drop is None:
            if not (self.training and self.dropout_prob > 0):
                return emb
            drop = torch.rand(emb.shape[0], device=emb.device) < self.dropout_prob
        else:
            drop = force_drop.to(device=emb.device, dtype=torch.bool).reshape(-1)
        return torch.where(drop[:, None], self.null_embedding.to(emb.dtype).expand_as(emb), emb)

    def forward(self, factor: torch.Tensor | None, batch: int, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """(B, factor_dim) or None (all null) -> (B, D)."""
        if factor is None:
            return self.null_embedding[None].expand(batch, -1)
        if factor.shape != (batch, self.factor_dim):
            raise ValueError(f"expected a ({batch}, {self.factor_dim}) factor, got {tuple(factor.shape)}")
        z = F.normalize(factor.float(), dim=-1) / self.temperature
        emb = self.proj(F.silu(z).to(self.proj.weight.dtype))
        return self.token_drop(emb, force_drop)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class DiTBlock(Block):
    """:class:`~custom_nets.nets.vit.Block` (same parameter names, affine norms) with adaLN-Zero.

    shift/scale of both sub-layers = adaLN_content(c) + adaLN_style(s); gates = adaLN_gate(t).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(dim, num_heads, mlp_ratio)
        self.adaLN_content = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))
        self.adaLN_style = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))
        self.adaLN_gate = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, c_emb: torch.Tensor, s_emb: torch.Tensor) -> torch.Tensor:
        """x (B, N, D); t_emb, c_emb, s_emb (B, D) -> (B, N, D)."""
        mod = self.adaLN_content(c_emb) + self.adaLN_style(s_emb)
        shift_msa, scale_msa, shift_mlp, scale_mlp = mod.chunk(4, dim=-1)
        gate_msa, gate_mlp = self.adaLN_gate(t_emb).chunk(2, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Non-affine LayerNorm, adaLN from (t + c + s), linear to p^3 * C values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size**3 * out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), cond (B, D) -> (B, N, p^3 C)."""
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sincos_table(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    return sincos_pos_embed_3d(dim, grid)[None]


def interpolate_pos_embed(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling of a learned position table to another token grid.

    Args:
        pos: (1, N_old, D) or (N_old, D) table in the token order of :mod:`custom_nets.nets.vit`.
        old_grid: grid of ``pos``.
        new_grid: target grid.

    Returns:
        (1, N_new, D) table.
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    pos = pos.reshape(1, -1, pos.shape[-1])
    if pos.shape[1] != math.prod(old_grid):
        raise ValueError(f"position table has {pos.shape[1]} rows, grid {old_grid} needs {math.prod(old_grid)}")
    if old_grid == new_grid:
        return pos
    vol = pos.reshape(1, *old_grid, -1).permute(0, 4, 1, 2, 3).float()
    vol = F.interpolate(vol, size=new_grid, mode="trilinear", align_corners=False)
    return vol.permute(0, 2, 3, 4, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class LatentDiT(nn.Module):
    """3D diffusion transformer on VAE latents, conditioned on a content and a style vector.

    Args:
        in_channels: latent channels (output has the same number).
        input_size: default latent crop (X, Y, Z); any shape divisible by ``patch_size`` works at
            run time (fixed sin-cos positions are recomputed for its grid).
        patch_size: cube side of a token in latent voxels.
        hidden_size: width (divisible by 6 for 3D sin-cos positions, and by ``num_heads``).
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``hidden_size``.
        content_dim: width of the content vectors.
        style_dim: width of the style vectors.
        condition_dropout: training probability of dropping each factor (independently) to null.
        init_temperature: initial temperature of the factor embedders.
        learned_pos: learn the position table (initialised sin-cos) instead of keeping it fixed;
            needed only to load an encoder that was trained with learned positions.
        use_checkpoint: activation checkpointing in the blocks (saves memory in training).
        content_map: also condition on a content *token map* (B, content_dim, gx, gy, gz), added to
            every token through a zero-initialised projection, beside the pooled content vector
            (not in the paper, whose generator sees one vector per volume, too little to place an
            anatomy; meduet_ldm's ``content_conditioning: "map"``). Dropped together with the vector.
    """

    def __init__(
        self,
        in_channels: int = 4,
        input_size: Sequence[int] = (64, 64, 32),
        patch_size: int = 4,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        content_dim: int = 768,
        style_dim: int = 192,
        condition_dropout: float = 0.2,
        init_temperature: float = 0.1,
        learned_pos: bool = False,
        use_checkpoint: bool = False,
        content_map: bool = False,
    ) -> None:
        super().__init__()
        # constructor arguments, recorded in model.json so that inference rebuilds the same network
        self.network_args = dict(
            in_channels=in_channels, input_size=[int(s) for s in input_size], patch_size=patch_size,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            content_dim=content_dim, style_dim=style_dim, condition_dropout=condition_dropout,
            init_temperature=init_temperature, learned_pos=learned_pos,
        )
        if content_map:  # recorded only when on: model.json of vector-conditioned generators is unchanged
            self.network_args["content_map"] = True
        if hidden_size % 6:
            raise ValueError(f"hidden_size must be divisible by 6 (3D sin-cos positions), got {hidden_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if len(input_size) != 3 or any(int(s) % patch_size for s in input_size):
            raise ValueError(f"input_size {tuple(input_size)} must be 3 sizes divisible by patch_size {patch_size}")
        if depth < 1 or content_dim < 1 or style_dim < 1:
            raise ValueError("depth, content_dim and style_dim must be positive")
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.hidden_size = patch_size, hidden_size
        self.input_size = tuple(int(s) for s in input_size)
        self.grid = tuple(s // patch_size for s in self.input_size)
        self.learned_pos = learned_pos
        self.use_checkpoint = use_checkpoint

        self.patch_embed = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        pos = sincos_pos_embed_3d(hidden_size, self.grid)[None]
        if learned_pos:
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos, persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.content_embedder = FactorEmbedder(content_dim, hidden_size, condition_dropout, init_temperature)
        self.style_embedder = FactorEmbedder(style_dim, hidden_size, condition_dropout, init_temperature)
        self.content_dim = content_dim
        self.content_map_embed: nn.Module | None = None
        if content_map:  # per-token content: normalised, then a linear that starts at zero (no effect yet)
            self.content_map_embed = nn.Sequential(nn.LayerNorm(content_dim, elementwise_affine=False, eps=1e-6),
                                                   nn.Linear(content_dim, hidden_size))
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every special initialisation in one place.

        - all linears xavier-uniform with zero bias, LayerNorms unit (as :func:`init_vit_weights`);
        - patch embedding: xavier-uniform on its flattened kernel (a linear on patches), zero bias;
        - timestep MLP: normal(0, 0.02) (DiT);
        - factor embedders: normal(0, 0.02) projection and null embeddings, temperature 0.1;
        - adaLN-Zero: every content / style / gate modulation linear is zero (weights and bias),
          so each block starts as the identity and the conditions have no effect yet;
        - final layer: zero modulation and zero output linear (the untrained model predicts 0);
        - content map projection (``content_map``): zero, so the map starts with no effect.
        """
        self.apply(init_vit_weights)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for emb in (self.content_embedder, self.style_embedder):
            nn.init.normal_(emb.proj.weight, std=0.02)
            nn.init.normal_(emb.null_embedding, std=0.02)
        for blk in self.blocks:
            for mod in (blk.adaLN_content, blk.adaLN_style, blk.adaLN_gate):
                nn.init.zeros_(mod[-1].weight)
                nn.init.zeros_(mod[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.content_map_embed is not None:
            nn.init.zeros_(self.content_map_embed[-1].weight)
            nn.init.zeros_(self.content_map_embed[-1].bias)

    # ---- positions -------------------------------------------------------------------------

    def grid_of(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Token grid of a latent with spatial shape ``spatial``."""
        if len(spatial) != 3 or any(int(s) % self.patch_size for s in spatial):
            raise ValueError(f"latent shape {tuple(spatial)} is not 3D or not divisible by the patch size {self.patch_size}")
        return tuple(int(s) // self.patch_size for s in spatial)  # type: ignore[return-value]

    def pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """(1, N, D) positions for ``grid``: the stored table, a fresh sin-cos table or (learned
        positions only) the stored table interpolated trilinearly."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.pos_embed
        if self.learned_pos:
            return interpolate_pos_embed(self.pos_embed, self.grid, grid)
        return _sincos_table(self.hidden_size, grid).to(self.pos_embed)

    # ---- forward ---------------------------------------------------------------------------

    def content_map_tokens(self, content_map: torch.Tensor, grid: Sequence[int], batch: int) -> torch.Tensor:
        """(B, Dc, mx, my, mz) content map -> (B, N, D) additions to the tokens of ``grid``.

        A map on another grid is resampled to this one: averaged over whole cells where the map
        is an integer multiple finer, trilinear otherwise.
        """
        if self.content_map_embed is None:
            raise ValueError("this generator was built without content_map; it takes content vectors only")
        if content_map.ndim != 5 or content_map.shape[:2] != (batch, self.content_dim):
            raise ValueError(f"expected a ({batch}, {self.content_dim}, X, Y, Z) content map, got {tuple(content_map.shape)}")
        m = content_map.float()
        src, grid = tuple(m.shape[2:]), tuple(int(g) for g in grid)
        if src != grid:
            if all(s % g == 0 for s, g in zip(src, grid)):
                m = F.avg_pool3d(m, kernel_size=tuple(s // g for s, g in zip(src, grid)))
            else:
                m = F.interpolate(m, size=grid, mode="trilinear", align_corners=False)
        w = self.content_map_embed[-1].weight
        return self.content_map_embed(m.flatten(2).transpose(1, 2).to(w.dtype))

    def embed_conditions(
        self,
        t: torch.Tensor,
        content: torch.Tensor | None,
        style: torch.Tensor | None,
        batch: int,
        content_drop: torch.Tensor | None = None,
        style_drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Timestep, content and style embeddings, each (B, D)."""
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        t_emb = self.t_embedder(t)
        c_emb = self.content_embedder(content, batch, content_drop)
        s_emb = self.style_embedder(style, batch, style_drop)
        return t_emb, c_emb, s_emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        content: torch.Tensor | None = None,
        style: torch.Tensor | None = None,
        content_drop: torch.Tensor | None = None,
        style_drop: torch.Tensor | None = None,
        content_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the objective's target (velocity or noise) for noisy latents.

        Args:
            x: (B, C, X, Y, Z) noisy latents, X, Y, Z divisible by the patch size.
            t: (B,) or scalar timesteps in scheduler units (0..num_train_timesteps).
            content: (B, content_dim) or None (null for every sample).
            style: (B, style_dim) or None.
            content_drop, style_drop: (B,) bool forcing the null condition (None: random dropout
                in training mode, none in eval mode).
            content_map: (B, content_dim, mx, my, mz) content token map (generators built with
                ``content_map`` only; None: no map for any sample, as when the content is dropped).

        Returns:
            (B, C, X, Y, Z).
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, X, Y, Z) latents, got {tuple(x.shape)}")
        b = x.shape[0]
        grid = self.grid_of(x.shape[2:])
        if content_map is not None and content_drop is None and self.training:
            # one draw for both content inputs: the map and the vector are dropped together
            p = self.content_embedder.dropout_prob
            content_drop = torch.rand(b, device=x.device) < p
        t_emb, c_emb, s_emb = self.embed_conditions(t, content, style, b, content_drop, style_drop)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed_for(grid)
        if content_map is not None:
            add = self.content_map_tokens(content_map, grid, b)
            if content_drop is not None:
                add = add * (~content_drop.to(device=add.device, dtype=torch.bool).reshape(-1))[:, None, None].to(add.dtype)
            h = h + add
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(blk, h, t_emb, c_emb, s_emb, use_reentrant=False)
            else:
                h = blk(h, t_emb, c_emb, s_emb)
        out = self.final_layer(h, t_emb + c_emb + s_emb)
        return unpatchify(out, self.patch_size, grid, self.out_channels)

    def forward_with_guidance(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        content: torch.Tensor,
        style: torch.Tensor,
        content_scale: float,
        style_scale: float,
        content_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Guided prediction with separate content and style scales, one batched forward:

        v = v(null, null) + g_s (v(null, s) - v(null, null)) + g_c (v(c, null) - v(null, null)).

        Args:
            x: (B, C, X, Y, Z); t: (B,) or scalar; content (B, Dc); style (B, Ds).
            content_scale: g_c; style_scale: g_s.
            content_map: (B, Dc, mx, my, mz) with ``content_map`` generators (part of "c").
        """
        b = x.shape[0]
        dev = x.device
        ones, zeros = torch.ones(b, dtype=torch.bool, device=dev), torch.zeros(b, dtype=torch.bool, device=dev)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1)
        out = self(
            torch.cat([x, x, x]),
            torch.cat([t, t, t]),
            torch.cat([content, content, content]),
            torch.cat([style, style, style]),
            content_drop=torch.cat([ones, ones, zeros]),
            style_drop=torch.cat([ones, zeros, ones]),
            content_map=None if content_map is None else torch.cat([content_map, content_map, content_map]),
        )
        v_nn, v_ns, v_cn = out.chunk(3)
        return v_nn + style_scale * (v_ns - v_nn) + content_scale * (v_cn - v_nn)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, N, p^3 C) in this network's token order."""
        return patchify(x, self.patch_size)


# --------------------------------------------------------------------------------------------
# Initialisation from a MeDUET encoder
# --------------------------------------------------------------------------------------------


def _block_keys_from_encoder(dit: LatentDiT) -> list[str]:
    """DiT state-dict keys that a MeDUET encoder provides: the patch embedding and every block
    tensor inherited from :class:`~custom_nets.nets.vit.Block` (not the adaLN layers)."""
    keys = [k for k in dit.state_dict() if k.startswith("patch_embed.")]
    keys += [k for k in dit.state_dict() if k.startswith("blocks.") and ".adaLN_" not in k]
    return keys


def init_from_meduet(dit: LatentDiT, ssl_ckpt: str | Path) -> list[str]:
    """Copy a MeDUET encoder's patch embedding and transformer blocks into ``dit``, strictly.

    Positions: the encoder's are fixed 3D sin-cos, a function of the token grid, so the table
    for the generator's grid is recomputed (exact "interpolation"). Should a checkpoint carry a
    position table (``encoder.pos_embed``, a learned one), it is resampled trilinearly to the
    generator's grid with :func:`interpolate_pos_embed` and loaded when the generator learns its
    positions; a fixed-position generator accepts it only if it equals sin-cos for its grid.

    The cls token and the encoder's final norm have no counterpart in the generator and are not used.

    Args:
        dit: the generator (its width and depth must equal the encoder's).
        ssl_ckpt: ``models/model.pt`` of the meduet_ssl bundle.

    Returns:
        The generator's state-dict keys that were loaded.

    Raises:
        CheckpointError: missing / wrong-stage checkpoint, no encoder tensors, other width,
            other depth or any shape mismatch.
    """
    meta = read_stage_meta(ssl_ckpt, "meduet_ssl")
    sd = load_state_dict(ssl_ckpt)
    enc = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    if "patch_embed.weight" not in enc:
        raise CheckpointError(f"{ssl_ckpt}: no 'encoder.patch_embed.weight'; not a MeDUET encoder checkpoint")
    width = int(enc["patch_embed.weight"].shape[0])
    if width != dit.hidden_size:
        raise CheckpointError(
            f"{ssl_ckpt}: encoder width {width} does not match the generator width {dit.hidden_size}; "
            f"build the generator with hidden_size={width} or pretrain meduet_ssl at width {dit.hidden_size}"
        )
    wanted = _block_keys_from_encoder(dit)
    offered = [k for k in enc if k.startswith(("patch_embed.", "blocks."))]
    missing = sorted(set(wanted) - set(offered))
    unexpected = sorted(set(offered) - set(wanted))
    target = dit.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(enc[k].shape)} vs generator {tuple(target[k].shape)}"
        for k in wanted
        if k in enc and enc[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        depth_ckpt = len({k.split(".")[1] for k in offered if k.startswith("blocks.")})
        raise CheckpointError(
            f"{ssl_ckpt}: encoder (depth {depth_ckpt}) does not fit the generator (depth {len(dit.blocks)}): "
            + "; ".join(
                p
                for p in (
                    f"missing {missing[:6]}" if missing else "",
                    f"unexpected {unexpected[:6]}" if unexpected else "",
                    f"shape mismatch {mismatched[:6]}" if mismatched else "",
                )
                if p
            )
        )
    loaded = list(wanted)
    with torch.no_grad():
        for k in wanted:
            target[k].copy_(enc[k])
        if "pos_embed" in enc:
            enc_grid = tuple((meta.get("network", {}).get("encoder", {}) or {}).get("grid", (6, 6, 6)))
            pos = interpolate_pos_embed(enc["pos_embed"], enc_grid, dit.grid)
            if dit.learned_pos:
                dit.pos_embed.copy_(pos)
                loaded.append("pos_embed")
            elif not torch.allclose(pos.float(), dit.pos_embed.float(), atol=1e-4):
                raise CheckpointError(
                    f"{ssl_ckpt}: the encoder has learned positions; build the generator with learned_pos=True"
                )
    logger.info(
        "initialised %d generator tensors from %s (patch embedding + %d blocks); positions: %s",
        len(loaded), ssl_ckpt, len(dit.blocks),
        "encoder table resampled" if "pos_embed" in loaded else f"fixed sin-cos for grid {dit.grid}",
    )
    return loaded


def maybe_init_from_meduet(dit: LatentDiT, ssl_ckpt: str | Path | None, enabled: bool = True) -> LatentDiT:
    """Config helper: :func:`init_from_meduet` when ``enabled`` and a checkpoint is named; returns ``dit``."""
    if as_bool(enabled, "init_from_ssl") and ssl_ckpt:
        init_from_meduet(dit, ssl_ckpt)
    else:
        logger.info("generator initialised at random (no MeDUET initialisation)")
    return dit


# --------------------------------------------------------------------------------------------
# Size factories
# --------------------------------------------------------------------------------------------

# the network is shared; the name's prefix picks the objective
LDM_OBJECTIVES = {"DiT": "ddpm", "SiT": "flow"}
# widths match custom_nets.nets.vit.vit_encoder_config (L is 1152: 3D sin-cos needs width % 6 == 0)
_SIZES = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1152, depth=24, num_heads=16),
}


# the bundle's ``model_size`` id: "paper" is SiT/DiT-B, "demo" a 2-block network for CPU demos and tests
_BUNDLE_SIZES = {"paper": _SIZES["B"], "demo": dict(hidden_size=48, depth=2, num_heads=4)}


def ldm_size_config(size: str = "paper") -> dict:
    """Width, depth and heads of :class:`LatentDiT` for a bundle ``model_size`` ("paper", "demo", "S", "B", "L").

    Returns:
        A fresh dict with ``hidden_size``, ``depth`` and ``num_heads``.
    """
    table = {**_BUNDLE_SIZES, **_SIZES}
    if size not in table:
        raise ValueError(f"unknown generator size {size!r}; expected one of {sorted(table)}")
    return dict(table[size])


def ldm_config(name: str = "SiT-B/4") -> dict:
    """Constructor arguments of :class:`LatentDiT` for a model name such as ``"DiT-B/4"``."""
    try:
        family, rest = name.split("-")
        size, patch = rest.split("/")
        if family not in LDM_OBJECTIVES or size not in _SIZES:
            raise ValueError
        return dict(patch_size=int(patch), **_SIZES[size])
    except ValueError:
        raise ValueError(f"unknown generator {name!r}; expected one of {sorted(LDM_MODELS)}") from None


def objective_of(name: str) -> str:
    """Training objective of a model name: "ddpm" for DiT-*, "flow" for SiT-*."""
    ldm_config(name)
    return LDM_OBJECTIVES[name.split("-")[0]]


def _factory(name: str) -> Callable[..., LatentDiT]:
    def build(**kwargs) -> LatentDiT:
        return LatentDiT(**{**ldm_config(name), **kwargs})

    build.__name__ = name.replace("-", "_").replace("/", "_")
    build.__doc__ = f"{name}: {_SIZES[name.split('-')[1][0]]}, patch {name.split('/')[1]} (objective {LDM_OBJECTIVES[name[:3]]})."
    return build


LDM_MODELS: dict[str, Callable[..., LatentDiT]] = {
    f"{fam}-{size}/4": _factory(f"{fam}-{size}/4") for fam in LDM_OBJECTIVES for size in _SIZES
}
DiT_S_4, DiT_B_4, DiT_L_4 = LDM_MODELS["DiT-S/4"], LDM_MODELS["DiT-B/4"], LDM_MODELS["DiT-L/4"]
SiT_S_4, SiT_B_4, SiT_L_4 = LDM_MODELS["SiT-S/4"], LDM_MODELS["SiT-B/4"], LDM_MODELS["SiT-L/4"]
