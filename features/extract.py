"""Streaming feature extraction: tiles → loader workers → batched inference → Zarr chunks.

Reading and JPEG decoding happen in DataLoader worker processes (one slide handle each, opened
lazily in the worker, since OpenSlide handles cannot cross processes), or in threads where this
process may not start any (:mod:`features.tile_loader`), and overlap model compute in the main
process. Features are appended to the store chunk by chunk, so memory stays flat however many tiles
a slide has.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from features.encoders import Encoder, EncoderConfig, preprocessing, preprocessing_mismatch
from features.store import write_store
from wsi.tiling import ReadPlan, unreadable_message, unreadable_tiles


class ExtractionConfig(BaseModel):
    """Feature extraction: the teacher encoder and how tiles are batched, loaded and stored."""

    model_config = ConfigDict(extra="forbid")

    teacher: EncoderConfig = Field(default_factory=lambda: EncoderConfig(model="vit_base"),
                                   description="the (large) encoder whose features the features stage extracts")
    batch_size: int = Field(32, ge=1, description="tiles per forward pass")
    num_workers: int = Field(1, ge=0, description="loader processes (or threads) reading and decoding tiles ahead of "
                                                  "the model (0: read in the task's own thread)")
    loader: Literal["auto", "processes", "threads"] = Field(
        "auto", description="how tiles are read ahead: DataLoader worker processes, or threads (decoding releases the "
                            "GIL); auto: processes, threads in a daemonic process (a worker started by `dask worker` or "
                            "dask-jobqueue, which may not start processes)")
    prefetch_factor: int = Field(4, ge=1, description="batches each loader worker keeps ready")
    loader_min_tiles: int = Field(1024, ge=0, description="slides (and heatmap passes) with fewer tiles are read in the "
                                                         "task's own process: a loader process takes ~2 s to start in a "
                                                         "Dask worker (it spawns a Python that imports torch), more than "
                                                         "reading ~1,000 tiles costs")
    num_threads: int | None = Field(None, ge=1, description="CPU threads for the model, threads_per_batch on each "
                                                            "batch (null: the cores the task's Dask worker owns, all of "
                                                            "the machine's for a one-slide run)")
    threads_per_batch: int = Field(1, ge=1, description="torch threads each batch runs on, num_threads // threads_per_batch "
                                                       "batches side by side (at least one, no more than fit in memory): "
                                                       "the features' bits depend on this, not on "
                                                       "the worker's cores; raise it (e.g. to 8) for a large model on a "
                                                       "many-core machine, where a batch per core would hold too many "
                                                       "batches' activations at once")
    dtype: str = Field("float16", pattern="^(float16|float32)$", description="dtype of stored features")
    chunk_rows: int = Field(1024, ge=16, description="feature rows per Zarr chunk")


class TileDataset:
    """Tiles of one slide at a read plan, read through a :class:`wsi.slide.SlidePool` (opened lazily per process)."""

    @classmethod
    def for_encoder(cls, encoder: Encoder, slide_path: Path, coords: np.ndarray, plan: ReadPlan, **kwargs) -> TileDataset:
        """The tiles as ``encoder`` reads them: at its input resolution when it reads there (a distilled student)."""
        return cls(slide_path, coords, plan, input_size=encoder.input_size if encoder.read_at_input else None, **kwargs)

    def __init__(self, slide_path: Path, coords: np.ndarray, plan: ReadPlan, *, backend: str = "auto",
                 mpp: float | None = None, slide_id: str | None = None, input_size: int | None = None,
                 check: bool = False):
        from wsi.slide import SlidePool, SlideSource

        self.slide_path, self.coords, self.plan = Path(slide_path), np.asarray(coords), plan
        self.input_size = input_size  # read for a model of this input size (Encoder.read_at_input), else the plan's tiles
        self.slide_id = slide_id or self.slide_path.stem
        self.pool = SlidePool([SlideSource(self.slide_id, self.slide_path, mpp, backend)], max_open=1)
        self.check = check  # items also carry the tile's focus and its decode error ("" if none) instead of raising

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int):
        import torch

        from wsi.errors import SlideError
        from wsi.tiling import sharpness

        x, y = self.coords[index]
        if not self.check:
            tile = self.pool.read_tile(self.slide_id, x, y, self.plan, self.input_size)
            return torch.from_numpy(np.array(tile)), index  # writable copy
        try:
            tile = np.array(self.pool.read_tile(self.slide_id, x, y, self.plan, self.input_size))
        except SlideError as exc:  # any backend, any codec: the tile is left out of the store, and recorded
            side = self.input_size or self.plan.patch_size
            return torch.zeros((side, side, 3), dtype=torch.uint8), index, float("nan"), exc.reason
        return torch.from_numpy(tile), index, sharpness(tile), ""


def loader_workers(n_tiles: int, cfg: ExtractionConfig) -> int:
    """Loader workers for a slide of ``n_tiles``: none below ``loader_min_tiles``, where reading in this process
    (0.4-3 ms a tile) costs less than starting loader processes, which Dask workers spawn (a fresh interpreter
    importing torch: ~2 s per slide, measured in bench_predict.py)."""
    return cfg.num_workers if n_tiles >= max(cfg.loader_min_tiles, 1) else 0


def loader_used(n_tiles: int, cfg: ExtractionConfig) -> str:
    """How a slide of ``n_tiles`` is read here: ``processes``, ``threads`` or ``none`` (in the task's thread)."""
    from features.tile_loader import resolve_loader

    return resolve_loader(cfg.loader) if loader_workers(n_tiles, cfg) else "none"


def make_loader(dataset: TileDataset, cfg: ExtractionConfig, device):
    from features.tile_loader import batch_loader

    workers = loader_workers(len(dataset), cfg)
    return batch_loader(dataset, batch_size=cfg.batch_size, workers=workers, prefetch=cfg.prefetch_factor,
                        kind=cfg.loader, pin_memory=device.type == "cuda")


def encode_batches(dataset: TileDataset, encoder: Encoder, cfg: ExtractionConfig
                   ) -> Iterator[tuple[np.ndarray, float, list]]:
    """(features, model seconds, the batch's other fields: focus and errors of a checking dataset) per batch, in
    tile order, with tiles read and decoded by the loader workers. On a CPU each batch runs on
    ``threads_per_batch`` of torch's threads, as many batches at once as that leaves (:mod:`features.batch_threads`):
    the features are the same bits whatever the worker's cores."""
    import torch

    from features.batch_threads import model_batches

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not len(dataset):
        return
    threads = torch.get_num_threads()
    per_batch = cfg.threads_per_batch if encoder.device.type == "cpu" else threads  # a GPU: one batch at a time
    expected = 0
    batches = model_batches(encoder.model, make_loader(dataset, cfg, encoder.device),
                            lambda b: encoder(b[0]).cpu().numpy(), threads, per_batch)
    try:
        for (_, index, *extra), feats, seconds in batches:
            if int(index[0]) != expected:
                raise RuntimeError(f"tiles arrived out of order ({int(index[0])} != {expected})")
            yield feats, seconds, extra
            expected += len(index)
    finally:
        batches.close()  # the batches under way finish before the model is used again


def embed_tiles(dataset: TileDataset, encoder: Encoder, cfg: ExtractionConfig) -> np.ndarray:
    """Features of every tile in memory (N, dim) float32, for passes that are not stored (e.g. heatmap overlap)."""
    parts = [feats.astype(np.float32) for feats, _, _ in encode_batches(dataset, encoder, cfg)]
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)


class UnreadableTiles(ValueError):
    """More of a slide's tiles failed to decode than the run allows (the store is not written)."""


@dataclass
class TileChecks:
    """What a checking read (``TileDataset(check=True)``) found: each tile's focus (NaN where unread or too little
    stain to judge) and the tiles that did not decode (index → error); both leave the store with their tile, as do
    tiles below ``min_sharpness``. More than ``max_unreadable_fraction`` unreadable fails the slide."""

    min_sharpness: float | None = None
    max_unreadable_fraction: float = 1.0
    sharpness: list = field(default_factory=list)
    unreadable: dict[int, str] = field(default_factory=dict)

    def keep(self, start: int, sharpness, errors) -> np.ndarray:
        scores = np.asarray(sharpness, np.float32)
        self.sharpness.append(scores)
        self.unreadable.update({start + i: e for i, e in enumerate(errors) if e})
        keep = np.array([not e for e in errors], bool)
        if self.min_sharpness is not None:
            keep &= ~(scores < self.min_sharpness)  # NaN (too little stain to judge) is kept
        return keep

    def all_sharpness(self) -> np.ndarray:
        return np.concatenate(self.sharpness) if self.sharpness else np.zeros(0, np.float32)

    def summary(self, coords: np.ndarray, level: int, listed: int = 100) -> dict:
        """What the check found, as the store records it (``tile_check``): tiles read, unreadable (the first
        ``listed`` with their level-0 x, y, read level and error), left out below the focus bar, the focus median."""
        scores = self.all_sharpness()
        scored = scores[np.isfinite(scores)]
        below = scores < self.min_sharpness if self.min_sharpness is not None else np.zeros(len(scores), bool)
        return {"n_read": int(len(scores)), "n_unreadable_tiles": len(self.unreadable),
                "unreadable_tiles": unreadable_tiles(self.unreadable, coords, level, listed),
                "n_blurry_dropped": int(below.sum()),
                "sharpness_median": float(np.median(scored)) if len(scored) else None}


def extract_slide(dataset: TileDataset, encoder: Encoder, out: Path, cfg: ExtractionConfig, attrs: dict,
                  checks: TileChecks | None = None) -> dict:
    """Run every tile of ``dataset`` through ``encoder`` into the store at ``out``; returns timing metadata.
    With ``checks`` (and a checking dataset) the read is the slide's tile check too: the tiles that do not decode
    or are below ``checks.min_sharpness`` are left out of the store, each kept tile's focus is stored beside its
    features (``sharpness``), and too many unreadable tiles raise :class:`UnreadableTiles` before anything is
    written."""
    start = time.perf_counter()
    model_seconds = 0.0
    attrs = {**attrs, "batch_size": cfg.batch_size, "threads_per_batch": cfg.threads_per_batch}  # what fixes the bits
    with write_store(out, dim=encoder.dim, coords=dataset.coords, dtype=cfg.dtype, chunk_rows=cfg.chunk_rows,
                     attrs=attrs) as writer:
        for feats, seconds, extra in encode_batches(dataset, encoder, cfg):
            writer.append(feats, None if checks is None else checks.keep(writer.n_seen, *extra))
            model_seconds += seconds
        if checks is not None:
            n_bad, total = len(checks.unreadable), len(dataset)
            if n_bad and n_bad / total > checks.max_unreadable_fraction:
                raise UnreadableTiles(f"{unreadable_message(checks.unreadable, total)} — more than "
                                      f"slides.max_unreadable_fraction ({checks.max_unreadable_fraction:g})")
            writer.arrays["sharpness"] = checks.all_sharpness()[writer.kept]
            writer.attrs["tile_check"] = checks.summary(dataset.coords, dataset.plan.read_level)
    seconds = time.perf_counter() - start
    return {"n_tiles": len(dataset), "seconds": round(seconds, 3), "model_seconds": round(model_seconds, 3),
            "precision": encoder.precision, "loader": loader_used(len(dataset), cfg),
            "patches_per_s": round(len(dataset) / seconds, 2) if seconds and len(dataset) else 0.0}


def encoder_attrs(encoder: Encoder, plan: ReadPlan, fingerprint: str | None = None) -> dict:
    """What a store records about how its features were made."""
    from features.zoo import provenance

    cfg: EncoderConfig = encoder.config
    return {"encoder": cfg.model_dump(mode="json"), "encoder_label": cfg.label, "provenance": provenance(cfg.model),
            **preprocessing(encoder), "input_size": encoder.input_size,
            "weights": cfg.weights_source(), "weights_sha256": encoder.digest, "precision": encoder.precision,
            "patch_size": plan.patch_size, "target_mpp": plan.target_mpp, "read_level": plan.read_level,
            "read_size": plan.read_size, "level0_size": plan.level0_size, "read_at_input": encoder.read_at_input,
            "fingerprint": fingerprint}


def check_same_encoder(encoder: Encoder, attrs: dict, store: str) -> None:
    """Refuse to mix feature spaces: ``encoder`` must be the model that wrote ``store`` (same weights sha256)."""
    recorded = attrs.get("weights_sha256")
    if recorded and recorded != encoder.digest:
        raise ValueError(f"{store}: its features came from other weights (sha256 {recorded[:12]}…) than the encoder "
                         f"built now ({encoder.digest[:12]}…): the weights file, seed or torch build changed; "
                         "rerun the features (--force features)")
    changed = preprocessing_mismatch(encoder, attrs)
    if changed:
        raise ValueError(f"{store}: its features came from tiles preprocessed otherwise than the encoder built now "
                         f"does ({changed}); rerun the features (--force features)")
