"""llamagw.config: every setting is read from its variable, checked, and defaulted in one place;
what entrypoint.sh asks of it (supervisor_settings) is resolved from the same Config."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamagw import config

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

# A valid value for each variable, different from its default.
OTHER_VALUE = {
    int: "7",
    float: "7.5",
    bool: "false",
    str: "other",
    tuple: "https://example.com",
}
# Settings whose values the generic OTHER_VALUE does not fit.
SPECIAL = {"BACKEND_SOCKET": "/run/other.sock", "LOG_LEVEL": "debug", "PORT": "8100",
           "PORT_HEALTH": "8101", "PORT_BACKEND": "8102", "ACCESS_LOG_MAX_BYTES": "65536",
           "USAGE_JOURNAL_MODE": "delete",
           "MODELS_PRELOAD": "alpha,beta", "MODEL_DOWNLOADING": "true"}


def test_every_field_names_its_variable_and_the_loader_reads_it():
    defaults = config.load_config({})
    for field in dataclasses.fields(config.Config):
        var = field.metadata["env"]
        assert var == field.name.upper()
        raw = SPECIAL.get(var) or OTHER_VALUE[type(getattr(defaults, field.name))]
        value = getattr(config.load_config({var: raw}), field.name)
        assert value != getattr(defaults, field.name), var


def test_unset_and_blank_give_the_field_default():
    blank = {field.metadata["env"]: "  " for field in dataclasses.fields(config.Config)}
    for env in ({}, blank):
        cfg = config.load_config(env)
        for field in dataclasses.fields(config.Config):
            if field.metadata["derive"] is None:
                assert getattr(cfg, field.name) == field.default, field.name


def test_derived_defaults_follow_the_settings_they_come_from(tmp_path):
    cfg = config.load_config({"DATA_DIR": str(tmp_path), "MODEL_NAME": " m.gguf "})
    assert cfg.auth_keys_file == str(tmp_path / "api_keys.txt")
    assert cfg.model_path == str(tmp_path / "models" / "m.gguf")
    cfg = config.load_config({"DATA_DIR": str(tmp_path), "MODEL_PATH": "/x/y.gguf",
                              "AUTH_KEYS_FILE": "/k"})
    assert (cfg.model_path, cfg.auth_keys_file) == ("/x/y.gguf", "/k")
    assert config.load_config({}).data_dir == config.default_data_dir()


def test_usage_ledger_settings(tmp_path):
    cfg = config.load_config({"DATA_DIR": str(tmp_path)})
    assert (cfg.usage_enabled, cfg.usage_retention_days) == (True, 90)
    assert cfg.usage_dir == str(tmp_path / "usage")
    # WAL on a local disk; the rollback journal on RunPod's network volume (read by every worker)
    assert cfg.usage_journal_mode == "wal"
    assert config.load_config({"DATA_DIR": "/runpod-volume"}).usage_journal_mode == "delete"
    assert config.load_config({"DATA_DIR": "/runpod-volume",
                               "USAGE_JOURNAL_MODE": " WAL "}).usage_journal_mode == "wal"


@pytest.mark.parametrize("var,raw", [
    ("PORT", "80a"), ("PORT_HEALTH", "70000"), ("MAX_QUEUE_SIZE", "-1"),
    ("CLIENT_HEADER_TIMEOUT", "never"), ("REQUEST_TIMEOUT", "nan"), ("AUTH_ENABLED", "maybe"),
    ("CORS_ORIGINS", "example.com"), ("LOG_LEVEL", "loud"), ("WORKER_TYPE", "../evil"),
    ("BACKEND_SOCKET", "relative.sock"), ("USAGE_RETENTION_DAYS", "0"),
    ("USAGE_JOURNAL_MODE", "memory"), ("USAGE_ENABLED", "sometimes"),
])
def test_a_bad_value_names_its_variable(var, raw):
    with pytest.raises(config.ConfigError) as err:
        config.load_config({var: raw})
    assert err.value.var == var and str(err.value).startswith(f"{var}: ")


def test_log_level_is_read_through_config():
    assert config.load_config({}).log_level == "INFO"
    assert config.load_config({"LOG_LEVEL": " warning "}).log_level == "WARNING"


def test_collected_ollama_answers_share_the_body_limit_default():
    from llamagw.api import ollama_handlers
    assert ollama_handlers.MAX_COLLECTED_BODY == config.Config().max_request_body_size


# ---- entrypoint.sh's question -------------------------------------------------------------------
def test_supervisor_settings_resolve_the_socket_from_run_dir(tmp_path):
    env = {"RUN_DIR": str(tmp_path), "DATA_DIR": str(tmp_path / "d")}
    out = config.supervisor_settings(env, "unix")
    assert out["BACKEND_SOCKET"] == str(tmp_path / config.BACKEND_SOCKET_NAME)
    assert out["HEALTH_FILE"] == str(tmp_path / "health")
    assert out["LOGS_DIR"] == str(tmp_path / "d" / "logs")
    given = config.supervisor_settings({**env, "BACKEND_SOCKET": "/run/x.sock"}, "unix")
    assert given["BACKEND_SOCKET"] == "/run/x.sock"
    # tcp: llama-server listens on PORT_BACKEND, a BACKEND_SOCKET set (even a bad one) is unused.
    assert config.supervisor_settings({**env, "BACKEND_SOCKET": "bad"}, "tcp")["BACKEND_SOCKET"] \
        == ""


def test_supervisor_settings_check_the_default_socket_path_length():
    run_dir = "/" + "r" * (config.UNIX_PATH_MAX - len(config.BACKEND_SOCKET_NAME))
    with pytest.raises(config.ConfigError) as err:
        config.supervisor_settings({"RUN_DIR": run_dir}, "unix")
    assert err.value.var == "BACKEND_SOCKET"
    assert config.supervisor_settings({"RUN_DIR": run_dir}, "tcp")["RUN_DIR"] == run_dir


def test_supervisor_settings_need_three_distinct_ports():
    with pytest.raises(config.ConfigError) as err:
        config.supervisor_settings({"PORT_BACKEND": "8000"}, "unix")
    assert err.value.var == "PORT_BACKEND"
    config.load_config({"PORT_BACKEND": "8000"})   # the gateway alone may (another host's port)


def test_supervisor_settings_refuse_a_line_break():
    with pytest.raises(config.ConfigError) as err:
        config.supervisor_settings({"DATA_DIR": "/a\nPORT=1"}, "unix")
    assert err.value.var == "DATA_DIR"


def _ask(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from llamagw import config\n"
            "sys.exit(config.print_supervisor_settings(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, str(SCRIPTS), "unix"],
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=30)


def test_print_supervisor_settings_lines_and_error(tmp_path):
    done = _ask({"RUN_DIR": str(tmp_path), "GRACEFUL_TIMEOUT": "2.5"})
    assert done.returncode == 0, done.stderr
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert lines["RUN_DIR"] == str(tmp_path)
    assert (lines["GRACEFUL_TIMEOUT"], lines["GRACEFUL_TIMEOUT_MS"]) == ("2.5", "2500")
    assert lines["PORT"] == str(config.Config().port)
    done = _ask({"PORT": "80a"})
    assert done.returncode == 2
    assert done.stdout == "error=PORT: must be a whole number, got '80a'\n"


def test_router_mode_settings():
    cfg = config.load_config({"MODELS_DIR": "/models", "MODELS_MAX": "0",
                              "MODELS_PRELOAD": " alpha, ,beta.q8,alpha ",
                              "MODELS_DEFAULT": " beta.q8 ", "MODEL_LOAD_WAIT": "0"})
    assert (cfg.models_dir, cfg.models_max, cfg.models_preload, cfg.models_default,
            cfg.model_load_wait) == ("/models", 0, ("alpha", "beta.q8"), "beta.q8", 0.0)
    defaults = config.load_config({})
    assert (defaults.models_dir, defaults.models_max, defaults.models_preload,
            defaults.models_default, defaults.model_load_wait) == ("", 1, (), "", 120.0)
    for var, bad in (("MODELS_MAX", "-1"), ("MODELS_MAX", "2000"), ("MODEL_LOAD_WAIT", "soon"),
                     ("MODEL_LOAD_WAIT", "-1")):
        with pytest.raises(config.ConfigError, match=var):
            config.load_config({var: bad})
