"""GPU benchmark: exllamav3's own generator loop against tabby's exllamav3 backend.

    python bench/gpu.py [--model DIR] [--out DIR] [--parts own,direct,scheduler,json,http]
                        [--batches 1,16] [--repeats 3] [--prompt 128] [--new 256]
                        [--clients 1,8,32]

On a CUDA machine with exllamav3 installed. Makes a random fp16 Llama of ~1 B parameters
(hidden 2048, 16 layers, 16 heads, 4 KV heads) in ``--model`` unless it is there, loads it
twice in this one process (the library's own way and through tabby's ``load``) and runs,
at each batch size (``--prompt``-token random prompts, ``--new`` greedy tokens each, no
early end):

* ``own``: the library's own loop, every job enqueued, ``iterate()`` until done, with
  plain jobs (``ArgmaxSampler``, no stop conditions);
* ``own-tabby-job``: the same loop with the very job arguments tabby builds (EOS stop
  conditions, ``min_new_tokens``: a logit mask per step in the library);
* ``tabby-direct``: tabby's backend alone (``enqueue``, ``step`` until done, one thread);
* ``tabby-scheduler``: tabby's backend through the GenerationScheduler, a trio task per job;
* ``json``: a ``json_object`` request on tabby's backend (whitespace must stay bounded);
* ``http``: a tabby server in a child process on the same model, 1/8/32 streaming
  clients (bench/server.py's load generator).

The runs are CPU-bound (the library launches every kernel from Python) and a shared
machine drifts, so every variant runs at every batch size once per repeat, in an order
rotated per repeat, after a warm-up of each. Each run reports tokens/s from enqueue to
the last token (prefill included), the ``iterate()`` calls, their share of the time and
the most library jobs active at once; at the end, per variant, the best of the repeats
and the median of the per-repeat ratios against the library's loop. One JSON line per
measurement goes to stdout and OUT/bench.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch
import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tabby.jobs import ConstraintSpec, GenerationJob, SamplerSettings  # noqa: E402
from tabby.jobs.events import Failed, Finished, TextChunk  # noqa: E402

GREEDY = SamplerSettings(temperature=0.0)
CACHE_TOKENS = 8192
MAX_SEQ_LEN = 1024
CHUNK = 2048
MAX_BATCH = 16
EPOCH = 1
OUT = Path("/tmp")


def emit(**record: Any) -> None:
    line = json.dumps(record, default=str)
    print(line, flush=True)
    with (OUT / "bench.jsonl").open("a") as f:
        f.write(line + "\n")


def make_model(directory: Path) -> None:
    from tabby.testing.tiny import make_tiny_hf

    if (directory / "config.json").exists():
        return
    start = time.perf_counter()
    make_tiny_hf(directory, hidden=2048, intermediate=5632, layers=16, heads=16, kv_heads=4,
                 dtype=torch.float16, max_position_embeddings=4096)
    size = sum(p.stat().st_size for p in directory.iterdir())
    emit(made=str(directory), seconds=round(time.perf_counter() - start, 1), gb=round(size / 1e9, 2))


def prompts(batch: int, length: int, vocab: int, salt: int) -> list[list[int]]:
    # A distinct prompt per job and run: no prefix cache hits.
    rng = random.Random(salt * 1000 + batch)
    return [[rng.randrange(10, vocab - 1) for _ in range(length)] for _ in range(batch)]


@attrs.define
class IterateStats:
    """What a wrapped ``Generator.iterate`` saw."""

    calls: int = 0
    seconds: float = 0.0
    most_active: int = 0

    def reset(self) -> None:
        self.calls, self.seconds, self.most_active = 0, 0.0, 0

    def report(self, wall: float) -> dict[str, Any]:
        return {"iterate_calls": self.calls, "iterate_share": round(self.seconds / wall, 3),
                "iterate_ms": round(1000 * self.seconds / max(self.calls, 1), 3),
                "most_active": self.most_active}


def count_iterations(generator: Any) -> IterateStats:
    """Shadow ``generator.iterate`` on the instance with a counting wrapper."""
    stats = IterateStats()
    original = generator.iterate

    def iterate() -> Any:
        start = time.perf_counter()
        results = original()
        stats.seconds += time.perf_counter() - start
        stats.calls += 1
        stats.most_active = max(stats.most_active, int(generator.num_active_jobs()))
        return results

    generator.iterate = iterate
    return stats


@contextmanager
def timed_run(
    name: str, batch: int, stats: IterateStats, record: bool = True
) -> Iterator[dict[str, Any]]:
    """Time the block, which counts ``tokens`` (and may set ``first``, more facts) in the
    yielded dict; then emit the run (a warm-up run is timed but not recorded)."""
    facts: dict[str, Any] = {"tokens": 0}
    stats.reset()
    torch.cuda.synchronize()
    start = time.perf_counter()
    yield facts
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    first = facts.pop("first", None)
    tokens = facts.pop("tokens")
    if not record:
        emit(warm_up=name, batch=batch, seconds=round(wall, 3))
        return
    emit(run=name, batch=batch, tokens=tokens, seconds=round(wall, 3),
         tok_s=round(tokens / wall, 1),
         ttft_ms=round(1000 * (first - start), 1) if first else None,
         **stats.report(wall), **facts)
    RUNS.setdefault((name, batch), []).append(tokens / wall)


# tok/s of each (run, batch), one per repeat, in repeat order
RUNS: dict[tuple[str, int], list[float]] = {}


# -- the library's own loop -------------------------------------------------------------------


class OwnLoop:
    """exllamav3 used as its own examples do: all jobs enqueued, ``iterate()`` until done."""

    def __init__(self, model_dir: Path) -> None:
        import exllamav3 as lib

        self.lib = lib
        config = lib.Config.from_directory(str(model_dir))
        self.model = lib.Model.from_config(config)
        cache = lib.Cache(self.model, max_num_tokens=CACHE_TOKENS)
        self.model.load(device="cuda:0")
        if hasattr(self.model, "warmup"):  # the library's own warm-up, as tabby's load runs it
            self.model.warmup(cache, max_chunk_size=CHUNK, max_batch_size=MAX_BATCH)
        self.tokenizer = lib.Tokenizer.from_config(config)
        self.generator = lib.Generator(self.model, cache, self.tokenizer,
                                       max_batch_size=MAX_BATCH, max_chunk_size=CHUNK)
        self.stats = count_iterations(self.generator)
        self.eos = list(dict.fromkeys(int(i) for i in (config.eos_token_id_list or [])))
        self.vocab = int(config.vocab_size)

    def plain_job(self, i: int, ids: list[int], n: int) -> Any:
        return self.lib.Job(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                            sampler=self.lib.ArgmaxSampler(), stop_conditions=[], identifier=i)

    def tabby_job(self, i: int, ids: list[int], n: int) -> Any:
        """The library job tabby's adapter builds for the same request."""
        from tabby.backends import exllamav3 as adapter
        from tabby.backends.exllama_common import JobLimits

        job = GenerationJob(f"own-{i}", tuple(ids), n, GREEDY, min_new_tokens=n)
        steps = adapter.build_sampler_steps(GREEDY, eos_ids=self.eos, vocab_size=self.vocab)
        sampler = adapter.materialise_sampler(steps, self.lib, self.tokenizer)
        return self.lib.Job(**adapter.job_kwargs(job, limits=JobLimits(n, False), eos_ids=self.eos,
                                                 chunk_size=CHUNK, sampler=sampler))

    def run(self, name: str, batch: int, length: int, n: int, salt: int, record: bool = True) -> None:
        make = self.plain_job if name == "own" else self.tabby_job
        with timed_run(name, batch, self.stats, record) as facts:
            self.generator.enqueue(
                [make(i, ids, n) for i, ids in enumerate(prompts(batch, length, self.vocab, salt))]
            )
            while self.generator.num_remaining_jobs():
                for r in self.generator.iterate():
                    ids = r.get("token_ids")
                    if ids is not None:
                        facts["tokens"] += ids.shape[-1]

    def close(self) -> None:
        self.generator.close()
        self.model.unload()


# -- tabby's backend ------------------------------------------------------------------------------


def load_tabby(model_dir: Path) -> Any:
    from tabby.backends.base import LoadSpec
    from tabby.backends.exllamav3 import load

    progress: list[Any] = []
    start = time.perf_counter()
    backend = load(LoadSpec(path=model_dir, name=model_dir.name, max_seq_len=MAX_SEQ_LEN,
                            cache_size=CACHE_TOKENS, chunk_size=CHUNK, max_batch_size=MAX_BATCH),
                   progress.append)
    emit(run="tabby-load", seconds=round(time.perf_counter() - start, 2),
         progress_events=len(progress), first=str(progress[:1]), last=str(progress[-1:]))
    return backend


def job(name: str, ids: list[int], new: int) -> GenerationJob:
    return GenerationJob(name, tuple(ids), new, GREEDY, min_new_tokens=new)


class TabbyRuns:
    """tabby's exllamav3 backend, stepped directly or through the GenerationScheduler."""

    def __init__(self, model_dir: Path) -> None:
        self.backend = load_tabby(model_dir)
        self.stats = count_iterations(self.backend._parts.generator)
        self.vocab = self.backend.info.vocab_size

    def run(self, name: str, batch: int, length: int, n: int, salt: int, record: bool = True) -> None:
        ps = prompts(batch, length, self.vocab, salt)
        if name == "tabby-direct":
            with timed_run(name, batch, self.stats, record) as facts:
                for i, ids in enumerate(ps):
                    self.backend.enqueue(job(f"d{salt}-{i}", ids, n))
                while self.backend.has_work():
                    for result in self.backend.step():
                        if result.token_ids and "first" not in facts:
                            facts["first"] = time.perf_counter()
                        facts["tokens"] += len(result.token_ids)
        else:
            trio.run(self._through_scheduler, name, batch, ps, n, salt, record)

    async def _through_scheduler(
        self, name: str, batch: int, ps: list[list[int]], n: int, salt: int, record: bool
    ) -> None:
        from tabby.actors.scheduler import GenerationScheduler

        async with trio.open_nursery() as nursery:
            scheduler = await nursery.start(GenerationScheduler().run)
            await scheduler.attach(self.backend, epoch=EPOCH)
            before = (await scheduler.statistics()).steps

            async def one(i: int, ids: list[int], facts: dict[str, Any]) -> None:
                events = await scheduler.submit(job(f"s{salt}-{i}", ids, n), model_epoch=EPOCH)
                async with events:
                    async for event in events:
                        if isinstance(event, TextChunk):
                            facts.setdefault("first", time.perf_counter())
                            facts["tokens"] += len(event.token_ids)
                        elif isinstance(event, Failed):
                            raise event.error

            with timed_run(name, batch, self.stats, record) as facts:
                async with trio.open_nursery() as jobs:
                    for i, ids in enumerate(ps):
                        jobs.start_soon(one, i, ids, facts)
                facts["steps"] = (await scheduler.statistics()).steps - before
            await scheduler.detach("drain")
            nursery.cancel_scope.cancel()

    def close(self) -> None:
        self.backend.close()


def interleaved(model_dir: Path, parts: set[str], batches: list[int], length: int, new: int,
                repeats: int) -> None:
    """Each repeat runs every variant at every batch size, in an order rotated per repeat,
    so that drift of the machine (these runs are CPU-bound: the library launches every
    kernel from Python) falls on all of them alike."""
    own = OwnLoop(model_dir) if "own" in parts else None
    tabby = TabbyRuns(model_dir) if parts & {"direct", "scheduler"} else None
    try:
        runners: list[tuple[str, Callable[..., None]]] = []
        if own is not None:
            runners += [("own", own.run), ("own-tabby-job", own.run)]
        if tabby is not None:
            if "direct" in parts:
                runners.append(("tabby-direct", tabby.run))
            if "scheduler" in parts:
                runners.append(("tabby-scheduler", tabby.run))
        for batch in sorted(set(batches)):  # warm-up: every path at every batch size
            for name, run in runners:
                run(name, batch, length, 16, 0, record=False)
        for rep in range(repeats):
            order = runners[rep % len(runners):] + runners[: rep % len(runners)]
            for batch in batches:
                for name, run in order:
                    run(name, batch, length, new, 100 * rep + batch)
    finally:
        if own is not None:
            own.close()
        if tabby is not None:
            if "json" in parts:
                trio.run(json_object, tabby.backend)
            tabby.close()


async def json_object(backend: Any) -> None:
    """A json_object answer must not fill its budget with whitespace (issue: it did)."""
    from tabby.actors.scheduler import GenerationScheduler
    from tabby.backends.constraints import ANY_JSON_OBJECT

    async with trio.open_nursery() as nursery:
        scheduler = await nursery.start(GenerationScheduler().run)
        await scheduler.attach(backend, epoch=EPOCH)
        ids = tuple(backend.tokenizer.encode('Answer in JSON: {"a": 1}\n'))
        for seed, temperature in ((1, 0.0), (2, 1.0)):
            spec = ConstraintSpec("json_schema", ANY_JSON_OBJECT, param="response_format")
            request = GenerationJob(f"json{seed}", ids, 64, SamplerSettings(temperature=temperature),
                                    seed=seed, constraint=spec)
            text, final = "", None
            async with await scheduler.submit(request, model_epoch=EPOCH) as events:
                async for event in events:
                    if isinstance(event, TextChunk):
                        text += event.text
                    elif isinstance(event, Finished | Failed):
                        final = event
            blanks = sum(c in " \t\r\n" for c in text)
            emit(run="json_object", temperature=temperature, text=text[:160], chars=len(text),
                 whitespace=blanks, end=str(final)[:160])
        await scheduler.detach("drain")
        nursery.cancel_scope.cancel()


# -- HTTP -----------------------------------------------------------------------------------------

SERVE = """
import sys, trio
from pathlib import Path
from tabby.config import NetworkConfig, TabbyConfig
from tabby.config.schema import ModelConfigSection, SamplingConfig
from tabby.server import serve

model, repo = Path(sys.argv[1]), Path(sys.argv[2])
config = TabbyConfig(
    network=NetworkConfig(host="127.0.0.1", port=0, disable_auth=True, max_queued_requests=1024),
    model=ModelConfigSection(model_dir=str(model.parent), model_name=model.name, backend="exllamav3",
                             max_seq_len=1024, cache_size=16384, chunk_size=2048, max_batch_size=32),
    sampling=SamplingConfig(override_preset=None),
    base_dir=repo,
)
trio.run(lambda: serve(config, handle_signals=True))
"""


def http(model_dir: Path, clients: list[int], new: int, deadline: float) -> None:
    from server import run_load  # bench/server.py

    process = subprocess.Popen([sys.executable, "-c", SERVE, str(model_dir), str(REPO)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    url = None
    for line in process.stdout:
        if "listening on" in line:
            url = line.split("listening on", 1)[1].strip()
            break
    if url is None:
        emit(run="http", error="the server did not start", rc=process.wait())
        return
    # Keep reading the server's output, or a full pipe would stall it.
    tail: list[str] = []
    threading.Thread(target=lambda: tail.extend(process.stdout or ()), daemon=True).start()
    try:
        trio.run(run_load, url, 1, 4, 0)  # warm-up
        for salt, n in enumerate(clients, start=1):
            if time.monotonic() > deadline:
                emit(run="http", clients=n, skipped="out of time")
                continue
            row = trio.run(run_load, url, n, new, salt)
            emit(run="http", **{k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
    finally:
        process.terminate()
        process.wait(timeout=30)
        emit(run="http-server", output_tail="".join(tail[-20:])[-2000:])


# -- main -----------------------------------------------------------------------------------------


def ratios(batches: list[int]) -> None:
    """Best of the repeats per run, and each repeat's ratio (same machine state)."""
    for batch in sorted(set(batches)):
        own = RUNS.get(("own", batch), [])
        same = RUNS.get(("own-tabby-job", batch), [])
        for name in ("own-tabby-job", "tabby-direct", "tabby-scheduler"):
            got = RUNS.get((name, batch), [])
            if not got:
                continue
            row: dict[str, Any] = {"batch": batch, "run": name, "best_tok_s": round(max(got), 1),
                                   "all_tok_s": [round(x, 1) for x in got]}
            for base_name, base in (("own", own), ("own_same_job", same)):
                if base and base is not got:
                    row[f"best_vs_{base_name}"] = round(max(got) / max(base), 3)
                    pairs = sorted(g / b for g, b in zip(got, base, strict=False))
                    row[f"median_pair_vs_{base_name}"] = round(statistics.median(pairs), 3)
            emit(ratio=row)
        if own:
            emit(ratio={"batch": batch, "run": "own", "best_tok_s": round(max(own), 1),
                        "all_tok_s": [round(x, 1) for x in own]})


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/bench-models/rand-1b"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--parts", default="own,direct,scheduler,json,http")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--http-new", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="HTTP runs start only within this many seconds of the start")
    ap.add_argument("--make-only", action="store_true", help="make the model, nothing else")
    args = ap.parse_args()
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    if args.make_only:
        make_model(args.model)
        return
    deadline = time.monotonic() + args.budget_s
    parts = set(args.parts.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    emit(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, parts=sorted(parts))
    make_model(args.model)
    start = time.perf_counter()
    try:
        interleaved(args.model, parts, batches, args.prompt, args.new, args.repeats)
    except Exception as exc:  # the HTTP part still runs
        import traceback

        emit(part="interleaved", error=f"{type(exc).__name__}: {exc}",
             trace=traceback.format_exc(limit=8)[-1500:])
    emit(part="interleaved", seconds=round(time.perf_counter() - start, 1))
    ratios(batches)
    if "http" in parts:
        start = time.perf_counter()
        http(args.model, [int(c) for c in args.clients.split(",")], args.http_new, deadline)
        emit(part="http", seconds=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
