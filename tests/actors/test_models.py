"""ModelManager driven through its handle, with a recording scripted loader and a tiny
real model; each model's scheduler and the health monitor are the real actors."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tabby.actors.health import HealthHandle, HealthMonitor
from tabby.actors.messages import JobsDraining, LoadEvent, LoadFailed, ModelLoaded
from tabby.actors.models import ModelManager, ModelManagerHandle
from tabby.actors.models.listing import resolve_model
from tabby.actors.models.residency import DeviceLimiters, DeviceStats
from tabby.actors.scheduler import SchedulerHandle
from tabby.backends.base import Backend, LoadProgress, LoadSpec, ProgressCallback
from tabby.backends.registry import BackendEntry, BackendRegistry, default_registry
from tabby.backends.scripted import ScriptedBackend
from tabby.config import TabbyConfig
from tabby.config.loader import structure_config
from tabby.engine.embedded import DEFAULT_MODEL_NAME
from tabby.errors import (
    AuthenticationError,
    BackendUnavailable,
    InvalidRequest,
    ModelNotFound,
    NoModelLoaded,
    NotFound,
    NotSupported,
    ServiceUnavailable,
    TabbyError,
)
from tabby.jobs import GenerationJob
from tabby.jobs.events import Failed, TextChunk
from tabby.serving.model_settings import (
    DraftModelRequest,
    LoraRequest,
    ModelLoadRequest,
    detect_backend,
)
from tabby.serving.permission import Permission
from tabby.serving.state import ServingState

REPO = Path(__file__).resolve().parents[2]
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


class Loader:
    """A scripted 'reference' loader that records every load and can fail or hold one."""

    def __init__(self) -> None:
        self.specs: list[LoadSpec] = []
        self.backends: list[ScriptedBackend] = []
        self.fail: set[str] = set()
        self.hold: threading.Event | None = None
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self, spec: LoadSpec, progress: ProgressCallback) -> Backend:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.hold is not None:
                self.hold.wait()
            progress(LoadProgress("model", 1, 2))
            if spec.name in self.fail:
                raise RuntimeError(f"weights of {spec.name} are corrupt")
            progress(LoadProgress("model", 2, 2))
            progress(LoadProgress("model", 2, 2, "finished"))
            self.specs.append(spec)
            backend = ScriptedBackend(name=spec.name, script="m" * 300, path=str(spec.path))
            self.backends.append(backend)
            return backend
        finally:
            with self._lock:
                self.running -= 1


def write_model(root: Path, name: str, config: dict[str, Any] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    return folder


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for name in ("alpha", "beta", "broken"):
        write_model(root, name)
    write_model(root, "exl3-model", {**LLAMA_CONFIG, "quantization_config": {"quant_method": "exl3"}})
    write_model(root, "exl2-model", {**LLAMA_CONFIG, "quantization_config": {"quant_method": "exl2"}})
    write_model(root, "gptq-model", {**LLAMA_CONFIG, "quantization_config": {"quant_method": "gptq"}})
    write_model(root, "mamba", {"architectures": ["MambaForCausalLM"]})
    (root / "single.gguf").write_bytes(b"GGUF")
    (root / "notes").mkdir()  # no config.json: not a model
    write_model(tmp_path, "outside")
    (root / "escape").symlink_to(tmp_path / "outside")
    return root


def make_config(tmp_path: Path, model_dir: Path, **model: Any) -> TabbyConfig:
    extra = model.pop("_sections", None)
    values: dict[str, Any] = {
        "model": {
            "model_dir": str(model_dir),
            "model_name": "",
            "templates_dir": str(REPO / "templates"),
            **model,
        },
        "sampling": {"override_preset": "", "overrides_dir": str(REPO / "sampler_overrides")},
        "lora": {"lora_dir": str(tmp_path / "loras")},
        "draft_model": {"draft_model_dir": str(model_dir)},
    }
    if extra:
        values.update(extra)
    return structure_config(values, base_dir=tmp_path)


@attrs.frozen
class Rig:
    models: ModelManagerHandle
    manager: ModelManager
    health: HealthHandle
    loader: Loader

    @property
    def scheduler(self) -> SchedulerHandle:
        """The scheduler of the model loaded now."""
        return scheduler_of(self.models.serving_state())


def scheduler_of(state: ServingState) -> SchedulerHandle:
    assert isinstance(state.scheduler, SchedulerHandle), "no model is loaded"
    return state.scheduler


async def start(
    nursery: trio.Nursery,
    config: TabbyConfig,
    *,
    registry: BackendRegistry | None = None,
    loader: Loader | None = None,
) -> Rig:
    loader = loader or Loader()
    if registry is None:
        registry = default_registry().with_entry(BackendEntry("reference", loader))
    health: HealthHandle = await nursery.start(HealthMonitor().run)
    manager = ModelManager(config, health=health, registry=registry)
    models: ModelManagerHandle = await nursery.start(manager.run)
    return Rig(models, manager, health, loader)


async def load_events(models: ModelManagerHandle, request: ModelLoadRequest) -> list[LoadEvent]:
    async with await models.load_model(request) as events:
        return [event async for event in events]


@pytest.fixture
async def rig(nursery: trio.Nursery, tmp_path: Path, model_dir: Path) -> Rig:
    return await start(nursery, make_config(tmp_path, model_dir))


# -- listing and names ------------------------------------------------------------------


async def test_listing(rig: Rig, tmp_path: Path) -> None:
    models = await rig.models.list("models")
    assert models == (
        "alpha", "beta", "broken", "exl2-model", "exl3-model", "gptq-model", "mamba",
        "single.gguf", DEFAULT_MODEL_NAME,
    )  # fmt: skip
    assert "chatml" in await rig.models.list("templates")
    assert "safe_defaults" in await rig.models.list("presets")
    assert await rig.models.list("loras") == ()
    (tmp_path / "loras" / "style").mkdir(parents=True)
    assert await rig.models.list("loras") == ("style",)
    assert DEFAULT_MODEL_NAME not in await rig.models.list("drafts")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../outside", "invalid model name"),
        ("/etc", "invalid model name"),
        ("alpha/../../outside", "invalid model name"),
        ("~root", "invalid model name"),
        ("escape", "leads outside"),
        ("missing", "not found"),
        ("notes", "no config.json"),
    ],
)
async def test_bad_names_are_refused_before_anything_happens(
    rig: Rig, name: str, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message) as refused:
        await rig.models.load_model(ModelLoadRequest(model_name=name))
    assert refused.value.param == "model_name"
    assert rig.loader.specs == []


def test_resolution_of_gguf_and_embedded_names(model_dir: Path) -> None:
    assert resolve_model(model_dir, "single").path == model_dir / "single.gguf"
    assert resolve_model(model_dir, "single.gguf").kind == "gguf"
    embedded = resolve_model(model_dir, DEFAULT_MODEL_NAME)
    assert embedded.kind == "embedded"
    assert embedded.path.is_file()


# -- loading ----------------------------------------------------------------------------


async def test_load_streams_progress_attaches_and_publishes(rig: Rig) -> None:
    before = rig.models.serving_state()
    assert not before.loaded
    events = await load_events(rig.models, ModelLoadRequest(model_name="alpha"))
    assert events[:-1] == [
        LoadProgress("model", 1, 2),
        LoadProgress("model", 2, 2),
        LoadProgress("model", 2, 2, "finished"),
    ]
    loaded = events[-1]
    assert isinstance(loaded, ModelLoaded)
    state = loaded.state
    assert state is rig.models.serving_state()
    assert state.version > before.version
    assert (state.model_name, state.backend_name, state.epoch) == ("alpha", "reference", 1)
    assert state.model is not None
    assert state.model.name == "alpha"
    assert state.tokenizer is rig.loader.backends[0].tokenizer
    assert state.max_seq_len == 4096
    # The scheduler serves the new backend for jobs of this epoch.
    async with await rig.scheduler.submit(GenerationJob("j", (1,), 3), model_epoch=state.epoch) as ev:
        assert isinstance(await ev.receive(), TextChunk)
    # The same model again: one finished event, no reload.
    events = await load_events(rig.models, ModelLoadRequest(model_name="alpha"))
    assert events == [LoadProgress("model", 1, 1, "finished"), ModelLoaded(state)]
    assert len(rig.loader.specs) == 1


async def test_settings_precedence(nursery: trio.Nursery, tmp_path: Path, model_dir: Path) -> None:
    config = make_config(
        tmp_path,
        model_dir,
        max_seq_len=100,
        chunk_size=256,
        cache_size=4000,
        _sections={"model_defaults": {"max_seq_len": 200, "cache_mode": "Q8", "max_batch_size": 2}},
    )
    (model_dir / "alpha" / "tabby_config.toml").write_text("max_seq_len = 300\nmax_batch_size = 3\n")
    rig = await start(nursery, config)
    await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    spec = rig.loader.specs[-1]
    assert (spec.max_seq_len, spec.max_batch_size, spec.cache_mode) == (300, 3, "Q8")
    assert (spec.chunk_size, spec.cache_size) == (256, 4000)
    await rig.models.load_model_and_wait(ModelLoadRequest(model_name="beta", max_seq_len=400))
    spec = rig.loader.specs[-1]
    assert (spec.max_seq_len, spec.max_batch_size, spec.cache_mode) == (400, 2, "Q8")
    assert rig.models.serving_state().settings.max_seq_len == 400
    (model_dir / "beta" / "tabby_config.toml").write_text("max_seq_lenn = 1\n")
    with pytest.raises(InvalidRequest, match="max_seq_lenn"):
        await rig.models.load_model(ModelLoadRequest(model_name="beta", skip_queue=True))


def test_backend_detection(model_dir: Path) -> None:
    assert detect_backend(model_dir / "alpha", None) == "reference"
    assert detect_backend(model_dir / "single.gguf", None) == "reference"
    assert detect_backend(model_dir / "exl3-model", None) == "exllamav3"
    assert detect_backend(model_dir / "exl2-model", None) == "exllamav2"
    assert detect_backend(model_dir / "exl3-model", "reference") == "reference"
    with pytest.raises(NotSupported, match="gptq"):
        detect_backend(model_dir / "gptq-model", None)
    with pytest.raises(NotSupported, match="MambaForCausalLM"):
        detect_backend(model_dir / "mamba", None)


@pytest.mark.parametrize(
    ("request_", "error", "message"),
    [
        (ModelLoadRequest(model_name="exl3-model"), BackendUnavailable, "exllamav3"),
        (ModelLoadRequest(model_name="exl2-model"), BackendUnavailable, "exllamav2"),
        (ModelLoadRequest(model_name="alpha", backend="exllamav3"), BackendUnavailable, "exllamav3"),
        (ModelLoadRequest(model_name="alpha", backend="nope"), InvalidRequest, "unknown backend"),
        (ModelLoadRequest(model_name="mamba"), NotSupported, "architecture"),
        (
            ModelLoadRequest(model_name="alpha", draft_model=DraftModelRequest(draft_model_name="beta")),
            NotSupported,
            "draft models are not supported by the reference backend",
        ),
        (ModelLoadRequest(model_name="alpha", prompt_template="nope"), NotFound, "nope"),
    ],
)
async def test_refused_loads_leave_the_current_model(
    rig: Rig, request_: ModelLoadRequest, error: type[TabbyError], message: str
) -> None:
    state = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="beta"))
    with pytest.raises(error, match=message):
        await rig.models.load_model(request_)
    assert rig.models.serving_state() is state


async def test_loras_on_a_backend_without_them(rig: Rig) -> None:
    with pytest.raises(NoModelLoaded):
        await rig.models.load_loras((LoraRequest(name="x"),))
    await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    with pytest.raises(NotSupported, match="LoRAs are not supported by the reference backend"):
        await rig.models.load_loras((LoraRequest(name="x"),))


async def test_loras_and_draft_reach_a_backend_that_supports_them(
    nursery: trio.Nursery, tmp_path: Path, model_dir: Path
) -> None:
    loader = Loader()
    registry = default_registry().with_entry(BackendEntry("reference", loader, lora=True, draft=True))
    rig = await start(nursery, make_config(tmp_path, model_dir), registry=registry, loader=loader)
    (tmp_path / "loras" / "style").mkdir(parents=True)
    draft = DraftModelRequest(draft_model_name="beta", draft_rope_alpha=2.0)
    await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha", draft_model=draft))
    assert loader.specs[-1].draft is not None
    assert (loader.specs[-1].draft.name, loader.specs[-1].draft.rope_alpha) == ("beta", 2.0)
    result = await rig.models.load_loras(
        (LoraRequest(name="style", scaling=0.5), LoraRequest(name="missing"))
    )
    assert (result.success, result.failure) == (("style",), ("missing",))
    assert [(lo.name, lo.scaling) for lo in loader.specs[-1].loras] == [("style", 0.5)]
    assert rig.models.serving_state().loras == loader.specs[-1].loras
    await rig.models.unload_loras()
    assert loader.specs[-1].loras == ()
    assert len(loader.specs) == 3


async def test_load_drains_or_cancels_running_jobs(rig: Rig) -> None:
    state = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    events = await rig.scheduler.submit(GenerationJob("j", (1,), 300), model_epoch=state.epoch)
    await rig.models.load_model_and_wait(ModelLoadRequest(model_name="beta"))
    async with events:
        received = [e async for e in events]
    assert "".join(e.text for e in received if isinstance(e, TextChunk)) == "m" * 300
    assert rig.loader.backends[0].closed
    # skip_queue cancels instead of waiting.
    state = rig.models.serving_state()
    events = await rig.scheduler.submit(GenerationJob("k", (1,), 10**6), model_epoch=state.epoch)
    new = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha", skip_queue=True))
    async with events:
        last = [e async for e in events][-1]
    assert isinstance(last, Failed)
    assert isinstance(last.error, ServiceUnavailable)
    # A request prepared for the old model is refused, by its scheduler or the new one.
    with pytest.raises(NoModelLoaded, match="model changed"):
        await scheduler_of(state).submit(GenerationJob("old", (1,), 3), model_epoch=state.epoch)
    with pytest.raises(NoModelLoaded, match="model changed"):
        await rig.scheduler.submit(GenerationJob("old", (1,), 3), model_epoch=state.epoch)
    assert new.epoch == state.epoch + 1


async def test_a_load_names_itself_and_wakes_who_waits_for_it(rig: Rig) -> None:
    alpha = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    assert alpha.loading is None
    assert await rig.models.wait_for_load() is alpha  # no load: at once
    # A running job: the load says it waits for it before anything else.
    job = await rig.scheduler.submit(GenerationJob("j", (1,), 300), model_epoch=alpha.epoch)
    rig.loader.hold = threading.Event()
    events = await rig.models.load_model(ModelLoadRequest(model_name="beta"))
    with trio.fail_after(5):
        while rig.models.serving_state().loading != "beta":
            await trio.sleep(0.01)
    waited: list[ServingState] = []
    async with trio.open_nursery() as nursery:

        async def wait() -> None:
            waited.append(await rig.models.wait_for_load())

        nursery.start_soon(wait)
        nursery.start_soon(wait)
        with trio.fail_after(5):
            while (await rig.models.statistics()).load_waiters < 2:
                await trio.sleep(0.01)
        assert waited == []
        async with job:
            assert [e async for e in job]  # drained, not cancelled
        rig.loader.hold.set()
    async with events:
        received = [e async for e in events]
    assert received[0] == JobsDraining(1)
    assert isinstance(received[-1], ModelLoaded)
    state = rig.models.serving_state()
    assert (state.model_name, state.loading) == ("beta", None)
    assert waited == [state, state]
    # A failed load wakes them too, with no model.
    rig.loader.fail.add("alpha")
    await load_events(rig.models, ModelLoadRequest(model_name="alpha"))
    after = await rig.models.wait_for_load()
    assert (after.loaded, after.loading) == (False, None)


async def test_concurrent_loads_are_serialized(rig: Rig) -> None:
    rig.loader.hold = threading.Event()
    first = await rig.models.load_model(ModelLoadRequest(model_name="alpha"))
    second = await rig.models.load_model(ModelLoadRequest(model_name="beta"))
    stats = await rig.models.statistics()
    assert stats.queued_operations + (stats.loading is not None) == 2
    rig.loader.hold.set()
    async with first, second:
        assert isinstance([e async for e in first][-1], ModelLoaded)
        assert isinstance([e async for e in second][-1], ModelLoaded)
    assert [s.name for s in rig.loader.specs] == ["alpha", "beta"]
    assert rig.loader.max_running == 1
    assert rig.models.serving_state().model_name == "beta"


async def test_failed_load_leaves_no_model_and_a_health_problem(rig: Rig) -> None:
    alpha = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    rig.loader.fail.add("broken")
    events = await load_events(rig.models, ModelLoadRequest(model_name="broken"))
    assert events[0] == LoadProgress("model", 1, 2)
    failed = events[-1]
    assert isinstance(failed, LoadFailed)
    assert "weights of broken are corrupt" in failed.error.message
    state = rig.models.serving_state()
    assert (state.loaded, state.model_name, state.template) == (False, None, None)
    assert rig.loader.backends[0].closed
    assert state.scheduler is None
    with pytest.raises(NoModelLoaded):
        await scheduler_of(alpha).submit(GenerationJob("j", (1,), 3))
    report = await rig.health.get()
    assert [p.source for p in report.problems] == ["models"]
    await rig.models.load_model_and_wait(ModelLoadRequest(model_name="beta"))
    assert (await rig.health.get()).healthy
    stats = await rig.models.statistics()
    assert (stats.loads, stats.load_failures) == (2, 1)


async def test_unload(rig: Rig) -> None:
    state = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    events = await rig.scheduler.submit(GenerationJob("j", (1,), 10**6), model_epoch=state.epoch)
    await rig.models.unload_model()
    async with events:
        assert isinstance([e async for e in events][-1], Failed)
    assert not rig.models.serving_state().loaded
    assert rig.loader.backends[0].closed
    with pytest.raises(NoModelLoaded):
        await scheduler_of(state).submit(GenerationJob("k", (1,), 3))
    await rig.models.unload_model()  # nothing loaded: still fine


async def test_template_and_preset_switching(rig: Rig) -> None:
    with pytest.raises(NoModelLoaded):
        await rig.models.switch_template("chatml")
    await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    await rig.models.switch_template("chatml")
    template = rig.models.serving_state().template
    assert template is not None
    assert template.name == "chatml"
    with pytest.raises(NotFound):
        await rig.models.switch_template("no-such-template")
    await rig.models.unload_template()
    assert rig.models.serving_state().template is None
    await rig.models.switch_preset("safe_defaults")
    state = rig.models.serving_state()
    assert state.preset_name == "safe_defaults"
    assert state.preset is not None
    await rig.models.switch_preset(overrides={"temperature": {"override": 0.5, "force": True}})
    state = rig.models.serving_state()
    assert state.preset_name is None
    assert state.preset.get("temperature").value == 0.5
    with pytest.raises(InvalidRequest):
        await rig.models.switch_preset()
    with pytest.raises(NotFound):
        await rig.models.switch_preset("nope")
    await rig.models.unload_preset()
    assert (rig.models.serving_state().preset_name, rig.models.serving_state().preset) == (None, None)


async def test_inline_loading_rules(nursery: trio.Nursery, tmp_path: Path, model_dir: Path) -> None:
    off = await start(nursery, make_config(tmp_path, model_dir))
    state = await off.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    # Inline loading off: the loaded model by any of its names, a dummy name, or nothing.
    for name in (None, "", "alpha", "gpt-3.5-turbo"):
        assert await off.models.ensure_model(name, Permission.API) is state
    for name in ("beta", "missing"):  # on disk or not, it is not served
        with pytest.raises(ModelNotFound) as unknown:
            await off.models.ensure_model(name, Permission.ADMIN)
        assert (unknown.value.status, unknown.value.param) == (404, "model")
        assert unknown.value.code == "model_not_found"

    config = make_config(tmp_path, model_dir, inline_model_loading=True)
    rig = await start(nursery, config)
    state = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    assert await rig.models.ensure_model(None, Permission.API) is state
    assert await rig.models.ensure_model("alpha", Permission.API) is state
    assert await rig.models.ensure_model("gpt-3.5-turbo", Permission.API) is state  # dummy
    assert await rig.models.ensure_model("gpt-3.5-turbo", Permission.ADMIN) is state
    with pytest.raises(AuthenticationError) as refused:
        await rig.models.ensure_model("beta", Permission.API)
    assert refused.value.status == 401
    with pytest.raises(ModelNotFound):
        await rig.models.ensure_model("missing", Permission.ADMIN)
    with pytest.raises(ModelNotFound):
        await rig.models.ensure_model("missing", Permission.API)
    new = await rig.models.ensure_model("beta", Permission.ADMIN)
    assert (new.model_name, rig.models.serving_state()) == ("beta", new)
    with pytest.raises(InvalidRequest):
        await rig.models.ensure_model("../outside", Permission.ADMIN)


async def test_startup_load_and_startup_failure(
    nursery: trio.Nursery, tmp_path: Path, model_dir: Path
) -> None:
    config = make_config(tmp_path, model_dir, model_name="alpha", max_seq_len=128)
    rig = await start(nursery, config)
    state = rig.models.serving_state()
    assert (state.model_name, state.max_seq_len, rig.loader.specs[0].max_seq_len) == (
        "alpha", 4096, 128
    )  # fmt: skip

    bad = await start(nursery, make_config(tmp_path, model_dir, model_name="missing"))
    assert not bad.models.serving_state().loaded
    assert [p.source for p in (await bad.health.get()).problems] == ["models"]


async def test_shutdown_closes_the_backend_and_stops_answering(tmp_path: Path, model_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await start(nursery, make_config(tmp_path, model_dir, model_name="alpha"))
        nursery.cancel_scope.cancel()
    assert rig.loader.backends[0].closed  # shutdown closes the backend
    with pytest.raises(ServiceUnavailable):
        await rig.models.list("models")


# -- the real reference engine ----------------------------------------------------------


async def test_reference_engine_load_serves_with_its_template(
    nursery: trio.Nursery, tmp_path: Path, model_dir: Path
) -> None:
    from tabby.testing.tiny import make_tiny_hf

    make_tiny_hf(model_dir / "tiny")
    config = make_config(tmp_path, model_dir, max_seq_len=256, cache_size=512)
    rig = await start(nursery, config, registry=default_registry())
    events = await load_events(rig.models, ModelLoadRequest(model_name="tiny"))
    assert isinstance(events[-1], ModelLoaded), events[-1]
    assert events[-2] == LoadProgress("model", events[-2].modules, events[-2].modules, "finished")  # type: ignore[union-attr]
    state = events[-1].state
    assert (state.backend_name, state.max_seq_len) == ("reference", 256)
    assert state.template is not None
    assert state.tokenizer is not None
    prompt = tuple(state.tokenizer.encode("Hello"))
    async with await rig.scheduler.submit(GenerationJob("j", prompt, 4), model_epoch=state.epoch) as ev:
        assert [type(e).__name__ for e in [e async for e in ev]][-1] == "Finished"


# -- one scheduler per loaded model -------------------------------------------------------


async def test_a_load_starts_a_scheduler_that_serves_the_model(rig: Rig) -> None:
    assert rig.models.serving_state().scheduler is None
    assert (await rig.models.statistics()).resident == ()
    state = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    scheduler = scheduler_of(state)
    stats = await scheduler.statistics()
    assert (stats.attached, stats.model_name, stats.model_epoch) == (True, "alpha", state.epoch)
    async with await scheduler.submit(GenerationJob("j", (1,), 5), model_epoch=state.epoch) as ev:
        received = [e async for e in ev]
    assert "".join(e.text for e in received if isinstance(e, TextChunk)) == "m" * 5
    assert (await rig.models.statistics()).resident == ("alpha",)


async def test_an_unload_stops_the_scheduler_and_ends_its_jobs(rig: Rig) -> None:
    state = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    scheduler = scheduler_of(state)
    events = await scheduler.submit(GenerationJob("j", (1,), 10**6), model_epoch=state.epoch)
    await rig.models.unload_model()
    async with events:
        last = [e async for e in events][-1]
    assert isinstance(last, Failed)
    with pytest.raises(NoModelLoaded):
        await scheduler.statistics()  # stopped: its inbox is closed
    stats = await rig.models.statistics()
    assert (stats.resident, stats.unloads) == ((), 1)
    assert rig.models.serving_state().scheduler is None


async def test_a_reload_gets_a_fresh_scheduler(rig: Rig) -> None:
    first = await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    async with await scheduler_of(first).submit(GenerationJob("a", (1,), 3)) as events:
        assert [e async for e in events]
    second = await rig.models.load_model_and_wait(
        ModelLoadRequest(model_name="beta", skip_queue=True)
    )
    assert scheduler_of(second) is not scheduler_of(first)
    stats = await scheduler_of(second).statistics()
    assert (stats.model_name, stats.jobs_submitted, stats.model_epoch) == ("beta", 0, second.epoch)
    with pytest.raises(NoModelLoaded, match="model changed"):
        await scheduler_of(first).submit(GenerationJob("old", (1,), 3), model_epoch=first.epoch)
    with pytest.raises(NoModelLoaded, match="model changed"):
        await scheduler_of(second).submit(GenerationJob("old", (1,), 3), model_epoch=first.epoch)
    assert (await rig.models.statistics()).resident == ("beta",)


async def test_shutdown_ends_the_running_jobs_of_every_scheduler(
    tmp_path: Path, model_dir: Path
) -> None:
    async with trio.open_nursery() as nursery:
        rig = await start(nursery, make_config(tmp_path, model_dir, model_name="alpha"))
        state = rig.models.serving_state()
        events = await rig.scheduler.submit(GenerationJob("j", (1,), 10**6), model_epoch=state.epoch)
        nursery.cancel_scope.cancel()
    async with events:
        last = [e async for e in events][-1]
    assert isinstance(last, Failed)
    assert last.error.message == "server shutting down"
    assert rig.loader.backends[0].closed


def test_device_limiters_one_per_device() -> None:
    limiters = DeviceLimiters()
    cpu, cuda = limiters["cpu"], limiters["cuda:0"]
    assert limiters["cpu"] is cpu
    assert cpu is not cuda
    assert (cpu.total_tokens, cuda.total_tokens) == (1, 1)
    assert limiters.statistics() == (
        DeviceStats("cpu", busy=False, waiting=0),
        DeviceStats("cuda:0", busy=False, waiting=0),
    )


async def test_loads_and_steps_hold_the_limiter_of_their_device(rig: Rig, model_dir: Path) -> None:
    (model_dir / "alpha" / "tabby_config.toml").write_text('device = "cpu"\n')
    (model_dir / "beta" / "tabby_config.toml").write_text('device = "cuda:0"\n')
    await rig.models.load_model_and_wait(ModelLoadRequest(model_name="alpha"))
    assert rig.loader.specs[-1].device == "cpu"
    rig.loader.hold = threading.Event()
    events = await rig.models.load_model(ModelLoadRequest(model_name="beta"))
    # The load of beta waits in its thread, holding cuda:0 and nothing else.
    with trio.fail_after(10):
        while not (stats := await rig.models.statistics()).devices or not any(
            d.busy for d in stats.devices
        ):
            await trio.sleep(0.01)
    assert stats.devices == (
        DeviceStats("cpu", busy=False, waiting=0),
        DeviceStats("cuda:0", busy=True, waiting=0),
    )
    rig.loader.hold.set()
    async with events:
        assert isinstance([e async for e in events][-1], ModelLoaded)
    assert (await rig.models.statistics()).resident == ("beta",)
