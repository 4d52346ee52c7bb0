"""Reading `vllm:lora_requests_info`, the metric a publish waits on before it unloads the
version it replaced.

vLLM 0.26 sets the gauge to the current time under labels that list the busy adapters and never
removes a label set: a server that has served a version keeps a sample naming it as running
long after its last request. Seen on a real vLLM: the publish waited for its whole drain timeout
while no request used the old version. The state now is the newest sample."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from serving.metrics import EngineMetrics
from serving.publish import lora_busy_adapters

LABELS = ["max_lora", "waiting_lora_adapters", "running_lora_adapters"]


def vllm_like_metrics(states: list[tuple[str, str]]) -> str:
    """The exposition text of a gauge written as vLLM writes it: one label set per state seen,
    each stamped with the (increasing) time it was last current, none removed."""
    registry = CollectorRegistry()
    gauge = Gauge("vllm:lora_requests_info", "Running stats on lora requests.", LABELS,
                  registry=registry)  # fmt: skip
    for stamp, (waiting, running) in enumerate(states, start=1_764_000_000):
        gauge.labels("6", waiting, running).set(stamp)
    return generate_latest(registry).decode()


def test_the_newest_sample_is_the_state_now() -> None:
    text = vllm_like_metrics([("", "haruhi@v1"), ("haruhi@v2", "haruhi@v1,r16"), ("", "")])
    assert text.count("vllm:lora_requests_info{") == 3  # the past states are all still there
    assert lora_busy_adapters(text) == set()


def test_running_and_waiting_adapters_of_the_newest_sample() -> None:
    text = vllm_like_metrics([("", "haruhi@v1"), ("", ""), ("atri@v3", "haruhi@v2,r16")])
    assert lora_busy_adapters(text) == {"atri@v3", "haruhi@v2", "r16"}


def test_a_state_seen_again_counts_as_the_newest() -> None:
    # back to an earlier label set: prometheus_client updates that sample's value in place
    text = vllm_like_metrics([("", "haruhi@v1"), ("", ""), ("", "haruhi@v1")])
    assert lora_busy_adapters(text) == {"haruhi@v1"}


def test_the_embedded_servers_gauge_reads_the_same() -> None:
    metrics = EngineMetrics("base")
    metrics.set_lora_requests(6, set(), {"haruhi@v1"})
    metrics.set_lora_requests(6, {"xin@v2"}, {"haruhi@v2"})
    assert lora_busy_adapters(generate_latest(metrics.registry).decode()) == {"xin@v2", "haruhi@v2"}
    metrics.set_lora_requests(6, set(), set())
    assert lora_busy_adapters(generate_latest(metrics.registry).decode()) == set()


def test_no_gauge_or_broken_lines_mean_no_busy_adapter() -> None:
    assert lora_busy_adapters("") == set()
    broken = (
        'vllm:lora_requests_info{max_lora="6",running_lora_adapters="a"}\n'  # no value
        'vllm:lora_requests_info{max_lora="6",running_lora_adapters="b" nan-ish\n'  # no brace
        'vllm:lora_requests_info{max_lora="6",running_lora_adapters="c"} not-a-number\n'
    )
    assert lora_busy_adapters(broken) == set()
