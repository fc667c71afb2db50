"""Embedding throughput: sentences/s through ``POST /v1/embeddings`` vs infinity-emb directly.

Both paths use the embedded all-MiniLM-L6-v2 on CPU. For each batch size the same
sentences are sent as sequential requests of that size: once straight into an infinity-emb
engine (awaited from trio through the future bridge), once through a real tabby server on
127.0.0.1 (auth off, no chat model) with httpx, in-process. The two paths alternate and
the best of ``--rounds`` runs is kept, so drifting load on a shared machine hits both alike.

    python bench/embeddings.py [--sentences 512] [--batches 1 32 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio

from tabby.actors.embedder import embedder_from_config
from tabby.backends.infinity import (
    EMBEDDED_MODEL_NAME,
    InfinityEngine,
    await_future,
    resolve_embedding_model,
)
from tabby.config import ModelConfigSection, NetworkConfig, TabbyConfig
from tabby.http import embeddings
from tabby.http.app import ROUTE_MODULES
from tabby.http.services import Services
from tabby.server import serve

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "tabby",
    "serves",
    "many",
    "vectors",
]


def sentences(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(10)) + f" {i}" for i in range(n)]


def batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


async def timed(
    send: Callable[[list[str]], Awaitable[object]], texts: list[str], size: int
) -> float:
    start = time.perf_counter()
    for batch in batches(texts, size):
        await send(batch)
    return len(texts) / (time.perf_counter() - start)


async def measure(
    texts: list[str], sizes: list[int], rounds: int
) -> dict[int, tuple[float, float]]:
    """Best-of-``rounds`` sentences/s per batch size: (direct, HTTP), measured alternately."""
    config = TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, disable_auth=True),
        model=ModelConfigSection(model_name=None),
        base_dir=Path(tempfile.mkdtemp()),
    )
    path = resolve_embedding_model(EMBEDDED_MODEL_NAME, Path("."))
    engine = await trio.to_thread.run_sync(InfinityEngine.load, EMBEDDED_MODEL_NAME, path, "cpu")
    rates: dict[int, tuple[float, float]] = {}
    async with trio.open_nursery() as nursery:
        extra = []
        if not any(name == "tabby.http.embeddings" for name, _ in ROUTE_MODULES):
            handle = await nursery.start(embedder_from_config(config).run)
            services = Services(config=config, auth=None, health=None, embedder=handle)  # type: ignore[arg-type]
            extra = [embeddings.blueprint(services)]
        info = await nursery.start(
            lambda task_status: serve(
                config, quiet=True, extra_blueprints=extra, task_status=task_status
            )
        )
        async with httpx.AsyncClient(base_url=info.urls[0], timeout=300) as client:

            async def direct(batch: list[str]) -> object:
                return await await_future(engine.submit(batch))

            async def over_http(batch: list[str]) -> object:
                r = await client.post("/v1/embeddings", json={"input": batch})
                return r.raise_for_status()

            await direct(texts[:32])  # warm-up both paths
            await over_http(texts[:32])
            for size in sizes:
                best_direct = best_http = 0.0
                for _ in range(rounds):
                    best_direct = max(best_direct, await timed(direct, texts, size))
                    best_http = max(best_http, await timed(over_http, texts, size))
                rates[size] = (best_direct, best_http)
        nursery.cancel_scope.cancel()
    await trio.to_thread.run_sync(engine.close)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    ns = parser.parse_args()
    rates = trio.run(measure, sentences(ns.sentences), ns.batches, ns.rounds)
    print(f"{'batch':>6} {'direct s/s':>11} {'HTTP s/s':>10} {'HTTP/direct':>12}")
    for size, (d, h) in rates.items():
        print(f"{size:>6} {d:>11.1f} {h:>10.1f} {h / d:>11.0%}")


if __name__ == "__main__":
    main()
