"""RMSNorm (mindcpm/layers/norm.py) as MiniMax's lightning layer uses it: one norm over all H*D
outputs with eps 1e-6, against the float64 NumPy reference (tests/reference/minimax_numpy.py)."""
from __future__ import annotations

import numpy as np

from tests.reference import minimax_numpy as R


def test_norm_is_over_all_heads_with_eps_1e6():
    import mindspore as ms
    from mindcpm.layers.norm import RMSNorm
    rng = np.random.default_rng(0)
    h, d = 4, 8
    # Heads of very different scales: a per-head norm would equalise them; one over H*D does not.
    o = rng.standard_normal((3, h, d)) * np.array([1e-3, 1, 10, 100])[None, :, None]
    y = o.reshape(3, h * d)
    cell = RMSNorm(h * d, 1e-6, ms.float32)
    got = cell(ms.Tensor(y, ms.float32)).asnumpy()
    np.testing.assert_allclose(got, R.rmsnorm(y, 1.0, 1e-6), rtol=1e-5, atol=1e-8)
    per_head = R.rmsnorm(o, 1.0, 1e-6).reshape(3, h * d)
    assert np.abs(per_head - got).max() > 0.1
