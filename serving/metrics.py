"""Prometheus metrics under vLLM's names, so one dashboard reads both engines."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


class EngineMetrics:
    """The metrics of one server, in their own registry (owned by the app, not the module)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=self.registry,
        )
        self._lora_labels: tuple[str, str, str] | None = None
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels,
            registry=self.registry,
        ).labels(model_name)

    def set_lora_requests(self, max_lora: int, waiting: set[str], running: set[str]) -> None:
        """vLLM's gauge: its labels list the adapters with requests waiting/running, its value
        is when that state was last current. vLLM leaves every past label set in place (readers
        take the latest sample, `serving.publish.lora_busy_adapters`); this server keeps only
        the current one."""
        labels = (str(max_lora), ",".join(sorted(waiting)), ",".join(sorted(running)))
        if labels == self._lora_labels:
            return
        if self._lora_labels is not None:
            self.lora_info.remove(*self._lora_labels)
        self.lora_info.labels(*labels).set_to_current_time()
        self._lora_labels = labels
