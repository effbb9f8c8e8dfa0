"""Random initialisation that gives the same weights on every machine, for encoders built without weights.

torch's CPU samplers are vectorised per instruction set: the same seed gives different bits on a
CPU without AVX2 (or on ARM) than on one with it (``uniform_`` and ``normal_`` alike, measured with
``ATEN_CPU_CAPABILITY=default`` vs ``avx2``). Inside ``PortableRandom(seed)`` the samplers a model's
own initialisers call (``uniform_``, ``normal_``, ``erfinv_`` for truncated normals, ``rand``,
``randn``) draw float64 values from numpy's PCG64 stream instead, rounded to the tensor's dtype; the
arithmetic around them (scaling, clamping) is IEEE-exact. The model's initialisation scheme is
unchanged, only where its random numbers come from. ``seeded(seed)`` adds a forked, seeded torch
RNG for any other random op, so building a model never reads or changes the process's RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class PortableRandom(TorchDispatchMode):
    """A dispatch mode (thread-local, like every torch mode) that routes random sampling through numpy."""

    def __init__(self, seed: int):
        super().__init__()
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def _draw(self, kind: str, n: int, a: float, b: float) -> np.ndarray:
        if kind == "uniform":
            return a + (b - a) * self.rng.random(n)
        return a + b * self.rng.standard_normal(n)

    def _fill(self, tensor: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(values).reshape(tensor.shape))
        return tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.uniform_.default, aten.normal_.default, aten.erfinv_.default):
            tensor = args[0]
            if tensor.is_floating_point() and tensor.device.type != "meta":
                if func is aten.erfinv_.default:
                    from scipy.special import erfinv

                    return self._fill(tensor, erfinv(tensor.detach().reshape(-1).to("cpu", torch.float64).numpy()))
                uniform = func is aten.uniform_.default
                lo = args[1] if len(args) > 1 else kwargs.get("from" if uniform else "mean", 0.0)
                hi = args[2] if len(args) > 2 else kwargs.get("to" if uniform else "std", 1.0)
                return self._fill(tensor, self._draw("uniform" if uniform else "normal", tensor.numel(), lo, hi))
        if func in (aten.rand.default, aten.randn.default, aten.rand.generator, aten.randn.generator):
            size = list(args[0])
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            if dtype.is_floating_point and kwargs.get("device", None) in (None, torch.device("cpu"), "cpu"):
                kind = "uniform" if func in (aten.rand.default, aten.rand.generator) else "normal"
                values = self._draw(kind, int(np.prod(size)), 0.0, 1.0)
                return torch.from_numpy(values).reshape(size).to(dtype)
        return func(*args, **kwargs)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build random parts from ``seed`` alone: portable samplers, and a private torch CPU RNG for the rest."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with PortableRandom(seed):
            yield
