"""mindcpm.tokenizer: MiniCPM chat templates, SentencePiece and tokenizer.json loading, streaming.

transformers is the reference; it runs in a subprocess so torch never shares a process with
mindspore.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mindcpm.gguf import default_model_path, gguf_to_hf_dir
from mindcpm.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerFileError,
    TokenizerNotFoundError,
)

# MiniCPM4 (docs/minicpm4.md#checkpoint-quirks): plain ChatML, no default system prompt, no BOS in the template.
MINICPM4_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# MiniCPM4.1: the same, plus an empty think block (one newline after </think>) when thinking is off.
MINICPM41_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n' }}{% endif %}"
    "{% endif %}"
)

CORPUS_LINES = [
    "Hello world, this is a tiny corpus for the tokenizer test.",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。",
    "def square(x):\n    return x * x",
    "MiniCPM runs on MindSpore.",
]

TEXTS = [
    "Hello world",
    "The quick brown fox, 你好世界! 🙂🚀",
    "<|im_start|>user\nhi 你好<|im_end|>\n<|im_start|>assistant\n",
    "def square(x):\n    return x * x\n",
    "</s>tail and <s>head",
]


def train_sentencepiece(directory) -> str:
    """A tiny byte-fallback SentencePiece BPE with the MiniCPM chat markers; returns the model path."""
    import sentencepiece

    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(CORPUS_LINES * 40))
    prefix = os.path.join(directory, "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=400, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], character_coverage=0.99,
        # identity: transformers' conversion ignores SentencePiece's NFKC rules.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return prefix + ".model"


def write_checkpoint(directory, model_path: str, chat_template: str | None = None) -> str:
    """A MiniCPM4-like tokenizer directory: tokenizer.model and a legacy LlamaTokenizer config."""
    os.makedirs(directory, exist_ok=True)
    os.replace(model_path, os.path.join(directory, "tokenizer.model"))
    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def run_reference(script: str, *args: str) -> dict:
    """Runs a reference script in a fresh interpreter; it prints one JSON object last."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"reference failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def require_transformers():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install transformers==5.23.0); it is the reference")


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    return write_checkpoint(root / "minicpm4", train_sentencepiece(root), MINICPM4_TEMPLATE)


@pytest.fixture(scope="module")
def spm_tokenizer(spm_dir):
    return Tokenizer.from_dir(spm_dir)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return Tokenizer.from_dir(gguf_to_hf_dir(default_model_path()))


# --- chat templates -------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
CHATML = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
)


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_minicpm4_template_is_chatml_whatever_enable_thinking(spm_tokenizer, enable_thinking):
    text = spm_tokenizer.apply_chat_template(CONVERSATION, enable_thinking=enable_thinking)
    assert text == CHATML + "<|im_start|>assistant\n"
    assert spm_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False) == CHATML


@pytest.mark.parametrize("enable_thinking, suffix", [(None, ""), (True, ""), (False, "<think>\n\n</think>\n")])
def test_minicpm41_template_adds_empty_think_block_only_when_thinking_is_off(spm_tokenizer, enable_thinking, suffix):
    tokenizer = Tokenizer(spm_tokenizer.backend, {"bos_token": "<s>", "eos_token": "</s>"}, {}, MINICPM41_TEMPLATE)
    text = tokenizer.apply_chat_template(CONVERSATION, enable_thinking=enable_thinking)
    assert text == CHATML + "<|im_start|>assistant\n" + suffix


def test_checkpoint_without_template_falls_back_to_chatml(spm_tokenizer):
    tokenizer = Tokenizer(spm_tokenizer.backend, {"bos_token": "<s>"}, {}, None)
    assert tokenizer.apply_chat_template(CONVERSATION) == CHATML + "<|im_start|>assistant\n"


def test_chat_template_from_jinja_file_and_template_helpers(tmp_path, spm_dir):
    directory = tmp_path / "jinja"
    directory.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (directory / name).write_bytes(open(os.path.join(spm_dir, name), "rb").read())
    (directory / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
        "{% if tools %}{{ tools | tojson(indent=None) }}{% endif %}{{ strftime_now('%Y') | length }}"
    )
    tokenizer = Tokenizer.from_dir(directory)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "é\n"}], tools=[{"name": "f"}])
    assert text == '<s>"é\\n"[{"name": "f"}]4'


def test_chat_prompt_has_exactly_one_bos(spm_tokenizer):
    bos = spm_tokenizer.bos_token_id
    ids = spm_tokenizer.encode_chat(spm_tokenizer.apply_chat_template(CONVERSATION))
    assert ids[0] == bos and ids.count(bos) == 1  # MiniCPM4 needs <s> in chat (docs/minicpm4.md#checkpoint-quirks)
    with_bos = Tokenizer(spm_tokenizer.backend, {"bos_token": "<s>"}, {}, "{{ bos_token }}" + MINICPM4_TEMPLATE)
    ids = with_bos.encode_chat(with_bos.apply_chat_template(CONVERSATION))
    assert ids[0] == bos and ids.count(bos) == 1


def test_raise_exception_in_template_is_a_value_error(spm_tokenizer):
    tokenizer = Tokenizer(spm_tokenizer.backend, {}, {}, "{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="only user turns"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, message", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    (["hello"], "must be a dict"),
    ([{"content": "x"}], "no 'role'"),
    ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
    ([{"role": "user"}], "no 'content'"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "must be a string"),
])
def test_bad_chat_messages_raise_one_line_value_error(spm_tokenizer, messages, message):
    with pytest.raises(ValueError, match=message) as error:
        spm_tokenizer.apply_chat_template(messages)
    assert "\n" not in str(error.value)


def test_assistant_tool_call_without_content_is_accepted(spm_tokenizer):
    tokenizer = Tokenizer(spm_tokenizer.backend, {}, {}, "{% for m in messages %}{{ m['role'] }};{% endfor %}")
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"name": "f"}]}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == "user;assistant;"


# --- SentencePiece and tokenizer.json against transformers ------------------------------------

def test_sentencepiece_round_trip_and_single_bos(spm_tokenizer):
    for text in TEXTS:
        ids = spm_tokenizer.encode(text)
        assert ids[0] == spm_tokenizer.bos_token_id and ids.count(spm_tokenizer.bos_token_id) == 1 + text.count("<s>")
        assert spm_tokenizer.decode(ids, skip_special_tokens=False).startswith("<s>")
        if "<" not in text:  # legacy SentencePiece puts a space after added tokens, as transformers does
            assert spm_tokenizer.decode(ids) == text
    assert spm_tokenizer.encode("Hello", add_special_tokens=False)[0] != spm_tokenizer.bos_token_id
    assert spm_tokenizer.token_to_id("<|im_start|>") == 3 and spm_tokenizer.id_to_token(3) == "<|im_start|>"
    assert spm_tokenizer.token_to_id("no such piece") is None
    assert spm_tokenizer.vocab_size == 400 and {0, 1, 2} <= set(spm_tokenizer.all_special_ids)


def test_sentencepiece_backend_matches_sentencepiece_on_plain_text(spm_dir, spm_tokenizer):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(spm_dir, "tokenizer.model"))
    for text in ["Hello world", "  two  leading spaces", "你好，世界！", "🙂 emoji"]:
        assert spm_tokenizer.encode(text, add_special_tokens=False) == processor.encode(text)


HF_TOKENIZER_SCRIPT = r"""
import json, sys
from transformers import AutoTokenizer
source, saved, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(source)
tokenizer.save_pretrained(saved)  # a tokenizer.json written by transformers itself
config_path = saved + "/tokenizer_config.json"
config = json.load(open(config_path))
config["legacy"] = True  # save_pretrained drops it; MiniCPM4's config sets it
json.dump(config, open(config_path, "w"))
fast = AutoTokenizer.from_pretrained(saved)
out = {}
for name, tok in (("slow_files", tokenizer), ("tokenizer_json", fast)):
    ids = [tok(t)["input_ids"] for t in texts]
    out[name] = {
        "ids": ids,
        "decoded": [tok.decode(i, skip_special_tokens=True) for i in ids],
        "decoded_with_special": [tok.decode(i, skip_special_tokens=False) for i in ids],
    }
print(json.dumps(out))
"""


def test_matches_transformers_llama_tokenizer_from_same_files(tmp_path, spm_dir):
    require_transformers()
    # transformers' v5 Metaspace does not prefix a segment that starts with a space, while
    # SentencePiece does; TEXTS avoid segments starting with a space.
    saved = str(tmp_path / "saved")
    reference = run_reference(HF_TOKENIZER_SCRIPT, spm_dir, saved, json.dumps(TEXTS))
    assert os.path.isfile(os.path.join(saved, "tokenizer.json"))
    for name, directory in (("slow_files", spm_dir), ("tokenizer_json", saved)):
        tokenizer = Tokenizer.from_dir(directory)
        expected = reference[name]
        assert [tokenizer.encode(t) for t in TEXTS] == expected["ids"], name
        assert [tokenizer.decode(i) for i in expected["ids"]] == expected["decoded"], name
        assert [tokenizer.decode(i, skip_special_tokens=False) for i in expected["ids"]] == \
            expected["decoded_with_special"], name
        assert all(ids.count(tokenizer.bos_token_id) == 1 + t.count("<s>") for t, ids in zip(TEXTS, expected["ids"]))


# --- streaming --------------------------------------------------------------------------------

STREAM_TEXT = "Streaming 你好，世界！ and emoji 🙂🚀👍🏽 done. 日本語のテキスト。"


def stream(tokenizer, ids, skip_special_tokens=True):
    detokenizer = IncrementalDetokenizer(tokenizer, [tokenizer.bos_token_id or 0], skip_special_tokens)
    return [detokenizer.add(i) for i in ids]


@pytest.mark.parametrize("name", ["spm_tokenizer", "smollm2_tokenizer"])
def test_streaming_multibyte_text_never_emits_broken_characters(request, name):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(STREAM_TEXT, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == STREAM_TEXT
    assert "" in pieces  # some tokens hold back an incomplete UTF-8 character


def test_streaming_with_special_tokens_matches_decode(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    ids = tokenizer.encode("<|im_start|>assistant\n答案是 42 🙂<|im_end|>\n", add_special_tokens=False)
    for skip in (True, False):
        assert "".join(stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_streaming_decodes_a_small_window_per_token(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)
    window_sizes = []

    class RecordingTokenizer:
        def decode(self, token_ids, skip_special_tokens=True):
            window_sizes.append(len(token_ids))
            return tokenizer.decode(token_ids, skip_special_tokens)

    detokenizer = IncrementalDetokenizer(RecordingTokenizer(), [], True)
    assert "".join(detokenizer.add(i) for i in ids) == tokenizer.decode(ids)
    assert len(ids) > 300 and max(window_sizes) <= 2


# --- errors -----------------------------------------------------------------------------------

def test_directory_without_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="no tokenizer.json or tokenizer.model") as error:
        Tokenizer.from_dir(tmp_path)
    assert isinstance(error.value, FileNotFoundError) and str(tmp_path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        Tokenizer.from_dir(tmp_path / "missing")


@pytest.mark.parametrize("name, content", [
    ("tokenizer.json", b'{"version": "1.0", "model": '),
    ("tokenizer.model", b"\x00\x01 definitely not a protobuf"),
])
def test_corrupt_tokenizer_file_names_the_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerFileError) as error:
        Tokenizer.from_dir(tmp_path)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and str(tmp_path / name) in message and "\n" not in message


def test_corrupt_tokenizer_config_names_the_file(tmp_path, spm_dir):
    (tmp_path / "tokenizer.model").write_bytes(open(os.path.join(spm_dir, "tokenizer.model"), "rb").read())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
