"""Weight-only quantization at the format level (numpy): one in-memory layout, QuantWeight,
that every source is converted to and the CPU kernel (kernels_aclnn/quant_linear) runs on.

    formats.QuantWeight      packed codes + group scales (+ offsets); pack / unpack / dequantize;
                             take_rows / take_inputs (shards, row permutations), concat_rows (q|k|v, gate|up)
    rtn.quantize             round-to-nearest group-wise int8 / int4 (sym or asym) from fp32/bf16
    gguf_blocks.from_gguf    GGUF Q8_0 / Q4_0 / Q4_1 blocks kept quantized (bit-exact)
    gptq.from_gptq           GPTQ qweight / qzeros / scales / g_idx (bits 4 and 8, sym, desc_act)
    bitcpm.ternary_weight    BitCPM fake-quantized ternary weights packed to 2 bits, losslessly
    linear.KernelQuantMatmul the kernel as a MindSpore cell: y = epilogue(x W^T)
"""
from .formats import QuantError, QuantWeight, concat_rows  # noqa: F401
