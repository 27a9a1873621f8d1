"""Router mode: download a model into MODELS_DIR while serving (Ollama's pull), or delete one.

    Pulls(models_dir, controller, preset_file=..., endpoint=..., token=...)
    pulls.stream(text)  -> async iterator of progress dicts (Ollama's pull lines), ends with
                           {"status": "success"}; raises PullError before the first line
    pulls.delete(name)  -> None; PullError 404 / 409 / 400

A pull: `text` is a model URL as MODEL_URL takes it (hub.parse: http(s)://..., hf://OWNER/REPO:QUANT,
hf://OWNER/REPO/FILE.gguf), or Ollama's spelling hf.co/OWNER/REPO:QUANT (huggingface.co/... too).
The file goes to MODELS_DIR/NAME.gguf through fetch.ensure (resume, verification, free-disk check
before the transfer, the lock shared with other workers) in a worker thread; its progress comes
back through loop.call_soon_threadsafe into a bounded queue (a full queue drops a progress line,
never the end). Then the model gets its own section in llama-server's generated preset
(MODELS_PRESET_FILE; the other sections stay byte for byte as they were, so no running model is
restarted) and the router re-reads its sources (GET /models?reload=1), so the model appears in
the catalog. A client that goes away cancels the download (the partial file stays, for a resume).

Bounds: one pull per source at a time (a second one: 409), MAX_PULLS at once (429 past it),
PULL_DEADLINE_S for the whole download.

A delete: only an unloaded model with no request in flight (409 otherwise); its file (or its
folder) must resolve inside MODELS_DIR; the file, its download record and partial file go, its
preset section goes, and the router re-reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import threading
import time
from pathlib import Path

from llamagw.atomicfile import write_atomic
from llamagw.models import download, fetch, hub, preset_scan
from llamagw.models.download import DownloadError

log = logging.getLogger("llamagw.models")

# Downloads at once: each is a thread and a disk writer; two keep a worker's disk and link busy
# without starving the requests being served.
MAX_PULLS = 2
# A whole download: a 70B model at 50 MB/s takes ~15 min; 6 h covers slow links and still ends.
PULL_DEADLINE_S = 6 * 3600.0
# Progress lines waiting for a slow client: past this many, a new one is dropped (the next one
# says the same, only later).
PROGRESS_QUEUE = 64
# The hub's answer (resolve) in a thread: it retries with backoff; bounded by download's timeouts.
RESOLVE_ATTEMPTS = 3
# Longest preset file read back to edit (the generator writes ~200 bytes a model, 256 models).
MAX_PRESET_BYTES = 4 << 20

# Ollama's spelling of a Hugging Face model: hf.co/OWNER/REPO[:QUANT]
_OLLAMA_HF = re.compile(r"(?:hf\.co|huggingface\.co)/([^/:]+)/([^/:]+)(?::(.+))?\Z")


class PullError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code


def spec_for(text) -> hub.Spec:
    """The hub.Spec of a pull request's model (Ollama's hf.co/OWNER/REPO:QUANT or a model URL).
    Raises PullError 400."""
    if not isinstance(text, str) or not text.strip():
        raise PullError(400, "model is required")
    text = text.strip()
    m = _OLLAMA_HF.match(text)
    if m:
        owner, repo, quant = m.groups()
        if not quant or quant.lower() == "latest":
            raise PullError(400, f"{text}: name the quantisation, e.g. "
                                 f"hf.co/{owner}/{repo}:Q4_K_M")
        text = f"hf://{owner}/{repo}:{quant}"
    elif "://" not in text:
        raise PullError(400, f"{text[:80]!r}: pull a model by URL (https://.../NAME.gguf, "
                             f"hf://OWNER/REPO:QUANT) or as hf.co/OWNER/REPO:QUANT")
    try:
        return hub.parse(text)
    except hub.SourceError as exc:
        raise PullError(400, str(exc)) from None


def model_name(filename: str) -> str:
    """The router's name of a top-level file (its name without .gguf); PullError 400 when the
    router could not name it so."""
    name = filename[:-len(preset_scan.GGUF)]
    why = preset_scan.check_name(name, "the model name")
    if why or preset_scan.SHARD_RE.search(filename) or \
            name.startswith(preset_scan.DRAFT_PREFIXES) or "mmproj" in name.lower():
        raise PullError(400, f"{filename}: cannot be served as a model"
                             f"{': ' + why if why else ' (a shard, projector or draft)'}")
    return name


# ---- the generated preset: one section added or removed, the rest untouched ----------------------
def _sections_without(text: str, name: str) -> list[str]:
    out, skipping = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            skipping = stripped[1:-1].strip() == name
        if not skipping:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return out


def preset_edit(path: str, name: str, model_path: str | None) -> None:
    """Add (model_path set) or remove (None) the section [name] of the preset at `path`;
    atomically, mode 0600. Blocking: call from a thread."""
    if not path:
        return
    with open(path, "rb") as fh:
        text = fh.read(MAX_PRESET_BYTES).decode()
    lines = _sections_without(text, name)
    if model_path is not None:
        lines += ["", f"[{name}]", f"model = {model_path}"]
    write_atomic(path, "\n".join(lines) + "\n", prefix=".models-preset.")


def _inside(folder: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return path.resolve() != folder.resolve()


class Pulls:
    def __init__(self, models_dir: str, controller, *, preset_file: str = "",
                 endpoint: str = hub.DEFAULT_ENDPOINT, token: str | None = None,
                 max_pulls: int = MAX_PULLS, deadline_s: float = PULL_DEADLINE_S,
                 described=None):
        self.folder = Path(models_dir)
        self.ctl = controller
        self.described = described              # describe.ModelCatalog: the Ollama listings
        self.preset_file = preset_file
        self.endpoint = endpoint or hub.DEFAULT_ENDPOINT
        self.token = token or None
        self.max_pulls = max_pulls
        self.deadline_s = deadline_s
        self.running: set[str] = set()          # sources being pulled (spec.shown)
        self.edit_lock = asyncio.Lock()         # one preset edit + reload at a time

    # ---- pull ----------------------------------------------------------------------------------
    def stream(self, text):
        """Checks now (PullError 400 / 409 / 429), then the progress lines (an async
        generator)."""
        spec = spec_for(text)
        key = spec.shown
        if key in self.running:
            raise PullError(409, f"{key} is being pulled already", "pull_in_progress")
        if len(self.running) >= self.max_pulls:
            raise PullError(429, f"{self.max_pulls} pulls are running; try again later",
                            "too_many_pulls")
        return self._run(spec, key)

    async def _run(self, spec: hub.Spec, key: str):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(PROGRESS_QUEUE)
        stop = threading.Event()
        digest = ""
        reported = -1                       # the last `completed` sent
        job = getter = None

        def put(item) -> None:             # on the loop
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(item)

        def progress(total, done, status) -> None:      # worker thread
            loop.call_soon_threadsafe(put, ("progress", total, done, status))

        def work() -> Path:
            deadline = time.monotonic() + self.deadline_s
            source = fetch.resolve(spec, self.folder, endpoint=self.endpoint, token=self.token,
                                   attempts=RESOLVE_ATTEMPTS)
            model_name(source.filename)
            loop.call_soon_threadsafe(put, ("source", source))
            return fetch.ensure(source, self.folder, progress=progress, cancelled=stop.is_set,
                                deadline=deadline, log=lambda msg: log.info("pull: %s", msg))

        # taken at the first step, so an answer never started leaves nothing behind
        if key in self.running or len(self.running) >= self.max_pulls:
            raise PullError(409, f"{key} is being pulled already, or {self.max_pulls} pulls "
                                 f"are running", "pull_in_progress")
        self.running.add(key)
        try:
            yield {"status": "pulling manifest"}
            job = asyncio.ensure_future(asyncio.to_thread(work))
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([job, getter], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                item = getter.result()
                if item[0] == "source":
                    digest = f"sha256:{item[1].sha256}" if item[1].sha256 else ""
                    continue
                _, total, done, status = item
                ending = status in (download.STATUS_VERIFYING, download.STATUS_DONE)
                if ending and done <= reported:
                    continue                # said once below, in Ollama's order
                line = {"status": f"pulling {digest[7:19] or 'model'}", "digest": digest,
                        "total": total or 0, "completed": done}
                if status and status != "downloading" and not ending:
                    line["status"] = status
                reported = done             # the last bytes too (progress is rate-limited)
                yield line
            try:
                path = job.result()
            except (DownloadError, hub.SourceError) as exc:
                raise PullError(502 if isinstance(exc, DownloadError) else 400, str(exc),
                                "pull_failed") from None
            except PullError:
                raise
            name = model_name(path.name)
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            async with self.edit_lock:
                await asyncio.to_thread(preset_edit, self.preset_file, name,
                                        str(path.resolve()))
                await self._reload(name)
            log.info("pull: %s is model %s", spec.shown, name)
            yield {"status": "success"}
        finally:
            stop.set()                      # the client went away: the thread stops soon
            if getter is not None and not getter.done():
                getter.cancel()
            if job is not None and not job.done():
                job.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.running.discard(key)

    async def _reload(self, name: str) -> None:
        """The router re-reads its sources, then the catalog and the descriptions follow."""
        status, body = await self.ctl.client.request("GET", "/models?reload=1")
        if status != 200:
            raise PullError(502, f"the router did not re-read its models (status {status})",
                            "router_error")
        await self.ctl.resync()
        if self.described is not None:
            await self.described.refresh(name)

    # ---- delete --------------------------------------------------------------------------------
    async def delete(self, requested) -> str:
        if not isinstance(requested, str) or not requested:
            raise PullError(400, "model is required")
        ctl = self.ctl
        name = ctl.catalog.resolve(requested)
        m = ctl.catalog.get(name) if name else None
        if m is None:
            raise PullError(404, f"model '{requested}' not found", "model_not_found")
        if m.state.value != "unloaded" or m.in_flight or m.stopping or m.draining:
            raise PullError(409, f"model '{name}' is {m.state.value}; unload it first",
                            "model_in_use")
        async with self.edit_lock:
            await asyncio.to_thread(self._remove_files, name)
            await asyncio.to_thread(preset_edit, self.preset_file, name, None)
            await self._reload(name)
        log.info("delete: model %s removed", name)
        return name

    def _remove_files(self, name: str) -> None:
        scan = preset_scan.scan_models_dir(str(self.folder))
        local = scan.models.get(name)
        if local is None:
            raise PullError(404, f"model '{name}' has no file in MODELS_DIR", "model_not_found")
        target = Path(local.path).parent if local.folder else Path(local.path)
        if not _inside(self.folder, target) or target.is_symlink():
            raise PullError(403, f"model '{name}' is not a file of MODELS_DIR", "forbidden")
        if local.folder:
            shutil.rmtree(target)
            return
        for extra in (fetch.record_path(target), download.partial_path(target),
                      fetch.lock_path(target)):
            with contextlib.suppress(FileNotFoundError):
                extra.unlink()
        target.unlink()
