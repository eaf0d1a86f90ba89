"""What fuzzing found, kept as tests.

Every file in tests/fuzz_regressions/ is replayed through the same path the
fuzzers drive (fuzz/harness.py ``fuzz_one``): it must end in answers, never
in another exception. ``known-*`` files are bugs in modules outside this
work (harness.KNOWN_ISSUES): strict xfails until fixed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fuzz_support import harness
from hailo_devmgr.daemon import model_files
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.wire import tensors
from hailo_devmgr.daemon.handlers import HANDLERS, InputLimits

CASES = Path(__file__).resolve().parent / "fuzz_regressions"
KNOWN = {issue.name: issue for issue in harness.KNOWN_ISSUES}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return harness.make_model_dir(str(tmp_path_factory.mktemp("fuzz-regressions")))


def cases():
    for path in sorted(CASES.glob("*.bin")):
        marks = []
        if path.name.startswith("known-"):
            issue = KNOWN[path.stem.removeprefix("known-")]
            marks.append(pytest.mark.xfail(strict=True, raises=issue.exception,
                                           reason=f"known issue in {issue.where}: {issue.what}"))
        yield pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("case", cases())
def test_replayed_input_ends_in_well_formed_answers(case, paths):
    data = case.read_bytes().replace(b"@MODELS@", paths["models"].encode())
    config = harness.fuzz_config(paths["models"], max_message_bytes=1 << 20)
    responses = harness.fuzz_one(data, config)
    assert responses
    for response in responses:
        assert ("status" in response) != ("error" in response), response
        if "error" in response:
            assert response["code"] in (p.BAD_REQUEST, p.UNKNOWN_ACTION, p.UNSUPPORTED_MODEL_TYPE,
                                        p.FORBIDDEN, p.MODEL_NOT_FOUND, p.TOO_LARGE), response


def test_every_known_issue_has_a_replay_file():
    assert {path.stem.removeprefix("known-") for path in CASES.glob("known-*.bin")} == set(KNOWN)


def test_lone_surrogate_paths_are_bad_requests_not_encoding_errors():
    for path in ("/models/\ud800.hef", "/\udfff"):
        with pytest.raises(p.RequestError) as info:
            model_files.resolve_model_path(path, ("/models",))
        assert (info.value.code, info.value.message) == (p.BAD_REQUEST, "model_path is not a valid path")
        with pytest.raises(p.RequestError) as info:
            model_files.open_model(path, ("/models",))
        assert info.value.code == p.BAD_REQUEST


def test_a_path_changing_while_it_resolves_is_not_found_not_an_internal_error(tmp_path, monkeypatch):
    """os.path.realpath raises EINVAL when a link is replaced by a file between
    its lstat and its readlink (found by the flip test in test_model_fds.py)."""
    (tmp_path / "m.hef").write_text("x")

    def racing(path, *args, **kwargs):
        raise OSError(22, "Invalid argument", path)
    monkeypatch.setattr(model_files.os.path, "realpath", racing)
    for call in (model_files.resolve_model_path, model_files.open_model):
        with pytest.raises(p.RequestError) as info:
            call(str(tmp_path / "m.hef"), (str(tmp_path),))
        assert info.value.code == p.MODEL_NOT_FOUND


def test_whisper_audio_beyond_the_float_range_is_a_bad_request():
    with pytest.raises(p.RequestError) as info:
        HANDLERS["whisper"].parse_input({"audio": [0.1, 10 ** 400]}, InputLimits())
    assert info.value.code == p.BAD_REQUEST and "beyond the float range" in info.value.message
    with pytest.raises(p.RequestError) as info:
        HANDLERS["whisper"].parse_input({"audio": [0.1, 1e300]}, InputLimits())  # finite as float64
    assert "got a peak of 1e+300" in info.value.message
    audio = HANDLERS["whisper"].parse_input({"audio": [0.25, -1, 1]}, InputLimits())["audio"]
    assert audio.dtype == np.float32 and audio.tolist() == [0.25, -1.0, 1.0]


def test_a_zero_dimensional_tensor_keeps_its_shape():
    wire = tensors.encode_v1(np.array(3.5, np.float32))
    assert wire["shape"] == [] and tensors.decode_v1(wire).shape == ()


def test_fuzz_files_are_small():
    assert all(os.path.getsize(path) < 64 * 1024 for path in CASES.glob("*.bin"))
