"""The single model's description (llamagw/models/describe.py) when the gateway starts before its
file is there: entrypoint.sh starts it while a MODEL_URL download runs."""

from __future__ import annotations

import asyncio
import os

from test_models_gateway import write_gguf

from llamagw.models import describe


def test_load_waits_for_the_file_a_download_brings_then_reads_it(tmp_path, monkeypatch):
    monkeypatch.setattr(describe, "MODEL_FILE_WAIT_S", 0.02)
    path = str(tmp_path / "models" / "tiny.gguf")
    catalog = describe.ModelCatalog(path)

    async def scenario():
        task = asyncio.create_task(catalog.load(downloading=True))
        await asyncio.sleep(0.1)
        assert not task.done() and catalog.info is None        # no file yet: no failed read
        assert catalog._failed == {}
        part = str(tmp_path / "models" / ".tiny.gguf.partial")
        write_gguf(part, "Tiny", 512)
        os.rename(part, path)                                   # as the download ends
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert catalog.info is not None and catalog.name == "tiny"
    assert catalog.info.context_length == 512
