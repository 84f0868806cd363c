"""Command line: `python -m client generate ...` and `python -m client perf-data ...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from client.perf_data import make_perf_data, parse_adapters, write_perf_data
from client.triton_client import (
    DEFAULT_URLS,
    MODEL_NAME,
    GenerationError,
    generate,
    stream_generate,
    upload_adapter,
)

log = logging.getLogger("client")


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m client", description="Client for the slora model on tritonserver."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion to stdout")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", "-p", help="prompt text (`-` reads stdin)")
    src.add_argument("--input-ids", type=_int_list, help="prompt token ids: '1,2,3'")
    g.add_argument("--adapter", "-a", default=None, help="adapter name (default: base model)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-tokens", "-n", type=int, default=128)
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--protocol", "-i", choices=("grpc", "http"), default="grpc")
    g.add_argument("--url", "-u", default=None,
                   help=f"server address (default {DEFAULT_URLS['grpc']} for grpc, "
                        f"{DEFAULT_URLS['http']} for http)")
    g.add_argument("--model", "-m", default=MODEL_NAME)
    g.add_argument("--no-stream", action="store_true", help="one response with the whole text")
    g.add_argument("--timeout", type=float, default=600.0)
    g.add_argument("--show-ids", action="store_true", help="print the token ids to stderr")
    g.add_argument("--quiet", "-q", action="store_true", help="no summary line on stderr")

    a = sub.add_parser("adapters", help="list, load, unload or upload adapters on the running server")
    a.add_argument("action", choices=["list", "load", "unload", "upload"])
    a.add_argument("name", nargs="?", help="adapter name (load, unload, upload)")
    a.add_argument("dir", nargs="?", help="upload: PEFT adapter directory "
                   "(adapter_config.json + adapter_model.safetensors)")
    a.add_argument("--protocol", "-i", choices=["grpc", "http"], default="grpc")
    a.add_argument("--url", "-u", default=None)
    a.add_argument("--model", "-m", default="slora")

    p = sub.add_parser("perf-data", help="write perf_analyzer --input-data JSON")
    p.add_argument("--adapters", default="",
                   help="comma-separated adapter names, cycled; empty item or 'base' = base model")
    p.add_argument("--input-len", type=int, required=True, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, required=True, help="generated tokens per request")
    p.add_argument("--count", type=int, default=64, help="number of entries")
    p.add_argument("--vocab-size", type=int, default=49152, help="token ids drawn below this")
    p.add_argument("--min-token-id", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True)
    return ap


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    inputs = dict(
        text_input=prompt, input_ids=args.input_ids, adapter_id=args.adapter,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop,
        ignore_eos=True if args.ignore_eos else None,
        stream=False if args.no_stream else None, chat=True if args.chat else None,
    )
    t0 = time.perf_counter()
    first = None
    n_tokens = 0
    ids: list[int] = []
    reason = None
    out = sys.stdout
    try:
        for text, token_ids, finish in stream_generate(
            args.url, args.protocol, model=args.model, timeout=args.timeout, **inputs
        ):
            if first is None and (text or token_ids):
                first = time.perf_counter() - t0
            out.write(text)
            out.flush()
            n_tokens += len(token_ids)
            ids.extend(token_ids)
            reason = finish or reason
    except GenerationError as e:
        if first is not None:
            out.write("\n")
            out.flush()
        log.error("error: %s", e)
        return 1
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    out.write("\n")
    out.flush()
    total = time.perf_counter() - t0
    if args.show_ids:
        log.info("token_ids: %s", ids)
    if not args.quiet:
        log.info("[%s, %d tokens, first token %.0f ms, total %.2f s]", reason, n_tokens,
                 (first or total) * 1e3, total)
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    """One JSON answer from the model's `command` input, printed to stdout."""
    if args.action != "list" and not args.name:
        print(f"adapters {args.action} needs an adapter name", file=sys.stderr)
        return 2
    if args.action == "upload" and not args.dir:
        print("adapters upload needs NAME and DIR", file=sys.stderr)
        return 2
    inputs = {"command": f"{args.action}_adapter" + ("s" if args.action == "list" else "")}
    if args.name:
        inputs["adapter_id"] = args.name
    try:
        if args.action == "upload":
            result = upload_adapter(args.name, args.dir, args.url, args.protocol, model=args.model)
        else:
            result = json.loads(generate(args.url, args.protocol, model=args.model, stream=False, **inputs).text)
    except GenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


def cmd_perf_data(args: argparse.Namespace) -> int:
    adapters = parse_adapters(args.adapters)
    doc = make_perf_data(adapters, args.input_len, args.output_len, args.count,
                         vocab_size=args.vocab_size, min_token_id=args.min_token_id,
                         seed=args.seed)
    path = write_perf_data(args.out, doc)
    log.info("wrote %s: %d entries, input %d tokens, output %d tokens, adapters %s", path,
             args.count, args.input_len, args.output_len,
             ",".join(a or "<base>" for a in adapters))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "adapters":
        return cmd_adapters(args)
    return cmd_perf_data(args)
