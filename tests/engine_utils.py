"""Shared helpers for engine tests: run a set of requests concurrently and collect tokens."""

from __future__ import annotations

import queue

from slora_backend.request import RequestOutput, SamplingParams


def run_batch(engine, jobs: list[dict], timeout: float = 300.0) -> list[list[RequestOutput]]:
    """Submit every job at once (so the engine batches them) and return each one's outputs."""
    queues = []
    for job in jobs:
        q: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit(on_output=q.put, **job)
        queues.append(q)
    results = []
    for q in queues:
        outs = []
        while True:
            out = q.get(timeout=timeout)
            outs.append(out)
            if out.finished:
                break
        results.append(outs)
    return results


def run_staggered(engine, first: list[dict], later: list[dict], after_tokens: int = 2,
                  timeout: float = 300.0) -> list[list[RequestOutput]]:
    """Submit `first`, wait until each has streamed `after_tokens` tokens (so they are
    decoding), then submit `later`: their prefills meet running requests. Outputs of all, in order."""
    queues, results = [], []
    for job in first:
        q: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit(on_output=q.put, **job)
        queues.append(q)
    for q in queues:
        outs = []
        while sum(len(o.token_ids) for o in outs) < after_tokens and not (outs and outs[-1].finished):
            outs.append(q.get(timeout=timeout))
        results.append(outs)
    for job in later:
        q = queue.SimpleQueue()
        engine.submit(on_output=q.put, **job)
        queues.append(q)
        results.append([])
    for q, outs in zip(queues, results, strict=True):
        while not (outs and outs[-1].finished):
            outs.append(q.get(timeout=timeout))
    return results


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def text_of(outputs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outputs)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)
