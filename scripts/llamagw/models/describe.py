"""The served models described from their GGUF headers (for the Ollama API: tags, show, ps).

ModelCatalog maps model names to their files and reads each file's header in a worker thread
(asyncio.to_thread: nothing here waits for a disk on the event loop), once: the description is
cached. A header that cannot be read is logged and tried again after READ_RETRY_S at the
earliest.

- one model (MODEL_PATH / MODEL_NAME): load() reads its header, then its sha256 (`digest`),
  both published as soon as known: /api/tags answers while the file is still being hashed;
- router mode (MODELS_DIR): load() scans the folder the way models/preset.py names models (the
  names llama-server's router serves, from the same scan as its generated preset) and reads
  every header. Digests are not hashed for every file at boot (ten 40 GB models on a network
  volume would be read whole, slowing the loads that matter): a model's digest is hashed in the
  background the first time it is listed while loaded (its file was just read by llama-server),
  one file at a time; "" until then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from llamagw.models import gguf as gguf_meta
from llamagw.models.gguf import ModelInfo, read_gguf_metadata
from llamagw.models.preset_scan import PresetError, scan_models_dir

log = logging.getLogger("gateway")

# A header that failed to read (a file being copied, a broken file) is tried again after this.
READ_RETRY_S = 60.0
# MODELS_DIR is scanned again for a name it did not have at most this often (a model copied in
# by hand is served only after a restart anyway: the router's preset is generated then; a pull
# or a delete calls refresh()).
RESCAN_INTERVAL_S = 30.0
# How often the gateway looks for the single model's file while a download at boot brings it.
MODEL_FILE_WAIT_S = 0.5


class Described:
    """A ModelInfo whose `digest` is a plain value: "" until the worker thread has hashed the
    file. ModelInfo.digest itself hashes the whole file when called, which on the event loop
    would freeze the gateway for minutes on a multi-GB model."""

    __slots__ = ("_info", "digest")

    def __init__(self, info: ModelInfo, digest: str = ""):
        self._info = info
        self.digest = digest

    def __getattr__(self, name):
        return getattr(self._info, name)


class ModelCatalog:
    """Names -> GGUF descriptions, read off the event loop and cached (module docstring)."""

    def __init__(self, model_path: str = "", model_name: str = "", *, models_dir: str = "",
                 clock=time.monotonic):
        self.path = model_path
        base = model_name or (os.path.basename(model_path) if model_path else "default")
        self.name = base[:-5] if base.endswith(".gguf") else base
        self.models_dir = models_dir
        self.clock = clock
        self.paths: dict[str, str] = {self.name: model_path} if model_path else {}
        self.projectors: dict[str, str] = {}
        self._infos: dict[str, Described] = {}
        self._failed: dict[str, float] = {}          # name -> clock() of the failed read
        self._reads: dict[str, asyncio.Task] = {}
        self._scanned_at: float | None = None
        self._digests: list[str] = []                # names waiting to be hashed (router mode)
        self._hasher: asyncio.Task | None = None

    # ---- the single model (MODEL_PATH) ----------------------------------------------------------
    @property
    def info(self) -> Described | None:
        """The one model's description (None in router mode, or until read)."""
        return self._infos.get(self.name) if self.path else None

    def infos(self) -> list[Described]:
        info = self.info
        return [info] if info is not None else []

    # ---- loading ------------------------------------------------------------------------------
    async def load(self, downloading: bool = False) -> None:
        """Read what there is to read: the one model's header and digest, or, in router mode,
        the folder and every model's header. downloading: the one model's file is on its way
        (a download at boot): wait for it first."""
        if self.models_dir:
            await self.scan()
            for name in sorted(self.paths):
                await self.describe(name)
            return
        if not self.path:
            return
        # entrypoint.sh starts the gateway while a MODEL_URL download runs when it knows the
        # file's name: the file appears, whole (renamed into place), when the download is done
        while downloading and not await asyncio.to_thread(os.path.exists, self.path):
            await asyncio.sleep(MODEL_FILE_WAIT_S)
        info = await self.describe(self.name)
        if info is not None:
            await self._hash(self.name)

    async def scan(self) -> None:
        self._scanned_at = self.clock()
        try:
            scan = await asyncio.to_thread(scan_models_dir, self.models_dir)
        except (OSError, PresetError) as exc:
            log.warning("cannot scan MODELS_DIR %s: %s", self.models_dir, exc)
            return
        self.paths = {name: m.path for name, m in scan.models.items()}
        self.projectors = {name: m.mmproj for name, m in scan.models.items() if m.mmproj}

    async def refresh(self, name: str) -> None:
        """Router mode: the file of model `name` was added or removed (a pull, a delete): forget
        what was read of it and scan the folder again now."""
        self._infos.pop(name, None)
        self._failed.pop(name, None)
        if self.models_dir:
            await self.scan()

    async def describe(self, name: str) -> Described | None:
        """The model's description, read once (in a worker thread) and cached; None when its
        file is unknown or cannot be read (logged; retried after READ_RETRY_S)."""
        info = self._infos.get(name)
        if info is not None:
            return info
        if name not in self.paths and self.models_dir and (
                self._scanned_at is None or self.clock() - self._scanned_at > RESCAN_INTERVAL_S):
            await self.scan()
        path = self.paths.get(name)
        if path is None:
            return None
        failed = self._failed.get(name)
        if failed is not None and self.clock() - failed < READ_RETRY_S:
            return None
        task = self._reads.get(name)
        if task is None:
            task = self._reads[name] = asyncio.get_running_loop().create_task(
                asyncio.to_thread(read_gguf_metadata, path, name=name))
        try:
            info = Described(await asyncio.shield(task))
        except (OSError, ValueError) as exc:        # logged at most once per READ_RETRY_S
            log.warning("cannot read GGUF metadata of %s: %s", path, exc)
            self._failed[name] = self.clock()
            return None
        finally:
            if task.done() and self._reads.get(name) is task:
                del self._reads[name]
        self._failed.pop(name, None)
        self._infos.setdefault(name, info)
        return self._infos[name]

    def has_projector(self, name: str) -> bool:
        return bool(self.projectors.get(name))

    # ---- digests --------------------------------------------------------------------------------
    async def _hash(self, name: str) -> None:
        info = self._infos.get(name)
        if info is None or info.digest:
            return
        try:
            digest = await asyncio.to_thread(gguf_meta.file_digest, info.path)
        except OSError as exc:
            log.warning("cannot hash %s: %s", info.path, exc)
            return
        self._infos[name] = Described(info._info, digest)

    def want_digest(self, name: str) -> None:
        """Hash this model's file in the background (one file at a time), if not done yet."""
        info = self._infos.get(name)
        if info is None or info.digest or name in self._digests:
            return
        self._digests.append(name)
        if self._hasher is None or self._hasher.done():
            self._hasher = asyncio.get_running_loop().create_task(self._hash_queue())

    async def _hash_queue(self) -> None:
        while self._digests:
            await self._hash(self._digests[0])
            self._digests.pop(0)

    def close(self) -> None:
        for task in [self._hasher, *self._reads.values()]:
            if task is not None:
                task.cancel()
