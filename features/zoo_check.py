"""The zoo as a table (``wsi-pipeline encoders``), optionally checked: every model built on the ``meta`` device (no
memory, no weights, no network) and run on a dummy batch, its measured dimension and parameter count set beside
the published ones."""

from __future__ import annotations

from typing import Any

from features.zoo import HALF, HIBOU, HOPTIMUS, IMAGENET, LUNIT, OPENAI_CLIP, ZOO, ZooModel

NORMS = {IMAGENET: "ImageNet", OPENAI_CLIP: "OpenAI CLIP", HALF: "0.5 / 0.5", HOPTIMUS: "H-optimus", LUNIT: "Lunit",
         HIBOU: "Hibou"}

JSON_FIELDS = ("name", "dim", "params", "measured_dim", "measured_params", "input_size", "mean", "std", "pool", "mpp",
               "licence")


def measure(entry: ZooModel) -> tuple[int, int]:
    """(output dimension, parameters) of the full model, built on the meta device."""
    import torch

    from features.encoders import EncoderConfig, meta_model

    model, spec = meta_model(EncoderConfig(model=entry.name))
    with torch.device("meta"):
        out = model(torch.zeros(1, 3, spec.input_size, spec.input_size))
    return int(out.shape[-1]), int(sum(p.numel() for p in model.parameters()))


def zoo_rows(check: bool = False) -> list[dict[str, Any]]:
    """One row per zoo model: its card, and with ``check`` the measured dimension and parameters."""
    rows = []
    for entry in ZOO.values():
        row = entry.card()
        row["measured_dim"], row["measured_params"] = measure(entry) if check else (None, None)
        rows.append(row)
    return rows


def format_mpp(mpp) -> str:
    if mpp is None:
        return "?"
    return f"{mpp[0]:g}–{mpp[1]:g}" if isinstance(mpp, (tuple, list)) else f"{mpp:g}"


def format_params(n: int | None) -> str:
    if not n:
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def zoo_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of text for a terminal table; a measured figure more than 0.5 % off the published one is flagged."""
    out = []
    for r in rows:
        crop = f"{r['resize']}→{r['input_size']}" if r["resize"] != r["input_size"] else f"{r['input_size']}"
        params = format_params(r["params"])
        if r["measured_params"] is not None:
            off = r["params"] and abs(r["measured_params"] / r["params"] - 1) > 0.005
            params += f" ({format_params(r['measured_params'])}{' !' if off else ''})"
        dim = f"{r['dim']}" + (f" ({r['measured_dim']}{' !' if r['measured_dim'] != r['dim'] else ''})"
                               if r["measured_dim"] is not None else "")
        norm = NORMS.get((tuple(r["mean"]), tuple(r["std"])), f"{tuple(r['mean'])} / {tuple(r['std'])}")
        out.append([r["name"], dim, params, crop + f" {r['interpolation']}", norm, r["pool"], format_mpp(r["mpp"]),
                    r["precision"], r["licence"]])
    return out
