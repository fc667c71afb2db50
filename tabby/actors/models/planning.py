"""Turning a load request into a checked plan, for the ModelManager.

Everything here is synchronous file work (resolving names, reading ``config.json`` and
``tabby_config.toml``, finding templates): the manager calls it from a worker thread.
A :class:`Planner` holds only immutable things (the config and the backend registry).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs

from tabby.actors.models.listing import (
    ModelEntry,
    list_loras,
    list_models,
    resolve_inside,
    resolve_lora,
    resolve_model,
)
from tabby.backends.base import DraftSpec, LoadSpec, LoraSpec
from tabby.backends.registry import BackendEntry, BackendRegistry
from tabby.config import ModelSettings, TabbyConfig, merge_model_settings
from tabby.errors import InvalidRequest, NotSupported, TabbyError
from tabby.serving.model_settings import (
    DraftModelRequest,
    LoraLoadResult,
    LoraRequest,
    ModelLoadRequest,
    build_load_spec,
    detect_backend,
    read_model_config,
    rope_alpha_for,
)
from tabby.serving.presets import list_presets
from tabby.serving.state import ServingState
from tabby.serving.templating import (
    PromptTemplate,
    find_template,
    list_templates,
    load_named_template,
)

__all__ = ["LoadPlan", "Planner"]

log = logging.getLogger(__name__)


@attrs.frozen
class LoadPlan:
    """A validated load: where the model is, which backend, the merged settings."""

    entry: ModelEntry
    backend: BackendEntry
    settings: ModelSettings = attrs.field(eq=False)
    spec: LoadSpec
    skip_queue: bool = False


class Planner:
    def __init__(self, config: TabbyConfig, registry: BackendRegistry) -> None:
        self._config = config
        self._registry = registry
        self._model_dir = config.resolve(config.model.model_dir)
        self._draft_dir = config.resolve(config.draft_model.draft_model_dir)
        self._lora_dir = config.resolve(config.lora.lora_dir)
        self._templates_dir = config.resolve_shipped(config.model.templates_dir)
        self._presets_dir = config.resolve_shipped(config.sampling.overrides_dir)

    def plan(self, request: ModelLoadRequest, from_config: bool) -> LoadPlan:
        """Check ``request`` and merge its settings.

        ``from_config`` marks the startup load: it also takes ``[draft_model]``.
        """
        entry = resolve_model(self._model_dir, request.model_name)
        settings = merge_model_settings(
            self._config, read_model_config(entry.path), request.explicit()
        )
        backend = self._registry.get(detect_backend(entry.path, settings.backend))
        backend.check()
        draft = self._draft(request.draft_model, backend, from_config)
        if settings.vision and not backend.vision:
            log.warning("the %s backend has no vision support; loading without it", backend.name)
        if settings.prompt_template:
            # A named template that does not exist is refused before anything unloads.
            find_template(
                entry.path,
                templates_dir=self._templates_dir,
                name=settings.prompt_template,
                embedded=None,
            )
        spec = build_load_spec(name=entry.name, path=entry.path, settings=settings, draft=draft)
        return LoadPlan(entry, backend, settings, spec, request.skip_queue)

    def _draft(
        self, request: DraftModelRequest | None, backend: BackendEntry, from_config: bool
    ) -> DraftSpec | None:
        cfg = self._config.draft_model
        if request is None and from_config and cfg.draft_model_name:
            request = DraftModelRequest(
                draft_model_name=cfg.draft_model_name,
                draft_rope_scale=cfg.draft_rope_scale,
                draft_rope_alpha=cfg.draft_rope_alpha,
                draft_cache_mode=cfg.draft_cache_mode,
                draft_gpu_split=cfg.draft_gpu_split,
            )
        if request is None:
            return None
        if not backend.draft:
            raise NotSupported(
                f"draft models are not supported by the {backend.name} backend",
                param="draft_model",
            )
        param = "draft_model.draft_model_name"
        path = resolve_inside(
            self._draft_dir, request.draft_model_name, param=param, what="draft model"
        )
        if not ((path / "config.json").is_file() or (path.is_file() and path.suffix == ".gguf")):
            raise InvalidRequest(
                f"draft model {request.draft_model_name!r} not found", param=param
            )
        return DraftSpec(
            path=path,
            name=request.draft_model_name,
            rope_scale=request.draft_rope_scale,
            rope_alpha=rope_alpha_for(request.draft_rope_alpha, None, None),
            cache_mode=request.draft_cache_mode or cfg.draft_cache_mode,
            gpu_split=tuple(request.draft_gpu_split or ()),
            num_tokens=cfg.draft_num_tokens,
        )

    def require_lora_support(self, backend_name: str) -> None:
        if not self._registry.get(backend_name).lora:
            raise NotSupported(
                f"LoRAs are not supported by the {backend_name} backend", param="loras"
            )

    def resolve_loras(
        self, loras: Sequence[LoraRequest]
    ) -> tuple[tuple[LoraSpec, ...], LoraLoadResult]:
        specs: list[LoraSpec] = []
        failure: list[str] = []
        for lora in loras:
            try:
                specs.append(LoraSpec(resolve_lora(self._lora_dir, lora.name), lora.name, lora.scaling))
            except InvalidRequest as exc:
                log.warning("LoRA %r not loaded: %s", lora.name, exc.message)
                failure.append(lora.name)
        return tuple(specs), LoraLoadResult(tuple(s.name for s in specs), tuple(failure))

    def replan_with_loras(
        self, state: ServingState, loras: tuple[LoraSpec, ...], *, skip_queue: bool
    ) -> LoadPlan:
        """The current model's plan again, with other LoRAs."""
        assert state.model_path is not None
        assert state.load_spec is not None
        assert state.backend_name is not None
        assert state.model_name is not None
        entry = ModelEntry(
            state.model_name, state.model_path, "gguf" if state.model_path.is_file() else "folder"
        )
        spec = attrs.evolve(state.load_spec, loras=loras)
        backend = self._registry.get(state.backend_name)
        return LoadPlan(entry, backend, state.settings, spec, skip_queue)

    def names_loaded(self, name: str, state: ServingState) -> bool:
        """Whether a request's ``model`` field means the loaded model."""
        if state.model_path is None:
            return False
        if name in (state.model_name, state.model_path.name, state.model_path.stem):
            return True
        try:
            return resolve_model(self._model_dir, name, param="model").path == state.model_path
        except InvalidRequest:
            return False

    def named_template(self, name: str) -> PromptTemplate:
        return load_named_template(self._templates_dir, name)

    def model_template(self, plan: LoadPlan, embedded: str | None) -> PromptTemplate | None:
        """The chat template of a freshly loaded model (None: chat is unavailable)."""
        try:
            return find_template(
                plan.entry.path,
                templates_dir=self._templates_dir,
                name=plan.settings.prompt_template or None,
                embedded=embedded,
            )
        except TabbyError as exc:
            log.warning("model %r has no usable chat template: %s", plan.entry.name, exc.message)
            return None

    def list(self, kind: str) -> tuple[str, ...]:
        if kind == "models":
            return tuple(e.name for e in list_models(self._model_dir))
        if kind == "drafts":
            return tuple(
                e.name for e in list_models(self._draft_dir, include_embedded=False)
            )
        if kind == "loras":
            return tuple(list_loras(self._lora_dir))
        if kind == "templates":
            return tuple(list_templates(self._templates_dir))
        return tuple(list_presets(self._presets_dir))
