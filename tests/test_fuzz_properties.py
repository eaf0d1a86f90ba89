"""Property-based fuzzing of everything a client's bytes reach before the device.

Framing (parse_length, the codec's FrameReader), bodies (decode_body), envelopes
(parse_request), v1 tensors (decode_v1), and for every model type the
handler's check_params and parse_input, and actions.prepare with a model
folder of its own. The one rule: a client can only cause a RequestError
(with a known code and a message), and every answer can be encoded.
Bugs already found in modules outside this work are listed in
fuzz/harness.py KNOWN_ISSUES (counted with hypothesis.event, and kept as
strict xfails in test_fuzz_regressions.py).

Example counts are modest (see fuzz_support.py); ``make fuzz`` runs the
long profile.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fuzz_support import FUZZ, MODEL_TYPES, dumps, harness, input_data, json_values, model_params, request_bodies
from fuzz_support import tensor_like
from hailo_devmgr.daemon import actions
from hailo_devmgr.wire import codec
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.wire import tensors
from hailo_devmgr.daemon.handlers import HANDLERS, InputLimits
from hailo_devmgr.daemon.model_files import resolve_model_path

CODES = {value for name, value in vars(p).items() if name.isupper() and isinstance(value, str)
         and name not in ("DEFAULT_MODEL_TYPE",)}
LIMITS = InputLimits(max_tensor_elements=4096)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return harness.make_model_dir(str(tmp_path_factory.mktemp("fuzz-models")))


@pytest.fixture(scope="module")
def config(paths):
    return harness.fuzz_config(paths["models"], max_message_bytes=64 * 1024)


def only_request_errors(call):
    """``call()``'s result, or the RequestError it raised (checked); any other exception fails,
    except the listed known issues, which are counted."""
    try:
        return call()
    except p.RequestError as error:
        assert error.code in CODES, error.code
        assert isinstance(error.message, str) and error.message
        p.encode_frame(p.error_response(None, error))  # the answer can be sent
        return error
    except Exception as exc:
        issue = harness.known_issue(exc)
        if issue is None:
            raise
        event(f"known issue {issue.name}")
        return None


finite_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)
messages = st.dictionaries(st.text(max_size=8), finite_json, max_size=4)


# ------------------------------------------------------------------ framing

@FUZZ(200)
@given(header=st.binary(min_size=4, max_size=4), limit=st.integers(0, 2 ** 33))
def test_parse_length_takes_any_header(header, limit):
    result = only_request_errors(lambda: p.parse_length(header, limit))
    if isinstance(result, p.RequestError):
        assert result.code == p.TOO_LARGE and result.fatal
        assert int.from_bytes(header, "big") > limit
    else:
        assert result == int.from_bytes(header, "big") <= limit


@FUZZ(100)
@given(batch=st.lists(messages, max_size=5), cuts=st.lists(st.integers(0, 10_000), max_size=6),
       junk=st.binary(max_size=3))
def test_frames_survive_any_split_and_keep_trailing_bytes(batch, cuts, junk):
    stream = b"".join(p.encode_frame(message) for message in batch)
    data = stream + junk
    reader = codec.FrameReader(decode=False)
    bodies, start = [], 0
    for cut in sorted({min(cut, len(data)) for cut in cuts}) + [len(data)]:
        reader.feed(data[start:cut])
        bodies += [frame.body for frame in reader.frames()]
        start = cut
    assert [json.loads(body) for body in bodies] == batch
    assert reader.pending == len(junk)


@FUZZ(200)
@given(data=st.binary(max_size=300), limit=st.integers(0, 64), cuts=st.lists(st.integers(0, 300), max_size=4))
def test_decoder_takes_any_bytes(data, limit, cuts):
    reader = codec.FrameReader(limit, decode=False)
    start = 0
    for cut in sorted({min(cut, len(data)) for cut in cuts}) + [len(data)]:
        reader.feed(data[start:cut])
        result = only_request_errors(reader.frames)
        start = cut
        if isinstance(result, p.RequestError):
            assert result.code in (p.TOO_LARGE, p.BAD_REQUEST) and result.fatal
            return
        assert all(frame.size <= limit for frame in result)
    assert reader.pending < p.HEADER_SIZE + limit


nested = st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth)
long_int = st.integers(4000, 5000).map(lambda digits: b'{"action":"ping","n":' + b"7" * digits + b"}")
bodies = st.one_of(st.binary(max_size=200), json_values.map(dumps), nested, long_int,
                   st.text(max_size=50).map(lambda text: text.encode("utf-8", "surrogatepass")))


@FUZZ(300)
@given(body=bodies)
def test_decode_body_takes_any_bytes(body):
    result = only_request_errors(lambda: p.decode_body(body))
    if isinstance(result, p.RequestError):
        assert result.code == p.BAD_REQUEST
    elif result is not None:
        assert isinstance(result, dict)


@FUZZ(300)
@given(message=st.one_of(st.dictionaries(st.sampled_from(["action", "request_id", "x"]), json_values),
                         st.dictionaries(st.text(max_size=8), json_values)),
       action=st.one_of(st.sampled_from(sorted(p.ACTIONS)), json_values))
def test_parse_request_takes_any_object_and_its_answer_encodes(message, action):
    if "action" not in message and action is not None:
        message["action"] = action

    def parse_and_answer():
        request = p.parse_request(message)
        p.encode_frame(p.ok_response(request, {}))
        return request
    result = only_request_errors(parse_and_answer)
    if isinstance(result, p.RequestError):
        assert result.code in (p.BAD_REQUEST, p.UNKNOWN_ACTION)
        only_request_errors(lambda: p.encode_frame(p.error_response(
            p.Request("", {}, *p.request_id_of(message)), result)))
    elif result is not None:
        assert result.action in p.ACTIONS


# ------------------------------------------------------------------ tensors

@FUZZ(300)
@given(value=tensor_like, limit=st.sampled_from([0, 1, 64, 4096, tensors.DEFAULT_MAX_ELEMENTS]))
def test_decode_v1_takes_any_value(value, limit):
    result = only_request_errors(lambda: tensors.decode_v1(value, max_elements=limit))
    if isinstance(result, np.ndarray):
        assert result.dtype.name in tensors.ALLOWED_DTYPES
        assert list(result.shape) == value["shape"] and result.size <= limit
        assert not result.flags.writeable  # inputs are read-only views of the request
    elif isinstance(result, p.RequestError):
        assert result.code == p.BAD_REQUEST


@FUZZ(100)
@given(array=hnp.arrays(st.sampled_from(sorted(tensors.ALLOWED_DTYPES)).map(np.dtype),
                        hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)))
def test_tensors_round_trip(array):
    # ndim >= 1: a 0-d array comes back as shape [1] (see test_fuzz_regressions.py).
    wire = json.loads(json.dumps(tensors.encode_v1(array)))
    back = tensors.decode_v1(wire)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == np.ascontiguousarray(array).tobytes()


# ------------------------------------------------------------------ handlers and actions

@pytest.mark.parametrize("model_type", MODEL_TYPES)
@FUZZ(60)
@given(data=st.data())
def test_parse_input_of_every_model_type(model_type, data):
    value = data.draw(input_data(model_type))
    result = only_request_errors(lambda: HANDLERS[model_type].parse_input(value, LIMITS))
    if isinstance(result, p.RequestError):
        assert result.code == p.BAD_REQUEST


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@FUZZ(40)
@given(data=st.data())
def test_check_params_of_every_model_type_and_it_accepts_its_own_output(model_type, data, paths, config):
    params = data.draw(model_params(model_type, paths))
    if not isinstance(params, dict):
        return  # actions.optional_object refuses it before check_params
    handler = HANDLERS[model_type]

    def resolve(path, key):
        return resolve_model_path(path, config.model_dirs, f"model_params.{key}")
    checked = only_request_errors(lambda: handler.check_params(params, resolve))
    if isinstance(checked, dict):
        # At load time the registry runs it again on its own output (with an opener).
        assert handler.check_params(checked, resolve) == checked


@pytest.mark.parametrize("action", sorted(p.DEVICE_ACTIONS))
@FUZZ(150)
@given(data=st.data())
def test_prepare_every_device_action(action, data, paths, config):
    body = data.draw(request_bodies(paths))
    body["action"] = action
    request = p.Request(action, body, *p.request_id_of(body))
    result = only_request_errors(lambda: actions.prepare(request, config))
    if isinstance(result, actions.DeviceRequest) and action != "unload_model":
        assert result.spec.real_path.startswith(paths["models"] + "/")  # never a file outside


@FUZZ(150)
@given(data=st.data())
def test_whole_request_path_from_bytes(data, paths, config):
    frames = data.draw(st.lists(st.one_of(
        request_bodies(paths).map(dumps),
        bodies,
        st.just(b"\x00" * 3)), max_size=4))
    stream = b"".join(len(body).to_bytes(4, "big") + body for body in frames)
    if data.draw(st.booleans()):
        stream += data.draw(st.binary(max_size=8))  # a torn or oversized last frame
    split = data.draw(st.integers(0, len(stream)))
    responses = only_request_errors(lambda: harness.feed(stream, config, split))
    for response in responses or ():
        assert ("status" in response) != ("error" in response)


# ------------------------------------------------------------------ JSON as the stdlib has it
# protocol.py's one-shot encoder and object scan are shortcuts, never another dialect.

@FUZZ(200)
@given(message=st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_bodies_are_written_and_read_as_the_stdlib_writes_and_reads_them(message):
    try:
        expected = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as error:   # NaN or an infinity somewhere: refused alike
        with pytest.raises(ValueError) as ours:
            p.encode_json(message)
        assert str(ours.value) == str(error)
        return
    assert p.encode_json(message) == expected
    assert p.decode_body(expected) == message


@FUZZ(300)
@given(text=st.one_of(st.text(max_size=30), st.sampled_from(
    ['{"a":1}', ' {"a":1}', '{"a":1} ', '{"a":1}x', '{"a":1}{"b":2}', '{"a":}', '{"a":NaN}', '{"a":1,}',
     '{', '}', '[1]', '{"a":"\\ud800"}'])))
def test_bodies_are_read_as_json_loads_reads_them(text):
    assume(all(not "\ud800" <= char <= "\udfff" for char in text))   # not UTF-8: refused before JSON
    try:
        expected = json.loads(text, parse_constant=p._not_json)
    except ValueError as error:
        with pytest.raises(p.RequestError) as refused:
            p.decode_body(text.encode())
        assert refused.value.code == p.BAD_REQUEST
        if isinstance(error, json.JSONDecodeError):
            assert refused.value.message == f"Invalid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        return
    if isinstance(expected, dict):
        assert p.decode_body(text.encode()) == expected
    else:
        with pytest.raises(p.RequestError):
            p.decode_body(text.encode())
