"""Session set-up shared by every test: a run must not depend on the machine's state or the
caller's environment.

Runs at import, before anything imports mindspore:
- MS_DEV_LAUNCH_BLOCKING=1: synchronous launches give correct error attribution and are the fast
  PyNative path on CPU.
- MindSpore 2.10's compile cache keys graphs by compile order, not by shapes or model, and
  silently loads wrong graphs (docs/mindspore_cpu.md#compile-cache): forced off, whatever the
  caller exported.
- Every MINDCPM_* variable of the caller is dropped (tests that want one set it themselves),
  except those a test's child process is given by name in MINDCPM_TEST_KEEP (comma-separated):
  test_emulated_isas.py's child keeps MINDCPM_EMULATE_AVX512.
- MINDCPM_CACHE points at ONE fresh temporary directory for the whole session: GGUF imports and
  kernel builds start cold, so a change to gguf.py or a kernel is always exercised, and the
  kernels are built once per session, not once per test. Tests of cache behaviour take the
  `fresh_cache` fixture, which gives them their own empty one.
"""
import os
import shutil
import sys
import tempfile

import pytest

_KEEP = set(os.environ.get("MINDCPM_TEST_KEEP", "").split(","))
for _name in [n for n in os.environ if n.startswith("MINDCPM_") and n not in _KEEP]:
    del os.environ[_name]
os.environ.pop("MS_COMPILER_CACHE_PATH", None)
os.environ["MS_COMPILER_CACHE_ENABLE"] = "0"
os.environ.setdefault("MS_DEV_LAUNCH_BLOCKING", "1")
os.environ.setdefault("GLOG_v", "3")
SESSION_CACHE = tempfile.mkdtemp(prefix="mindcpm-test-cache-")
os.environ["MINDCPM_CACHE"] = SESSION_CACHE
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty MINDCPM_CACHE of the test's own (for tests of the cache itself)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MINDCPM_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """The ModelConfig of the tests' tiny random Llama (tests/tiny.py), one per test module."""
    from mindcpm.config import ModelConfig
    from tests.tiny import make_tiny_model
    return ModelConfig.from_dir(make_tiny_model(str(tmp_path_factory.mktemp("tiny"))))


@pytest.fixture
def fp32_gemm():
    """Prefill's GEMM with x as it is (MINDCPM_QUANT_GEMM=fp32): then only fp32 accumulation order
    separates a quantized model from transformers on its dequantized weights. The default rounds x
    to int16 (tests/quant/test_quantized_model.py: test_int16_activations_...)."""
    from mindcpm.quant import linear
    before = linear.gemm_activations()
    linear.set_gemm_activations("fp32")
    yield
    linear.set_gemm_activations(before)
