"""Configuration loading: precedence, strictness, error lines, the shipped tabby.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs
import pytest

from tabby.config import (
    LOAD_KEYS,
    SHORT_FLAGS,
    UNSET,
    ConfigError,
    LoraEntry,
    ModelDefaults,
    ModelSettings,
    TabbyConfig,
    export_config,
    load_config,
    merge_model_settings,
    parse_cli_overrides,
    structure_load_settings,
)
from tabby.config.schema import SECTIONS
from tabby.errors import InvalidRequest

REPO_TOML = Path(__file__).resolve().parents[2] / "tabby.toml"


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load_config reads ./tabby.toml when present; tests start from an empty folder.
    monkeypatch.chdir(tmp_path)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _errors(**kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == "\n".join(info.value.lines)
    return info.value.lines


def _sections(cfg: TabbyConfig) -> TabbyConfig:
    return attrs.evolve(cfg, base_dir=Path("/"), config_file=None)


def test_defaults_without_any_source(tmp_path: Path) -> None:
    cfg = load_config(env={})
    assert _sections(cfg) == _sections(TabbyConfig())
    assert cfg.base_dir == tmp_path
    assert cfg.config_file is None
    assert cfg.network.port == 5000
    assert cfg.network.api_servers == ("OAI",)
    assert cfg.model.model_name == "SmolLM2-135M-Instruct"
    assert cfg.embeddings.embedding_model_name == "all-MiniLM-L6-v2"
    assert cfg.model_defaults.explicit() == {}


def test_precedence_default_file_env_cli(tmp_path: Path) -> None:
    conf = _write(
        tmp_path / "my.toml",
        """
[network]
port = 6000
host = "0.0.0.0"
sse_ping_interval = 3
[logging]
log_level = "warning"
[model]
max_seq_len = 1024
chunk_size = 128
""",
    )
    env = {
        "TABBY_NETWORK_PORT": "6001",
        "TABBY_LOGGING_LOG_LEVEL": "error",
        "TABBY_MODEL_CHUNK_SIZE": "256",
        "PATH": "/bin",
    }
    cfg = load_config(
        config_path=conf, env=env, cli_args=["--port", "6002", "--model.chunk_size=64"]
    )
    assert cfg.network.port == 6002  # cli > env > file
    assert cfg.network.host == "0.0.0.0"  # file only
    assert cfg.network.sse_ping_interval == 3.0
    assert cfg.logging.log_level == "ERROR"  # env > file, normalised
    assert cfg.model.chunk_size == 64
    assert cfg.model.max_seq_len == 1024
    assert cfg.network.max_body_size == 16777216  # default
    cfg = load_config(config_path=conf, env=env)
    assert (cfg.network.port, cfg.model.chunk_size) == (6001, 256)
    cfg = load_config(config_path=conf, env={})
    assert (cfg.network.port, cfg.logging.log_level, cfg.model.chunk_size) == (6000, "WARNING", 128)


def test_log_level_short_env_form() -> None:
    assert load_config(env={"TABBY_LOG_LEVEL": "debug"}).logging.log_level == "DEBUG"
    both = {"TABBY_LOG_LEVEL": "debug", "TABBY_LOGGING_LOG_LEVEL": "error"}
    assert load_config(env=both).logging.log_level == "ERROR"
    assert load_config(env=both, cli_args=["--log-level", "info"]).logging.log_level == "INFO"


def test_reads_tabby_toml_from_cwd_and_resolves_paths(tmp_path: Path) -> None:
    _write(tmp_path / "tabby.toml", '[model]\nmodel_dir = "weights"\n')
    cfg = load_config(env={})
    assert cfg.config_file == tmp_path / "tabby.toml"
    assert cfg.resolve(cfg.model.model_dir) == tmp_path / "weights"

    sub = tmp_path / "etc"
    sub.mkdir()
    conf = _write(sub / "other.toml", '[network]\napi_tokens_file = "keys.toml"\n')
    cfg = load_config(env={}, cli_args=["--config", str(conf)])
    assert cfg.base_dir == sub
    assert cfg.resolve(cfg.network.api_tokens_file) == sub / "keys.toml"
    assert cfg.resolve("/abs/models") == Path("/abs/models")
    assert cfg.model.model_dir == "models"  # ./tabby.toml is not read when --config names another


def test_named_config_file_must_exist(tmp_path: Path) -> None:
    lines = _errors(config_path=tmp_path / "nope.toml", env={})
    assert lines == [f"{tmp_path / 'nope.toml'}: config file not found"]


def test_model_defaults_distinguish_unset_from_null() -> None:
    conf = _write(
        Path("d.toml"),
        '[model_defaults]\nmax_seq_len = 4096\nprompt_template = ""\nrope_alpha = "auto"\n',
    )
    defaults = load_config(config_path=conf, env={}).model_defaults
    assert defaults.explicit() == {
        "max_seq_len": 4096,
        "prompt_template": None,
        "rope_alpha": "auto",
    }
    assert defaults.cache_size is UNSET
    assert defaults.tool_format is UNSET
    cfg = load_config(env={"TABBY_MODEL_DEFAULTS_GPU_SPLIT": "[20, 24.5]"})
    assert cfg.model_defaults.explicit() == {"gpu_split": (20.0, 24.5)}
    assert cfg.model.gpu_split == ()
    assert set(attrs.asdict(merge_model_settings(cfg))) == set(LOAD_KEYS)
    assert {a.name for a in attrs.fields(ModelDefaults)} == set(LOAD_KEYS)


def test_empty_string_means_none_for_optional_names() -> None:
    cfg = load_config(env={"TABBY_SAMPLING_OVERRIDE_PRESET": '""'}, cli_args=["--model-name", ""])
    assert cfg.model.model_name is None
    assert cfg.sampling.override_preset is None


def test_cli_flag_forms() -> None:
    cfg = load_config(
        env={"TABBY_NETWORK_CORS_ORIGINS": "http://a.example"},  # scalar for a list key
        cli_args=[
            "--disable-auth",
            "--api-servers",
            "oai",
            "--api-servers=KOBOLD",
            "--host",
            "0.0.0.0",
            "--network.allow_open_network",
            "true",
            "--model.gpu-split",
            "[10, 12]",
            "--model.gpu_split",
            "4",
            "--developer.cuda_malloc_async",
            "false",
            "--lora.loras",
            '[{name = "style", scaling = 0.5}]',
            "--model.rope_alpha",
            "2.5",
        ],
    )
    assert cfg.network.disable_auth is True
    assert cfg.network.api_servers == ("OAI", "Kobold")
    assert cfg.network.host == "0.0.0.0"
    assert cfg.network.cors_origins == ("http://a.example",)
    assert cfg.model.gpu_split == (10.0, 12.0, 4.0)
    assert cfg.developer.cuda_malloc_async is False
    assert cfg.lora.loras == (LoraEntry(name="style", scaling=0.5),)
    assert cfg.model.rope_alpha == 2.5


def test_every_key_has_a_flag() -> None:
    for section, cls in SECTIONS:
        for a in attrs.fields(cls):
            parsed = parse_cli_overrides([f"--{section}.{a.name}=1"])
            assert section in parsed.layer.values, a.name
    assert set(SHORT_FLAGS) == {
        "--host",
        "--port",
        "--model-name",
        "--model-dir",
        "--disable-auth",
        "--api-servers",
        "--log-level",
    }


def test_unknown_key_names_file_line_and_suggests(tmp_path: Path) -> None:
    conf = _write(tmp_path / "tabby.toml", "[network]\nhost = 'x'\n\nprot = 5001\n[modle]\na = 1\n")
    lines = _errors(env={})
    assert sorted(lines) == [
        "tabby.toml:4: network.prot: unknown key (did you mean port?)",
        "tabby.toml:5: modle: unknown key (did you mean model?)",
    ]
    assert conf.exists()


def test_wrong_type_out_of_range_and_string_bool(tmp_path: Path) -> None:
    conf = _write(
        tmp_path / "c.toml",
        '[network]\nport = "abc"\ndisable_auth = "false"\n\n[embeddings]\nmax_batch = 0\n'
        '[model]\ncache_mode = "Q3"\n\n[[lora.loras]]\nname = "a"\n[[lora.loras]]\nname = "b"\nscaling = -1\n',
    )
    lines = sorted(_errors(config_path=conf, env={}))
    c = str(conf)
    assert lines == sorted(
        [
            f'{c}:2: network.port: expected an integer in 0..65535, got "abc"',
            f'{c}:3: network.disable_auth: expected true or false, got "false"',
            f"{c}:6: embeddings.max_batch: expected an integer >= 1, got 0",
            f'{c}:8: model.cache_mode: expected one of "FP16", "Q8", "Q6", "Q4" or a "k,v" bit pair such as "8,8", got "Q3"',
            f"{c}:14: lora.loras[1].scaling: expected a number >= 0, got -1.0",
        ]
    )


def test_out_of_range_from_cli_and_env_names_the_source() -> None:
    assert _errors(env={}, cli_args=["--port", "70000"]) == [
        "flag --port: network.port: expected an integer in 0..65535, got 70000"
    ]
    assert _errors(env={"TABBY_NETWORK_API_SERVERS": '["OAI", "grpc"]'}) == [
        'env TABBY_NETWORK_API_SERVERS: network.api_servers: expected a list of "OAI" and "Kobold", '
        "got ('OAI', 'grpc')"
    ]


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    conf = _write(tmp_path / "bad.toml", '[network]\nhost = "a"\nport = = 3\n')
    [line] = _errors(config_path=conf, env={})
    assert line.startswith(f"{conf}:3: TOML syntax error: ")


def test_bad_env_variables_are_named() -> None:
    lines = _errors(
        env={
            "TABBY_NETWORK_PORT": "abc",
            "TABBY_MODEL_MAX_SEQ_LEN": "true",
            "TABBY_MODEL_NO_SUCH_KEY": "1",
            "TABBY_UNRELATED_THING": "ignored: unknown section",
        }
    )
    assert lines == ["env TABBY_MODEL_NO_SUCH_KEY: model.no_such_key: unknown key"]
    assert _errors(env={"TABBY_NETWORK_PROT": "1"}) == [
        "env TABBY_NETWORK_PROT: network.prot: unknown key (did you mean TABBY_NETWORK_PORT?)"
    ]
    lines = sorted(_errors(env={"TABBY_NETWORK_PORT": "abc", "TABBY_MODEL_MAX_SEQ_LEN": "true"}))
    assert lines == [
        "env TABBY_MODEL_MAX_SEQ_LEN: model.max_seq_len: expected an integer >= 1, got True",
        'env TABBY_NETWORK_PORT: network.port: expected an integer in 0..65535, got "abc"',
    ]


def test_bad_cli_flags_are_named() -> None:
    assert _errors(env={}, cli_args=["--prot", "1", "--network.nope", "2", "stray"]) == [
        "flag --prot: unknown option",
        "flag --network.nope: unknown option",
        "stray: unexpected argument (options look like --network.port 5001)",
    ]
    assert _errors(env={}, cli_args=["--port"]) == ["flag --port: network.port: missing value"]
    assert _errors(env={}, cli_args=["--disable-auth", "yes"]) == [
        'flag --disable-auth: network.disable_auth: expected true or false, got "yes"'
    ]
    assert _errors(env={}, cli_args=['--network.disable_auth="false"']) == [
        'flag --network.disable_auth: network.disable_auth: expected true or false, got "false"'
    ]


def test_errors_from_several_sources_are_all_reported(tmp_path: Path) -> None:
    conf = _write(tmp_path / "x.toml", "[network]\nport = 1\n")
    lines = _errors(config_path=conf, env={"TABBY_MODEL_BOGUS": "1"}, cli_args=["--bogus"])
    assert lines == [
        "flag --bogus: unknown option",
        "env TABBY_MODEL_BOGUS: model.bogus: unknown key",
    ]


def test_shipped_tabby_toml_is_the_export() -> None:
    text = export_config()
    assert REPO_TOML.read_text(encoding="utf-8") == text, "regenerate with `tabby export-config`"
    cfg = load_config(config_path=REPO_TOML, env={})
    assert _sections(cfg) == _sections(TabbyConfig())
    data = tomllib.loads(text)
    assert [name for name, _ in SECTIONS] == list(data)
    for section, cls in SECTIONS:
        for a in attrs.fields(cls):
            assert a.metadata.get("doc") or section == "model_defaults", f"{section}.{a.name}"
            if section != "model_defaults":
                assert f"# {a.metadata['doc']}" in text
                assert (a.name in data[section]) == (a.default is not None), a.name


def test_load_settings_table_of_a_model_folder() -> None:
    settings = structure_load_settings(
        {"max_seq_len": 2048, "cache_mode": "Q4"}, source="models/m/tabby_config.toml"
    )
    assert settings.explicit() == {"max_seq_len": 2048, "cache_mode": "Q4"}
    with pytest.raises(ConfigError) as info:
        structure_load_settings(
            {"max_seq_len": "a", "model_name": "x"}, source="models/m/tabby_config.toml"
        )
    assert sorted(info.value.lines) == [
        'models/m/tabby_config.toml: max_seq_len: expected an integer >= 1, got "a"',
        "models/m/tabby_config.toml: model_name: unknown key",
    ]


def test_shipped_folders_are_found_from_any_directory(tmp_path: Path) -> None:
    from tabby.config import TabbyConfig

    cfg = TabbyConfig(base_dir=tmp_path)
    templates = cfg.resolve_shipped(cfg.model.templates_dir)
    presets = cfg.resolve_shipped(cfg.sampling.overrides_dir)
    assert (templates / "chatml.jinja").is_file()
    assert (presets / "safe_defaults.toml").is_file()
    # An operator's own folder wins over the shipped one.
    (tmp_path / "templates").mkdir()
    assert cfg.resolve_shipped("templates") == tmp_path / "templates"
    # A folder that exists nowhere stays where the operator asked for it.
    assert cfg.resolve_shipped("nowhere") == tmp_path / "nowhere"


def test_model_settings_merge_in_one_place_with_request_first() -> None:
    conf = _write(
        Path("m.toml"),
        "[model]\nmax_seq_len = 100\ncache_mode = \"Q8\"\nchunk_size = 32\n"
        "[model_defaults]\nmax_seq_len = 200\nchunk_size = 64\nreasoning = true\n",
    )
    cfg = load_config(config_path=conf, env={})
    base = merge_model_settings(cfg)
    assert isinstance(base, ModelSettings)
    assert (base.max_seq_len, base.cache_mode, base.chunk_size, base.reasoning) == (
        200, "Q8", 64, True
    )
    model_file = structure_load_settings({"max_seq_len": 300}, source="m/tabby_config.toml")
    merged = merge_model_settings(cfg, model_file, {"cache_mode": "Q4", "max_batch_size": 3})
    assert (merged.max_seq_len, merged.cache_mode, merged.chunk_size) == (300, "Q4", 64)
    assert merged.max_batch_size == 3
    # The request wins over the model's file, which wins over [model_defaults].
    top = merge_model_settings(cfg, model_file, {"max_seq_len": 400})
    assert top.max_seq_len == 400
    # [model] and [model_defaults] stay as they were: nothing is merged in place.
    assert cfg.model.max_seq_len == 100
    assert cfg.model_defaults.explicit() == {"max_seq_len": 200, "chunk_size": 64, "reasoning": True}
    assert merge_model_settings(cfg, ModelDefaults(), {}) == base


def test_model_settings_check_request_values_with_the_rules_of_model() -> None:
    with pytest.raises(InvalidRequest) as info:
        merge_model_settings(TabbyConfig(), request={"cache_mode": "Q5"})
    assert info.value.param == "cache_mode"
    assert "Q5" in info.value.message


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "myhost.example"])
def test_open_admin_on_the_network_is_refused(host: str) -> None:
    env = {"TABBY_NETWORK_DISABLE_AUTH": "true", "TABBY_NETWORK_HOST": f'"{host}"'}
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    (line,) = info.value.lines
    assert line.startswith("env TABBY_NETWORK_DISABLE_AUTH: network.disable_auth: refused")
    assert "allow_open_network" in line
    allowed = load_config(env={**env, "TABBY_NETWORK_ALLOW_OPEN_NETWORK": "true"})
    assert allowed.network.disable_auth


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_open_admin_on_loopback_is_allowed(host: str) -> None:
    env = {"TABBY_NETWORK_DISABLE_AUTH": "true", "TABBY_NETWORK_HOST": f'"{host}"'}
    assert load_config(env=env).network.host == host


def test_cors_is_off_unless_origins_are_listed() -> None:
    assert TabbyConfig().network.cors_origins == ()
