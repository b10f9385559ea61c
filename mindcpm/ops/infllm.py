"""Device-specific parts of InfLLM-v2 sparse attention: the C++ CPU kernel of stage 2
(kernels_aclnn/infllm_attention/cpu.cc), or None where it cannot run (then the composite in
mindcpm/layers/sparse.py is used: it runs on every device, but reads every block)."""
from __future__ import annotations

from . import on_ascend
from .cpu_kernels import KernelBuildError, aot_op, build, kernels_available


def block_sparse_attention_kernel():
    """BlockSparseAttention(q, k_cache, v_cache, positions, block_tables, selected, meta) -> [B, L, Hq*D]."""
    if on_ascend() or not kernels_available():
        return None
    try:
        build("infllm_attention")
    except (KernelBuildError, FileNotFoundError, OSError):
        return None
    return aot_op("infllm_attention", "BlockSparseAttention",
                  lambda q, *rest: [q[0], q[1], q[2] * q[3]], lambda q, *rest: q)


def block_selection_kernel():
    """InfllmSelect(q, c1_cache, c2_cache, positions, c1_table, c2_table, meta) -> int32 [B, Hkv, L, NB]."""
    import mindspore as ms
    if block_sparse_attention_kernel() is None:
        return None
    try:
        build("infllm_score")
    except (KernelBuildError, FileNotFoundError, OSError):
        return None
    return aot_op("infllm_score", "InfllmSelect",
                  lambda q, c1, c2, pos, t1, t2, meta: [q[0], c1[1], q[1], (t1[1] + 1) // 4],
                  lambda *dtypes: ms.int32)
