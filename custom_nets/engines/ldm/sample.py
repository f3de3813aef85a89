"""Sampling from the conditioned latent generator (meduet_ldm inference).

- :func:`sample_latents`: guided sampling with separate content and style scales,
  v = v(null, null) + g_s (v(null, s) - v(null, null)) + g_c (v(c, null) - v(null, null)),
  the three condition variants batched into one forward; Euler or Heun for rectified flow
  (timesteps from MONAI's ``RFlowScheduler.set_timesteps``), DDIM or ancestral DDPM for DDPM.
- :class:`GuidedSampler`: the same as a MONAI ``Inferer`` (the bundle's ``inferer``).
- Sources of content and style (factor-bank rows, reference volumes): :mod:`custom_nets.engines.ldm.sources`.
- :class:`SamplingJobs`: the bundle's ``dataset``: one item per (content source, style source,
  repeat) with its own seeded noise.
- Postprocessing: tiled VAE decoding, NIfTI writing, and a PNG grid (rows: content sources,
  columns: style sources).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from monai.networks.schedulers.scheduler import Scheduler
from torch.utils.data import Dataset
from tqdm import tqdm

from custom_nets.data.latent_cache import open_latent
from custom_nets.data.latent_datasets import centre_window
from custom_nets.engines.common.outputs import OutputLedger, check_output_dir
from custom_nets.engines.ldm.objective import is_flow, make_scheduler, scheduler_args, scheduler_from_args
from custom_nets.engines.ldm.sources import FactorSource
from custom_nets.engines.vae.encode import to_intensity
from custom_nets.nets.latent_dit import ldm_size_config
from custom_nets.nets.vae import decode_latent, load_vae, vae_for_checkpoint
from custom_nets.utils.checkpoint import check_upstream, file_sha256, meta_path, read_stage_meta
from custom_nets.utils.flags import as_bool
from custom_nets.utils.inputs import is_missing, note_missing
from custom_nets.utils.io import atomic_path, save_nifti
from custom_nets.utils.visualize import central_slices

logger = logging.getLogger(__name__)

FLOW_SAMPLERS = ("euler", "heun")
DDPM_SAMPLERS = ("ddim", "ddpm")


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def flow_timesteps(scheduler: RFlowScheduler, num_steps: int, spatial: Sequence[int]) -> list[float]:
    """Decreasing timesteps t_0 = T > ... > t_{n-1}, then 0, from ``RFlowScheduler.set_timesteps``
    (which applies the scheduler's resolution-dependent timestep transform when enabled)."""
    scheduler.set_timesteps(num_inference_steps=num_steps, input_img_size_numel=int(math.prod(spatial)))
    ts = [float(t) for t in scheduler.timesteps.double()]
    return ts + [0.0]


def sample_latents(
    network: torch.nn.Module,
    noise: torch.Tensor,
    content: torch.Tensor,
    style: torch.Tensor,
    scheduler: Scheduler,
    num_steps: int = 250,
    sampler: str = "euler",
    content_scale: float = 3.0,
    style_scale: float = 3.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    content_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from noise to (scaled) latents with guidance.

    Args:
        network: a :class:`~custom_nets.nets.latent_dit.LatentDiT` (eval mode).
        noise: (B, C, X, Y, Z) standard normal starting point.
        content: (B, Dc); style: (B, Ds).
        scheduler: the training scheduler (``RFlowScheduler`` or ``DDPMScheduler``).
        num_steps: sampling steps (network calls: one per step for Euler/DDIM/DDPM, two for Heun
            except on the last step).
        sampler: "euler" | "heun" (flow); "ddim" | "ddpm" (DDPM; "ddpm" needs num_steps = T).
        content_scale: g_c; style_scale: g_s.
        generator: random numbers for the ancestral DDPM sampler.
        progress: tqdm bar over steps.
        content_map: (B, Dc, mx, my, mz) content token maps (generators built with ``content_map``).

    Returns:
        (B, C, X, Y, Z) latents in the training (scaled) units.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    guide = getattr(network, "forward_with_guidance", None) or network.module.forward_with_guidance

    def predict(x: torch.Tensor, t: float) -> torch.Tensor:
        """Guided network output: velocity (flow) or noise (DDPM)."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        if content_map is None:
            return guide(x, tt, content, style, content_scale, style_scale).float()
        return guide(x, tt, content, style, content_scale, style_scale, content_map=content_map).float()

    steps = range(num_steps)
    if progress:
        steps = tqdm(steps, desc=f"sampling ({sampler})", leave=False)
    x = noise.float()
    if is_flow(scheduler):
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} does not fit rectified flow; use one of {FLOW_SAMPLERS}")
        ts = flow_timesteps(scheduler, num_steps, x.shape[2:])
        T = float(scheduler.num_train_timesteps)
        for i in steps:
            t, t_next = ts[i], ts[i + 1]
            dt = (t - t_next) / T  # x_t = (1 - t/T) x0 + (t/T) noise, v = x0 - noise: x moves by +v dt
            v = predict(x, t)
            if sampler == "heun" and t_next > 0:
                x_pred = x + dt * v
                x = x + dt * 0.5 * (v + predict(x_pred, t_next))
            else:
                x = x + dt * v
        return x
    if sampler not in DDPM_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} does not fit DDPM; use one of {DDPM_SAMPLERS}")
    if sampler == "ddim":
        sched: Scheduler = DDIMScheduler(
            num_train_timesteps=scheduler.num_train_timesteps, clip_sample=False,
            prediction_type=str(scheduler.prediction_type), schedule="linear_beta",
            beta_start=float(scheduler.betas[0]), beta_end=float(scheduler.betas[-1]),
        )
    else:
        if num_steps != scheduler.num_train_timesteps:
            raise ValueError(
                f"the ancestral DDPM sampler runs all {scheduler.num_train_timesteps} steps; use sampler 'ddim' for {num_steps}"
            )
        sched = scheduler
    sched.set_timesteps(num_steps, device=x.device)
    timesteps = [int(t) for t in sched.timesteps]
    for i in steps:
        t = timesteps[i]
        eps = predict(x, float(t))
        x = sched.step(eps, t, x, generator=generator)[0] if isinstance(sched, DDPMScheduler) else sched.step(eps, t, x)[0]
    return x


class GuidedSampler(Inferer):
    """MONAI ``Inferer`` wrapping :func:`sample_latents`: ``sampler(noise, network, content=..., style=...)``.

    Args:
        scheduler: the training scheduler (or its recorded arguments from model.json).
        num_steps, sampler, content_scale, style_scale, progress: see :func:`sample_latents`.
    """

    def __init__(
        self,
        scheduler: Scheduler | Mapping[str, Any],
        num_steps: int = 250,
        sampler: str = "euler",
        content_scale: float = 3.0,
        style_scale: float = 3.0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.scheduler = scheduler if isinstance(scheduler, Scheduler) else scheduler_from_args(scheduler)
        allowed = FLOW_SAMPLERS if is_flow(self.scheduler) else DDPM_SAMPLERS
        if sampler not in allowed:
            raise ValueError(f"sampler {sampler!r} does not fit the model's objective; use one of {allowed}")
        self.num_steps, self.sampler = int(num_steps), sampler
        self.content_scale, self.style_scale = float(content_scale), float(style_scale)
        self.progress = progress

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """inputs: (B, C, X, Y, Z) noise; kwargs ``content`` (B, Dc), ``style`` (B, Ds) and, for generators
        conditioned on content maps, ``content_map`` (B, Dc, mx, my, mz)."""
        with torch.no_grad():
            return sample_latents(
                network, inputs, kwargs["content"], kwargs["style"], self.scheduler, self.num_steps, self.sampler,
                self.content_scale, self.style_scale, progress=self.progress, content_map=kwargs.get("content_map"),
            )


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


class SamplingJobs(Dataset):
    """Every (content source, style source, repeat) combination, each with its own seeded noise.

    Item: {"noise": (C, X, Y, Z), "content": (Dc,), "style": (Ds,), "name": str, "row": int,
    "col": int, "repeat": int, "content_source": str, "style_source": str}, with ``content_map_cell``
    also "content_map": the centre window of the content source's token map over the sample
    (Dc, X / cell, Y / cell, Z / cell; edge-padded where the source is smaller).

    Args:
        content_sources: grid rows.
        style_sources: grid columns.
        latent_shape: (C, X, Y, Z) of the sampled latents.
        samples_per_pair: repeats of each pair (different noise).
        seed: noise of job k is drawn from ``torch.Generator().manual_seed(seed + k)``.
        ledger: :class:`~custom_nets.engines.common.outputs.OutputLedger` of the output folder:
            jobs whose sample and latent exist and were made with its settings are left out of the
            dataset (unless it says ``overwrite``); None runs every job.
        inputs: input files/folders the output folder must differ from (with a ledger).
        content_map_cell: latent voxels per content-map cell for generators conditioned on content
            maps (:func:`custom_nets.engines.ldm.sources.content_map_cell`); 0: vectors only.
    """

    def __init__(
        self,
        content_sources: Sequence[FactorSource],
        style_sources: Sequence[FactorSource],
        latent_shape: Sequence[int],
        samples_per_pair: int = 1,
        seed: int = 0,
        ledger: OutputLedger | None = None,
        inputs: Sequence[str | Path | None] = (),
        content_map_cell: int = 0,
    ) -> None:
        if len(latent_shape) != 4:
            raise ValueError(f"latent_shape must be (C, X, Y, Z), got {tuple(latent_shape)}")
        self.content_map_cell = int(content_map_cell)
        if self.content_map_cell:
            if any(int(s) % self.content_map_cell for s in latent_shape[1:]):
                raise ValueError(f"latent_size {tuple(latent_shape[1:])} must be a multiple of the content map's cell "
                                 f"({self.content_map_cell} latent voxels)")
            missing = [s.name for s in content_sources if s.content_map is None]
            if missing:
                raise ValueError(f"content sources {missing} have no content token map, which this generator needs")
        self.content_sources, self.style_sources = list(content_sources), list(style_sources)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.seed = int(seed)
        self.jobs = [
            (r, c, k)
            for r in range(len(self.content_sources))
            for c in range(len(self.style_sources))
            for k in range(int(samples_per_pair))
        ]
        self.output_dir = None if ledger is None else ledger.output_dir
        self.todo = list(range(len(self.jobs)))
        if ledger is not None:
            check_output_dir(ledger.output_dir, inputs)
            self.todo = [i for i in self.todo if not ledger.all_done(sample_files(self.name(i)))]
            if len(self.todo) < len(self.jobs):
                logger.info("%s: %d of %d samples already written with this model and settings (skipped; set "
                            "overwrite true to redo them)", ledger.output_dir, len(self.jobs) - len(self.todo), len(self.jobs))

    def name(self, i: int) -> str:
        """Output name of job ``i`` (of all jobs)."""
        r, c, k = self.jobs[i]
        return f"sample_c{r}-{self.content_sources[r].name}_s{c}-{self.style_sources[c].name}_{k}"

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self.todo[index]  # the job's own number seeds its noise, whichever jobs are skipped
        r, c, k = self.jobs[i]
        cs, ss = self.content_sources[r], self.style_sources[c]
        noise = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(self.seed + i))
        item = {
            "noise": noise, "content": cs.content.float(), "style": ss.style.float(),
            "name": self.name(i), "row": r, "col": c, "repeat": k,
            "content_source": cs.origin, "style_source": ss.origin,
        }
        if self.content_map_cell:
            assert cs.content_map is not None  # checked in __init__
            item["content_map"] = torch.from_numpy(
                centre_window(cs.content_map.float().numpy(), [s // self.content_map_cell for s in self.latent_shape[1:]]))
        return item


def sample_files(name: str) -> tuple[str, str]:
    """Files :class:`SaveSampled` writes for a sample: the image and its latent."""
    return f"{name}.nii.gz", f"{name}_latent.npy"


def prepare_sampling_batch(
    batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, None, tuple, dict[str, torch.Tensor]]:
    """``prepare_batch`` for the sampling evaluator: (noise, None, (), {"content", "style"[, "content_map"]})."""
    to = dict(device=device, non_blocking=non_blocking)
    kwargs = {"content": batchdata["content"].to(**to), "style": batchdata["style"].to(**to)}
    if "content_map" in batchdata:
        kwargs["content_map"] = batchdata["content_map"].to(**to)
    return batchdata["noise"].to(**to), None, (), kwargs


# --------------------------------------------------------------------------------------------
# Postprocessing: decode, save, grid
# --------------------------------------------------------------------------------------------


def read_generator_meta(model_path: str | Path, model_size: str = "paper") -> dict[str, Any]:
    """The meduet_ldm ``model.json`` beside ``model_path``; when it does not exist yet, the metadata of
    an untrained ``model_size`` generator (paper latent window and factor widths, flow scheduler), so
    that a config resolves before training (loading the weights in ``initialize`` then says what is missing)."""
    if not is_missing(model_path) or meta_path(model_path).is_file():
        return read_stage_meta(model_path, "meduet_ldm")
    note_missing(model_path, "generator checkpoint")
    network = {"in_channels": 4, "input_size": [64, 64, 32], "patch_size": 4, **ldm_size_config(model_size)}
    return {"network": network, "latent_channels": 4, "scale_factor": 1.0,
            "scheduler": scheduler_args(make_scheduler("flow")), "missing": str(model_path)}


def load_matching_vae(vae_ckpt: str | Path, generator_meta: Mapping[str, Any], device: str | torch.device = "cpu",
                      missing_ok: bool = False) -> torch.nn.Module:
    """The meduet_vae network to decode samples with, refused unless it is the VAE whose latents
    trained the generator (model.json ``vae_sha256``), since another VAE's latent space differs.
    ``missing_ok``: a missing checkpoint gives an untrained paper-size VAE (a config resolved before
    its inputs exist; the run stops before using it)."""
    if as_bool(missing_ok, "missing_ok") and is_missing(vae_ckpt):
        note_missing(vae_ckpt, "VAE checkpoint")
        return vae_for_checkpoint(None).eval().to(device)
    read_stage_meta(vae_ckpt, "meduet_vae")
    check_upstream(
        vae_ckpt, "the generator", "meduet_vae", generator_meta.get("vae_sha256"), file_sha256(vae_ckpt),
        f"vae_ckpt {vae_ckpt}", "point vae_ckpt at the VAE whose latents trained this generator",
        recorded_from=generator_meta.get("vae_ckpt"),
    )
    return load_vae(vae_ckpt, device)[0]


def centred_affine(shape: Sequence[int], spacing: Sequence[float] = (1.5, 1.5, 1.5)) -> np.ndarray:
    """RAS affine with the given voxel size whose grid is centred on the world origin."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = -(np.asarray(shape[-3:], dtype=np.float64) - 1) / 2 * np.asarray(spacing, dtype=np.float64)
    return aff


class DecodeLatentd:
    """Postprocessing: ``data[key]`` scaled latent (C, x, y, z) -> image (1, 4x, 4y, 4z) through the
    VAE (tiled), after dividing out the latent scale factor, mapped back to intensities
    (``vae_encode.to_intensity``: CT -> Hounsfield units of the preprocessing window, MR -> [0, 1]).

    Args:
        vae: the meduet_vae network (eval mode).
        scale_factor: the generator's latent scale factor (model.json).
        roi: decoding tile edge in latent voxels (``decode_latent``'s exact stage-wise tiling).
        overlap: tile overlap (used by ``decode_latent``'s sliding-window mode only).
        modality: "CT" or "MR".
        key: the latent's key in the output dict; the latent itself is kept under "latent".
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        scale_factor: float,
        roi: int = 32,
        overlap: float = 0.25,
        modality: str = "CT",
        key: str = "pred",
    ) -> None:
        self.vae, self.scale_factor = vae, float(scale_factor)
        self.roi, self.overlap, self.modality, self.key = int(roi), float(overlap), modality, key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        z = torch.as_tensor(d[self.key]).float() / self.scale_factor
        d["latent"] = z.cpu()
        img = decode_latent(self.vae, z, roi=self.roi, overlap=self.overlap)
        d[self.key] = torch.from_numpy(to_intensity(img.numpy(), self.modality))
        return d


class SaveSampled:
    """Postprocessing: write ``data[key]`` (1, X, Y, Z) as ``output_dir/<name>.nii.gz`` (atomic, RAS
    grid of ``spacing`` centred on the origin) and the latent beside it as ``<name>_latent.npy``.

    Args:
        output_dir: folder of the samples.
        spacing: voxel size of the decoded images (the VAE's 1.5 mm grid).
        key: the image's key.
        ledger: records each written sample (see :class:`SamplingJobs`).
    """

    def __init__(self, output_dir: str | Path, spacing: Sequence[float] = (1.5, 1.5, 1.5), key: str = "pred",
                 ledger: OutputLedger | None = None) -> None:
        self.output_dir, self.spacing, self.key, self.ledger = Path(output_dir), list(spacing), key, ledger

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        img = torch.as_tensor(d[self.key]).detach().cpu().float().numpy()[0]
        image_name, latent_name = sample_files(d["name"])
        path = save_nifti(self.output_dir / image_name, img, centred_affine(img.shape, self.spacing))
        if "latent" in d:
            with atomic_path(self.output_dir / latent_name) as tmp:
                np.save(tmp, torch.as_tensor(d["latent"]).numpy().astype(np.float32))
            if self.ledger is not None:
                self.ledger.mark_done(image_name, latent_name)
        d["path"] = str(path)
        logger.info("wrote %s", path)
        return d


class SourcePreview:
    """What a content or style source looks like, for the margins of the sample grid: the centred
    window of the source's latent at the sampled size, decoded by the same VAE and intensity map as
    the samples, so a sample and its sources differ only by what the generator did.

    Args:
        decode: the samples' :class:`DecodeLatentd` (its VAE, tiling and modality are reused).
        latent_size: (x, y, z) of the sampled latents.
    """

    def __init__(self, decode: DecodeLatentd, latent_size: Sequence[int]) -> None:
        self.decode, self.latent_size = decode, [int(n) for n in latent_size]
        # by origin: content and style lists often name the same volumes, and a paper-size decode is costly
        self._images: dict[str, np.ndarray | None] = {}

    def latent_of(self, source: FactorSource) -> torch.Tensor | None:
        """The source's (C, X, Y, Z) latent, or None when it is not at hand (a missing cache file)."""
        if source.latent is not None:
            return torch.as_tensor(source.latent).float()
        path = Path(source.origin)
        if path.suffix != ".npy" or not path.is_file():
            logger.warning("no latent at %s for the grid panel of source %s; the panel is left empty", path, source.name)
            return None
        return torch.from_numpy(np.asarray(open_latent(path), dtype=np.float32))

    @torch.no_grad()
    def __call__(self, source: FactorSource) -> np.ndarray | None:
        """(X, Y, Z) decoded image of the source's centre window, or None (decoded once per origin)."""
        if source.origin not in self._images:
            latent = self.latent_of(source)
            image = None
            if latent is not None:
                # DecodeLatentd divides by the scale factor; the cache holds unscaled latents
                window = torch.from_numpy(centre_window(latent.numpy(), self.latent_size, pad=False)) * self.decode.scale_factor
                image = torch.as_tensor(self.decode({"pred": window})["pred"]).float().numpy()[0]
            self._images[source.origin] = image
        return self._images[source.origin]


class SampleGridHandler:
    """Collects the central slices of every sample and writes a PNG grid when sampling completes:
    rows = content sources, columns = style sources (first repeat of each pair), one panel per
    sample holding its axial | coronal | sagittal slices (``visualize.central_slices``; the
    one-row-per-volume ``save_slice_montage`` has no room for the content x style grid). With a
    ``preview``, the sources themselves head the grid (style sources above their columns, content
    sources left of their rows), so whether a row shares its content source's anatomy and a column
    its style source's appearance can be read off the figure.

    Args:
        path: destination PNG.
        jobs: the sampling jobs (for the source names).
        key: the decoded image's key in the output.
        preview: renders a source as an image (:class:`SourcePreview`); None leaves the margins out.
    """

    def __init__(self, path: str | Path, jobs: SamplingJobs, key: str = "pred",
                 preview: Callable[[FactorSource], np.ndarray | None] | None = None) -> None:
        self.path, self.jobs, self.key, self.preview = Path(path), jobs, key, preview
        self.panels: dict[tuple[int, int], np.ndarray] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        # after decollation, the job fields (row, col, repeat) stay in the batch items and the
        # decoded image in the output items
        outputs, batch = engine.state.output, engine.state.batch
        if not isinstance(outputs, list):
            raise ValueError("SampleGridHandler needs a decollated evaluator output (decollate=True)")
        for item, out in zip(batch, outputs):
            if int(item["repeat"]) != 0:
                continue
            img = torch.as_tensor(out[self.key]).detach().cpu().float().numpy()[0]
            self.panels[(int(item["row"]), int(item["col"]))] = self._panel(img)

    def _panel(self, img: np.ndarray) -> np.ndarray:
        slices = central_slices(img)
        h = max(sl.shape[0] for sl in slices)
        padded = [np.pad(sl, ((0, h - sl.shape[0]), (0, 2)), constant_values=float(img.min())) for sl in slices]
        return np.concatenate(padded, axis=1)

    @staticmethod
    def source_label(src: FactorSource) -> str:
        """``bank3 (ct_sharp)`` or a reference's name."""
        return f"{src.name} ({src.domain})" if src.domain else src.name

    def _skipped_panels(self) -> None:
        """Panels of first-repeat samples skipped in this run (already on disk), read back."""
        if self.jobs.output_dir is None:
            return
        for i, (r, c, k) in enumerate(self.jobs.jobs):
            path = Path(self.jobs.output_dir) / sample_files(self.jobs.name(i))[0]
            if k == 0 and (r, c) not in self.panels and path.is_file():
                self.panels[(r, c)] = self._panel(np.asarray(nib.load(path).dataobj, dtype=np.float32))

    def _source_panels(self) -> dict[tuple[int, int], np.ndarray]:
        """Margin panels keyed like the grid: (-1, c) style source c, (r, -1) content source r."""
        if self.preview is None:
            return {}
        keyed = [((-1, c), src) for c, src in enumerate(self.jobs.style_sources)]
        keyed += [((r, -1), src) for r, src in enumerate(self.jobs.content_sources)]
        out = {}
        for key, src in keyed:
            img = self.preview(src)
            if img is not None:
                out[key] = self._panel(img)
        return out

    def write(self, engine: Engine | None = None) -> Path | None:
        self._skipped_panels()
        if not self.panels:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        margins = self._source_panels()
        off = 1 if self.preview is not None else 0
        rows, cols = len(self.jobs.content_sources), len(self.jobs.style_sources)
        panels = {**self.panels, **margins}
        values = np.concatenate([p.ravel() for p in panels.values()])
        lo, hi = np.percentile(values, [0.5, 99.5])
        fig, axes = plt.subplots(rows + off, cols + off, figsize=(3.2 * (cols + off) + 0.6, 1.4 * (rows + off) + 0.6), squeeze=False)
        for (r, c), panel in panels.items():
            axes[r + off, c + off].imshow(panel, cmap="gray", vmin=lo, vmax=hi)
        for r in range(rows + off):
            for c in range(cols + off):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_visible(r >= off and c >= off)
        for r, src in enumerate(self.jobs.content_sources):
            axes[r + off, 0].set_ylabel(f"content\n{self.source_label(src)}", fontsize=7)
        for c, src in enumerate(self.jobs.style_sources):
            axes[0, c + off].set_title(f"style {self.source_label(src)}", fontsize=7)
        if off:
            axes[0, 0].text(0.5, 0.5, "sources\n(decoded centre\nwindow)", ha="center", va="center", fontsize=7,
                            transform=axes[0, 0].transAxes)
        title = "samples: rows = content source, columns = style source"
        fig.suptitle(title + ("; first row/column: the sources themselves" if off else ""), fontsize=8)
        fig.tight_layout()
        with atomic_path(self.path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        logger.info("wrote %s", self.path)
        return self.path
