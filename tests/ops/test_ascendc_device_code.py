"""The AscendC device code (kernels_aclnn/*/op_kernel/*.cpp with ascendc_common/ascendc_layer.h)
type-checked by g++ against tests/ascendc_stub/kernel_operator.h, the AscendC prototypes as the
API pages cited in ascendc_layer.h document them. It catches calls that do not match those
prototypes (names, arity, const-ness, template arguments) in the code the tests' emulation never
compiles; it does not replace CANN's compiler."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

from tests.ascendc_emu import ROOT, include_dirs
from tests.paths import TESTS

STUB = os.path.join(TESTS, "ascendc_stub")


@pytest.mark.parametrize("dtype", ["half", "bfloat16_t"])
def test_device_code_matches_the_documented_prototypes(dtype, tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no g++")
    kernels = sorted(glob.glob(os.path.join(ROOT, "*", "op_kernel", "*.cpp")))
    assert len(kernels) == 4
    unit = tmp_path / "all_kernels.cpp"  # one translation unit: the four entry points differ in name
    unit.write_text("".join(f'#include "{k}"\n' for k in kernels))
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-DDTYPE_Q={dtype}", f"-I{STUB}",
           *(f"-I{d}" for d in include_dirs()), str(unit)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[:3000]
