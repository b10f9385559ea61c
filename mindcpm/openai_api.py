"""The OpenAI API's request bodies (pydantic) and response documents, and their mapping onto
SamplingParams and engine events. Fields the API has and mindcpm does not honour are refused
with a 400 rather than silently ignored; unknown extra fields are ignored, as in vLLM."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict

from .sampling import SamplingParams

# Sampling fields shared by both endpoints, passed to SamplingParams when given (vLLM extras included).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos",
                   "include_stop_str_in_output", "skip_special_tokens")


class RequestError(ValueError):
    """An invalid request: answered with 400 and this message."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    def sampling_params(self, defaults: dict, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if self.n != 1:
            raise RequestError(f"n must be 1 (one choice per request), got {self.n}")
        values = dict(defaults)
        values.update({k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None})
        try:
            return SamplingParams(max_tokens=max_tokens, stop=self.stop, logprobs=logprobs, **values)
        except (ValueError, TypeError) as e:
            raise RequestError(str(e)) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError(f"one prompt per request, got a list of {len(prompt)}")
            prompt = prompt[0]
        if self.echo:
            raise RequestError("echo is not supported")
        if not prompt:
            raise RequestError("prompt is empty")
        return prompt


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def plain_messages(self) -> list[dict]:
        """The messages with OpenAI's list-of-parts content joined into one string."""
        out = []
        for i, message in enumerate(self.messages):
            content = message.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise RequestError(f"message {i}: only text content parts are supported")
                message = {**message, "content": "".join(str(p.get("text", "")) for p in content)}
            out.append(message)
        return out

    def enable_thinking(self) -> bool | None:
        value = (self.chat_template_kwargs or {}).get("enable_thinking")
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"chat_template_kwargs.enable_thinking must be true or false, got {value!r}")
        return value


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


def error_document(message: str, status: int) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return {"error": ErrorBody(message=message, type=kind, code=status).model_dump()}


# -- responses --------------------------------------------------------------------------------
class ResponseIds:
    """The id, creation time and model name every chunk of one response repeats."""

    def __init__(self, prefix: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def document(self, obj: Literal["text_completion", "chat.completion", "chat.completion.chunk"],
                 choices: list, usage: dict | None = None) -> dict:
        doc = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            doc["usage"] = usage
        return doc


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class LogprobFormatter:
    """vLLM entries {token id: logprob} -> the OpenAI shapes of either endpoint."""

    def __init__(self, tokenizer, top: int):
        self.tokenizer = tokenizer
        self.top = top

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _top(self, entry: dict) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[: self.top]

    def chat(self, token_ids: list[int], entries: list[dict]) -> list[dict]:
        def item(t, lp):
            s = self.text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return [{**item(t, e[t]), "top_logprobs": [item(i, lp) for i, lp in self._top(e)]}
                for t, e in zip(token_ids, entries)]

    def completion(self, token_ids: list[int], entries: list[dict], text_offset: int) -> dict:
        tokens = [self.text(t) for t in token_ids]
        offsets = []
        for s in tokens:
            offsets.append(text_offset)
            text_offset += len(s)
        return {"tokens": tokens, "token_logprobs": [e[t] for t, e in zip(token_ids, entries)],
                "top_logprobs": [{self.text(i): lp for i, lp in self._top(e)} for e in entries],
                "text_offset": offsets}

