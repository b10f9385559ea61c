"""The FastAPI application of mindcpm.serve: OpenAI routes over an EngineLoop."""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .engine.serving import EngineLoop, Event, ServedRequest
from .openai_api import (ChatCompletionRequest, CompletionRequest, LogprobFormatter, RequestError, ResponseIds,
                         error_document, usage)

DISCONNECT_POLL_SECONDS = 0.1


def error_response(message: str, status: int) -> JSONResponse:
    return JSONResponse(error_document(message, status), status_code=status)


def sse(document) -> str:
    return f"data: {json.dumps(document, ensure_ascii=False)}\n\n"


class Routes:
    def __init__(self, llm, engine: EngineLoop, model_name: str, defaults: dict):
        self.llm = llm
        self.engine = engine
        self.model_name = model_name
        self.defaults = {"temperature": 1.0, **defaults}  # OpenAI's default temperature, or the checkpoint's

    # -- checks -----------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.model_name!r}")

    def check_prompt(self, ids: list[int]) -> None:
        try:
            self.llm.check_prompt(ids)
        except ValueError as e:
            raise RequestError(str(e)) from None

    # -- endpoints ---------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, http: Request):
        self.check_model(body.model)
        prompt = body.single_prompt()
        ids = self.llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids)
        params = body.sampling_params(self.defaults, body.max_tokens, body.logprobs)
        return await self.respond(http, ids, params, body, chat=False)

    async def chat(self, body: ChatCompletionRequest, http: Request):
        from jinja2 import TemplateError
        self.check_model(body.model)
        try:
            ids = self.llm.chat_prompt(body.plain_messages(), body.enable_thinking(), body.add_generation_prompt)
        except (ValueError, TypeError, TemplateError) as e:
            raise RequestError(str(e)) from None
        self.check_prompt(ids)
        given = [v for v in (body.max_completion_tokens, body.max_tokens) if v is not None]
        max_tokens = given[0] if given else self.llm.max_model_len - len(ids)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(self.defaults, max_tokens, top)
        return await self.respond(http, ids, params, body, chat=True)

    async def respond(self, http: Request, ids, params, body, chat: bool):
        request = ServedRequest(ids, params, asyncio.get_running_loop())
        if not self.engine.submit(request):
            return error_response(f"the server is at capacity ({self.engine.capacity} requests running or "
                                  f"waiting); retry later", 503)
        if body.stream:
            return StreamingResponse(self.stream(http, request, body, chat), media_type="text/event-stream")
        return await self.complete(http, request, body, chat)

    # -- answers -----------------------------------------------------------------------------
    async def events(self, http: Request, request: ServedRequest) -> AsyncIterator[Event]:
        """The request's events until it finishes; a client that leaves first aborts it."""
        finished = False
        checked = time.monotonic()
        try:
            while True:
                # The client is asked whether it is still there every DISCONNECT_POLL_SECONDS, also
                # while tokens keep coming: a non-streaming answer of a fast model never goes quiet.
                try:
                    event = await asyncio.wait_for(request.events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL_SECONDS or event is None:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                if event is None:
                    continue
                finished = event.finished
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.engine.abort(request)

    async def complete(self, http: Request, request: ServedRequest, body, chat: bool):
        text, token_ids, entries, last = "", [], [], None
        events = self.events(http, request)
        try:
            async for event in events:
                if event.error:
                    return error_response(event.error, 400)
                text += event.delta
                token_ids += event.token_ids
                entries += event.logprobs
                last = event
        finally:
            await events.aclose()
        if last is None:  # the client left
            return Response(status_code=499)
        ids = ResponseIds("chatcmpl" if chat else "cmpl", self.model_name)
        choice = self.choice(chat, text, token_ids, entries, last, request, 0, message=True)
        return ids.document("chat.completion" if chat else "text_completion", [choice],
                            usage(last.num_prompt_tokens, last.num_completion_tokens))

    async def stream(self, http: Request, request: ServedRequest, body, chat: bool) -> AsyncIterator[str]:
        ids = ResponseIds("chatcmpl" if chat else "cmpl", self.model_name)
        kind = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            yield sse(ids.document(kind, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]))
        offset, last = 0, None
        events = self.events(http, request)
        try:
            async for event in events:
                if event.error:
                    yield sse(error_document(event.error, 400))
                    break
                last = event
                if event.delta or event.finished or (request.params.logprobs is not None and event.token_ids):
                    choice = self.choice(chat, event.delta, event.token_ids, event.logprobs, event, request, offset)
                    yield sse(ids.document(kind, [choice]))
                offset += len(event.delta)
        finally:
            await events.aclose()
        if last is not None and body.include_usage:
            yield sse(ids.document(kind, [], usage(last.num_prompt_tokens, last.num_completion_tokens)))
        yield "data: [DONE]\n\n"

    def choice(self, chat: bool, text: str, token_ids, entries, event: Event, request: ServedRequest,
               offset: int, message: bool = False) -> dict:
        """One choice of a response (message=True) or of a stream chunk."""
        top = request.params.logprobs
        logprobs = None
        if top is not None:
            fmt = LogprobFormatter(self.llm.tokenizer, top)
            logprobs = {"content": fmt.chat(token_ids, entries)} if chat else fmt.completion(token_ids, entries, offset)
        choice = {"index": 0, "logprobs": logprobs, "finish_reason": event.finish_reason,
                  "stop_reason": event.stop_reason}
        if not chat:
            choice["text"] = text
        elif message:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["delta"] = {"content": text} if text else {}
        return choice

    # -- service ---------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "mindcpm", "max_model_len": self.llm.max_model_len}]}

    def health(self) -> Response:
        alive = self.engine.thread.is_alive()
        return Response(status_code=200 if alive else 503)

    def metrics(self) -> Response:
        return Response(generate_latest(self.engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def build_app(llm, engine: EngineLoop, model_name: str, defaults: dict) -> FastAPI:
    routes = Routes(llm, engine, model_name, defaults)
    app = FastAPI(title="mindcpm", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(f"the request body is not valid JSON ({first.get('ctx', {}).get('error')})", 400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request body"
        return error_response(f"{where}: {first.get('msg', 'invalid request')}", 400)

    @app.exception_handler(RequestError)
    async def bad_request(_request, exc: RequestError):
        return error_response(str(exc), 400)

    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat)
    app.get("/v1/models")(routes.models)
    app.get("/health")(routes.health)
    app.get("/metrics")(routes.metrics)
    return app
