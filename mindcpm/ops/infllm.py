"""Device-specific parts of InfLLM-v2 sparse attention: the C++ CPU kernels of stage 1 (block
selection, kernels_aclnn/infllm_score/cpu.cc) and stage 2 (kernels_aclnn/infllm_attention/cpu.cc),
or None where they cannot be built (then the composite in mindcpm/layers/sparse.py is used: it
runs on every device, but reads every block). The Device asks for them only on CPU."""
from __future__ import annotations

from .cpu_kernels import KernelBuildError, aot_op, build, kernels_available


def _kernel_op(op_name: str, func_name: str, out_shape_fn, out_dtype_fn):
    """The op of kernels_aclnn/<op_name>/cpu.cc, or None when it cannot be built."""
    if not kernels_available():
        return None
    try:
        build(op_name)
    except (KernelBuildError, FileNotFoundError, OSError):
        return None
    return aot_op(op_name, func_name, out_shape_fn, out_dtype_fn)


def block_sparse_attention_kernel():
    """BlockSparseAttention(q, k_cache, v_cache, positions, block_tables, selected, meta) -> [B, L, Hq*D]."""
    return _kernel_op("infllm_attention", "BlockSparseAttention",
                      lambda q, *rest: [q[0], q[1], q[2] * q[3]], lambda q, *rest: q)


def block_selection_kernel():
    """InfllmSelect(q, c1_cache, c2_cache, positions, c1_table, c2_table, meta) -> int32 [B, Hkv, L, NB]."""
    import mindspore as ms
    return _kernel_op("infllm_score", "InfllmSelect",
                      lambda q, c1, c2, pos, t1, t2, meta: [q[0], c1[1], q[1], (t1[1] + 1) // 4],
                      lambda *dtypes: ms.int32)
