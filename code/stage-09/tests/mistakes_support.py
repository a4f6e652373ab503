"""Shared by the tests of ``common_mistakes.md``: a small model, a batch, a FLOP meter,
and ``MEASURED``, where the tests leave the numbers the guide quotes.

``test_common_mistakes_guide.py`` checks every number the guide quotes against
``MEASURED`` (running a test first if it has not run), so the guide's numbers are
the tests' measurements, never typed.
"""
import numpy as np
from gradcheck import well_scaled

from minigpt import GPT, GPTConfig

#: {mistake number: {name: value}}, filled by the tests as they measure
MEASURED: dict[int, dict] = {}

CFG = GPTConfig(vocab_size=16, context_length=12, d_model=16, n_layers=2, n_heads=2,
                dtype=np.float64)


def base_model(seed=0, cfg=CFG):
    """A small float64 GPT with well-scaled weights (stands in for a pretrained model)."""
    return well_scaled(GPT(cfg, seed=seed), seed=seed)


def batch(B=3, T=6, seed=0, cfg=CFG):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def randomise_lora_B(model, seed=1, std=0.5):
    """Pretend the adapter has trained: give every ``lora.B`` random values."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("lora.B"):
            p[...] = rng.standard_normal(p.shape) * std


# ---- a FLOP meter: counts every matmul that touches a Counting array ----------------
class Counting(np.ndarray):
    """An ``ndarray`` that counts matmuls (calls and FLOPs) and stays ``Counting``
    through every ufunc, so all arrays computed from it are metered too."""

    calls = 0
    flops = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [i.view(np.ndarray) if isinstance(i, np.ndarray) else i for i in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) for o in kwargs["out"])
        if ufunc is np.matmul and method == "__call__":
            a, b = (np.atleast_2d(p) for p in plain)
            batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            Counting.calls += 1
            Counting.flops += 2 * int(np.prod(batch)) * a.shape[-2] * a.shape[-1] * b.shape[-1]
        result = getattr(ufunc, method)(*plain, **kwargs)
        return result.view(Counting) if isinstance(result, np.ndarray) else result

    @classmethod
    def reset(cls):
        cls.calls = cls.flops = 0


def meter(model):
    """Make every parameter of ``model`` a Counting view (same memory, same values)."""
    for _, module in model.named_modules():
        for name, value in module.own_parameters():
            setattr(module, name, value.view(Counting))
    return model


def plain(a):
    return np.asarray(a).view(np.ndarray)
