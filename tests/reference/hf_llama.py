"""Hugging Face transformers (PyTorch, CPU) as the independent reference, run in a subprocess so
torch and mindspore never share a process.

    python -m tests.reference.hf_llama make CONFIG_JSON OUT_DIR SEED   # random Llama checkpoint
    python -m tests.reference.hf_llama logits MODEL_DIR PROMPTS_JSON OUT_NPZ [GREEDY_STEPS]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args: str, timeout: int = 600) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "tests.reference.hf_llama", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"reference failed:\n{proc.stdout}\n{proc.stderr}")


def make_checkpoint(config: dict, out_dir: str, seed: int = 0) -> None:
    path = os.path.join(out_dir, "ref_config.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(config, f)
    run("make", path, out_dir, str(seed))


def reference_logits(model_dir: str, prompts: list[list[int]], tmp: str, greedy_steps: int = 0,
                     gguf_file: str = ""):
    """Per prompt: the logits of every prompt position, and the greedy continuation."""
    return reference_logits_each([model_dir], prompts, tmp, greedy_steps, gguf_file)[0]


def reference_logits_each(model_dirs: list[str], prompts: list[list[int]], tmp: str, greedy_steps: int = 0,
                          gguf_file: str = "", fp16_inputs: list[list[str] | None] | None = None):
    """reference_logits of each checkpoint, all in one subprocess (torch starts once).
    fp16_inputs[j]: Linear modules of checkpoint j whose input is rounded to fp16 first (the A16
    of W8A16 / W4A16: what fp16 activations would cost)."""
    pj, out, fj = (os.path.join(tmp, name) for name in ("prompts.json", "ref.npz", "fp16_inputs.json"))
    with open(pj, "w") as f:
        json.dump(prompts, f)
    with open(fj, "w") as f:
        json.dump([names or [] for names in fp16_inputs or [None] * len(model_dirs)], f)
    run("logits", os.pathsep.join(model_dirs), pj, out, str(greedy_steps), gguf_file, fj)
    data = np.load(out)
    return [([data[f"{j}/logits{i}"] for i in range(len(prompts))],
             [data[f"{j}/greedy{i}"].tolist() for i in range(len(prompts))]) for j in range(len(model_dirs))]


def _make(config_path: str, out_dir: str, seed: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(int(seed))
    with open(config_path) as f:
        cfg = LlamaConfig(**json.load(f))
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so that errors show
            p.normal_(0.0, 0.08) if p.dim() > 1 else p.uniform_(0.7, 1.3)
    model.save_pretrained(out_dir, safe_serialization=True)


def _logits(model_dirs: str, prompts_path: str, out: str, steps: str, gguf_file: str = "",
            fp16_path: str = "") -> None:
    """model_dirs: one or more, separated by os.pathsep; checkpoint j's arrays under "j/"."""
    with open(prompts_path) as f:
        prompts = json.load(f)
    dirs = model_dirs.split(os.pathsep)
    fp16 = [[]] * len(dirs)
    if fp16_path:
        with open(fp16_path) as f:
            fp16 = json.load(f)
    result = {}
    for j, model_dir in enumerate(dirs):
        result.update({f"{j}/{key}": value
                       for key, value in _run(model_dir, prompts, steps, gguf_file, fp16[j]).items()})
    np.savez(out, **result)


def _run(model_dir: str, prompts: list[list[int]], steps: str, gguf_file: str, fp16_inputs: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **extra).eval()
    modules = dict(model.named_modules())
    for name in fp16_inputs:
        modules[name].register_forward_pre_hook(lambda module, args: (args[0].half().float(),) + args[1:])
    result = {}
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            result[f"logits{i}"] = model(ids).logits[0].float().numpy()
            greedy = []
            if int(steps):
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(steps),
                                     do_sample=False, min_new_tokens=int(steps), eos_token_id=None,
                                     pad_token_id=0)
                greedy = gen[0, len(prompt):].tolist()
            result[f"greedy{i}"] = np.asarray(greedy, np.int64)
    return result


if __name__ == "__main__":
    {"make": _make, "logits": _logits}[sys.argv[1]](*sys.argv[2:])
