"""The run config: one YAML validated by pydantic, each stage's section owned by its package.

Unknown keys are rejected and every error names the field (``tissue.sthresh: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.config import DistillConfig
from features.extract import ExtractionConfig
from mil.heatmaps import HeatmapConfig
from mil.train import MILConfig
from wsi.tiling import TilingConfig
from wsi.tissue import PRESETS, TissueConfig


class SlidesConfig(BaseModel):
    """How slides are opened."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "openslide", "tiffslide"] = Field(
        "auto", description="slide reader: auto (per file, the reader that is correct and fastest for its format: see "
                           "docs/slides-and-tiles.md; the one used is in qc/slides.csv), openslide or tiffslide")
    default_mpp: float | None = Field(
        None, gt=0.05, lt=20, description="µm/px for slides with no mpp in the CSV, properties or TIFF tags (a warning is logged); "
                                "null: such slides fail with a clear error")
    verify_tiles: Literal["features", "tiles", "off"] = Field(
        "features", description="where every tile is checked once at its read level: tiles that fail to decode are "
                                "left out (recorded, and counted in qc/slides.csv), each tile's focus is scored "
                                "(tiling.min_sharpness, qc's blurred share). features: by the teacher's features read, "
                                "which decodes every tile anyway (no extra pass; a `predict` run, which has no "
                                "features stage, checks in the tiles stage); tiles: by the tiles stage, one more read "
                                "of every tile, so the grid is final before any model runs (e.g. to export tiles); "
                                "off: no check, a tile that fails to decode fails its slide. true/false from older "
                                "configs mean tiles/off")
    max_unreadable_fraction: float = Field(
        0.05, ge=0, le=1, description="a slide fails when more than this share of its tissue tiles (tiles stage) or of "
                                      "its area (tissue stage's overview read) cannot be decoded; below it, those parts "
                                      "count as background and the slide finishes with a warning")
    fingerprint: Literal["stat", "content"] = Field(
        "stat", description="how a slide file is recognised as unchanged: stat (size + mtime, instant) or content "
                            "(sha256 of the file; survives copies and touch, costs a full read)")

    @field_validator("verify_tiles", mode="before")
    @classmethod
    def _boolean_verify_tiles(cls, value):
        """Configs from before the check could move to the features read said true (the tiles stage) or false."""
        return {True: "tiles", False: "off"}.get(value, value) if isinstance(value, bool) else value


class RunnerConfig(BaseModel):
    """Where and how tasks run. Changing these never invalidates finished work."""

    model_config = ConfigDict(extra="forbid")

    scheduler: str | None = Field(
        None, description="address of an existing Dask scheduler (tcp://HOST:PORT), e.g. one started by dask-jobqueue; "
                          "null: start a local cluster on 127.0.0.1 sized to this machine")
    n_workers: int | None = Field(None, ge=1, description="local cluster CPU worker processes (null: one per CPU core "
                                                          "the GPU workers leave)")
    gpus: int | None = Field(None, ge=0, description="local cluster GPU workers, one per GPU, each with a `GPU` resource "
                                                      "that the model stages ask for (null: one per CUDA device; 0: none)")
    threads_per_worker: int = Field(1, ge=1, description="threads per local worker process")
    memory_limit: str = Field("auto", description="memory limit per local worker (Dask syntax, e.g. '4GiB'; auto: RAM / workers)")
    malloc_trim: bool = Field(False, description="start local workers with Dask's MALLOC_TRIM_THRESHOLD_: freed memory goes "
                                                 "back to the OS at once (about half the peak RSS), but glibc then mmaps "
                                                 "every tensor above 128 KiB and torch on CPU runs ~1.5x slower (the demo: "
                                                 "7 min 20 s instead of 4 min 50 s); false: every worker, local or joining an "
                                                 "external cluster, gets the thresholds glibc reaches in a plain process "
                                                 "and keeps each task thread's heap for its next task (a worker's RSS "
                                                 "stays near its largest task's peak)")
    worker_profiler: bool = Field(False, description="run Dask's statistical profiler in the local cluster's workers "
                                                     "(the dashboard's Profile page): it samples every thread's stack "
                                                     "every 10 ms holding the GIL, and the short tissue and tiles tasks "
                                                     "ran slower with it; an external cluster keeps its own setting "
                                                     "(distributed.worker.profile.enabled)")
    retries: int = Field(1, ge=0, description="times a failed task is retried before it is marked failed")
    worker_wait_s: float = Field(300, gt=0, description="with an existing scheduler: how long to wait for its first "
                                                      "worker; and, on any cluster, how long tasks wait for a resource "
                                                      "no worker has (a GPU) before the run says so (it keeps waiting)")


class PredictConfig(BaseModel):
    """A prediction run (`wsi-pipeline predict`): new slides through a trained model bundle."""

    model_config = ConfigDict(extra="forbid")

    bundle: Path | None = Field(
        None, description="the model bundle (`wsi-pipeline export-model`) this run predicts with; set by `wsi-pipeline "
                          "predict`, whose runs have only the tissue, tiles, qc, embed, predict, predictions and "
                          "predict_heatmaps stages; null: a training run")
    @field_validator("bundle")
    @classmethod
    def _absolute_bundle(cls, value: Path | None) -> Path | None:
        """Resolved where the config is read (the command's directory): workers run elsewhere."""
        return None if value is None else Path(value).expanduser().absolute()

    device: str = Field("auto", description="where the bundle's encoder and CLAMs run: auto (CUDA when the worker has a "
                                            "GPU, else CPU), cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="the bundle encoder's inference precision (as `features.teacher.precision`: auto is bf16 "
                            "only where the device runs it natively)")


class RunConfig(BaseModel):
    """Everything a run needs besides slides.csv. Written back resolved to ``OUT/run.yaml``."""

    model_config = ConfigDict(extra="forbid")

    slides: SlidesConfig = Field(default_factory=SlidesConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    features: ExtractionConfig = Field(default_factory=ExtractionConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    mil: MILConfig = Field(default_factory=MILConfig)
    heatmaps: HeatmapConfig = Field(default_factory=HeatmapConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)

    @model_validator(mode="after")
    def _heatmap_strategy_is_run(self):
        from mil.strategies import strategy_rows

        wanted, rows = self.heatmaps.strategy, strategy_rows(self.mil)
        if wanted is not None and (wanted not in rows or wanted == "end2end:fpt"):
            raise ValueError(f"heatmaps.strategy {wanted!r} is not a drawable results row of this run {rows}")
        return self


    @model_validator(mode="after")
    def _sharpness_needs_the_read(self):
        if self.tiling.min_sharpness is not None and self.slides.verify_tiles == "off":
            raise ValueError("tiling.min_sharpness needs slides.verify_tiles (features or tiles: the read that scores "
                             "every tile), not off")
        return self

    def tile_check(self) -> Literal["features", "tiles"] | None:
        """The stage that checks every tile (``slides.verify_tiles``) in this run: features in a training run,
        tiles in a prediction run (no features stage) or where asked; None: no check."""
        mode = self.slides.verify_tiles
        if mode == "features" and self.predict.bundle is not None:
            return "tiles"
        return None if mode == "off" else mode


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and each bad field."""


def load_config(path: str | Path | None) -> RunConfig:
    """Read and validate a run config (defaults when ``path`` is None)."""
    if path is None:
        return RunConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "(top level)"
            message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {field}: {message}")
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(lines)) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def commented_template(model: BaseModel | None = None, indent: int = 0) -> str:
    """A YAML template of ``model`` (default: ``RunConfig()``) with each field's description above it."""
    model = RunConfig() if model is None else model
    pad = "  " * indent
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            doc = field.description or (type(value).__doc__ or "").strip().splitlines()[0]
            lines.append(f"{pad}# {doc}")
            lines.append(f"{pad}{name}:")
            lines.append(commented_template(value, indent + 1))
            continue
        if field.description:
            lines.append(f"{pad}# {field.description}")
        value = yaml.safe_dump({name: model.model_dump(mode="json")[name]}, default_flow_style=True).strip()
        # fields a preset fills are left commented out, so choosing a preset is not silently overridden
        commented = name in getattr(model, "preset_fields", ())
        lines.append(f"{pad}{'# ' if commented else ''}{value[1:-1]}")
    return "\n".join(lines)


def _field_rows(model: BaseModel, prefix: str) -> list[str]:
    rows = []
    for name, sub in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            rows.append(f"| `{prefix}{name}` | (section) | {sub.description or type(value).__doc__ or ''} |")
            rows += _field_rows(value, f"{prefix}{name}.")
            continue
        default = yaml.safe_dump(model.model_dump(mode="json")[name], default_flow_style=True).strip()
        default = default.removesuffix("...").strip()
        rows.append(f"| `{prefix}{name}` | `{default}` | {sub.description or ''} |")
    return rows


def config_reference_markdown() -> str:
    """docs/configuration.md: every section and field with its default and meaning."""
    out = ["# Configuration reference", "",
           "One YAML file passed with `--config`; every key is optional. Unknown keys are errors that name",
           "the field. `wsi-pipeline init` writes this as a commented file. This page is generated by",
           "`python -m pipelines.config` from the pydantic models; a test keeps it in sync.", ""]
    defaults = RunConfig()
    for section in RunConfig.model_fields:
        model = getattr(defaults, section)
        out += [f"## `{section}`", "", (type(model).__doc__ or "").strip(), "", "| field | default | meaning |", "|---|---|---|"]
        out += _field_rows(model, f"{section}.")
        out.append("")
        if isinstance(model, TissueConfig):
            keys = list(PRESETS["clam_default"])
            out += ["Presets (CLAM's `create_patches_fp.py` defaults and `presets/*.csv`):", "",
                    "| preset | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            out += [f"| `{name}` | " + " | ".join(str(values[k]) for k in keys) + " |" for name, values in PRESETS.items()]
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
