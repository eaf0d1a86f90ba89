"""Every model type on every HailoRT version the daemon supports, and the defects
that Hailo's own sources showed (issue 14), each through a running daemon.

The simulated backend follows the API surface recorded from hailo-ai/hailort
per version (src/hailo_devmgr/daemon/backends/hailort_api/*.yaml), under the real
backend's code (backends/hailo.py): a call that a version lacks fails here
as it would on a Pi.
"""
from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

import handler_checks as hc
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.daemon.backends import hailort_api
from hailo_devmgr.client import Client, tensor
from hailo_devmgr.daemon.config import SIMULATED_HAILORT_VERSIONS
from hailo_devmgr.daemon.handlers.network import stream_dtype
from hailo_devmgr.daemon.model_files import ModelFiles, resolve_model_path
from test_handlers import models, ocr_params  # noqa: F401 - models is a fixture

DAEMON_SRC = Path(__file__).resolve().parents[1] / "src" / "hailo_devmgr" / "daemon"
GENAI_TYPES = ("vlm", "vlm_chat", "whisper")
# A CLIP text encoder as HailoRT reports it: quantized (UINT8) inputs.
QUANTIZED_TEXT_NET = {"inputs": [{"name": "tokens", "shape": [77, 64], "format": "UINT8"}],
                      "outputs": [{"name": "embedding", "shape": [512], "format": "UINT8"}]}


def test_the_config_offers_exactly_the_recorded_versions():
    assert SIMULATED_HAILORT_VERSIONS == hailort_api.recorded_versions()
    for version in SIMULATED_HAILORT_VERSIONS:
        surface = hailort_api.load(version)
        assert surface.tag == f"v{version}" and surface.classes and surface.statuses


@pytest.fixture(params=SIMULATED_HAILORT_VERSIONS)
def version(request) -> str:
    return request.param


@pytest.fixture
def versioned_client(start_daemon, version):
    daemon = start_daemon(simulated={"hailort_version": version})
    with Client(daemon.socket_path, timeout=30) as client:
        yield client


def has_genai(version: str) -> bool:
    return hailort_api.load(version).has_module("hailo_platform.genai")


# ------------------------------------------------------------------ every handler, every version

def test_every_model_type_on_every_version(versioned_client, version, models, model_dir):
    client = versioned_client
    assert client.status()["hailort_version"] == version
    assert client.device_status()["hailort_version"] == version
    assert hc.check_generic(client, models["net.hef"])["output_layer1"].shape == (512,)
    (model_dir / "text_q.hef").write_text(yaml.safe_dump(QUANTIZED_TEXT_NET))
    image, text = hc.check_clip(client, models["net.hef"], str(model_dir / "text_q.hef"))
    assert image.shape == (512,) and text.shape == (512,)
    assert hc.check_depth(client, models["depth.hef"]).shape == (64, 80, 1)
    assert set(hc.check_pose(client, models["pose.hef"])) == {"boxes", "scores", "keypoints"}
    hc.check_ocr(client, models["ocr_det.hef"], ocr_params(models), "en")
    if has_genai(version):
        assert hc.check_whisper(client, models["whisper.hef"])
        assert hc.check_vlm(client, models["vlm.hef"])
        return
    for model_type, path in (("vlm", "vlm.hef"), ("vlm_chat", "vlm.hef"), ("whisper", "whisper.hef")):
        error = hc.refused(lambda: client.load_model(models[path], model_type), p.LOAD_FAILED)
        assert f"the installed HailoRT {version} has none" in error.message
    assert "has no hailo_platform.genai" in client.status()["genai_unavailable_reason"]


# ------------------------------------------------------------------ the defects, one test each

def test_1_genai_models_load_although_hailo_platform_does_not_import_genai(client, models, daemon):
    """The simulated hailo_platform has no ``genai`` until ``import hailo_platform.genai``."""
    assert client.load_model(models["vlm.hef"], "vlm")["message"] == "Model loaded"
    assert client.load_model(models["whisper.hef"], "whisper")["message"] == "Model loaded"
    assert client.status()["genai_unavailable_reason"] is None


def test_2_vlm_gets_a_host_only_link_not_a_proc_fd_path(tmp_path):
    """VLM and LLM send the path string to the chip (vlm.cpp:78-92, v5.2.0)."""
    (tmp_path / "vlm.hef").write_text("VLM")
    files = ModelFiles()
    fd_path = files.open(resolve_model_path(str(tmp_path / "vlm.hef"), (str(tmp_path),)))
    link = files.host_link(fd_path)
    assert not link.startswith("/proc/") and os.readlink(link) == fd_path
    assert stat.S_IMODE(os.stat(os.path.dirname(link)).st_mode) == 0o700  # no one else can swap it
    with open(link) as handle:
        assert handle.read() == "VLM"
    assert files.shown(f"cannot load {link}") == f"cannot load {tmp_path / 'vlm.hef'}"
    files.close()
    assert not os.path.lexists(link)


def test_2_the_simulated_chip_refuses_a_proc_fd_path(start_daemon, models):
    daemon = start_daemon()
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.load_model(models["vlm.hef"], "vlm_chat")["message"] == "Model loaded"
    assert "server_saw_fd_path" not in daemon.log()


def test_3_recognition_over_more_crops_than_the_async_queue(client, models):
    """run() over more bindings than the queue fails with 82 and shuts the model down."""
    params = ocr_params(models, batch_sizes={"en": 16})
    crops = [tensor(hc.sample((48, 160, 3), np.uint8, seed)) for seed in range(10)]
    logits = client.infer(models["ocr_det.hef"], {"mode": "recognition", "language": "en", "crops": crops},
                          "ocr", params)["result"]
    assert len(logits) == 10
    one_by_one = client.infer(models["ocr_det.hef"], {"mode": "recognition", "language": "en", "crops": crops,
                                                      "batch_size": 1}, "ocr", params)["result"]
    assert all(np.array_equal(a, b) for a, b in zip(logits, one_by_one))


def test_3_a_failed_run_unloads_the_model_and_the_next_request_reloads_it(client, models):
    path = models["net.hef"]
    image = {"inputs": {"input_layer1": tensor(hc.sample((224, 224, 3), np.uint8))}}
    client.infer(path, image, "generic")
    client.request("simulate", fault={"kind": "raise", "status": 82})  # HAILO_QUEUE_IS_FULL
    error = hc.refused(lambda: client.infer(path, image, "generic"), p.INFERENCE_FAILED)
    assert "the model was unloaded and loads again on the next request" in error.message
    assert client.status()["loaded_models"] == []
    assert client.infer(path, image, "generic")["result"]["outputs"]["output_layer1"].shape == (512,)
    # Any other failure leaves the model loaded: a client cannot make the daemon unload models.
    client.request("simulate", fault={"kind": "raise", "status": 8})
    error = hc.refused(lambda: client.infer(path, image, "generic"), p.INFERENCE_FAILED)
    assert "unloaded" not in error.message and len(client.status()["loaded_models"]) == 1


def test_4_clip_text_encoder_with_quantized_inputs_takes_float32(client, models, model_dir):
    (model_dir / "text_q.hef").write_text(yaml.safe_dump(QUANTIZED_TEXT_NET))
    params = {"text_hef_path": str(model_dir / "text_q.hef")}
    embeddings = np.random.default_rng(1).standard_normal((77, 64)).astype(np.float32)
    result = client.infer(models["net.hef"], {"mode": "text", "tensor": tensor(embeddings)}, "clip",
                          params)["result"]
    assert result.dtype == np.float32 and result.shape == (512,)


def test_5_without_the_scheduler_each_run_activates_its_model(start_daemon, models):
    daemon = start_daemon(device={"scheduling_algorithm": "none"})
    image = tensor(hc.sample((224, 224, 3), np.uint8))
    with Client(daemon.socket_path, timeout=30) as client:
        for path in (models["net.hef"], models["two.hef"], models["net.hef"]):
            inputs = ({"input_layer1": image} if path.endswith("net.hef") else
                      {"a": tensor(hc.sample((4, 4, 3), np.uint8)), "b": tensor(np.zeros(8, np.float32))})
            assert client.infer(path, {"inputs": inputs}, "generic")["result"]["outputs"]


class _Stream:
    def __init__(self, type_name):
        self.name = "in0"
        self.format = type("Format", (), {"type": type("T", (), {"name": type_name})()})()


def test_6_a_stream_that_reports_auto_is_refused_not_guessed():
    assert stream_dtype(_Stream("UINT16")) == np.uint16
    with pytest.raises(p.RequestError) as info:
        stream_dtype(_Stream("AUTO"))
    assert info.value.code == p.LOAD_FAILED and "AUTO" in info.value.message


@pytest.mark.parametrize("version, detects", [("5.1.1", False), ("5.2.0", True)])
def test_7_language_detection_needs_hailort_5_2(start_daemon, models, version, detects):
    """language=None is a TypeError before 5.2 (std::string_view, speech2text_api.cpp:52-53, v5.1.1)."""
    daemon = start_daemon(simulated={"hailort_version": version})
    request = {"audio": hc.tone(1.0).tolist(), "language": None}
    with Client(daemon.socket_path, timeout=30) as client:
        if detects:
            assert client.infer(models["whisper.hef"], request, "whisper")["result"]["segments"]
            return
        error = hc.refused(lambda: client.infer(models["whisper.hef"], request, "whisper"))
        assert "needs HailoRT 5.2 or later" in error.message
        assert client.infer(models["whisper.hef"], {**request, "language": "en"}, "whisper")["result"]["segments"]


def test_7_vlm_takes_at_most_five_frames_on_5_1_1_and_temperature_0_is_greedy(start_daemon, models):
    daemon = start_daemon(simulated={"hailort_version": "5.1.1"})
    frames = [tensor(hc.sample((336, 336, 3), np.uint8, seed)) for seed in range(6)]
    with Client(daemon.socket_path, timeout=30) as client:
        error = hc.refused(lambda: client.infer(models["vlm.hef"], {"prompt": "?", "frames": frames}, "vlm_chat"))
        assert "at most 5" in error.message
        answer = client.infer(models["vlm.hef"], {"prompt": "?", "frames": frames[:5], "temperature": 0},
                              "vlm_chat")["result"]
        assert answer.startswith("Simulated VLM answer")


# ------------------------------------------------------------------ no attribute the version lacks

# Names in the daemon's code that hold HailoRT objects, and their recorded class.
HOLDERS = {
    "self.model": "InferModel", "self.configured": "ConfiguredInferModel", "stream": "InferModel.InferStream",
    "bindings": "ConfiguredInferModel.Bindings", "self.vlm": "VLM", "vdevice": "VDevice",
    "self.vdevice": "VDevice", "device": "Device", "info_device": "Device", "reading": "TemperatureInfo",
    "info": "BoardInformation", "self.speech2text": "Speech2Text", "segment": "SegmentInfo",
    "self.llm": "LLM", "completion": "LLMGeneratorCompletion",
}
SCANNED = ("handlers/network.py", "handlers/clip.py", "handlers/ocr.py", "handlers/vlm.py", "handlers/whisper.py",
           "handlers/generic.py", "handlers/depth.py", "handlers/pose.py", "handlers/llm.py",
           "handlers/generation.py", "backends/hailo.py")


def _touched() -> dict[str, set[str]]:
    """``{recorded class or module: attributes}`` the scanned code reads on HailoRT objects."""
    touched: dict[str, set[str]] = {}
    for relative in SCANNED:
        tree = ast.parse((DAEMON_SRC / relative).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                holder = ast.unparse(node.value)
                holder = {"self._require_info_device()": "info_device", "platform.Device": "Device",
                          "self._require_info_device().control": "Control"}.get(holder, holder)
                if holder in ("platform", "self.platform"):
                    touched.setdefault("hailo_platform", set()).add(node.attr)
                elif holder in ("self.platform.genai", "platform.genai", "genai"):
                    touched.setdefault("hailo_platform.genai", set()).add(node.attr)
                elif holder in HOLDERS:
                    touched.setdefault(HOLDERS[holder], set()).add(node.attr)
            if (isinstance(node, ast.Call) and ast.unparse(node.func) == "genai_class"
                    and isinstance(node.args[1], ast.Constant)):
                touched.setdefault("hailo_platform.genai", set()).add(node.args[1].value)
    return touched


OURS = {"genai", "__version__", "__file__"}  # set by the import system or read with a default


@pytest.mark.parametrize("version", SIMULATED_HAILORT_VERSIONS)
def test_every_hailo_platform_attribute_the_code_touches_is_recorded(version):
    surface = hailort_api.load(version)
    touched = _touched()
    assert {"VDevice", "FormatType", "Device"} <= touched["hailo_platform"]
    assert {"create_infer_model", "configure", "run", "get_async_queue_size"} <= set().union(*touched.values())
    missing = []
    for owner, names in sorted(touched.items()):
        if owner.startswith("hailo_platform"):
            if not surface.has_module(owner):
                continue  # no genai (4.23): those model types answer a clear error instead
            missing += [f"{owner}.{name}" for name in names - OURS if name not in surface.exports(owner)]
        elif owner in surface.classes:
            missing += [f"{owner}.{name}" for name in names if name not in surface.members(owner)]
        elif surface.has_module("hailo_platform.genai"):
            missing.append(f"class {owner}")
    assert missing == [], f"HailoRT {version} has no {missing}"
