"""The model zoo: every pathology foundation model the toolkit builds exactly, offline.

One ``ZooModel`` per model holds everything needed to rebuild it as its authors did: the
architecture and every constructor argument, the checkpoint's key layout, the output (pooling and
dimension), the published parameter count, the preprocessing (resize, centre crop, interpolation,
normalisation), the µm/px it was trained at, the precision it is run at, its licence and where
its weights come from. ``features.encoders.create_encoder`` builds from it; ``docs/encoders.md``
and ``wsi-pipeline encoders`` print it. Sources for every value are in ``docs/encoders.md``.

Constructor arguments are plain data (so they fingerprint and print): classes are named
(``mlp_layer: swiglu_packed``, ``act_layer: silu``) and ``norm_eps`` sets the LayerNorm epsilon.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Pool = Literal["cls", "mean", "cls_mean", "attn", "avg"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
NC_ND = "CC-BY-NC-ND-4.0"


@dataclass(frozen=True)
class ZooModel:
    """One foundation model, as its authors built and ran it."""

    name: str  # the preset name users write (``features.teacher.model``)
    title: str  # the model's own name
    arch: str  # a timm architecture, or one of ours: conch_v1, conch_v1_5, ctranspath
    kwargs: dict[str, Any]  # every constructor argument beyond num_classes=0
    layout: str  # the official checkpoint's key layout (features.layouts)
    pool: Pool  # cls, mean (patch tokens), cls_mean (CLS ‖ mean), attn (attention pooler), avg (CNN)
    dim: int  # published output dimension
    params_m: float | None  # published parameter count of the image encoder, millions (None: none published)
    input_size: int  # the side the model sees
    resize: int  # tiles are resized to this side, then centre-cropped to input_size (== input_size: no crop)
    interpolation: Literal["bilinear", "bicubic"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float | tuple[float, float] | None  # µm/px of its training tiles, or the range of a multi-scale model
    precision: Literal["fp32", "bf16", "fp16"]  # what its authors' pipelines run it at
    licence: str
    non_commercial: bool
    weights_file: str  # the official file name
    weights_from: str  # where to get it, in words
    hub: str | None = None  # Hugging Face repository of the official weights, for `pretrained: true`
    timm_pretrained: str | None = None  # a timm pretrained tag instead of a hub file (ImageNet ResNet-50)
    fp16_safe: bool = True  # False: overflows in fp16 (never run there: bf16 or fp32 instead)
    gated: bool = False
    version: str = "1"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def card(self) -> dict[str, Any]:
        """The entry as plain data (``wsi-pipeline encoders --json``, store attributes, docs)."""
        out = asdict(self)
        out["params"] = round(self.params_m * 1e6) if self.params_m else None
        return out


def _m(**kw) -> ZooModel:
    return ZooModel(**kw)


_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_DINOV2_G = {"embed_dim": 1536, "depth": 40, "num_heads": 24, "patch_size": 14, "init_values": 1e-5,
             "mlp_ratio": 2 * 4096 / 1536, **_SWIGLU}
_IMNET_224 = {"input_size": 224, "resize": 224, "interpolation": "bilinear", "mean": IMAGENET[0], "std": IMAGENET[1]}

VIRCHOW = _m(name="virchow", title="Virchow", arch="vit_huge_patch14_224",
    kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True, **_SWIGLU},
    layout="timm", pool="cls_mean", dim=2560, params_m=631.2, input_size=224, resize=224, interpolation="bicubic",
    mean=IMAGENET[0], std=IMAGENET[1], mpp=0.5, precision="fp16", licence="Apache-2.0 (with Paige's terms of use)",
    non_commercial=False, gated=True, weights_file="pytorch_model.bin",
    weights_from="huggingface.co/paige-ai/Virchow (gated)", hub="paige-ai/Virchow",
    notes="embedding = CLS ‖ mean of the patch tokens (2,560-d), as its model card")
HOPTIMUS_0 = _m(name="hoptimus0", title="H-optimus-0", arch="vit_giant_patch14_reg4_dinov2",
    kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    layout="timm", pool="cls", dim=1536, params_m=1130.0, input_size=224, resize=224, interpolation="bilinear",
    mean=HOPTIMUS[0], std=HOPTIMUS[1], mpp=0.5, precision="fp16", licence="Apache-2.0", non_commercial=False,
    weights_file="pytorch_model.bin", weights_from="huggingface.co/bioptimus/H-optimus-0", hub="bioptimus/H-optimus-0")

HIBOU_B = _m(name="hibou_b", title="Hibou-B", arch="vit_base_patch14_reg4_dinov2",
    kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2 * 2048 / 768, **_SWIGLU},
    layout="hf_dinov2", pool="cls", dim=768, params_m=85.7, input_size=224, resize=224, interpolation="bicubic",
    mean=HIBOU[0], std=HIBOU[1], mpp=0.5, precision="fp32", licence="Apache-2.0", non_commercial=False, gated=True,
    weights_file="model.safetensors", weights_from="huggingface.co/histai/hibou-b (gated)", hub="histai/hibou-b",
    notes="pooler_output = the final-normed CLS; 4 registers; remote-code Dinov2 layout converted at load")

ZOO: dict[str, ZooModel] = {m.name: m for m in [
    _m(name="uni", title="UNI", arch="vit_large_patch16_224",
       kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
       layout="timm", pool="cls", dim=1024, params_m=303.4, **_IMNET_224, mpp=0.5, precision="fp16",
       licence=NC_ND, non_commercial=True, gated=True, weights_file="pytorch_model.bin",
       weights_from="huggingface.co/MahmoodLab/UNI (gated)", hub="MahmoodLab/UNI"),
    _m(name="uni2_h", title="UNI2-h", arch="vit_giant_patch14_224",
       kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
               "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
       layout="timm", pool="cls", dim=1536, params_m=681.4, **_IMNET_224, mpp=0.5, precision="bf16", fp16_safe=False,
       licence=NC_ND, non_commercial=True, gated=True, weights_file="pytorch_model.bin",
       weights_from="huggingface.co/MahmoodLab/UNI2-h (gated)", hub="MahmoodLab/UNI2-h",
       notes="run in bf16 by its authors' TRIDENT; fp16 is refused"),
    _m(name="conch_v1", title="CONCH v1", arch="conch_v1",
       kwargs={"img_size": 448, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
               "pool_dim": 512, "pool_heads": 8},
       layout="conch_v1", pool="attn", dim=512, params_m=None, input_size=448, resize=448, interpolation="bicubic",
       mean=OPENAI_CLIP[0], std=OPENAI_CLIP[1], mpp=0.5, precision="fp32", licence=NC_ND, non_commercial=True,
       gated=True, weights_file="pytorch_model.bin", weights_from="huggingface.co/MahmoodLab/CONCH (gated)",
       hub="MahmoodLab/CONCH",
       notes="image embedding before the contrastive projection (proj_contrast=False, unnormalised); the published "
             "395.2M counts the whole CoCa model with its text tower"),
    _m(name="conch_v1_5", title="CONCH v1.5", arch="conch_v1_5",
       kwargs={"img_size": 448, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, "init_values": 1.0,
               "pool_dim": 768, "pool_heads": 8},
       layout="conch_v1_5", pool="attn", dim=768, params_m=None, input_size=448, resize=448, interpolation="bicubic",
       mean=IMAGENET[0], std=IMAGENET[1], mpp=0.5, precision="fp16", licence=NC_ND, non_commercial=True, gated=True,
       weights_file="pytorch_model_vision.bin", weights_from="huggingface.co/MahmoodLab/conchv1_5 (gated)",
       hub="MahmoodLab/conchv1_5",
       notes="bicubic as TITAN's own CONCH v1.5 transform and CONCH v1 (TRIDENT resizes bilinearly)"),
    VIRCHOW,
    replace(VIRCHOW, name="virchow2", title="Virchow2", kwargs={**VIRCHOW.kwargs, "reg_tokens": 4}, mpp=(0.25, 2.0),
            licence=NC_ND, non_commercial=True, weights_from="huggingface.co/paige-ai/Virchow2 (gated)",
            hub="paige-ai/Virchow2", notes="CLS ‖ mean of the patch tokens, the 4 register tokens skipped; trained at "
                                           "0.25–2 µm/px"),
    HOPTIMUS_0,
    replace(HOPTIMUS_0, name="hoptimus1", title="H-optimus-1", licence=NC_ND, non_commercial=True, gated=True,
            weights_from="huggingface.co/bioptimus/H-optimus-1 (gated)", hub="bioptimus/H-optimus-1"),
    _m(name="h0_mini", title="H0-mini", arch="vit_base_patch14_reg4_dinov2",
       kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2 * 2048 / 768, "dynamic_img_size": True, **_SWIGLU},
       layout="timm", pool="cls", dim=768, params_m=85.7, input_size=224, resize=224, interpolation="bicubic",
       mean=HOPTIMUS[0], std=HOPTIMUS[1], mpp=0.5, precision="fp16", licence=NC_ND, non_commercial=True, gated=True,
       weights_file="pytorch_model.bin", weights_from="huggingface.co/bioptimus/H0-mini (gated)", hub="bioptimus/H0-mini",
       notes="CLS (768-d) as TRIDENT; CLS ‖ mean (1,536-d) with `pool: cls_mean`"),
    _m(name="gigapath", title="Prov-GigaPath", arch="vit_giant_patch14_dinov2",
       kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
               "mlp_ratio": 5.33334, "dynamic_img_size": True},
       layout="timm", pool="cls", dim=1536, params_m=1130.0, input_size=224, resize=256, interpolation="bicubic",
       mean=IMAGENET[0], std=IMAGENET[1], mpp=0.5, precision="fp16", licence="Apache-2.0 (research use only)",
       non_commercial=True, gated=True, weights_file="pytorch_model.bin",
       weights_from="huggingface.co/prov-gigapath/prov-gigapath (gated)", hub="prov-gigapath/prov-gigapath",
       notes="resize 256 then centre-crop 224, as its README (the hub config's crop_pct=1.0 would not crop)"),
    _m(name="phikon", title="Phikon", arch="vit_base_patch16_224",
       kwargs={"img_size": 224},
       layout="hf_vit", pool="cls", dim=768, params_m=85.8, input_size=224, resize=224, interpolation="bilinear",
       mean=IMAGENET[0], std=IMAGENET[1], mpp=0.5, precision="fp32", licence="Owkin non-commercial", non_commercial=True,
       weights_file="pytorch_model.bin", weights_from="huggingface.co/owkin/phikon",
       hub="owkin/phikon", notes="transformers ViTModel checkpoint, converted to timm keys at load; LayerNorm eps 1e-6 "
                                  "as its current config (iBOT's; early config revisions said 1e-12)"),
    _m(name="phikon_v2", title="Phikon-v2", arch="vit_large_patch16_224",
       kwargs={"img_size": 224, "init_values": 1e-5},
       layout="hf_dinov2", pool="cls", dim=1024, params_m=303.4, **_IMNET_224, mpp=0.5, precision="fp32",
       licence="Owkin non-commercial", non_commercial=True, weights_file="model.safetensors",
       weights_from="huggingface.co/owkin/phikon-v2", hub="owkin/phikon-v2",
       notes="transformers Dinov2Model checkpoint, converted to timm keys at load"),
    _m(name="ctranspath", title="CTransPath", arch="ctranspath", kwargs={"img_size": 224},
       layout="ctranspath", pool="avg", dim=768, params_m=27.5, **_IMNET_224, mpp=1.0, precision="fp32",
       licence="GPL-3.0", non_commercial=False, weights_file="ctranspath.pth",
       weights_from="github.com/Xiyue-Wang/TransPath (Google Drive link in its README)",
       notes="Swin-T with a convolutional stem; the original (timm 0.5.4) key layout is converted at load"),
    *[_m(name=f"lunit_s{patch}", title=f"Lunit DINO ViT-S/{patch}", arch=f"vit_small_patch{patch}_224",
         kwargs={"img_size": 224}, layout="timm", pool="cls", dim=384, params_m=params, input_size=224, resize=224,
         interpolation="bilinear", mean=LUNIT[0], std=LUNIT[1], mpp=None, precision="fp32",
         licence="Lunit non-commercial", non_commercial=True, weights_file=f"dino_vit_small_patch{patch}_ep200.torch",
         weights_from="github.com/lunit-io/benchmark-ssl-pathology releases",
         hub=f"1aurent/vit_small_patch{patch}_224.lunit_dino", notes="hub weights: a community mirror in timm layout" + note)
      for patch, params, note in [(8, 21.7, ""),
                                  (16, None, "; LazySlide's 21.1M does not fit a ViT-S/16 (21.67M)")]],
    HIBOU_B,
    replace(HIBOU_B, name="hibou_l", title="Hibou-L", arch="vit_large_patch14_reg4_dinov2",
            kwargs={**HIBOU_B.kwargs, "mlp_ratio": 2 * 2736 / 1024}, dim=1024, params_m=303.7,
            weights_from="huggingface.co/histai/hibou-L (gated)", hub="histai/hibou-L", notes="as Hibou-B, ViT-L/14"),
    *[_m(name=f"kaiko_{short}", title=f"Kaiko {title}", arch=arch, kwargs={"img_size": img, "dynamic_img_size": True},
         layout="timm", pool="cls", dim=dim, params_m=None, input_size=224, resize=224, interpolation="bilinear",
         mean=HALF[0], std=HALF[1], mpp=None, precision="fp32", licence="Kaiko Non-Commercial v1", non_commercial=True,
         weights_file=file, weights_from="github.com/kaiko-ai/towards_large_pathology_fms releases (0.0.1)",
         hub=f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms",
         notes="hub weights: a community mirror in timm layout")
      for short, title, arch, img, dim, file in [
          ("vits16", "ViT-S/16", "vit_small_patch16_224", 224, 384, "vits16.pth"),
          ("vits8", "ViT-S/8", "vit_small_patch8_224", 224, 384, "vits8.pth"),
          ("vitb16", "ViT-B/16", "vit_base_patch16_224", 224, 768, "vitb16.pth"),
          ("vitb8", "ViT-B/8", "vit_base_patch8_224", 224, 768, "vitb8.pth"),
          ("vitl14", "ViT-L/14", "vit_large_patch14_reg4_dinov2", 518, 1024, "vitl14.pth")]],
    _m(name="midnight", title="Midnight-12k", arch="vit_giant_patch14_dinov2",
       kwargs={"img_size": 224, **_DINOV2_G},
       layout="hf_dinov2", pool="cls", dim=1536, params_m=1140.0, input_size=224, resize=224, interpolation="bilinear",
       mean=HALF[0], std=HALF[1], mpp=(0.25, 2.0), precision="fp16", licence="MIT", non_commercial=False, gated=True,
       weights_file="model.safetensors", weights_from="huggingface.co/kaiko-ai/midnight", hub="kaiko-ai/midnight",
       notes="CLS (1,536-d) as TRIDENT and kaiko's eva; CLS ‖ mean (3,072-d) with `pool: cls_mean`"),
    _m(name="resnet50_trunc", title="ResNet-50 (CLAM, truncated after layer 3)", arch="resnet50", kwargs={},
       layout="torchvision_resnet", pool="avg", dim=1024, params_m=None, **_IMNET_224, mpp=0.5, precision="fp32",
       licence="BSD-3-Clause (torchvision ImageNet weights)", non_commercial=False,
       weights_file="resnet50-0676ba61.pth (torchvision) or timm resnet50.tv_in1k",
       weights_from="torchvision / timm (`pretrained: true`: timm's resnet50.tv_in1k)", timm_pretrained="resnet50.tv_in1k",
       notes="CLAM's 1,024-d encoder: ImageNet ResNet-50 up to layer 3, average-pooled"),
]}


def zoo_model(name: str) -> ZooModel | None:
    """The zoo entry a model name refers to (case and ``-`` / ``_`` insensitive), or None for a plain timm name."""
    key = name.lower().replace("-", "_")
    return ZOO.get(key) or ZOO.get(ALIASES.get(key, ""))


ALIASES = {"uni2h": "uni2_h", "conchv1_5": "conch_v1_5", "conch": "conch_v1", "h_optimus_0": "hoptimus0",
           "h_optimus_1": "hoptimus1", "hoptimus_0": "hoptimus0", "hoptimus_1": "hoptimus1", "h0mini": "h0_mini",
           "prov_gigapath": "gigapath", "phikonv2": "phikon_v2", "midnight12k": "midnight"}


def provenance(model: str) -> dict[str, Any]:
    """Which model, which version, under which licence: recorded in stores, student cards and bundles, so a
    model distilled from a non-commercial teacher says so wherever it goes."""
    entry = zoo_model(model)
    if entry is None:
        return {"model": model, "title": model, "version": None, "licence": "unknown (not a zoo model: check its source)",
                "non_commercial": None, "gated": None}
    return {"model": entry.name, "title": entry.title, "version": entry.version, "licence": entry.licence,
            "non_commercial": entry.non_commercial, "gated": entry.gated}


def licence_note(prov: dict[str, Any]) -> str | None:
    """The sentence a model card carries for a student or CLAM built on a restricted teacher (None: no restriction known)."""
    if prov.get("non_commercial"):
        no_derivatives = "-ND" in prov["licence"]
        return (f"Distilled from / built on {prov['title']}, licensed {prov['licence']}: non-commercial use only"
                + ("; the licence does not permit sharing adapted material, so check its terms before distributing "
                   "this model" if no_derivatives else "") + "; its terms bind this model too.")
    if prov.get("non_commercial") is None:
        return f"Built on {prov['title']}, whose licence is unknown to wsi-pipeline: check its terms before any use."
    return None


MPP_TOLERANCE = 1.3  # a tiling this many times finer or coarser than the model's training tiles is warned about


def mpp_mismatch(entry: ZooModel | None, target_mpp: float | None) -> str | None:
    """A warning when tiles are cut at a scale the model was not trained at (None: fine, or nothing known)."""
    if entry is None or entry.mpp is None or not target_mpp:
        return None
    low, high = entry.mpp if isinstance(entry.mpp, tuple) else (entry.mpp, entry.mpp)
    if low / MPP_TOLERANCE <= target_mpp <= high * MPP_TOLERANCE:
        return None
    trained = f"{low}–{high}" if low != high else f"{low}"
    return (f"tiles are cut at {target_mpp:g} µm/px but {entry.title} was trained on {trained} µm/px tiles: set "
            f"tiling.target_mpp near {trained} for features as its authors' (more than {MPP_TOLERANCE}× apart)")
