"""An encoder's settings as they stand in a run's YAML (:class:`EncoderConfig`): model, weights, pooling,
preprocessing, precision, device, and the identity that enters fingerprints."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PRESET_FIELDS = ("pool", "input_size", "resize", "interpolation", "mean", "std")
BUILD_FIELDS = ("name", "version", "arch", "kwargs", "layout", "pool", "input_size", "resize", "interpolation", "mean",
                "std", "fp16_safe")


class EncoderConfig(BaseModel):
    """One patch encoder: model, weights, pooling, input size, precision and device."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("weights")
    @classmethod
    def _absolute_weights(cls, value: Path | None) -> Path | None:
        """A relative path is resolved where the config is read (the command's directory): workers run elsewhere."""
        return None if value is None else Path(value).expanduser().absolute()

    model: str = Field("vit_tiny", description="a foundation model of the zoo (uni, uni2_h, virchow2, hoptimus0, gigapath, "
                                                "conch_v1_5, phikon_v2, ctranspath, ...: `wsi-pipeline encoders` lists "
                                                "them), a short name (resnet18, vit_tiny, vit_small, vit_base) or any timm "
                                                "model name, incl. hf-hub:ORG/NAME")
    pretrained: bool = Field(False, description="fetch the model's official weights (a zoo model's file from the Hugging "
                                                "Face hub, else timm's): needs network access or a filled cache")
    weights: Path | None = Field(None, description="local weights: .safetensors, or a PyTorch checkpoint loadable with "
                                                   "weights_only=True (plain pickles are refused); a zoo model's file in "
                                                   "its official key layout, loaded strictly")
    pool: Literal["cls", "mean", "cls_mean", "attn", "avg"] | None = Field(
        None, description="ViT: cls token, mean of patch tokens (registers skipped) or cls_mean (both, concatenated); "
                          "attn: CONCH's attention pooler; CNN: avg. null: the zoo model's or the model's own")
    input_size: int | None = Field(None, ge=16, description="the side the model sees (null: the zoo model's, else timm's)")
    resize: int | None = Field(None, ge=16, description="tiles are resized to this side, then centre-cropped to "
                                                        "input_size (null: the zoo model's; else no crop)")
    interpolation: Literal["bilinear", "bicubic"] | None = Field(
        None, description="resize interpolation, antialiased (null: the zoo model's, else bilinear)")
    mean: tuple[float, float, float] | None = Field(None, description="normalisation mean (null: the zoo model's, else timm's)")
    std: tuple[float, float, float] | None = Field(None, description="normalisation std (null: the zoo model's, else timm's)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the architecture "
                                                                           "(a zoo model's own are set: overriding warns)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="inference precision (autocast). auto: on CUDA bf16 where supported, else fp16; on a CPU bf16 "
                            "only with native bf16 (AMX / AVX512-BF16), else fp32 (bf16 is ~5x slower there)")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    seed: int | None = Field(None, description="with no pretrained or local weights: the seed of the random weights; "
                                               "setting it opts into random weights, whose features mean nothing "
                                               "clinically (demos, tests). A teacher without weights and without a "
                                               "seed stops the run; a student without one starts from distill.seed")

    @property
    def random_weights(self) -> bool:
        """Neither hub weights nor a local file: the weights are a seeded random initialisation."""
        return not self.pretrained and self.weights is None

    @property
    def label(self) -> str:
        """A folder-safe name for this encoder's feature stores; random weights say so, with their seed."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.removeprefix("hf-hub:")).strip("_")
        return f"{name}-random-seed{self.seed}" if self.random_weights and self.seed is not None else name

    @property
    def identity(self) -> dict[str, Any]:
        """What makes this encoder's features what they are, for fingerprints: the resolved architecture,
        preprocessing and pooling, not where the weights file lies nor which device runs it (the file's
        content enters separately)."""
        from features.zoo import zoo_model

        data = self.model_dump(mode="json", exclude={"weights", "device"})
        data["weights"] = "local file" if self.weights is not None else None
        entry = zoo_model(self.model)
        if entry is not None:
            from features.layouts import LAYOUTS_VERSION

            data["zoo"] = {k: v for k, v in entry.card().items() if k in BUILD_FIELDS}
            data["zoo"]["layouts_version"] = LAYOUTS_VERSION  # a fixed key conversion reruns what it loaded
        return data

    def weights_source(self, default_seed: int | None = None) -> str:
        """Where the weights come from, in words (model cards, reports, store attributes)."""
        if self.weights is not None:
            return f"local file {self.weights}"
        if self.pretrained:
            return f"pretrained ({self.model}, timm / Hugging Face hub)"
        seed = self.seed if self.seed is not None else default_seed
        return f"random (seed {seed})"
