"""Tokenizer, chat template and streaming detokenizer for a Hugging Face checkpoint directory.

Loads `tokenizer.json` with the `tokenizers` library when present, otherwise a SentencePiece
`tokenizer.model`, and follows `tokenizer_config.json` the way transformers' AutoTokenizer does:
BOS/EOS from `add_bos_token`/`add_eos_token`, special tokens from `added_tokens_decoder`, and the
chat template from `chat_template.jinja` or the `chat_template` key.
"""

import json
import os
import re
from datetime import datetime

CHAT_ROLES = ("system", "user", "assistant", "tool")

# Used when a checkpoint has no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_REPLACEMENT_CHAR = "\ufffd"
_SENTENCEPIECE_SPACE = "\u2581"


class TokenizerNotFoundError(FileNotFoundError):
    """The directory has neither tokenizer.json nor tokenizer.model."""


class TokenizerFileError(ValueError):
    """A tokenizer file exists but cannot be read; the message names the file."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def read_json(path: str) -> dict:
    """The JSON object in `path`, {} if the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as error:
        raise TokenizerFileError(f"{path}: cannot read JSON ({one_line(error)})") from None
    if not isinstance(value, dict):
        raise TokenizerFileError(f"{path}: expected a JSON object")
    return value


def token_text(value) -> str | None:
    """A special token from a config: a string, or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class TokenizersBackend:
    """A `tokenizers.Tokenizer` (tokenizer.json)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # tokenizers raises a bare Exception for unreadable files
            raise TokenizerFileError(f"{path}: cannot load tokenizer ({one_line(error)})") from None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def special_ids(self) -> set[int]:
        return {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}

    def default_special_tokens(self) -> dict[str, str]:
        return {}


class SentencePieceBackend:
    """A SentencePiece `tokenizer.model`, tokenized like transformers' legacy LlamaTokenizer.

    Like Hugging Face, added tokens (user-defined and control pieces, and those listed in
    `added_tokens_decoder`) are cut out of the text first, and every text segment between them
    is encoded on its own, so each gets SentencePiece's dummy-prefix space.
    """

    def __init__(self, path: str, added_tokens: dict[int, str], configured_special_ids: set[int]):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        try:
            with open(path, "rb") as f:
                serialized = f.read()
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(serialized)
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=serialized)
        except Exception as error:  # protobuf DecodeError, sentencepiece RuntimeError/OSError
            raise TokenizerFileError(f"{path}: cannot load SentencePiece model ({one_line(error)})") from None
        piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
        whole_pieces = {piece_type.USER_DEFINED, piece_type.CONTROL, piece_type.UNKNOWN}
        self.added = {i: p.piece for i, p in enumerate(proto.pieces) if p.type in whole_pieces}
        for token_id, text in added_tokens.items():
            # Hugging Face would append such tokens to the vocabulary; MiniCPM's are all pieces.
            if token_id >= len(proto.pieces) or proto.pieces[token_id].piece != text:
                raise TokenizerFileError(f"{path}: added token {text!r} (id {token_id}) is not a piece of the model")
            self.added[token_id] = text
        self.added_ids = {text: i for i, text in self.added.items()}
        # Never empty: every SentencePiece model has an unknown piece. Longest first, so a token
        # that contains another one wins.
        by_length = sorted(self.added_ids, key=len, reverse=True)
        self.added_pattern = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
        control_types = (piece_type.CONTROL, piece_type.UNKNOWN)
        self.skipped_ids = {i for i, p in enumerate(proto.pieces) if p.type in control_types} | configured_special_ids
        self.strip_leading_space = proto.normalizer_spec.add_dummy_prefix

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = []
        for segment in self.added_pattern.split(text):
            if segment in self.added_ids:
                ids.append(self.added_ids[segment])
            elif segment:
                ids.extend(self.processor.encode(segment))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Like Hugging Face's decoder chain: "▁" -> " ", byte pieces -> bytes, then one leading
        # space stripped from the whole text.
        data = bytearray()
        for token_id in ids:
            if skip_special_tokens and token_id in self.skipped_ids:
                continue
            piece = self.processor.id_to_piece(token_id)
            if self.processor.is_byte(token_id):
                data.append(int(piece[3:-1], 16))  # "<0xAB>"
            else:
                data += piece.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8")
        text = data.decode("utf-8", errors="replace")
        if self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def token_to_id(self, token: str) -> int | None:
        if token in self.added_ids:
            return self.added_ids[token]
        token_id = self.processor.piece_to_id(token)  # the unknown id for a missing piece
        return token_id if self.processor.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.processor.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def special_ids(self) -> set[int]:
        return set(self.skipped_ids)

    def default_special_tokens(self) -> dict[str, str]:
        """The model's own BOS/EOS/UNK/PAD pieces, for a directory without a config naming them."""
        ids = {"bos_token": self.processor.bos_id(), "eos_token": self.processor.eos_id(),
               "unk_token": self.processor.unk_id(), "pad_token": self.processor.pad_id()}
        return {name: self.processor.id_to_piece(i) for name, i in ids.items() if i >= 0}


class Tokenizer:
    """Encode/decode and chat templates for one checkpoint, matching transformers' AutoTokenizer."""

    def __init__(self, backend, tokenizer_config: dict, special_tokens_map: dict, chat_template):
        self.backend = backend
        special_tokens = {**backend.default_special_tokens(), **special_tokens_map, **tokenizer_config}
        self.bos_token = token_text(special_tokens.get("bos_token"))
        self.eos_token = token_text(special_tokens.get("eos_token"))
        self.unk_token = token_text(special_tokens.get("unk_token"))
        self.pad_token = token_text(special_tokens.get("pad_token"))
        self.chat_template = chat_template
        self.add_bos_token, self.add_eos_token = self._special_token_policy(backend, tokenizer_config)
        named_ids = map(self._id_of, (self.bos_token, self.eos_token, self.unk_token, self.pad_token))
        self.special_ids = backend.special_ids() | configured_special_ids(tokenizer_config) | {
            i for i in named_ids if i is not None
        }

    @staticmethod
    def _special_token_policy(backend, tokenizer_config: dict) -> tuple[bool | None, bool | None]:
        """(add BOS?, add EOS?); None, None means tokenizer.json's own post-processor decides.

        A config that sets add_bos_token/add_eos_token overrides the post-processor (transformers
        rebuilds it from those flags); a SentencePiece model defaults to LlamaTokenizer's BOS only.
        """
        add_bos = tokenizer_config.get("add_bos_token")
        add_eos = tokenizer_config.get("add_eos_token")
        if isinstance(backend, SentencePieceBackend):
            return add_bos is not False, bool(add_eos)
        if add_bos is None and add_eos is None:
            return None, None
        return bool(add_bos), bool(add_eos)

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise TokenizerNotFoundError(f"{path}: no such checkpoint directory")
        tokenizer_config = read_json(os.path.join(path, "tokenizer_config.json"))
        special_tokens_map = read_json(os.path.join(path, "special_tokens_map.json"))
        json_path = os.path.join(path, "tokenizer.json")
        model_path = os.path.join(path, "tokenizer.model")
        if os.path.isfile(json_path):
            backend = TokenizersBackend(json_path)
        elif os.path.isfile(model_path):
            backend = SentencePieceBackend(
                model_path, configured_added_tokens(tokenizer_config), configured_special_ids(tokenizer_config)
            )
        else:
            raise TokenizerNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in the directory")
        return cls(backend, tokenizer_config, special_tokens_map, read_chat_template(path, tokenizer_config))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (transformers' len(tokenizer))."""
        return self.backend.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.special_ids)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.add_bos_token is None:
            return self.backend.encode(text, add_special_tokens)
        ids = self.backend.encode(text, False)
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens)

    def encode_chat(self, text: str) -> list[int]:
        """Token ids of a rendered chat prompt.

        Encoded with special tokens, since MiniCPM4 needs its BOS in chat too (its template has
        none), but without a second BOS when the template already starts with the BOS text.
        """
        ids = self.encode(text, add_special_tokens=True)
        bos = self.bos_token_id
        if bos is not None and text.startswith(self.bos_token) and ids[:2] == [bos, bos]:
            ids = ids[1:]
        return ids

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
    ) -> str:
        validate_chat_messages(messages)
        variables = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "unk_token": self.unk_token or "",
            "pad_token": self.pad_token or "",
        }
        # MiniCPM4.1 tests `enable_thinking is defined`, so an unset value must stay undefined.
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        return render_chat_template(self._template_for(tools), variables)

    def _template_for(self, tools) -> str:
        """The template text; a config may hold named templates ("default", "tool_use")."""
        template = self.chat_template
        if template is None:
            return CHATML_TEMPLATE
        if isinstance(template, str):
            return template
        named = {entry["name"]: entry["template"] for entry in template} if isinstance(template, list) else template
        if tools and "tool_use" in named:
            return named["tool_use"]
        if "default" not in named:
            raise ValueError(f"no 'default' chat template among {sorted(named)}")
        return named["default"]


def configured_added_tokens(tokenizer_config: dict) -> dict[int, str]:
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    return {int(i): token_text(token) for i, token in decoder.items()}


def configured_special_ids(tokenizer_config: dict) -> set[int]:
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    return {int(i) for i, token in decoder.items() if isinstance(token, dict) and token.get("special")}


def read_chat_template(path: str, tokenizer_config: dict):
    """chat_template.jinja wins over the config key, as in transformers."""
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    return tokenizer_config.get("chat_template")


def validate_chat_messages(messages) -> None:
    """One-line ValueError for anything the chat templates cannot render."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"chat messages must be a non-empty list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"chat message {index} must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise ValueError(f"chat message {index} has no 'role'")
        if role not in CHAT_ROLES:
            expected = ", ".join(CHAT_ROLES)
            raise ValueError(f"chat message {index} has unknown role {role!r} (expected one of {expected})")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue  # an assistant turn that only calls tools has no text
        if "content" not in message:
            raise ValueError(f"chat message {index} has no 'content'")
        if not isinstance(content, str):
            raise ValueError(f"chat message {index} content must be a string, got {type(content).__name__}")


def _raise_template_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Unlike jinja2's own tojson, no HTML escaping: prompts are not HTML.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(source)


def render_chat_template(source: str, variables: dict) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return _compile_template(source).render(**variables)
    except TemplateError as error:
        raise ValueError(f"chat template error: {one_line(error)}") from None


class IncrementalDetokenizer:
    """Streams the text of generated tokens, one token at a time.

    vLLM's scheme: only the window `ids[prefix_offset:]` is decoded per token; the text beyond
    `decode(ids[prefix_offset:read_offset])` is new. Text ending in U+FFFD is an incomplete UTF-8
    character (byte-level or byte-fallback tokens), so it is held back until the next token
    completes it. The pieces concatenate to `tokenizer.decode(generated_ids)`, which is what
    transformers prints for a completion, so the prompt is deliberately not used as decoding
    context (a SentencePiece decoder would otherwise keep the first word's leading space);
    `prompt_ids` is accepted for the engine's call signature. A character still incomplete when
    the stream ends is never emitted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        """The text completed by `token_id`, possibly ""."""
        self.ids.append(int(token_id))
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        text = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(text) <= len(prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix_text):]
