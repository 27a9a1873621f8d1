"""Router mode's operator preset (MODELS_PRESET): read, parse and check llama-server's INI.

load_preset(path) reads at most MAX_PRESET_BYTES of UTF-8; parse_preset(text, source,
source_dir) -> OperatorPreset: the [*] section and one Section per [name], each Setting
normalised as it will be written. Only the keys in KEYS are accepted (KEY_BY_NAME maps every
spelling to its KeySpec); REFUSED names the keys refused on purpose and why. The traps of
llama-server's own reader are errors here: a key before the first section, `;` or `#` inside a
value, a key set twice, a model key in [*]. Values are checked by kind (numbers in range, enums,
booleans, aliases, tags, readable files relative to the preset's folder). Model names and aliases
are checked against MODELS_DIR later (models/preset.py build()). Every error is a PresetError
naming the file and line.
"""

from __future__ import annotations

import dataclasses
import os
import re

from llamagw.models.preset_scan import MAX_NAME_LEN, PresetError, check_name

# An operator's preset is a few KB (a section of a few lines per model); 1 MiB is far past any
# real one and bounds the read of a wrong path (a model file given as the preset).
MAX_PRESET_BYTES = 1 << 20

# Aliases per model: a handful is normal.
MAX_ALIASES = 32

# Longest value in the operator's file (an inline chat template is the long one: a few KB).
MAX_VALUE_LEN = 64 * 1024

TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")

# KV-cache types llama-server accepts for -ctk / -ctv (common/arg.cpp kv_cache_types).
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
TRUTHY = ("on", "enabled", "true", "1")
FALSEY = ("off", "disabled", "false", "0")


@dataclasses.dataclass(frozen=True)
class KeySpec:
    key: str                     # the name written in the generated file
    names: tuple[str, ...]       # names accepted in the operator's file
    kind: str                    # int | ngl | bool | enum | text | path | names | tags
    scope: str = "any"           # any: [*] or [name]; model: [name] only
    lo: int = 0
    hi: int = 0
    choices: tuple[str, ...] = ()
    why: str = ""


# The allowlist: settings that shape one model's instance and cannot reach outside it.
KEYS: tuple[KeySpec, ...] = (
    KeySpec("ctx-size", ("c", "ctx-size"), "int", lo=0, hi=100_000_000,
            why="context size (0: the model's trained context)"),
    KeySpec("n-gpu-layers", ("ngl", "gpu-layers", "n-gpu-layers"), "ngl", lo=0, hi=100_000,
            why="layers on the GPU: a number, auto or all"),
    KeySpec("parallel", ("np", "parallel"), "int", lo=1, hi=4096,
            why="slots; the context is split between them"),
    KeySpec("alias", ("alias",), "names", scope="model",
            why="more names for the model, comma-separated"),
    KeySpec("tags", ("tags",), "tags", scope="model", why="informational labels"),
    KeySpec("chat-template", ("chat-template",), "text",
            why="a built-in template name or a one-line Jinja template"),
    KeySpec("chat-template-file", ("chat-template-file",), "path",
            why="a Jinja template file"),
    KeySpec("mmproj", ("mmproj",), "path", scope="model", why="the multimodal projector file"),
    KeySpec("jinja", ("jinja", "no-jinja"), "bool", why="Jinja chat templates on or off"),
    KeySpec("flash-attn", ("fa", "flash-attn"), "enum", choices=("on", "off", "auto"),
            why="flash attention"),
    KeySpec("cache-type-k", ("ctk", "cache-type-k"), "enum", choices=CACHE_TYPES,
            why="KV cache type for K"),
    KeySpec("cache-type-v", ("ctv", "cache-type-v"), "enum", choices=CACHE_TYPES,
            why="KV cache type for V"),
    KeySpec("batch-size", ("b", "batch-size"), "int", lo=1, hi=1_000_000,
            why="logical batch size"),
    KeySpec("ubatch-size", ("ub", "ubatch-size"), "int", lo=1, hi=1_000_000,
            why="physical batch size"),
    KeySpec("threads", ("t", "threads"), "int", lo=1, hi=4096, why="CPU threads"),
    KeySpec("n-predict", ("n", "predict", "n-predict"), "int", lo=-1, hi=100_000_000,
            why="default cap on generated tokens (-1: none)"),
)
KEY_BY_NAME: dict[str, KeySpec] = {name: spec for spec in KEYS for name in spec.names}

# Refused on purpose, with the reason shown to the operator.
REFUSED: dict[str, str] = {
    **{k: "models come from MODELS_DIR (one file or folder per model); the generated preset "
          "sets each model's path" for k in ("model", "m", "model-url", "mu", "hf-repo", "hf",
                                             "hfr", "hf-file", "hff", "docker-repo", "dr")},
    "load-on-startup": "set MODELS_PRELOAD instead: the gateway needs to know which models to "
                       "wait for, and llama-server aborts its start when more models are to "
                       "load than MODELS_MAX allows",
    "stop-timeout": "the generated preset sets it: the gateway drains a model before unloading it",
    "sleep-idle-seconds": "a sleeping model keeps its memory; the gateway unloads models itself",
    **{k: "llama-server's address and keys belong to the router, not to a model"
       for k in ("host", "port", "api-key", "api-key-file", "ssl-key-file", "ssl-cert-file",
                 "path", "api-prefix")},
    **{k: "router settings come from the environment (MODELS_DIR, MODELS_MAX, ...)"
       for k in ("models-dir", "models-preset", "models-max", "models-autoload",
                 "no-models-autoload", "dedup-cache-models")},
}


@dataclasses.dataclass
class Setting:
    spec: KeySpec
    value: str        # normalised value, as written to the generated file
    line: int
    raw_key: str


@dataclasses.dataclass
class Section:
    name: str
    line: int
    settings: dict[str, Setting]   # by KeySpec.key


@dataclasses.dataclass
class OperatorPreset:
    source: str                    # the file name, for messages
    source_dir: str                # relative paths are resolved here
    globals: Section
    models: dict[str, Section]


_HEADER_RE = re.compile(r"\[[ \t]*([^\]]*?)[ \t]*\](.*)\Z")
_KV_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=(.*)\Z")
_COMMENT_RE = re.compile(r"[ \t][;#]")


def _split_comment(rest: str) -> tuple[str, bool]:
    """(value, ok): cut an inline comment (whitespace then ';' or '#'). ok is False when a ';'
    or '#' is left in the value, which llama-server would take as a comment start."""
    m = _COMMENT_RE.search(rest)
    value = rest[:m.start()] if m else rest
    value = value.strip(" \t")
    return value, not any(c in value for c in ";#")


def load_preset(path: str) -> OperatorPreset:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PRESET_BYTES + 1)
    except OSError as exc:
        raise PresetError(f"MODELS_PRESET={path}: cannot read it: {exc.strerror}") from None
    if len(data) > MAX_PRESET_BYTES:
        raise PresetError(f"{path}: larger than {MAX_PRESET_BYTES} bytes; is it the preset?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PresetError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_preset(text, path, os.path.dirname(os.path.abspath(path)))


def parse_preset(text: str, source: str = "<preset>", source_dir: str = "") -> OperatorPreset:
    """Parse and check the operator's INI (syntax, allowed keys, values). Model names and
    aliases are checked against MODELS_DIR later, in build()."""
    if text.startswith("\ufeff"):
        text = text[1:]
    glob = Section("*", 0, {})
    models: dict[str, Section] = {}
    current: Section | None = None
    seen_global = False
    for lineno, line in enumerate(re.split(r"\r\n|\n|\r", text), 1):
        where = f"{source}:{lineno}"
        stripped = line.strip(" \t")
        if not stripped or stripped[0] in ";#":
            continue
        if stripped[0] == "[":
            m = _HEADER_RE.match(stripped)
            if not m:
                raise PresetError(f"{where}: a section header is [name]")
            name, tail = m.group(1), m.group(2)
            if tail.strip(" \t") and tail.strip(" \t")[0] not in ";#":
                raise PresetError(f"{where}: text after the section header")
            if name == "*":
                if seen_global:
                    raise PresetError(f"{where}: a second [*] section")
                seen_global = True
                glob.line = lineno
                current = glob
                continue
            why = check_name(name, "section name")
            if why:
                raise PresetError(f"{where}: {why}")
            if name in models:
                raise PresetError(f"{where}: [{name}] again (first at line "
                                  f"{models[name].line})")
            current = models[name] = Section(name, lineno, {})
            continue
        m = _KV_RE.match(stripped)
        if not m:
            raise PresetError(f"{where}: not a [section], a 'key = value' line or a comment")
        key, rest = m.group(1), m.group(2)
        value, ok = _split_comment(rest)
        if not ok:
            raise PresetError(f"{where}: ';' or '#' inside the value of {key}: llama-server "
                              f"reads the rest of the line as a comment")
        if len(value) > MAX_VALUE_LEN:
            raise PresetError(f"{where}: the value of {key} is longer than {MAX_VALUE_LEN}")
        if current is None:
            if key == "version":
                if value != "1":
                    raise PresetError(f"{where}: version must be 1")
                continue
            raise PresetError(f"{where}: '{key}' before the first [section]: llama-server "
                              f"would make a model named 'default' of it; put it under [*] "
                              f"(every model) or under [model-name]")
        if key == "version":
            raise PresetError(f"{where}: version goes before the first [section]")
        if key in REFUSED:
            raise PresetError(f"{where}: '{key}' is not allowed here: {REFUSED[key]}")
        spec = KEY_BY_NAME.get(key)
        if spec is None:
            allowed = ", ".join(s.key for s in KEYS)
            raise PresetError(f"{where}: unknown key '{key}' (allowed: {allowed})")
        if spec.scope == "model" and current is glob:
            raise PresetError(f"{where}: '{key}' belongs to one model's section, not [*]")
        if spec.key in current.settings:
            first = current.settings[spec.key]
            raise PresetError(f"{where}: '{key}' sets {spec.key} again (line {first.line}: "
                              f"'{first.raw_key}')")
        normal = _check_value(spec, key, value, where, source_dir)
        current.settings[spec.key] = Setting(spec, normal, lineno, key)
    return OperatorPreset(source, source_dir, glob, models)


def _check_value(spec: KeySpec, key: str, value: str, where: str, source_dir: str) -> str:
    if value == "":
        raise PresetError(f"{where}: {key} has no value")
    kind = spec.kind
    if kind in ("int", "ngl"):
        if kind == "ngl" and value in ("auto", "all"):
            return value
        if not re.fullmatch(r"-?[0-9]{1,12}", value):
            extra = ", auto or all" if kind == "ngl" else ""
            raise PresetError(f"{where}: {key} must be a whole number{extra}, got {value!r}")
        n = int(value)
        if not spec.lo <= n <= spec.hi:
            raise PresetError(f"{where}: {key} must be between {spec.lo} and {spec.hi}, got {n}")
        return str(n)
    if kind == "bool":
        low = value.lower()
        if low not in TRUTHY + FALSEY:
            raise PresetError(f"{where}: {key} must be true or false, got {value!r}")
        on = low in TRUTHY
        if key.startswith("no-"):
            on = not on
        return "true" if on else "false"
    if kind == "enum":
        low = value.lower()
        if spec.key == "flash-attn":
            low = "on" if low in TRUTHY else "off" if low in FALSEY else low
        if low not in spec.choices:
            raise PresetError(f"{where}: {key} must be one of {', '.join(spec.choices)}, "
                              f"got {value!r}")
        return low
    if kind == "names":
        names = [part.strip(" \t") for part in value.split(",")]
        if len(names) > MAX_ALIASES:
            raise PresetError(f"{where}: more than {MAX_ALIASES} aliases")
        for name in names:
            why = check_name(name, "an alias")
            if why:
                raise PresetError(f"{where}: {why}")
        if len(set(names)) != len(names):
            raise PresetError(f"{where}: the same alias twice")
        return ",".join(names)
    if kind == "tags":
        tags = [part.strip(" \t") for part in value.split(",")]
        for tag in tags:
            if not TAG_RE.match(tag) or len(tag) > MAX_NAME_LEN:
                raise PresetError(f"{where}: tag {tag!r} may only hold letters, digits, '.', "
                                  f"'_', '+' and '-'")
        return ",".join(tags)
    if kind == "path":
        path = value if os.path.isabs(value) else os.path.join(source_dir or os.getcwd(), value)
        path = os.path.normpath(path)
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise PresetError(f"{where}: {key} = {value}: no readable file at {path}")
        if any(c in path for c in ";#"):
            raise PresetError(f"{where}: {key}: the path {path} holds ';' or '#', which "
                              f"llama-server's preset reader cuts at")
        return path
    # text
    if any(ord(c) < 32 for c in value):
        raise PresetError(f"{where}: {key} holds a control character")
    return value
