"""Shared fixtures: tiny float64 models for gradient checks."""
import os
import sys

# Small matrices: one BLAS thread is as fast and immune to contention on a busy machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradcheck import well_scaled  # noqa: E402,F401  (re-exported for older imports)
from minigpt import GPT, GPTConfig  # noqa: E402


@pytest.fixture
def tiny_config():
    return GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2,
                     dtype=np.float64)


@pytest.fixture
def tiny_model(tiny_config):
    return well_scaled(GPT(tiny_config, seed=1))
