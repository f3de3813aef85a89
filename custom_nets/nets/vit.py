"""3D Vision Transformer pieces shared by the MeDUET encoder, the latent DiT and the segmenter.

Token order: a latent of shape (B, C, X, Y, Z) cut into cubes of side ``p`` gives a grid
(X/p, Y/p, Z/p); tokens are that grid flattened in C order (index = i*Gy*Gz + j*Gz + k).
Every module that reads or writes tokens (patch embedding, positions, patchify) uses this order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# --------------------------------------------------------------------------------------------
# Patchify / positions
# --------------------------------------------------------------------------------------------


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, N, p^3 * C), N = (X/p)(Y/p)(Z/p); values ordered (px, py, pz, C)."""
    b, c, X, Y, Z = x.shape
    if X % patch or Y % patch or Z % patch:
        raise ValueError(f"spatial shape {(X, Y, Z)} is not divisible by the patch size {patch}")
    gx, gy, gz = X // patch, Y // patch, Z // patch
    x = x.reshape(b, c, gx, patch, gy, patch, gz, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, gx * gy * gz, patch**3 * c)


def unpatchify(tokens: torch.Tensor, patch: int, grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, p^3 * C) -> (B, C, gx*p, gy*p, gz*p)."""
    b = tokens.shape[0]
    gx, gy, gz = grid
    x = tokens.reshape(b, gx, gy, gz, patch, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gx * patch, gy * patch, gz * patch)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) [sin | cos] embedding."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_3d(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """Fixed 3D sin-cos positions, the width split equally over the three axes.

    Args:
        dim: embedding width, divisible by 6.
        grid: token grid (gx, gy, gz).

    Returns:
        (gx*gy*gz, dim) float32 tensor in the token order of this module.
    """
    if dim % 6:
        raise ValueError(f"3D sin-cos positions need a width divisible by 6, got {dim}")
    gx, gy, gz = (int(g) for g in grid)
    ii, jj, kk = np.meshgrid(np.arange(gx), np.arange(gy), np.arange(gz), indexing="ij")
    d = dim // 3
    emb = np.concatenate([_sincos_1d(d, ii), _sincos_1d(d, jj), _sincos_1d(d, kk)], axis=1)
    return torch.from_numpy(emb).float()


# --------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels on CUDA, fused kernel on CPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Parameter names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) are shared with the DiT
    block so that a generator can be initialised from a MeDUET encoder.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
    """Apply ``blocks`` in turn, optionally with activation checkpointing (recompute in backward)."""
    for blk in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def init_vit_weights(module: nn.Module) -> None:
    """Xavier-uniform linears with zero bias, unit LayerNorms (the MAE/DiT convention)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


class LatentViTEncoder(nn.Module):
    """ViT on VAE latents: Conv3d patch embedding, fixed 3D sin-cos positions, cls token, pre-norm
    blocks, final LayerNorm. Paper scale (ViT-B): 4 -> 768, patch 4, 12 blocks, 12 heads.

    The position table is built for ``grid`` (6^3 for 24^3 latent crops) and recomputed on the fly
    for any other grid, since it is a fixed function of the token coordinates.

    Args:
        in_channels: latent channels.
        patch_size: cube side of one token, in latent voxels.
        embed_dim: token width (divisible by 6 and by ``num_heads``).
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``embed_dim``.
        grid: default token grid (gx, gy, gz).
    """

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 4,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        grid: Sequence[int] = (6, 6, 6),
    ) -> None:
        super().__init__()
        self.in_channels, self.patch_size, self.embed_dim = in_channels, patch_size, embed_dim
        self.grid = tuple(int(g) for g in grid)
        self.patch_embed = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(embed_dim, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.use_checkpoint = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Linear-style init of the patch embedding (as MAE), small normal cls token, xavier linears."""
        self.apply(init_vit_weights)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def grid_of(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Token grid for a latent of spatial shape ``spatial``."""
        p = self.patch_size
        if any(s % p for s in spatial):
            raise ValueError(f"latent shape {tuple(spatial)} is not divisible by the patch size {p}")
        return tuple(int(s) // p for s in spatial)  # type: ignore[return-value]

    def pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """(1, N, D) positions for ``grid``."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        return sincos_pos_embed_3d(self.embed_dim, grid)[None].to(self.pos_embed)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) latent -> (B, N, D) tokens with positions added (no cls token)."""
        grid = self.grid_of(x.shape[2:])
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed_for(grid)

    def forward_tokens(self, tokens: torch.Tensor, return_layers: Sequence[int] = ()) -> torch.Tensor | tuple:
        """Prepend cls, run the blocks and the final norm.

        Args:
            tokens: (B, N, D) embedded tokens (output of :meth:`embed`, possibly mixed).
            return_layers: 1-based block indices whose outputs (without cls, before the final
                norm) are also returned, e.g. (3, 6, 9, 12) for UNETR skips.

        Returns:
            (B, N, D) normalised tokens without cls; with ``return_layers``, a tuple
            (tokens, [hidden_l for l in return_layers]).
        """
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        if not return_layers:
            x = run_blocks(self.blocks, x, self.use_checkpoint)
            return self.norm(x)[:, 1:]
        hidden = []
        for i, blk in enumerate(self.blocks, start=1):
            x = checkpoint(blk, x, use_reentrant=False) if self.use_checkpoint and torch.is_grad_enabled() else blk(x)
            if i in return_layers:
                hidden.append(x[:, 1:])
        return self.norm(x)[:, 1:], hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) latent -> (B, N, D) encoded tokens (cls dropped)."""
        return self.forward_tokens(self.embed(x))


def vit_encoder_config(size: str = "B") -> dict:
    """Constructor arguments of :class:`LatentViTEncoder` for named sizes (S, B, L)."""
    sizes = {
        "S": dict(embed_dim=384, depth=12, num_heads=6),
        "B": dict(embed_dim=768, depth=12, num_heads=12),
        # 1152 rather than ViT-L's 1024: 3D sin-cos positions need a width divisible by 6
        "L": dict(embed_dim=1152, depth=24, num_heads=16),
    }
    if size not in sizes:
        raise ValueError(f"unknown ViT size {size!r}; expected one of {sorted(sizes)}")
    return dict(in_channels=4, patch_size=4, mlp_ratio=4.0, **sizes[size])
