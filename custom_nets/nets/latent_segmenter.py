"""Segmentation and classification in the latent space of a frozen MAISI VAE, with a MeDUET ViT.

An image crop (B, 1, 96, 96, 96) is encoded by the VAE to its posterior mean (B, 4, 24, 24, 24); a
ViT (patch 4, 6^3 = 216 tokens) initialised from the MeDUET encoder reads the latent; a UNETR-style
decoder takes the outputs of blocks 3, 6 and 9 and the normalised output of block 12, decodes back
to the 24^3 latent grid, and the logits are upsampled x4 (trilinear) to the image grid.

Decoder (``fs`` = feature_size, ``D`` = ViT width; the ViT grid ``g`` is latent / 4)::

    latent           --UnetrBasicBlock-------------------------------> fs    @ 4g  (skip)
    block 3  tokens  --UnetrPrUpBlock (2 x up)-----------------------> 2fs   @ 4g  (skip)
    block 6  tokens  --UnetrPrUpBlock (1 x up)-----------------------> 4fs   @ 2g  (skip)
    block 9  tokens  --UnetrBasicBlock-------------------------------> 8fs   @ g   (skip)
    norm(block 12)   --cat(block 9 skip)--UnetrBasicBlock------------> 8fs   @ g
                     --UnetrUpBlock(+ block 6 skip)------------------> 4fs   @ 2g
                     --UnetrUpBlock(+ block 3 skip)------------------> 2fs   @ 4g
                     --cat(latent skip)--UnetrBasicBlock-------------> fs    @ 4g (latent grid)
    decoder "progressive" (default): features resampled to half resolution + image skip at half
        resolution (stride-2 conv block) -> conv block -> resampled to full resolution + image skip at
        full resolution -> conv block -> 1x1 conv (UNETR's encoder1/encoder2 pattern);
    decoder "paper": 1x1 conv to classes @ 4g, upsampled x4 to the image grid (the paper's head);
    decoder "refine": features upsampled x4, concatenated with a light convolutional path on the
        image at full resolution, one residual conv block, then the 1x1 conv.

Alignment (:mod:`custom_nets.nets.latent_grid`): every latent -> image resampling places latent
voxel k on image voxel 4k + 1.5 (``latent_grid="decoder"``, where the VAE decoder puts it, and where a
trained encoder's label information was measured to be) or on 4k + 3 (``"encoder"``, the centre of
the encoder's receptive field, which an untrained encoder follows).

The split between :meth:`LatentSegmenter.encode_latent` and :meth:`LatentSegmenter.forward_latent`
lets whole-volume inference encode each volume once (tiled VAE encoding) and slide windows over
the latent volume (see :mod:`custom_nets.engines.seg.inference`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from custom_nets.nets.latent_grid import LATENT_GRIDS, Grid, resample_grid, vae_latent_grid
from custom_nets.nets.vae import encode_volume, maisi_vae, vae_config
from custom_nets.nets.vit import LatentViTEncoder, vit_encoder_config
from custom_nets.utils.io import jsonable
from custom_nets.utils.flags import as_bool

logger = logging.getLogger(__name__)

DECODERS = ("progressive", "paper", "refine")

__all__ = [
    "LatentViTBackbone",
    "LatentSegmenter",
    "LatentClassifier",
    "DECODERS",
    "segmenter_config",
]


def _vae_downsampling(vae: nn.Module) -> int:
    """Spatial factor between image and latent grids of a MAISI VAE (2 ** number of downsamplings)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiDownsample

    n_down = sum(isinstance(m, MaisiDownsample) for m in vae.encoder.modules())
    return 2**n_down


def _as_triple(size: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (int(size),) * 3 if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"{name} must be one or three positive sizes, got {size!r}")
    return t  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Backbone: frozen VAE encoder + ViT
# --------------------------------------------------------------------------------------------


class LatentViTBackbone(nn.Module):
    """Frozen MAISI VAE (only its encoder is run) followed by a :class:`LatentViTEncoder`.

    The whole ``AutoencoderKlMaisi`` is held so that a ``meduet_vae`` checkpoint loads strictly and
    the tiled whole-volume encoder of :mod:`custom_nets.nets.vae` can be reused; the decoder is never
    run. With ``freeze_vae`` the VAE has ``requires_grad=False`` and stays in eval mode even when the
    module is put in training mode (its GroupNorms have no running statistics, but dropout-free eval
    mode documents that the VAE is a fixed feature extractor).

    Args:
        vae: ``AutoencoderKlMaisi`` constructor arguments (``custom_nets.nets.vae.vae_config``).
        encoder: :class:`LatentViTEncoder` constructor arguments (``grid`` is set from ``roi_size``).
        roi_size: image crop the network is built for (positions are recomputed for other sizes).
        freeze_vae: keep the VAE fixed.
        latent_scale: factor applied to the VAE posterior mean (the ``scale_factor`` the upstream
            stages trained with; 1.0 when latents are used as they come).
    """

    def __init__(
        self,
        vae: Mapping[str, Any],
        encoder: Mapping[str, Any],
        roi_size: int | Sequence[int] = 96,
        freeze_vae: bool = True,
        latent_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.vae = maisi_vae(**dict(vae))
        self.vae_factor = _vae_downsampling(self.vae)
        self.latent_channels = int(self.vae.latent_channels)
        self.image_channels = int(dict(vae).get("in_channels", 1))
        self.roi_size = _as_triple(roi_size, "roi_size")
        enc_args = dict(encoder)
        enc_args.setdefault("in_channels", self.latent_channels)
        if int(enc_args["in_channels"]) != self.latent_channels:
            raise ValueError(
                f"encoder in_channels {enc_args['in_channels']} != VAE latent channels {self.latent_channels}"
            )
        self.patch_size = int(enc_args.get("patch_size", 4))
        unit = self.vae_factor * self.patch_size
        if any(s % unit for s in self.roi_size):
            raise ValueError(
                f"roi_size {self.roi_size} must be divisible by VAE factor x patch size = {unit}"
            )
        self.latent_roi = tuple(s // self.vae_factor for s in self.roi_size)
        enc_args["grid"] = tuple(s // self.patch_size for s in self.latent_roi)
        self.encoder = LatentViTEncoder(**enc_args)
        self.embed_dim = self.encoder.embed_dim
        self.depth = len(self.encoder.blocks)
        self.freeze_vae = as_bool(freeze_vae, "freeze_vae")
        self.latent_scale = float(latent_scale)
        if self.freeze_vae:
            self.vae.requires_grad_(False)
            self.vae.eval()

    def train(self, mode: bool = True) -> LatentViTBackbone:
        """Set training mode everywhere except a frozen VAE, which stays in eval mode."""
        super().train(mode)
        if self.freeze_vae:
            self.vae.eval()
        return self

    def encode_latent(self, image: torch.Tensor) -> torch.Tensor:
        """(B, Ci, X, Y, Z) image -> (B, C, X/f, Y/f, Z/f) scaled VAE posterior mean (f = VAE factor)."""
        if any(s % self.vae_factor for s in image.shape[2:]):
            raise ValueError(f"image shape {tuple(image.shape[2:])} is not divisible by the VAE factor {self.vae_factor}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vae):
            z_mu = self.vae.quant_conv_mu(self.vae.encoder(image))
        return z_mu * self.latent_scale

    def encode_volume(self, image: torch.Tensor, roi_size: int | None = 96, overlap: float = 0.25,
                      exact: bool = False, precision: str = "fp32", channels_last: bool = False,
                      granularity: str = "resolution", store_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Whole-volume tiled encoding (``custom_nets.nets.vae.encode_volume``), scaled like :meth:`encode_latent`.

        Args:
            image: (B, Ci, X, Y, Z), each side divisible by the VAE factor.
            roi_size: VAE tile edge in image voxels (None: one untiled pass).
            overlap: tile overlap fraction (blended tiles).
            exact: whole-volume GroupNorm statistics (equal to one untiled pass) instead of blended
                tiles whose statistics are those of each tile, like the training crops.
            precision: VAE precision, "fp32", "bf16" (autocast) or "auto" (bf16 where native).
            channels_last: run the VAE's convolutions with channels-last-3d weights.
            granularity: stage split of the exact mode (``custom_nets.nets.vae.split_stages``):
                "resolution" stores least, "norm" computes each convolution once.
            store_dtype: dtype of the exact mode's stored whole-volume stage outputs.

        Returns:
            (B, C, X/f, Y/f, Z/f) latent.
        """
        with torch.no_grad() if self.freeze_vae else torch.enable_grad():
            z = encode_volume(self.vae, image, roi=None if roi_size is None else int(roi_size), overlap=overlap,
                              exact=exact, precision=precision, channels_last=channels_last,
                              granularity=granularity, store_dtype=store_dtype)
        return z * self.latent_scale

    def tokens(self, latent: torch.Tensor, return_layers: Sequence[int] = ()) -> torch.Tensor | tuple:
        """(B, C, x, y, z) latent -> ViT output (see :meth:`LatentViTEncoder.forward_tokens`)."""
        return self.encoder.forward_tokens(self.encoder.embed(latent), return_layers=tuple(return_layers))


# --------------------------------------------------------------------------------------------
# Segmenter
# --------------------------------------------------------------------------------------------


class LatentSegmenter(LatentViTBackbone):
    """UNETR-style segmenter on VAE latents (see the module docstring for the layout).

    Args:
        vae: ``AutoencoderKlMaisi`` constructor arguments.
        encoder: :class:`LatentViTEncoder` constructor arguments (patch size 4: the decoder climbs two
            x2 steps from the token grid to the latent grid).
        num_classes: output channels (background included).
        roi_size: image crop size the network is trained on (96^3 in the paper).
        feature_size: decoder width unit ``fs``.
        skip_layers: 1-based ViT blocks feeding the three token skips (default: depth/4, depth/2,
            3*depth/4, i.e. 3, 6, 9 for 12 blocks); the last block enters through the final norm.
        norm_name: decoder normalisation (MONAI name, e.g. "instance").
        refine_channels: width of the full-resolution image path of the "refine" decoder (> 0
            with decoder "paper" selects "refine", as before decoders were named).
        freeze_vae: keep the VAE fixed.
        latent_scale: factor applied to the VAE posterior mean.
        decoder: "progressive" (image skips at full and half resolution), "paper" (latent-grid
            logits upsampled x4) or "refine" (see the module docstring).
        latent_grid: where latent voxel k sits on the image grid: "decoder" (4k + 1.5, where the VAE
            decoder writes it; the measured placement of a trained VAE) or "encoder" (4k + 3, the
            centre of the encoder's receptive field).
    """

    def __init__(
        self,
        vae: Mapping[str, Any],
        encoder: Mapping[str, Any],
        num_classes: int,
        roi_size: int | Sequence[int] = 96,
        feature_size: int = 16,
        skip_layers: Sequence[int] | None = None,
        norm_name: str | tuple = "instance",
        refine_channels: int = 0,
        freeze_vae: bool = True,
        latent_scale: float = 1.0,
        decoder: str = "progressive",
        latent_grid: str = "decoder",
    ) -> None:
        super().__init__(vae, encoder, roi_size=roi_size, freeze_vae=freeze_vae, latent_scale=latent_scale)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if feature_size < 1:
            raise ValueError(f"feature_size must be >= 1, got {feature_size}")
        if refine_channels < 0:
            raise ValueError(f"refine_channels must be >= 0, got {refine_channels}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if decoder == "paper" and refine_channels > 0:
            decoder = "refine"
        if latent_grid not in LATENT_GRIDS:
            raise ValueError(f"latent_grid must be one of {LATENT_GRIDS}, got {latent_grid!r}")
        if decoder == "refine" and refine_channels < 1:
            raise ValueError("decoder 'refine' needs refine_channels >= 1")
        if self.patch_size != 4:
            raise ValueError(f"the decoder climbs two x2 steps from tokens to latents: patch_size must be 4, got {self.patch_size}")
        if skip_layers is None:
            skip_layers = tuple(max(1, round(self.depth * k / 4)) for k in (1, 2, 3))
        skip_layers = tuple(int(s) for s in skip_layers)
        if len(skip_layers) != 3 or not all(1 <= s <= self.depth for s in skip_layers) or list(skip_layers) != sorted(skip_layers):
            raise ValueError(f"skip_layers must be three non-decreasing block indices in 1..{self.depth}, got {skip_layers}")
        self.num_classes = int(num_classes)
        self.skip_layers = skip_layers
        # what model.json records, so that a trained checkpoint rebuilds its own network
        self.network_args: dict[str, Any] = {
            "vae": jsonable(vae), "encoder": jsonable({k: v for k, v in encoder.items() if k != "grid"}),
            "num_classes": self.num_classes, "roi_size": list(self.roi_size), "feature_size": int(feature_size),
            "skip_layers": list(skip_layers), "norm_name": jsonable(norm_name),
            "refine_channels": int(refine_channels), "freeze_vae": self.freeze_vae, "latent_scale": float(latent_scale),
            "decoder": decoder, "latent_grid": latent_grid,
        }
        self.decoder = decoder
        self.refine_channels = int(refine_channels) if decoder == "refine" else 0
        # (origin, spacing) of latent voxels on the image grid
        self.latent_grid: Grid = vae_latent_grid(self.vae, latent_grid)
        fs, d, c = int(feature_size), self.embed_dim, self.latent_channels
        kw = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=True)
        up = dict(upsample_kernel_size=2)

        # skips (shallow -> deep)
        self.skip_latent = UnetrBasicBlock(in_channels=c, out_channels=fs, stride=1, **kw)
        self.skip_hi = UnetrPrUpBlock(in_channels=d, out_channels=2 * fs, num_layer=1, stride=1, conv_block=True, **kw, **up)
        self.skip_mid = UnetrPrUpBlock(in_channels=d, out_channels=4 * fs, num_layer=0, stride=1, conv_block=True, **kw, **up)
        self.skip_lo = UnetrBasicBlock(in_channels=d, out_channels=8 * fs, stride=1, **kw)
        # decoder (deep -> shallow)
        self.bottleneck = UnetrBasicBlock(in_channels=d + 8 * fs, out_channels=8 * fs, stride=1, **kw)
        self.up_mid = UnetrUpBlock(in_channels=8 * fs, out_channels=4 * fs, **kw, **up)
        self.up_hi = UnetrUpBlock(in_channels=4 * fs, out_channels=2 * fs, **kw, **up)
        self.fuse_latent = UnetrBasicBlock(in_channels=3 * fs, out_channels=fs, stride=1, **kw)
        if decoder == "refine":
            rc = self.refine_channels
            self.refine_image = UnetrBasicBlock(in_channels=self.image_channels, out_channels=rc, stride=1, **kw)
            self.refine_fuse = UnetrBasicBlock(in_channels=fs + rc, out_channels=rc, stride=1, **kw)
            self.out = UnetOutBlock(spatial_dims=3, in_channels=rc, out_channels=self.num_classes)
        elif decoder == "progressive":
            # UNETR's encoder1 / encoder2: image features at full and half resolution
            self.image_full = UnetrBasicBlock(in_channels=self.image_channels, out_channels=fs, stride=1, **kw)
            self.image_half = UnetrBasicBlock(in_channels=fs, out_channels=2 * fs, stride=2, **kw)
            self.decode_half = UnetrBasicBlock(in_channels=3 * fs, out_channels=2 * fs, stride=1, **kw)
            self.decode_full = UnetrBasicBlock(in_channels=3 * fs, out_channels=fs, stride=1, **kw)
            self.out = UnetOutBlock(spatial_dims=3, in_channels=fs, out_channels=self.num_classes)
        else:
            self.out = UnetOutBlock(spatial_dims=3, in_channels=fs, out_channels=self.num_classes)

    # a 3^3 stride-2 convolution with padding 1 centres half-resolution voxel j on image voxel 2j
    HALF_GRID: Grid = (0.0, 2.0)

    @property
    def needs_image(self) -> bool:
        """Whether :meth:`forward_latent` needs the image too (decoders "refine" and "progressive")."""
        return self.decoder != "paper"

    @property
    def output_conv(self) -> nn.Module:
        """The final 1x1 convolution (its bias holds the class prior, see ``engines.seg.recipe``)."""
        return next(m for m in self.out.modules() if isinstance(m, nn.Conv3d))

    def _grid_volume(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(B, N, D) tokens -> (B, D, gx, gy, gz) in the token order of :mod:`custom_nets.nets.vit`."""
        b, n, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, *grid)

    def decode_features(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, x, y, z) latent -> (B, fs, x, y, z) decoder features on the latent grid."""
        grid = self.encoder.grid_of(latent.shape[2:])
        layers = sorted(set(self.skip_layers))  # shallow ViTs may feed two skips from one block
        final, hidden = self.tokens(latent, return_layers=layers)
        by_layer = dict(zip(layers, hidden))
        h_hi, h_mid, h_lo = (self._grid_volume(by_layer[layer], grid) for layer in self.skip_layers)
        x = self._grid_volume(final, grid)
        x = self.bottleneck(torch.cat([x, self.skip_lo(h_lo)], dim=1))
        x = self.up_mid(x, self.skip_mid(h_mid))
        x = self.up_hi(x, self.skip_hi(h_hi))
        return self.fuse_latent(torch.cat([x, self.skip_latent(latent)], dim=1))

    def forward_latent(self, latent: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """Logits on the image grid from a latent window.

        Args:
            latent: (B, C, x, y, z) scaled VAE latent, sides divisible by 4 (patch size).
            image: (B, Ci, f*x, f*y, f*z) matching image window; required when refinement is on.

        Returns:
            (B, num_classes, f*x, f*y, f*z) logits (f = VAE factor, 4).
        """
        feats = self.decode_features(latent)
        size = [s * self.vae_factor for s in latent.shape[2:]]
        if self.decoder == "paper":
            return resample_grid(self.out(feats), size, self.latent_grid, (0.0, 1.0))
        if image is None:
            raise ValueError(f"decoder {self.decoder!r} reads the image at full resolution: forward_latent needs the image window")
        if list(image.shape[2:]) != size:
            raise ValueError(f"image window {tuple(image.shape[2:])} does not match latent window x{self.vae_factor} {tuple(size)}")
        if self.decoder == "refine":
            up = resample_grid(feats, size, self.latent_grid, (0.0, 1.0))
            return self.out(self.refine_fuse(torch.cat([up, self.refine_image(image)], dim=1)))
        full = self.image_full(image)
        half = self.image_half(full)
        x = resample_grid(feats, half.shape[2:], self.latent_grid, self.HALF_GRID)
        x = self.decode_half(torch.cat([x, half], dim=1))
        x = resample_grid(x, size, self.HALF_GRID, (0.0, 1.0))
        return self.out(self.decode_full(torch.cat([x, full], dim=1)))

    def forward(self, image: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Ci, X, Y, Z) image crop -> (B, num_classes, X, Y, Z) logits.

        Args:
            image: image crops in [0, 1].
            latent: optional precomputed (e.g. style-augmented) latents of the crops, used instead of
                encoding ``image`` (which then only feeds the refinement path); passing it through
                ``forward`` keeps DDP's gradient synchronisation.
        """
        if latent is None:
            latent = self.encode_latent(image)
        return self.forward_latent(latent, image if self.needs_image else None)


# --------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------


class LatentClassifier(LatentViTBackbone):
    """Volume-level classifier: the same backbone, global average pooling of the normalised tokens,
    dropout and a linear head.

    Args:
        vae: ``AutoencoderKlMaisi`` constructor arguments.
        encoder: :class:`LatentViTEncoder` constructor arguments.
        num_classes: number of volume labels.
        roi_size: image size the network is built for.
        dropout: dropout before the linear head.
        freeze_vae: keep the VAE fixed.
        latent_scale: factor applied to the VAE posterior mean.
    """

    def __init__(
        self,
        vae: Mapping[str, Any],
        encoder: Mapping[str, Any],
        num_classes: int,
        roi_size: int | Sequence[int] = 96,
        dropout: float = 0.0,
        freeze_vae: bool = True,
        latent_scale: float = 1.0,
    ) -> None:
        super().__init__(vae, encoder, roi_size=roi_size, freeze_vae=freeze_vae, latent_scale=latent_scale)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.embed_dim, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, x, y, z) latent -> (B, num_classes) logits."""
        pooled = self.tokens(latent).mean(dim=1)
        return self.head(self.dropout(pooled))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, Ci, X, Y, Z) image -> (B, num_classes) logits."""
        return self.forward_latent(self.encode_latent(image))


# --------------------------------------------------------------------------------------------
# Configuration: constructor arguments (reconciled with checkpoints in engines/seg/model.py)
# --------------------------------------------------------------------------------------------


def segmenter_config(size: str = "paper", num_classes: int = 14) -> dict[str, Any]:
    """Constructor arguments of :class:`LatentSegmenter`.

    Args:
        size: "paper" (MAISI VAE of the paper, ViT-B, 96^3 crops, fs 16) or "demo" (the VAE
            module's demo VAE, a 4-block width-96 ViT, 64^3 crops, fs 8).
        num_classes: output channels.
    """
    if size == "paper":
        return dict(vae=vae_config("paper"), encoder=vit_encoder_config("B"), num_classes=num_classes,
                    roi_size=[96, 96, 96], feature_size=16, refine_channels=0, decoder="progressive")
    if size == "demo":
        enc = dict(in_channels=4, patch_size=4, embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0)
        return dict(vae=vae_config("demo"), encoder=enc, num_classes=num_classes,
                    roi_size=[64, 64, 64], feature_size=8, refine_channels=0, decoder="progressive")
    raise ValueError(f"unknown segmenter size {size!r}; expected 'paper' or 'demo'")
