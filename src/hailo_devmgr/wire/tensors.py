"""Tensors on the wire.

v1: ``{"dtype": "uint8", "shape": [h, w, 3], "data_b64": "<base64>"}``,
C-order bytes, dtype named as numpy names it. Shared by the daemon and the
client library, so both sides agree on every check.
"""
from __future__ import annotations

import binascii
import math
from typing import Any

import numpy as np

from .protocol import BAD_REQUEST, RequestError, shown

# v1 text: existing clients match on it.
MISSING_TENSOR_FIELDS = "tensor must include dtype, shape, and data_b64"

# Numeric dtypes a tensor may have; anything else (object, str, void) is refused.
ALLOWED_DTYPES = frozenset({
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64", "bool",
})
MAX_DIMENSIONS = 8
DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024


class DecodedTensor(dict):
    """A protocol v2 tensor (attachment or shared memory), already checked and
    in memory. A dict with ``dtype`` and ``shape`` (so code that looks for a
    tensor dict accepts it); :func:`decode_v1` returns its ``array``."""

    def __init__(self, array: np.ndarray):
        super().__init__(dtype=array.dtype.name, shape=list(array.shape))
        self.array = array


def is_v1_tensor(value: Any) -> bool:
    return isinstance(value, dict) and "data_b64" in value


def check_dtype(name: Any, where: str) -> np.dtype:
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        allowed = ", ".join(sorted(ALLOWED_DTYPES))
        raise RequestError(BAD_REQUEST, f"{where}dtype must be one of {allowed}, got {shown(name)}")
    return _DTYPES[name]


# numpy's dtype(name) and dtype.name take microseconds each: looked up once per tensor otherwise.
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def dtype_name(dtype: np.dtype) -> str:
    return _DTYPE_NAMES.get(dtype) or dtype.name


def check_shape(shape: Any, where: str, max_elements: int) -> tuple[int, ...]:
    """A client's shape, checked before any array is made with it (by reshape,
    frombuffer or empty): every defect a ``bad_request``, never numpy's ValueError."""
    if type(shape) is list and len(shape) <= MAX_DIMENSIONS:
        elements = 1   # the usual shape, in one pass; any doubt takes the checks below
        for size in shape:
            if type(size) is not int or size < 0:
                break
            elements *= size or 1
        else:
            if elements <= max_elements:
                return tuple(shape)
    if not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS:
        raise RequestError(BAD_REQUEST, f"{where}shape must be a list of at most {MAX_DIMENSIONS} sizes")
    if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape):
        raise RequestError(BAD_REQUEST, f"{where}shape sizes must be integers >= 0, got {shown(shape)}")
    # numpy sizes an array by its sizes other than 0 even when it holds no
    # element, and refuses those past its index range: bound them as elements.
    # (The product is not shown: past 4300 digits, str() of it raises.)
    if math.prod(size for size in shape if size) > max_elements:
        empty = " (in a shape with a size 0, the other sizes count)" if 0 in shape else ""
        raise RequestError(BAD_REQUEST, f"{where}shape {shown(shape)} is over the limit of {max_elements} "
                                        f"elements{empty}")
    return tuple(shape)


def decode_v1(value: Any, where: str = "tensor", max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """A v1 tensor dict → read-only ndarray. Every defect is a ``bad_request``."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, DecodedTensor):
        check_shape(list(value.array.shape), prefix, max_elements)
        return value.array
    if not isinstance(value, dict) or "dtype" not in value or "shape" not in value or "data_b64" not in value:
        # Exactly the v1 text (clients match on it); the field goes beside it.
        raise RequestError(BAD_REQUEST, MISSING_TENSOR_FIELDS, field=where or "tensor")
    dtype = check_dtype(value["dtype"], prefix)
    shape = check_shape(value["shape"], prefix, max_elements)
    data = value["data_b64"]
    if not isinstance(data, str):
        raise RequestError(BAD_REQUEST, f"{prefix}data_b64 must be a base64 string")
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)   # base64.b64decode(validate=True), less a copy
    except (binascii.Error, ValueError):
        raise RequestError(BAD_REQUEST, f"{prefix}data_b64 is not valid base64")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise RequestError(
            BAD_REQUEST,
            f"{prefix}data has {len(raw)} bytes but dtype {dtype.name} and shape {list(shape)} "
            f"need {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def encode_v1(array: np.ndarray) -> dict:
    """ndarray → v1 tensor dict (C order)."""
    array = np.asarray(array)
    if array.ndim:  # ascontiguousarray would turn a 0-d array into shape [1]
        array = np.ascontiguousarray(array)
    return {
        "dtype": dtype_name(array.dtype),
        "shape": list(array.shape),
        "data_b64": binascii.b2a_base64(array.data, newline=False).decode("ascii"),   # = base64.b64encode
    }


def encode_results(value: Any) -> Any:
    """Replace every ndarray inside a result (dicts, lists) by its v1 form."""
    if isinstance(value, np.ndarray):
        return encode_v1(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: encode_results(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_results(item) for item in value]
    return value


def decode_results(value: Any) -> Any:
    """The client's inverse of :func:`encode_results`."""
    if is_v1_tensor(value) and "dtype" in value and "shape" in value:
        return decode_v1(value, where="result")
    if isinstance(value, dict):
        return {key: decode_results(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_results(item) for item in value]
    return value
