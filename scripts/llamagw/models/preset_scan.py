"""Router mode's models: scan MODELS_DIR and name each model (llama-server's rules, strict).

scan_models_dir(models_dir) -> ScanResult: every model found, by name (sorted), as a LocalModel
(absolute path of the model file or first shard, its projector and draft sidecar), and warnings
for entries skipped. The naming rules are in models/preset.py's docstring; check_name() says why a
model name or alias is refused (NAME_RE, MAX_NAME_LEN). Bounded: at most MAX_DIR_ENTRIES entries
listed per folder and MAX_MODELS models. Every error is a PresetError (a ValueError) that names
the file or folder. Reads the disk: call it before serving or off the event loop.
"""

from __future__ import annotations

import dataclasses
import os
import re

# Models served by one router: each one is a possible child process and a /models entry; a few
# dozen is a big worker. 256 bounds the catalog and the generated file; more is a wrong folder.
MAX_MODELS = 256
# Directory entries looked at (top level, and inside each model folder): a models folder holds
# tens of files; a million-file folder given by mistake is refused instead of listed.
MAX_DIR_ENTRIES = 10_000

# Longest model name / alias: file names are at most 255 bytes; 128 keeps URLs and logs sane.
MAX_NAME_LEN = 128

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")

SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf\Z")
# llama-server (common/preset.cpp): companions of a model, never models themselves.
DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")
GGUF = ".gguf"


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
