"""Checkpoint key layouts: each official layout converted to the keys of the model the zoo builds.

A converter takes the checkpoint's tensors and the freshly built model and returns the tensors under
the model's names. It drops only what is known not to be part of the image embedding (a caption
pooler, the text tower, a masked-modelling token, buffers the model recomputes) and never guesses:
whatever is left over or missing is reported by ``features.encoders.load_exact``.
"""

from __future__ import annotations

from collections.abc import Callable

LAYOUTS_VERSION = 1  # raise when a converter changes what it loads: features made with the old one rerun
PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.", "visual.", "vit.", "dinov2.")


def strip_prefix(state: dict, prefixes: tuple[str, ...] = PREFIXES) -> dict:
    """Remove one wrapper prefix shared by every key (``module.``, ``trunk.``, ``visual.``, ...), repeatedly."""
    while state:
        shared = next((p for p in prefixes if all(k.startswith(p) for k in state)), None)
        if shared is None:
            return state
        state = {k[len(shared):]: v for k, v in state.items()}
    return state


HEADS = ("head.", "fc.", "classifier.")  # classifiers (and DINO's projection head) a headless model does not have


def unwrap_key(key: str) -> str:
    """A timm key without the wrapper prefixes training code adds (``module.``, ``backbone.``, ...): timm's own
    names never start with them."""
    while key.startswith(PREFIXES):
        key = key.split(".", 1)[1]
    return key


def timm_layout(state: dict, model) -> dict:
    """timm's own names (UNI, UNI2-h, Virchow, H-optimus, GigaPath, Lunit, Kaiko, plain timm models): wrapper
    prefixes stripped and a classifier head the headless model does not have dropped."""
    own = model.state_dict()
    state = {unwrap_key(k): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(HEADS) or k in own}


torchvision_resnet = timm_layout  # torchvision and timm name ResNets alike; layer4 is cut after loading


def _qkv(state: dict, base: str, names: tuple[str, str, str]) -> tuple:
    weight = [state.pop(f"{base}.{n}.weight") for n in names]
    bias = [state.pop(f"{base}.{n}.bias") for n in names]
    import torch

    return torch.cat(weight), torch.cat(bias)


def hf_vit(state: dict, model) -> dict:
    """transformers ``ViTModel`` (Phikon) → timm ViT. The pooler (``add_pooling_layer``) is not part of the embedding."""
    state = {k: v for k, v in strip_prefix(state).items() if not k.startswith("pooler.")}
    state.pop("embeddings.mask_token", None)  # masked image modelling only
    out = {"cls_token": state.pop("embeddings.cls_token"), "pos_embed": state.pop("embeddings.position_embeddings"),
           "patch_embed.proj.weight": state.pop("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": state.pop("embeddings.patch_embeddings.projection.bias"),
           "norm.weight": state.pop("layernorm.weight"), "norm.bias": state.pop("layernorm.bias")}
    for i in range(len(model.blocks)):
        src, dst = f"encoder.layer.{i}", f"blocks.{i}"
        out[f"{dst}.attn.qkv.weight"], out[f"{dst}.attn.qkv.bias"] = _qkv(state, f"{src}.attention.attention",
                                                                          ("query", "key", "value"))
        for old, new in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                         ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
            for part in ("weight", "bias"):
                out[f"{dst}.{new}.{part}"] = state.pop(f"{src}.{old}.{part}")
    return {**out, **state}  # leftovers are reported as unexpected


def hf_dinov2(state: dict, model) -> dict:
    """transformers ``Dinov2Model`` (Phikon-v2, Midnight) and Hibou's ``Dinov2ModelWithRegisters`` → timm ViT.

    The CLS position is folded into the CLS token where the model keeps positions for patches only (register
    models, as timm's DINOv2-registers port does); a stored position grid other than the model's is resampled
    once, bicubically, as transformers does on every forward pass (so a fixed input size gives its numbers)."""
    from timm.layers import resample_abs_pos_embed

    state = strip_prefix(state)
    state.pop("embeddings.mask_token", None)  # masked image modelling only
    pos = state.pop("embeddings.position_embeddings")
    cls = state.pop("embeddings.cls_token")
    grid = model.patch_embed.grid_size
    if (pos.shape[1] - 1) != grid[0] * grid[1]:  # transformers' Dinov2 resamples without antialiasing, its
        # registers variant (Hibou) with, as the DINOv2-registers code it ports
        antialias = "embeddings.register_tokens" in state
        pos = resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=1, interpolation="bicubic", antialias=antialias)
    out = {"patch_embed.proj.weight": state.pop("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": state.pop("embeddings.patch_embeddings.projection.bias"),
           "norm.weight": state.pop("layernorm.weight"), "norm.bias": state.pop("layernorm.bias")}
    if "embeddings.register_tokens" in state:
        out["reg_token"] = state.pop("embeddings.register_tokens")
    if getattr(model, "no_embed_class", False):
        out["cls_token"], out["pos_embed"] = cls + pos[:, :1], pos[:, 1:]
    else:
        out["cls_token"], out["pos_embed"] = cls, pos
    for i in range(len(model.blocks)):
        src, dst = f"encoder.layer.{i}", f"blocks.{i}"
        out[f"{dst}.attn.qkv.weight"], out[f"{dst}.attn.qkv.bias"] = _qkv(state, f"{src}.attention.attention",
                                                                          ("query", "key", "value"))
        moves = [("attention.output.dense", "attn.proj"), ("norm1", "norm1"), ("norm2", "norm2")]
        swiglu = f"{src}.mlp.weights_in.weight" in state
        moves += [("mlp.weights_in", "mlp.fc1"), ("mlp.weights_out", "mlp.fc2")] if swiglu else \
            [("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
        for old, new in moves:
            for part in ("weight", "bias"):
                out[f"{dst}.{new}.{part}"] = state.pop(f"{src}.{old}.{part}")
        for n in (1, 2):
            out[f"{dst}.ls{n}.gamma"] = state.pop(f"{src}.layer_scale{n}.lambda1")
    return {**out, **state}


def conch_v1(state: dict, model) -> dict:
    """CONCH v1's whole CoCa checkpoint → the image embedding: ``visual.trunk``, ``visual.attn_pool_contrast`` and
    ``visual.ln_contrast``. The text tower, the caption pooler and the contrastive projection (the embedding is
    taken before it) are dropped by name."""
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")} if \
        any(k.startswith("visual.") for k in state) else dict(state)
    unused = ("attn_pool_caption.", "ln_caption.", "proj_contrast", "head.")
    return {k: v for k, v in visual.items() if not k.startswith(unused)}


def conch_v1_5(state: dict, model) -> dict:
    """CONCH v1.5's vision checkpoint (``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``), with the trunk's
    position table made for the model's input grid as CONCH v1.5's forward pass makes it."""
    from features.arch import conch_v15_pos_embed

    state = dict(state)
    key = "trunk.pos_embed"
    if key in state:
        state[key] = conch_v15_pos_embed(state[key], model.trunk.patch_embed.grid_size[0])
    return state


def ctranspath(state: dict, model) -> dict:
    """The TransPath checkpoint (timm 0.5.4 Swin: downsampling at the end of a stage, ``attn_mask`` and
    ``relative_position_index`` buffers) → timm's current Swin, through timm's own converter."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    state = strip_prefix(state)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the authors replace it by Identity
    return checkpoint_filter_fn(state, model)


LAYOUTS: dict[str, Callable[[dict, object], dict]] = {
    "timm": timm_layout, "torchvision_resnet": torchvision_resnet, "hf_vit": hf_vit, "hf_dinov2": hf_dinov2,
    "conch_v1": conch_v1, "conch_v1_5": conch_v1_5, "ctranspath": ctranspath,
}


def convert(layout: str, state: dict, model) -> dict:
    """The checkpoint ``state`` under ``model``'s names. KeyError for a key the layout needs names it."""
    try:
        return LAYOUTS[layout](dict(state), model)
    except KeyError as exc:
        raise KeyError(f"the checkpoint is not in the {layout!r} layout: key {exc.args[0]!r} is missing "
                       f"(it has e.g. {sorted(state)[:4]})") from None

