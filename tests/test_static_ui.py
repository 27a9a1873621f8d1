"""The dashboard's files (llamagw/static/) and their server (llamagw.admin.static): what the
files may not contain (markup sinks, eval, other origins, inline script or style), what the
server sends (exact file list, security headers, ETag / 304, HEAD, 405, /ui -> /ui/)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from llamagw.admin import static
from llamagw.admin.static import StaticFiles

FILES = StaticFiles.load()
TEXT = {name: FILES.get(name).body.decode("utf-8") for name in static.FILES}
# The one absolute URL allowed: the SVG namespace (an identifier, never fetched).
SVG_NS = "http://www.w3.org/2000/svg"


@pytest.mark.parametrize("name", sorted(static.FILES))
@pytest.mark.parametrize("pattern", [
    r"\binnerHTML\b", r"\bouterHTML\b", r"insertAdjacentHTML", r"document\.write",
    r"\beval\s*\(", r"new\s+Function\s*\(", r"setTimeout\(\s*['\"`]", r"setInterval\(\s*['\"`]",
    r"javascript:", r"\bon[a-z]+\s*=\s*['\"]",          # inline handlers
    r"\bstyle\s*=\s*['\"]", r"setAttribute\(\s*['\"](style|on[a-z]+|href|src)['\"]",
    r"localStorage", r"sessionStorage", r"@import", r"url\(\s*['\"]?(https?:)?//",
])
def test_no_dangerous_construct(name, pattern):
    match = re.search(pattern, TEXT[name])
    assert match is None, f"{name}: {match.group(0)!r}"


@pytest.mark.parametrize("name", sorted(static.FILES))
def test_no_url_to_another_origin(name):
    urls = re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s'\"<>)]*", TEXT[name])
    assert [u for u in urls if u != SVG_NS] == [], name


class _Html(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self.script_bodies: list[str] = []
        self.styles = 0
        self.links: list[dict] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.ids: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs += [(tag, k, v) for k, v in attrs]
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True
        elif tag == "style":
            self.styles += 1
        elif tag == "link":
            self.links.append(a)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.script_bodies.append(data)


def test_index_html_has_no_inline_script_or_style():
    page = _Html()
    page.feed(TEXT["index.html"])
    assert page.scripts == [{"src": "app.js", "defer": None}]
    assert page.script_bodies == []
    assert page.styles == 0
    assert not [a for a in page.attrs if a[1] == "style" or a[1].startswith("on")]
    assert {(link["rel"], link["href"]) for link in page.links} == {
        ("icon", "favicon.svg"), ("stylesheet", "style.css")}
    assert len(page.ids) == len(set(page.ids)), "duplicate id"


def test_every_id_the_script_uses_exists():
    page = _Html()
    page.feed(TEXT["index.html"])
    used = set(re.findall(r"\$\('([a-z0-9-]+)'\)", TEXT["app.js"]))
    used |= set(re.findall(r"labelRow\([^)]*'([a-z0-9-]+)'\)", TEXT["app.js"]))
    assert used and used <= set(page.ids), sorted(used - set(page.ids))


def test_the_script_uses_only_text_sinks_and_the_contract_routes():
    js = TEXT["app.js"]
    assert "textContent" in js and "createTextNode" in js
    routes = set(re.findall(r"'(/admin/[a-z/]*)", js)) | set(re.findall(r"`(/admin/[a-z/]*)", js))
    assert routes <= {"/admin/session", "/admin/session/logout", "/admin/setup", "/admin/live",
                      "/admin/models", "/admin/models/", "/admin/models/unload", "/admin/usage", "/admin/keys",
                      "/admin/keys/", "/admin/logs", "/admin/system"}, routes
    assert "X-CSRF-Token" in js


def test_total_size_is_small():
    # The whole dashboard is a few tens of KB (no framework); a jump means something was
    # pasted in (a library, an image).
    assert FILES.total_bytes < 100_000


# --- the server -------------------------------------------------------------------------------
def header(resp, name):
    values = [v for n, v in resp.headers if n == name]
    assert len(values) == 1, (name, resp.headers)
    return values[0]


@pytest.mark.parametrize("path, name", [("/ui/", "index.html"), ("/ui/app.js", "app.js"),
                                        ("/ui/style.css", "style.css"),
                                        ("/ui/favicon.svg", "favicon.svg"),
                                        ("/ui/app.js?v=2", "app.js")])
def test_serves_each_file_with_security_headers(path, name):
    resp = FILES.respond("GET", path)
    assert resp.status == 200 and resp.body == FILES.get(name).body
    assert header(resp, "content-type") == static.FILES[name]
    assert header(resp, "content-length") == str(len(resp.body))
    csp = header(resp, "content-security-policy")
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                      "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'",
                      "form-action 'self'", "require-trusted-types-for 'script'"):
        assert directive in csp
    assert "unsafe" not in csp
    assert header(resp, "x-content-type-options") == "nosniff"
    assert header(resp, "referrer-policy") == "no-referrer"
    assert header(resp, "x-frame-options") == "DENY"
    assert header(resp, "cache-control") == "no-cache"
    assert re.fullmatch(r'"[0-9a-f]{32}"', header(resp, "etag"))


def test_api_headers_never_store():
    assert ("cache-control", "no-store") in static.API_HEADERS
    assert dict(static.API_HEADERS)["content-security-policy"] == static.CSP


@pytest.mark.parametrize("path", ["/ui/README.md", "/ui/../app.py", "/ui/%2e%2e/app.py",
                                  "/ui/app.js/", "/ui//app.js", "/ui/APP.JS", "/ui/index.htm",
                                  "/app.js", "/ui/static/app.js", "/uix"])
def test_anything_else_is_not_ours(path):
    assert FILES.respond("GET", path) is None
    assert not FILES.handles(path)


def test_ui_redirects_to_ui_slash():
    resp = FILES.respond("GET", "/ui")
    assert resp.status == 308 and header(resp, "location") == "/ui/" and resp.body == b""


def test_etag_revalidation_and_head():
    etag = header(FILES.respond("GET", "/ui/app.js"), "etag")
    for inm in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        resp = FILES.respond("GET", "/ui/app.js", [("if-none-match", inm)])
        assert resp.status == 304 and resp.body == b"" and header(resp, "etag") == etag
    assert FILES.respond("GET", "/ui/app.js", [("if-none-match", '"other"')]).status == 200
    head = FILES.respond("HEAD", "/ui/")
    assert head.status == 200 and head.body == b""
    assert header(head, "content-length") == str(len(FILES.get("index.html").body))


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_get_405(method):
    for path in ("/ui/", "/ui"):
        resp = FILES.respond(method, path)
        assert resp.status == 405 and header(resp, "allow") == "GET, HEAD"
        assert b'"code":"method_not_allowed"' in resp.body


def test_load_reads_only_the_listed_files(tmp_path):
    for name in static.FILES:
        (tmp_path / name).write_bytes(f"/* {name} */".encode())
    (tmp_path / "secret.txt").write_text("not served")
    files = StaticFiles.load(str(tmp_path))
    assert files.respond("GET", "/ui/secret.txt") is None
    assert files.respond("GET", "/ui/style.css").body == b"/* style.css */"
    (tmp_path / "app.js").unlink()
    with pytest.raises(OSError):
        StaticFiles.load(str(tmp_path))


def test_load_refuses_an_oversized_file(tmp_path):
    for name in static.FILES:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "index.html").write_bytes(b"x" * (static.MAX_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="index.html"):
        StaticFiles.load(str(tmp_path))
