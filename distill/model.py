"""Build, count and load distilled students (backbone + projector), as encoders for extraction."""

from __future__ import annotations

import json
from pathlib import Path

from distill.student import DistilledStudent
from distill.transscan import StudentBackbone, create_projector
from features.encoders import EncoderConfig, build_backbone, wrap_encoder


def build_student(cfg, teacher_dim: int):
    """A fresh DistilledStudent for a DistillConfig, and the student's timm data config.

    Every random part is seeded from the config: the backbone from ``student.seed`` (else
    ``distill.seed``) unless it has weights, the projector from ``distill.seed``.
    """
    from features.portable_random import seeded

    model, data_cfg, _ = build_backbone(cfg.student, default_seed=cfg.seed, field="distill.student")
    backbone = StudentBackbone(model)
    with seeded(cfg.seed):
        projector = create_projector(cfg.projector, backbone.channels, teacher_dim, width=cfg.projector_width)
        student = DistilledStudent(backbone, projector, teacher_dim, stats_head=cfg.whiten and cfg.dewhiten_head)
    return student, data_cfg


def param_counts(model: DistilledStudent) -> dict:
    count = lambda module: int(sum(p.numel() for p in module.parameters()))  # noqa: E731
    return {"backbone": count(model.backbone), "projector": count(model.projector), "total": count(model)}


def load_student(model_dir: Path, *, device: str = "auto", precision: str = "fp32"):
    """The distilled student in ``model_dir`` (student.safetensors + student.json) as an ``Encoder``
    whose features live in the teacher's space (dimension = the teacher's)."""
    from safetensors.torch import load_file

    from distill.config import DistillConfig

    model_dir = Path(model_dir)
    card = json.loads((model_dir / "student.json").read_text())
    cfg = DistillConfig.model_validate({"dewhiten_head": False, **card["config"]})  # cards before the head had none
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"pretrained": False, "weights": None})})
    model, data_cfg = build_student(cfg, card["teacher_dim"])
    model.load_state_dict(load_file(str(model_dir / "student.safetensors")))
    spec = EncoderConfig.model_validate({**card["student"], "pretrained": False, "weights": model_dir / "student.safetensors",
                                         "device": device, "precision": precision,
                                         "input_size": card["input_size"], "mean": card["mean"], "std": card["std"],
                                         "resize": card.get("resize"), "interpolation": card.get("interpolation")})
    encoder = wrap_encoder(model, spec, data_cfg)
    encoder.read_at_input = bool(card.get("read_at_input", False))  # read as it was trained
    return encoder, card
