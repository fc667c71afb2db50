"""What the server serves right now: one immutable snapshot per change."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from tabby.backends.base import DraftSpec, LoadSpec, LoraSpec, ModelInfo
from tabby.config import ModelSettings
from tabby.jobs import Tokenizer
from tabby.serving.templating import PromptTemplate

if TYPE_CHECKING:
    from tabby.backends.constraints import ConstraintCompiler
    from tabby.serving.ports import JobSubmitter

__all__ = ["ServingState"]


@attrs.frozen
class ServingState:
    """What the server serves right now: one immutable snapshot per change.

    ``version`` grows with every published change; ``epoch`` only when a model is
    loaded (jobs tokenized for one epoch are refused by the scheduler in another).
    """

    version: int = 0
    epoch: int = 0
    model: ModelInfo | None = None
    tokenizer: Tokenizer | None = attrs.field(default=None, eq=False)
    model_name: str | None = None
    model_path: Path | None = None
    backend_name: str | None = None
    load_spec: LoadSpec | None = None
    settings: ModelSettings = attrs.field(factory=ModelSettings, eq=False)
    template: PromptTemplate | None = None
    preset_name: str | None = None
    preset: Any = None  # the active sampler preset (tabby.serving.presets), None = no overrides
    loras: tuple[LoraSpec, ...] = ()
    draft: DraftSpec | None = None
    # The loaded model's structured-output compiler (reference engine only).
    constraints: ConstraintCompiler | None = attrs.field(default=None, eq=False)
    # The loaded model's scheduler: where its jobs go (None while no model is loaded).
    scheduler: JobSubmitter | None = attrs.field(default=None, eq=False)
    # The model a load in progress brings up (None: no load runs). Generation requests
    # wait for it rather than be refused by the model on its way out.
    loading: str | None = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len if self.model is not None else 0

    @property
    def max_batch_size(self) -> int:
        return self.model.max_batch_size if self.model is not None else 0

    @functools.cached_property
    def prompt_byte_limit(self) -> int:
        """Prompt bytes that can never fit the context (0 without a model).

        No token spells more bytes than the longest one in the vocabulary, so a longer
        prompt has more tokens than the context holds: it is refused before it is
        tokenized (tokenizing megabytes holds the GIL for seconds). Computed once per
        snapshot, on first use.
        """
        tokenizer = self.tokenizer
        if tokenizer is None or self.model is None:
            return 0
        longest = 1
        for token_id in range(tokenizer.vocab_size):
            try:
                size = len(tokenizer.piece(token_id).encode("utf-8", "surrogatepass"))
            except (KeyError, IndexError, ValueError):
                continue  # an id the vocabulary does not use
            longest = max(longest, size)
        return self.max_seq_len * longest

