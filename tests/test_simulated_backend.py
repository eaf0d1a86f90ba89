"""The simulated backend imitates hailo_platform closely enough for handlers.

No timing assertions: latency is checked through a fake ``backend.sleep``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hailo_devmgr.daemon import hailort_status
from hailo_devmgr.daemon.backends import BackendUnavailable
from hailo_devmgr.daemon.backends import simulated as sim
from hailo_devmgr.daemon.backends.simulated import SimulatedBackend, raw_status_error, status_error
from hailo_devmgr.daemon.config import DeviceConfig, SimulatedConfig
from hailo_devmgr.wire.protocol import RequestError

CLIP_YAML = """\
inputs:
  - {name: image, shape: [32, 32, 3], format: UINT8}
  - {name: mask, shape: [32, 32], format: UINT16}
outputs:
  - {name: embedding, shape: [16], format: FLOAT32}
  - {name: depth, shape: [8, 8, 1], format: UINT8}
memory_mb: 100
"""


def make_backend(tmp_path, group_id="UNIQUE", **overrides):
    settings = SimulatedConfig(load_ms=0, infer_ms=0, lock_path=str(tmp_path / "lock"), **overrides)
    return SimulatedBackend(settings, DeviceConfig(group_id=group_id))


@pytest.fixture
def backend(tmp_path):
    return make_backend(tmp_path)


@pytest.fixture
def vdevice(backend):
    opened = backend.open_vdevice()
    yield opened
    opened.release()


@pytest.fixture
def model_file(tmp_path):
    """Writes a simulated HEF and returns its path."""
    def write(name="model.hef", content=b"\x89HEF binary-ish content"):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)
    return write


def infer_once(configured, image):
    bindings = configured.create_bindings()
    bindings.input().set_buffer(image)
    configured.run([bindings], 1000)
    return bindings.output().get_buffer()


def image(seed=0, shape=(224, 224, 3)):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ------------------------------------------------------------------ VDevice

def test_create_params_have_hailort_defaults(backend):
    params = backend.platform.VDevice.create_params()
    assert params.device_count == 1
    assert params.device_ids == []
    assert params.scheduling_algorithm == 1 and type(params.scheduling_algorithm) is int
    assert params.group_id == "UNIQUE"
    assert params.multi_process_service is False
    params.scheduling_algorithm = sim.HailoSchedulingAlgorithm.NONE
    assert params.scheduling_algorithm == 0


def test_vdevice_basics(backend):
    with backend.open_vdevice() as vdevice:
        assert vdevice.get_physical_devices_ids() == ["0001:01:00.0"]
        identity = backend.identify(vdevice)
        assert identity.architecture == "HAILO10H"
        assert identity.fw_version == "5.3.0 (simulated)"
        assert backend.temperature(vdevice) == 53.0
        backend.set_temperature(71.5)
        assert backend.temperature(vdevice) == 71.5
    vdevice.release()  # safe twice
    with pytest.raises(sim.HailoRTException):
        vdevice.get_physical_devices_ids()


def test_multi_process_service_is_rejected_on_10h(backend):
    params = backend.platform.VDevice.create_params()
    params.multi_process_service = True
    with pytest.raises(sim.HailoRTInvalidOperationException) as caught:
        backend.platform.VDevice(params)
    assert hailort_status.status_of(caught.value) == hailort_status.INVALID_OPERATION


# ------------------------------------------------------------- exclusivity

def test_second_unique_vdevice_gets_74(backend, vdevice):
    with pytest.raises(sim.HailoRTException) as caught:
        backend.platform.VDevice()
    assert str(caught.value) == "libhailort failed with error: 74 (HAILO_OUT_OF_PHYSICAL_DEVICES)"
    assert hailort_status.status_of(caught.value) == 74


def test_open_vdevice_reports_owner_elsewhere(tmp_path, vdevice):
    other = make_backend(tmp_path)  # e.g. a second daemon on the same lock
    with pytest.raises(BackendUnavailable, match=r"owned by another process \(.*HAILO_OUT_OF_PHYSICAL_DEVICES"):
        other.open_vdevice()
    vdevice.release()
    other.close_vdevice(other.open_vdevice())


def test_lock_held_by_another_process_gets_74(backend, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX);"
         " print('locked', flush=True); sys.stdin.read()", str(tmp_path / "lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BackendUnavailable, match="owned by another process"):
            backend.open_vdevice()
    finally:
        holder.stdin.close()
        holder.wait()
    backend.open_vdevice().release()


def test_shared_group_takes_no_lock(tmp_path):
    shared = make_backend(tmp_path, group_id="SHARED")
    first, second = shared.open_vdevice(), shared.open_vdevice()
    first.release()
    second.release()


# ------------------------------------------------------------ model files

def test_default_network_shapes(backend, vdevice, model_file):
    model = vdevice.create_infer_model(model_file())
    fmt = backend.platform.FormatType
    assert model.input_names == ["input_layer1"]
    assert model.output_names == ["output_layer1"]
    assert model.input().shape == [224, 224, 3]
    assert model.input().format.type == fmt.UINT8
    assert model.output().shape == [512]
    assert model.output().format.type == fmt.FLOAT32
    assert [s.name for s in model.inputs] == ["input_layer1"]
    with model.configure():
        assert backend.memory_used_mb() == 512


def test_yaml_described_network(backend, vdevice, model_file):
    model = vdevice.create_infer_model(model_file(content=CLIP_YAML))
    fmt = backend.platform.FormatType
    assert model.input_names == ["image", "mask"]
    assert model.output_names == ["embedding", "depth"]
    assert model.input("mask").shape == [32, 32]
    assert model.input("mask").format.type == fmt.UINT16
    assert model.output("depth").format.type == fmt.UINT8
    with model.configure() as configured:
        assert backend.memory_used_mb() == 100
        bindings = configured.create_bindings(input_buffers={
            "image": image(shape=(32, 32, 3)), "mask": np.zeros((32, 32), np.uint16)})
        configured.run([bindings], 1000)
        assert bindings.output("embedding").get_buffer().shape == (16,)
        depth = bindings.output("depth").get_buffer()
        assert depth.shape == (8, 8, 1) and depth.dtype == np.uint8


def test_model_from_bytes(vdevice):
    model = vdevice.create_infer_model(CLIP_YAML.encode())
    assert model.input_names == ["image", "mask"]


def test_missing_file_is_open_file_failure(backend, vdevice, tmp_path):
    with pytest.raises(sim.HailoRTException) as caught:
        vdevice.create_infer_model(str(tmp_path / "absent.hef"))
    assert str(caught.value) == "libhailort failed with error: 13 (HAILO_OPEN_FILE_FAILURE)"
    assert hailort_status.status_of(caught.value) == 13


@pytest.mark.parametrize("content", [b"", "inputs: [{name: x, shape: [0]}]\n"])
def test_empty_or_bad_model_is_invalid_hef(backend, vdevice, model_file, content):
    with pytest.raises(sim.HailoRTInvalidHEFException) as caught:
        vdevice.create_infer_model(model_file(content=content))
    assert hailort_status.status_of(caught.value) == 26
    assert caught.value.__cause__.args[0] == "26"


# ------------------------------------------------------------- inference

def test_outputs_are_deterministic_and_input_dependent(tmp_path, vdevice, model_file):
    path = model_file()
    with vdevice.create_infer_model(path).configure() as configured:
        first = infer_once(configured, image(1))
        again = infer_once(configured, image(1))
        other = infer_once(configured, image(2))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32
    assert np.isclose(np.linalg.norm(first), 1.0, atol=1e-5)
    # Same file content, new VDevice: same answer.
    vdevice.release()
    fresh = make_backend(tmp_path).open_vdevice()
    with fresh.create_infer_model(path).configure() as configured:
        assert np.array_equal(infer_once(configured, image(1)), first)
    fresh.release()


def test_different_models_give_different_outputs(vdevice, model_file):
    results = []
    for name in ("a.hef", "b.hef"):
        with vdevice.create_infer_model(model_file(name, f"weights of {name}".encode())).configure() as c:
            results.append(infer_once(c, image(1)))
    assert not np.array_equal(*results)


def test_caller_output_buffer_is_filled_in_place(vdevice, model_file):
    with vdevice.create_infer_model(model_file()).configure() as configured:
        expected = infer_once(configured, image(3))
        out = np.zeros(512, np.float32)
        bindings = configured.create_bindings(input_buffers={"input_layer1": image(3)},
                                              output_buffers={"output_layer1": out})
        configured.run([bindings], 1000)
    assert bindings.output().get_buffer() is out
    assert np.array_equal(out, expected)


def test_set_format_type_changes_the_buffer_dtype(backend, vdevice, model_file):
    fmt = backend.platform.FormatType
    model = vdevice.create_infer_model(model_file())
    model.input().set_format_type(fmt.FLOAT32)
    model.output().set_format_type(fmt.UINT8)
    with model.configure() as configured:
        out = infer_once(configured, image(1).astype(np.float32))
    assert out.dtype == np.uint8
    model.input().set_format_type(fmt.AUTO)
    assert model.input().format.type == fmt.UINT8


def test_non_contiguous_buffer_is_refused(backend, vdevice, model_file):
    with vdevice.create_infer_model(model_file()).configure() as configured:
        bindings = configured.create_bindings()
        wide = np.zeros((224, 448, 3), np.uint8)[:, ::2]
        with pytest.raises(sim.HailoRTException) as caught:
            bindings.input().set_buffer(wide)
    assert str(caught.value) == "Buffer must be C_CONTIGUOUS"
    # pyhailort raises this one itself: no status number behind it.
    assert hailort_status.status_of(caught.value) is None


@pytest.mark.parametrize("buffer", [np.zeros((224, 224, 3), np.float32), np.zeros((10, 10, 3), np.uint8)])
def test_wrong_byte_size_fails_at_submit_and_shuts_the_model_down(backend, vdevice, model_file, buffer):
    """libhailort checks bytes when a binding is submitted (infer_model.cpp:961, v5.2.0), and a
    failed submit shuts the model down for good (infer_model.cpp:600-604)."""
    with vdevice.create_infer_model(model_file()).configure() as configured:
        bindings = configured.create_bindings()
        bindings.input().set_buffer(buffer)  # set_buffer checks contiguity only
        with pytest.raises(sim.HailoRTInvalidOperationException) as caught:
            configured.run([bindings], 1000)
        assert hailort_status.status_of(caught.value) == 6
        with pytest.raises(sim.HailoRTStreamAborted):
            infer_once(configured, image(1))


def test_float32_on_a_quantized_input_needs_set_format_type(backend, vdevice, model_file):
    model = vdevice.create_infer_model(model_file())
    with model.configure() as configured:
        bindings = configured.create_bindings()
        bindings.input().set_buffer(image(1).astype(np.float32))
        with pytest.raises(sim.HailoRTInvalidOperationException):
            configured.run([bindings], 1000)
    model.input().set_format_type(sim.FormatType.FLOAT32)
    with model.configure() as configured:
        assert infer_once(configured, image(1).astype(np.float32)).shape == (512,)


def test_run_over_more_bindings_than_the_queue_fails_82_and_kills_the_model(vdevice, model_file):
    with vdevice.create_infer_model(model_file()).configure() as configured:
        size = configured.get_async_queue_size()
        frames = [configured.create_bindings(input_buffers={"input_layer1": image(i)}) for i in range(size + 1)]
        configured.wait_for_async_ready(1000, frames_count=size)
        with pytest.raises(sim.HailoRTTimeout):
            configured.wait_for_async_ready(5, frames_count=size + 1)
        configured.run(frames[:size], 1000)  # what the queue holds is fine
        with pytest.raises(sim.HailoRTException, match=r"82 \(HAILO_QUEUE_IS_FULL\)"):
            configured.run(frames, 1000)
        with pytest.raises(sim.HailoRTStreamAborted):
            configured.run(frames[:1], 1000)


def test_without_a_scheduler_a_model_runs_only_while_activated(tmp_path, model_file):
    backend = SimulatedBackend(SimulatedConfig(load_ms=0, infer_ms=0, lock_path=str(tmp_path / "lock")),
                               DeviceConfig(scheduling_algorithm="none"))
    vdevice = backend.open_vdevice()
    first = vdevice.create_infer_model(model_file()).configure()
    second = vdevice.create_infer_model(model_file("other.hef")).configure()
    first.activate()
    with pytest.raises(sim.HailoRTInvalidOperationException):
        second.activate()  # one active network at a time
    assert infer_once(first, image(1)).shape == (512,)
    first.deactivate()
    with pytest.raises(sim.HailoRTException, match="72"):
        infer_once(second, image(1))
    backend.close_vdevice(vdevice)


def test_activate_is_refused_with_the_scheduler(vdevice, model_file):
    with vdevice.create_infer_model(model_file()).configure() as configured:
        with pytest.raises(sim.HailoRTInvalidOperationException):
            configured.activate()


def test_leading_batch_dimension_of_one_is_accepted(vdevice, model_file):
    with vdevice.create_infer_model(model_file()).configure() as configured:
        assert infer_once(configured, image(1)[np.newaxis]).shape == (512,)


def test_unknown_stream_name_is_not_found(backend, vdevice, model_file):
    model = vdevice.create_infer_model(model_file(content=CLIP_YAML))
    with pytest.raises(sim.HailoRTNotFoundException) as caught:
        model.input("nope")
    assert hailort_status.status_of(caught.value) == 61
    with pytest.raises(sim.HailoRTNotFoundException):
        model.input()  # two inputs: the name may not be omitted
    with model.configure() as configured:
        with pytest.raises(sim.HailoRTNotFoundException):
            configured.create_bindings().output("nope")


def test_run_async_calls_back_with_completion_info(vdevice, model_file):
    seen = []
    with vdevice.create_infer_model(model_file()).configure() as configured:
        configured.wait_for_async_ready(timeout_ms=1000, frames_count=1)
        bindings = configured.create_bindings(input_buffers={"input_layer1": image(1)})
        job = configured.run_async([bindings], lambda completion_info: seen.append(completion_info))
        job.wait(1000)
    assert len(seen) == 1 and seen[0].exception is None
    assert bindings.output().get_buffer().shape == (512,)


def test_run_wants_a_list_of_bindings(backend, vdevice, model_file):
    with vdevice.create_infer_model(model_file()).configure() as configured:
        bindings = configured.create_bindings(input_buffers={"input_layer1": image(1)})
        with pytest.raises(TypeError):
            configured.run(bindings, 1000)


def test_shut_down_model_cannot_run(backend, vdevice, model_file):
    configured = vdevice.create_infer_model(model_file()).configure()
    bindings = configured.create_bindings(input_buffers={"input_layer1": image(1)})
    configured.shutdown()
    with pytest.raises(sim.HailoRTStreamAborted):  # 63 HAILO_STREAM_ABORT
        configured.run([bindings], 1000)


# ---------------------------------------------------------------- latency

def test_load_and_infer_sleep_the_configured_times(tmp_path, model_file):
    backend = SimulatedBackend(SimulatedConfig(load_ms=7, infer_ms=3, lock_path=str(tmp_path / "lock")),
                               DeviceConfig())
    sleeps = []
    backend.sleep = sleeps.append
    vdevice = backend.open_vdevice()
    with vdevice.create_infer_model(model_file()).configure() as configured:
        infer_once(configured, image(1))
    vdevice.release()
    assert sleeps == [0.007, 0.003]


def test_simulate_ms_applies_inside_request_scope_only(backend, vdevice, model_file):
    sleeps = []
    backend.sleep = sleeps.append
    own = backend.request_options({"simulate_ms": 250, "other": 1}, 30.0, os.geteuid())
    assert own == {"simulate_ms": 250}
    with vdevice.create_infer_model(model_file()).configure() as configured:
        with backend.request_scope(own):
            infer_once(configured, image(1))
        with backend.request_scope(backend.request_options({"other": 1}, 30.0, os.geteuid())):
            infer_once(configured, image(1))
        infer_once(configured, image(1))
    assert sleeps == [0.25]  # only the scoped inference: load_ms and infer_ms are 0 here, and 0 is no sleep


@pytest.mark.parametrize("params, uid, code, text", [
    ({"simulate_ms": -1}, 0, "bad_request", "model_params.simulate_ms must be >= 0"),
    ({"simulate_ms": 30_001}, 0, "bad_request", "model_params.simulate_ms must be <= 30000"),   # the infer budget
    ({"simulate_hang_ms": 1.5}, 0, "bad_request", "model_params.simulate_hang_ms must be an integer"),
    ({"simulate_hang_ms": 600_001}, 0, "bad_request", "must be <= 600000"),
    ({"simulate_ms": 5}, 1000, "forbidden", "model_params.simulate_ms is accepted only from root"),
    ({"simulate_hang_ms": 5}, None, "forbidden", "accepted only from root or the daemon's own user"),
])
def test_request_knobs_are_checked_and_only_for_root_or_the_daemons_user(backend, params, uid, code, text):
    """They hold the simulated device (a hang outlasts the watchdog): a
    member of group hailo may not ask for them."""
    if uid == 1000 and os.geteuid() == 1000:
        uid = 1001
    with pytest.raises(RequestError) as info:
        backend.request_options(params, 30.0, uid)
    assert info.value.code == code and text in info.value.message


def test_inference_longer_than_timeout_raises_hailort_timeout(backend, vdevice, model_file):
    sleeps = []
    backend.sleep = sleeps.append
    with vdevice.create_infer_model(model_file()).configure() as configured:
        bindings = configured.create_bindings(input_buffers={"input_layer1": image(1)})
        with backend.request_scope({"simulate_ms": 5000}):
            with pytest.raises(sim.HailoRTTimeout) as caught:
                configured.run([bindings], 100)
    assert hailort_status.status_of(caught.value) == 4
    assert 0.1 in sleeps


# ----------------------------------------------------------------- memory

def test_memory_budget_raises_81_and_shutdown_returns_it(tmp_path, model_file):
    backend = make_backend(tmp_path, device_memory_mb=1000, model_memory_mb=400)
    vdevice = backend.open_vdevice()
    first = vdevice.create_infer_model(model_file("a.hef")).configure()
    vdevice.create_infer_model(model_file("b.hef")).configure()
    assert backend.memory_used_mb() == 800
    third = vdevice.create_infer_model(model_file("c.hef"))
    with pytest.raises(sim.HailoRTException) as caught:
        third.configure()
    assert str(caught.value) == "libhailort failed with error: 81 (HAILO_RESOURCE_EXHAUSTED)"
    assert hailort_status.status_of(caught.value) == hailort_status.RESOURCE_EXHAUSTED
    first.shutdown()
    first.shutdown()  # once only
    assert backend.memory_used_mb() == 400
    with third.configure():
        assert backend.memory_used_mb() == 800
    assert backend.memory_used_mb() == 400
    vdevice.release()  # takes the rest back
    assert backend.memory_used_mb() == 0
    assert ("vdevice_release", 1) in backend.calls  # `second` was still loaded
    assert [c for c in backend.calls if c[0] == "release"] == [
        ("release", model_file("a.hef")), ("release", model_file("c.hef"))]


def test_network_group_limit_of_eight(tmp_path, model_file):
    backend = make_backend(tmp_path, model_memory_mb=1)
    vdevice = backend.open_vdevice()
    model = vdevice.create_infer_model(model_file())
    loaded = [model.configure() for _ in range(8)]
    with pytest.raises(sim.HailoRTException) as caught:
        model.configure()
    assert hailort_status.status_of(caught.value) == 81
    loaded[0].shutdown()
    model.configure()
    vdevice.release()


def test_calls_log_records_operations(backend, vdevice, model_file):
    path = model_file()
    with vdevice.create_infer_model(path).configure() as configured:
        infer_once(configured, image(1))
    assert backend.calls == [("device_open", "0001:01:00.0"), ("vdevice_open", "UNIQUE"),
                             ("create_infer_model", path), ("configure", path), ("run", path), ("release", path)]


# ------------------------------------------------------------------ genai

def frame(seed=0, shape=(336, 336, 3)):
    return image(seed, shape)


def test_vlm_frame_metadata(backend, vdevice, model_file):
    with backend.platform.genai.VLM(vdevice, model_file("vlm.hef")) as vlm:
        assert vlm.input_frame_shape() == [336, 336, 3]
        assert vlm.input_frame_format_type() == np.uint8
    described = model_file("small.hef", "memory_mb: 10\nframe_shape: [64, 64, 3]\n")
    with backend.platform.genai.VLM(vdevice, described) as vlm:
        assert vlm.input_frame_shape() == [64, 64, 3]
        assert backend.memory_used_mb() == 10


def test_vlm_generate_all_is_deterministic(backend, vdevice, model_file):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
    with backend.platform.genai.VLM(vdevice, model_file("vlm.hef")) as vlm:
        answer = vlm.generate_all(prompt, [frame(1)])
        assert vlm.generate_all(prompt, [frame(1)]) == answer
        assert vlm.generate_all(prompt, [frame(2)]) != answer
        assert vlm.generate_all(prompt, [frame(1)], seed=7) != answer
        short = vlm.generate_all(prompt, [frame(1)], max_generated_tokens=2)
    assert answer.startswith("Simulated VLM answer ")
    assert "What is shown here?" in answer
    assert short == "Simulated VLM "
    assert ("vlm_generate", model_file("vlm.hef")) in backend.calls


@pytest.mark.parametrize("frames, text", [
    ((np.zeros((336, 336, 3), np.uint8),), "frames must be a list of numpy arrays"),
    ([[0, 1, 2]], "each frame must be a numpy array"),
])
def test_vlm_frames_must_be_a_list_of_arrays(backend, vdevice, model_file, frames, text):
    with backend.platform.genai.VLM(vdevice, model_file()) as vlm:
        with pytest.raises(sim.HailoRTException) as caught:
            vlm.generate_all("describe", frames)
    assert str(caught.value) == text


@pytest.mark.parametrize("bad", [np.zeros((224, 224, 3), np.uint8), np.zeros((336, 336, 3), np.float32)])
def test_vlm_frame_shape_and_dtype_are_checked(backend, vdevice, model_file, bad):
    with backend.platform.genai.VLM(vdevice, model_file()) as vlm:
        with pytest.raises(sim.HailoRTInvalidArgumentException) as caught:
            vlm.generate_all("describe", [bad])
    assert hailort_status.status_of(caught.value) == 2


def test_vlm_generate_streams_tokens_and_keeps_context(backend, vdevice, model_file):
    status = sim.LLMGeneratorCompletionStatus
    with backend.platform.genai.VLM(vdevice, model_file()) as vlm:
        expected = vlm.generate_all("tell me about it", [])
        with vlm.generate("tell me about it", []) as completion:
            assert completion.generation_status == status.GENERATING
            tokens = list(completion)
            assert completion.generation_status == status.LOGICAL_END_OF_GENERATION
        assert "".join(tokens) == expected
        assert tokens[-1] == "<|im_end|>"
        assert vlm.get_context_usage_size() > 0
        assert vlm.max_context_capacity() >= vlm.get_context_usage_size()
        vlm.clear_context()
        assert vlm.get_context_usage_size() == 0
        assert len(vlm.tokenize("three little words")) == 3


@pytest.mark.parametrize("version", ["5.1.1", "5.2.0"])
def test_the_third_positional_of_vlm_generate_all_depends_on_the_version(tmp_path, model_file, version):
    """5.2 put ``videos`` third (PY:4729, v5.2.0); on 5.1.1 the third is ``temperature``."""
    backend = make_backend(tmp_path, hailort_version=version)
    vdevice = backend.open_vdevice()
    with backend.platform.genai.VLM(vdevice, model_file()) as vlm:
        if version == "5.1.1":
            assert vlm.generate_all("describe", [], 0.7).startswith("Simulated VLM answer")
            with pytest.raises(TypeError, match="videos"):
                vlm.generate_all("describe", [], videos=[])
        else:
            with pytest.raises(sim.HailoRTException, match="videos must be a list of lists"):
                vlm.generate_all("describe", [], 0.7)
    backend.close_vdevice(vdevice)


def test_genai_constructor_failure_is_a_bare_81(tmp_path, model_file):
    backend = make_backend(tmp_path, device_memory_mb=100, model_memory_mb=400)
    vdevice = backend.open_vdevice()
    with pytest.raises(sim.HailoRTStatusException) as caught:
        backend.platform.genai.VLM(vdevice, model_file())
    assert str(caught.value) == "81"
    # Under HailoRTException only from 5.2.0 (pyhailort.cpp:876 in 5.1.1, :882 in 5.2.0).
    assert isinstance(caught.value, sim.HailoRTException)
    (tmp_path / "older").mkdir()
    older = make_backend(tmp_path / "older", hailort_version="5.1.1", device_memory_mb=100, model_memory_mb=400)
    older_vdevice = older.open_vdevice()  # imports hailo_platform.genai, as the real backend does
    with pytest.raises(sim.HailoRTStatusException) as caught:
        older.platform.genai.VLM(older_vdevice, model_file())
    assert not isinstance(caught.value, sim.HailoRTException)
    assert hailort_status.status_of(caught.value) == 81
    assert backend.memory_used_mb() == 0
    with pytest.raises(sim.HailoRTStatusException) as missing:
        backend.platform.genai.VLM(vdevice, str(tmp_path / "absent.hef"))
    assert str(missing.value) == "13"
    vdevice.release()


def test_vlm_release_returns_memory(backend, vdevice, model_file):
    vlm = backend.platform.genai.VLM(vdevice, model_file())
    assert backend.memory_used_mb() == 512
    vlm.release()
    vlm.release()
    assert backend.memory_used_mb() == 0
    with pytest.raises(sim.HailoRTInvalidOperationException):
        vlm.generate_all("hello", [])


def test_llm_generates_text_without_frames(backend, vdevice, model_file):
    with backend.platform.genai.LLM(vdevice, model_file("llm.hef"), lora_name="") as llm:
        answer = llm.generate_all([{"role": "user", "content": "Hello there"}], max_generated_tokens=100)
        assert answer == llm.generate_all([{"role": "user", "content": "Hello there"}])
    assert answer.startswith("Simulated LLM answer ") and "Hello there" in answer
    assert ("llm_load", model_file("llm.hef")) in backend.calls


def test_genai_generation_timeout(backend, vdevice, model_file):
    backend.sleep = lambda seconds: None
    with backend.platform.genai.VLM(vdevice, model_file()) as vlm:
        with backend.request_scope({"simulate_ms": 2000}):
            with pytest.raises(sim.HailoRTTimeout):
                vlm.generate_all("slow", [], timeout_ms=1000)


# ---------------------------------------------------------- fault injection

def test_injected_raise_hits_the_next_operations(backend, vdevice, model_file):
    model = vdevice.create_infer_model(model_file())
    backend.inject_fault("raise", status=hailort_status.RPC_FAILED, count=2)
    for _ in range(2):
        with pytest.raises(sim.HailoRTException) as caught:
            model.configure()
        assert hailort_status.status_of(caught.value) == 77
        assert str(caught.value) == "libhailort failed with error: 77 (HAILO_RPC_FAILED)"
    model.configure().shutdown()
    assert backend.memory_used_mb() == 0


def test_injected_raise_on_genai_constructor_is_raw(backend, vdevice, model_file):
    backend.inject_fault("raise", status=81)
    with pytest.raises(sim.HailoRTStatusException) as caught:
        backend.platform.genai.VLM(vdevice, model_file())
    assert str(caught.value) == "81"


def test_injected_raise_on_open_makes_the_backend_unavailable(backend):
    backend.inject_fault("raise", status=hailort_status.DEVICE_IN_USE)
    with pytest.raises(BackendUnavailable, match="HAILO_DEVICE_IN_USE"):
        backend.open_vdevice()
    backend.open_vdevice().release()


def test_lost_device_fails_until_a_new_vdevice(backend, vdevice, model_file):
    path = model_file()
    configured = vdevice.create_infer_model(path).configure()
    bindings = configured.create_bindings(input_buffers={"input_layer1": image(1)})
    backend.inject_fault("lose_device")
    for _ in range(2):
        with pytest.raises(sim.HailoCommunicationClosedException) as caught:
            configured.run([bindings], 1000)
        assert hailort_status.status_of(caught.value) == 62
        assert caught.value.__cause__.args[0] == "62"
    assert backend.temperature(vdevice) is None
    with pytest.raises(sim.HailoRTStatusException, match="^62$"):
        backend.platform.genai.VLM(vdevice, path)
    configured.shutdown()
    vdevice.release()
    fresh = backend.open_vdevice()
    with fresh.create_infer_model(path).configure() as configured:
        assert infer_once(configured, image(1)).shape == (512,)
    fresh.release()


def test_injected_hang_blocks_until_released(backend, vdevice, model_file):
    model = vdevice.create_infer_model(model_file())
    backend.inject_fault("hang")
    results = []
    worker = threading.Thread(target=lambda: results.append(model.configure()))
    worker.start()
    for _ in range(1000):  # wait until the operation is inside the hang
        if ("fault", "hang") in backend.calls:
            break
        time.sleep(0.005)
    assert ("fault", "hang") in backend.calls
    assert worker.is_alive() and not results
    backend.release_hang()
    worker.join(timeout=30)
    assert not worker.is_alive() and len(results) == 1
    results[0].shutdown()


def test_inject_fault_validates_its_arguments(backend):
    with pytest.raises(ValueError):
        backend.inject_fault("explode")
    with pytest.raises(ValueError):
        backend.inject_fault("raise")
    with pytest.raises(ValueError):
        backend.inject_fault("hang", count=0)


# ------------------------------------------------------------- status numbers

@pytest.mark.parametrize("number, class_name", [
    (4, "HailoRTTimeout"), (2, "HailoRTInvalidArgumentException"), (61, "HailoRTNotFoundException"),
    (26, "HailoRTInvalidHEFException"), (6, "HailoRTInvalidOperationException"),
    (62, "HailoCommunicationClosedException"), (36, "HailoRTDriverOperationFailedException"),
    (81, "HailoRTException"), (74, "HailoRTException"), (13, "HailoRTException"), (999, "HailoRTException"),
])
def test_status_of_reads_every_raised_exception(backend, number, class_name):
    error = status_error(number)
    assert type(error) is getattr(sim, class_name)
    assert isinstance(error, sim.HailoRTException)
    assert hailort_status.status_of(error) == number
    assert hailort_status.status_of(raw_status_error(number)) == number
    assert str(raw_status_error(number)) == str(number)


@pytest.mark.parametrize("count", [16, 1024, 1025, 4096])
def test_float_outputs_look_like_a_models_whatever_their_size(count):
    """Small float outputs come from the hash (no numpy generator, which lets go
    of the GIL), large ones from a generator: both about standard normal."""
    stream = sim._StreamSpec("out", (count, 1), sim.FormatType.FLOAT32)
    values = np.concatenate([sim._simulated_output(seed.to_bytes(4, "little") * 4, stream, sim.FormatType.FLOAT32,
                                                   [("in", memoryview(b"x"))])
                             for seed in range(max(1, 20000 // count))]).ravel()
    assert values.dtype == np.float32 and np.isfinite(values).all()
    assert abs(float(values.mean())) < 0.05 and abs(float(values.std()) - 1.0) < 0.05
