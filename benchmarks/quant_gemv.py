"""Decode GEMV microbenchmark of the quantized linear kernel against the bf16 linear kernel.

Calls the kernels directly (ctypes, MindSpore's AOT signature) on the weights of every layer of
a model shape in turn, so they stream from memory as in decode, and reports per format the
bytes streamed a pass (codes + scales + offsets), the time of a pass and GB/s. Formats are
interleaved, repeat after repeat, so a busy machine slows them alike; medians are reported.

    python benchmarks/quant_gemv.py                     # MiniCPM4-0.5B: H 1024, I 4096, 24 layers
    python benchmarks/quant_gemv.py --rows 16 --repeats 5
    python benchmarks/quant_gemv.py --quant-lib saved/quant_linear.so   # an earlier build, for before/after
    python benchmarks/quant_gemv.py --isa avx2,avx512vnni --rows 16     # instruction sets side by side
    MINDCPM_KERNEL_THREADS=1 python benchmarks/quant_gemv.py --layers 1  # one core, a weight set in L2/L3
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mindcpm.ops.cpu_kernels import build  # noqa: E402

# (bits, group, scale dtype, asymmetric); None = the bf16 linear kernel
FORMATS = {
    "bf16": None,
    "int8 per-channel": (8, 0, "float32", False),
    "int8 per-channel f16 (--quantization int8)": (8, 0, "float16", False),
    "int8 g32 (Q8_0)": (8, 32, "float16", False),
    "int4 g32 (Q4_0)": (4, 32, "float16", False),
    "int4 g32 asym (Q4_1)": (4, 32, "float16", True),
    "int4 g128 asym bf16": (4, 128, "bfloat16", True),
    "int4 g128 (--quantization int4)": (4, 128, "float16", False),
    "ternary 2-bit per-row": (2, 0, "bfloat16", False),
}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def layer_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> list[tuple[int, int]]:
    """[N, K] of a decoder layer's projections: q|k|v, o, gate|up, down."""
    head_dim = hidden // heads
    return [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * intermediate, hidden),
            (hidden, intermediate)]


class Call:
    """One kernel call with its arguments marshalled once: (x, inputs..., y) in AOT form."""

    def __init__(self, fn, arrays: list[np.ndarray], dtypes: list[str]):
        self.arrays = arrays  # kept alive
        n = len(arrays)
        self.params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
        self.ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
        self.shapes_kept = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
        self.shapes = (ctypes.POINTER(ctypes.c_int64) * n)(
            *[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in self.shapes_kept])
        self.dtypes = (ctypes.c_char_p * n)(*[d.encode() for d in dtypes])
        self.fn, self.n = fn, n

    def __call__(self):
        if self.fn(self.n, self.params, self.ndims, self.shapes, self.dtypes, None, None) != 0:
            raise RuntimeError("kernel refused its arguments")


def weights(rng, fmt, n: int, k: int) -> tuple[list[np.ndarray], list[str], int]:
    """The kernel inputs after x for one [N, K] weight, their dtypes, and the bytes streamed."""
    if fmt is None:  # bf16 bits of normal values in [2^-7, 1): no denormals
        w = rng.integers(0x3C00, 0x3F80, (n, k), dtype=np.uint16)
        return [w], ["bfloat16"], w.nbytes
    bits, group, dtype, asym = fmt
    groups = k // (group or k)
    packed = rng.integers(0, 256, (n, k * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, groups)).astype(np.float32)
    scales = (scales.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else scales.astype(dtype)
    offsets = -scales * 8 if asym and dtype != "bfloat16" else (scales.copy() if asym else np.zeros(1, np.float32))
    nbytes = packed.nbytes + scales.nbytes + (offsets.nbytes if asym else 0)
    return [packed, scales, offsets], ["uint8", dtype, dtype if asym else "float32"], nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (1 = decode of one sequence)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--passes", type=int, default=5, help="passes over all layers a repeat")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of: " + ", ".join(FORMATS))
    ap.add_argument("--isa", default="auto", help="comma-separated instruction sets of the quantized kernel to "
                                                  "interleave (auto, scalar, avx2, avx512, avx512vnni)")
    ap.add_argument("--quant-lib", help="a saved build of the quant_linear kernel to time instead of this tree's "
                                        "(a before/after comparison of a kernel change)")
    args = ap.parse_args()
    names = [f.strip() for f in args.formats.split(",")]
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        print(f"error: unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    linear = ctypes.CDLL(build("linear"))
    if args.quant_lib and not os.path.isfile(args.quant_lib):
        print(f"error: no kernel library at {args.quant_lib}", file=sys.stderr)
        return 2
    quant = ctypes.CDLL(args.quant_lib or build("quant_linear"))
    quant.QuantLinearIsa.restype = ctypes.c_char_p
    isas, shown = [i.strip() for i in args.isa.split(",")], {}
    for isa in isas:
        if quant.QuantLinearSetIsa(isa.encode()) != 0:
            print(f"error: instruction set {isa!r} is unknown or this CPU lacks it", file=sys.stderr)
            return 2
        shown[isa] = isa if isa != "auto" else "auto:" + quant.QuantLinearIsa().decode()
    rng = np.random.default_rng(0)
    shapes = layer_shapes(args.hidden, args.intermediate, args.heads, args.kv_heads)
    calls, streamed = {}, {}
    for name in names:
        fmt = FORMATS[name]
        fn = linear.Linear if fmt is None else quant.QuantLinear
        calls[name], streamed[name] = [], 0
        for _ in range(args.layers):
            for n, k in shapes:
                x = rng.standard_normal((args.rows, k)).astype(np.float32)
                inputs, dtypes, nbytes = weights(rng, fmt, n, k)
                y = np.empty((args.rows, n), np.float32)
                calls[name].append(Call(fn, [x, *inputs, y], ["float32", *dtypes, "float32"]))
                streamed[name] += nbytes
    # Each row: a format on an instruction set (the bf16 kernel has one).
    rows = [(name, isa) for name in names for isa in (isas if FORMATS[name] else ["-"])]
    for name in names:  # warm-up: huge pages, the pool, page faults
        for call in calls[name]:
            call()
    times = {row: [] for row in rows}
    for _ in range(args.repeats):
        for row in rows:
            if row[1] != "-":
                quant.QuantLinearSetIsa(row[1].encode())
            start = time.perf_counter()
            for _ in range(args.passes):
                for call in calls[row[0]]:
                    call()
            times[row].append((time.perf_counter() - start) / args.passes)
    macs = args.rows * args.layers * sum(n * k for n, k in shapes)
    print(f"{args.layers} layers of {shapes} [N, K]; rows {args.rows}; "
          f"threads {os.environ.get('MINDCPM_KERNEL_THREADS', 'all')}; median of {args.repeats}")
    width = max(len(n) for n in names)
    print(f"{'format':{width}s} {'ISA':>15s} {'MB a pass':>10s} {'ms a pass':>10s} {'GB/s':>7s} {'GMAC/s':>7s} "
          f"{'vs first':>8s}")
    base = statistics.median(times[rows[0]])
    for name, isa in rows:
        t = statistics.median(times[(name, isa)])
        print(f"{name:{width}s} {shown.get(isa, isa):>15s} {streamed[name] / 1e6:10.1f} {t * 1e3:10.2f} "
              f"{streamed[name] / t / 1e9:7.1f} {macs / t / 1e9:7.1f} {base / t:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
