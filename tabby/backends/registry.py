"""The generation backends tabby knows, by name, each behind a lazy loader.

Nothing heavy is imported until a backend is chosen: the reference engine pulls in
torch, the exllama adapters need their CUDA extensions (their ``check`` refuses
machines without a suitable GPU or library). ``check()`` tells before a load
starts whether a backend can run here at all, so the caller gets a clear error (HTTP
422 ``backend_unavailable``) before any progress stream begins.

The registry is a plain value passed to the ModelManager; tests and the server
benchmark build their own (e.g. with :func:`scripted_entry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

from tabby.backends.base import Backend, LoadSpec, ProgressCallback
from tabby.errors import InvalidRequest

__all__ = [
    "BackendEntry",
    "BackendRegistry",
    "default_registry",
    "scripted_entry",
]

Loader = Callable[[LoadSpec, ProgressCallback], Backend]


def _always_available() -> None:
    return None


@attrs.frozen
class BackendEntry:
    """One backend: how to load it and what it supports besides plain generation."""

    name: str
    load: Loader
    check: Callable[[], None] = _always_available  # raises BackendUnavailable
    draft: bool = False  # speculative decoding with a draft model
    lora: bool = False
    vision: bool = False


@attrs.frozen
class BackendRegistry:
    entries: Mapping[str, BackendEntry]

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def get(self, name: str) -> BackendEntry:
        """The entry for ``name``; an unknown name is a 400 naming the known ones."""
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries))
            raise InvalidRequest(f"unknown backend {name!r} (known: {known})", param="backend")
        return entry

    def with_entry(self, entry: BackendEntry) -> BackendRegistry:
        """A copy with ``entry`` added or replaced."""
        return BackendRegistry({**self.entries, entry.name: entry})


def _load_reference(spec: LoadSpec, progress: ProgressCallback) -> Backend:
    from tabby.backends import reference

    backend: Backend = reference.load(spec, progress)
    return backend


def _load_exllamav2(spec: LoadSpec, progress: ProgressCallback) -> Backend:
    from tabby.backends import exllamav2

    backend: Backend = exllamav2.load(spec, progress)
    return backend


def _check_exllamav2() -> None:
    from tabby.backends import exllamav2

    exllamav2.check()


def _load_exllamav3(spec: LoadSpec, progress: ProgressCallback) -> Backend:
    from tabby.backends import exllamav3

    backend: Backend = exllamav3.load(spec, progress)
    return backend


def _check_exllamav3() -> None:
    from tabby.backends import exllamav3

    exllamav3.check()


def scripted_entry() -> BackendEntry:
    """The zero-cost scripted backend (a test and benchmark fixture, not for serving)."""

    def load(spec: LoadSpec, progress: ProgressCallback) -> Backend:
        from tabby.backends import scripted

        return scripted.load(spec, progress)

    return BackendEntry("scripted", load)


def default_registry() -> BackendRegistry:
    """The backends a server offers: the reference engine and the exllama adapters."""
    return BackendRegistry(
        {
            "reference": BackendEntry("reference", _load_reference),
            "exllamav2": BackendEntry(
                "exllamav2", _load_exllamav2, _check_exllamav2, draft=True, lora=True, vision=True
            ),
            # The exllamav3 library has no LoRA support.
            "exllamav3": BackendEntry(
                "exllamav3", _load_exllamav3, _check_exllamav3, draft=True, vision=True
            ),
        }
    )
