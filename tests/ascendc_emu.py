"""The AscendC kernels' CPU emulation (kernels_aclnn/ascendc_common/emu_*.cc) built with g++ and
called through ctypes: the shipped algorithm headers instantiated with the emulated primitive
layer, which enforces the 910B's UB size, 32-byte DataCopy blocks, queue use and pipe flags.

    lib = emu_library()                          # every op, cached per source hash and macros
    lib = emu_library("MUTATE_DECAY_EXPONENT", part="lightning")  # one op's build with a bug injected
    o = lightning_decode(lib, BF16, q, k, v, slopes, pool, slots, positions)   # the ops, on numpy

The op functions take and return numpy arrays laid out as the ops' inputs (kernels_aclnn/*/op_host
and the README); 16-bit activations travel as uint16 bit patterns with dtype FP16 or BF16, and
state_pool is updated in place, as on the device. `cores` is the vector-core count to split over.
Outputs start as NaN / -1, so an element the kernel fails to write shows in any comparison.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels_aclnn")
PARTS = {"all": ("emu_lightning.cc", "emu_infllm.cc", "emu_cast.cc", "tiling_grid.cc"),
         "lightning": ("emu_lightning.cc",), "infllm": ("emu_infllm.cc",),
         "aot": ("emu_lightning.cc", "emu_infllm.cc", "emu_aot.cc")}  # MindSpore custom ops: ascendc_standins.py
FP16, BF16 = 0, 1


class EmuError(RuntimeError):
    """The tiling refused the shape (code 1) or the emulation caught a rule violation (code 2)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{'tiling refused' if code == 1 else 'AscendC rule violated'}: {message}")
        self.code = code


def include_dirs() -> list[str]:
    """The flat include layout CANN's op project uses: ascendc_common and every op_host/op_kernel."""
    return [os.path.join(ROOT, "ascendc_common"), *sorted(glob.glob(os.path.join(ROOT, "*", "op_host"))),
            *sorted(glob.glob(os.path.join(ROOT, "*", "op_kernel")))]


def _headers() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "*", "op_*", "*.h")) + glob.glob(os.path.join(ROOT, "ascendc_common", "*")))


@functools.lru_cache(maxsize=None)
def emu_library(*macros: str, part: str = "all") -> ctypes.CDLL | None:
    """The emulation of PARTS[part] built with -D<macro> for each macro; None without g++."""
    path = emu_library_path(*macros, part=part)
    return None if path is None else ctypes.CDLL(path)


def emu_library_path(*macros: str, part: str = "all") -> str | None:
    """The shared library of emu_library, built if needed; None without g++.
    -O1: the emulated kernels run in well under a second, the build dominates."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    from mindcpm.ops.cpu_kernels import cache_dir
    digest = hashlib.sha256("\0".join((part, *macros)).encode())
    for path in _headers():
        with open(path, "rb") as f:
            digest.update(f.read())
    lib = os.path.join(cache_dir(), f"ascendc-emu-{digest.hexdigest()[:16]}.so")
    if not os.path.isfile(lib):
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
        os.close(fd)
        cmd = [cxx, "-O1", "-std=c++17", "-shared", "-fPIC", *(f"-D{m}" for m in macros),
               *(f"-I{d}" for d in include_dirs()),
               *(os.path.join(ROOT, "ascendc_common", s) for s in PARTS[part]), "-o", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError("building the AscendC emulation failed:\n" + "\n".join(out.stderr.splitlines()[:30]))
        os.replace(tmp, lib)
    return lib


def library_or_skip() -> ctypes.CDLL:
    """The full emulation, or the calling test skipped when there is no g++."""
    import pytest
    built = emu_library()
    if built is None:
        pytest.skip("no g++ for the AscendC emulation")
    return built


def _ptr(a: np.ndarray):
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


def call(lib, name: str, *args) -> int:
    """Calls an emulation entry (its last three arguments ubUsed, err, errLen are added);
    returns the largest UB a core placed; raises EmuError on a refusal or violation."""
    used = ctypes.c_int64(0)
    err = ctypes.create_string_buffer(512)
    conv = [_ptr(a) if isinstance(a, np.ndarray) else ctypes.c_int64(a) for a in args]
    fn = getattr(lib, name)
    fn.restype = ctypes.c_int
    code = fn(*conv, ctypes.byref(used), err, ctypes.c_int64(len(err)))
    if code:
        raise EmuError(code, err.value.decode())
    return used.value


# -- 16-bit activations, rounded in numpy independently of the emulation -------------------------
def to_bits(x: np.ndarray, dtype: int) -> np.ndarray:
    """x rounded to fp16 / bf16 (nearest even), as uint16 bit patterns."""
    x = np.ascontiguousarray(x, np.float32)
    if dtype == FP16:
        return x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bits(bits: np.ndarray, dtype: int) -> np.ndarray:
    """The float64 values of fp16 / bf16 bit patterns."""
    if dtype == FP16:
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


# -- the four ops ------------------------------------------------------------------------------------
def _i32(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.int32)


def lightning_decode(lib, dtype, q, k, v, slopes, state_pool, state_slots, positions, cores=48) -> np.ndarray:
    """q/k/v bits [B, H, D]; slopes [H] fp32; state_pool [S, H, D, D] fp32 -> o [B, H*D] fp32."""
    b, h, d = q.shape
    out = np.full((b, h * d), np.nan, np.float32)
    call(lib, "LightningDecodeEmu", dtype, b, h, d, state_pool.shape[0], cores, q, k, v, slopes, state_pool,
         _i32(state_slots), _i32(positions), out)
    return out


def lightning_prefill(lib, dtype, q, k, v, slopes, state_pool, state_slots, positions, cores=48) -> np.ndarray:
    """q/k/v bits [B, L, H, D]; positions [B, L] (padding trailing) -> o [B, L, H*D] fp32."""
    b, l, h, d = q.shape
    out = np.full((b, l, h * d), np.nan, np.float32)
    call(lib, "LightningPrefillEmu", dtype, b, l, h, d, state_pool.shape[0], cores, q, k, v, slopes, state_pool,
         _i32(state_slots), _i32(positions), out)
    return out


def infllm_block_select(lib, dtype, q, c1_cache, c2_cache, positions, c1_table, c2_table, meta,
                        cores=48) -> np.ndarray:
    """q bits [B, L, Hq, D]; c1/c2 caches bits [E, Hkv, D]; meta fp32 [7] = scale, init_blocks,
    window_blocks, topk, dense_len, current, repeat -> selected [B, Hkv, L, (N1 + 1) / 4] int32."""
    b, l, hq, d = q.shape
    hkv, n1, n2 = c1_cache.shape[1], c1_table.shape[1], c2_table.shape[1]
    out = np.full((b, hkv, l, (n1 + 1) // 4), -1, np.int32)
    call(lib, "InfllmSelectEmu", dtype, b, l, hq, hkv, d, c1_cache.shape[0], n1, n2, cores, q, c1_cache, c2_cache,
         _i32(positions), _i32(c1_table), _i32(c2_table), np.asarray(meta, np.float32), out)
    return out


def infllm_sparse_attention(lib, dtype, q, k_cache, v_cache, positions, block_tables, selected, scale, page_size,
                            cores=48) -> np.ndarray:
    """q bits [B, L, Hq, D]; k/v caches bits [S, Hkv, D] -> out bits [B, L, Hq*D] (q's dtype)."""
    b, l, hq, d = q.shape
    out = np.full((b, l, hq * d), 0xFFFF, np.uint16)  # NaN in fp16 and bf16
    call(lib, "InfllmAttentionEmu", dtype, b, l, hq, k_cache.shape[1], d, k_cache.shape[0], block_tables.shape[1],
         page_size, selected.shape[-1], cores, q, k_cache, v_cache, _i32(positions), _i32(block_tables),
         _i32(selected), np.array([scale], np.float32), out)
    return out
