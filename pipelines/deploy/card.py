"""A bundle's licence block and its human-readable card (``card.md``): what it can be used for, how it was made,
how well it did."""

from __future__ import annotations


def bundle_licence(encoder: dict) -> dict:
    """The teacher's licence, carried into the bundle: a student distilled from a non-commercial teacher is bound by it."""
    from features.zoo import licence_note, provenance

    teacher = encoder if encoder["kind"] == "teacher" else encoder.get("teacher", {})
    prov = teacher.get("provenance") or provenance(teacher.get("spec", {}).get("model", "unknown"))
    notes = [] if teacher.get("random_weights") else [licence_note(prov)]
    start = encoder.get("student_start") or {}  # a student started from a zoo model's weights is bound by it too
    if start.get("non_commercial") is not None:
        notes.append(licence_note(start))
    notes = [n for n in notes if n]
    return {"teacher": prov["title"], "teacher_licence": prov["licence"], "student_start": start.get("title"),
            "non_commercial": bool(prov["non_commercial"] or start.get("non_commercial")),
            "note": " ".join(notes) or None}


def card_markdown(meta: dict) -> str:
    card, enc = meta["card"], meta["encoder"]
    cv = card["cv"]
    cohort = card["training_cohort"]
    lines = [f"# Model bundle: {meta['strategy']}", "",
             f"Classes: {', '.join(meta['classes'])}. CLAMs: folds {meta['clam']['folds']} ({meta['clam']['config']['model']}), "
             f"probabilities averaged.",
             f"Encoder: {enc['kind']} `{enc['label']}`" + (f", {enc['tuned']}" if enc.get("tuned") else "") +
             (f"; teacher weights {enc['weights']}" if enc["kind"] == "teacher" else ""), "",
             f"Cross-validation ({cv['folds']} folds, mean ± std): ACC {cv['acc_mean']:.3f} ± {cv['acc_std']:.3f}, "
             f"balanced ACC {cv['bacc_mean']:.3f} ± {cv['bacc_std']:.3f}, AUC {cv['auc_mean']:.3f} ± {cv['auc_std']:.3f}.",
             f"Training cohort: {cohort['n_slides']} slides, {cohort['n_cases']} cases, labels {cohort['labels']}, "
             f"mpp {cohort['mpp_range']}.",
             f"Encoder speed in training: {card['encoder_patches_per_s']} patches/s; {card['encoder_params']} parameters.",
             f"Made by wsi-pipeline {card['toolkit_version']} on {card['created']} from `{card['run']}`."]
    teacher = enc if enc["kind"] == "teacher" else enc.get("teacher", {})
    if meta.get("licence", {}).get("note"):
        lines += ["", f"**Licence: {meta['licence']['note']}**"]
    if teacher.get("random_weights"):
        lines += ["", "**The teacher had random weights: this model tests the machinery, it is not a diagnostic model.**"]
    return "\n".join(lines) + "\n"
