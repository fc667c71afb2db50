"""What the server serves right now: one immutable snapshot per change."""

from __future__ import annotations

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
