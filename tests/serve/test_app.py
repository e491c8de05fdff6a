"""The streaming helpers of premoe/serve/app.py (the server itself: test_server.py)."""

from __future__ import annotations

import json
from functools import partial

import pytest
from starlette.requests import Request

from premoe.serve.app import _sse, _sse_template, _stream_watches_disconnect
from premoe.serve.schemas import chat_chunk, completion_chunk

TEXTS = ["", "a", ' "quoted" \\ back', "line\nbreak\ttab", "ünï©ødé 漢字 🙂", "\x00", "data: x\n\n"]
PREMOE = {"task": "math", "similarity": 0.93, "routers": "calibrated", "dropped_mass": None}


@pytest.mark.parametrize("chat", [False, True])
def test_a_delta_template_writes_what_the_chunk_serializes_to(chat: bool) -> None:
    def chunk(text: str, index: int) -> dict[str, object]:
        if chat:
            return chat_chunk("chatcmpl-1", "m", {"content": text}, None, PREMOE, 7, index)
        return completion_chunk("cmpl-1", "m", text, None, PREMOE, 7, index)

    for index in (0, 3):
        fill = _sse_template(partial(chunk, index=index))
        for text in TEXTS:
            out = fill(text)
            assert out == _sse(chunk(text, index))
            assert json.loads(out[len(b"data: ") :])["choices"][0]["index"] == index


@pytest.mark.parametrize(
    ("scope", "watches"),
    [
        ({"asgi": {"spec_version": "2.3"}}, True),
        ({}, True),
        ({"asgi": {"spec_version": "2.4"}}, False),
    ],
)
def test_the_stream_polls_for_a_disconnect_only_where_starlette_does_not_listen(
    scope: dict[str, object], watches: bool
) -> None:
    assert _stream_watches_disconnect(Request({"type": "http", **scope})) is watches
