"""The Kobold genkey registry: which generation a ``genkey`` names, and its text so far.

Kobold clients name each generation with a ``genkey`` and later ask for its text so far
(``/api/extra/generate/check``) or stop it (``/api/extra/abort``). The registry is the
one owner of that state. It belongs to the Kobold blueprint's service object, not to an
actor of its own, because every operation on it is a plain synchronous method called
from the Kobold handlers on the trio thread: nothing awaits between a read and a write,
so each call is atomic, and the per-chunk bookkeeping of a streaming generation costs
no channel round trip. Its lifetime is the app's; no other code can reach it.

Only the caller that started a generation (the same API key) or an admin may see or
abort it. Keys are kept only as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import attrs

from tabby.errors import Conflict, PermissionDenied
from tabby.serving.permission import Permission
from tabby.serving.ports import JobSubmitter
from tabby.serving.running import ChoiceAccumulator

__all__ = ["Caller", "GenkeyRegistry", "GenkeyStats", "KoboldGeneration", "key_digest"]


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@attrs.frozen
class Caller:
    """Who is asking: their permission and the digests of the keys that grant it."""

    permission: Permission
    key_digests: frozenset[bytes] = frozenset()

    @classmethod
    def from_keys(cls, permission: Permission, keys: Iterable[str]) -> Caller:
        return cls(permission, frozenset(key_digest(k) for k in keys))

    def owns(self, owner: frozenset[bytes]) -> bool:
        """Whether one of this caller's keys is one of ``owner``'s (no early exit)."""
        found = False
        for mine in self.key_digests:
            for theirs in owner:
                found |= hmac.compare_digest(mine, theirs)
        return found

    def may_control(self, generation: KoboldGeneration) -> bool:
        return self.permission is Permission.ADMIN or self.owns(generation.owner)


@attrs.define(eq=False)
class KoboldGeneration:
    """One live generation: its job, its owner and its output so far (the serving
    core's accumulator of the choice, so it is current without copying)."""

    genkey: str
    job_id: str
    owner: frozenset[bytes]
    output: ChoiceAccumulator = attrs.Factory(lambda: ChoiceAccumulator(0))
    # The scheduler running the job: the one an abort cancels it through.
    scheduler: JobSubmitter | None = attrs.field(default=None, repr=False)
    aborted: bool = False

    @property
    def text(self) -> str:
        return self.output.text


@attrs.frozen
class GenkeyStats:
    live: int
    started: int
    aborted: int


class GenkeyRegistry:
    """Live Kobold generations by genkey; see the module docstring."""

    def __init__(self) -> None:
        self._live: dict[str, KoboldGeneration] = {}
        self._started = 0
        self._aborted = 0

    def start(
        self,
        genkey: str,
        job_id: str,
        caller: Caller,
        *,
        output: ChoiceAccumulator | None = None,
        scheduler: JobSubmitter | None = None,
    ) -> KoboldGeneration:
        """Register a generation; Conflict (409) while ``genkey`` names a live one."""
        if genkey in self._live:
            raise Conflict(f"genkey {genkey!r} already names a running generation", param="genkey")
        owner = caller.key_digests
        generation = KoboldGeneration(
            genkey, job_id, owner, output if output is not None else ChoiceAccumulator(0),
            scheduler=scheduler,
        )
        self._live[genkey] = generation
        self._started += 1
        return generation

    def finish(self, generation: KoboldGeneration) -> None:
        """Forget ``generation`` (idempotent; a newer one under the same key stays)."""
        if self._live.get(generation.genkey) is generation:
            del self._live[generation.genkey]

    def lookup(self, genkey: str, caller: Caller) -> KoboldGeneration | None:
        """The live generation named ``genkey``; 403 when it is not the caller's."""
        generation = self._live.get(genkey)
        if generation is not None and not caller.may_control(generation):
            raise PermissionDenied(
                "this generation was started with another API key",
                param="genkey",
                code="not_owner",
            )
        return generation

    def abort(self, genkey: str, caller: Caller) -> KoboldGeneration | None:
        """Mark the generation aborted; the generation whose job to cancel, None if
        nothing was aborted.

        Unknown keys and generations already aborted abort nothing.
        """
        generation = self.lookup(genkey, caller)
        if generation is None or generation.aborted:
            return None
        generation.aborted = True
        self._aborted += 1
        return generation

    def statistics(self) -> GenkeyStats:
        return GenkeyStats(live=len(self._live), started=self._started, aborted=self._aborted)
