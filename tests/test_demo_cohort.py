"""The demo writer's focal lesions: the tumour's share of the tissue and its number of foci, with truth."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from wsi.demo_cohort import load_truth, make_layout


@pytest.mark.parametrize("fraction, foci", [(0.03, 1), (0.08, 3), (0.2, 2)])
def test_focal_tumour_covers_the_asked_share_of_tissue_in_that_many_foci(fraction, foci):
    for seed in range(3):
        layout = make_layout(np.random.default_rng(seed), 6144, 8192, True, tumour_fraction=fraction, foci=foci)
        tissue, tumour = layout.tissue_mask, layout.tumour_mask
        assert not (tumour & ~tissue).any()  # tumour only inside tissue
        assert tumour.sum() / tissue.sum() == pytest.approx(fraction, abs=0.003)
        _, n_components = ndimage.label(tumour)
        assert 1 <= n_components <= foci + 1  # each focus one blob (a tissue edge may split one)
        if foci > 1:
            assert n_components >= 2  # separate foci, not one merged lump


def test_negative_slides_have_no_tumour_and_default_layouts_are_unchanged():
    negative = make_layout(np.random.default_rng(0), 6144, 8192, False, tumour_fraction=0.05, foci=2)
    assert not negative.tumour_mask.any()
    # without the options a positive slide keeps its one or two large regions (the README demo's cohort)
    default = make_layout(np.random.default_rng(1), 6144, 8192, True)
    share = default.tumour_mask.sum() / default.tissue_mask.sum()
    assert share > 0.05
    again = make_layout(np.random.default_rng(1), 6144, 8192, True)
    np.testing.assert_array_equal(default.labels, again.labels)


def test_demo_command_writes_a_focal_cohort_with_truth(tmp_path):
    out = tmp_path / "focal"
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", str(out), "--n-slides", "2", "--size", "2048",
                             "--tumour-fraction", "0.06", "--foci", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tissue, tumour, meta = load_truth(out / "demo_001.svs")
    assert meta["positive"] and meta["tumour_fraction_of_tissue"] == pytest.approx(0.06, abs=0.005)
    assert tumour.sum() / tissue.sum() == pytest.approx(meta["tumour_fraction_of_tissue"], abs=1e-6)
    assert json.loads((out / "demo_000.truth.json").read_text())["tumour_fraction_of_tissue"] == 0
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", str(tmp_path / "bad"), "--tumour-fraction", "1.5"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "tumour-fraction" in bad.stderr
