"""The one object that knows the device.

A Device is built once per LLM from (device, compute dtype, weight dtype, CPU kernels on/off,
sparse config, tensor-parallel group, cache geometry) and hands every model, layer and the
runner what depends on them: the ops (linear, RMS norm, embedding, attention core, MoE,
lightning), the KV-cache shape, the names and values of the step's graph inputs, the passes
over a built model (CPU block fusion; Ascend expert layout after load) and the jit config of
the compiled step. Models, layers and the engine hold no backend names and no op classes.

Ascend calling conventions follow the MindSpore-on-Ascend stacks that run (read, not copied):
vllm-mindspore's model runner feeds the attention kernels named graph inputs
`batch_valid_length` (each row's kv length) and `q_seq_lens`, next to `slot_mapping` and
`block_tables`, and compiles with jit_level O0 and infer_boost on; its fused MoE keeps expert
weights as [E, in, out] for GroupedMatmul (no transpose).
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import mindspore as ms
from mindspore import nn

from .native import NativeArgmax, NativeAttention, NativeEmbedding, NativeMatmul, NativeRMSNorm, SplitRopeAttention

DEVICES = ("cpu", "ascend")
ATTENTION_BACKENDS = ("native", "ascend")
PREQUANTIZED = ("gguf", "gptq")  # quantizations whose codes come from the checkpoint
# LLM(quantization=...): quantize on load (round to nearest), BitCPM's ternary weights packed as
# they load, or the codes of a GGUF / GPTQ checkpoint (detected when not given)
QUANTIZATIONS = ("int8", "int4", "bitcpm") + PREQUANTIZED

# The compiled step's named graph inputs, in order (then the model's extras, then the attention
# core's extras). MindSpore names a graph input after the top-level parameter of the compiled
# function, and Ascend's internal PagedAttention reads `batch_valid_length` and `q_seq_lens` by
# those names on the host; so they are parameters, never *args.
STEP_INPUTS = ("input_ids", "positions", "batch_valid_length", "q_seq_lens", "slot_mapping", "block_tables",
               "logits_rows")

# Op by op (PyNative), a decode step of the default model costs ~37 ms more than its compiled
# graph, and compiling that graph costs ~3.7 s (measured on this 2-core host, fp32, kernels on):
# an answer shorter than ~100 tokens is done sooner without the graph. Compiling a decode bucket
# after this many op-by-op steps keeps short answers free of the compile and costs a long one at
# most ~2.4 s more than compiling at once (the ski-rental rule: never twice the better choice).
EAGER_DECODE_STEPS = 64

# The internal PagedAttention kernel's block sizes and its head_dim * block_size bound (ATB
# PagedAttention operation doc); FlashAttentionScore's head_dim: a multiple of 16, at most 512.
ASCEND_BLOCK_SIZES = (16, 32, 64, 128)
ASCEND_MAX_BLOCK_ELEMENTS = 16384
ASCEND_MAX_HEAD_DIM = 512


# -- the process's runtime ----------------------------------------------------------------
def detect_device() -> str:
    """"ascend" when an Ascend device is present, else "cpu". Asks the device count, not whether
    the plugin loads; probes the plugin quietly first (ms.device_context.ascend.is_available()
    logs two warnings per call on a CPU host)."""
    from mindspore._c_expression import MSContext
    if not MSContext.get_instance().is_pkg_support_device("Ascend"):
        return "cpu"
    try:
        return "ascend" if ms.device_context.ascend.device_count() > 0 else "cpu"
    except RuntimeError:
        return "cpu"


_runtime: str | None = None  # the device this process's runtime was set up for


def setup_runtime(device: str | None = None) -> str:
    """Selects the process's device once ("cpu" / "ascend"; None = detect); returns it."""
    global _runtime
    if _runtime is not None:
        return _runtime
    device = device or detect_device()
    if device == "ascend":
        try:
            ms.set_device("Ascend")
        except RuntimeError as e:
            raise RuntimeError(f"cannot use the Ascend device: {str(e).splitlines()[0]}") from None
        # Prefill attention is aclnn FlashAttentionScore, whose documented inputs we pass (BSH,
        # uint8 mask, 1 = discard). With infer_boost on, MindSpore would otherwise dispatch it to
        # the internal kernel, which takes additive fp16 masks and reads q/kv lengths from the
        # graph inputs instead (q lengths = kv lengths without `q_seq_lens`: wrong for chunked
        # prefill rows). Read when the first graph compiles, so set here.
        _append_env_list("MS_DISABLE_INTERNAL_KERNELS_LIST", "FlashAttentionScore")
    else:
        try:
            ms.set_device("CPU")
        except RuntimeError:
            pass  # a kernel already ran on the default device, which is the CPU
        # The asynchronous PyNative pipeline thrashes two cores; synchronous launches are
        # 10-20x faster and attribute errors to the op that raised them.
        ms.runtime.launch_blocking()
        # A compiled graph then runs on the calling thread instead of being handed to a
        # "frontend_queue" thread that busy-waits for the next graph: on two cores that
        # spinning thread competes with the host's work between steps (measured: 0.3-0.4 ms
        # less per decode step). Read when the first graph runs, so it must be set first.
        os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")
    _runtime = device
    return device


def _append_env_list(name: str, item: str) -> None:
    items = [s for s in os.environ.get(name, "").split(",") if s]
    if item not in items:
        os.environ[name] = ",".join(items + [item])


# -- the device object ----------------------------------------------------------------------
class Device:
    """What the model runs with. `name`: "cpu" or "ascend"; `attention`: the attention backend,
    "native" (MindSpore composites, every device) or "ascend" (the Ascend kernels; on a CPU host
    only with tests' stand-ins or to compile their graphs). A Device("ascend") may be built on
    a CPU host in any dtype: that is the test-only way to build 16-bit Ascend graphs here."""

    def __init__(self, name: str = "cpu", dtype=ms.float32, weight_dtype=None, kernels: bool = False,
                 sparse=None, block_size: int = 16, cache_blocks: int = 1, tp=None, attention: str | None = None,
                 compile_prefill: bool = True, quantization: str | None = None,
                 quant_group_size: int | None = None):
        from ..parallel import tp_group
        if name not in DEVICES:
            raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
        self.name = name
        self.attention_backend = attention or ("ascend" if name == "ascend" else "native")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention_backend!r}; "
                             f"choose one of {', '.join(ATTENTION_BACKENDS)}")
        if weight_dtype is not None and not kernels:
            raise ValueError("16-bit weights with fp32 activations need the CPU kernels")
        if kernels and self.attention_backend != "native":
            raise ValueError("the CPU kernels go with the native attention backend")
        self.dtype, self.weight_dtype, self.kernels = dtype, weight_dtype, kernels
        self.sparse = sparse
        self.block_size, self.cache_blocks = block_size, cache_blocks
        self.tp = tp or tp_group()
        self.fused_blocks = False  # set by fuse_blocks
        self.compile_prefill = compile_prefill  # False: see eager_steps
        if self.ascend_kernels:
            check_ascend_block_size(block_size)
        # (bits, group size or None = per output channel) of quantize-on-load; "gguf" / "gptq":
        # the checkpoint's own codes, loaded as they are (the layout sized at build is a placeholder)
        self.quant, self.quantization = None, quantization
        if quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if quantization in PREQUANTIZED:
            self.quant = (8, None)
        elif quantization == "bitcpm":
            self.quant = (2, None)
        elif quantization is not None:
            from ..quant.rtn import method_settings
            self.quant = method_settings(quantization, quant_group_size)
            if not (kernels or self.ascend_kernels):
                raise ValueError(f"quantization {quantization!r} runs on the CPU kernels, which are off "
                                 "(--kernels off, no g++, or another device)")

    @property
    def ascend_kernels(self) -> bool:
        return self.attention_backend == "ascend"

    @property
    def attention_name(self) -> str:
        """What serves attention: "native", "ascend" or "infllm-v2" (sparse, on every device)."""
        return "infllm-v2" if self.sparse is not None else self.attention_backend

    # -- ops --------------------------------------------------------------------------------
    def stored_dtype(self, dtype):
        """The dtype of a layer's matrix weights for a layer of compute dtype `dtype`."""
        return self.weight_dtype or dtype

    def matmul(self, epilogue: str = "plain", scale: float = 1.0):
        """x W^T with an epilogue ("plain", "swiglu", "residual")."""
        if self.kernels:
            from .cpu import KernelMatmul
            return KernelMatmul(epilogue, scale)
        return NativeMatmul(epilogue, scale)

    def quantized(self, exact_dtype: bool = False) -> bool:
        """Whether a projection keeps its weight quantized (never an exact-dtype one: a router)."""
        return self.quant is not None and not exact_dtype

    def quantizes_head(self, vocab_size: int) -> bool:
        """Whether the LM head is quantized too: with int8 / int4 on load (as llama.cpp's q8_0 /
        q4_0 files hold their output matrix). GGUF and GPTQ checkpoints have no codes for it and
        a ternary checkpoint's head is not ternary: those keep it float. On Ascend a vocabulary
        wider than WeightQuantBatchMatmul's N limit (MiniCPM4's 73448 words) keeps it float too."""
        if self.ascend_kernels:
            from .ascend_quant import MAX_DIM
            if vocab_size > MAX_DIM:
                return False
        return self.quantization in ("int8", "int4")

    def quant_layout(self, k: int) -> tuple[int, int]:
        """(bits, group size) of a quantized weight with k inputs; QuantError when they do not fit."""
        from ..quant.formats import check_layout
        bits, group = self.quant
        group = group or k
        check_layout(bits, k, group, f"int{bits} quantization")
        return bits, group

    def quantize(self, values: np.ndarray, name: str = "weight"):
        """A float weight [N, K] -> the QuantWeight the quantized matmul runs on: round to
        nearest, symmetric, scales as _scale_dtype says; BitCPM: the exactly ternary
        weight packed losslessly (QuantError naming `name` when it is not ternary)."""
        from ..quant.formats import QuantError
        from ..quant.rtn import quantize
        if self.quantization in PREQUANTIZED:
            raise QuantError(f"{name}: this {self.quantization} checkpoint has no quantized weights for it")
        if self.quantization == "bitcpm":
            from ..quant.bitcpm import ternary_weight
            return ternary_weight(values, "float32", name)
        bits, group = self.quant_layout(values.shape[1])
        return quantize(values, bits, group, scale_dtype=self._scale_dtype())

    def _scale_dtype(self) -> str:
        """fp16 scales, as GGUF and GPTQ store theirs; on Ascend the compute dtype's, which
        WeightQuantBatchMatmul takes them in (so bf16 ones are not rounded again)."""
        return "bfloat16" if self.ascend_kernels and self.dtype == ms.bfloat16 else "float16"

    def quant_matmul(self, epilogue: str, returns_early: bool = False):
        """x W^T with W as a quantized layer's three tensors (quant_parameters). returns_early: a
        plain projection whose output only argmax() and the step's outputs read (the LM head);
        on CPU it returns before its work is done inside compiled_run, which waits at its end."""
        if self.ascend_kernels:
            from .ascend_quant import AscendQuantMatmul
            return AscendQuantMatmul(epilogue)
        from ..quant.linear import KernelQuantMatmul
        return KernelQuantMatmul(epilogue, returns_early=returns_early)

    def argmax(self) -> nn.Cell:
        """Each logits row's arg-max as int32 (ties: the lowest id). With quantized weights on CPU
        the kernel's, which does not wait for an LM head that returned early (quant_matmul)."""
        if self.quant is not None and not self.ascend_kernels:
            from ..quant.linear import KernelArgmaxRows
            return KernelArgmaxRows()
        return NativeArgmax()

    def quant_parameters(self, n: int, k: int) -> dict:
        """Name -> zeros of a quantized [n, k] layer's Parameters, in this device's layout: the CPU
        kernel's (packed, scales, offsets), or WeightQuantBatchMatmul's (weight, scale, offset)."""
        bits, group = self.quant_layout(k)
        if self.ascend_kernels:
            from .ascend_quant import ascend_parameter_shapes
            return {name: ms.Tensor(np.zeros(shape, np.int8 if dtype else np.float32), dtype or self.dtype)
                    for name, (shape, dtype) in ascend_parameter_shapes(n, k, group, bits).items()}
        return {"weight_packed": ms.Tensor(np.zeros((n, k * bits // 8), np.uint8)),
                "weight_scales": ms.Tensor(np.zeros((n, k // group), np.float16)),
                "weight_offsets": ms.Tensor(np.zeros(1, np.float32))}

    def quant_weights_constant(self) -> bool:
        """Whether a quantized layer holds its tensors as constants of the compiled graphs instead
        of Parameters (layers/linear.py QuantSlot). CPU: constants. MindSpore's runtime does host
        work for every Parameter input of a graph on every run, and a quantized MiniCPM4-0.5B has
        ~390 of them: as constants, its int4 decode step took ~6% less (~0.9 of 15 ms, measured
        in one process, 30 alternated runs). A constant's device address is made when a graph is
        compiled, on CPU over the tensor's own memory (tests/quant/test_memory.py bounds the peak
        RSS). The weights never change once loaded. Ascend keeps Parameters: weights resident in
        device memory, as MindSpore's own inference models hold them."""
        return not self.ascend_kernels

    def quant_tensors(self, qw) -> tuple:
        """A QuantWeight as the three tensors of quant_parameters (in that order)."""
        if self.ascend_kernels:
            from .ascend_quant import ascend_tensors
            return ascend_tensors(qw, self.dtype)
        from ..quant.linear import kernel_tensors
        return kernel_tensors(qw)

    def rms_norm(self, eps: float):
        if self.kernels:
            from .cpu import KernelRMSNorm
            return KernelRMSNorm(eps)
        return NativeRMSNorm(eps)

    def embedding(self, scale: float = 1.0):
        if self.kernels:
            from .cpu import KernelEmbedding
            return KernelEmbedding(scale)
        return NativeEmbedding(scale)

    def attention(self, rotary, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        """qkv [B, L, (Hq + 2 Hkv) D] -> [B, L, Hq D] over a layer's paged cache; called as
        (qkv, k_cache, v_cache, positions, slot_mapping, block_tables, block_size,
        batch_valid_length, q_seq_lens, *attention extras)."""
        if self.sparse is not None:
            if self.tp.size > 1:
                raise ValueError("InfLLM-v2 sparse attention with tensor parallelism is not supported yet")
            from ..layers.sparse import InfLLMv2Attention, check_sparse_block_size
            check_sparse_block_size(self.block_size)
            # Its own composite (or CPU kernels) over the slot-major cache, on every device.
            core = InfLLMv2Attention(self.sparse, num_heads, num_kv_heads, head_dim, self.cache_blocks, self.dtype,
                                     self.kernels, ascendc=self.ascendc_ops())
        elif self.ascend_kernels:
            check_ascend_head_dim(head_dim, self.block_size)
            from .ascend import AscendAttention
            core = AscendAttention(num_heads, num_kv_heads, scale)
        elif self.kernels:
            from .cpu import KernelAttention
            return KernelAttention(rotary, num_heads, num_kv_heads, head_dim, scale)
        else:
            core = NativeAttention()
        return SplitRopeAttention(core, rotary, num_heads, num_kv_heads, head_dim, scale)

    def moe(self):
        """The routed-expert op: Ascend's MoE kernels, or the composite of ops/moe.py."""
        if self.ascend_kernels:
            if self.tp.size > 1 and self.tp.expert_parallel:
                raise ValueError("expert parallelism is not implemented for the Ascend MoE kernels; "
                                 "leave it off to split every expert across the ranks instead")
            from .ascend_moe import AscendMoE
            return AscendMoE()
        from .moe import NativeMoE
        return NativeMoE()

    def lightning(self):
        """Lightning attention: the AscendC kernels where installed (ops/ascendc.py), else the
        composite, which runs on every device."""
        if self.ascendc_ops():
            from .ascendc import AscendCLightning
            return AscendCLightning(self.dtype)
        from .lightning import NativeLightning
        return NativeLightning()

    def ascendc_ops(self) -> bool:
        """Whether lightning attention and InfLLM-v2 run as the AscendC custom ops: with the
        Ascend kernels in 16 bits, once built and installed (without them: a one-line notice
        naming the build command, and the composites)."""
        if not self.ascend_kernels or self.dtype not in (ms.float16, ms.bfloat16):
            return False
        from . import ascendc
        return ascendc.available()

    # -- cache and step inputs ----------------------------------------------------------------
    def cache_shape(self, kv_heads: int, head_dim: int) -> tuple:
        """One layer's K (or V) cache: block-major for the Ascend kernels (the layout
        ReshapeAndCache and PagedAttention document), slot-major for the composites."""
        if self.ascend_kernels and self.sparse is None:
            return (self.cache_blocks, self.block_size, kv_heads, head_dim)
        return (self.cache_blocks * self.block_size, kv_heads, head_dim)

    def attention_extras(self) -> tuple:
        """Names of the step inputs only this device's attention core takes (after the model's)."""
        if self.sparse is not None:
            from ..layers.sparse import SPARSE_STEP_INPUTS
            return SPARSE_STEP_INPUTS
        return ()

    def step_input_names(self, model) -> tuple:
        return STEP_INPUTS + tuple(model.EXTRA_INPUTS) + self.attention_extras()

    def jit_options(self) -> dict:
        """Options of ms.jit for the compiled step. Ascend: jit_level O0 with infer_boost on,
        which ReshapeAndCache and PagedAttention need (they only have internal kernels, selected
        only with infer_boost; MindSpore's own Ascend tests of them and vllm-mindspore set it).
        CPU: infer_boost on too. Without it MindSpore's runtime prepares every weight again on every
        run of a graph (one KernelTensor copied per Parameter per step, counted with a uprobe: ~390
        a decode step of a 24-layer int8 model): a tiny 24-layer int8 model's decode step took
        13.1 ms without it and 5.4 ms with it, and MiniCPM4-0.5B int8 decoded 25 tok/s without it
        and 39 with it. With it the weights are prepared on a graph's first run only: the engine never
        replaces a Parameter after its steps have compiled (the caches are written in place)."""
        if self.ascend_kernels:
            return {"jit_level": "O0", "infer_boost": "on"}
        return {"infer_boost": "on"}

    @property
    def ops_return_early(self) -> bool:
        """Whether a compiled step's ops may return before their work is done: the fused quantized
        layers' (quant/linear.py early_returns)."""
        return self.fused_blocks and self.quant is not None

    def compiled_run(self, wait: bool = True):
        """The context a compiled step's graph runs in: the one in which ops may return early
        (ops_return_early); leaving it waits for them unless not `wait` (see wait)."""
        if self.ops_return_early:
            from ..quant.linear import early_returns
            return early_returns(wait)
        return contextlib.nullcontext()

    def wait(self) -> None:
        """Waits for the ops of a step run with compiled_run(wait=False) that returned early."""
        if self.ops_return_early:
            from ..quant.linear import wait_for_kernels
            wait_for_kernels()

    @property
    def chains_decode_steps(self) -> bool:
        """Whether a greedy decode step may start on the previous one's arg-max ids before the host
        has read them (engine/runner.py _launch_next): the fused quantized CPU layers, whose LM head
        returns early and whose embedding waits for it; not with sparse attention or across ranks."""
        return (self.ops_return_early and not self.ascend_kernels and self.kernels and self.sparse is None
                and self.tp.size == 1)

    def eager_steps(self, decode_row: bool) -> float:
        """How many steps of a new shape bucket run op by op before its graph is compiled: 0
        (compile at once), a count, or inf (never). compile_prefill=False, with the CPU kernels'
        fused decoder layers (the interactive CLIs, which must answer within seconds of starting):
        - prefill buckets never compile. Their graph costs 15-30 s on this 2-core host, more than a
          one-shot CLI's whole answer, while op by op a long prefill is up to ~2.5x slower (its
          matrix products go to MindSpore's MatMul, each op dispatched from Python; measured on 128
          tokens of MiniCPM4-0.5B);
        - decode buckets (one token per row, or a verify row) run op by op for their first
          EAGER_DECODE_STEPS steps, then compile: see there.
        The server and the benchmarks, which compile once and run many times, keep compile_prefill;
        Ascend and the composites always compile."""
        if self.compile_prefill or not self.fused_blocks:
            return 0
        return EAGER_DECODE_STEPS if decode_row else math.inf

    # -- passes over a built model ------------------------------------------------------------
    def fuse_blocks(self, model) -> None:
        """CPU kernels: each pre-norm decoder layer (h += s*attn(norm(h)); h += s*mlp(norm(h)))
        becomes two kernel ops over the same Parameters (checkpoint names unchanged), unless
        tensor parallelism splits o_proj/down, whose partial sums are reduced before the residual.
        Quantized projections: the quantized kernels' version of the same layer, except in a
        layer with GPTQ act-order weights, whose inputs are gathered into each weight's own order
        between the ops (the fused kernels read them in the layer's order), so it runs after the
        weights are loaded. A fused quantized layer whose output only the next fused layer reads
        returns before its work is done (KernelQuantDecoderLayer's returns_early); the residual
        stream a draft head keeps (aux_hidden_layers) is also read by MindSpore's own ops."""
        if not (self.kernels and self.sparse is None and self.tp.size == 1 and model.PRENORM_LAYERS):
            return
        from .cpu import KernelDecoderLayer
        from ..quant.linear import KernelQuantDecoderLayer
        fusing = [not _gathers_inputs(layer) for layer in model.layers]
        kept = set(getattr(model, "aux_hidden_layers", ()))
        for i, layer in enumerate(model.layers):
            if not fusing[i]:
                continue
            if self.quant is None:
                model.layers[i] = KernelDecoderLayer(layer)
            else:
                next_reads_alone = i + 1 < len(fusing) and fusing[i + 1] and i + 1 not in kept
                model.layers[i] = KernelQuantDecoderLayer(layer, returns_early=next_reads_alone)
            self.fused_blocks = True

    def after_load(self, model) -> None:
        """A quantized tied head quantizes the embedding (LMHead.quantize_tied). Ascend: stacked
        expert weights from the loader's [E, out, in] to GroupedMatmul's [E, in, out], once
        (never per step)."""
        for _, cell in model.cells_and_names():
            if hasattr(cell, "quantize_tied"):
                cell.quantize_tied()
        if not self.ascend_kernels:
            return
        for _, cell in model.cells_and_names():
            if hasattr(cell, "loader_parts"):
                w = cell.weight
                cell.weight = ms.Parameter(ms.Tensor(np.ascontiguousarray(np.swapaxes(_as_numpy(w), 1, 2)), w.dtype),
                                           name=w.name, requires_grad=False)


def _gathers_inputs(layer) -> bool:
    """Whether a projection of the layer reads its inputs in another order (GPTQ act-order)."""
    return any(getattr(cell, "input_perm", None) is not None for _, cell in layer.cells_and_names())


def _as_numpy(param) -> np.ndarray:
    """A parameter's values as numpy (bf16 has no numpy dtype: widened to fp32)."""
    if param.dtype == ms.bfloat16:
        return param.astype(ms.float32).asnumpy()
    return param.asnumpy()


def check_ascend_block_size(block_size: int) -> None:
    if block_size not in ASCEND_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not supported by Ascend's PagedAttention; "
                         f"choose one of {', '.join(map(str, ASCEND_BLOCK_SIZES))}")


def check_ascend_head_dim(head_dim: int, block_size: int) -> None:
    if head_dim % 16 or head_dim > ASCEND_MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported by Ascend's FlashAttentionScore "
                         f"(a multiple of 16, at most {ASCEND_MAX_HEAD_DIM})")
    if head_dim * block_size > ASCEND_MAX_BLOCK_ELEMENTS:
        raise ValueError(f"head_dim {head_dim} x block_size {block_size} exceeds Ascend's PagedAttention "
                         f"limit of {ASCEND_MAX_BLOCK_ELEMENTS}; use a smaller block_size")
