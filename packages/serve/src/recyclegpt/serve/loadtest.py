"""Load-bench a running recyclegpt-serve: requests/s and latency per decoder and concurrency.

    python -m recyclegpt.serve.loadtest --url http://127.0.0.1:8000 --concurrency 1 8 \\
        --decoding standard alternating speculative --model-dir DIR

With --model-dir it also times model.generate in this process on the same prompts (run it on the
server's machine, with the server idle) and reports the server's overhead over that direct call.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import httpx
from jsonargparse import ArgumentParser

from recyclegpt.core import DECODING_MODES
from recyclegpt.core.quantize import QUANTIZE_CHOICES

OPENERS = (
    "Once upon a time, a little robot",
    "The girl named Lily wanted to",
    "In the middle of the forest there was",
    "Tom the cat looked at the moon and",
    "Every morning the baker would",
    "The old ship sailed towards",
    "When the rain stopped, the children",
    "A tiny dragon lived under the bridge and",
)


def prompt(i: int) -> str:
    return f"{OPENERS[i % len(OPENERS)]} (story {i})"


@dataclass
class Run:
    decoding: str
    concurrency: int
    latencies: list[float]
    generate_seconds: list[float]  # the worker's own model.generate time per request
    completion_tokens: int
    wall: float
    texts: dict[int, str]  # request index -> its answer

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.wall

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _one(client: httpx.AsyncClient, i: int, decoding: str, max_tokens: int) -> tuple[float, float, int, str]:
    body = {"prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0, "decoding": decoding}
    start = time.perf_counter()
    response = await client.post("/v1/completions", json=body)
    latency = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"request {i} failed with {response.status_code}: {response.text}")
    data = response.json()
    return (
        latency,
        data["recyclegpt"]["generate_seconds"],
        data["usage"]["completion_tokens"],
        data["choices"][0]["text"],
    )


async def bench(url: str, headers: dict, decoding: str, concurrency: int, requests: int, max_tokens: int) -> Run:
    """``requests`` requests from ``concurrency`` clients, each sending its next one when answered."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        await _one(client, 0, decoding, max_tokens)  # warm-up
        todo = iter(range(requests))
        results: list[tuple[float, float, int, str]] = []
        texts: dict[int, str] = {}

        async def worker() -> None:
            for i in todo:
                results.append(await _one(client, i, decoding, max_tokens))
                texts[i] = results[-1][3]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Run(
        decoding, concurrency, [r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results), wall, texts
    )


def direct_generate_seconds(
    model_dir: str,
    dtype: str,
    cpu_threads: int | None,
    decoding: str,
    requests: int,
    max_tokens: int,
    quantize: str = "none",
) -> list[float]:
    """model.generate timed in this process on the same prompts the server got, with the weights
    ``quantize`` makes of them (give what the server was started with)."""
    import torch

    from recyclegpt.core import RecycleGPT

    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    # from_pretrained resolves auto as the server's worker does
    model = RecycleGPT.from_pretrained(model_dir, dtype=dtype, device=device, quantize=quantize, fuse=True)
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    seconds = []
    for i in range(-1, requests):  # -1: warm-up
        ids = torch.tensor([tokenizer(prompt(max(i, 0)))["input_ids"]], device=device)
        start = time.perf_counter()
        model.generate(ids, max_tokens, decoding=decoding, temperature=0.0, eos_token_id=eos)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 0:
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m recyclegpt.serve.loadtest", description=__doc__)
    parser.add_argument("--url", type=str, default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", type=str | None, default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decoding", type=Literal[DECODING_MODES], nargs="+", default=list(DECODING_MODES))
    parser.add_argument("--requests", type=int, default=32, help="requests per (decoding, concurrency) cell")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=str | None, default=None, help="also time model.generate directly")
    parser.add_argument("--dtype", type=Literal["auto", "bf16", "fp32"], default="auto", help="for the direct run")
    parser.add_argument("--cpu-threads", type=int | None, default=None, help="for the direct run")
    parser.add_argument(
        "--quantize",
        type=Literal[QUANTIZE_CHOICES],
        default="none",
        help="for the direct run: the server's --quantize, so that both decode the same weights",
    )
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        httpx.get(f"{args.url}/health", headers=headers, timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        print(f"loadtest: error: the server at {args.url} is not healthy: {err}", file=sys.stderr)
        sys.exit(1)

    from recyclegpt.core.precision import hardware_summary

    print(hardware_summary())
    print(f"{args.requests} requests per row, max_tokens={args.max_tokens}, greedy, /v1/completions")
    print(
        "| decoding | clients | req/s | vs 1 client | tokens/s | p50 latency ms | vs 1 client | p95 latency ms "
        "| p50 worker ms (admitted to done) | answers = 1-client answers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    single: dict[str, Run] = {}
    for decoding in args.decoding:
        for concurrency in args.concurrency:
            run = asyncio.run(bench(args.url, headers, decoding, concurrency, args.requests, args.max_tokens))
            if concurrency == 1:
                single[decoding] = run
            alone = single.get(decoding)
            same, speed, slower = "", "", ""
            if alone is not None:
                differ = sum(run.texts[i] != alone.texts[i] for i in run.texts)
                same = "yes" if differ == 0 else f"NO: {differ} of {len(run.texts)} differ"
                speed = f"{run.requests_per_second / alone.requests_per_second:.2f}x"
                slower = f"{run.percentile(0.5) / alone.percentile(0.5):.2f}x"
            print(
                f"| {decoding} | {concurrency} | {run.requests_per_second:.2f} | {speed} "
                f"| {run.completion_tokens / run.wall:.1f} | {1000 * run.percentile(0.5):.1f} | {slower} "
                f"| {1000 * run.percentile(0.95):.1f} | {1000 * statistics.median(run.generate_seconds):.1f} | {same} |",
                flush=True,
            )
    if not single:
        return
    print("\nServer overhead at 1 client (p50 latency minus the p50 of a plain model.generate on the same prompts):")
    print("| decoding | p50 latency ms | p50 worker generate ms | p50 direct generate ms | overhead ms |")
    print("|---|---|---|---|---|")
    for decoding, run in single.items():
        direct = "n/a"
        overhead = 1000 * (run.percentile(0.5) - statistics.median(run.generate_seconds))  # vs the worker's own call
        if args.model_dir:
            seconds = direct_generate_seconds(
                args.model_dir, args.dtype, args.cpu_threads, decoding, args.requests, args.max_tokens, args.quantize
            )
            direct = f"{1000 * statistics.median(seconds):.1f}"
            overhead = 1000 * (run.percentile(0.5) - statistics.median(seconds))
        print(
            f"| {decoding} | {1000 * run.percentile(0.5):.1f} | {1000 * statistics.median(run.generate_seconds):.1f} "
            f"| {direct} | {overhead:.1f} |"
        )


if __name__ == "__main__":
    main()
