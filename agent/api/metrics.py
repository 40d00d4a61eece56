"""The API's own counters and histograms, and the Prometheus text format for /metrics.

Small and dependency-free: the agent keeps a handful of series, so a dict per metric is enough.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


class Histogram:
    """Cumulative-bucket histogram of seconds."""

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1


class ApiMetrics:
    """What the API counts: requests by endpoint and status, tokens, in-flight, latency and TTFT."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.duration: dict[str, Histogram] = defaultdict(Histogram)
        self.ttft: dict[str, Histogram] = defaultdict(Histogram)
        self.tokens: dict[str, int] = defaultdict(int)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.disconnects = 0
        self.in_flight = 0

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        """A response finished (or the client left)."""
        self.requests[(endpoint, status)] += 1
        self.duration[endpoint].observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        """Time from the request's arrival to its first generated token."""
        self.ttft[model].observe(seconds)

    def finished(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """A generation ended: count its tokens."""
        self.tokens[model] += completion_tokens
        self.prompt_tokens[model] += prompt_tokens

    def render(self, runtime_metrics: dict[str, float]) -> str:
        """Prometheus text exposition format 0.0.4."""
        out: list[str] = []
        _family(out, "hearth_api_requests_total", "counter", "API requests by endpoint and HTTP status.")
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f'hearth_api_requests_total{{endpoint="{_esc(endpoint)}",status="{status}"}} {n}')
        _family(out, "hearth_api_requests_in_flight", "gauge", "Requests being answered now.")
        out.append(f"hearth_api_requests_in_flight {self.in_flight}")
        _family(out, "hearth_api_client_disconnects_total", "counter", "Generations stopped because the client left.")
        out.append(f"hearth_api_client_disconnects_total {self.disconnects}")
        _family(out, "hearth_api_generated_tokens_total", "counter", "Tokens generated, by model.")
        for model, n in sorted(self.tokens.items()):
            out.append(f'hearth_api_generated_tokens_total{{model="{_esc(model)}"}} {n}')
        _family(out, "hearth_api_prompt_tokens_total", "counter", "Prompt tokens processed, by model.")
        for model, n in sorted(self.prompt_tokens.items()):
            out.append(f'hearth_api_prompt_tokens_total{{model="{_esc(model)}"}} {n}')
        _histograms(out, "hearth_api_request_duration_seconds", "Time to answer a request, by endpoint.",
                    "endpoint", self.duration)
        _histograms(out, "hearth_api_time_to_first_token_seconds", "Time from request to first token, by model.",
                    "model", self.ttft)
        for name, value in sorted(runtime_metrics.items()):
            metric = "hearth_" + _NAME_BAD.sub("_", name)
            out.append(f"# TYPE {metric} {'counter' if metric.endswith('_total') else 'gauge'}")
            out.append(f"{metric} {float(value)!r}")
        return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, help: str) -> None:
    out.append(f"# HELP {name} {help}")
    out.append(f"# TYPE {name} {kind}")


def _histograms(out: list[str], name: str, help: str, label: str, series: dict[str, Histogram]) -> None:
    _family(out, name, "histogram", help)
    for key, h in sorted(series.items()):
        lab = f'{label}="{_esc(key)}"'
        running = 0
        for bound, n in zip(_BUCKETS, h.counts, strict=False):
            running += n
            out.append(f'{name}_bucket{{{lab},le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{{lab},le="+Inf"}} {h.count}')
        out.append(f"{name}_sum{{{lab}}} {h.sum!r}")
        out.append(f"{name}_count{{{lab}}} {h.count}")


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
