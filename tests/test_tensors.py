"""v1 tensors: round trip, and every malformed tensor named in the error."""
import base64

import numpy as np
import pytest

from hailo_devmgr.wire import tensors
from hailo_devmgr.wire.protocol import BAD_REQUEST, RequestError


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64"])
def test_round_trip_keeps_dtype_shape_and_bytes(dtype):
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    encoded = tensors.encode_v1(array)
    assert encoded["dtype"] == dtype and encoded["shape"] == [2, 3, 4]
    decoded = tensors.decode_v1(encoded)
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)


def test_non_contiguous_arrays_are_sent_in_c_order():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4).T
    assert np.array_equal(tensors.decode_v1(tensors.encode_v1(array)), array)


def _tensor(**changes):
    base = {"dtype": "uint8", "shape": [2, 2], "data_b64": base64.b64encode(bytes(4)).decode()}
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


@pytest.mark.parametrize("value, text", [
    ({"dtype": "uint8", "shape": [1]}, "tensor must include dtype, shape, and data_b64"),
    ("not a tensor", "tensor must include dtype, shape, and data_b64"),
    (_tensor(dtype="object"), "dtype must be one of"),
    (_tensor(dtype=7), "dtype must be one of"),
    (_tensor(shape=[-1, 4]), "shape sizes must be integers >= 0"),
    (_tensor(shape=[2, 2.5]), "shape sizes must be integers >= 0"),
    (_tensor(shape="2x2"), "shape must be a list"),
    (_tensor(shape=[1] * 9), "shape must be a list of at most 8"),
    (_tensor(shape=[2**31, 2**31]), "over the limit"),
    # Empty, yet numpy cannot hold the shape (its ValueError was an internal_error).
    (_tensor(shape=[0, 2**26, 2**26, 2**26], data_b64=""), "(in a shape with a size 0, the other sizes count)"),
    (_tensor(shape=[0, 10**4000, 10**4000], data_b64=""), "over the limit"),
    (_tensor(dtype="x" * 10**6), "got 'xxxxxx"),
    (_tensor(shape=[3, 2]), "data has 4 bytes but dtype uint8 and shape [3, 2] need 6"),
    (_tensor(data_b64="@@@@"), "not valid base64"),
    (_tensor(data_b64=123), "data_b64 must be a base64 string"),
])
def test_bad_tensors_are_bad_requests_naming_the_problem(value, text):
    with pytest.raises(RequestError) as info:
        tensors.decode_v1(value, where="input_data.image")
    assert info.value.code == BAD_REQUEST
    assert text in info.value.message


def test_element_limit_is_configurable():
    with pytest.raises(RequestError, match="over the limit of 3"):
        tensors.decode_v1(_tensor(), max_elements=3)


def test_results_encode_nested_arrays_and_decode_back():
    result = {"outputs": {"a": np.ones((2,), np.float32)}, "list": [np.zeros(1, np.uint8)], "n": np.int64(3)}
    encoded = tensors.encode_results(result)
    assert encoded["n"] == 3 and encoded["outputs"]["a"]["dtype"] == "float32"
    decoded = tensors.decode_results(encoded)
    assert np.array_equal(decoded["outputs"]["a"], result["outputs"]["a"])
    assert decoded["list"][0].dtype == np.uint8


def test_a_shape_numpy_cannot_hold_is_refused_wherever_it_is_checked():
    """check_shape is what attachment, shm and buffer references use too."""
    for shape in ([0, 2**26, 2**26, 2**26], [2**20, 0, 2**20]):
        with pytest.raises(RequestError) as info:
            tensors.check_shape(shape, "input_data.x: ", 2**26)
        assert info.value.code == BAD_REQUEST and len(info.value.message) < 300
    assert tensors.check_shape([0, 2**26], "", 2**26) == (0, 2**26)
    assert tensors.decode_v1(_tensor(shape=[0, 2**26], data_b64="")).shape == (0, 2**26)
