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
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

# --- limits -------------------------------------------------------------------------------------
# An operator's preset is a few KB (a section of a few lines per model); 1 MiB is far past any
# real one and bounds the read of a wrong path (a model file given as the preset).
MAX_PRESET_BYTES = 1 << 20
# Models served by one router: each one is a possible child process and a /models entry; a few
# dozen is a big worker. 256 bounds the catalog and the generated file; more is a wrong folder.
MAX_MODELS = 256
# Directory entries looked at (top level, and inside each model folder): a models folder holds
# tens of files; a million-file folder given by mistake is refused instead of listed.
MAX_DIR_ENTRIES = 10_000
# Aliases per model: a handful is normal.
MAX_ALIASES = 32
# Longest model name / alias: file names are at most 255 bytes; 128 keeps URLs and logs sane.
MAX_NAME_LEN = 128
# Longest value in the operator's file (an inline chat template is the long one: a few KB).
MAX_VALUE_LEN = 64 * 1024
# `stop-timeout` written into [*]: seconds llama-server waits for a stopping child before it
# kills it. The gateway drains a model (no request in flight) before it asks for an unload, so
# the wait only matters for a stuck child; llama-server's default of 10 s would hold the GPU
# memory (and every request for that model, ROUTER-MODE.md §4) that long.
ROUTER_STOP_TIMEOUT = 5

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf\Z")
# llama-server (common/preset.cpp): companions of a model, never models themselves.
DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")
GGUF = ".gguf"
# KV-cache types llama-server accepts for -ctk / -ctv (common/arg.cpp kv_cache_types).
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
TRUTHY = ("on", "enabled", "true", "1")
FALSEY = ("off", "disabled", "false", "0")


class PresetError(ValueError):
    """Invalid MODELS_DIR / MODELS_PRESET / MODELS_PRELOAD / MODELS_MAX input."""


@dataclasses.dataclass(frozen=True)
class LocalModel:
    name: str
    path: str                   # absolute path of the model file (first shard of a split model)
    mmproj: str = ""            # absolute path of the projector ("" if none)
    draft: str = ""             # absolute path of a speculative-draft sidecar ("" if none)
    folder: bool = False        # kept in a folder named after the model
    shards: int = 1


@dataclasses.dataclass
class ScanResult:
    models: dict[str, LocalModel]
    warnings: list[str]


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
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".models-preset.", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.text)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


# ---- names ----------------------------------------------------------------------------------------
def check_name(name: str, what: str) -> str | None:
    """Why `name` cannot be a model name or alias, or None when it can."""
    if not name:
        return f"{what} is empty"
    if len(name) > MAX_NAME_LEN:
        return f"{what} '{name[:40]}...' is longer than {MAX_NAME_LEN} characters"
    if not NAME_RE.match(name):
        return (f"{what} {name!r} may only hold letters, digits, '.', '_', '+' and '-', "
                f"starting with a letter or digit")
    return None


def _is_mmproj(fname: str) -> bool:
    return "mmproj" in fname


def _is_draft(fname: str) -> bool:
    return fname.startswith(DRAFT_PREFIXES)


def _listdir(path: str) -> list[os.DirEntry]:
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            entries.append(entry)
            if len(entries) > MAX_DIR_ENTRIES:
                raise PresetError(f"{path}: more than {MAX_DIR_ENTRIES} entries; "
                                  f"is this the right folder?")
    entries.sort(key=lambda e: e.name)
    return entries


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()      # follows symlinks, like llama-server's is_regular_file
    except OSError:
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def scan_models_dir(models_dir: str) -> ScanResult:
    """The models in models_dir, by name (sorted), following llama-server's naming rules."""
    if not models_dir:
        raise PresetError("MODELS_DIR is empty")
    root = os.path.abspath(models_dir)
    if not os.path.isdir(root):
        raise PresetError(f"MODELS_DIR={models_dir}: not a directory")
    models: dict[str, LocalModel] = {}
    where: dict[str, str] = {}
    warnings: list[str] = []
    try:
        entries = _listdir(root)
    except OSError as exc:
        raise PresetError(f"MODELS_DIR={models_dir}: cannot list it: {exc}") from None
    for entry in entries:
        fname = entry.name
        if fname.startswith("."):
            continue
        full = os.path.join(root, fname)
        if _is_dir(entry):
            model = _scan_folder(full, fname, warnings)
            if model is None:
                continue
        elif fname.endswith(GGUF):
            if not _is_file(entry):
                warnings.append(f"{full}: not a readable file (a broken link?), skipped")
                continue
            if _is_mmproj(fname) or _is_draft(fname):
                continue            # a companion file, never a model on its own
            if SHARD_RE.search(fname):
                raise PresetError(
                    f"{full}: a split model's shard at the top of MODELS_DIR; put all its "
                    f"shards in a folder named after the model (llama-server would list every "
                    f"shard as a model)")
            name = fname[:-len(GGUF)]
            why = check_name(name, f"model name (from {full})")
            if why:
                raise PresetError(why + "; rename the file")
            model = LocalModel(name=name, path=full)
        else:
            continue
        if model.name in models:
            raise PresetError(f"two models named {model.name!r}: {where[model.name]} and "
                              f"{full}")
        models[model.name] = model
        where[model.name] = full
        if len(models) > MAX_MODELS:
            raise PresetError(f"MODELS_DIR={models_dir}: more than {MAX_MODELS} models")
    if not models:
        raise PresetError(f"MODELS_DIR={models_dir}: no models (*.gguf files, or folders "
                          f"holding one)")
    return ScanResult(dict(sorted(models.items())), warnings)


def _scan_folder(folder: str, name: str, warnings: list[str]) -> LocalModel | None:
    try:
        entries = _listdir(folder)
    except OSError as exc:
        raise PresetError(f"{folder}: cannot list it: {exc}") from None
    mains: list[str] = []
    shards: dict[int, tuple[int, str]] = {}      # index -> (count, path)
    mmprojs: list[str] = []
    drafts: list[str] = []
    for entry in entries:
        fname = entry.name
        if fname.startswith(".") or not fname.endswith(GGUF) or not _is_file(entry):
            continue
        full = os.path.join(folder, fname)
        if _is_mmproj(fname):
            mmprojs.append(full)
        elif _is_draft(fname):
            drafts.append(full)
        elif m := SHARD_RE.search(fname):
            index, count = int(m.group(1)), int(m.group(2))
            if index in shards:
                raise PresetError(f"{folder}: two shards {index:05d}: {shards[index][1]} and "
                                  f"{full}")
            shards[index] = (count, full)
        else:
            mains.append(full)
    if not mains and not shards:
        if mmprojs or drafts:
            warnings.append(f"{folder}: a projector or draft file but no model file, skipped")
        return None
    why = check_name(name, f"model name (the folder {folder})")
    if why:
        raise PresetError(why + "; rename the folder")
    if len(mmprojs) > 1:
        raise PresetError(f"{folder}: {len(mmprojs)} projector files ({_names(mmprojs)}); "
                          f"keep one")
    if len(drafts) > 1:
        raise PresetError(f"{folder}: {len(drafts)} draft files ({_names(drafts)}); keep one")
    if shards:
        if mains:
            raise PresetError(f"{folder}: a split model and other model files "
                              f"({_names(mains)}); one model per folder")
        counts = {count for count, _ in shards.values()}
        if len(counts) != 1:
            raise PresetError(f"{folder}: shards of different splits ({_names(p for _, p in shards.values())})")
        count = counts.pop()
        missing = [i for i in range(1, count + 1) if i not in shards]
        extra = [i for i in shards if i > count or i < 1]
        if missing or extra:
            what = (f"missing shard(s) {', '.join(f'{i:05d}' for i in missing)}" if missing
                    else f"shard(s) past {count:05d}")
            raise PresetError(f"{folder}: split model of {count} shards, {what}")
        path = shards[1][1]
        return LocalModel(name=name, path=path, mmproj=mmprojs[0] if mmprojs else "",
                          draft=drafts[0] if drafts else "", folder=True, shards=count)
    if len(mains) > 1:
        raise PresetError(f"{folder}: {len(mains)} model files ({_names(mains)}); a folder "
                          f"holds one model (llama-server would pick one by directory order)")
    return LocalModel(name=name, path=mains[0], mmproj=mmprojs[0] if mmprojs else "",
                      draft=drafts[0] if drafts else "", folder=True)


def _names(paths) -> str:
    return ", ".join(os.path.basename(p) for p in paths)


# ---- the operator's file -------------------------------------------------------------------------
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


# ---- the generated file ---------------------------------------------------------------------------
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
