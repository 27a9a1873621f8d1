"""llamagw.models.preset and scripts/models_preset.py: MODELS_DIR naming, the operator's preset
checks (every error names the file and line), and the generated INI llama-server reads."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from fakes.fake_router import read_preset
from llamagw.models import preset
from llamagw.models.preset import PresetError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "scripts", "models_preset.py")
GGUF = b"GGUF" + b"\0" * 60


def tree(root, files: dict[str, bytes | None]) -> str:
    """Make files (None: a folder) under root; return root as str."""
    for rel, data in files.items():
        path = root / rel
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return str(root)


@pytest.fixture
def models(tmp_path):
    """alpha.gguf, beta.gguf, gamma/ (a model in a folder)."""
    return tree(tmp_path / "models", {"alpha.gguf": GGUF, "beta.gguf": GGUF,
                                      "gamma/gamma-q8.gguf": GGUF})


def write_ini(tmp_path, text: str, name: str = "models.ini") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- scanning MODELS_DIR ---------------------------------------------------------------------------

def test_scan_names_files_and_folders_like_llama_server(tmp_path):
    root = tree(tmp_path / "m", {
        "alpha.gguf": GGUF,
        "My.Model-Q8_0.gguf": GGUF,              # case and dots kept
        "alpha-mmproj-f16.gguf": GGUF,           # a projector: not a model
        "mtp-alpha.gguf": GGUF,                  # a draft sidecar: not a model
        "notes.txt": b"x", "alpha.gguf.part": b"x",
        ".hidden.gguf": GGUF, ".cache/x.gguf": GGUF,   # dot entries: skipped
        "vision/model-q4.gguf": GGUF, "vision/mmproj-vision.gguf": GGUF,
        "vision/dflash-small.gguf": GGUF,
        "split/big-00002-of-00003.gguf": GGUF, "split/big-00001-of-00003.gguf": GGUF,
        "split/big-00003-of-00003.gguf": GGUF,
        "deep/inner/x.gguf": GGUF,               # deeper nesting: ignored (folder has no model)
        "empty": None,
    })
    scan = preset.scan_models_dir(root)
    assert list(scan.models) == ["My.Model-Q8_0", "alpha", "split", "vision"]
    alpha = scan.models["alpha"]
    assert alpha.path == os.path.join(root, "alpha.gguf") and not alpha.folder
    assert alpha.mmproj == "" and alpha.draft == ""
    vision = scan.models["vision"]
    assert vision.folder and vision.path == os.path.join(root, "vision", "model-q4.gguf")
    assert vision.mmproj == os.path.join(root, "vision", "mmproj-vision.gguf")
    assert vision.draft == os.path.join(root, "vision", "dflash-small.gguf")
    split = scan.models["split"]
    assert split.path == os.path.join(root, "split", "big-00001-of-00003.gguf")
    assert split.shards == 3
    assert all(os.path.isabs(m.path) for m in scan.models.values())


def test_scan_follows_symlinks(tmp_path):
    target = tmp_path / "store" / "real.gguf"
    target.parent.mkdir()
    target.write_bytes(GGUF)
    root = tmp_path / "m"
    root.mkdir()
    (root / "linked.gguf").symlink_to(target)
    (root / "dangling.gguf").symlink_to(tmp_path / "nowhere.gguf")
    scan = preset.scan_models_dir(str(root))
    assert list(scan.models) == ["linked"]
    assert any("dangling.gguf" in w for w in scan.warnings)


@pytest.mark.parametrize("files,message", [
    ({"two/a.gguf": GGUF, "two/b.gguf": GGUF}, "2 model files (a.gguf, b.gguf)"),
    ({"s/x-00001-of-00003.gguf": GGUF, "s/x-00003-of-00003.gguf": GGUF},
     "missing shard(s) 00002"),
    ({"s/x-00001-of-00002.gguf": GGUF, "s/x-00002-of-00002.gguf": GGUF, "s/other.gguf": GGUF},
     "a split model and other model files"),
    ({"x-00001-of-00002.gguf": GGUF, "x-00002-of-00002.gguf": GGUF}, "put all its shards"),
    ({"alpha.gguf": GGUF, "alpha/m.gguf": GGUF}, "two models named 'alpha'"),
    ({"with space.gguf": GGUF}, "rename the file"),
    ({"a:b.gguf": GGUF}, "rename the file"),
    ({"a,b.gguf": GGUF}, "rename the file"),
    ({"bad name/m.gguf": GGUF}, "rename the folder"),
    ({"v/m.gguf": GGUF, "v/mmproj-a.gguf": GGUF, "v/mmproj-b.gguf": GGUF}, "2 projector files"),
    ({"readme.txt": b"x"}, "no models"),
])
def test_scan_refuses_ambiguous_or_unsafe_layouts(tmp_path, files, message):
    root = tree(tmp_path / "m", files)
    with pytest.raises(PresetError) as err:
        preset.scan_models_dir(root)
    assert message in str(err.value)


def test_scan_a_folder_with_only_a_projector_is_skipped_with_a_warning(tmp_path):
    root = tree(tmp_path / "m", {"a.gguf": GGUF, "proj/mmproj-x.gguf": GGUF})
    scan = preset.scan_models_dir(root)
    assert list(scan.models) == ["a"]
    assert any("proj" in w and "no model file" in w for w in scan.warnings)


def test_scan_missing_dir(tmp_path):
    with pytest.raises(PresetError, match="not a directory"):
        preset.scan_models_dir(str(tmp_path / "absent"))


# ---- the operator's preset ---------------------------------------------------------------------------

def test_parse_normalises_allowed_keys(tmp_path):
    src = write_ini(tmp_path, """\
version = 1
; a comment
[*]
c = 2048            ; inline comment
fa = true
no-jinja = true
[beta]
ngl = all
np = 2
alias = b1, second
chat-template = chatml
ctk = Q8_0
n = -1
""")
    op = preset.load_preset(src)
    assert {k: s.value for k, s in op.globals.settings.items()} == {
        "ctx-size": "2048", "flash-attn": "on", "jinja": "false"}
    beta = {k: s.value for k, s in op.models["beta"].settings.items()}
    assert beta == {"n-gpu-layers": "all", "parallel": "2", "alias": "b1,second",
                    "chat-template": "chatml", "cache-type-k": "q8_0", "n-predict": "-1"}
    assert op.models["beta"].settings["parallel"].line == 9


@pytest.mark.parametrize("text,line,message", [
    ("c = 128\n[*]\n", 1, "before the first [section]"),
    ("[*]\nbogus-key = 1\n", 2, "unknown key 'bogus-key'"),
    ("[alpha]\nmodel = /etc/passwd\n", 2, "models come from MODELS_DIR"),
    ("[alpha]\nload-on-startup = true\n", 2, "MODELS_PRELOAD"),
    ("[alpha]\nstop-timeout = 1\n", 2, "drains a model"),
    ("[*]\nhost = 0.0.0.0\n", 2, "belong to the router"),
    ("[*]\napi-key = x\n", 2, "belong to the router"),
    ("[*]\nmodels-max = 3\n", 2, "environment"),
    ("[*]\nalias = x\n", 2, "not [*]"),
    ("[*]\nmmproj = /x\n", 2, "not [*]"),
    ("[alpha]\nc = 1\n[alpha]\n", 3, "[alpha] again (first at line 1)"),
    ("[*]\n[*]\n", 2, "a second [*]"),
    ("[alpha]\nc = 1\nctx-size = 2\n", 3, "sets ctx-size again (line 2: 'c')"),
    ("[alpha]\nchat-template = {# x #}\n", 2, "';' or '#' inside the value"),
    ("[alpha]\nchat-template = a;b\n", 2, "';' or '#' inside the value"),
    ("[alpha]\nc = big\n", 2, "whole number"),
    ("[alpha]\nnp = 0\n", 2, "between 1 and 4096"),
    ("[alpha]\nngl = most\n", 2, "auto or all"),
    ("[alpha]\nfa = maybe\n", 2, "one of on, off, auto"),
    ("[alpha]\njinja = perhaps\n", 2, "true or false"),
    ("[alpha]\nc =\n", 2, "has no value"),
    ("[alpha]\nalias = a b\n", 2, "may only hold"),
    ("[alpha]\nalias = x, ,y\n", 2, "is empty"),
    ("[alpha]\nalias = x,x\n", 2, "the same alias twice"),
    ("[alpha]\nmmproj = missing.gguf\n", 2, "no readable file"),
    ("[alpha]\nchat-template-file = /nonexistent/t.jinja\n", 2, "no readable file"),
    ("[with space]\n", 1, "may only hold"),
    ("[alpha\n", 1, "section header"),
    ("[alpha] junk\n", 1, "text after the section header"),
    ("just words\n", 1, "not a [section]"),
    ("version = 2\n", 1, "version must be 1"),
    ("[*]\nversion = 1\n", 2, "version goes before"),
])
def test_parse_errors_name_file_and_line(tmp_path, text, line, message):
    src = write_ini(tmp_path, text)
    with pytest.raises(PresetError) as err:
        preset.load_preset(src)
    assert f"{src}:{line}:" in str(err.value)
    assert message in str(err.value)


def test_relative_paths_are_relative_to_the_preset_file(tmp_path, models):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "proj.gguf").write_bytes(GGUF)
    (conf / "t.jinja").write_text("{{ messages }}")
    src = write_ini(conf, "[alpha]\nmmproj = proj.gguf\nchat-template-file = t.jinja\n")
    gen = preset.generate(models, src, models_max=1)
    sections, _ = read_preset_text(tmp_path, gen.text)
    assert sections["alpha"]["mmproj"] == str(conf / "proj.gguf")
    assert sections["alpha"]["chat-template-file"] == str(conf / "t.jinja")


def test_preset_file_limits(tmp_path):
    with pytest.raises(PresetError, match="cannot read it"):
        preset.load_preset(str(tmp_path / "absent.ini"))
    big = tmp_path / "big.ini"
    big.write_bytes(b";" * (preset.MAX_PRESET_BYTES + 1))
    with pytest.raises(PresetError, match="larger than"):
        preset.load_preset(str(big))
    binary = tmp_path / "bin.ini"
    binary.write_bytes(b"[*]\n\xff\xfe")
    with pytest.raises(PresetError, match="not UTF-8"):
        preset.load_preset(str(binary))


# ---- checks across the preset and MODELS_DIR ------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("[delta]\nc = 1\n", "names no model in MODELS_DIR"),
    ("[alpha]\nalias = beta\n", "is the name of another model"),
    ("[alpha]\nalias = alpha\n", "the model's own name"),
    ("[alpha]\nalias = one\n[beta]\nalias = one\n", "already an alias of [alpha]"),
])
def test_names_and_aliases_must_not_collide(tmp_path, models, text, message):
    src = write_ini(tmp_path, text)
    with pytest.raises(PresetError) as err:
        preset.generate(models, src, models_max=1)
    assert message in str(err.value) and src in str(err.value)


def read_preset_text(tmp_path, text: str):
    path = tmp_path / "generated.ini"
    path.write_text(text)
    return read_preset(str(path))


def test_generated_preset_is_explicit_and_complete(tmp_path, models):
    src = write_ini(tmp_path, "[*]\nc = 1024\n[beta]\nalias = b1, second\nnp = 2\n")
    gen = preset.generate(models, src, preload=["b1"], models_max=1,
                          defaults={"ctx-size": "16384", "n-gpu-layers": "0", "parallel": "1"})
    lines = [ln for ln in gen.text.splitlines() if ln and not ln.startswith(";")]
    assert lines[0] == "[*]"           # nothing before the first section but comments
    sections, glob = read_preset_text(tmp_path, gen.text)
    assert glob == {"stop-timeout": str(preset.ROUTER_STOP_TIMEOUT), "ctx-size": "1024",
                    "n-gpu-layers": "0", "parallel": "1"}     # the preset's [*] wins over env
    assert sections == {
        "alpha": {"model": os.path.join(models, "alpha.gguf")},
        "beta": {"model": os.path.join(models, "beta.gguf"), "alias": "b1,second",
                 "parallel": "2", "load-on-startup": "true"},
        "gamma": {"model": os.path.join(models, "gamma", "gamma-q8.gguf")},
    }
    assert gen.names == ["alpha", "beta", "gamma"]
    assert gen.aliases == {"b1": "beta", "second": "beta"}
    assert gen.preload == ["beta"] and gen.gateway_preload == []


def test_folder_projector_and_draft_are_attached(tmp_path):
    root = tree(tmp_path / "m", {"v/m.gguf": GGUF, "v/mmproj-v.gguf": GGUF,
                                 "v/mtp-v.gguf": GGUF})
    sections, _ = read_preset_text(tmp_path, preset.generate(root, models_max=1).text)
    assert sections["v"] == {"model": os.path.join(root, "v", "m.gguf"),
                             "mmproj": os.path.join(root, "v", "mmproj-v.gguf"),
                             "spec-draft-model": os.path.join(root, "v", "mtp-v.gguf")}


def test_operator_projector_overrides_the_folder_one(tmp_path):
    root = tree(tmp_path / "m", {"v/m.gguf": GGUF, "v/mmproj-v.gguf": GGUF})
    (tmp_path / "better-mmproj.gguf").write_bytes(GGUF)
    src = write_ini(tmp_path, "[v]\nmmproj = better-mmproj.gguf\n")
    sections, _ = read_preset_text(tmp_path, preset.generate(root, src, models_max=1).text)
    assert sections["v"]["mmproj"] == str(tmp_path / "better-mmproj.gguf")


def test_paths_llama_server_would_cut_are_refused(tmp_path):
    root = tree(tmp_path / "m#1", {"alpha.gguf": GGUF})
    with pytest.raises(PresetError, match="';', '#'"):
        preset.generate(root, models_max=1)


@pytest.mark.parametrize("kw,preload,gateway,default", [
    ({"default": "alpha"}, ["alpha"], [], "alpha"),                  # preload: the default
    ({"default": "alpha.gguf"}, ["alpha"], [], "alpha"),             # MODEL_NAME as a file
    ({"default": "gamma", "preload": []}, [], [], "gamma"),          # MODELS_PRELOAD=""
    ({"preload": ["beta", "alpha", "beta"]}, None, None, ""),        # too many for max 1
    ({"preload": ["beta", "alpha"], "models_max": 2}, ["beta", "alpha"], [], ""),
    ({"preload": ["beta", "alpha"], "models_max": 0}, [], ["beta", "alpha"], ""),  # llama bug
    ({}, [], [], ""),
])
def test_preload_and_default(models, kw, preload, gateway, default):
    kw.setdefault("models_max", 1)
    if preload is None:
        with pytest.raises(PresetError, match="MODELS_MAX=1"):
            preset.generate(models, **kw)
        return
    gen = preset.generate(models, **kw)
    assert gen.preload == preload and gen.gateway_preload == gateway
    assert gen.default == default
    assert gen.text.count("load-on-startup") == len(preload)


def test_default_model_by_path(models):
    gen = preset.generate(models, default=os.path.join(models, "gamma", "gamma-q8.gguf"),
                          models_max=1)
    assert gen.default == "gamma"
    gen = preset.generate(models, default=os.path.join(models, "beta.gguf"), models_max=1)
    assert gen.default == "beta"


@pytest.mark.parametrize("kw,message", [
    ({"preload": ["delta"]}, "MODELS_PRELOAD: no model 'delta'"),
    ({"default": "delta.gguf"}, "the default model"),
    ({"models_max": -1}, "MODELS_MAX"),
])
def test_bad_preload_default_or_max(models, kw, message):
    kw.setdefault("models_max", 1)
    with pytest.raises(PresetError) as err:
        preset.generate(models, **kw)
    assert message in str(err.value)


def test_write_is_atomic_and_private(tmp_path, models):
    out = tmp_path / "run" / "router.ini"
    out.parent.mkdir()
    gen = preset.generate(models, models_max=1)
    gen.write(str(out))
    assert out.read_text() == gen.text
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert sorted(os.listdir(out.parent)) == ["router.ini"]     # no temporary left behind


# ---- the CLI entrypoint.sh runs ----------------------------------------------------------------------

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_cli_writes_the_preset_and_prints_what_the_entrypoint_needs(tmp_path, models):
    src = write_ini(tmp_path, "[beta]\nalias = b1\n")
    out = tmp_path / "gen.ini"
    done = run_cli("--models-dir", models, "--preset", src, "--out", str(out),
                   "--default", "alpha.gguf", "--max", "2", "--preload", "alpha,b1",
                   "--ctx", "4096", "--ngl", "0", "--parallel", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["models=alpha,beta,gamma", "default=alpha",
                                        "preload=alpha,beta", "gateway_preload="]
    assert "3 model(s)" in done.stderr and "beta (aliases b1)" in done.stderr
    sections, glob = read_preset(str(out))
    assert glob["ctx-size"] == "4096" and sections["beta"]["load-on-startup"] == "true"


def test_cli_preload_defaults_to_the_default_model_and_empty_means_none(tmp_path, models):
    out = str(tmp_path / "gen.ini")
    done = run_cli("--models-dir", models, "--out", out, "--default", "beta")
    assert done.returncode == 0 and "preload=beta" in done.stdout.splitlines()
    done = run_cli("--models-dir", models, "--out", out, "--default", "beta", "--preload", "")
    assert done.returncode == 0 and "preload=" in done.stdout.splitlines()


@pytest.mark.parametrize("args,message", [
    (["--preset", "PRESET"], ":2: unknown key 'nonsense'"),
    (["--preload", "alpha,beta"], "MODELS_MAX=1"),
    (["--max", "x"], "invalid int value"),
    (["--ctx", "0x10"], "whole number"),
])
def test_cli_invalid_input_exits_2_with_the_reason(tmp_path, models, args, message):
    src = write_ini(tmp_path, "[*]\nnonsense = 1\n")
    args = [src if a == "PRESET" else a for a in args]
    out = tmp_path / "gen.ini"
    done = run_cli("--models-dir", models, "--out", str(out), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == "" and not out.exists()


def test_cli_unwritable_output_exits_1(tmp_path, models):
    done = run_cli("--models-dir", models, "--out", str(tmp_path / "no" / "dir" / "x.ini"))
    assert done.returncode == 1 and "cannot write" in done.stderr
