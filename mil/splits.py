"""Patient-level splits: stratified k folds over cases (no case in two sets), or the CSV's own split.

Fold f tests on the f-th stratified group of cases; of the remaining cases ``val_fraction`` (of all
cases) is held out for validation, stratified too. Every case is tested exactly once over the folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    fold: int
    train: list[str]  # slide ids
    val: list[str]
    test: list[str]


def _case_table(slides: list[tuple[str, str, str]]) -> tuple[list[str], np.ndarray, dict[str, list[str]]]:
    """(cases, case labels, slides per case) from (slide_id, case_id, label) rows; a case's label is its slides' majority."""
    by_case: dict[str, list[tuple[str, str]]] = {}
    for slide_id, case_id, label in slides:
        by_case.setdefault(case_id, []).append((slide_id, label))
    cases = sorted(by_case)
    labels = []
    for case in cases:
        values, counts = np.unique([label for _, label in by_case[case]], return_counts=True)
        labels.append(values[np.argmax(counts)])
    return cases, np.array(labels), {c: [s for s, _ in by_case[c]] for c in cases}


def kfold_splits(slides: list[tuple[str, str, str]], k: int, val_fraction: float, seed: int) -> list[Split]:
    """``k`` stratified folds by case. ``slides``: (slide_id, case_id, label)."""
    from sklearn.model_selection import StratifiedKFold

    cases, labels, members = _case_table(slides)
    smallest = min(np.unique(labels, return_counts=True)[1])
    if k < 2 or k > len(cases):
        raise ValueError(f"{k} folds need between 2 and {len(cases)} cases")
    if smallest < k:
        raise ValueError(f"the rarest label has {smallest} case(s): too few for {k} stratified folds; lower mil.folds")
    outer = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    splits = []
    for fold, (rest_idx, test_idx) in enumerate(outer.split(np.zeros(len(cases)), labels)):
        rest_labels = labels[rest_idx]
        n_val = max(1, int(round(val_fraction * len(cases))))
        val_idx = _stratified_pick(rest_idx, rest_labels, n_val, seed + fold)
        train_idx = np.setdiff1d(rest_idx, val_idx)
        pick = lambda idx: sorted(s for i in idx for s in members[cases[i]])  # noqa: E731
        splits.append(Split(fold, pick(train_idx), pick(val_idx), pick(test_idx)))
    return splits


def _stratified_pick(indices: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` of ``indices`` with label proportions like the whole, at least one per label when n allows."""
    rng = np.random.default_rng(seed)
    values = np.unique(labels)
    chosen: list[int] = []
    for value in values:
        pool = indices[labels == value]
        share = max(1 if n >= len(values) else 0, int(round(n * len(pool) / len(indices))))
        share = min(share, len(pool) - 1) if len(pool) > 1 else 0  # keep at least one of each label for training
        chosen.extend(rng.choice(pool, share, replace=False).tolist())
    return np.array(sorted(chosen), dtype=indices.dtype)


def csv_split(slides: list[tuple[str, str, str, str | None]]) -> list[Split]:
    """One fold from the slides.csv ``split`` column (train / val / test); rows without one are ignored."""
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    cases_in: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for slide_id, case_id, _, split in slides:
        if split:
            parts[split].append(slide_id)
            cases_in[split].add(case_id)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = cases_in[a] & cases_in[b]
        if shared:
            raise ValueError(f"case(s) {sorted(shared)[:5]} appear in both {a} and {b} in slides.csv's split column")
    if not parts["train"] or not parts["test"]:
        raise ValueError("slides.csv's split column needs train and test slides")
    return [Split(0, sorted(parts["train"]), sorted(parts["val"]), sorted(parts["test"]))]
