"""Every model type through the socket of a running daemon (simulated backend).

The checks in handler_checks.py run here and on real hardware
(test_hardware.py); this module adds what only the simulated backend can
promise: exact shapes from the YAML "HEFs", deterministic values, segment
counts from the audio length, and load failures for unsuitable HEFs.
"""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import yaml

import handler_checks as hc
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import Client, tensor
from test_daemon_v1 import frame, read_frame

NETS = {
    "depth.hef": {"inputs": [{"name": "rgb", "shape": [64, 80, 3], "format": "UINT8"}],
                  "outputs": [{"name": "depth", "shape": [64, 80, 1], "format": "UINT8"}]},
    "pose.hef": {"inputs": [{"name": "image", "shape": [96, 96, 3], "format": "UINT8"}],
                 "outputs": [{"name": "boxes", "shape": [12, 12, 64], "format": "UINT8"},
                             {"name": "scores", "shape": [12, 12, 1], "format": "UINT8"},
                             {"name": "keypoints", "shape": [12, 12, 51], "format": "UINT16"}]},
    "ocr_det.hef": {"inputs": [{"name": "det_in", "shape": [96, 128, 3], "format": "UINT8"}],
                    "outputs": [{"name": "det_map", "shape": [96, 128, 1], "format": "UINT8"}]},
    "ocr_rec_en.hef": {"inputs": [{"name": "rec_in", "shape": [48, 160, 3], "format": "UINT8"}],
                       "outputs": [{"name": "logits", "shape": [40, 97], "format": "UINT8"}]},
    "ocr_rec_zh.hef": {"inputs": [{"name": "rec_in", "shape": [48, 320, 3], "format": "UINT8"}],
                       "outputs": [{"name": "logits", "shape": [80, 300], "format": "UINT8"}]},
    "two_outputs.hef": {"inputs": [{"name": "x", "shape": [8, 8, 3]}],
                        "outputs": [{"name": "a", "shape": [4]}, {"name": "b", "shape": [4]}]},
}


@pytest.fixture
def models(model_dir):
    for name, net in NETS.items():
        (model_dir / name).write_text(yaml.safe_dump(net))
    (model_dir / "whisper.hef").write_text("Speech2Text stand-in\n")
    return {name: str(model_dir / name) for name in [*NETS, "whisper.hef", "net.hef", "two.hef", "vlm.hef",
                                                     "clip_text.hef"]}


def ocr_params(models, **extra):
    return {"detection_hef_path": models["ocr_det.hef"],
            "recognition_hefs": {"en": models["ocr_rec_en.hef"], "zh": models["ocr_rec_zh.hef"]}, **extra}


# ------------------------------------------------------------------ good requests

def test_generic_and_clip_through_the_shared_checks(client, models):
    outputs = hc.check_generic(client, models["net.hef"])
    assert outputs["output_layer1"].shape == (512,)
    image, text = hc.check_clip(client, models["net.hef"], models["clip_text.hef"])
    assert image.shape == (512,) and text.shape == (512,)
    assert abs(float(np.linalg.norm(image)) - 1.0) < 1e-4  # the simulated embedding has unit length


def test_depth_returns_a_float32_map_of_the_output_shape(client, models):
    depth_map = hc.check_depth(client, models["depth.hef"])
    assert depth_map.shape == (64, 80, 1)  # UINT8 in the HEF, dequantized to float32
    other = client.infer(models["depth.hef"], {"input": tensor(hc.sample((64, 80, 3), np.uint8, 9))},
                         "depth")["result"]
    assert not np.array_equal(other, depth_map)  # the map depends on the image
    batched = client.infer(models["depth.hef"], {"input": tensor(hc.sample((1, 64, 80, 3), np.uint8))},
                           "depth")["result"]
    assert np.array_equal(batched, depth_map)  # a leading batch dimension of 1 is accepted


def test_simulated_image_models_default_to_224x224x3_uint8(client, models):
    """A HEF the simulator cannot read as YAML is the default network."""
    assert hc.probe_input(lambda a: client.infer(models["net.hef"], {"input": tensor(a)}, "depth")) == (
        (224, 224, 3), np.dtype(np.uint8))
    assert hc.probe_input(lambda a: client.infer(models["net.hef"], {"input": tensor(a)}, "pose")) == (
        (224, 224, 3), np.dtype(np.uint8))


def test_pose_returns_every_output_by_name(client, models):
    outputs = hc.check_pose(client, models["pose.hef"])
    assert {name: value.shape for name, value in outputs.items()} == {
        "boxes": (12, 12, 64), "scores": (12, 12, 1), "keypoints": (12, 12, 51)}


def test_ocr_detection_and_recognition(client, models):
    params = ocr_params(models, batch_sizes={"en": 2})
    info, detection, logits = hc.check_ocr(client, models["ocr_det.hef"], params, "en")
    assert info == {"detection_input_shape": [96, 128, 3],
                    "recognition_input_shapes": {"en": [48, 160, 3], "zh": [48, 320, 3]}}
    assert detection.shape == (96, 128, 1)
    assert [item.shape for item in logits] == [(40, 97)] * 5
    assert not np.array_equal(logits[0], logits[1])  # one result per crop, in order
    crops = [tensor(hc.sample((48, 320, 3), np.uint8, seed)) for seed in range(3)]
    chinese = client.infer(models["ocr_det.hef"], {"mode": "recognition", "language": "zh", "crops": crops},
                           "ocr", params)["result"]
    assert [item.shape for item in chinese] == [(80, 300)] * 3
    again = client.load_model(models["ocr_det.hef"], "ocr", params)
    assert again["message"] == "Model already loaded" and again["model_info"] == info


def test_ocr_model_info_and_detection_only_model(client, models):
    """detection_hef_path defaults to model_path; recognition HEFs are optional."""
    loaded = client.load_model(models["ocr_det.hef"], "ocr")
    assert loaded["model_info"] == {"detection_input_shape": [96, 128, 3], "recognition_input_shapes": {}}
    error = hc.refused(lambda: client.infer(models["ocr_det.hef"], {
        "mode": "recognition", "crops": [tensor(np.zeros((48, 160, 3), np.uint8))]}, "ocr"))
    assert "needs model_params.recognition_hefs" in error.message


def test_ocr_language_rules(client, models):
    path, params = models["ocr_det.hef"], ocr_params(models)
    crop = tensor(np.zeros((48, 160, 3), np.uint8))
    error = hc.refused(lambda: client.infer(path, {"mode": "recognition", "crops": [crop]}, "ocr", params))
    assert "input_data.language is required" in error.message and "['en', 'zh']" in error.message
    error = hc.refused(lambda: client.infer(path, {"mode": "recognition", "language": "fr", "crops": [crop]},
                                            "ocr", params))
    assert "input_data.language 'fr' has no recognition HEF" in error.message
    error = hc.refused(lambda: client.infer(path, {"mode": "recognition", "language": "en", "crops": [
        crop, tensor(np.zeros((48, 161, 3), np.uint8))]}, "ocr", params))
    assert "input_data.crops[1] has shape [48, 161, 3], the model expects [48, 160, 3]" in error.message
    only_en = {"recognition_hefs": {"en": models["ocr_rec_en.hef"]}}
    result = client.infer(models["ocr_rec_en.hef"], {"mode": "recognition", "crops": [crop]}, "ocr", {
        "detection_hef_path": models["ocr_det.hef"], **only_en})["result"]
    assert [item.shape for item in result] == [(40, 97)]  # the one language needs no name


def test_whisper_segments_follow_the_audio(client, models):
    path = models["whisper.hef"]
    segments = hc.check_whisper(client, path)
    assert [(s["start"], s["end"]) for s in segments] == [(0.0, 2.5)]
    long = client.infer(path, {"audio": tensor(hc.tone(12.0))}, "whisper")["result"]["segments"]
    assert [(s["id"], s["start"], s["end"]) for s in long] == [(0, 0.0, 5.0), (1, 5.0, 10.0), (2, 10.0, 12.0)]
    assert all(s["text"].startswith(" Simulated transcript (en) ") for s in long)
    again = client.infer(path, {"audio": tensor(hc.tone(12.0))}, "whisper")["result"]["segments"]
    assert again == long  # deterministic
    other = client.infer(path, {"audio": tensor(hc.tone(12.0, 880.0))}, "whisper")["result"]["segments"]
    assert [s["text"] for s in other] != [s["text"] for s in long]  # derived from the samples
    full = client.infer(path, {"audio": tensor(hc.tone(30.0)[None, :])}, "whisper")["result"]["segments"]
    assert len(full) == 6 and full[-1]["end"] == 30.0  # the limit itself, as [1, n]
    french = client.infer(path, {"audio": tensor(hc.tone(1.0)), "language": "fr", "task": "translate"},
                          "whisper")["result"]["segments"]
    assert french[0]["text"].startswith(" Simulated translation (fr) ")
    detect = client.infer(path, {"audio": tensor(hc.tone(1.0)), "language": None}, "whisper")["result"]
    assert detect["segments"][0]["text"].startswith(" Simulated transcript (auto) ")
    # hailo-whisper sends "auto" when no language is configured (hailo_whisper_server.py)
    auto = client.infer(path, {"audio": tensor(hc.tone(1.0)), "language": "auto"}, "whisper")["result"]
    assert auto == detect


def test_whisper_hears_long_audio_in_windows_cut_where_it_is_quiet(client, models):
    """70 s with silence at 26.0-26.4 s and 53.0-53.4 s: windows end in those gaps, and
    the segments' times run on over the whole recording."""
    audio = hc.tone(70.0)
    for gap in (26.0, 53.0):
        audio[int(gap * hc.SAMPLE_RATE):int((gap + 0.4) * hc.SAMPLE_RATE)] = 0.0
    segments = client.infer(models["whisper.hef"], {"audio": tensor(audio)}, "whisper")["result"]["segments"]
    assert [s["id"] for s in segments] == list(range(len(segments)))
    # The simulated model gives a segment per started 5 s of each window: windows
    # 0-26.35 s, 26.35-53.3 s (cut in the middle of the last quiet 0.1 s) and 53.3-70 s.
    assert [s["start"] for s in segments] == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0,
                                              26.35, 31.35, 36.35, 41.35, 46.35, 51.35,
                                              53.3, 58.3, 63.3, 68.3]
    assert segments[-1]["end"] == 70.0
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:]))  # nothing heard twice


def test_whisper_windows_leave_no_sliver_and_silence_makes_few_windows():
    from hailo_devmgr.daemon.handlers.whisper import windows
    rate = hc.SAMPLE_RATE
    assert windows(hc.tone(30.0)) == [(0, 30 * rate)]
    tail = windows(hc.tone(30.0 + 1 / rate))
    assert len(tail) == 2 and tail[1][1] - tail[1][0] >= rate  # at least 1 s after the cut
    silence = windows(np.zeros(600 * rate, np.float32))
    assert len(silence) == 21 and max(end - start for start, end in silence) <= 30 * rate


def test_whisper_audio_longer_than_max_audio_s_is_refused(start_daemon, models):
    daemon = start_daemon(max_audio_s=40)
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.infer(models["whisper.hef"], {"audio": tensor(hc.tone(40.0))}, "whisper")["result"]
        error = hc.refused(lambda: client.infer(models["whisper.hef"], {"audio": tensor(hc.tone(40.5))},
                                                "whisper"))
        assert "over the limit of 640000 (40 s at 16000 Hz; config max_audio_s)" in error.message


def test_vlm_through_the_shared_checks(client, models):
    assert hc.check_vlm(client, models["vlm.hef"]).endswith("<|im_end|>")


# ------------------------------------------------------------------ bad fields

@pytest.mark.parametrize("model_type, input_data, text", hc.BAD_INPUTS,
                         ids=[f"{i}-{t}" for i, (t, _, _) in enumerate(hc.BAD_INPUTS)])
def test_each_bad_field_is_named_before_the_device_is_touched(daemon, models, model_type, input_data, text):
    body = json.dumps({"action": "infer", "model_type": model_type, "model_path": models["net.hef"],
                       "input_data": input_data})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(daemon.socket_path)
        sock.sendall(frame(body.encode()))
        response = read_frame(sock)
        assert response["code"] == p.BAD_REQUEST, response
        assert text in response["error"]
        sock.sendall(p.encode_frame({"action": "status"}))
        assert read_frame(sock)["loaded_models"] == []  # refused before any load


@pytest.mark.parametrize("params, code, text", [
    ({"recognition_hefs": ["en.hef"]}, p.BAD_REQUEST, "model_params.recognition_hefs must be an object"),
    ({"recognition_hefs": {"e n": "{dir}/ocr_rec_en.hef"}}, p.BAD_REQUEST, "'e n' is not a language key"),
    ({"recognition_hefs": {"en": 5}}, p.BAD_REQUEST, "model_params.recognition_hefs.en must be a path"),
    ({"recognition_hefs": {"en": "{dir}/missing.hef"}}, p.MODEL_NOT_FOUND, "Model file not found"),
    ({"recognition_hefs": {"en": "/etc/passwd"}}, p.FORBIDDEN, "outside the allowed model folders"),
    ({"recognition_hefs": {"en": "{dir}/escape.hef"}}, p.FORBIDDEN, "outside the allowed model folders"),
    ({"detection_hef_path": "relative.hef"}, p.BAD_REQUEST, "model_params.detection_hef_path must be absolute"),
    ({"recognition_hefs": {"en": "{dir}/ocr_rec_en.hef"}, "batch_sizes": {"zh": 2}}, p.BAD_REQUEST,
     "model_params.batch_sizes.zh: no such language"),
    ({"recognition_hefs": {"en": "{dir}/ocr_rec_en.hef"}, "batch_sizes": {"en": 0}}, p.BAD_REQUEST,
     "model_params.batch_sizes.en must be >= 1"),
    ({"recognition_hefs": {"en": "{dir}/ocr_rec_en.hef"}, "batch_sizes": []}, p.BAD_REQUEST,
     "model_params.batch_sizes must be an object"),
])
def test_ocr_model_params_are_checked(client, models, model_dir, params, code, text):
    params = json.loads(json.dumps(params).replace("{dir}", str(model_dir)))
    error = hc.refused(lambda: client.load_model(models["ocr_det.hef"], "ocr", params), code)
    assert text in error.message
    assert client.status()["loaded_models"] == []


def test_unsuitable_hefs_fail_to_load_with_the_reason(client, models):
    error = hc.refused(lambda: client.load_model(models["two.hef"], "depth"), p.LOAD_FAILED)
    assert "has 2 inputs ['a', 'b']; depth takes one" in error.message
    error = hc.refused(lambda: client.load_model(models["two_outputs.hef"], "depth"), p.LOAD_FAILED)
    assert "has 2 outputs ['a', 'b']" in error.message
    error = hc.refused(lambda: client.load_model(models["ocr_det.hef"], "ocr",
                                                 {"recognition_hefs": {"en": models["two.hef"]}}), p.LOAD_FAILED)
    assert "OCR recognition (en) HEF" in error.message
    assert client.status()["loaded_models"] == []
    status = client.device_status()
    assert status["networks"]["network_count"] == 0
    # Nothing was left half-loaded on the device: pose takes the two-output HEF fine.
    assert set(client.infer(models["two_outputs.hef"], {"input": tensor(np.zeros((8, 8, 3), np.uint8))},
                            "pose")["result"]) == {"a", "b"}


def test_image_inputs_also_take_chw_and_nchw(client, models):
    """hailo-depth falls back to NCHW [1, 3, H, W] when it cannot read the HEF's shape."""
    hwc = hc.sample((64, 80, 3), np.uint8, 4)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    expected = client.infer(models["depth.hef"], {"input": tensor(hwc)}, "depth")["result"]
    for layout in (chw, chw[np.newaxis]):
        got = client.infer(models["depth.hef"], {"input": tensor(layout)}, "depth")["result"]
        assert np.array_equal(got, expected)
    pose = client.infer(models["pose.hef"], {"input": tensor(np.zeros((1, 3, 96, 96), np.uint8))}, "pose")
    assert set(pose["result"]) == {"boxes", "scores", "keypoints"}
    image = hc.sample((224, 224, 3), np.uint8, 5)
    clip = [client.infer(models["net.hef"], {"mode": "image", "tensor": tensor(array)}, "clip")["result"]
            for array in (image, image.transpose(2, 0, 1).copy())]
    assert np.array_equal(clip[0], clip[1])
    generic = [client.infer(models["two.hef"], {"inputs": {"a": tensor(array), "b": tensor(np.ones(8, np.float32))}},
                            "generic")["result"]["outputs"]["sum"] for array in (np.zeros((4, 4, 3), np.uint8),
                                                                                 np.zeros((1, 3, 4, 4), np.uint8))]
    assert np.array_equal(generic[0], generic[1])
    # Not an image stream (the CLIP text encoder's [77, 512]): no other layout.
    other = models["net.hef"].replace("net.hef", "other.hef")
    error = hc.refused(lambda: client.infer(other, {"mode": "text", "tensor": tensor(
        np.zeros((512, 77), np.float32))}, "clip", {"text_hef_path": models["clip_text.hef"]}))
    assert "the model expects [77, 512]" in error.message and "CHW" not in error.message


def test_wrong_shape_and_dtype_after_load_name_the_field(client, models):
    error = hc.refused(lambda: client.infer(models["depth.hef"], {"input": tensor(np.zeros((64, 80), np.uint8))},
                                            "depth"))
    assert error.message == ("input_data.input has shape [64, 80], the model expects [64, 80, 3] "
                             "(or CHW/NCHW of it)")
    error = hc.refused(lambda: client.infer(models["pose.hef"], {"input": tensor(
        np.zeros((96, 96, 3), np.float32))}, "pose"))
    assert error.message == "input_data.input has dtype float32, the model expects uint8"
    error = hc.refused(lambda: client.infer(models["ocr_det.hef"], {"mode": "detection", "image": tensor(
        np.zeros((1, 1, 3), np.uint8))}, "ocr"))
    assert error.message.startswith("input_data.image has shape [1, 1, 3]")


def test_without_hailorts_scheduler_each_model_is_activated_for_its_run(start_daemon, models):
    """device.scheduling_algorithm none: HailoRT runs only the one activated
    model, so each run activates its model and lets go after (72 otherwise):
    two models take turns, a batch of requests included."""
    daemon = start_daemon(device={"scheduling_algorithm": "none"})
    with Client(daemon.socket_path, timeout=30) as client:
        for _ in range(2):
            assert hc.check_generic(client, models["net.hef"])["output_layer1"].shape == (512,)
            image, _ = hc.check_clip(client, models["net.hef"], models["clip_text.hef"])
            assert image.shape == (512,)
