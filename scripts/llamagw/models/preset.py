"""Router mode's model list: scan MODELS_DIR, validate the operator's MODELS_PRESET, and generate
the INI file llama-server reads (`--models-preset`).

Why generate instead of passing the operator's file and `--models-dir` straight through: llama-
server's own reader has traps (/work/shared/ROUTER-MODE.md §7, §8): a key before the first
section silently creates a model called `default`; an unknown key or an alias that collides with
a model name only shows up as a failed start; `load-on-startup` with `--models-max 0` or more
models than the max aborts the start; `;` and `#` end a value anywhere in a line; a folder with two
model files gets one picked by directory order; per-model keys on the router command line
override every section. Here everything is checked before llama-server starts, every error names
the file and the line, and the generated file is the single source of truth: one `[name]` section
per model with an explicit absolute `model =` path (llama-server is started with the generated
preset only, so no second scan can disagree with this one).

Naming (llama-server's `--models-dir` rules, made strict):
  - a top-level `NAME.gguf` is model NAME; files with `mmproj` in the name and speculative-draft
    sidecars (`mtp-`, `dspark-`, `dflash-` prefixes) are companions, not models;
  - a folder is one model named after the folder: its `*mmproj*.gguf` is attached as the
    projector, a draft sidecar as `spec-draft-model`, and a split model's `-00001-of-NNNNN`
    shard is the model path (every shard must be there). Two model files in one folder are an
    error, not a silent pick. Deeper folders are ignored, as llama-server does;
  - split files at the top level are an error (llama-server would list every shard as a model):
    they belong in a folder named after the model;
  - entries whose name starts with '.' are skipped (partial downloads, editor and OS files);
  - names (and aliases) are NAME_RE: letters, digits, '.', '_', '+', '-', starting with a letter
    or digit. llama-server would take more (spaces, ':' which it rewrites in section names,
    ',' which it splits aliases on), but names end up in URLs, key files (`models=a,b`), metric
    labels and logs, so anything else is refused with a message to rename the file.

Operator file (MODELS_PRESET, default $DATA_DIR/models.ini): llama-server's INI syntax, `[*]` for
every model and `[name]` per model (a name found in MODELS_DIR). Only the keys in KEYS are
accepted; REFUSED names the ones that are refused on purpose and why. Relative paths
(`mmproj`, `chat-template-file`) are relative to the preset file's folder.

Public API:
    scan_models_dir(models_dir) -> ScanResult (models: dict name -> LocalModel, warnings)
    parse_preset(text, source) -> OperatorPreset
    load_preset(path) -> OperatorPreset
    build(models, operator, *, preload, models_max, default, defaults, source_dir) -> Generated
    generate(models_dir, preset_path, *, preload, models_max, default, defaults) -> Generated
    Generated.text (the INI), .names, .aliases, .preload, .gateway_preload, .default, .write(path)
Every error is a PresetError (a ValueError) whose message names the file and line.

Layout: models/preset_scan.py scans MODELS_DIR (scan_models_dir, check_name, LocalModel,
PresetError); models/preset_ini.py reads and checks the operator's file (load_preset,
parse_preset, KEYS, REFUSED); this module checks them against each other and renders the file
(build, generate, Generated), and re-exports their public names.
"""

from __future__ import annotations

import dataclasses
import os

from llamagw.atomicfile import write_atomic
from llamagw.models.preset_ini import (
    KEY_BY_NAME, KEYS, MAX_ALIASES, MAX_PRESET_BYTES, MAX_VALUE_LEN, REFUSED, KeySpec,
    OperatorPreset, Section, Setting, _check_value, load_preset, parse_preset,
)
from llamagw.models.preset_scan import (
    GGUF, MAX_DIR_ENTRIES, MAX_MODELS, MAX_NAME_LEN, NAME_RE, LocalModel, PresetError,
    ScanResult, check_name, scan_models_dir,
)

__all__ = [
    "ROUTER_STOP_TIMEOUT", "Generated", "resolve_model", "build", "generate",
    "KEY_BY_NAME", "KEYS", "MAX_ALIASES", "MAX_PRESET_BYTES", "MAX_VALUE_LEN", "REFUSED",
    "KeySpec", "OperatorPreset", "Section", "Setting", "load_preset", "parse_preset",
    "GGUF", "MAX_DIR_ENTRIES", "MAX_MODELS", "MAX_NAME_LEN", "NAME_RE", "LocalModel",
    "PresetError", "ScanResult", "check_name", "scan_models_dir",
]

# `stop-timeout` written into [*]: seconds llama-server waits for a stopping child before it
# kills it. The gateway drains a model (no request in flight) before it asks for an unload, so
# the wait only matters for a stuck child; llama-server's default of 10 s would hold the GPU
# memory (and every request for that model, ROUTER-MODE.md §4) that long.
ROUTER_STOP_TIMEOUT = 5


@dataclasses.dataclass
class Generated:
    text: str
    names: list[str]
    aliases: dict[str, str]        # alias -> model name
    preload: list[str]             # models written with load-on-startup
    gateway_preload: list[str]     # models to preload that llama-server cannot (MODELS_MAX=0)
    default: str                   # "" when none
    models: dict[str, LocalModel]
    warnings: list[str]

    def write(self, path: str) -> None:
        """Write atomically (a reader never sees half a file), mode 0600."""
        write_atomic(path, self.text, prefix=".models-preset.")


def _unsafe_path(path: str) -> str | None:
    if any(c in path for c in ";#") or any(ord(c) < 32 for c in path):
        return "holds ';', '#' or a control character, which llama-server's preset reader cuts at"
    if path != path.strip(" \t"):
        return "starts or ends with a space"
    return None


def resolve_model(spec: str, models: dict[str, LocalModel], aliases: dict[str, str],
                  what: str) -> str:
    """A model given by name, alias, file name (NAME.gguf) or path -> its name."""
    spec = spec.strip()
    if spec in models:
        return spec
    if spec in aliases:
        return aliases[spec]
    if spec.endswith(GGUF) and spec[:-len(GGUF)] in models and "/" not in spec:
        return spec[:-len(GGUF)]
    if "/" in spec:      # a path: the model file, or a model's folder or a file in it
        path = os.path.normpath(os.path.abspath(spec))
        for m in models.values():
            folder = os.path.dirname(m.path)
            if path == m.path or (m.folder and folder in (path, os.path.dirname(path))):
                return m.name
    known = ", ".join(list(models)[:20]) + (", ..." if len(models) > 20 else "")
    raise PresetError(f"{what}: no model {spec!r} in MODELS_DIR (models: {known})")


def build(models: dict[str, LocalModel], operator: OperatorPreset | None, *,
          preload: list[str] | None, models_max: int, default: str = "",
          defaults: dict[str, str] | None = None, warnings: list[str] | None = None,
          header: str = "") -> Generated:
    """Check the operator's sections against the models, and render llama-server's preset.

    preload: names (or aliases) to load at start; None: the default model, if any.
    defaults: [*] values from the environment (e.g. {"ctx-size": "16384"}), which the
    operator's [*] and [name] sections override."""
    if models_max < 0:
        raise PresetError(f"MODELS_MAX must be 0 (no limit) or more, got {models_max}")
    src = operator.source if operator else ""
    # sections name models of MODELS_DIR
    if operator:
        for name, section in operator.models.items():
            if name not in models:
                raise PresetError(
                    f"{src}:{section.line}: [{name}] names no model in MODELS_DIR "
                    f"(models: {', '.join(models)})")
    # aliases: unique across names and aliases
    aliases: dict[str, str] = {}
    if operator:
        for name, section in operator.models.items():
            setting = section.settings.get("alias")
            if not setting:
                continue
            for alias in setting.value.split(","):
                where = f"{src}:{setting.line}"
                if alias == name:
                    raise PresetError(f"{where}: alias {alias!r} is the model's own name")
                if alias in models:
                    raise PresetError(f"{where}: alias {alias!r} of [{name}] is the name of "
                                      f"another model")
                if alias in aliases:
                    raise PresetError(f"{where}: alias {alias!r} of [{name}] is already an "
                                      f"alias of [{aliases[alias]}]")
                aliases[alias] = name
    # default and preload
    default_name = resolve_model(default, models, aliases, "the default model (MODEL_NAME / "
                                 "MODEL_PATH)") if default else ""
    if preload is None:
        wanted = [default_name] if default_name else []
    else:
        wanted = []
        for item in preload:
            if not item.strip():
                continue
            name = resolve_model(item, models, aliases, "MODELS_PRELOAD")
            if name not in wanted:
                wanted.append(name)
    if models_max > 0 and len(wanted) > models_max:
        raise PresetError(f"MODELS_PRELOAD names {len(wanted)} models ({', '.join(wanted)}) "
                          f"but MODELS_MAX={models_max} fit in memory at once")
    # llama-server's load-on-startup breaks with --models-max 0 (ROUTER-MODE.md §7): then the
    # gateway loads them itself.
    on_startup = wanted if models_max > 0 else []
    gateway_preload = [] if models_max > 0 else wanted

    out = ["; Generated for llama-server --models-preset; do not edit (it is rewritten at every "
           "start)."]
    if header:
        out.extend("; " + line for line in header.splitlines())
    out.append("[*]")
    out.append(f"stop-timeout = {ROUTER_STOP_TIMEOUT}")
    glob: dict[str, str] = {}
    for key, value in (defaults or {}).items():
        spec = next((s for s in KEYS if s.key == key and s.scope == "any"), None)
        if spec is None:
            raise PresetError(f"unknown default setting {key!r}")
        glob[key] = _check_value(spec, key, str(value), "the environment", "")
    if operator:
        for key, setting in operator.globals.settings.items():
            glob[key] = setting.value
    for key, value in glob.items():
        out.append(f"{key} = {value}")
    for name, model in models.items():
        out.append("")
        out.append(f"[{name}]")
        settings: dict[str, str] = {}
        for key, path in (("model", model.path), ("mmproj", model.mmproj),
                          ("spec-draft-model", model.draft)):
            if not path:
                continue
            why = _unsafe_path(path)
            if why:
                raise PresetError(f"model {name!r}: the path {path} {why}; rename it")
            settings[key] = path
        if operator and name in operator.models:
            for key, setting in operator.models[name].settings.items():
                settings[key] = setting.value
        if name in on_startup:
            settings["load-on-startup"] = "true"
        for key, value in settings.items():
            out.append(f"{key} = {value}")
    text = "\n".join(out) + "\n"
    return Generated(text=text, names=list(models), aliases=aliases, preload=on_startup,
                     gateway_preload=gateway_preload, default=default_name, models=models,
                     warnings=list(warnings or []))


def generate(models_dir: str, preset_path: str = "", *, preload: list[str] | None = None,
             models_max: int = 1, default: str = "",
             defaults: dict[str, str] | None = None) -> Generated:
    scan = scan_models_dir(models_dir)
    operator = load_preset(preset_path) if preset_path else None
    header = f"MODELS_DIR={os.path.abspath(models_dir)}"
    if preset_path:
        header += f"\nMODELS_PRESET={os.path.abspath(preset_path)}"
    return build(scan.models, operator, preload=preload, models_max=models_max,
                 default=default, defaults=defaults, warnings=scan.warnings, header=header)
