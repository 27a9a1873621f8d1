"""Model sources: what MODEL_URL / MODELS_URLS name, and where the bytes come from.

Three forms (parse() checks them without the network; resolve() asks the hub when it must):

    http(s)://HOST/PATH/NAME.gguf   the file itself; it is saved as NAME.gguf
    hf://OWNER/REPO/PATH.gguf       a file of a Hugging Face repository (branch main)
    hf://OWNER/REPO:QUANT           the one .gguf file of the repository whose path holds QUANT,
                                    case insensitive (mmproj projector files never count); none or
                                    several is an error naming the candidates

Files of a repository come from {HF_ENDPOINT}/OWNER/REPO/resolve/main/PATH; the repository's file
list, sizes and sha256 digests from {HF_ENDPOINT}/api/models/OWNER/REPO?blobs=true (its
`siblings`), so a hub download is always checked against the hub's digest. HF_TOKEN goes to
HF_ENDPOINT's origin only (see download.Auth).

Options after '#' (a fragment is never sent to a server): `sha256=HEX` the expected digest,
`name=FILE.gguf` the local file name; e.g. https://host/dl?id=7#name=model.gguf&sha256=ab12....
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse

from llamagw.models import download
from llamagw.models.download import Auth, DownloadError

DEFAULT_ENDPOINT = "https://huggingface.co"
REVISION = "main"
# A repository listing is ~200 bytes a file; 16 MiB holds tens of thousands of files.
MAX_API_BYTES = 16 << 20
# Local file names: a model name as router mode names them (preset.NAME_RE) plus ".gguf": no
# folder, no hidden file, nothing a shell or an INI file would misread.
FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\.gguf\Z")
# Hugging Face ids: letters, digits, '-', '_', '.'; up to 96 characters each.
HF_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")
QUANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}\Z")
# Longest spec accepted: a signed CDN URL can be long, 4 KiB is far above any real one.
MAX_SPEC_LEN = 4096


class SourceError(ValueError):
    """A spec that cannot name a model; str() says why."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed MODEL_URL entry. kind: "url" (url set), "file" (path set) or "quant"."""

    text: str                   # as given
    kind: str
    url: str = ""
    owner: str = ""
    repo: str = ""
    path: str = ""
    quant: str = ""
    sha256: str | None = None
    name: str | None = None     # from #name=

    @property
    def shown(self) -> str:
        """The spec fit for a log line (a URL without its query string)."""
        if self.kind == "url":
            return download.shown(self.url)
        return self.text.partition("#")[0]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a model's bytes come from and what they must be."""

    spec: Spec
    url: str
    filename: str               # the local file name
    sha256: str | None
    size: int | None
    auth: Auth | None


def check_filename(name: str, what: str) -> str:
    if not FILE_RE.match(name):
        raise SourceError(f"{what}: {name!r} cannot be the local file name: it must end in .gguf "
                          f"and hold only letters, digits, '.', '_', '+' and '-' (set "
                          f"#name=FILE.gguf)")
    return name


def _options(fragment: str, text: str) -> tuple[str | None, str | None]:
    sha = name = None
    for item in filter(None, fragment.split("&")):
        key, _, value = item.partition("=")
        if key == "sha256" and SHA256_RE.match(value):
            sha = value.lower()
        elif key == "name" and value:
            name = check_filename(value, text)
        else:
            raise SourceError(f"{text}: unknown or malformed option {item!r} after '#' "
                              f"(sha256=HEX, name=FILE.gguf)")
    return sha, name


def _safe(text: str) -> str:
    """Some of a refused spec, for the error: no query string (it may carry a signature)."""
    return text.partition("#")[0].partition("?")[0][:80]


def parse(text: str) -> Spec:
    """One spec, checked without the network. Raises SourceError."""
    text = text.strip()
    if not text:
        raise SourceError("an empty model URL")
    if len(text) > MAX_SPEC_LEN or any(ord(c) < 0x21 or c == "\x7f" for c in text):
        raise SourceError(f"{_safe(text)!r}: longer than {MAX_SPEC_LEN} or holds spaces or "
                          f"control characters")
    main, _, fragment = text.partition("#")
    sha, name = _options(fragment, download.shown(main) if "://" in main else main)
    scheme = main.partition("://")[0].lower()
    if scheme in ("http", "https"):
        u = urllib.parse.urlsplit(main)
        if not u.hostname:
            raise SourceError(f"{download.shown(main)}: no host")
        if name is None:
            last = urllib.parse.unquote(u.path.rsplit("/", 1)[-1])
            name = check_filename(last, download.shown(main))
        return Spec(text, "url", url=main, sha256=sha, name=name)
    if scheme != "hf":
        raise SourceError(f"{_safe(main)!r}: a model URL is http(s)://..., "
                          f"hf://OWNER/REPO/FILE.gguf or hf://OWNER/REPO:QUANT")
    rest = main[len("hf://"):]
    owner, _, rest = rest.partition("/")
    if "/" in rest:
        repo, _, path = rest.partition("/")
        quant = ""
    else:
        repo, _, quant = rest.partition(":")
        path = ""
    for part, what in ((owner, "OWNER"), (repo, "REPO")):
        if not HF_ID_RE.match(part):
            raise SourceError(f"{main}: {what} {part!r} is not a Hugging Face id")
    if path:
        segments = path.split("/")
        if any(s in ("", ".", "..") for s in segments) or not path.lower().endswith(".gguf"):
            raise SourceError(f"{main}: PATH must be a .gguf file in the repository")
        if name is None:
            name = check_filename(segments[-1], main)
        return Spec(text, "file", owner=owner, repo=repo, path=path, sha256=sha, name=name)
    if not quant or not QUANT_RE.match(quant):
        raise SourceError(f"{main}: hf://OWNER/REPO:QUANT needs a QUANT such as Q4_K_M, or use "
                          f"hf://OWNER/REPO/FILE.gguf")
    return Spec(text, "quant", owner=owner, repo=repo, quant=quant, sha256=sha, name=name)


def parse_list(text: str) -> list[Spec]:
    """MODELS_URLS: comma-separated specs (empty items skipped); two with one file name fail."""
    specs = [parse(item) for item in text.split(",") if item.strip()]
    if not specs:
        raise SourceError("no model URL given")
    names: dict[str, str] = {}
    for spec in specs:
        key = spec.name or spec.shown
        if spec.name and key in names:
            raise SourceError(f"{names[key]} and {spec.shown} would both be saved as {key}")
        names[key] = spec.shown
    return specs


def endpoint_auth(endpoint: str, token: str | None) -> Auth | None:
    return Auth(token, download.origin(endpoint)) if token else None


def _quoted(path: str) -> str:
    return "/".join(urllib.parse.quote(s, safe="") for s in path.split("/"))


def siblings(spec: Spec, endpoint: str, auth: Auth | None, **retry) -> list[dict]:
    """The repository's files from the model API: [{"rfilename", "size", "lfs": {...}}, ...]."""
    url = f"{endpoint.rstrip('/')}/api/models/{spec.owner}/{spec.repo}?blobs=true"
    body = download.with_retries(
        lambda: download.fetch_bytes(url, MAX_API_BYTES, {"Accept": "application/json"},
                                     auth=auth), **retry)
    try:
        doc = json.loads(body)
    except ValueError:
        raise DownloadError(f"GET {download.shown(url)}: not JSON") from None
    files = doc.get("siblings") if isinstance(doc, dict) else None
    if not isinstance(files, list):
        raise DownloadError(f"GET {download.shown(url)}: no 'siblings' list in the answer")
    return [f for f in files if isinstance(f, dict) and isinstance(f.get("rfilename"), str)]


def pick(spec: Spec, files: list[dict]) -> dict:
    """The sibling that spec names (kind "file": that path; "quant": the one match)."""
    repo = f"{spec.owner}/{spec.repo}"
    if spec.kind == "file":
        for f in files:
            if f["rfilename"] == spec.path:
                return f
        raise SourceError(f"hf://{repo}: no file {spec.path} in the repository")
    ggufs = [f for f in files if f["rfilename"].lower().endswith(".gguf")
             and "mmproj" not in f["rfilename"].lower()]
    hits = [f for f in ggufs if spec.quant.lower() in f["rfilename"].lower()]
    if len(hits) == 1:
        return hits[0]
    listed = ", ".join(sorted(f["rfilename"] for f in (hits or ggufs))[:20]) or "none"
    if not hits:
        raise SourceError(f"hf://{repo}:{spec.quant}: no .gguf file holds {spec.quant!r}; the "
                          f"repository's .gguf files: {listed}")
    raise SourceError(f"hf://{repo}:{spec.quant}: {len(hits)} .gguf files hold {spec.quant!r} "
                      f"({listed}); name one with hf://{repo}/FILE.gguf")


def resolve(spec: Spec, *, endpoint: str = DEFAULT_ENDPOINT, token: str | None = None,
            **retry) -> Source:
    """Where spec's bytes come from, with the hub's size and digest for hf:// specs.

    Raises SourceError (the spec names nothing that exists) or DownloadError (the hub could not
    be asked; DownloadError.retryable says whether a later try may work). retry: with_retries'
    keyword arguments."""
    if spec.kind == "url":
        return Source(spec, spec.url, spec.name or "", spec.sha256, None, None)
    auth = endpoint_auth(endpoint, token)
    try:
        entry = pick(spec, siblings(spec, endpoint, auth, **retry))
    except DownloadError as exc:
        if exc.status == 404:
            raise SourceError(f"hf://{spec.owner}/{spec.repo}: no such repository on "
                              f"{download.shown(endpoint)} ({exc})") from None
        raise
    path = entry["rfilename"]
    name = spec.name or check_filename(path.rsplit("/", 1)[-1], spec.shown)
    lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
    hub_sha = lfs.get("sha256") if isinstance(lfs.get("sha256"), str) else None
    if hub_sha and not SHA256_RE.match(hub_sha):
        hub_sha = None
    if spec.sha256 and hub_sha and spec.sha256 != hub_sha.lower():
        raise SourceError(f"{spec.shown}: the hub lists sha256 {hub_sha.lower()} for {path}, "
                          f"the given one is {spec.sha256}")
    size = lfs.get("size", entry.get("size"))
    size = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    url = (f"{endpoint.rstrip('/')}/{spec.owner}/{spec.repo}/resolve/{REVISION}/"
           f"{_quoted(path)}")
    return Source(spec, url, name, spec.sha256 or (hub_sha.lower() if hub_sha else None), size,
                  auth)
