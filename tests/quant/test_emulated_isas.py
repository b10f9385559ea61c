"""The quantized kernel's AVX-512 and AVX-512 VNNI paths, checked on a CPU without them: the kernel
is rebuilt with SIMDe's portable implementations of the AVX-512 intrinsics (MINDCPM_EMULATE_AVX512=1,
the simde-py package), and test_linear.py's tests of those paths (each against numpy, and the
int16 ones against the scalar path within the rounding bound) run on that build in a child process,
since a process loads the kernel library once. This checks the paths' text (layouts, lanes,
masks); the instructions themselves, and the compiler's code for them, only run on such a CPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ms = pytest.importorskip("mindspore")

from mindcpm.ops import cpu_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(), reason="no g++ to build the CPU kernels")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_avx512_paths_on_emulated_instructions():
    from mindcpm.quant.linear import kernel_isa
    native = kernel_isa()
    if native == "avx512vnni":
        pytest.skip("this CPU runs the AVX-512 VNNI path itself (test_linear.py)")
    if native == "scalar":
        pytest.skip("the emulation builds on AVX2, which this CPU lacks")
    # conftest.py drops the caller's MINDCPM_* variables but those named in MINDCPM_TEST_KEEP;
    # test_linear.py's test_emulation_reaches_the_build checks that the flag reached the build.
    env = dict(os.environ, MINDCPM_EMULATE_AVX512="1", MINDCPM_TEST_KEEP="MINDCPM_EMULATE_AVX512")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/quant/test_linear.py",
           "-k", "avx512 or int16 or emulation", "-rs"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    # Every selected test ran (none skipped for a missing path, the emulation's own check among
    # them): 46 per AVX-512 path plus the int16 ones.
    assert passed and int(passed.group(1)) >= 2 * 46 + 1 and "skipped" not in summary, summary
