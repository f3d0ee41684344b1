"""The benchmark harness's interleaving (``benchmarks/timing.py``): every competitor gets its repeats, in turns."""

from benchmarks import timing
from benchmarks.timing import measure


def test_measure_runs_each_competitor_in_blocks_taking_turns():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or name) for name in "ab"}
    m = measure(fns, warmup=1, repeats=5, block=2)
    assert calls[:2] == ["a", "b"]  # warm-up, one call each
    assert "".join(calls[2:]) == "aabb" + "bbaa" + "ab"  # blocks of 2, order reversed every round, 5 each
    assert {k: len(v) for k, v in m.samples.items()} == {"a": 5, "b": 5}
    assert m.last == {"a": "a", "b": "b"}


def test_measure_pauses_before_each_block(monkeypatch):
    events = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: events.append(f"sleep {s}"))
    fns = {name: (lambda name=name: events.append(name)) for name in "ab"}
    timing.measure(fns, warmup=0, repeats=3, block=2, settle_s=0.5)
    assert events == ["sleep 0.5", "a", "a", "sleep 0.5", "b", "b", "sleep 0.5", "b", "sleep 0.5", "a"]
