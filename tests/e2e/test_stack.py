"""The whole stack as the container runs it: entrypoint.sh + the real llama-server on the demo
model + health server + gateway. Health goes 204 -> 200, a keyed chat request answers through the
gateway, logs land where the README says, SIGTERM stops everything with exit 0."""

from __future__ import annotations

import json
import os
import stat

import pytest

from e2e_stack import processes_mentioning, request
from e2e_stack import make_stack  # noqa: F401 (fixtures)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_entrypoint_serves_the_demo_model_and_stops_clean(make_stack, transport):
    s = make_stack(BACKEND_TRANSPORT=transport).start()
    seen = s.wait_health(200)
    assert seen <= {0, 204, 200}  # never "unhealthy" while booting

    # llama-server listens where BACKEND_TRANSPORT says, and only there
    sock_path = s.run_dir / "llama-server.sock"
    if transport == "unix":
        assert stat.S_IMODE(os.stat(sock_path).st_mode) & 0o077 == 0    # this user only
        with pytest.raises(ConnectionRefusedError):
            request(s.backend_port, "/health", timeout=5)
    else:
        assert not sock_path.exists()
    assert request(s.backend_port, "/health", timeout=5, unix_path=s.backend_socket)[0] == 200

    status, _, body = s.chat(max_tokens=4)
    assert status == 200, body
    reply = json.loads(body)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] >= 1
    assert request(s.port, "/v1/models")[0] == 401          # no key

    logs = s.data / "logs"
    server_log = (logs / "llama-instruct" / "latest.txt").read_text()
    assert "listening" in server_log or "model loaded" in server_log
    assert (logs / "_boot" / "latest.txt").read_text()
    assert s.key not in (logs / "_boot" / "latest.txt").read_text()

    assert s.stop() == 0
    assert processes_mentioning(str(s.tmp)) == []
    assert not sock_path.exists()
