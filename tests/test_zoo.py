"""The model zoo: every preset built offline on the meta device at its published size, and each architecture family
loaded from a checkpoint written in its official key layout (at reduced size), checked against the same weights
run directly; wrong checkpoints refused with their keys named."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
import torch

from features.encoders import EncoderConfig, WeightsError, create_encoder, resolve
from features.zoo import HOPTIMUS, IMAGENET, OPENAI_CLIP, ZOO, licence_note, mpp_mismatch, provenance, zoo_model
from features.zoo_check import measure

# the documented table (docs/encoders.md): input size, resize before the centre crop, interpolation, mean, pooling
DOCUMENTED = {
    "uni": (224, 224, "bilinear", IMAGENET[0], "cls"), "uni2_h": (224, 224, "bilinear", IMAGENET[0], "cls"),
    "conch_v1": (448, 448, "bicubic", OPENAI_CLIP[0], "attn"), "conch_v1_5": (448, 448, "bicubic", IMAGENET[0], "attn"),
    "virchow": (224, 224, "bicubic", IMAGENET[0], "cls_mean"), "virchow2": (224, 224, "bicubic", IMAGENET[0], "cls_mean"),
    "hoptimus0": (224, 224, "bilinear", HOPTIMUS[0], "cls"), "hoptimus1": (224, 224, "bilinear", HOPTIMUS[0], "cls"),
    "h0_mini": (224, 224, "bicubic", HOPTIMUS[0], "cls"), "gigapath": (224, 256, "bicubic", IMAGENET[0], "cls"),
    "phikon": (224, 224, "bilinear", IMAGENET[0], "cls"), "phikon_v2": (224, 224, "bilinear", IMAGENET[0], "cls"),
    "ctranspath": (224, 224, "bilinear", IMAGENET[0], "avg"), "midnight": (224, 224, "bilinear", (0.5, 0.5, 0.5), "cls"),
    "lunit_s8": (224, 224, "bilinear", (0.70322989, 0.53606487, 0.66096631), "cls"),
    "hibou_b": (224, 224, "bicubic", (0.7068, 0.5755, 0.722), "cls"), "resnet50_trunc": (224, 224, "bilinear", IMAGENET[0], "avg"),
    "lunit_s16": (224, 224, "bilinear", (0.70322989, 0.53606487, 0.66096631), "cls"),
    "hibou_l": (224, 224, "bicubic", (0.7068, 0.5755, 0.722), "cls"),
    **{f"kaiko_{v}": (224, 224, "bilinear", (0.5, 0.5, 0.5), "cls") for v in ("vits16", "vits8", "vitb16", "vitb8", "vitl14")},
}
REQUIRED = {"uni", "uni2_h", "virchow", "virchow2", "hoptimus0", "hoptimus1", "h0_mini", "gigapath", "conch_v1_5", "conch_v1",
            "phikon", "phikon_v2", "ctranspath", "lunit_s8", "lunit_s16", "hibou_b", "hibou_l", "kaiko_vits16",
            "kaiko_vitl14", "midnight", "resnet50_trunc"}


@pytest.fixture
def offline(monkeypatch):
    """No network: sockets refused, the hub offline."""
    def refuse(*args, **kwargs):
        raise OSError("network access blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # read once at import: when another test imported the hub first, the variable alone would leave it online,
    # retrying refused connections
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_every_preset_builds_offline_at_its_published_size(offline):
    assert REQUIRED <= set(ZOO)
    for name, entry in ZOO.items():
        dim, params = measure(entry)
        assert dim == entry.dim, name
        if entry.params_m is not None:  # published figures are rounded: within 0.5 %
            assert abs(params / (entry.params_m * 1e6) - 1) < 0.005, (name, params)


def test_presets_match_the_documented_preprocessing():
    assert set(DOCUMENTED) == set(ZOO)
    for name, (size, resize, interp, mean, pool) in DOCUMENTED.items():
        entry = ZOO[name]
        assert (entry.input_size, entry.resize, entry.interpolation, entry.pool) == (size, resize, interp, pool), name
        assert entry.mean == pytest.approx(mean), name
    assert zoo_model("UNI2-h") is ZOO["uni2_h"] and zoo_model("H-optimus-0") is ZOO["hoptimus0"]
    assert ZOO["virchow2"].kwargs["reg_tokens"] == 4 and ZOO["uni2_h"].kwargs["reg_tokens"] == 8
    assert not ZOO["uni2_h"].fp16_safe


def _tiles(n=2, side=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8))


def _reference_input(tiles, size, mean, std, interpolation="bilinear"):
    """torchvision's own transform pipeline, the anchors' way: Resize (antialiased), CenterCrop, Normalize."""
    from torchvision.transforms import v2

    mode = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}[interpolation]
    x = tiles.permute(0, 3, 1, 2)
    x = v2.Resize(size, interpolation=mode, antialias=True)(x)
    return v2.Normalize(mean, std)(v2.CenterCrop(size)(x).float() / 255.0)


def test_timm_swiglu_register_family_loads_exactly(tmp_path, offline, caplog):
    """UNI2-h and Virchow2 layouts (SwiGLU, registers, CLS / CLS ‖ mean) at reduced depth and width."""
    import timm
    from safetensors.torch import save_file

    from features.loading import timm_kwargs

    small = {"depth": 2, "embed_dim": 48, "num_heads": 2}
    for name in ("uni2_h", "virchow2"):
        entry = ZOO[name]
        kwargs = {**entry.kwargs, **small}
        torch.manual_seed(0)
        direct = timm.create_model(entry.arch, pretrained=False, num_classes=0, **timm_kwargs(kwargs)).eval()
        save_file({f"module.{k}": v for k, v in direct.state_dict().items()}, tmp_path / f"{name}.safetensors")
        with caplog.at_level(logging.WARNING):
            enc = create_encoder(EncoderConfig(model=name, weights=tmp_path / f"{name}.safetensors", model_kwargs=small,
                                               precision="fp32", device="cpu"))
        assert "overrides" in caplog.text  # reduced size is an override of the preset, and says so
        tiles = _tiles()
        x = _reference_input(tiles, 224, IMAGENET[0], IMAGENET[1], entry.interpolation)
        with torch.no_grad():
            tokens = direct.forward_features(x)
        prefix = 1 + kwargs["reg_tokens"]
        want = tokens[:, 0] if entry.pool == "cls" else torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], -1)
        got = enc(tiles)
        assert got.shape[1] == (48 if entry.pool == "cls" else 96)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["phikon_v2", "hibou_b", "phikon"])
def test_transformers_layouts_convert_exactly(tmp_path, offline, name):
    """A checkpoint written by transformers itself (save_pretrained: the hub's key layout), converted to timm keys,
    gives transformers' own output for the same weights."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(1)
    if name == "phikon":
        cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192,
                                     image_size=224, patch_size=16, layer_norm_eps=1e-6)
        model, kwargs = transformers.ViTModel(cfg, add_pooling_layer=False), {"depth": 2, "embed_dim": 48, "num_heads": 2}
    elif name == "phikon_v2":  # registers-free DINOv2, ViT-L/16 layout, stored at 224 / 16
        cfg = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                                        patch_size=16, layerscale_value=0.5)
        model, kwargs = transformers.Dinov2Model(cfg), {"depth": 2, "embed_dim": 48, "num_heads": 2}
    else:  # Hibou: DINOv2 with 4 registers and SwiGLU, position table stored at 518 (resampled as transformers does)
        cfg = transformers.Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                     image_size=518, patch_size=14, use_swiglu_ffn=True,
                                                     num_register_tokens=4, layerscale_value=0.5)
        model = transformers.Dinov2WithRegistersModel(cfg)
        hidden = (int(48 * 4 * 2 / 3) + 7) // 8 * 8
        kwargs = {"depth": 2, "embed_dim": 48, "num_heads": 2, "mlp_ratio": 2 * hidden / 48}
    model.eval().save_pretrained(tmp_path / name)
    enc = create_encoder(EncoderConfig(model=name, weights=tmp_path / name / "model.safetensors", model_kwargs=kwargs,
                                       precision="fp32", device="cpu"))
    entry = ZOO[name]
    tiles = _tiles(side=80)
    x = _reference_input(tiles, 224, entry.mean, entry.std, entry.interpolation)
    with torch.no_grad():
        out = model(pixel_values=x)
    want = out.pooler_output if name == "hibou_b" else out.last_hidden_state[:, 0]
    torch.testing.assert_close(enc(tiles), want, atol=2e-4, rtol=1e-4)


def _conch_reference(state: dict, x: torch.Tensor, trunk) -> torch.Tensor:
    """CONCH v1.5's pooled embedding computed by hand from the checkpoint's tensors (not through our module)."""
    import torch.nn.functional as F

    tokens = trunk.forward_features(x)
    ln = lambda t, p, d: F.layer_norm(t, (d,), state[f"{p}.weight"], state[f"{p}.bias"])  # noqa: E731
    p = "attn_pool_contrast"
    d, c = state[f"{p}.query"].shape[1], tokens.shape[-1]
    q = ln(state[f"{p}.query"], f"{p}.ln_q", d) @ state[f"{p}.to_q.weight"].T
    kv = ln(tokens, f"{p}.ln_k", c) @ state[f"{p}.to_kv.weight"].T
    k, v = kv.chunk(2, dim=-1)
    heads = 2
    qh = q.reshape(1, heads, -1).transpose(0, 1)  # (h, 1, dh)
    kh = k.reshape(k.shape[0], k.shape[1], heads, -1).permute(0, 2, 1, 3)  # (B, h, N, dh)
    vh = v.reshape(v.shape[0], v.shape[1], heads, -1).permute(0, 2, 1, 3)
    attn = (qh.unsqueeze(0) @ kh.transpose(-1, -2) / (kh.shape[-1] ** 0.5)).softmax(-1)
    pooled = (attn @ vh).permute(0, 2, 1, 3).reshape(x.shape[0], 1, d) @ state[f"{p}.to_out.weight"].T
    return ln(pooled[:, 0], "ln_contrast", d)


def test_conch_pooler_layout_loads_exactly(tmp_path, offline):
    """CONCH v1.5's official vision layout (trunk.*, attn_pool_contrast.*, ln_contrast.*), position table stored
    at 14 × 14 as its checkpoint has it: our module equals the pooler computed by hand from the tensors."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    from features.arch import build_conch, conch_v15_pos_embed

    small = {"embed_dim": 32, "depth": 1, "num_heads": 2, "pool_dim": 24, "pool_heads": 2}
    torch.manual_seed(2)
    source = build_conch("v1_5", img_size=224, patch_size=16, init_values=1.0, **small)
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.2)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "pytorch_model_vision.safetensors")
    enc = create_encoder(EncoderConfig(model="conch_v1_5", weights=tmp_path / "pytorch_model_vision.safetensors",
                                       model_kwargs=small, precision="fp32", device="cpu"))
    trunk = VisionTransformer(img_size=448, patch_size=16, embed_dim=32, depth=1, num_heads=2, init_values=1.0,
                              num_classes=0)
    trunk_state = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    trunk_state["pos_embed"] = conch_v15_pos_embed(trunk_state["pos_embed"], 28)
    trunk.load_state_dict(trunk_state)
    tiles = _tiles(side=96)
    x = _reference_input(tiles, 448, IMAGENET[0], IMAGENET[1], "bicubic")
    with torch.no_grad():
        want = _conch_reference(state, x, trunk.eval())
    torch.testing.assert_close(enc(tiles), want, atol=2e-4, rtol=1e-4)
    assert enc.dim == 24


def test_conch_v15_position_table_follows_its_forward_pass():
    """The 14 × 14 table upsampled with scale factor (28 + 0.1) / 14, as CONCH v1.5 does at 448 px."""
    pos = torch.randn(1, 197, 8)
    out = conch_v15 = __import__("features.arch", fromlist=["x"]).conch_v15_pos_embed(pos, 28)
    assert out.shape == (1, 785, 8) and torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=(28.1 / 14, 28.1 / 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(conch_v15[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 784, 8))


def test_ctranspath_original_layout_loads(tmp_path, offline):
    """TransPath's checkpoint layout (timm 0.5.4: ConvStem keys, downsampling at the end of a stage, attn_mask and
    relative_position_index buffers, under 'model'): every tensor lands where it belongs."""
    import re

    from features.arch import build_ctranspath

    torch.manual_seed(3)
    ours = build_ctranspath()
    old = {}
    for k, v in ours.state_dict().items():  # write it back the way timm 0.5.4 named it
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        value = torch.rand_like(v.float()).add(0.5) if k.endswith("running_var") else torch.randn_like(v.float())
        old[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = value.to(v.dtype)
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    assert "patch_embed.proj.0.weight" in old and "patch_embed.proj.6.bias" in old and "patch_embed.norm.weight" in old
    torch.save({"model": old}, tmp_path / "ctranspath.pth")
    enc = create_encoder(EncoderConfig(model="ctranspath", weights=tmp_path / "ctranspath.pth", precision="fp32",
                                       device="cpu"))
    loaded = enc.model.state_dict()
    assert torch.equal(loaded["layers.1.downsample.reduction.weight"], old["layers.0.downsample.reduction.weight"])
    assert torch.equal(loaded["patch_embed.proj.0.weight"], old["patch_embed.proj.0.weight"])
    assert enc(_tiles()).shape == (2, 768)


def test_resnet50_trunc_from_a_torchvision_checkpoint(tmp_path, offline):
    """CLAM's encoder from a torchvision ResNet-50 state dict equals torchvision's own model cut after layer 3."""
    import torchvision

    torch.manual_seed(4)
    tv = torchvision.models.resnet50().eval()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial running statistics, so eval-mode BN is exercised
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(tv.state_dict(), tmp_path / "resnet50.pth")
    enc = create_encoder(EncoderConfig(model="resnet50_trunc", weights=tmp_path / "resnet50.pth", precision="fp32",
                                       device="cpu"))
    tiles = _tiles(side=224)
    x = _reference_input(tiles, 224, IMAGENET[0], IMAGENET[1])
    cut = torch.nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3)
    with torch.no_grad():
        want = cut(x).mean(dim=(2, 3))
    torch.testing.assert_close(enc(tiles), want, atol=1e-4, rtol=1e-4)


def test_wrong_checkpoints_are_refused_with_their_keys_named(tmp_path, offline):
    import timm
    from safetensors.torch import save_file

    small = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    vit = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1e-5, **small)
    state = vit.state_dict()
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.0.mlp")}, tmp_path / "partial.safetensors")
    with pytest.raises(WeightsError, match=r"'uni'.*missing 4 \['blocks.0.mlp.fc1.weight"):
        create_encoder(EncoderConfig(model="uni", weights=tmp_path / "partial.safetensors", model_kwargs=small))
    save_file({**state, "pos_embed": torch.zeros(1, 50, 32)}, tmp_path / "shape.safetensors")
    with pytest.raises(WeightsError, match=r"mis-shaped 1 \['pos_embed \(1, 50, 32\) \(model: \(1, 197, 32\)\)"):
        create_encoder(EncoderConfig(model="uni", weights=tmp_path / "shape.safetensors", model_kwargs=small))
    save_file(state, tmp_path / "timm.safetensors")  # a timm-layout file given to a transformers-layout preset
    with pytest.raises(WeightsError, match="not in the 'hf_dinov2' layout"):
        create_encoder(EncoderConfig(model="phikon_v2", weights=tmp_path / "timm.safetensors", model_kwargs=small))


def test_pretrained_without_hub_access_says_what_to_do(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match=r"uni2_h: `pretrained: true` could not fetch MahmoodLab/UNI2-h.*weights: /path"):
        create_encoder(EncoderConfig(model="uni2_h", pretrained=True))
    with pytest.raises(WeightsError, match="no hub copy.*ctranspath.pth"):
        create_encoder(EncoderConfig(model="ctranspath", pretrained=True))


def test_preset_overrides_warn_and_fp16_is_refused_where_it_overflows(caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        spec = resolve(EncoderConfig(model="gigapath", mean=(0.5, 0.5, 0.5)), "features.teacher")
    assert "features.teacher: overrides gigapath's published setup (mean" in caplog.text
    assert spec.resize == 256 and spec.input_size == 224
    from features.encoders import model_precision

    with caplog.at_level(logging.WARNING):
        assert model_precision(EncoderConfig(model="uni2_h", precision="fp16"), torch.device("cpu"), ZOO["uni2_h"]) == "fp32"
    assert "uni2_h overflows in fp16" in caplog.text
    assert model_precision(EncoderConfig(model="uni", precision="fp16"), torch.device("cpu"), ZOO["uni"]) == "fp16"


def test_non_finite_features_fail_instead_of_being_stored():
    from features.encoders import NonFiniteFeatures

    enc = create_encoder(EncoderConfig(model="vit_tiny", seed=0, device="cpu", precision="fp32",
                                       model_kwargs={"depth": 1}))
    with torch.no_grad():
        enc.model.norm.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteFeatures, match="'vit_tiny' at fp32 gave non-finite features for 2 of 2 tiles.*overflow"):
        enc(_tiles())


def test_provenance_licence_and_mpp():
    assert provenance("uni")["non_commercial"] and "non-commercial" in licence_note(provenance("virchow2"))
    assert licence_note(provenance("hoptimus0")) is None
    assert "unknown" in licence_note(provenance("vit_small"))
    assert mpp_mismatch(ZOO["ctranspath"], 0.5) and "1.0 µm/px" in mpp_mismatch(ZOO["ctranspath"], 0.5)
    assert mpp_mismatch(ZOO["uni"], 0.5) is None and mpp_mismatch(ZOO["virchow2"], 1.0) is None
    assert mpp_mismatch(ZOO["uni"], 0.25)


def test_fingerprint_identity_ignores_path_and_device():
    a = EncoderConfig(model="uni", weights="/scratch/a/uni.bin", device="cuda:0")
    b = EncoderConfig(model="uni", weights="/home/b/pytorch_model.bin", device="cuda:1")
    assert a.identity == b.identity and a.identity["zoo"]["arch"] == "vit_large_patch16_224"
    assert EncoderConfig(model="uni", weights="/x", pool="mean").identity != a.identity


def test_a_zoo_student_starts_from_its_weights_with_its_preprocessing(tmp_path):
    """distill.student from the zoo (H0-mini: registers, SwiGLU) at reduced size: its checkpoint loads strictly, the
    projector maps to the teacher's dimension (Virchow's 2,560), and its preset's preprocessing comes along."""
    import timm
    from safetensors.torch import save_file

    from distill.config import DistillConfig
    from distill.model import build_student
    from features.loading import timm_kwargs

    small = {"depth": 1, "embed_dim": 48, "num_heads": 2}
    entry = ZOO["h0_mini"]
    source = timm.create_model(entry.arch, pretrained=False, num_classes=0, **timm_kwargs({**entry.kwargs, **small}))
    save_file(source.state_dict(), tmp_path / "h0_mini.safetensors")
    cfg = DistillConfig(student={"model": "h0_mini", "weights": tmp_path / "h0_mini.safetensors", "model_kwargs": small},
                        seed=0)
    student, data_cfg = build_student(cfg, 2560)
    assert torch.equal(student.backbone.model.reg_token, source.reg_token)
    assert (data_cfg["interpolation"], data_cfg["mean"]) == ("bicubic", HOPTIMUS[0])
    with torch.no_grad():
        assert student(torch.zeros(2, 3, 224, 224)).shape == (2, 2560)


def test_a_bundle_carries_its_teachers_licence():
    from pipelines.deploy.card import bundle_licence

    student = {"kind": "student", "teacher": {"provenance": provenance("uni2_h"), "random_weights": False}}
    licence = bundle_licence(student)
    assert licence["non_commercial"] and "UNI2-h" in licence["note"] and "CC-BY-NC-ND-4.0" in licence["note"]
    assert bundle_licence({"kind": "teacher", "provenance": provenance("hoptimus0"), "random_weights": False})["note"] is None
    assert bundle_licence({"kind": "teacher", "provenance": provenance("vit_small"), "random_weights": True})["note"] is None


def test_conch_v1_from_the_whole_coca_checkpoint(tmp_path, offline):
    """CONCH v1's checkpoint is the whole CoCa model: the image embedding is taken from visual.trunk,
    visual.attn_pool_contrast (nn.MultiheadAttention, kdim ≠ dim) and visual.ln_contrast; the text tower, the
    caption pooler and proj_contrast are left out. Checked against torch's functional attention on the tensors."""
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from features.arch import build_conch

    small = {"embed_dim": 32, "depth": 1, "num_heads": 2, "pool_dim": 16, "pool_heads": 2}
    torch.manual_seed(5)
    source = build_conch("v1", img_size=448, patch_size=16, **small)
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.2)
    state = {f"visual.{k}": v.clone() for k, v in source.state_dict().items()}
    state.update({"visual.proj_contrast": torch.randn(16, 16), "visual.attn_pool_caption.query": torch.randn(4, 32),
                  "visual.ln_caption.weight": torch.ones(32), "text.token_embedding.weight": torch.randn(10, 16),
                  "logit_scale": torch.ones(())})
    save_file(state, tmp_path / "conch.safetensors")
    enc = create_encoder(EncoderConfig(model="conch_v1", weights=tmp_path / "conch.safetensors", model_kwargs=small,
                                       precision="fp32", device="cpu"))
    tiles = _tiles(side=96)
    x = _reference_input(tiles, 448, OPENAI_CLIP[0], OPENAI_CLIP[1], "bicubic")
    p = "visual.attn_pool_contrast"
    with torch.no_grad():
        tokens = source.trunk.forward_features(x)
        context = F.layer_norm(tokens, (32,), state[f"{p}.ln_k.weight"], state[f"{p}.ln_k.bias"]).transpose(0, 1)
        query = F.layer_norm(state[f"{p}.query"], (16,), state[f"{p}.ln_q.weight"], state[f"{p}.ln_q.bias"])
        query = query.unsqueeze(1).expand(-1, x.shape[0], -1)
        pooled, _ = F.multi_head_attention_forward(
            query, context, context, 16, 2, None, state[f"{p}.attn.in_proj_bias"], None, None, False, 0.0,
            state[f"{p}.attn.out_proj.weight"], state[f"{p}.attn.out_proj.bias"], training=False, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=state[f"{p}.attn.q_proj_weight"],
            k_proj_weight=state[f"{p}.attn.k_proj_weight"], v_proj_weight=state[f"{p}.attn.v_proj_weight"])
        want = F.layer_norm(pooled[0], (16,), state["visual.ln_contrast.weight"], state["visual.ln_contrast.bias"])
    torch.testing.assert_close(enc(tiles), want, atol=2e-4, rtol=1e-4)


def hub_cache_snapshot(monkeypatch, cache, repo: str):
    """A Hugging Face cache (offline) holding one snapshot of ``repo``: the folder to put its files in."""
    import huggingface_hub.constants as hub_constants

    revision = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / revision).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return folder / "snapshots" / revision


def test_pretrained_reads_a_filled_hub_cache_offline(offline, monkeypatch, tmp_path):
    """`pretrained: true` with the official file already in the Hugging Face cache works without the network."""
    import timm

    from features.loading import timm_kwargs

    small = {"depth": 1, "embed_dim": 48, "num_heads": 2}
    entry = ZOO["h0_mini"]
    source = timm.create_model(entry.arch, pretrained=False, num_classes=0, **timm_kwargs({**entry.kwargs, **small}))
    torch.save(source.state_dict(), hub_cache_snapshot(monkeypatch, tmp_path, "bioptimus/H0-mini") / "pytorch_model.bin")
    enc = create_encoder(EncoderConfig(model="h0_mini", pretrained=True, model_kwargs=small, device="cpu"))
    assert torch.equal(enc.model.pos_embed, source.pos_embed)
    assert enc.config.weights_source().startswith("pretrained")


def test_checkpoint_wrappers_heads_and_pooling_of_plain_timm_models(tmp_path, caplog):
    """A DINO-style checkpoint (backbone.* with a projection head.*) loads into a plain ViT; a CNN's classifier.*
    is ignored; `pool: avg` on a ViT is the mean of its patch tokens, as `pool: mean`."""
    import timm
    from safetensors.torch import save_file

    small = {"depth": 1, "img_size": 32}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **small)
    dino = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    dino.update({"head.mlp.0.weight": torch.zeros(8, 192), "head.last_layer.weight": torch.zeros(4, 8)})
    torch.save({"teacher": dino}, tmp_path / "dino.pth")
    with caplog.at_level(logging.WARNING):
        enc = create_encoder(EncoderConfig(model="vit_tiny", weights=tmp_path / "dino.pth", model_kwargs=small,
                                           input_size=32))
    assert "not a zoo model" in caplog.text  # its normalisation is only timm's guess
    assert torch.equal(enc.model.pos_embed, vit.pos_embed)
    cnn = timm.create_model("mobilenetv3_small_050", pretrained=False)
    save_file(cnn.state_dict(), tmp_path / "mobilenet.safetensors")
    assert create_encoder(EncoderConfig(model="mobilenetv3_small_050", weights=tmp_path / "mobilenet.safetensors")).dim
    avg = create_encoder(EncoderConfig(model="vit_tiny", seed=0, pool="avg", model_kwargs=small, input_size=32))
    mean = create_encoder(EncoderConfig(model="vit_tiny", seed=0, pool="mean", model_kwargs=small, input_size=32))
    torch.testing.assert_close(avg(_tiles()), mean(_tiles()))


def test_pretrained_tries_the_hub_mirrors_file_names_offline(offline, monkeypatch, tmp_path):
    """Lunit's official file name is not the mirror's: a cached model.safetensors is found all the same."""
    import timm
    from safetensors.torch import save_file

    small = {"depth": 1}
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **small)
    save_file(vit.state_dict(),
              hub_cache_snapshot(monkeypatch, tmp_path, "1aurent/vit_small_patch16_224.lunit_dino") / "model.safetensors")
    enc = create_encoder(EncoderConfig(model="lunit_s16", pretrained=True, model_kwargs=small))
    assert torch.equal(enc.model.cls_token, vit.cls_token)


def test_input_size_overrides_and_their_limits(offline):
    """Another input size on a fixed-size zoo ViT interpolates its position table; a crop larger than the resize
    is refused; a zoo model without a hub copy is refused before any task with `pretrained: true`."""
    from pipelines.config import RunConfig
    from pipelines.stages.table import check_encoders

    enc = create_encoder(EncoderConfig(model="phikon_v2", seed=0, input_size=112, device="cpu",
                                       model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}))
    assert enc(_tiles()).shape == (2, 32) and enc.resize == 112
    with pytest.raises(ValueError, match="resize 200 is smaller than input_size 224"):
        resolve(EncoderConfig(model="uni", resize=200))
    cfg = RunConfig.model_validate({"features": {"teacher": {"model": "ctranspath", "pretrained": True}}})
    with pytest.raises(WeightsError, match="ctranspath has no hub copy.*ctranspath.pth"):
        check_encoders(cfg, {"features"})


def test_stores_and_bundles_refuse_other_preprocessing():
    from features.extract import check_same_encoder

    enc = create_encoder(EncoderConfig(model="vit_tiny", seed=0, model_kwargs={"depth": 1}))
    attrs = {"weights_sha256": enc.digest, "input_size": 224, "resize": 256, "interpolation": "bilinear"}
    with pytest.raises(ValueError, match="preprocessed otherwise.*resize 256 → 224"):
        check_same_encoder(enc, attrs, "features/x/s1.zarr")
    check_same_encoder(enc, {"weights_sha256": enc.digest, "input_size": 224}, "old store")  # older stores: not recorded
    assert "does not permit sharing adapted material" in licence_note(provenance("uni"))
