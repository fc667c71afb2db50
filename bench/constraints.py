"""The cost of structured output: decode tok/s with and without a JSON-schema constraint.

    python bench/constraints.py [--tokens N] [--batch B] [--repeats R]

On SmolLM2-135M-Instruct (the embedded default model) with the reference engine:
for each of unconstrained, a JSON schema (an object with a few typed fields) and
``json_object``, runs ``--batch`` jobs of ``--tokens`` new tokens (sampling at
temperature 1, fixed seeds) and prints aggregate decode tok/s, plus the time to build
one masker (grammar compile) and the one-off llguidance tokenizer build. Every figure
is the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable

from tabby.backends.base import LoadSpec
from tabby.backends.constraints import ANY_JSON_OBJECT, ConstraintCompiler
from tabby.backends.reference import ReferenceBackend, load
from tabby.engine.embedded import default_model_path
from tabby.jobs import ConstraintSpec, GenerationJob, SamplerSettings
from tabby.serving.structured import compiler_for

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "tags", "city"],
}
PROMPT = "<|im_start|>user\nDescribe a person as JSON.<|im_end|>\n<|im_start|>assistant\n"


def run(
    backend: ReferenceBackend,
    make_masker: Callable[[], object] | None,
    spec: ConstraintSpec | None,
    *,
    tokens: int,
    batch: int,
    salt: int,
) -> tuple[float, int]:
    """(seconds, tokens generated) for one batch, prefill excluded as far as possible."""
    ids = tuple(backend.tokenizer.encode(f"{salt} {PROMPT}"))
    jobs = [
        GenerationJob(
            job_id=f"j{salt}-{i}",
            prompt_ids=ids,
            max_new_tokens=tokens,
            sampler=SamplerSettings(temperature=1.0),
            seed=salt * 100 + i,
            constraint=spec,
            masker=make_masker() if make_masker is not None else None,  # type: ignore[arg-type]
        )
        for i in range(batch)
    ]
    for job in jobs:
        backend.enqueue(job)
    generated = 0
    started: float | None = None
    while backend.has_work():
        results = backend.step()
        count = sum(len(r.token_ids) for r in results)
        if started is None and count:
            started = time.perf_counter()  # after the prefill step
        else:
            generated += count
    assert started is not None
    return time.perf_counter() - started, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = default_model_path()
    assert path is not None, "the embedded default model is not installed"
    load_spec = LoadSpec(path=path, name=path.stem, max_batch_size=max(args.batch, 1))
    backend = load(load_spec, lambda _progress: None)
    compiler = compiler_for(backend.tokenizer, backend.info)
    assert isinstance(compiler, ConstraintCompiler)
    t0 = time.perf_counter()
    compiler.ll_tokenizer()
    print(f"llguidance tokenizer build: {time.perf_counter() - t0:.2f} s (once per model)")
    cases: list[tuple[str, ConstraintSpec | None]] = [
        ("unconstrained", None),
        ("json_schema", ConstraintSpec("json_schema", json.dumps(SCHEMA))),
        ("json_object", ConstraintSpec("json_schema", ANY_JSON_OBJECT)),
    ]
    base = None
    salt = 0
    for name, spec in cases:
        make = None
        if spec is not None:
            t0 = time.perf_counter()
            compiler.masker(spec)
            print(f"{name}: masker build {1000 * (time.perf_counter() - t0):.1f} ms")
            make = functools.partial(compiler.masker, spec)
        rates = []
        for _ in range(args.repeats):
            salt += 1
            seconds, generated = run(
                backend, make, spec, tokens=args.tokens, batch=args.batch, salt=salt
            )
            rates.append(generated / seconds if seconds > 0 else 0.0)
        rate = max(rates)
        base = base or rate
        print(f"{name:>14}: {rate:7.1f} tok/s decode (batch {args.batch}), {rate / base:.2f}x")
    backend.close()


if __name__ == "__main__":
    main()
