"""Builds and loads the C++ CPU kernels of kernels_aclnn/<op>/cpu.cc as MindSpore custom ops.

Each op folder's cpu.cc is compiled with g++ at first use into a shared library cached under
~/.cache/mindcpm/kernels (MINDCPM_CACHE moves it), keyed by a hash of the source, the flags
and the compiler, so an edited kernel or another machine's CPU never reuses a stale build.
The build uses AVX2/FMA/F16C only when this CPU has them, else a portable -O3 build (the
kernels keep scalar paths for that). With no working g++, kernels_available() is False (with a
one-line notice) and callers keep MindSpore's native ops. A source that fails to compile under a
working g++ is a bug in the package, not a missing tool: KernelSourceError, never a fallback.
kernel_uses() tells which kernels MindSpore actually put to work (the tests read it).

    op = aot_op("linear", "Linear", lambda x, w: [x[0], w[0]], lambda x, w: x)
    y = op(x, w)                 # PyNative or inside a jit graph

Kernels follow MindSpore's AOT signature (inputs first, then outputs, in params):
    extern "C" int Fn(int nparam, void **params, int *ndims, int64_t **shapes,
                      const char **dtypes, void *stream, void *extra)
"""
from __future__ import annotations

import collections
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from mindspore import ops

KERNELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "kernels_aclnn")
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno")
SIMD_FLAGS = ("-mavx2", "-mfma", "-mf16c")


class KernelBuildError(RuntimeError):
    """The CPU kernels cannot be built here (no working C++ compiler, no writable cache). Callers
    may fall back."""


class KernelSourceError(RuntimeError):
    """A kernel's source failed to compile with a working compiler: a bug, never a reason to fall
    back (so deliberately not a KernelBuildError). One line: the first compiler error and the log."""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Tests only: MINDCPM_EMULATE_AVX512=1 builds these ops' AVX-512 paths on SIMDe's portable
# intrinsics (the simde-py package's headers), so a CPU with AVX2 only runs and checks them.
EMULATED_AVX512_OPS = ("quant_linear",)


@functools.lru_cache(maxsize=None)
def compile_flags(op_name: str = "") -> tuple[str, ...]:
    simd = SIMD_FLAGS if {"avx2", "fma", "f16c"} <= _cpu_flags() else ()
    return BASE_FLAGS + simd + (_emulation_flags() if simd and op_name in EMULATED_AVX512_OPS else ())


def _emulation_flags() -> tuple[str, ...]:
    if os.environ.get("MINDCPM_EMULATE_AVX512") != "1":
        return ()
    try:
        import simde_py
    except ImportError:
        raise KernelBuildError("MINDCPM_EMULATE_AVX512=1 needs the simde-py package (requirements-test.txt)") \
            from None
    return ("-DMINDCPM_EMULATE_AVX512", "-I" + simde_py.get_include(), "-Wno-psabi")


@functools.lru_cache(maxsize=None)
def _compiler_version() -> str | None:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else None


def cache_dir() -> str:
    base = os.environ.get("MINDCPM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mindcpm")
    return os.path.join(base, "kernels")


def _common_files() -> list[str]:
    common = os.path.join(KERNELS_DIR, "common")
    return sorted(os.path.join(common, n) for n in os.listdir(common)) if os.path.isdir(common) else []


RUNTIME = "common/runtime.cc"  # the shared thread pool every op library links


def source_path(op_name: str) -> str:
    return os.path.join(KERNELS_DIR, op_name, "cpu.cc")


@functools.lru_cache(maxsize=None)
def build(op_name: str) -> str:
    """Compiles kernels_aclnn/<op_name>/cpu.cc once (per source, flags and compiler); returns the .so path."""
    src = source_path(op_name)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"no CPU kernel source for op {op_name!r}: {src}")
    runtime = os.path.join(KERNELS_DIR, RUNTIME)
    if not os.path.isfile(runtime):
        return _compile(src, op_name, [])
    # Linked by absolute path, so the process loads the runtime (and its pool) exactly once.
    return _compile(src, op_name, [_compile(runtime, "runtime", [])])


def _compile(src: str, name: str, libs: list[str]) -> str:
    version = _compiler_version()
    if version is None:
        raise KernelBuildError("no working C++ compiler (g++) for the CPU kernels")
    source = b""
    for path in (src, *_common_files()):
        with open(path, "rb") as f:
            source += f.read()
    flags = compile_flags(name)
    key = hashlib.sha256(source + "\0".join(flags + tuple(libs)).encode() + version.encode()).hexdigest()[:16]
    lib = os.path.join(cache_dir(), f"{name}-{key}.so")
    if os.path.isfile(lib):
        return lib
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        # Build to a private name and rename: concurrent processes never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    except OSError as e:  # like a missing compiler: nothing wrong with the kernels
        raise KernelBuildError(f"cannot write the kernel cache {cache_dir()} ({e}); MINDCPM_CACHE moves it") \
            from None
    os.close(fd)
    cmd = [shutil.which(os.environ.get("CXX", "g++")), *flags, src, *libs, "-o", tmp]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        os.unlink(tmp)
        log = lib[:-len(".so")] + ".log"
        with open(log, "w", encoding="utf-8") as f:
            f.write(" ".join(cmd) + "\n" + out.stderr)
        raise KernelSourceError(f"compiling {src} failed: {_first_error(out.stderr)} (full log: {log}; "
                                "kernels='off' or MINDCPM_KERNELS=off runs MindSpore's own ops instead)")
    os.replace(tmp, lib)
    return lib


def _first_error(stderr: str) -> str:
    lines = stderr.splitlines()
    return next((line.strip() for line in lines if "error" in line), lines[0].strip() if lines else "no output")


def kernels_requested(setting: str = "auto") -> bool:
    """Resolves the user's switch ("auto" | "on" | "off"; env MINDCPM_KERNELS=off overrides)
    to whether the CPU kernels are used. "on" with no compiler is an error."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"unknown kernels setting {setting!r}; choose auto, on or off")
    if os.environ.get("MINDCPM_KERNELS", "").lower() in ("off", "0", "false") or setting == "off":
        return False
    if setting == "on" and not kernels_available():
        raise RuntimeError("kernels='on' needs the CPU kernels, but g++ cannot build them here")
    return kernels_available()


@functools.lru_cache(maxsize=None)
def kernels_available() -> bool:
    """True when the CPU kernels can be built (the probe op compiles); False, with a one-line
    notice, when they cannot be built here (no working g++). A probe source that does not compile
    raises."""
    try:
        build("linear")
    except KernelBuildError as e:
        print(f"mindcpm: {e}; MindSpore's own (slower) CPU ops run instead", file=sys.stderr, flush=True)
        return False
    return True


# "op:Function" -> how often MindSpore inferred that kernel's output shape: at each launch in
# PyNative, at the compilation of each graph holding it (not per run: the hot path pays nothing).
_inferred: collections.Counter = collections.Counter()


def kernel_uses() -> collections.Counter:
    """A copy of the use counts: `kernel_uses() - before` names the kernels that ran since `before`
    (rather than a MindSpore fallback)."""
    return collections.Counter(_inferred)


def aot_op(op_name: str, func_name: str, out_shape_fn, out_dtype_fn) -> ops.Custom:
    """A MindSpore custom op running function `func_name` of kernels_aclnn/<op_name>/cpu.cc.
    out_shape_fn / out_dtype_fn take the inputs' shapes / dtypes and return the output's
    (lists of them for several outputs)."""
    key = f"{op_name}:{func_name}"

    def out_shape(*shapes):
        _inferred[key] += 1
        return out_shape_fn(*shapes)
    return ops.Custom(f"{build(op_name)}:{func_name}", out_shape=out_shape, out_dtype=out_dtype_fn, func_type="aot")
