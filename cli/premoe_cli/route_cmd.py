"""`premoe route STORE MODEL "prompt"`: which stored pattern a query gets, and why."""

from __future__ import annotations

from typing import Annotated

import typer

from premoe.fingerprint import fingerprint_source
from premoe.load import load_prefix
from premoe.patterns import GLOBAL, PatternStore
from premoe.profile import load_tokenizer
from premoe.route import QueryKeyer, route
from premoe.route.keys import encode_prompt
from premoe.route.retrieve import DEFAULT_THRESHOLD, check_fallback
from premoe.source import resolve_model
from premoe_cli._common import print_json, print_table, read_stdin
from premoe_cli.options import DeviceOpt, DtypeOpt, JsonOpt, ModelArg


def route_command(
    store: Annotated[str, typer.Argument(help="Pattern store folder.", show_default=False)],
    model: ModelArg,
    prompt: Annotated[
        str, typer.Argument(help="The query text ('-' reads it from stdin).", show_default=False)
    ],
    threshold: Annotated[
        float,
        typer.Option(help="Below this similarity the fallback pattern is used."),
    ] = DEFAULT_THRESHOLD,
    fallback: Annotated[
        str,
        typer.Option(help=f"Fallback pattern: {GLOBAL} (all tasks pooled) or a task name."),
    ] = GLOBAL,
    top: Annotated[int, typer.Option(help="Candidates listed.")] = 5,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Route a prompt to the store's pattern that fits it, computing its key with no expert.

    JSON (--json): {"task", "similarity", "fallback", "candidates": [{"task", "similarity"}]}.

    Example: premoe route patterns/qwen3 ./Qwen3-30B-A3B "Integrate x^2 from 0 to 1" --json
    """
    text = read_stdin() if prompt == "-" else prompt
    st = PatternStore.load(store)
    check_fallback(st, fallback)
    src = resolve_model(model)
    try:
        st.check_model(fingerprint_source(src))
        tokenizer = load_tokenizer(src.path)
        encode_prompt(tokenizer, text)  # a bad prompt fails before the weights load
        # only the layers before the first MoE router are read: the key costs no expert
        net = load_prefix(src, device=device, dtype=dtype)
    finally:
        src.close()
    keyer = QueryKeyer.for_store(st, net, tokenizer, check=False)
    result = route(st, keyer, text, threshold=threshold, fallback=fallback, top=top)
    if json_out:
        print_json(result.to_json())
        return
    note = f" (fallback: best similarity < {threshold})" if result.fallback else ""
    typer.echo(f"task: {result.task}  similarity {result.similarity:.4f}{note}")
    print_table(["candidate", "similarity"], [[c.task, c.similarity] for c in result.candidates])
