"""The frame codec is pure: any input gives a command or a coded error."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pushsvc.plugin.api import Field
from pushsvc.protocol import ids
from pushsvc.protocol.codes import ErrorCode
from pushsvc.protocol.frames import Broadcast, Command, FrameError, decode_frame, validate

FIELDS = {
    "to": Field((str, list), items=str, max_length=3),
    "text": Field(str, max_length=10),
    "data": Field(dict, required=False),
    "n": Field(float, required=False),
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
frames = st.dictionaries(
    st.sampled_from(["type", "ref", "to", "text", "data", "n", "user", "x"]), json_values
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=200), st.text(max_size=200), frames.map(json.dumps)), st.booleans()
)
def test_decode_and_validate_never_raise(data: str | bytes, binary: bool) -> None:
    result = decode_frame(data, binary=binary)
    assert isinstance(result, Command | FrameError)
    if isinstance(result, FrameError):
        assert result.code in set(ErrorCode)
        return
    checked = validate(result, FIELDS)
    assert isinstance(checked, Command | FrameError)
    if isinstance(checked, FrameError):
        assert checked.code is ErrorCode.BAD_REQUEST and ":" in checked.message


def test_bad_frames_get_codes() -> None:
    cases = {
        b"\xff\xfe": "not valid UTF-8",
        "{": "invalid JSON",
        "[1]": "must be a JSON object",
        "{}": "type: missing",
        '{"type": 5}': "type: must be a string",
        '{"type": "x", "ref": "' + "r" * 65 + '"}': "ref:",
        '{"type": "x", "ref": 7}': "ref:",
    }
    for data, message in cases.items():
        result = decode_frame(data)
        assert isinstance(result, FrameError) and message in result.message, (data, result)
    assert isinstance(decode_frame(b"{}", binary=True), FrameError)


def test_server_filled_fields_are_dropped() -> None:
    result = decode_frame('{"type":"chat","text":"hi","user":"mallory","from":"x","timestamp":1}')
    assert isinstance(result, Command)
    assert result.fields == {"text": "hi"}


def test_validate_names_the_field() -> None:
    command = Command("x", {"to": ["a", 1], "text": "hello"}, "r1")
    error = validate(command, FIELDS)
    assert isinstance(error, FrameError) and error.message.startswith("to:") and error.ref == "r1"
    error = validate(Command("x", {"to": "a", "text": "x" * 11}, None), FIELDS)
    assert isinstance(error, FrameError) and error.message == "text: at most 10 characters"
    error = validate(Command("x", {"to": "a", "text": True}, None), FIELDS)
    assert isinstance(error, FrameError) and error.message == "text: must be a string"
    ok = validate(Command("x", {"to": "a", "text": "t", "n": 3, "extra": 1}, None), FIELDS)
    assert isinstance(ok, Command) and ok.fields == {"to": "a", "text": "t", "n": 3}


def test_ids_are_unique_and_sorted() -> None:
    generator = ids.IdGenerator()
    made = [generator.new(now_ms=1_700_000_000_000) for _ in range(1000)]
    made += [generator.new() for _ in range(1000)]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(len(i) == 26 for i in made)
    assert ids.timestamp_ms(made[0]) == 1_700_000_000_000


@given(st.integers(min_value=0, max_value=(1 << 48) - 1), st.integers(0, (1 << 79) - 1))
def test_fast_id_encoding_matches_the_reference(ms: int, rand: int) -> None:
    generator = ids.IdGenerator()
    generator._last_ms, generator._last_random = ms, rand - 1 if rand else 0
    made = generator.new(ms)
    assert made == ids.encode(generator._last_ms, generator._last_random)
    assert ids.timestamp_ms(made) == generator._last_ms


def test_a_broadcast_is_framed_once_per_transport_kind_in_any_order() -> None:
    calls: list[str] = []

    def websocket(payload: bytes) -> bytes:
        calls.append("ws")
        return b"\x81" + bytes([len(payload)]) + payload

    def netstring(payload: bytes) -> bytes:
        calls.append("ns")
        return b"%d:%s," % (len(payload), payload)

    broadcast = Broadcast(b'{"type":"chat"}', "chat")
    framed = [broadcast.wrapped(wrap) for wrap in (websocket, netstring) * 3]
    assert calls == ["ws", "ns"]
    assert framed[0] is framed[2] is framed[4] and framed[1] is framed[3] is framed[5]


def test_every_disconnect_is_documented_with_its_label() -> None:
    from pathlib import Path

    from pushsvc.protocol.disconnects import every_disconnect

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    for disconnect in every_disconnect():
        row = next((line for line in doc.splitlines() if line.startswith(f"| {disconnect.code} | ")
                    and f"`{disconnect.label}`" in line), None)  # fmt: skip
        assert row is not None, f"docs/protocol.md: no row for {disconnect}"


def _check(spec: Field, value: object) -> str | None:
    result = validate(Command("x", {"f": value}, "r1"), {"f": spec})
    if isinstance(result, FrameError):
        assert result.code is ErrorCode.BAD_REQUEST and result.ref == "r1"
        return result.message
    assert result.fields == {"f": value}
    return None


def test_min_length_counts_code_points_and_items() -> None:
    assert _check(Field(str, min_length=3), "ab") == "f: at least 3 characters"
    assert _check(Field(str, min_length=3), "abc") is None
    assert _check(Field(str, min_length=2), "👍🏽") is None  # two code points, one grapheme
    assert _check(Field(list, min_length=1, required=False), []) == "f: at least 1 items"


def test_pattern_is_a_full_match() -> None:
    slug = Field(str, pattern=r"[a-z]+")
    assert _check(slug, "abc") is None
    assert _check(slug, "abc1") == "f: must match [a-z]+"
    assert _check(slug, "1abc") is not None
    assert _check(Field((str, int), pattern=r"[a-z]+"), 5) is None  # strings only


def test_choices() -> None:
    level = Field(str, choices=["low", "high"])
    assert level.choices == frozenset({"low", "high"})
    assert _check(level, "low") is None
    assert _check(level, "mid") == "f: must be one of 'high', 'low'"
    assert _check(Field((str, list), choices=[[1], "a"]), [1]) is None  # unhashable choices
    assert _check(Field((str, list), choices=["a"]), [1]) is not None  # unhashable value


def test_validator_value_error_is_bad_request() -> None:
    def even(value: int) -> None:
        if value % 2:
            raise ValueError("must be even")

    assert _check(Field(int, validator=even), 2) is None
    assert _check(Field(int, validator=even), 3) == "f: must be even"


def test_new_options_are_checked_when_declared() -> None:
    import pytest

    assert not Field(str).extra
    assert Field(str, min_length=1).extra
    with pytest.raises(ValueError):
        Field(str, min_length=5, max_length=2)
    with pytest.raises(TypeError):
        Field(str, validator="nope")  # type: ignore[arg-type]
