"""Benchmark the OpenAI-compatible chat client: achieved requests/s against the ideal concurrency / latency.

A fake OpenAI-compatible server responds to every request after a fixed latency, so an ideal client reaches
``concurrency / latency`` requests/s. The server runs in child processes, so it does not share the
client's event loop or interpreter lock. Each concurrency level runs two ways after one warm-up round:

- ``staggered``: ``concurrency`` workers start spread over one latency period and each sends ``rounds``
  requests one after another. The rate counts completions between the end of that ramp and the moment
  the first worker is done, so it is the steady-state rate, as in a real run where latencies vary;
- ``burst``: ``rounds x concurrency`` requests are submitted at once and the client's pool keeps
  ``concurrency`` in flight. With a fixed server latency the requests then move in lockstep waves, and
  each wave waits for the server and the client to work through it, so this rate is lower.

``client_cpu_ms_per_request`` (CPU time of the client process per request, over both runs) depends far
less on other load on the machine than requests/s. A sampler records the client process's peak RSS.
Prints one JSON object.

    python benchmarks/regen_client.py --latency 0.2 --concurrency 32 256 1024

NOTE: client and server processes share the machine's CPUs, so on a small machine the highest level
measures both sides together. ``--server-processes`` splits the server load over several endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepspec.regen.openai_client import ClientSettings, Endpoint, OpenAIChatClient, SamplingParams  # noqa: E402
from deepspec.runtime import configure_runtime  # noqa: E402
from tests.openai_server import Behaviour, FakeOpenAIServerProcess  # noqa: E402

PROMPT = " ".join(["Explain how a draft model speeds up decoding of a large target model."] * 4)
PARAMS = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, max_tokens=256)


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def sample_peak_rss(peak: list[int], stop: asyncio.Event, interval_s: float = 0.05) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_bytes())
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass
    peak[0] = max(peak[0], rss_bytes())


async def staggered_rate(
    client: OpenAIChatClient, messages: list[dict[str, str]], concurrency: int, rounds: int, latency_s: float
) -> float:
    """Return the steady-state requests/s of ``concurrency`` workers whose starts spread over one latency."""
    completed: list[float] = []

    async def worker(index: int) -> float:
        await asyncio.sleep(index * latency_s / concurrency)
        for _ in range(rounds):
            await client.chat(messages, PARAMS)
            completed.append(time.perf_counter())
        return time.perf_counter()

    started = time.perf_counter()
    finished = await asyncio.gather(*(worker(index) for index in range(concurrency)))
    window_start = started + latency_s
    window_end = min(finished)
    if window_end <= window_start:
        raise ValueError(f"--rounds={rounds} is too small for a steady-state window: use at least 3")
    inside = sum(1 for moment in completed if window_start < moment <= window_end)
    return inside / (window_end - window_start)


async def measure(urls: list[str], concurrency: int, rounds: int, latency_s: float) -> dict[str, Any]:
    per_endpoint = math.ceil(concurrency / len(urls))
    settings = ClientSettings(
        endpoints=tuple(Endpoint(url) for url in urls),
        model="fake-model",
        max_in_flight_per_endpoint=per_endpoint,
        read_timeout_s=60.0,
        max_retries=0,
    )
    messages = [{"role": "user", "content": PROMPT}]
    async with OpenAIChatClient(settings) as client:
        await client.wait_ready()
        while not all(entry["healthy"] for entry in client.stats().values()):
            await asyncio.sleep(0.05)
        # One warm-up round opens the connections.
        await asyncio.gather(*(client.chat(messages, PARAMS) for _ in range(concurrency)))

        baseline = rss_bytes()
        peak = [baseline]
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_peak_rss(peak, stop))
        cpu_started = time.process_time()
        steady = await staggered_rate(client, messages, concurrency, rounds, latency_s)

        count = concurrency * rounds
        started = time.perf_counter()
        results = await asyncio.gather(*(client.chat(messages, PARAMS) for _ in range(count)))
        burst_seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        stop.set()
        await sampler
        stats = client.stats()

    if any(not result.content for result in results):
        raise RuntimeError("the fake server returned empty content, so the client did not parse its responses")
    ideal = concurrency / latency_s
    burst = count / burst_seconds
    ok = sum(entry["ok"] for entry in stats.values())
    return {
        "concurrency": concurrency,
        "ideal_requests_per_s": round(ideal, 1),
        "staggered_requests_per_s": round(steady, 1),
        "staggered_fraction_of_ideal": round(steady / ideal, 3),
        "burst_requests_per_s": round(burst, 1),
        "burst_fraction_of_ideal": round(burst / ideal, 3),
        "mean_latency_s": round(sum(entry["mean_latency_s"] * entry["ok"] for entry in stats.values()) / ok, 4),
        "client_cpu_ms_per_request": round(1000 * cpu_seconds / (2 * count), 3),
        "client_peak_rss_mib": round(peak[0] / 2**20, 1),
        "client_rss_growth_mib": round((peak[0] - baseline) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="fixed server latency per request, in seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 256, 1024], help="requests in flight")
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="requests per worker (staggered) and rounds x concurrency requests (burst)",
    )
    parser.add_argument("--server-processes", type=int, default=1, help="fake endpoints, one process each")
    args = parser.parse_args()
    configure_runtime()

    load_before = os.getloadavg()
    levels = []
    with ExitStack() as stack:
        servers = [
            stack.enter_context(FakeOpenAIServerProcess(Behaviour(latency_s=args.latency)))
            for _ in range(args.server_processes)
        ]
        urls = [server.base_url for server in servers]
        for concurrency in args.concurrency:
            levels.append(asyncio.run(measure(urls, concurrency, args.rounds, args.latency)))
    report = {
        "benchmark": "regen_client",
        "latency_s": args.latency,
        "server_processes": args.server_processes,
        "cpu_count": os.cpu_count(),
        "load_average_1m_before": round(load_before[0], 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "levels": levels,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
