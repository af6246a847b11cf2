import numpy as np
import pytest


def clustered(n: int, dim: int, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Mixture of gaussians: (n, dim) float32, so IVF lists are meaningful."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.fixture
def catalog():
    """500 clustered items in 16 dims with string ids."""
    x = clustered(500, 16)
    return [f"B{i:05d}" for i in range(len(x))], x
