"""Shared fixtures: tiny float64 models for gradient checks."""
import os
import sys

# Small matrices: one BLAS thread is as fast and immune to contention on a busy machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt import GPT, GPTConfig  # noqa: E402


def well_scaled(model, seed=0):
    """Re-draw every parameter ~ N(0, 1/fan_in) so gradients are large enough for
    central differences to resolve (GPT-2's 0.02 init makes key gradients ~1e-6)."""
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p[...] = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
    return model


@pytest.fixture
def tiny_config():
    return GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2,
                     dtype=np.float64)


@pytest.fixture
def tiny_model(tiny_config):
    return well_scaled(GPT(tiny_config, seed=1))
