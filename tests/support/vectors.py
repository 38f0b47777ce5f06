"""Hand-made embeddings for grouping tests."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def vectors_with_gram(gram: NDArray[np.float64]) -> NDArray[np.float32]:
    """Unit vectors whose pairwise cosine similarities are exactly `gram` (positive definite)."""
    return np.linalg.cholesky(np.asarray(gram, np.float64)).astype(np.float32)
