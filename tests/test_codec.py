"""The one frame codec (wire/codec.py) on its own: no socket, no daemon.

Frames go through it whole, byte by byte, in any split and with junk
after; attachments land in the caller's buffers; descriptors go to the
frame the read that brought them ended in; every refusal has its code and
text, and memory is taken only as bytes arrive.
"""
from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hailo_devmgr.wire import codec as c
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.wire import shm
from hailo_devmgr.wire import references as refs

A = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
B = np.linspace(0, 1, 8, dtype=np.float32)

MESSAGES = [
    {"action": "ping"},
    {"action": "status", "request_id": 7},
    {"action": "infer", "request_id": "abc", "model_path": "/m/x.hef", "input_data": {"prompt": "é ☃"}},
    {},
]


def wire_bytes(buffers) -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in buffers)


def v2_frame(message: dict) -> bytes:
    buffers, fds = c.encode(message)
    assert fds == []
    return wire_bytes(buffers)


def memfd(data: bytes = b"x") -> int:
    fd = os.memfd_create("codec-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shm.REQUIRED_SEALS)
    return fd


def contents(fd: int) -> bytes:
    return os.pread(fd, 64, 0)


def by_want_and_got(reader: c.FrameReader, data: bytes, step: int = 1 << 30, fds_at=None):
    """Drive ``reader`` as a socket loop does: each read into the view it wants
    (at most ``step`` bytes); ``fds_at`` maps a stream offset to descriptors sent with
    the byte there. Returns every event but NEED_DATA."""
    fds_at = fds_at or {}
    events, pos = [], 0
    while True:
        event = reader.next_event()
        if event is not c.NEED_DATA:
            events.append(event)
            if isinstance(event, c.Body):
                reader.attach(p.decode_body(event.body))
            continue
        if pos == len(data):
            return events
        view = reader.want()
        count = min(len(view), step, len(data) - pos)
        # A read ends with the message that carries descriptors (as the kernel does).
        carrying = [at for at in fds_at if pos <= at < pos + count]
        if carrying:
            count = carrying[0] - pos + 1
        view[:count] = data[pos:pos + count]
        pos += count
        reader.got(count, fds_at.get(pos - 1, ()))


def frames_of(events) -> list:
    return [event for event in events if isinstance(event, c.Frame)]


# ---------------------------------------------------------------- v1

@pytest.mark.parametrize("message", MESSAGES)
def test_encode_without_arrays_is_the_v1_frame(message):
    buffers, fds = c.encode(message)
    assert buffers == [p.encode_frame(message)] and fds == []
    (length,) = struct.unpack(">I", buffers[0][:4])
    assert length == len(buffers[0]) - 4


def test_v1_frames_whole_byte_by_byte_and_with_junk_after():
    stream = b"".join(p.encode_frame(m) for m in MESSAGES)
    whole = c.FrameReader()
    whole.feed(stream + b"\x00\x00")
    assert [frame.message for frame in whole.frames()] == MESSAGES
    assert whole.pending == 2 and whole.mid_frame

    single = c.FrameReader()
    got = []
    for index in range(len(stream)):
        single.feed(stream[index:index + 1])
        got += single.frames()
    assert [frame.message for frame in got] == MESSAGES and not single.mid_frame

    driven = c.FrameReader()
    assert [f.message for f in frames_of(by_want_and_got(driven, stream, step=3))] == MESSAGES


def test_undecoded_mode_hands_bodies_and_asks_only_when_attachments_are_possible():
    reader = c.FrameReader(decode=False)
    reader.feed(p.encode_frame({"action": "ping"}) + b"\x00\x00\x00\x05{bad}")
    assert isinstance(reader.next_event(), c.Header)
    frame = reader.next_event()
    assert isinstance(frame, c.Frame) and frame.message is None and json.loads(frame.body) == {"action": "ping"}
    assert reader.next_event() == c.Header(5)
    assert reader.next_event().body == b"{bad}"   # bad JSON, no "attachments": a frame with its body
    assert reader.next_event() is c.NEED_DATA

    with_list = v2_frame({"action": "infer", "x": A})
    reader.feed(with_list + with_list)
    assert isinstance(reader.next_event(), c.Header)
    body = reader.next_event()
    assert isinstance(body, c.Body)
    with pytest.raises(RuntimeError):
        reader.next_event()   # waits for attach()
    assert reader.attach(json.loads(body.body)) == [48]
    frame = reader.next_event()
    assert np.array_equal(frame.attachments[0].reshape(4, 4, 3), A)
    reader.next_event()
    reader.next_event()
    assert reader.attach(None) == []   # the caller could not decode it: no attachments
    assert isinstance(reader.next_event(), c.Frame)
    assert reader.buffered == 48      # the unread block stays (the caller closes such a connection)


def test_a_plain_frame_read_whole_is_taken_in_one_step():
    """The daemon's small request: its length offered to be charged, then its
    body, without the events; what follows it stays for the next read."""
    first, second = p.encode_frame({"action": "ping"}), p.encode_frame({"action": "status", "n": 1})
    reader = c.FrameReader(decode=False)
    reader.feed(first + second + second[:5])
    asked = []
    assert json.loads(reader.take_plain(lambda length: asked.append(length) or True)) == {"action": "ping"}
    assert asked == [len(first) - 4]
    assert reader.take_plain(lambda length: False) is None   # not charged: not taken
    assert json.loads(reader.take_plain()) == {"action": "status", "n": 1}
    assert reader.take_plain() is None                      # 5 bytes of the next: not whole
    assert reader.pending == 5 and reader.buffered == 5 and reader.mid_frame
    reader.feed(second[5:])
    assert reader.next_event() == c.Header(len(second) - 4)   # the events still work in its place
    assert reader.take_plain() is None                        # mid-frame: the events go on
    assert json.loads(reader.next_event().body) == {"action": "status", "n": 1}
    assert reader.pending == 0 and not reader.mid_frame


def test_take_plain_leaves_every_other_frame_to_the_events():
    plain = p.encode_frame({"action": "ping"})
    never = lambda length: pytest.fail("nothing to charge")  # noqa: E731
    over = c.FrameReader(max_message_bytes=5, decode=False)
    over.feed(plain)
    assert over.take_plain(never) is None
    with pytest.raises(p.RequestError) as info:
        over.next_event()                 # the refusal comes from the events, as before
    assert info.value.code == p.TOO_LARGE and over.take_plain(never) is None

    listing = c.FrameReader(decode=False)   # may list attachments: decoded and attached first
    listing.feed(v2_frame({"action": "infer", "x": A}))
    assert listing.take_plain(never) is None and isinstance(listing.next_event(), c.Header)

    with_fds = c.FrameReader(decode=False)  # descriptors go with their frame through the events
    fd = memfd()
    with_fds.feed(plain, [fd])
    assert with_fds.take_plain(never) is None
    frame = with_fds.frames()[0]
    assert frame.fds == [fd]
    c.close_fds(frame.fds)

    decoding = c.FrameReader()              # a client's reader decodes: the events
    decoding.feed(plain)
    assert decoding.take_plain(never) is None and decoding.frames()[0].message == {"action": "ping"}


@settings(max_examples=100, deadline=None)
@given(bodies=st.lists(st.binary(max_size=40), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 400), max_size=6))
def test_the_one_step_and_the_events_give_the_same_frames(bodies, cuts):
    """Any bytes, fed in any pieces: frames() (which takes plain frames whole)
    and the events alone give the same bodies and leave the same bytes."""
    data = b"".join(struct.pack(">I", len(body)) + body for body in bodies) + b"\x00"
    stepwise, whole = c.FrameReader(decode=False), c.FrameReader(decode=False)
    by_events, by_frames, start = [], [], 0
    for cut in sorted({min(cut, len(data)) for cut in cuts}) + [len(data)]:
        stepwise.feed(data[start:cut])
        whole.feed(data[start:cut])
        start = cut
        while (event := stepwise.next_event()) is not c.NEED_DATA:
            if isinstance(event, c.Body):
                stepwise.attach(None)
            elif isinstance(event, c.Frame):
                by_events.append(event.body)
        by_frames += [frame.body for frame in whole.frames()]
    assert by_frames == by_events == bodies
    assert whole.pending == stepwise.pending == 1 and whole.buffered == stepwise.buffered


# ---------------------------------------------------------------- v2

def test_v2_round_trip_with_attachments_and_memfds():
    message = {"action": "infer", "request_id": 3,
               "input_data": {"inputs": {"a": A, "b": B, "s": np.float32(2.5), "big": np.arange(64.0)}}}
    buffers, fds = c.encode(message, shm_min_bytes=500)
    try:
        assert len(buffers) == 3 and len(fds) == 1   # a, b attached; big (512 bytes) in a memfd
        reader = c.FrameReader()
        reader.feed(wire_bytes(buffers), fds)
        fds = []
        [frame] = reader.frames()
        assert frame.message["attachments"] == [48, 32] and frame.message["fds"] == 1
        assert frame.size == len(frame.body) + 80
        c.check_fds(frame.message, len(frame.fds), frame.fds_truncated)
        blocks = refs.Blocks(frame.attachments, frame.fds)
        inputs = refs.resolve(frame.message["input_data"], blocks, 10 ** 6, "input_data", as_array=True)
        blocks.close()
        assert np.array_equal(inputs["inputs"]["a"], A) and np.array_equal(inputs["inputs"]["b"], B)
        assert np.array_equal(inputs["inputs"]["big"], np.arange(64.0)) and inputs["inputs"]["s"] == 2.5
    finally:
        c.close_fds(fds)


def test_attachments_are_read_straight_into_the_callers_buffers():
    frame_bytes = v2_frame({"a": A, "b": B})
    made = []

    def allocate(size):
        made.append(np.full(size, 0xEE, np.uint8))
        return made[-1]
    reader = c.FrameReader(allocate=allocate)
    views = []
    pos = 0
    while True:
        event = reader.next_event()
        if isinstance(event, c.Frame):
            break
        if event is c.NEED_DATA:
            view = reader.want()
            views.append(view)
            count = len(view)
            view[:] = frame_bytes[pos:pos + count]
            pos += count
            reader.got(count)
    assert event.attachments[0] is made[0] and event.attachments[1] is made[1]
    assert np.array_equal(made[0].reshape(4, 4, 3), A) and np.array_equal(made[1].view(np.float32), B)
    # The last two reads went into those very buffers: no copy.
    assert np.shares_memory(np.asarray(views[-2]), made[0]) and np.shares_memory(np.asarray(views[-1]), made[1])


def test_the_length_is_known_from_the_header_before_any_body_memory():
    reader = c.FrameReader(max_message_bytes=64 << 20)
    reader.feed(struct.pack(">I", 64 << 20)[:3])
    assert reader.next_event() is c.NEED_DATA and reader.frame_length is None
    tracemalloc.start()
    try:
        reader.feed(struct.pack(">I", 64 << 20)[3:])
        assert reader.next_event() == c.Header(64 << 20) and reader.frame_length == 64 << 20
        assert tracemalloc.get_traced_memory()[1] < 64 * 1024   # nothing for the body yet
        reader.feed(b"{")
        assert reader.next_event() is c.NEED_DATA
        assert tracemalloc.get_traced_memory()[1] < c.BODY_CHUNK + 256 * 1024   # one chunk, not 64 MiB
    finally:
        tracemalloc.stop()
    reader.close()


def test_the_body_is_taken_in_chunks_of_at_most_chunk_bytes():
    message = {"text": "x" * 100}
    data = p.encode_frame(message)
    reader = c.FrameReader(chunk_bytes=16)
    sizes = []
    pos = 0
    while True:
        event = reader.next_event()
        if isinstance(event, c.Frame):
            break
        if event is c.NEED_DATA:
            view = reader.want()
            sizes.append(len(view))
            view[:] = data[pos:pos + len(view)]
            pos += len(view)
            reader.got(len(view))
    assert event.message == message
    assert sizes[0] == 4 and max(sizes[1:]) == 16 and sum(sizes) == len(data)


# ---------------------------------------------------------------- refusals

def test_a_length_over_the_limit_is_too_large_before_the_body():
    reader = c.FrameReader(max_message_bytes=10)
    reader.feed(struct.pack(">I", 11))
    with pytest.raises(p.RequestError) as info:
        reader.next_event()
    assert info.value.code == p.TOO_LARGE and info.value.fatal
    assert info.value.message == "Message of 11 bytes exceeds the limit of 10 bytes"
    with pytest.raises(p.RequestError):   # and it stays refused
        reader.feed(b"{}")


def test_a_length_at_the_limit_is_accepted():
    reader = c.FrameReader(max_message_bytes=2)
    reader.feed(p.encode_frame({}))
    assert [frame.message for frame in reader.frames()] == [{}]


def test_attachments_over_the_limit_are_too_large():
    data = v2_frame({"x": np.zeros(100, np.uint8)})
    body_length = len(data) - 4 - 100
    reader = c.FrameReader(max_message_bytes=body_length + 99)
    reader.feed(data)
    with pytest.raises(p.RequestError) as info:
        reader.frames()
    assert info.value.code == p.TOO_LARGE and info.value.fatal
    assert info.value.message == (f"Message of {body_length + 100} bytes with its attachments exceeds "
                                  f"the limit of {body_length + 99} bytes")
    exact = c.FrameReader(max_message_bytes=body_length + 100)
    exact.feed(data)
    assert len(exact.frames()) == 1


@pytest.mark.parametrize("attachments", ["5", [1, -1], [True], [1.5], [0] * 257, {"a": 1}, [None]])
def test_a_bad_attachments_list_is_fatal(attachments):
    reader = c.FrameReader()
    reader.feed(p.encode_frame({"action": "infer", "attachments": attachments}))
    with pytest.raises(p.RequestError) as info:
        reader.frames()
    assert info.value.code == p.BAD_REQUEST and info.value.fatal
    assert info.value.message == "attachments must be a list of at most 256 byte sizes (integers >= 0)"


def test_256_attachments_are_fine():
    reader = c.FrameReader()
    reader.feed(p.encode_frame({"attachments": [1] * 256}) + bytes(range(256)))
    [frame] = reader.frames()
    assert [int(block[0]) for block in frame.attachments] == list(range(256))


def test_more_than_16_descriptors_are_closed_on_arrival_and_the_frame_says_so():
    fds = [memfd() for _ in range(20)]
    reader = c.FrameReader()
    reader.feed(p.encode_frame({"action": "register_buffer", "fds": 16}), fds)
    assert reader.held_fds == 16
    for fd in fds[16:]:
        with pytest.raises(OSError):
            os.fstat(fd)
    [frame] = reader.frames()
    assert len(frame.fds) == 16 and frame.fds_truncated
    with pytest.raises(p.RequestError) as info:
        c.check_fds(frame.message, len(frame.fds), frame.fds_truncated)
    assert info.value.message == "More than 16 file descriptors sent with one frame" and not info.value.fatal
    c.close_fds(frame.fds)


def test_descriptors_against_the_declared_count():
    with pytest.raises(p.RequestError) as info:
        c.check_fds({"fds": 1}, 2, False)
    assert info.value.message == "Frame declares fds: 1 but 2 file descriptor(s) came with it"
    with pytest.raises(p.RequestError) as info:
        c.check_fds({"fds": 17}, 0, False)
    assert info.value.message == "fds must be an integer from 0 to 16"
    c.check_fds({"fds": 2}, 2, False)


def test_a_v1_reader_refuses_attachments_and_descriptors():
    reader = c.FrameReader(v2=False)
    reader.feed(v2_frame({"x": A}))
    with pytest.raises(p.RequestError) as info:
        reader.frames()
    assert info.value.fatal and info.value.message == ("attachments need protocol 2 (send hello first); "
                                                       "closing the connection")
    fd = memfd()
    reader = c.FrameReader(v2=False)
    reader.feed(p.encode_frame({"action": "ping"}), [fd])
    with pytest.raises(p.RequestError) as info:
        reader.frames()
    assert info.value.message == "File descriptors need protocol 2 (send hello first); closing the connection"
    with pytest.raises(OSError):
        os.fstat(fd)   # closed


def test_admit_fds_may_refuse_descriptors_which_are_closed():
    asked = []
    reader = c.FrameReader(admit_fds=lambda count: asked.append(count) or False)
    fd = memfd()
    reader.feed(p.encode_frame({"fds": 1}), [fd])
    [frame] = reader.frames()
    assert asked == [1] and frame.fds == [] and frame.fds_truncated
    with pytest.raises(OSError):
        os.fstat(fd)


def test_close_closes_the_descriptors_held():
    fd = memfd()
    reader = c.FrameReader()
    reader.feed(p.encode_frame({"fds": 1})[:5], [fd])   # a frame not yet whole
    reader.close()
    with pytest.raises(OSError):
        os.fstat(fd)


# ---------------------------------------------------------------- descriptors and frames

def test_descriptors_go_to_the_frame_their_read_ended_in():
    one, two, three = (p.encode_frame({"n": n, "fds": 1}) for n in (1, 2, 3))
    fd1, fd2, fd3 = memfd(b"one"), memfd(b"two"), memfd(b"three")
    reader = c.FrameReader()
    reader.feed(one, [fd1])                     # ends exactly at frame 1's end
    reader.feed(two + three[:3], [fd2])         # wrong on purpose: a read ending in frame 3 carries fd2
    reader.feed(three[3:], [fd3])
    frames = reader.frames()
    assert [f.message["n"] for f in frames] == [1, 2, 3]
    assert [[contents(fd) for fd in f.fds] for f in frames] == [[b"one"], [], [b"two", b"three"]]
    for frame in frames:
        c.close_fds(frame.fds)


def test_frames_read_in_one_go_keep_their_own_descriptors():
    """As SocketStream reads ahead: a small frame and the start of the next in one
    read, whose descriptors (sent with the next frame's first byte) come with the
    next read."""
    first, second = p.encode_frame({"n": 1}), p.encode_frame({"n": 2, "fds": 1})
    fd = memfd(b"second")
    data = first + second
    frames = frames_of(by_want_and_got(c.FrameReader(), data, fds_at={len(first): [fd]}))
    assert [f.message["n"] for f in frames] == [1, 2]
    assert frames[0].fds == [] and [contents(fd) for fd in frames[1].fds] == [b"second"]
    c.close_fds(frames[1].fds)


# ---------------------------------------------------------------- any split

messages = st.fixed_dictionaries({"action": st.sampled_from(["ping", "infer", "status"])},
                                 optional={"request_id": st.integers(0, 10 ** 6) | st.text(max_size=8),
                                           "text": st.text(max_size=40)})
arrays = st.lists(st.binary(max_size=300).map(lambda raw: np.frombuffer(raw, np.uint8)), max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(messages, arrays), min_size=1, max_size=5),
       cuts=st.lists(st.integers(0, 5000), max_size=8), junk=st.binary(max_size=3),
       chunk=st.integers(1, 64), drive=st.sampled_from(["feed", "want"]))
def test_any_split_of_a_stream_decodes_to_the_same_frames(batch, cuts, junk, chunk, drive):
    stream = b""
    expected = []
    for message, blocks in batch:
        full = dict(message, blocks=blocks) if blocks else dict(message)
        stream += wire_bytes(c.encode(full)[0])
        expected.append((message, [bytes(block) for block in blocks]))
    data = stream + junk
    reader = c.FrameReader(chunk_bytes=chunk)
    if drive == "feed":
        frames, start = [], 0
        for cut in sorted({min(cut, len(data)) for cut in cuts}) + [len(data)]:
            reader.feed(data[start:cut])
            frames += reader.frames()
            start = cut
    else:
        step = max(1, (cuts or [7])[0] % 97)
        frames = frames_of(by_want_and_got(reader, data, step=step))
    got = []
    for frame in frames:
        message = {k: v for k, v in frame.message.items() if k not in ("blocks", "attachments")}
        got.append((message, [bytes(block) for block in frame.attachments]))
    assert got == expected
    assert reader.pending == len(junk) and reader.mid_frame == bool(junk)   # a frame still to come


def test_the_codec_imports_no_asyncio():
    code = "import sys, hailo_devmgr.wire.codec; assert 'asyncio' not in sys.modules, 'asyncio imported'"
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
