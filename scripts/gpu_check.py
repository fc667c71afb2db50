"""End-to-end check of an exllama backend on a GPU machine, through tabby's own actors.

    python scripts/gpu_check.py make-model .tinymodel/tiny-llama  # tiny fp16 Llama (CPU is enough)
    python scripts/gpu_check.py run exllamav3 --out OUTDIR       # on the GPU machine
    python scripts/gpu_check.py run exllamav3 --dry-run          # the flow on CPU, reference engine

``run`` starts the real GenerationScheduler and ModelManager, loads the tiny model with
the reference engine on CUDA for reference outputs, then with the chosen backend, and
checks: load with progress; greedy output equal to the reference engine's for the first
tokens; three jobs batched (each equal to the same job alone); a cancel; a regex
constraint; unload frees VRAM. It prints one JSON line per check (also appended to
OUTDIR/results.jsonl) and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from tabby.actors.messages import LoadProgress, ModelLoaded  # noqa: E402
from tabby.actors.models import ModelManager, ModelManagerHandle  # noqa: E402
from tabby.actors.scheduler import SchedulerHandle, SchedulerStats  # noqa: E402
from tabby.backends.registry import BackendEntry, BackendRegistry, default_registry  # noqa: E402
from tabby.config.loader import structure_config  # noqa: E402
from tabby.jobs import ConstraintSpec, GenerationJob, SamplerSettings  # noqa: E402
from tabby.jobs.events import Failed, Finished, JobEvent, TextChunk  # noqa: E402
from tabby.serving.model_settings import ModelLoadRequest  # noqa: E402

GREEDY = SamplerSettings(temperature=0.0)
PROMPTS = ("The quick brown fox", "The capital of France is", "def main():\n    return")
MODEL_NAME = "tiny-llama"
COMPARE_TOKENS = 4  # fp16 kernels differ: near-tied logits may flip later tokens
NEAR_TIE = 0.05  # nats between the two best tokens: fp16 kernels may order them either way
LOGPROBS = {"logprobs": True, "top_logprobs": 2}
NEW_TOKENS = 16
CHECK_TIMEOUT_S = 120.0
LOAD_ARGS: dict[str, Any] = {
    "max_seq_len": 1024, "cache_size": 2048, "chunk_size": 256, "max_batch_size": 8,
}


def make_model(directory: Path) -> None:
    import torch

    from tabby.testing.tiny import make_tiny_hf

    # head_dim 64 (the exllama kernels want 64 or 128), vocab 320 (a multiple of 32), untied head
    make_tiny_hf(directory, hidden=256, intermediate=1024, layers=2, heads=4, kv_heads=2,
                 dtype=torch.float16, max_position_embeddings=2048)
    print(json.dumps({"made": str(directory), "files": sorted(p.name for p in directory.iterdir())}))


def registry_for(name: str) -> BackendRegistry:
    # Until the registry points at the real loaders itself, point it here.
    if name == "exllamav3":
        from tabby.backends import exllamav3 as module
    else:
        from tabby.backends import exllamav2 as module  # type: ignore[no-redef]
    entry = BackendEntry(name, module.load, module.check, draft=True,
                         lora=name == "exllamav2", vision=True)
    return default_registry().with_entry(entry)


class Report:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.failed = 0
        out.mkdir(parents=True, exist_ok=True)

    def line(self, check: str, ok: bool, **facts: Any) -> None:
        self.failed += not ok
        record = {"check": check, "ok": ok, **facts}
        text = json.dumps(record, default=str)
        print(text, flush=True)
        with (self.out / "results.jsonl").open("a") as f:
            f.write(text + "\n")

    async def run(self, check: str, body: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        start = time.monotonic()
        try:
            with trio.fail_after(CHECK_TIMEOUT_S):
                facts = await body()
        except Exception as exc:
            self.line(check, False, error=f"{type(exc).__name__}: {exc}",
                      trace=traceback.format_exc(limit=6), seconds=round(time.monotonic() - start, 2))
            return {}
        ok = bool(facts.pop("ok", True))
        self.line(check, ok, seconds=round(time.monotonic() - start, 2), **facts)
        return facts


async def generate(sched: CurrentScheduler, job: GenerationJob) -> dict[str, Any]:
    text, final = "", None
    ids: list[int] = []
    margins: list[float] = []  # top-1 minus top-2 logprob per token, when asked for
    chosen: list[float] = []  # each token's own logprob
    async with await sched.submit(job) as events:
        async for event in events:
            if isinstance(event, TextChunk):
                text += event.text
                ids += event.token_ids
                for lp in event.logprobs:
                    chosen.append(lp.logprob)
                    top = [p for _, _, p in lp.top]
                    margins.append(round(top[0] - top[1], 4) if len(top) > 1 else float("inf"))
            elif isinstance(event, Finished):
                final = event
            elif isinstance(event, Failed):
                raise event.error
    assert final is not None, "the stream ended without Finished"
    out = {"text": text, "ids": ids, "stop_reason": final.stop_reason,
           "finish_reason": final.finish_reason}
    if job.logprobs:
        out["margins"] = margins
        out["logprobs"] = chosen
    return out


def same_until_near_tie(ids: list[int], want: list[int], margins: list[float]) -> bool:
    """Equal for COMPARE_TOKENS tokens, or up to a token the reference nearly tied on."""
    for i, (a, b) in enumerate(zip(ids, want[:COMPARE_TOKENS], strict=False)):
        if a != b:
            return i < len(margins) and margins[i] < NEAR_TIE
    return len(ids) >= min(COMPARE_TOKENS, len(want))


def vram() -> int:
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


async def checks(name: str, model: Path, report: Report, dry_run: bool) -> None:
    device, dtype = ("cpu", "float32") if dry_run else ("cuda", "float16")
    config = structure_config(
        {
            "model": {"model_dir": str(model.parent), "model_name": "", "dtype": dtype,
                      "device": device, "templates_dir": str(REPO / "templates")},
            "sampling": {"override_preset": "", "overrides_dir": str(REPO / "sampler_overrides")},
        },
        base_dir=model.parent,
    )
    async with trio.open_nursery() as nursery:
        registry = default_registry() if dry_run else registry_for(name)
        manager = ModelManager(config, registry=registry, startup_load=False)
        models: ModelManagerHandle = await nursery.start(manager.run)
        sched = CurrentScheduler(models)
        await run_checks("reference" if dry_run else name, model.name, sched, models, report)
        nursery.cancel_scope.cancel()


class CurrentScheduler:
    """The scheduler of the model loaded now (each loaded model has its own)."""

    def __init__(self, models: ModelManagerHandle) -> None:
        self._models = models

    def _now(self) -> SchedulerHandle:
        scheduler = self._models.serving_state().scheduler
        assert isinstance(scheduler, SchedulerHandle), "no model is loaded"
        return scheduler

    async def submit(self, job: GenerationJob) -> trio.MemoryReceiveChannel[JobEvent]:
        return await self._now().submit(job)

    async def cancel(self, job_id: str) -> None:
        await self._now().cancel(job_id)

    async def statistics(self) -> SchedulerStats:
        return await self._now().statistics()


async def run_checks(name: str, model_name: str, sched: CurrentScheduler,
                     models: ModelManagerHandle, report: Report) -> None:
    ref: dict[str, Any] = {}
    baseline = vram()

    async def reference() -> dict[str, Any]:
        state = await models.load_model_and_wait(
            ModelLoadRequest(model_name=model_name, backend="reference", **LOAD_ARGS))
        assert state.tokenizer is not None
        ids = tuple(state.tokenizer.encode(PROMPTS[0], add_bos=True))
        out = await generate(sched, GenerationJob("ref", ids, NEW_TOKENS, GREEDY, **LOGPROBS))
        ref.update(prompt=ids, ids=out["ids"], margins=out["margins"])
        await models.unload_model()
        return {"prompt_ids": ids, "ids": out["ids"], "margins": out["margins"][:8]}

    async def load() -> dict[str, Any]:
        progress: list[tuple[str, int, int, str]] = []
        loaded = None
        request = ModelLoadRequest(model_name=model_name, backend=name, **LOAD_ARGS)
        async with await models.load_model(request) as events:
            async for event in events:
                if isinstance(event, LoadProgress):
                    progress.append((event.model_type, event.module, event.modules, event.status))
                elif isinstance(event, ModelLoaded):
                    loaded = event.state
                else:
                    raise event.error
        assert loaded is not None
        assert loaded.model is not None
        return {"ok": bool(progress) and progress[-1][3] == "finished",
                "progress_events": len(progress), "last": progress[-1:],
                "info": {"max_seq_len": loaded.model.max_seq_len, "cache_size": loaded.model.cache_size,
                         "eos": loaded.model.eos_token_ids, "batch": loaded.model.max_batch_size},
                "vram_mb": round(vram() / 2**20, 1)}

    def tokenizer() -> Any:
        tok = models.serving_state().tokenizer
        assert tok is not None
        return tok

    async def greedy() -> dict[str, Any]:
        ids = tuple(tokenizer().encode(PROMPTS[0], add_bos=True))
        out = await generate(sched, GenerationJob("greedy", ids, NEW_TOKENS, GREEDY, **LOGPROBS))
        same_prompt = list(ids) == list(ref.get("prompt", ()))
        same = same_until_near_tie(out["ids"], list(ref.get("ids", [])), ref.get("margins", []))
        # The model's distribution, not the greedy sampler's one-hot (0 / -1000).
        lps = out["logprobs"]
        distribution = all(-1000.0 < lp <= 0.0 for lp in lps) and any(lp < 0.0 for lp in lps)
        return {"ok": same_prompt and same and len(out["ids"]) == NEW_TOKENS and distribution,
                "ids": out["ids"], "reference": ref.get("ids"), "stop_reason": out["stop_reason"],
                "logprobs_are_a_distribution": distribution, "logprobs": out["logprobs"][:4],
                "same_prompt_ids": same_prompt, "margins": out["margins"][:8],
                "reference_margins": ref.get("margins", [])[:8]}

    async def batch() -> dict[str, Any]:
        jobs = [GenerationJob(f"b{i}", tuple(tokenizer().encode(p, add_bos=True)), NEW_TOKENS, GREEDY,
                              **LOGPROBS)
                for i, p in enumerate(PROMPTS)]
        alone = [await generate(sched, job) for job in jobs]
        before = (await sched.statistics()).steps
        together: list[dict[str, Any]] = [{}] * len(jobs)

        async def one(i: int) -> None:
            together[i] = await generate(sched, jobs[i])

        async with trio.open_nursery() as n:
            for i in range(len(jobs)):
                n.start_soon(one, i)
        steps = (await sched.statistics()).steps - before
        equal = [same_until_near_tie(t["ids"], a["ids"], a["margins"])
                 for a, t in zip(alone, together, strict=True)]
        batched = steps < 2 * NEW_TOKENS  # alone, three jobs take ~3 × 16 steps
        unpaged = models.serving_state().model.max_batch_size == 1  # type: ignore[union-attr]
        return {"ok": all(equal) and (batched or unpaged), "steps_together": steps,
                "equal_first_tokens": equal, "batched": batched, "unpaged": unpaged,
                "alone_ids": [a["ids"][:6] for a in alone], "together_ids": [t["ids"][:6] for t in together],
                "together_stop": [(t.get("stop_reason"), t.get("finish_reason"), t.get("text", "")[:20]) for t in together],
                "alone_stop": [(a.get("stop_reason"), a.get("finish_reason")) for a in alone],
                "alone_margins": [a["margins"][:6] for a in alone]}

    async def cancel() -> dict[str, Any]:
        ids = tuple(tokenizer().encode(PROMPTS[1], add_bos=True))
        job = GenerationJob("cancel-me", ids, 500, SamplerSettings(temperature=1.0), seed=1)
        chunks, final = 0, None
        async with await sched.submit(job) as events:
            async for event in events:
                if isinstance(event, TextChunk):
                    chunks += 1
                    if chunks == 1:
                        await sched.cancel(job.job_id)
                elif isinstance(event, Finished):
                    final = event
        stats = await sched.statistics()
        after = await generate(sched, GenerationJob("after-cancel", ids, 4, GREEDY))
        return {"ok": final is not None and final.stop_reason == "cancelled" and stats.live == 0
                and len(after["ids"]) == 4, "chunks_before_end": chunks,
                "stop_reason": getattr(final, "stop_reason", None), "live_after": stats.live}

    async def regex() -> dict[str, Any]:
        ids = tuple(tokenizer().encode(PROMPTS[2], add_bos=True))
        spec = ConstraintSpec("regex", "[a-c]{5}")
        masker = None
        info = models.serving_state().model
        if name == "reference" and info is not None:  # the dry run: the engine takes a masker
            from tabby.backends.constraints import ConstraintCompiler

            compiler = ConstraintCompiler(tokenizer(), eos_ids=info.eos_token_ids,
                                          vocab_size=info.vocab_size)
            masker = compiler.masker(spec)
        job = GenerationJob("regex", ids, 32, SamplerSettings(temperature=1.0), seed=3,
                            constraint=spec, masker=masker)
        out = await generate(sched, job)
        return {"ok": re.fullmatch("[a-c]{5}", out["text"]) is not None
                and out["stop_reason"] == "constraint", **out}

    async def unload() -> dict[str, Any]:
        before = vram()
        await models.unload_model()
        after = vram()
        freed = after < before or before == 0  # 0: a dry run on CPU
        return {"ok": freed and after <= baseline + 64 * 2**20,
                "vram_mb_before": round(before / 2**20, 1), "vram_mb_after": round(after / 2**20, 1),
                "vram_mb_baseline": round(baseline / 2**20, 1)}

    await report.run("reference_engine", reference)
    loaded = await report.run("load", load)
    if not loaded:
        return
    for check, body in (("greedy_matches_reference", greedy), ("batch_of_three", batch),
                        ("cancel", cancel), ("regex_constraint", regex), ("unload_frees_vram", unload)):
        await report.run(check, body)


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-model")
    mk.add_argument("directory", type=Path)
    rn = sub.add_parser("run")
    rn.add_argument("backend", choices=("exllamav3", "exllamav2"))
    rn.add_argument("--model", type=Path, default=REPO / ".tinymodel" / MODEL_NAME)
    rn.add_argument("--dry-run", action="store_true",
                    help="on CPU, with the reference engine standing in for the backend")
    rn.add_argument("--out", type=Path, default=REPO / "gpu-check-out")
    args = parser.parse_args()
    if args.command == "make-model":
        make_model(args.directory)
        return 0
    report = Report(args.out)
    import torch

    if args.dry_run:
        trio.run(checks, args.backend, args.model.resolve(), report, True)
        return 1 if report.failed else 0
    if not torch.cuda.is_available():
        report.line("cuda", False, error="no CUDA device visible")
        return 1
    report.line("cuda", True, device=torch.cuda.get_device_name(0), torch=torch.__version__)
    trio.run(checks, args.backend, args.model.resolve(), report, False)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
