#!/usr/bin/env python
"""Checks mindcpm's Ascend path on an Ascend 910B, against references computed here.

    python scripts/validate_ascend.py              # on a host with an NPU
    python scripts/validate_ascend.py --dry-run    # the same plan on CPU, with the tests' stand-ins

1. ops: each Ascend op mindcpm uses runs the cases of scripts/ascend_op_cases.py (the worked
   examples of its MindSpore docstring and numpy goldens written from MindSpore's own Ascend
   tests) on the device, fp16 and bf16, and must match within two ulps of the dtype.
   mindcpm's own AscendC ops (LightningDecode, LightningPrefill, InfllmBlockSelect,
   InfllmSparseAttention; built by kernels_aclnn/ascendc_common/build_npu.sh) run against the
   MindSpore composites they replace, on the same inputs (scripts/ascendc_op_checks.py).
2. end to end: a tiny Llama, a tiny sparse MiniCPM4 (InfLLM-v2 past dense_len) and a tiny
   MiniMax-M1 (lightning attention + MoE) checkpoint,
   written to a temp dir with weights exact in fp16 and bf16, generate greedily with logprobs on the NPU (ascend backend, 16-bit) and on the CPU (native
   backend, fp32), each in its own process. Tokens must agree, and so must the logprobs within
   32 ulps of the 16-bit dtype; sequences may part only at a near tie of the CPU's logprobs.

Prints a table; exits 0 when everything matches, 1 on any mismatch, 2 without an NPU (one line).
--dry-run runs the plan on CPU: the ops through tests/ascend_standins.py and
tests/ascend_moe_standins.py, the AscendC ops through their CPU emulation (tests/ascendc_standins.py:
the shipped kernel sources compiled with g++), the end-to-end run with the ascend backend on
those stand-ins (fp16).
Needs the repository checkout (scripts/ and tests/), not only the installed package.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter

os.environ.setdefault("GLOG_v", "3")  # before mindspore is imported: no INFO/WARNING log noise
os.environ.setdefault("MS_COMPILER_CACHE_ENABLE", "0")  # the cache keys graphs by compile order
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from scripts import ascend_op_cases as cases  # noqa: E402
from scripts import ascendc_op_checks as custom_checks  # noqa: E402

# The Ascend ops mindcpm calls, in the order they are checked. A new op needs its cases in
# ascend_op_cases.BUILDERS (and, if it is not a MindSpore primitive, its class in CUSTOM_KERNELS)
# and, for --dry-run, a CPU stand-in in op_kernels; mindcpm's AscendC ops are ascendc_op_checks.CHECKS.
OPS = ["ReshapeAndCache", "PagedAttention", "FlashAttentionScore", "MoeGatingTopKSoftmax", "MoeInitRouting",
       "MoeComputeExpertTokens", "GroupedMatmul", "MoeFinalizeRouting", "WeightQuantBatchMatmul",
       *custom_checks.CHECKS]
DTYPES = ["float16", "bfloat16"]
PROMPTS = [[256, 72, 101, 108, 108, 111], [256] + list(range(40, 61)), [256, 7]]
# Sparse attention needs prompts past dense_len (SPARSE_CONFIG) and several 64-token blocks.
LONG_PROMPTS = [[256] + [(7 * i + 3 * j) % 250 for i in range(n)] for j, n in enumerate([300, 200])]
SPARSE_CONFIG = dict(window_size=128, topk=2, dense_len=200)
MAX_TOKENS = 8
TOP_LOGPROBS = 5
LOGPROB_ULPS = 32  # the end-to-end tolerance, in ulps (at 1.0) of the 16-bit dtype
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=260, hidden_size=128,
                  intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=256, eos_token_id=257, torch_dtype="float32")


def npu_count() -> int:
    """Ascend devices present (not merely the plugin loaded); 0 on a CPU host."""
    import mindspore as ms
    try:
        return int(ms.device_context.ascend.device_count())
    except (AttributeError, RuntimeError):
        return 0


def setup_device(dry_run: bool, cpu: bool = False) -> None:
    """The NPU as MindSpore's own Ascend tests of these ops run it: graph kernels by kernel (O0)
    with infer_boost on, which ReshapeAndCache and PagedAttention need (they have only internal
    kernels). Unverified here (no NPU). `cpu`: the CPU reference process on an NPU host."""
    import mindspore as ms
    if dry_run:
        return  # the CPU is MindSpore's default device
    if cpu:
        ms.set_device("CPU")
        return
    ms.set_device("Ascend")
    ms.set_context(jit_config={"jit_level": "O0", "infer_boost": "on"})


# How mindcpm.LLM is told which backend and device to use: the one place to adapt if that changes.
# The CPU reference relies on setup_device(cpu=True) having fixed the device before LLM() runs
# (today mindcpm's own device selection then keeps the CPU).
def ascend_llm_kwargs(dtype: str) -> dict:
    return dict(attention="ascend", dtype=dtype)


def cpu_llm_kwargs() -> dict:
    return dict(attention="native", dtype="float32")


class _Patch:
    """The two monkeypatch methods the stand-ins' install functions use, outside pytest."""

    def setattr(self, obj, name, value):
        setattr(obj, name, value)

    def setenv(self, name, value):
        os.environ[name] = value


def install_emulation() -> Counter:
    """The AscendC ops' CPU emulation in place of the built ops (dry run)."""
    from tests.ascendc_standins import install_emulation as install
    return install(_Patch())


def op_kernels(dry_run: bool, ops: list[str]) -> dict:
    if not dry_run:
        return cases.real_kernels(ops)
    from tests.ascend_moe_standins import STANDINS
    from tests.ascend_standins import ATTENTION_STANDINS
    return dict(STANDINS, **ATTENTION_STANDINS)


# -- part 1: the ops ----------------------------------------------------------------------------

def check_custom_ops(names: list[str], dtypes: list[str], dry_run: bool) -> list[tuple]:
    """mindcpm's AscendC ops (built, or emulated under --dry-run) against the composites."""
    from mindcpm.ops import ascendc
    if not names:
        return []
    if dry_run:
        install_emulation()
    elif ascendc.built_ops_path() is None:
        return [("custom op", name, "-", "FAIL", f"not installed; build with `{ascendc.BUILD_COMMAND}`")
                for name in names]
    rows = []
    for name in names:
        for dtype in dtypes:
            try:
                ok, detail = custom_checks.CHECKS[name](dtype)
            except Exception as e:  # a refused call is a finding, reported like a mismatch
                ok, detail = False, _one_line(e)
            rows.append(("custom op", name, dtype, "PASS" if ok else "FAIL", detail))
    return rows


def check_ops(ops: list[str], dtypes: list[str], dry_run: bool) -> list[tuple]:
    rows = check_custom_ops([o for o in ops if o in custom_checks.CHECKS], dtypes, dry_run)
    ops = [o for o in ops if o not in custom_checks.CHECKS]
    kernels = op_kernels(dry_run, ops)
    for case in cases.all_cases(ops, dtypes):
        if dry_run and not case.cpu:
            rows.append(("op", case.op, case.name, "SKIP", case.why))
            continue
        try:
            result = cases.run_case(case, kernels)
            rows.append(("op", case.op, case.name, "PASS" if result.ok else "FAIL", result.detail))
        except Exception as e:  # a refused call is a finding, reported like a mismatch
            rows.append(("op", case.op, case.name, "FAIL", _one_line(e)))
    return rows


def _one_line(error: Exception) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith("-"))
    return f"{type(error).__name__}: {text[:300]}"


# -- part 2: a tiny model end to end ------------------------------------------------------------

def tiny_llama(rng, c: dict = TINY_LLAMA) -> tuple[dict, dict]:
    """A Llama (GQA 4:2, head_dim 32: FlashAttentionScore takes multiples of 16)."""
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    # Larger than the usual init so that errors show.
    return c, {name: rng.normal(0, 0.08, s) if len(s) > 1 else rng.uniform(0.7, 1.3, s) for name, s in shapes.items()}


def tiny_sparse_minicpm4(rng) -> tuple[dict, dict]:
    """The Llama's shapes as a MiniCPM4 with InfLLM-v2 sparse attention (scaled-down window and
    top-k, dense_len 200): the AscendC InfLLM ops end to end."""
    config = dict(TINY_LLAMA, architectures=["MiniCPMForCausalLM"], model_type="minicpm", scale_emb=2.0,
                  scale_depth=1.4, dim_model_base=64, max_position_embeddings=512, sparse_config=SPARSE_CONFIG)
    return tiny_llama(rng, config)


def tiny_minimax(rng) -> tuple[dict, dict]:
    """A MiniMax-M1 (softmax, lightning, softmax layers; 4 experts, top-2): the MoE ops end to end."""
    from tests.tiny_minimax import minimax_config, random_weights
    cfg = minimax_config(hidden=64, heads=2, head_dim=32, kv_heads=1, attn_types=(0, 1, 0), intermediate=32)
    return cfg, random_weights(cfg, int(rng.integers(1 << 31)))


# The end-to-end models: name -> (config, weights) from a random generator.
MODELS = {"llama": tiny_llama, "sparse-minicpm4": tiny_sparse_minicpm4, "minimax": tiny_minimax}


def prompts_for(config: dict) -> list[list[int]]:
    return LONG_PROMPTS if "sparse_config" in config else PROMPTS


def write_checkpoint(path: str, model: str, seed: int = 0) -> str:
    """config.json, a byte tokenizer and weights rounded to bf16, which fp16 holds exactly too,
    so the 16-bit and the fp32 side run the same model."""
    from safetensors.numpy import save_file
    from tests.tiny import write_byte_tokenizer
    config, weights = MODELS[model](np.random.default_rng(seed))
    os.makedirs(path, exist_ok=True)
    save_file({name: cases.round_to(w, "bfloat16") for name, w in weights.items()},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    write_byte_tokenizer(path)
    return path


def expected_calls(config: dict) -> tuple:
    """The kernels (stand-ins, emulated AscendC ops) a model's ascend run must have called."""
    if "sparse_config" in config:
        return ("InfllmBlockSelect", "InfllmSparseAttention")  # every layer: InfLLM-v2
    attention = ("ReshapeAndCache", "PagedAttention", "FlashAttentionScore")
    if any("MiniMax" in a for a in config["architectures"]):
        return attention + ("LightningPrefill", "LightningDecode")
    return attention


def generate(model_dir: str, side: str, dtype: str, dry_run: bool) -> list[dict]:
    """Greedy tokens and top logprobs per prompt, on `side` ("ascend": the device, 16-bit;
    "native": the CPU, fp32)."""
    from mindcpm import LLM, SamplingParams
    config = _config(model_dir)
    calls = None
    if side == "ascend" and dry_run:
        from tests.ascend_moe_standins import install_moe_standins
        from tests.ascend_standins import install_standins
        calls = install_standins(_Patch())
        install_moe_standins(_Patch())
        custom = install_emulation()
    kwargs = ascend_llm_kwargs(dtype) if side == "ascend" else cpu_llm_kwargs()
    prompts = prompts_for(config)
    llm = LLM(model=model_dir, block_size=16, max_model_len=128 if prompts is PROMPTS else 512, max_num_seqs=4,
              progress=False, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    if calls is not None and not all(calls[op] or custom[op] for op in expected_calls(config)):
        raise RuntimeError(f"the ascend run did not call every expected stand-in (calls: {dict(calls + custom)})")
    return [{"tokens": o.outputs[0].token_ids,
             "logprobs": [{str(t): float(v) for t, v in step.items()} for step in o.outputs[0].logprobs]}
            for o in outputs]


def run_worker(side: str, model_dir: str, dtype: str, dry_run: bool) -> list[dict]:
    """One side in its own process: a process runs on one device."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--model-dir", model_dir, "--dtype", dtype]
    proc = subprocess.run(cmd + (["--dry-run"] if dry_run else []), capture_output=True, text=True, timeout=1800)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the {side} run failed: {tail}")
    return json.loads(lines[-1])


def compare_generations(ref: list[dict], got: list[dict], tol: float) -> tuple[bool, str]:
    """Tokens equal and logprobs within tol; a sequence may part from the reference only where
    the reference's two candidates are within 2*tol (a near tie), and is compared up to there."""
    worst, parted, gap_seen = 0.0, 0, 0.0
    for r, g in zip(ref, got):
        for step, (rt, gt) in enumerate(zip(r["tokens"], g["tokens"])):
            r_lp, g_lp = r["logprobs"][step], g["logprobs"][step]
            if rt != gt:
                gap = r_lp[str(rt)] - r_lp.get(str(gt), -np.inf)
                if gap > 2 * tol:
                    return False, f"token {step}: {gt}, reference {rt} (reference logprob gap {gap:.3g})"
                parted, gap_seen = parted + 1, max(gap_seen, gap)
                break
            worst = max(worst, abs(g_lp[str(gt)] - r_lp[str(rt)]))
            if worst > tol:
                return False, f"token {step}: logprob differs by {worst:.3g} (tolerance {tol:.3g})"
    note = f", {parted} parted at a near tie (reference gap <= {gap_seen:.3g})" if parted else ""
    return True, f"max logprob difference {worst:.3g} (tolerance {tol:.3g}){note}"


def check_end_to_end(models: list[str], dtypes: list[str], dry_run: bool) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            rows += _check_model(model, write_checkpoint(os.path.join(tmp, model), model), dtypes, dry_run)
    return rows


def _config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def _check_model(model: str, model_dir: str, dtypes: list[str], dry_run: bool) -> list[tuple]:
    name = f"tiny {model}"
    try:
        ref = run_worker("native", model_dir, "float32", dry_run)
    except RuntimeError as e:
        return [("model", name, "native fp32 (CPU reference)", "FAIL", str(e))]
    rows = []
    for dtype in dtypes:
        label = f"greedy {len(prompts_for(_config(model_dir)))} prompts x {MAX_TOKENS} tokens, {dtype} vs CPU fp32"
        if dry_run and dtype == "bfloat16":
            rows.append(("model", name, label, "SKIP", "MindSpore has no bf16 compute on CPU"))
            continue
        try:
            got = run_worker("ascend", model_dir, dtype, dry_run)
            ok, detail = compare_generations(ref, got, LOGPROB_ULPS * cases.ULP[dtype])
        except RuntimeError as e:
            ok, detail = False, str(e)
        rows.append(("model", name, label, "PASS" if ok else "FAIL", detail))
    return rows


# -- the table ----------------------------------------------------------------------------------

def print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths)), " ", row[4])


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="run the plan on CPU with the tests' stand-ins")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated ops to check (default: all)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated 16-bit dtypes (default: both)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated end-to-end models "
                    "(default: all); empty: the ops only")
    ap.add_argument("--worker", choices=["ascend", "native"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.ops, args.dtypes = args.ops.split(","), args.dtypes.split(",")
    args.models = [m for m in args.models.split(",") if m]
    unknown = ([o for o in args.ops if o not in OPS] + [d for d in args.dtypes if d not in DTYPES]
               + [m for m in args.models if m not in MODELS])
    if unknown:
        ap.error(f"unknown op or dtype: {', '.join(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        setup_device(args.dry_run, cpu=args.worker == "native")
        print(json.dumps(generate(args.model_dir, args.worker, args.dtype, args.dry_run)))
        return 0
    if not args.dry_run and npu_count() == 0:
        print("validate_ascend: no Ascend NPU on this host (device count 0); nothing checked "
              "(--dry-run runs the plan on CPU with stand-ins)")
        return 2
    setup_device(args.dry_run)
    rows = check_ops(args.ops, args.dtypes, args.dry_run)
    rows += check_end_to_end(args.models, args.dtypes, args.dry_run)
    print_table([("part", "op / model", "case", "result", "detail")] + rows)
    failed = sum(r[3] == "FAIL" for r in rows)
    where = "CPU stand-ins (dry run)" if args.dry_run else "Ascend NPU"
    print(f"{len(rows) - failed} of {len(rows)} checks without a mismatch on the {where}; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
