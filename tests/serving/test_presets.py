"""Sampler presets: file format, force/additive/default semantics, aliases, errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

from tabby.config.validation import make_converter, structure
from tabby.errors import InvalidRequest, NotFound
from tabby.serving.presets import (
    PresetOverride,
    SamplerPreset,
    apply_preset,
    list_presets,
    load_preset,
    preset_from_dict,
)
from tabby.serving.sampling import SamplerParams

PRESETS = Path(__file__).resolve().parents[2] / "sampler_overrides"


def preset(**entries: dict[str, Any]) -> SamplerPreset:
    return preset_from_dict("test", entries)


def resolve(body: dict[str, Any], active: SamplerPreset | None) -> SamplerParams:
    return structure(
        apply_preset(body, active), SamplerParams, make_converter(forbid_extra_keys=False)
    )


def test_shipped_presets() -> None:
    assert list_presets(PRESETS) == ["safe_defaults", "sample_preset"]
    safe = load_preset(PRESETS, "safe_defaults")
    assert safe.overrides == (
        PresetOverride("temperature", 0.8),
        PresetOverride("top_p", 0.9),
    )
    params = resolve({}, safe)
    assert (params.temperature, params.top_p) == (0.8, 0.9)
    params = resolve({"temperature": 0.1}, safe)
    assert (params.temperature, params.top_p) == (0.1, 0.9)


def test_sample_preset_lists_every_key_with_neutral_values() -> None:
    sample = load_preset(PRESETS, "sample_preset")
    text = (PRESETS / "sample_preset.toml").read_text()
    # Neutral values for fields whose default (null) TOML cannot express.
    neutral_values: dict[str, Any] = {
        "max_tokens": 150, "logit_bias": {}, "json_schema": {}, "regex_pattern": "",
        "grammar_string": "",
    }  # fmt: skip
    for field in attrs.fields(SamplerParams):
        entry = sample.get(field.name)
        if entry is None:
            # TOML cannot say null: such keys are shown commented out.
            assert field.default is None, field.name
            assert f"# [{field.name}]" in text
            continue
        expected = neutral_values.get(field.name, field.default)
        if isinstance(expected, tuple):
            expected = list(expected)
        assert entry.value == expected, field.name
    assert sample.get("n") == PresetOverride("n", 1)
    assert not any(o.force or o.additive for o in sample.overrides)
    params = resolve({}, sample)
    assert params.max_tokens == 150
    neutral = resolve({"max_tokens": 150}, None)
    assert params.to_settings() == neutral.to_settings()
    assert params.job_options() == neutral.job_options()


def test_default_force_and_additive() -> None:
    active = preset(
        temperature={"override": 0.5},
        top_k={"override": 20, "force": True},
        stop={"override": ["###"], "additive": True},
        banned_tokens={"override": [1, 2], "additive": True},
        dry_sequence_breakers={"override": ["\n"], "additive": True},
        banned_strings={"override": ["x"], "force": True, "additive": True},
    )
    body = {
        "temperature": 0.9,
        "top_k": 5,
        "stop": "END",
        "banned_tokens": "7,8",
        "dry_sequence_breakers": '":"',
        "banned_strings": ["mine"],
    }
    out = apply_preset(body, active)
    assert out == {
        "temperature": 0.9,  # a default never replaces what the client sent
        "top_k": 20,  # forced
        "stop": ["###", "END"],  # additive: prepended
        "banned_tokens": [1, 2, 7, 8],
        "dry_sequence_breakers": ["\n", ":"],
        "banned_strings": ["x"],  # force beats additive
    }
    assert body["stop"] == "END"  # the input is not modified
    omitted = apply_preset({}, active)
    assert omitted["temperature"] == 0.5
    assert omitted["stop"] == ["###"]


@pytest.mark.parametrize(
    ("key", "value", "client"),
    [("temperature", 0, 0.7), ("ban_eos_token", False, True), ("stop", [], ["a"]),
     ("top_k", 0, 50), ("banned_strings", [], "x")],
)  # fmt: skip
def test_forced_falsy_values_apply(key: str, value: Any, client: Any) -> None:
    active = preset(**{key: {"override": value, "force": True}})
    assert apply_preset({key: client}, active)[key] == value
    params = resolve({key: client}, active)
    expected = tuple(value) if isinstance(value, list) else value
    assert getattr(params, key) == expected


def test_aliases_count_as_sent() -> None:
    active = preset(max_tokens={"override": 150}, penalty_range={"override": 64, "force": True})
    out = apply_preset({"max_length": 20, "rep_pen_range": 10}, active)
    assert out == {"max_tokens": 20, "penalty_range": 64}
    # The canonical name wins over an alias when both are sent.
    assert apply_preset({"max_tokens": 5, "max_completion_tokens": 9}, None) == {"max_tokens": 5}


def test_null_means_omitted() -> None:
    active = preset(temperature={"override": 0.4}, max_tokens={"override": 100})
    out = apply_preset({"temperature": None, "max_tokens": None, "seed": None}, active)
    assert out == {"temperature": 0.4, "max_tokens": 100, "seed": None}
    # Without a preset, null is dropped for fields that do not accept it.
    assert apply_preset({"temperature": None, "seed": None, "n": None}, None) == {"seed": None}


def test_additive_leaves_malformed_client_values_to_validation() -> None:
    active = preset(banned_tokens={"override": [1], "additive": True})
    assert apply_preset({"banned_tokens": "x,y"}, active) == {"banned_tokens": "x,y"}


def test_endpoint_level_n() -> None:
    active = preset(n={"override": 2})
    assert apply_preset({}, active) == {"n": 2}
    assert apply_preset({"n": 3}, active) == {"n": 3}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"temprature": {"override": 1.0}}, "unknown sampler key 'temprature'"),
        ({"max_length": {"override": 5}}, "use the canonical name 'max_tokens'"),
        ({"temperature": 0.8}, "'temperature' must be a table"),
        ({"temperature": {"override": 0.8, "forced": True}}, "unknown entry 'forced'"),
        ({"temperature": {"override": 0.8, "force": "yes"}}, "must be true or false"),
        ({"temperature": {"override": 0.8, "additive": True}}, "cannot be additive"),
        ({"temperature": {"override": "hot"}}, "temperature: expected a number"),
        ({"top_p": {"override": 3}}, "top_p: expected a number in [0.0, 1.0]"),
        ({"min_tokens": {"override": 9}, "max_tokens": {"override": 3}}, "min_tokens: must not"),
        ({"n": {"override": 0}}, "n: expected an integer ≥ 1"),
    ],
)
def test_preset_errors(entries: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        preset_from_dict("inline", entries)
    assert "sampler preset 'inline'" in info.value.message
    assert message in info.value.message


def test_null_override_is_dropped() -> None:
    assert preset(seed={"override": None}, top_k={"override": 3}).overrides == (
        PresetOverride("top_k", 3),
    )


def test_preset_file_errors_name_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "typo.toml").write_text("[temprature]\noverride = 0.7\n")
    (tmp_path / "broken.toml").write_text("[temperature\n")
    with pytest.raises(InvalidRequest, match=r"typo\.toml: unknown sampler key 'temprature'"):
        load_preset(tmp_path, "typo")
    with pytest.raises(InvalidRequest, match=r"broken\.toml"):
        load_preset(tmp_path, "broken")
    with pytest.raises(NotFound, match="sampler preset 'absent' not found"):
        load_preset(tmp_path, "absent")
    assert list_presets(tmp_path) == ["broken", "typo"]
    assert list_presets(tmp_path / "none") == []


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".."])
def test_preset_path_escape_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid sampler preset name"):
        load_preset(tmp_path / "presets", name)


def test_inline_table_form(tmp_path: Path) -> None:
    (tmp_path / "inline.toml").write_text(
        'stop = { override = ["<|end|>"], additive = true }\nseed = { override = 7, force = true }\n'
    )
    assert tomllib.loads((tmp_path / "inline.toml").read_text())  # valid TOML
    active = load_preset(tmp_path, "inline")
    params = resolve({"stop": ["x"], "seed": 1}, active)
    assert params.job_options().stop_strings == ("<|end|>", "x")
    assert params.seed == 7
