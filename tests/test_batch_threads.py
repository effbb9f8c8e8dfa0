"""Model batches on one torch thread each: the same feature bits whatever the cores, in order, errors at their turn."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from features.batch_threads import batches_in_threads
from features.encoder_config import EncoderConfig
from features.encoders import Encoder
from features.extract import ExtractionConfig, embed_tiles


class SmallMapHead(nn.Module):
    """The shapes whose sums MKL and oneDNN split by thread count: a 1×1 convolution over a small channel-first map
    and a product with few rows (a projector on a few tiles; an EfficientNet's squeeze-excite does the same)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 192, 8, stride=8)
        self.mix = nn.Conv2d(192, 192, 1)
        self.head = nn.Linear(192, 384)

    def forward(self, x):
        grid = self.stem(x).contiguous()  # channel-first in memory (tiles arrive channel-last), as a CNN's maps are
        return self.head(self.mix(grid).mean(dim=(2, 3)))


class Tiles:
    """A map-style dataset of (uint8 tile, index), as TileDataset gives them."""

    def __init__(self, n: int, seed: int = 0):
        self.tiles = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 56, 56, 3), dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int):
        return self.tiles[i], i


def small_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(model=SmallMapHead().eval(), dim=384, input_size=56, mean=(0.5,) * 3, std=(0.25,) * 3,
                   device=torch.device("cpu"), dtype=None, config=EncoderConfig(model="vit_tiny"))


@pytest.mark.parametrize("batch_size", [7, 9, 32])
def test_features_are_the_same_bits_on_one_and_two_threads(batch_size):
    encoder, tiles = small_encoder(), Tiles(45)
    before = torch.get_num_threads()
    one, two = (embed_tiles(tiles, encoder, ExtractionConfig(batch_size=batch_size, num_threads=n, loader_min_tiles=10**6))
                for n in (1, 2))
    assert one.shape == (45, 384) and np.isfinite(one).all()
    assert np.array_equal(one, two)
    assert torch.get_num_threads() == 2  # the task's threads (num_threads) are set back after the pass
    torch.set_num_threads(before)


def test_with_two_threads_per_batch_the_bits_follow_the_setting_not_the_cores():
    encoder, tiles = small_encoder(), Tiles(45)
    before = torch.get_num_threads()
    one_at_once, two_at_once = (
        embed_tiles(tiles, encoder, ExtractionConfig(batch_size=7, num_threads=n, threads_per_batch=2, loader_min_tiles=10**6))
        for n in (2, 4))
    assert np.array_equal(one_at_once, two_at_once)
    seen = [t for _, t, _ in batches_in_threads(range(6), lambda i: torch.get_num_threads(), threads=4, per_batch=2)]
    assert seen == [2] * 6
    torch.set_num_threads(before)


def test_batches_run_side_by_side_and_come_back_in_order():
    both_running = threading.Barrier(2, timeout=10)
    rng = np.random.default_rng(1)
    delays = rng.uniform(0, 0.02, 12)

    def encode(i):
        if i < 2:
            both_running.wait()  # passes only if two batches run at once
        assert torch.get_num_threads() == 1
        time.sleep(delays[i])
        return i * 10

    out = list(batches_in_threads(range(12), encode, threads=2))
    assert [(b, r) for b, r, _ in out] == [(i, i * 10) for i in range(12)]
    assert all(s >= 0 for _, _, s in out)


def test_a_failing_batch_raises_at_its_turn_after_the_batches_before_it():
    def encode(i):
        if i == 3:
            raise ValueError("batch 3 is bad")
        return i

    seen = []
    with pytest.raises(ValueError, match="batch 3 is bad"):
        for batch, _, _ in batches_in_threads(range(8), encode, threads=2):
            seen.append(batch)
    assert seen == [0, 1, 2]


def test_leaving_early_restores_the_threads():
    torch.set_num_threads(2)
    for batch, _, _ in batches_in_threads(range(10), lambda i: i, threads=2):
        if batch == 1:
            break
    time.sleep(0.1)
    assert torch.get_num_threads() == 2


PRODUCT_ON_1_AND_2_THREADS = """
import os, sys, torch
{imports}
torch.manual_seed(0)
a, b = torch.randn(7, 1024), torch.randn(1024, 384)  # few rows: the shape MKL splits by thread count
out = []
for n in (1, 2):
    torch.set_num_threads(n)
    out.append(a @ b)
print(os.environ.get("MKL_CBWR"), torch.equal(*out))
"""


@pytest.mark.parametrize("package", ["features", "distill", "mil"])
def test_importing_a_model_package_makes_mkl_sums_thread_invariant(package):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    script = PRODUCT_ON_1_AND_2_THREADS.format(imports=f"import {package}")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AUTO,STRICT", "True"]


def test_a_users_mkl_setting_is_kept():
    import subprocess
    import sys

    env = {**os.environ, "MKL_CBWR": "COMPATIBLE"}
    script = PRODUCT_ON_1_AND_2_THREADS.format(imports="import features")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "COMPATIBLE"


class AtOnce:
    """Wraps an encode function and records the most calls of it running at the same time; each call holds on
    long enough (50 ms) that the batches started together overlap on a loaded machine."""

    def __init__(self, encode):
        self.encode, self.running, self.most, self.lock = encode, 0, 0, threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        try:
            return self.encode(batch)
        finally:
            with self.lock:
                self.running -= 1


def test_no_more_batches_run_at_once_than_fit_in_memory():
    for fit, expected in ((1, 1), (2, 2), (10, 3)):
        encode = AtOnce(lambda i: i)
        out = [b for b, _, _ in batches_in_threads(range(12), encode, threads=3, fits=lambda fit=fit: fit)]
        assert out == list(range(12)) and encode.most == expected


def test_the_meter_sees_the_largest_output_of_one_forward():
    from features.batch_threads import ActivationMeter

    model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 4))
    with ActivationMeter(model) as meter, torch.inference_mode():
        model(torch.zeros(10, 8))
    assert meter.largest == 10 * 64 * 4 and meter.batch_bytes == 4 * 10 * 64 * 4
    assert all(not m._forward_hooks for m in model.modules())  # the hooks come off


def test_a_loader_error_comes_after_the_batches_before_it_and_their_errors():
    def loader():
        yield from range(3)
        raise OSError("tile 3 does not decode")

    def encode(i):
        if i == 1:
            raise ValueError("batch 1 is bad")
        return i

    seen = []
    with pytest.raises(ValueError, match="batch 1 is bad"):
        for batch, _, _ in batches_in_threads(loader(), encode, threads=2):
            seen.append(batch)
    assert seen == [0]
    with pytest.raises(OSError, match="tile 3"):
        list(batches_in_threads(loader(), lambda i: i, threads=2))



def test_a_models_batches_at_once_follow_its_first_batch_and_the_memory_left(monkeypatch):
    import features.batch_threads as bt

    model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 4))  # a batch: 4 × (10 × 64 floats) = 10,240 B

    def forward(x):
        with torch.inference_mode():
            return model(x)

    batches = [torch.full((10, 8), float(i)) for i in range(9)]
    for headroom, expected in ((10_239, 1), (2 * 10_240, 2), (10**9, 3)):
        monkeypatch.setattr(bt, "memory_headroom", lambda headroom=headroom: headroom)
        encode = AtOnce(forward)
        out = [b for b, _, _ in bt.model_batches(model, batches, encode, threads=3)]
        assert [float(b[0, 0]) for b in out] == list(range(9)) and encode.most == expected
        assert all(not m._forward_hooks for m in model.modules())
