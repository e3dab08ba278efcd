"""golf/step_graphs.py on CPU, where a "graph" re-runs the captured Python on its static inputs: when
steps are captured and replayed, that replays compute what direct calls do, that the oldest graph
goes first, that the contract (read per-step data only from the inputs) is what a replay keeps, and
what is left after a capture outgrew the graphs' memory pool."""
from __future__ import annotations

import pytest
import torch

from golf.step_graphs import StepGraphs

CPU = torch.device("cpu")


def test_steps_are_captured_after_repeats_and_replay_like_direct_calls():
    total = torch.zeros(4, 3)

    def step(x, w):  # an effect that outlives the step, and an output
        total.add_(x * w)
        return [x.sum(0, keepdim=True) * w]

    graphs = StepGraphs(CPU, capacity=2, after=2)
    expected = torch.zeros(4, 3)
    for i in range(6):
        x, w = torch.full((4, 3), float(i)), torch.tensor(float(i + 1))
        out = graphs(("shape", 4), step, [x, w])
        expected.add_(x * w)
        assert torch.equal(out[0], x.sum(0, keepdim=True) * w)
    assert torch.equal(total, expected)  # every step's effect exactly once
    # first sighting: direct; second: captured (one real run); then four replays
    assert (graphs.captures, graphs.replays) == (1, 4)
    assert graphs.stats() == "graphs:1 captures:1 replays:4 capture_seconds:0.00"  # CPU: nothing recorded


def test_least_recently_used_graph_goes_first():
    graphs = StepGraphs(CPU, capacity=2, after=1)

    def step(x):
        return [x + 1]
    for key in ("a", "b", "a", "c", "a", "b"):  # "c" evicts "b" (a was used after b); "b" comes back
        assert torch.equal(graphs(key, step, [torch.ones(2)])[0], torch.full((2,), 2.0))
    assert list(graphs.graphs) == ["a", "b"] and graphs.captures == 4 and graphs.replays == 2


def test_keys_are_captured_on_their_after_th_sighting_interleaved_or_not():
    graphs = StepGraphs(CPU, capacity=4, after=3)

    def step(x):
        return [x * 2]
    for key in "abcababa":  # a and b are captured at their third sighting, a then replays; c never
        graphs(key, step, [torch.ones(1)])
    assert list(graphs.graphs) == ["b", "a"] and (graphs.captures, graphs.replays) == (2, 1)


def test_a_step_reading_outside_its_inputs_is_frozen_at_capture():
    """The contract made visible: per-step data passed outside `inputs` is what it was at capture."""
    graphs = StepGraphs(CPU, capacity=1, after=1)
    outs = []
    for i in range(3):
        scale = float(i)
        outs.append(graphs("k", lambda x, scale=scale: [x * scale], [torch.ones(1)])[0].item())
    assert outs == [0.0, 0.0, 0.0]  # direct calls would give 0, 1, 2


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="capacity 0"):
        StepGraphs(CPU, capacity=0)


def test_a_key_that_outgrew_the_pool_drops_every_graph_and_is_never_captured_again():
    """What StepGraphs does when a capture outgrows its pool's reservation (a GPU-only event, driven
    here directly): all graphs go with the pool, the others are recaptured when their keys come back,
    and the key that did not fit runs directly from then on, with the same results."""
    graphs = StepGraphs(CPU, capacity=4, after=1)

    def step(x):
        return [x * 3]
    for key in "ab":
        graphs(key, step, [torch.ones(1)])
    graphs._drop_pool("b")
    assert not graphs.graphs and graphs.too_big == {"b"} and graphs.pool_resets == 1
    for key in "abab":
        assert torch.equal(graphs(key, step, [torch.ones(1)])[0], torch.full((1,), 3.0))
    assert list(graphs.graphs) == ["a"] and (graphs.captures, graphs.replays) == (3, 1)
    assert graphs.stats().endswith("pool_resets:1 uncaptured_keys:1")
    assert graphs.summary()["uncaptured_keys"] == 1
