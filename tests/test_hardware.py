"""The handler checks on a real Hailo accelerator (backend: hailo).

Runs only where HailoRT's Python package (``hailo_platform``) imports in
this interpreter and a Hailo device node exists (``/dev/hailo0``, or
``/dev/h1x-0`` from the 5.3 driver); everywhere else the whole module is
reported as skipped with that reason. On a Raspberry Pi 5 with a
Hailo-10H and HailoRT 5.x (Python 3.13: Debian trixie / Raspberry Pi OS):

    sudo systemctl stop hailo-device-manager.service hailo-device-manager.socket
    HAILO_TEST_MODELS_DIR=/usr/share/hailo-models \\
    HAILO_TEST_DEPTH_HEF=scdepthv3.hef HAILO_TEST_POSE_HEF=yolov8s_pose.hef ... \\
        python3 -m pytest -v tests/test_hardware.py

The daemon under test owns the device (``group_id`` UNIQUE), so stop the
packaged service first, or set HAILO_TEST_GROUP_ID to a shared group.

Environment (file names are relative to HAILO_TEST_MODELS_DIR unless
absolute; a model type whose variable is unset or whose file is missing
is skipped, naming the variable):

    HAILO_TEST_MODELS_DIR            folder of the HEFs (default /usr/share/hailo-models);
                                     it is the daemon's model_dirs
    HAILO_TEST_GENERIC_HEF           any one-input HEF (e.g. an image classifier)
    HAILO_TEST_CLIP_IMAGE_HEF        CLIP image encoder
    HAILO_TEST_CLIP_TEXT_HEF         CLIP text encoder (optional: adds text mode)
    HAILO_TEST_DEPTH_HEF             depth estimation, one input, one output
    HAILO_TEST_POSE_HEF              pose estimation (e.g. YOLOv8-pose)
    HAILO_TEST_OCR_DETECTION_HEF     OCR text detection
    HAILO_TEST_OCR_RECOGNITION_HEF   OCR text recognition
    HAILO_TEST_OCR_LANGUAGE          its language key (default en)
    HAILO_TEST_WHISPER_HEF           Whisper (genai Speech2Text; HailoRT 5.1+)
    HAILO_TEST_VLM_HEF               vision-language model (genai VLM, e.g. Qwen2-VL)
    HAILO_TEST_GROUP_ID              VDevice group_id (default UNIQUE)
    HAILO_TEST_PYTHON_PATH           extra folder holding a hailo_platform wheel outside
                                     Debian (the daemon's device.python_path; put it on
                                     PYTHONPATH for this interpreter too)
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

import handler_checks as hc
from conftest import DaemonProcess
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import Client, tensor
from test_daemon_models import wait_until

DEVICE_NODES = ("/dev/hailo0", "/dev/h1x-0")


def _unavailable_reason() -> str | None:
    missing = []
    if importlib.util.find_spec("hailo_platform") is None:
        missing.append("hailo_platform is not importable")
    if not any(os.path.exists(node) for node in DEVICE_NODES):
        missing.append("no /dev/hailo0 (or /dev/h1x-0)")
    return "; ".join(missing) or None


_REASON = _unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"needs a Hailo accelerator: {_REASON}")

MODELS_DIR = Path(os.environ.get("HAILO_TEST_MODELS_DIR", "/usr/share/hailo-models"))


def model(variable: str, required: bool = True) -> str | None:
    """The model file an environment variable names; skips the test without it."""
    name = os.environ.get(variable)
    path = MODELS_DIR / name if name else None
    if path is None or not path.is_file():
        if not required:
            return None
        detail = f"{path} does not exist" if path else "not set"
        pytest.skip(f"{variable} {detail}")
    return str(path)


@pytest.fixture(scope="module")
def hardware_daemon(tmp_path_factory):
    """One daemon on the real device for the whole module (genai models load slowly)."""
    folder = tmp_path_factory.mktemp("hardware")
    extra = [str(Path(os.environ[name]).parent) for name in os.environ
             if name.startswith("HAILO_TEST_") and name.endswith("_HEF") and os.path.isabs(os.environ[name])]
    config = {
        "backend": "hailo",
        "socket_path": str(folder / "device.sock"),
        "model_dirs": sorted({str(MODELS_DIR), *extra}),
        "log_level": "debug",
        "device": {"group_id": os.environ.get("HAILO_TEST_GROUP_ID", "UNIQUE")},
    }
    if os.environ.get("HAILO_TEST_PYTHON_PATH"):
        config["device"]["python_path"] = [os.environ["HAILO_TEST_PYTHON_PATH"]]
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    daemon = DaemonProcess(folder, path, config["socket_path"]).wait_ready()
    try:
        with Client(daemon.socket_path, timeout=60) as client:
            # The control plane answers while the device is still being opened.
            wait_until(lambda: client.status()["device_id"] or client.status()["runtime_broken_reason"],
                       timeout=60, what="the device to open")
            reason = client.status()["runtime_broken_reason"]
            assert reason is None, f"the daemon cannot use the device: {reason}\n{daemon.log()}"
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def hw(hardware_daemon):
    with Client(hardware_daemon.socket_path, timeout=900) as client:
        yield client


def test_device_status_on_hardware(hw):
    status = hw.device_status()
    device = status["device"]
    assert device["device_id"] and device["architecture"] and device["fw_version"]
    assert isinstance(device["temperature_celsius"], float) and 0 < device["temperature_celsius"] < 125
    assert status["thermal"]["throttled"] is False and status["backend"] == "hailo"


def test_generic(hw):
    assert hc.check_generic(hw, model("HAILO_TEST_GENERIC_HEF"))


def test_clip(hw):
    image, text = hc.check_clip(hw, model("HAILO_TEST_CLIP_IMAGE_HEF"),
                                model("HAILO_TEST_CLIP_TEXT_HEF", required=False))
    if text is not None:
        assert text.size == image.size  # one embedding space


def test_depth(hw):
    depth_map = hc.check_depth(hw, model("HAILO_TEST_DEPTH_HEF"))
    assert depth_map.ndim >= 2


def test_pose(hw):
    assert hc.check_pose(hw, model("HAILO_TEST_POSE_HEF"))


def test_ocr(hw):
    detection = model("HAILO_TEST_OCR_DETECTION_HEF")
    recognition = model("HAILO_TEST_OCR_RECOGNITION_HEF")
    language = os.environ.get("HAILO_TEST_OCR_LANGUAGE", "en")
    hc.check_ocr(hw, detection, {"recognition_hefs": {language: recognition}, "batch_sizes": {language: 2}},
                 language)


def test_whisper(hw):
    hc.check_whisper(hw, model("HAILO_TEST_WHISPER_HEF"))


def test_vlm(hw):
    hc.check_vlm(hw, model("HAILO_TEST_VLM_HEF"))


@pytest.mark.parametrize("model_type, input_data, text", hc.BAD_INPUTS,
                         ids=[f"{i}-{t}" for i, (t, _, _) in enumerate(hc.BAD_INPUTS)])
def test_bad_fields_on_hardware(hw, model_type, input_data, text):
    path = next((str(path) for path in sorted(MODELS_DIR.glob("*.hef"))), None)
    if path is None:
        pytest.skip(f"no .hef in {MODELS_DIR}")
    error = hc.refused(lambda: hw.infer(path, input_data, model_type))
    assert text in error.message


def test_unsuitable_input_is_refused_before_it_reaches_the_device(hw):
    path = model("HAILO_TEST_DEPTH_HEF")
    error = hc.refused(lambda: hw.infer(path, {"input": tensor(np.zeros((3, 3), np.float32))}, "depth"))
    assert "input_data.input has shape [3, 3]" in error.message
    assert hw.status()["runtime_faults"] == 0 and error.code == p.BAD_REQUEST
