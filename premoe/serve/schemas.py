"""Request models (pydantic, strict) and response builders of the OpenAI-compatible API.

Requests are validated strictly: a string where a number belongs, a float where an integer
belongs, a value out of range or an unknown field is a 400 error in the OpenAI error format
(`{"error": {"message", "type", "param", "code"}}`) that names the field. Fields OpenAI clients
commonly send with neutral values (`n: 1`, `presence_penalty: 0`, `logprobs: null`, `user`) are
accepted; non-neutral values of features premoe does not implement are rejected, never ignored.

premoe's own request extension: `"premoe": {"task": "math"}` serves the request with the named
pattern instead of routing it by its prompt. Every response carries `"premoe": {"task",
"similarity", "fallback", "routed", "routers"}` saying which pattern served it and with which
routers (the store name of its calibrated routers, or "source").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_N = 16
MAX_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PremoeOptions(_Strict):
    """The `premoe` field of a request."""

    task: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


StopStr = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _GenerationRequest(_Strict):
    model: Annotated[str, Field(max_length=512)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    # vLLM's extensions of the OpenAI API, same names and meaning
    top_k: Annotated[int, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] = 1.0
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)] | None = None
    ignore_eos: bool = False
    user: Annotated[str, Field(max_length=512)] | None = None
    premoe: PremoeOptions | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def task(self) -> str | None:
        return self.premoe.task if self.premoe is not None else None


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    echo: Literal[False] = False
    suffix: None = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    def logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=256)]
    name: Annotated[str, Field(max_length=256)] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def logprobs_count(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            return None
        return self.top_logprobs or 0

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )


# ---- errors -------------------------------------------------------------------------------------


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """(one-line message, offending field) for the first error of a pydantic validation."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ())]
    # unions report the branch type in loc ("str", "list[...]"); keep the field path only
    param = ".".join(p for p in loc if p not in _TYPE_TAGS and "[" not in p and "-" not in p)
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        msg = f"unsupported field {param!r}"
    elif kind == "missing":
        msg = f"missing required field {param!r}"
    else:
        msg = f"invalid value for {param!r}: {first.get('msg', 'invalid')}"
    return msg, param or None


# ---- responses ----------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _body(
    rid: str,
    obj: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    *,
    tokens: tuple[int, int] | None = None,
    premoe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The OpenAI envelope: id, object, created, model, choices, then usage (from `tokens` =
    (prompt, completion)) and the `premoe` extension when given."""
    out: dict[str, Any] = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if tokens is not None:
        out["usage"] = usage(*tokens)
    if premoe is not None:
        out["premoe"] = premoe
    return out


def _choice(
    finish_reason: str | None, index: int = 0, logprobs: Any = None, **content: Any
) -> dict[str, Any]:
    """One choice: index, the content (text, message or delta), logprobs, finish_reason."""
    return {"index": index, **content, "logprobs": logprobs, "finish_reason": finish_reason}


@dataclass
class Choice:
    """One generated sequence of a response: its text, why it ended, its logprobs."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: Any = None


def completion_logprobs(
    entries: list[tuple[str, float, list[tuple[str, float]]]], offset: int = 0
) -> dict[str, Any]:
    """The legacy completions `logprobs` object from (token, logprob, top) entries."""
    offsets, at = [], offset
    for tok, _, _ in entries:
        offsets.append(at)
        at += len(tok)
    return {
        "tokens": [t for t, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [dict(top) for _, _, top in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """The chat `logprobs` object (`content`: one entry per token) from (token, logprob, top)."""

    def one(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8", "replace"))}

    return {
        "content": [
            {**one(tok, lp), "top_logprobs": [one(t, v) for t, v in top]}
            for tok, lp, top in entries
        ]
    }


def completion_response(
    rid: str,
    model: str,
    choices: list[Choice],
    prompt_tokens: int,
    premoe: dict[str, Any],
    created: int | None = None,
) -> dict[str, Any]:
    return _body(
        rid,
        "text_completion",
        model,
        created or int(time.time()),
        [_choice(c.finish_reason, i, c.logprobs, text=c.text) for i, c in enumerate(choices)],
        tokens=(prompt_tokens, sum(c.completion_tokens for c in choices)),
        premoe=premoe,
    )


def completion_chunk(
    rid: str,
    model: str,
    text: str,
    finish_reason: str | None,
    premoe: dict[str, Any],
    created: int,
    index: int = 0,
    logprobs: Any = None,
) -> dict[str, Any]:
    choices = [_choice(finish_reason, index, logprobs, text=text)]
    return _body(rid, "text_completion", model, created, choices, premoe=premoe)


def chat_response(
    rid: str,
    model: str,
    choices: list[Choice],
    prompt_tokens: int,
    premoe: dict[str, Any],
    created: int | None = None,
) -> dict[str, Any]:
    return _body(
        rid,
        "chat.completion",
        model,
        created or int(time.time()),
        [
            _choice(
                c.finish_reason,
                i,
                c.logprobs,
                message={"role": "assistant", "content": c.text},
            )
            for i, c in enumerate(choices)
        ],
        tokens=(prompt_tokens, sum(c.completion_tokens for c in choices)),
        premoe=premoe,
    )


def chat_chunk(
    rid: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None,
    premoe: dict[str, Any],
    created: int,
    index: int = 0,
    logprobs: Any = None,
) -> dict[str, Any]:
    choices = [_choice(finish_reason, index, logprobs, delta=delta)]
    return _body(rid, "chat.completion.chunk", model, created, choices, premoe=premoe)


def usage_chunk(
    rid: str, model: str, obj: str, created: int, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return _body(rid, obj, model, created, [], tokens=(prompt_tokens, completion_tokens))
