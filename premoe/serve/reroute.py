"""Wiring miss-aware serving into the engine: `attach` gives the engine's continuous decoder a
`SlotMiss` (premoe.serve.miss) with the per-request dropped mass reported to responses and
/metrics, and, with ``--miss-policy reroute``, the `Rerouter` decision (retrieval on a row's
recent text) that moves a request to a better pattern."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from premoe.errors import UsageError
from premoe.load.miss import DroppedMass
from premoe.serve.miss import GLOBAL_PATTERN, Reroute, RowMeter, SlotMiss
from premoe.serve.requests import GenRequest, RouteInfo

if TYPE_CHECKING:
    from premoe.serve.continuous import Seq

log = logging.getLogger(__name__)


class Rerouter:
    """The ``reroute`` decision of a served request: retrieval on its recent text (the last
    `context` tokens of prompt + generated); a pattern that already failed the request is not
    taken again, the pooled `fallback` is instead (once)."""

    def __init__(
        self,
        route: Callable[[str], RouteInfo],
        tokenizer: Any,
        patterns: Sequence[str],
        *,
        context: int,
        fallback: str | None,
    ) -> None:
        self.route = route
        self.tokenizer = tokenizer
        self.patterns = set(patterns)
        self.context = context
        self.fallback = fallback

    def __call__(self, seq: Seq, mass: float) -> Reroute | None:
        req = seq.sink
        if not isinstance(req, GenRequest) or seq.pattern is None:
            return None
        if req.route is not None and not req.route.routed:
            return None  # the client named its pattern: keep it
        ids = list(req.prompt_ids) + list(seq.stream.ids[: seq.generated])
        text = self.tokenizer.decode(ids[-self.context :], skip_special_tokens=True)
        try:
            found = self.route(text)
        except Exception:  # no key for this text: keep the pattern
            log.debug("reroute: retrieval failed", exc_info=True)
            return None
        tried = {seq.pattern} | {s.from_task for s in req.switches}
        target, reason = found.task, "retrieval"
        if target in tried or target not in self.patterns:
            if self.fallback is None or self.fallback in tried:
                return None
            target, reason = self.fallback, "fallback"
        return Reroute(seq.generated, seq.pattern, target, mass, found.similarity, reason)


def attach(engine: Any, model: Any, source: Any) -> SlotMiss | None:
    """Meter (and, with ``reroute``, check) the engine's continuous decoder; None when the
    configuration asks for neither. Raises `UsageError` for what serving cannot do."""
    cfg = engine.config
    reroute = cfg.miss_policy == "reroute"
    if engine.cont is None:
        if reroute:
            raise UsageError("--miss-policy reroute needs the continuous scheduler")
        return None
    if not (cfg.meter or reroute):
        return None
    if reroute and engine._router is None:
        raise UsageError(
            "--miss-policy reroute needs retrieval: a store with router_input keys "
            "(re-profile with --key router_input)"
        )
    meter = RowMeter(model, source, engine.patterns)
    meter.attach()
    metrics = engine.metrics
    miss = SlotMiss(meter, engine.cont.slots, window=cfg.miss_window, threshold=cfg.miss_threshold)
    rerouter: Rerouter | None = None
    if reroute:
        fallback = GLOBAL_PATTERN if GLOBAL_PATTERN in engine.patterns else None
        rerouter = Rerouter(
            engine._route,
            engine.tokenizer,
            list(engine.patterns),
            context=2 * cfg.miss_window,
            fallback=fallback,
        )

        def decide(seq: Seq, mass: float) -> bool:
            assert rerouter is not None
            switch = rerouter(seq, mass)
            if switch is None:
                return False
            req = seq.sink
            assert isinstance(req, GenRequest)
            req.switches.append(switch)
            req.route = RouteInfo(switch.to_task, switch.similarity, switch.reason == "fallback")
            metrics.reroutes.inc(**{"from": switch.from_task, "to": switch.to_task})
            log.info(
                "request %s: reroute at token %d: %s -> %s (dropped mass %.3f, %s)",
                req.id,
                switch.at_token,
                switch.from_task,
                switch.to_task,
                mass,
                switch.reason,
            )
            return True

        miss.decide = decide

    def on_mass(seq: Seq, mass: DroppedMass) -> None:
        req = seq.sink
        if not isinstance(req, GenRequest):
            return
        req.dropped_mass = mass
        if mass.tokens > 0:
            metrics.dropped_mass.observe(mass.mean, task=req.task)

    miss.on_mass = on_mass
    engine.cont.set_miss(miss)
    return miss


__all__ = ["Rerouter", "attach"]
