"""Prometheus text exposition of the server metrics."""

from __future__ import annotations

import re

import pytest

from premoe.serve.metrics import Counter, Gauge, Histogram, Registry, ServeMetrics

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="([^"\\]|\\.)*",?)*\})? \S+$')


def test_counter_gauge_histogram_render() -> None:
    r = Registry()
    c = r.add(Counter("x_total", "Things.", ("task",)))
    g = r.add(Gauge("depth", "Depth."))
    h = r.add(Histogram("lat_seconds", "Latency.", ("task",), buckets=(0.1, 1.0)))
    c.inc(task="math")
    c.inc(2, task='we"ird\\name\n')
    g.set(3)
    g.dec()
    for v in (0.05, 0.5, 5.0):
        h.observe(v, task="math")
    text = r.render()
    lines = text.splitlines()
    assert "# TYPE x_total counter" in lines and "# TYPE lat_seconds histogram" in lines
    assert 'x_total{task="math"} 1' in lines
    assert 'x_total{task="we\\"ird\\\\name\\n"} 2' in lines
    assert "depth 2" in lines
    assert 'lat_seconds_bucket{task="math",le="0.1"} 1' in lines
    assert 'lat_seconds_bucket{task="math",le="1"} 2' in lines
    assert 'lat_seconds_bucket{task="math",le="+Inf"} 3' in lines
    assert 'lat_seconds_count{task="math"} 3' in lines
    assert 'lat_seconds_sum{task="math"} 5.55' in lines
    assert h.count(task="math") == 3 and h.sum(task="math") == pytest.approx(5.55)
    for line in lines:
        assert line.startswith("#") or SAMPLE.match(line), line
    assert text.endswith("\n")


def test_misuse_is_an_error() -> None:
    c = Counter("c_total", "C.", ("task",))
    with pytest.raises(ValueError):
        c.inc(task="a", other="b")
    with pytest.raises(ValueError):
        c.inc(-1, task="a")
    r = Registry()
    r.add(Gauge("g", "G."))
    with pytest.raises(ValueError):
        r.add(Gauge("g", "again"))


def test_serve_metrics_names() -> None:
    m = ServeMetrics()
    m.swaps.inc()
    m.requests.inc(task="math", endpoint="completions", status="ok")
    text = m.render()
    for name in (
        "premoe_requests_total",
        "premoe_prompt_tokens_total",
        "premoe_generated_tokens_total",
        "premoe_swaps_total",
        "premoe_swap_bytes_total",
        "premoe_swap_seconds_total",
        "premoe_resident_bytes",
        "premoe_queue_depth",
        "premoe_request_latency_seconds",
        "premoe_time_to_first_token_seconds",
    ):
        assert f"# TYPE {name} " in text
    assert "premoe_swaps_total 1" in text


def test_gc_passes_are_timed_while_installed() -> None:
    import gc

    m = ServeMetrics()
    m.gc_pauses.install()
    try:
        gc.collect()  # a full pass
        gc.collect(0)
    finally:
        m.gc_pauses.remove()
    assert m.gc_pauses not in gc.callbacks
    gc.collect()  # not counted: removed
    text = m.render()
    assert 'premoe_gc_pause_seconds_count{generation="2"} 1' in text
    gen0 = re.search(r'premoe_gc_pause_seconds_count\{generation="0"\} (\d+)', text)
    assert gen0 is not None and int(gen0.group(1)) >= 1  # (allocation may add its own)
