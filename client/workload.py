"""S-LoRA's synthetic workload: Gamma arrivals, power-law adapter popularity, uniform lengths.

    trace = make_trace(WorkloadSpec(n_adapters=1000, rate=10, duration=60, cv=1, alpha=1))

Arrivals: inter-arrival gaps ~ Gamma(shape=1/cv^2, scale=cv^2/rate) (cv=1 is Poisson).
Adapter of a request: floor(n * X) with X ~ numpy power(alpha) (alpha=1 uniform, smaller alpha
skews toward low ids). Input and output lengths: uniform integers in [8, 512]; outputs are
generated to exactly that length (ignore_eos). Prompts are random token ids.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class WorkloadSpec:
    n_adapters: int
    rate: float  # requests per second
    duration: float  # seconds of arrivals
    cv: float = 1.0
    alpha: float = 1.0
    input_range: tuple[int, int] = (8, 512)
    output_range: tuple[int, int] = (8, 512)
    vocab: int = 32000
    seed: int = 0


@dataclass
class TraceRequest:
    arrival: float  # seconds after the start
    adapter: str | None  # None = base model
    prompt_ids: list[int]
    output_len: int


def adapter_name(i: int) -> str:
    return f"adapter-{i:05d}"


def make_trace(spec: WorkloadSpec) -> list[TraceRequest]:
    rng = np.random.default_rng(spec.seed)
    shape, scale = 1.0 / spec.cv**2, spec.cv**2 / spec.rate
    trace, t = [], 0.0
    while True:
        t += float(rng.gamma(shape, scale))
        if t >= spec.duration:
            return trace
        idx = min(int(spec.n_adapters * rng.power(spec.alpha)), spec.n_adapters - 1) if spec.n_adapters else -1
        n_in = int(rng.integers(spec.input_range[0], spec.input_range[1] + 1))
        n_out = int(rng.integers(spec.output_range[0], spec.output_range[1] + 1))
        prompt = rng.integers(1, spec.vocab, size=n_in).tolist()
        trace.append(TraceRequest(t, adapter_name(idx) if idx >= 0 else None, prompt, n_out))


@dataclass
class RequestTiming:
    arrival: float  # when it was sent (seconds since start)
    first_token: float | None = None  # seconds after arrival
    latency: float | None = None  # seconds after arrival, to the last token
    output_tokens: int = 0
    error: str | None = None


@dataclass
class Report:
    requests: int
    finished: int
    errors: int
    duration: float  # from the first arrival to the last finish
    throughput_req_s: float
    throughput_tok_s: float
    latency_avg: float
    latency_p50: float
    latency_p90: float
    latency_p99: float
    first_token_avg: float
    first_token_p99: float
    slo_attainment: float  # share of requests with a first token within slo_s (errors miss)
    slo_s: float = 6.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(timings: list[RequestTiming], slo_s: float = 6.0) -> Report:
    done = [t for t in timings if t.error is None and t.latency is not None]
    if not timings:
        raise ValueError("no requests")
    end = max((t.arrival + t.latency for t in done), default=0.0)
    start = min(t.arrival for t in timings)
    span = max(end - start, 1e-9)
    lat = np.array([t.latency for t in done]) if done else np.array([math.nan])
    ftl = np.array([t.first_token for t in done if t.first_token is not None]) if done else np.array([math.nan])
    within = sum(1 for t in done if t.first_token is not None and t.first_token <= slo_s)
    return Report(
        requests=len(timings), finished=len(done), errors=sum(1 for t in timings if t.error is not None),
        duration=span, throughput_req_s=len(done) / span,
        throughput_tok_s=sum(t.output_tokens for t in done) / span,
        latency_avg=float(lat.mean()), latency_p50=float(np.percentile(lat, 50)),
        latency_p90=float(np.percentile(lat, 90)), latency_p99=float(np.percentile(lat, 99)),
        first_token_avg=float(ftl.mean()), first_token_p99=float(np.percentile(ftl, 99)),
        slo_attainment=within / len(timings), slo_s=slo_s,
    )
