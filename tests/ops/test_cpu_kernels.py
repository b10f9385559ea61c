"""The C++ CPU kernels (kernels_aclnn/*/cpu.cc) against numpy written from the math, on random
inputs with odd sizes; the loader's build cache; the in-place KV-cache write in graph mode.
Every kernel source must compile, and each test checks that the kernels it means are the ones
that ran (kernel_uses), not MindSpore's fallback ops."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Parameter, Tensor, nn  # noqa: E402

from mindcpm.ops import cpu_kernels  # noqa: E402

# A kernel source that fails to compile raises here (KernelSourceError): collection fails.
pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(), reason="no g++ to build the CPU kernels")

WEIGHT_DTYPES = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16}


def as_stored(w: np.ndarray, dtype: str) -> tuple[Tensor, np.ndarray]:
    """The weight as the kernel receives it, and its exact fp32 value (after rounding to 16 bits)."""
    t = Tensor(w, WEIGHT_DTYPES[dtype])
    return t, t.astype(ms.float32).asnumpy()


def silu(x):
    return x / (1 + np.exp(-x))


@pytest.fixture
def ran():
    """ran() -> the kernels ("op:Function") MindSpore launched or compiled into a graph since the
    test began."""
    before = cpu_kernels.kernel_uses()
    return lambda: set(cpu_kernels.kernel_uses() - before)


def takes_matmul(rows: int, dtype: str) -> bool:
    """Prefill-sized rows with fp32 weights go to MindSpore's MatMul (ops/cpu.py KernelMatmul)."""
    from mindcpm.ops.cpu import KernelMatmul
    return rows >= KernelMatmul.GEMM_ROWS and dtype == "float32"


# -- linear ----------------------------------------------------------------------------------------
# (1, 40, 1001): a decode row over many guided claims, each with its remainder of units.
SHAPES = [(1, 64, 24), (1, 33, 13), (1, 40, 1001), (3, 37, 19), (2, 100, 7), (17, 72, 130), (5, 8, 1)]


@pytest.mark.parametrize("dtype", list(WEIGHT_DTYPES))
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_linear_epilogues_match_numpy(dtype, m, k, n, ran):
    from mindcpm.ops.cpu import KernelMatmul
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w_t, w = as_stored(rng.standard_normal((2 * n, k)).astype(np.float32), dtype)
    r = rng.standard_normal((m, 2 * n)).astype(np.float32)
    y = x.astype(np.float64) @ w.astype(np.float64).T
    tol = dict(rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(KernelMatmul("plain")(Tensor(x), w_t).asnumpy(), y, **tol)
    np.testing.assert_allclose(KernelMatmul("residual", 0.37)(Tensor(x), w_t, Tensor(r)).asnumpy(), r + 0.37 * y,
                               **tol)
    np.testing.assert_allclose(KernelMatmul("swiglu")(Tensor(x), w_t).asnumpy(), silu(y[:, :n]) * y[:, n:], **tol)
    assert ran() == {"linear:Linear", "linear:LinearResidual", "linear:LinearSwiglu"}


def rms_norm_ref(x, g, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


@pytest.mark.parametrize("dtype", list(WEIGHT_DTYPES))
@pytest.mark.parametrize("m,k,n", SHAPES + [(70, 40, 9)])  # 70 rows: fp32 takes the norm kernel + MatMul
def test_norm_fused_into_linear_matches_numpy(dtype, m, k, n, ran):
    from mindcpm.ops.cpu import KernelMatmul
    rng = np.random.default_rng(m + 7 * k + n)
    x = (3 * rng.standard_normal((m, k))).astype(np.float32)
    g = rng.uniform(0.5, 1.5, k).astype(np.float32)
    w_t, w = as_stored(rng.standard_normal((2 * n, k)).astype(np.float32), dtype)
    y = rms_norm_ref(x, g, 1e-5) @ w.astype(np.float64).T
    tol = dict(rtol=1e-5, atol=1e-4)
    got = KernelMatmul("plain", norm_eps=1e-5)(Tensor(x), w_t, None, Tensor(g)).asnumpy()
    np.testing.assert_allclose(got, y, **tol)
    got = KernelMatmul("swiglu", norm_eps=1e-5)(Tensor(x), w_t, None, Tensor(g)).asnumpy()
    np.testing.assert_allclose(got, silu(y[:, :n]) * y[:, n:], **tol)
    assert ran() == ({"rms_norm:RmsNorm"} if takes_matmul(m, dtype)
                     else {"linear:RmsNormLinear", "linear:RmsNormLinearSwiglu"})


@pytest.mark.parametrize("dtype", list(WEIGHT_DTYPES))
@pytest.mark.parametrize("m,k,i", SHAPES + [(70, 40, 9)])  # 70 rows: fp32 takes the two projections apart
def test_mlp_block_kernel_matches_numpy(dtype, m, k, i, ran):
    from mindcpm.ops.cpu import KernelMatmul, KernelSwigluMlp
    rng = np.random.default_rng(m + 11 * k + i)
    x = (3 * rng.standard_normal((m, k))).astype(np.float32)
    r = rng.standard_normal((m, k)).astype(np.float32)
    g = rng.uniform(0.5, 1.5, k).astype(np.float32)
    wgu_t, wgu = as_stored(rng.standard_normal((2 * i, k)).astype(np.float32), dtype)
    wd_t, wd = as_stored(rng.standard_normal((k, i)).astype(np.float32), dtype)
    y = rms_norm_ref(x, g, 1e-5) @ wgu.astype(np.float64).T
    want = r + 0.37 * (silu(y[:, :i]) * y[:, i:]) @ wd.astype(np.float64).T
    block = KernelSwigluMlp(KernelMatmul("swiglu", norm_eps=1e-5), KernelMatmul("residual", 0.37))
    got = block(Tensor(x), Tensor(g), wgu_t, wd_t, Tensor(r)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert ran() == ({"rms_norm:RmsNorm"} if takes_matmul(m, dtype) else {"linear:RmsNormSwigluMlp"})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_weight_moved_to_huge_pages_keeps_its_values(dtype, ran):
    """Weights of 2 MiB and more are remapped onto huge pages at the kernel's first call
    (MADV_COLLAPSE where the OS has it): the products must not change, then or after."""
    from mindcpm.ops.cpu import KernelMatmul
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 1030)).astype(np.float32)
    w_t, w = as_stored(rng.standard_normal((2600, 1030)).astype(np.float32), dtype)  # 5-10 MiB
    want = x.astype(np.float64) @ w.astype(np.float64).T
    for _ in range(2):
        np.testing.assert_allclose(KernelMatmul()(Tensor(x), w_t).asnumpy(), want, rtol=1e-5, atol=1e-4)
    assert ran() == {"linear:Linear"}


def test_linear_keeps_leading_dims(ran):
    from mindcpm.ops.cpu import KernelMatmul
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    w = rng.standard_normal((9, 16)).astype(np.float32)
    y = KernelMatmul()(Tensor(x), Tensor(w)).asnumpy()
    assert y.shape == (2, 3, 9)
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
    assert ran() == {"linear:Linear"}


# -- norm and embedding --------------------------------------------------------------------------
@pytest.mark.parametrize("rows,h", [(1, 64), (3, 37), (20, 100)])
def test_rms_norm_matches_numpy(rows, h, ran):
    from mindcpm.ops.cpu import KernelRMSNorm
    rng = np.random.default_rng(rows + h)
    x = rng.standard_normal((rows, h)).astype(np.float32) * 3
    w = rng.standard_normal(h).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(KernelRMSNorm(1e-5)(Tensor(x), Tensor(w)).asnumpy(), ref, rtol=1e-5, atol=1e-5)
    assert ran() == {"rms_norm:RmsNorm"}


@pytest.mark.parametrize("dtype", list(WEIGHT_DTYPES))
def test_embedding_matches_numpy(dtype, ran):
    from mindcpm.ops.cpu import KernelEmbedding
    rng = np.random.default_rng(2)
    table_t, table = as_stored(rng.standard_normal((11, 13)).astype(np.float32), dtype)
    ids = np.array([[0, 10, 3], [3, 7, 1]], np.int32)
    out = KernelEmbedding(1.5)(Tensor(ids), table_t).asnumpy()
    np.testing.assert_allclose(out, table[ids] * 1.5, rtol=1e-6)
    assert ran() == {"embedding:Embedding"}


# -- RoPE + paged attention ----------------------------------------------------------------------
def rope_ref(x, cos, sin):
    """NeoX rotate-half over the tables' width; dims past it pass through (partial RoPE)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    return np.concatenate([rot * cos + np.concatenate([-rot[..., half:], rot[..., :half]], -1) * sin, rest], -1)


def attention_ref(qkv, cos, sin, positions, slots, tables, k_cache, v_cache, hq, hkv, d, bs, scale):
    """Writes the rotated K and V of every real token, then each query attends to keys
    0..position of its row's block table."""
    b, l, _ = qkv.shape
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    q = qkv[..., : hq * d].reshape(b, l, hq, d)
    k = qkv[..., hq * d: (hq + hkv) * d].reshape(b, l, hkv, d)
    v = qkv[..., (hq + hkv) * d:].reshape(b, l, hkv, d)
    out = np.zeros((b, l, hq, d))
    for i in range(b):
        for t in range(l):
            p = positions[i, t]
            if p >= 0:
                k_cache[slots[i * l + t]] = rope_ref(k[i, t], cos[p], sin[p])
                v_cache[slots[i * l + t]] = v[i, t]
    for i in range(b):
        for t in range(l):
            p = positions[i, t]
            if p < 0:
                continue
            key_slots = [tables[i, j // bs] * bs + j % bs for j in range(p + 1)]
            for h in range(hq):
                qh = rope_ref(q[i, t, h], cos[p], sin[p])
                keys, values = k_cache[key_slots, h // (hq // hkv)], v_cache[key_slots, h // (hq // hkv)]
                s = keys @ qh * scale
                pr = np.exp(s - s.max())
                out[i, t, h] = (pr / pr.sum()) @ values
    return out.reshape(b, l, hq * d), k_cache, v_cache


def _rotary(d, max_pos=64, rotary_dim=None):
    from mindcpm.config import RopeConfig
    from mindcpm.layers.rotary import RotaryEmbedding, rope_tables
    r = rotary_dim or d
    rope = RopeConfig(head_dim=d, theta=10000.0, max_position=max_pos, short_factor=tuple([1.5] * (r // 2)),
                      long_factor=tuple([1.5] * (r // 2)), original_max_position=32, rotary_dim=rotary_dim)
    return RotaryEmbedding(rope), rope_tables(rope)


def _attention_case(seed, b, l, hq, hkv, d, bs, nb, num_blocks):
    """Random qkv, caches with old contents, rows at different positions (some padding)."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((b, l, (hq + 2 * hkv) * d)).astype(np.float32)
    k_cache = rng.standard_normal((num_blocks * bs, hkv, d)).astype(np.float32)
    v_cache = rng.standard_normal((num_blocks * bs, hkv, d)).astype(np.float32)
    blocks = rng.permutation(num_blocks - 1)  # the last block takes the padding writes
    tables = np.full((b, nb), num_blocks - 1, np.int32)
    positions = np.full((b, l), -1, np.int32)
    slots = np.full(b * l, (num_blocks - 1) * bs, np.int32)
    for i in range(b):
        tables[i] = blocks[i * nb:(i + 1) * nb]
        n = l - i % 2 if l > 1 else 1  # odd rows carry a padding token at the end
        start = rng.integers(0, nb * bs - n + 1)
        positions[i, :n] = np.arange(start, start + n)
        slots[i * l: i * l + n] = tables[i, positions[i, :n] // bs] * bs + positions[i, :n] % bs
    return qkv, k_cache, v_cache, positions, slots, tables


# Decode rows with few kv heads split each kv head's query heads between threads (G = 2, 3, 3).
@pytest.mark.parametrize("b,l,hq,hkv,d,bs,nb,r", [(1, 1, 4, 2, 16, 4, 3, None), (1, 1, 6, 2, 16, 4, 3, None),
                                                  (1, 1, 3, 1, 8, 4, 5, None), (3, 1, 8, 2, 16, 8, 2, None),
                                                  (2, 5, 6, 3, 8, 4, 4, None), (3, 7, 2, 1, 32, 16, 1, None),
                                                  (2, 3, 4, 2, 32, 4, 3, 16),  # MiniMax's partial RoPE
                                                  (2, 2, 4, 2, 12, 8, 6, None),  # D % 8 != 0, 8-key blocks
                                                  (1, 1, 8, 1, 136, 16, 3, None),  # D > 64: two value blocks
                                                  # contexts past 256 keys: the kernel's key blocks
                                                  (3, 1, 8, 2, 16, 16, 64, None), (2, 4, 4, 2, 16, 32, 24, None)])
def test_paged_attention_matches_numpy(b, l, hq, hkv, d, bs, nb, r, ran):
    from mindcpm.ops.cpu import KernelAttention
    rotary, (cos, sin) = _rotary(d, max_pos=max(64, nb * bs), rotary_dim=r)
    num_blocks = b * nb + 1
    qkv, k_cache, v_cache, positions, slots, tables = _attention_case(b * 100 + l, b, l, hq, hkv, d, bs, nb,
                                                                      num_blocks)
    scale = 1 / np.sqrt(d)
    ref, k_ref, v_ref = attention_ref(qkv, cos, sin, positions, slots, tables, k_cache, v_cache, hq, hkv, d, bs,
                                      scale)
    kc, vc = Parameter(Tensor(k_cache), name="kc"), Parameter(Tensor(v_cache), name="vc")
    out = KernelAttention(rotary, hq, hkv, d, scale)(Tensor(qkv), kc, vc, Tensor(positions), Tensor(slots),
                                                     Tensor(tables), bs).asnumpy()
    real = positions.reshape(-1) >= 0
    np.testing.assert_allclose(out.reshape(b * l, -1)[real], ref.reshape(b * l, -1)[real], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kc.asnumpy()[:-bs], k_ref[:-bs], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vc.asnumpy()[:-bs], v_ref[:-bs])
    assert ran() == {"paged_attention:RopePagedAttention"}


# The attention block: norm, q|k|v, attention, o_proj and residual in one kernel; 70 rows in fp32
# take the three ops apart.
@pytest.mark.parametrize("dtype", list(WEIGHT_DTYPES))
@pytest.mark.parametrize("b,l,hq,hkv,d,bs,nb,hidden", [(1, 1, 4, 2, 16, 4, 3, 24), (3, 2, 6, 3, 8, 4, 4, 37),
                                                       (1, 70, 4, 2, 16, 16, 5, 40)])
def test_attention_block_kernel_matches_numpy(dtype, b, l, hq, hkv, d, bs, nb, hidden, ran):
    from mindcpm.ops.cpu import KernelAttention, KernelAttentionBlock, KernelMatmul
    rotary, (cos, sin) = _rotary(d, max_pos=nb * bs)
    num_blocks = b * nb + 1
    _, k_cache, v_cache, positions, slots, tables = _attention_case(b + l, b, l, hq, hkv, d, bs, nb, num_blocks)
    rng = np.random.default_rng(hidden)
    x = (3 * rng.standard_normal((b, l, hidden))).astype(np.float32)
    r = rng.standard_normal((b, l, hidden)).astype(np.float32)
    g = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    wqkv_t, wqkv = as_stored((0.3 * rng.standard_normal(((hq + 2 * hkv) * d, hidden))).astype(np.float32), dtype)
    wo_t, wo = as_stored(rng.standard_normal((hidden, hq * d)).astype(np.float32), dtype)
    qkv = (rms_norm_ref(x, g, 1e-5) @ wqkv.astype(np.float64).T).astype(np.float32)
    scale = 1 / np.sqrt(d)
    attended, k_ref, v_ref = attention_ref(qkv, cos, sin, positions, slots, tables, k_cache, v_cache, hq, hkv, d,
                                           bs, scale)
    want = r + 0.37 * attended.reshape(b, l, -1) @ wo.astype(np.float64).T
    kc, vc = Parameter(Tensor(k_cache), name="kc"), Parameter(Tensor(v_cache), name="vc")
    block = KernelAttentionBlock(KernelMatmul("plain", norm_eps=1e-5), KernelAttention(rotary, hq, hkv, d, scale),
                                 KernelMatmul("residual", 0.37))
    got = block(Tensor(x), Tensor(g), wqkv_t, kc, vc, Tensor(positions), Tensor(slots), Tensor(tables), bs, wo_t,
                Tensor(r)).asnumpy()
    real = positions.reshape(-1) >= 0
    np.testing.assert_allclose(got.reshape(b * l, -1)[real], want.reshape(b * l, -1)[real], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(kc.asnumpy()[:-bs], k_ref[:-bs], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vc.asnumpy()[:-bs], v_ref[:-bs], rtol=1e-4, atol=1e-5)
    # Prefill rows with fp32 weights run the block's three cells: norm + MatMul, attention, MatMul.
    assert ran() == ({"rms_norm:RmsNorm", "paged_attention:RopePagedAttention"} if takes_matmul(b * l, dtype)
                     else {"paged_attention:RmsNormAttentionBlock"})


class _CacheStep(nn.Cell):
    """One compiled step that writes the cache Parameters in place and reads them back."""

    def __init__(self, attention, cache_shape):
        super().__init__()
        self.attention = attention
        self.k_cache = Parameter(Tensor(np.zeros(cache_shape, np.float32)), name="k_cache", requires_grad=False)
        self.v_cache = Parameter(Tensor(np.zeros(cache_shape, np.float32)), name="v_cache", requires_grad=False)

    @ms.jit
    def construct(self, qkv, positions, slots, tables):
        return self.attention(qkv, self.k_cache, self.v_cache, positions, slots, tables, 4)


def test_cache_written_in_place_across_graph_steps(ran):
    """A 3-token prefill then two decode steps through one jit graph per shape: each step must
    see the keys the previous steps wrote into the Parameters."""
    from mindcpm.ops.cpu import KernelAttention
    hq, hkv, d, bs = 4, 2, 16, 4
    rotary, (cos, sin) = _rotary(d)
    step = _CacheStep(KernelAttention(rotary, hq, hkv, d, 0.25), (3 * bs, hkv, d))
    rng = np.random.default_rng(5)
    k_ref = np.zeros((3 * bs, hkv, d), np.float32)
    v_ref = np.zeros_like(k_ref)
    tables = np.array([[2, 0]], np.int32)
    for start, n in [(0, 3), (3, 1), (4, 1), (5, 1)]:
        qkv = rng.standard_normal((1, n, (hq + 2 * hkv) * d)).astype(np.float32)
        positions = np.arange(start, start + n, dtype=np.int32).reshape(1, n)
        slots = (tables[0, positions[0] // bs] * bs + positions[0] % bs).astype(np.int32)
        ref, k_ref, v_ref = attention_ref(qkv, cos, sin, positions, slots, tables, k_ref, v_ref, hq, hkv, d, bs, 0.25)
        out = step(Tensor(qkv), Tensor(positions), Tensor(slots), Tensor(tables)).asnumpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step.k_cache.asnumpy(), k_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step.v_cache.asnumpy(), v_ref)
    assert ran() == {"paged_attention:RopePagedAttention"}  # compiled into the graph


# -- the loader ----------------------------------------------------------------------------------
def test_aot_op_builds_any_op_folder_and_caches_by_source(tmp_path, monkeypatch):
    """A new op folder is built with the same helper; editing its source makes a new library."""
    folder = tmp_path / "kernels" / "axpb"
    folder.mkdir(parents=True)
    src = ('#include <cstdint>\nextern "C" int Axpb(int n, void **p, int *nd, int64_t **sh, const char **dt, void *s,'
           ' void *e) { const float *x = (const float *)p[0]; float *y = (float *)p[1]; int64_t k = 1;'
           ' for (int i = 0; i < nd[0]; ++i) k *= sh[0][i]; for (int64_t i = 0; i < k; ++i) y[i] = A * x[i] + 1;'
           ' return 0; }\n')
    monkeypatch.setattr(cpu_kernels, "KERNELS_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("MINDCPM_CACHE", str(tmp_path / "cache"))
    cpu_kernels.build.cache_clear()
    try:
        (folder / "cpu.cc").write_text("#define A 2\n" + src)
        first = cpu_kernels.build("axpb")
        op = cpu_kernels.aot_op("axpb", "Axpb", lambda x: x, lambda x: x)
        x = np.arange(5, dtype=np.float32)
        np.testing.assert_array_equal(op(Tensor(x)).asnumpy(), 2 * x + 1)
        cpu_kernels.build.cache_clear()
        assert cpu_kernels.build("axpb") == first  # same source: the cached library
        (folder / "cpu.cc").write_text("#define A 3\n" + src)
        cpu_kernels.build.cache_clear()
        second = cpu_kernels.build("axpb")
        assert second != first and os.path.isfile(second)
        (folder / "cpu.cc").write_text("this is not C++")
        cpu_kernels.build.cache_clear()
        # A broken source is a bug, not a missing tool: no caller may take it for "no kernels here".
        with pytest.raises(cpu_kernels.KernelSourceError, match="axpb/cpu.cc failed: .*error") as failure:
            cpu_kernels.build("axpb")
        assert not isinstance(failure.value, cpu_kernels.KernelBuildError)
        message = str(failure.value)
        assert "\n" not in message
        log = message.split("full log: ")[1].split(";")[0]
        with open(log) as f:
            assert "error" in f.read()
    finally:
        cpu_kernels.build.cache_clear()


SOURCES = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(cpu_kernels.KERNELS_DIR, "*",
                                                                                           "cpu.cc")))


@pytest.mark.parametrize("op_name", SOURCES)
def test_every_kernel_source_compiles(op_name):
    """Each kernels_aclnn/<op>/cpu.cc builds with this g++ (a compile error fails here, whether or
    not a caller would have fallen back to MindSpore's ops)."""
    assert os.path.isfile(cpu_kernels.build(op_name))


def test_no_compiler_is_a_one_line_notice_and_the_native_ops(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("MINDCPM_CACHE", str(tmp_path / "cache"))  # no cached library to reuse
    caches = (cpu_kernels._compiler_version, cpu_kernels.build, cpu_kernels.kernels_available)
    for cached in caches:
        cached.cache_clear()
    try:
        assert not cpu_kernels.kernels_requested("auto")
        with pytest.raises(RuntimeError, match="kernels='on' needs the CPU kernels"):
            cpu_kernels.kernels_requested("on")
        notice = capsys.readouterr().err.strip().splitlines()
        assert notice == ["mindcpm: no working C++ compiler (g++) for the CPU kernels; MindSpore's own (slower) "
                          "CPU ops run instead"]
    finally:
        for cached in caches:
            cached.cache_clear()


def test_kernel_switch(monkeypatch):
    assert cpu_kernels.kernels_requested("auto") and cpu_kernels.kernels_requested("on")
    assert not cpu_kernels.kernels_requested("off")
    monkeypatch.setenv("MINDCPM_KERNELS", "off")
    assert not cpu_kernels.kernels_requested("auto")
    with pytest.raises(ValueError, match="kernels setting 'fast'"):
        cpu_kernels.kernels_requested("fast")
