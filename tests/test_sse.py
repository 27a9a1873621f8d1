import pytest

from llamagw.wire.sse import MAX_EVENT_BYTES, SSEError, SSESplitter

STREAM = (b'data: {"a":1}\n\n'
          b': ping\n\n'
          b'event: message\nid: 7\ndata: {"b":2}\n\n'
          b'data: line1\ndata: line2\n\n'
          b'data:nospace\n\n'
          b'data: [DONE]\n\n')
EXPECTED = [b'{"a":1}', b'{"b":2}', b"line1\nline2", b"nospace", b"[DONE]"]


def split_all(chunks):
    s = SSESplitter()
    out = []
    for c in chunks:
        out.extend(s.feed(c))
    return out, s


def test_whole():
    out, s = split_all([STREAM])
    assert out == EXPECTED
    assert not s.pending()


def test_byte_by_byte():
    out, _ = split_all([STREAM[i:i + 1] for i in range(len(STREAM))])
    assert out == EXPECTED


@pytest.mark.parametrize("size", [2, 3, 5, 7, 13])
def test_arbitrary_splits(size):
    out, _ = split_all([STREAM[i:i + size] for i in range(0, len(STREAM), size)])
    assert out == EXPECTED


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_other_line_endings(eol):
    stream = STREAM.replace(b"\n", eol)
    out, _ = split_all([stream[i:i + 1] for i in range(len(stream))])
    assert out == EXPECTED
    out2, _ = split_all([stream])
    assert out2 == EXPECTED


def test_cut_mid_event_is_pending():
    out, s = split_all([b'data: {"a":1}\n\ndata: {"b"'])
    assert out == [b'{"a":1}']
    assert s.pending()


def test_oversized_event_refused():
    s = SSESplitter()
    with pytest.raises(SSEError):
        s.feed(b"data: " + b"x" * (MAX_EVENT_BYTES + 10))
