"""llamagw.backend_state: the state-file contract between entrypoint.sh (the writer), the gateway
and the health server (the readers)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llamagw import backend_state
from llamagw.backend_state import BackendState, State, read_state

ENTRYPOINT = Path(__file__).resolve().parents[1] / "entrypoint.sh"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("latin-1"))


def test_the_entrypoint_writes_only_the_contract_words():
    words = set(re.findall(r"\bset_state ([a-z]+)", ENTRYPOINT.read_text()))
    assert words == set(backend_state.WRITTEN)
    assert State.UNKNOWN not in backend_state.WRITTEN.values()


@pytest.mark.parametrize("text,state", [
    ("starting\n", State.STARTING), ("ready\n", State.READY), ("failed", State.FAILED),
    (" stopping \n", State.STOPPING),
    ("unknown\n", State.STARTING),      # never written: not taken from the file
    ("rea", State.STARTING), ("", State.STARTING), ("ready\xff\n", State.STARTING),
    ("ready\nready\n", State.STARTING),
])
def test_read_state_takes_known_words_only(tmp_path, text, state):
    path = tmp_path / "health"
    write(path, text)
    assert read_state(str(path)) is state


def test_a_missing_file_is_the_callers_choice_and_an_unreadable_one_is_starting(tmp_path):
    assert read_state(str(tmp_path / "none")) is State.STARTING
    assert read_state(str(tmp_path / "none"), State.UNKNOWN) is State.UNKNOWN
    assert read_state(str(tmp_path), State.UNKNOWN) is State.STARTING     # a directory


def test_states_are_their_words():
    assert State.READY == "ready" and f"{State.FAILED}" == "failed"
    assert backend_state.TAKES_REQUESTS == {State.READY, State.UNKNOWN}


def test_the_gateway_reader_caches_for_its_ttl(tmp_path):
    path = tmp_path / "health"
    clock = Clock()
    state = BackendState(str(path), clock=clock, ttl=0.5)
    assert state.get() is State.UNKNOWN           # no supervisor
    write(path, "ready\n")
    assert state.get() is State.UNKNOWN           # cached
    clock.now += 0.5
    assert state.get() is State.READY
    write(path, "starting\n")
    assert state.get() is State.READY             # cached
    assert state.refresh() is State.STARTING      # read now


def test_serving_rereads_a_refusing_state_at_once(tmp_path):
    path = tmp_path / "health"
    clock = Clock()
    state = BackendState(str(path), clock=clock, ttl=0.5)
    write(path, "starting\n")
    assert state.serving() is State.STARTING
    write(path, "ready\n")
    assert state.serving() is State.READY         # within the TTL: the refusal re-read it
    write(path, "failed\n")
    assert state.serving() is State.READY         # a state that takes requests is trusted
    clock.now += 0.5
    assert state.serving() is State.FAILED
