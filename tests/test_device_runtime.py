"""Pieces of issue 4 in-process: config keys, the runtime's rebuild schedule
and thermal guard, the device thread's chores, and the simulated Speech2Text.

The socket-level behaviour is in test_runtime_faults.py, test_keep_alive.py
and test_handlers.py; here the rules themselves, with fakes and no sleeps.
"""
from __future__ import annotations

import re
import threading
from dataclasses import fields

import numpy as np
import pytest

from hailo_devmgr.daemon import config as cfg
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.daemon.backends import BackendUnavailable, DeviceIdentity
from hailo_devmgr.daemon.backends import simulated as sim
from hailo_devmgr.daemon.backends.simulated import SimulatedBackend
from hailo_devmgr.daemon.device import Chore, DeviceRuntime, DeviceThread
from hailo_devmgr.daemon.handlers import HANDLERS
from hailo_devmgr.daemon.settings import Settings
from test_config import CONFFILE, load_text


# ------------------------------------------------------------------ configuration

def test_new_sections_are_in_the_conffile_with_their_defaults():
    text = CONFFILE.read_text()
    for section in (cfg.ThermalConfig, cfg.DeviceConfig):
        for spec in fields(section):
            assert re.search(rf"^#?\s*{spec.name}:", text, re.M), f"{spec.name} is not in the conffile"
    assert re.search(r"^#keep_alive:\n#  default: -1$", text, re.M)
    defaults = cfg.Config()
    assert (defaults.thermal.limit_c, defaults.thermal.resume_c) == (80.0, 75.0)
    assert defaults.keep_alive == {"default": -1.0}
    assert defaults.device.scheduling_algorithm == "round_robin"


def test_model_types_in_config_match_the_handlers():
    assert set(cfg.MODEL_TYPES) == set(HANDLERS)


@pytest.mark.parametrize("text, message", [
    ("thermal: {limit_c: 70, resume_c: 75}", "thermal.resume_c: must be below thermal.limit_c (70.0)"),
    ("thermal: {interval_s: 0}", "thermal.interval_s: must be between 0.05 and 3600.0"),
    ("keep_alive: {chat: 5}", "keep_alive: keys are 'default' or a model type"),
    ("keep_alive: {default: soon}", "keep_alive: default: must be a number of seconds"),
    ("keep_alive: 300", "keep_alive: must be a mapping"),
    ("device: {scheduling_algorithm: fifo}", "device.scheduling_algorithm: must be one of round_robin, none"),
    ("device: {rebuild_attempts: -1}", "device.rebuild_attempts: must be between 0 and 1000"),
])
def test_new_keys_are_validated(tmp_path, text, message):
    with pytest.raises(cfg.ConfigError) as info:
        load_text(tmp_path, text)
    assert message in str(info.value)


def test_keep_alive_merges_with_the_default(tmp_path):
    config = load_text(tmp_path, "keep_alive: {default: 300, vlm_chat: 600}")
    assert config.keep_alive == {"default": 300.0, "vlm_chat": 600.0}
    assert load_text(tmp_path, "keep_alive: {whisper: 0}").keep_alive == {"default": -1.0, "whisper": 0.0}


# ------------------------------------------------------------------ rebuild schedule

class FakeBackend:
    """Opens fail while ``failures`` > 0; temperature from ``celsius``."""

    name = "fake"
    platform = None

    def __init__(self):
        self.failures = 0
        self.opened = 0
        self.celsius: float | None = 50.0

    def open_vdevice(self):
        if self.failures:
            self.failures -= 1
            raise BackendUnavailable("no device (fake)")
        self.opened += 1
        return object()

    def identify(self, vdevice):
        return DeviceIdentity("fake-0", "FAKE", "1.0")

    def temperature(self, vdevice):
        return self.celsius

    def close_vdevice(self, vdevice):
        pass


def runtime_with(backend, **device):
    return DeviceRuntime(backend, Settings(cfg.Config(
        device=cfg.DeviceConfig(**device), thermal=cfg.ThermalConfig(limit_c=80, resume_c=75, interval_s=1))))


def test_rebuild_backoff_doubles_up_to_the_max_then_gives_up(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("hailo_devmgr.daemon.device.time.monotonic", lambda: clock[0])
    backend = FakeBackend()
    runtime = runtime_with(backend, rebuild_attempts=4, rebuild_backoff_s=1, rebuild_backoff_max_s=3, retry_s=60)
    reopened = []
    runtime.on_open.append(lambda: reopened.append(clock[0]))
    assert runtime.open()
    runtime.mark_broken("lost (fake)")
    assert runtime.vdevice is None and runtime.runtime_faults == 1
    assert runtime.rebuild_due() == 1000.0  # the first attempt at once
    backend.failures = 10
    waits = []
    while runtime.rebuild_due() is not None:
        clock[0] = runtime.rebuild_due()
        before = clock[0]
        runtime.rebuild()
        if runtime.rebuild_due() is not None:
            waits.append(runtime.rebuild_due() - before)
    assert waits == [1, 2, 3]  # doubling, capped at rebuild_backoff_max_s; 4 attempts in all
    assert "rebuilding failed 4 times" in runtime.broken_reason
    with pytest.raises(p.RequestError) as info:
        runtime.require()  # within retry_s of the last attempt: no new one
    assert info.value.code == p.DEVICE_UNAVAILABLE and info.value.retry_after_ms is None
    backend.failures = 0
    clock[0] += 60
    assert runtime.require() is not None  # afterwards, on demand every retry_s
    assert runtime.runtime_recoveries == 0 and reopened == [1000.0, clock[0]]


def test_a_successful_rebuild_counts_a_recovery_and_runs_the_open_hooks(monkeypatch):
    backend = FakeBackend()
    runtime = runtime_with(backend)
    reopened = []
    runtime.on_open.append(lambda: reopened.append(True))
    runtime.open()
    runtime.mark_broken("lost")
    assert runtime.broken_reason == "runtime fault: lost; rebuilding the device"
    runtime.rebuild()
    assert runtime.vdevice is not None and runtime.broken_reason is None
    assert (runtime.runtime_faults, runtime.runtime_recoveries, len(reopened)) == (1, 1, 2)
    assert runtime.rebuild_due() is None


def test_without_rebuild_attempts_the_next_request_reopens():
    backend = FakeBackend()
    runtime = runtime_with(backend, rebuild_attempts=0, retry_s=0)
    runtime.open()
    runtime.mark_broken("lost")
    assert runtime.rebuild_due() is None
    assert runtime.require() is not None and backend.opened == 2


# ------------------------------------------------------------------ thermal guard

def test_thermal_guard_has_hysteresis_and_fails_open():
    backend = FakeBackend()
    runtime = runtime_with(backend)
    runtime.open()
    steps = [(79.9, False), (80.0, True), (77.0, True), (75.0, True), (74.9, False), (79.0, False),
             (95.0, True), (None, False)]
    for celsius, throttled in steps:
        backend.celsius = celsius
        runtime.refresh_temperature()
        assert runtime.throttled is throttled, celsius
        refusal = runtime.thermal_refusal()
        assert (refusal is not None) is throttled
    backend.celsius = 81
    runtime.refresh_temperature()
    refusal = runtime.thermal_refusal()
    assert refusal.code == p.OVERHEATED and refusal.retry_after_ms == 1000
    assert "81.0 °C" in refusal.message and "limit 80 °C" in refusal.message


def test_temperature_is_due_every_interval_while_open(monkeypatch):
    clock = [50.0]
    monkeypatch.setattr("hailo_devmgr.daemon.device.time.monotonic", lambda: clock[0])
    runtime = runtime_with(FakeBackend())
    assert runtime.temperature_due() is None  # no device, nothing to read
    runtime.open()
    assert runtime.temperature_due() == 51.0


# ------------------------------------------------------------------ chores

def test_device_thread_runs_due_chores_between_jobs():
    runtime = runtime_with(FakeBackend())
    ran = threading.Event()
    state = {"due": 0.0, "runs": 0}

    def run():
        state["runs"] += 1
        state["due"] = None
        ran.set()
    device = DeviceThread(runtime, chores=[Chore("test chore", lambda: state["due"], run, lambda: 5.0)])
    device.start(5.0)
    try:
        assert ran.wait(10)
        assert device.submit(lambda: 42, label="job", budget_s=5).future.result(10) == 42
        assert state["runs"] == 1
    finally:
        assert device.stop(10)


def test_a_failing_chore_check_is_logged_not_fatal(caplog):
    runtime = runtime_with(FakeBackend())

    def broken_due():
        raise RuntimeError("boom")
    device = DeviceThread(runtime, chores=[Chore("broken", broken_due, lambda: None, lambda: 1.0)])
    device.start(5.0)
    try:
        assert device.submit(lambda: "ok", label="job", budget_s=5).future.result(10) == "ok"
        assert device.health() is None
    finally:
        assert device.stop(10)
    assert "checking broken failed" in caplog.text


# ------------------------------------------------------------------ simulated Speech2Text

@pytest.fixture
def backend(tmp_path):
    settings = cfg.SimulatedConfig(load_ms=0, infer_ms=0, lock_path=str(tmp_path / "lock"))
    return SimulatedBackend(settings, cfg.DeviceConfig())


@pytest.fixture
def speech(backend, tmp_path):
    path = tmp_path / "whisper.hef"
    path.write_text("speech model")
    vdevice = backend.open_vdevice()
    model = backend.platform.genai.Speech2Text(vdevice, str(path))
    yield model
    model.release()
    vdevice.release()


def test_speech2text_segments_come_from_the_audio(backend, speech):
    task = backend.platform.genai.Speech2TextTask
    audio = np.linspace(-0.5, 0.5, 16000 * 11, dtype=np.float32)
    segments = speech.generate_all_segments(audio, task=task.TRANSCRIBE, language="en", timeout_ms=1000)
    assert [(s.start_sec, s.end_sec) for s in segments] == [(0.0, 5.0), (5.0, 10.0), (10.0, 11.0)]
    assert segments == speech.generate_all_segments(audio, task=task.TRANSCRIBE, language="en")
    translated = speech.generate_all_segments(audio, task=task.TRANSLATE, language="de")
    assert all("translation (de)" in s.text for s in translated)
    assert speech.generate_all_text(audio) == "".join(
        s.text for s in speech.generate_all_segments(audio, language=None))
    assert ("speech2text_load", speech._file.label) in backend.calls
    assert backend.memory_used_mb() == 512


@pytest.mark.parametrize("audio", [[0.1, 0.2], np.zeros(4, np.float64), np.zeros((2, 4), np.float32)])
def test_speech2text_wants_1d_float32(backend, speech, audio):
    # The binding's own checks (speech2text_api.cpp:35-42, v5.2.0): ValueError, not a status.
    with pytest.raises((TypeError, ValueError)):
        speech.generate_all_segments(audio)


def test_speech2text_timeout_and_faults(tmp_path):
    settings = cfg.SimulatedConfig(load_ms=0, infer_ms=50, lock_path=str(tmp_path / "lock"))
    backend = SimulatedBackend(settings, cfg.DeviceConfig())
    backend.sleep = lambda seconds: None
    path = tmp_path / "w.hef"
    path.write_text("speech")
    vdevice = backend.open_vdevice()
    model = backend.platform.genai.Speech2Text(vdevice, str(path))
    with pytest.raises(sim.HailoRTTimeout):
        model.generate_all_segments(np.zeros(16, np.float32), timeout_ms=10)
    backend.inject_fault("lose_device")
    with pytest.raises(sim.HailoCommunicationClosedException):
        model.generate_all_segments(np.zeros(16, np.float32))
    backend.clear_faults()
    backend.inject_fault("raise", status=81)
    with pytest.raises(sim.HailoRTStatusException, match="^81$"):
        backend.platform.genai.Speech2Text(vdevice, str(path))  # genai constructors: a bare number
    model.release()
    vdevice.release()


def test_scheduling_algorithm_none_reaches_the_vdevice_params(tmp_path):
    settings = cfg.SimulatedConfig(load_ms=0, infer_ms=0, lock_path=str(tmp_path / "lock"))
    backend = SimulatedBackend(settings, cfg.DeviceConfig(scheduling_algorithm="none"))
    vdevice = backend.open_vdevice()
    assert vdevice._params.scheduling_algorithm == 0
    vdevice.release()


def test_real_backend_sets_the_scheduling_algorithm_only_to_turn_it_off(tmp_path):
    import enum

    from hailo_devmgr.daemon.backends.hailo import HailoBackend
    from test_hailo_backend import importer_of, make_platform

    class HailoSchedulingAlgorithm(enum.IntEnum):
        NONE = 0
        ROUND_ROBIN = 1

    (tmp_path / "hailo0").touch()
    for setting, expected in (("none", HailoSchedulingAlgorithm.NONE), ("round_robin", 1)):
        module, record = make_platform()
        module.HailoSchedulingAlgorithm = HailoSchedulingAlgorithm
        backend = HailoBackend(cfg.DeviceConfig(scheduling_algorithm=setting), importer_of(module),
                               dev_dir=str(tmp_path), access=lambda path, mode: True)
        backend.open_vdevice()
        assert record.params.scheduling_algorithm == expected


def test_faults_right_after_a_rebuild_continue_the_series(monkeypatch):
    """A device that breaks again at once is not rebuilt forever without backoff."""
    clock = [0.0]
    monkeypatch.setattr("hailo_devmgr.daemon.device.time.monotonic", lambda: clock[0])
    runtime = runtime_with(FakeBackend(), rebuild_attempts=3, rebuild_backoff_s=2, rebuild_backoff_max_s=100,
                           retry_s=0)
    runtime.open()
    schedule = []
    for _ in range(3):
        runtime.mark_broken("lost")
        schedule.append(runtime.rebuild_due() - clock[0])
        clock[0] = runtime.rebuild_due()
        runtime.rebuild()
        assert runtime.vdevice is not None
        clock[0] += 1  # and it breaks again a second later
    assert schedule == [0, 2, 4]
    runtime.mark_broken("lost")
    assert runtime.rebuild_due() is None and "rebuild_attempts 3 used up" in runtime.broken_reason
    # A request reopens it; once it has worked for a while, a fault starts a new series.
    assert runtime.require() is not None
    clock[0] += 61
    runtime.mark_broken("lost again")
    assert runtime.rebuild_due() == clock[0]
