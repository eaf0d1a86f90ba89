"""Requests for one model that wait in a row share one device call (a batch).

Through the socket: requests queued behind a slow one run together, each
gets its own answer (the same as alone), an input the model cannot take
fails alone, and status counts what shared a call.
"""
from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from hailo_devmgr.client import Client, tensor
from hailo_devmgr.daemon import actions
from hailo_devmgr.daemon import hailort_status as hs
from hailo_devmgr.daemon import registry as reg
from hailo_devmgr.daemon.backends.simulated import SimulatedBackend
from hailo_devmgr.daemon.config import Config, DeviceConfig, SchedulingConfig, SimulatedConfig, WatchdogConfig
from hailo_devmgr.daemon.device import DeviceRuntime
from hailo_devmgr.daemon.handlers import HANDLERS, InputLimits, network
from hailo_devmgr.daemon.model_files import resolve_model_path
from hailo_devmgr.daemon.settings import Settings
from hailo_devmgr.wire import protocol as p
from test_daemon_models import wait_until
from test_daemon_scheduling import Raw, infer, wait_busy


def two_inputs(model_dir, request_id: str, seed: int, b_length: int = 8) -> dict:
    """An infer of two.hef (inputs a: 4x4x3 uint8, b: 8 float32) with inputs made from ``seed``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    b = rng.standard_normal(b_length).astype(np.float32)
    return {"action": "infer", "model_type": "generic", "model_path": str(model_dir / "two.hef"),
            "request_id": request_id, "input_data": {"inputs": {"a": tensor(a), "b": tensor(b)}}}


def queued(daemon) -> int:
    with Client(daemon.socket_path, timeout=10) as client:
        return client.status()["queue_depth"]


def warm(daemon, model_dir) -> None:
    """Load two.hef and run it once: batches need its time per request."""
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(str(model_dir / "two.hef"), "generic")
        raw = Raw(daemon.socket_path)
        raw.send(two_inputs(model_dir, "warm", seed=99))
        assert raw.read()["status"] == "ok"
        raw.close()
        assert client.status()["batched_requests"] == 0


def test_requests_queued_behind_a_slow_one_share_a_call_and_each_gets_its_own_answer(start_daemon, model_dir):
    # (max_batch_ms: however slowly this machine ran the first request)
    daemon = start_daemon(simulated={"infer_ms": 0}, scheduling={"max_batch_ms": 1000})
    warm(daemon, model_dir)
    blocker = Raw(daemon.socket_path)
    blocker.send(infer(model_dir, request_id="blocker", simulate_ms=1500))   # runs alone
    wait_busy(daemon)
    # Six requests from two connections wait behind it; one has a b of the wrong length.
    connections = [Raw(daemon.socket_path), Raw(daemon.socket_path)]
    sent = {}
    for index in range(6):
        message = two_inputs(model_dir, f"r{index}", seed=index, b_length=7 if index == 3 else 8)
        connections[index % 2].send(message)
        sent[message["request_id"]] = message
    wait_until(lambda: queued(daemon) == 6, what="six queued requests")
    answers = {}
    for index in range(6):
        answer = connections[index % 2].read()
        answers[answer["request_id"]] = answer
    assert blocker.read()["status"] == "ok"

    bad = answers.pop("r3")
    assert bad["code"] == p.BAD_REQUEST
    assert "'b'" in bad["error"], bad
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.status()["batched_requests"] == 6   # the bad one was in the batch, and failed alone
    # Each answer is what the same request gets when it runs alone.
    alone = Raw(daemon.socket_path)
    for request_id, answer in sorted(answers.items()):
        assert answer["status"] == "ok", answer
        alone.send(sent[request_id])
        by_itself = alone.read()
        assert by_itself["result"] == answer["result"], request_id
    assert len({str(answer["result"]) for answer in answers.values()}) == 5   # five inputs, five results
    for connection in (blocker, alone, *connections):
        connection.close()


def test_requests_with_their_own_deadline_run_alone(start_daemon, model_dir):
    daemon = start_daemon(simulated={"infer_ms": 0})
    warm(daemon, model_dir)
    blocker = Raw(daemon.socket_path)
    blocker.send(infer(model_dir, request_id="blocker", simulate_ms=1000))
    wait_busy(daemon)
    connection = Raw(daemon.socket_path)
    for index in range(3):
        connection.send({**two_inputs(model_dir, f"r{index}", seed=index), "timeout_ms": 60_000})
    answers = [connection.read() for _ in range(3)]
    assert [answer["status"] for answer in answers] == ["ok"] * 3
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.status()["batched_requests"] == 0
    blocker.close()
    connection.close()


# ------------------------------------------------- in-process: the shared call

def simulated_config(tmp_path, **fields) -> Config:
    return Config(max_loaded_models=4, simulated=SimulatedConfig(load_ms=0, infer_ms=0,
                                                                   lock_path=str(tmp_path / "lock")), **fields)


@pytest.fixture
def runtime(tmp_path):
    yield from opened(simulated_config(tmp_path))


def opened(config):
    runtime = DeviceRuntime(SimulatedBackend(config.simulated, DeviceConfig()), Settings(config))
    assert runtime.open()
    yield runtime
    runtime.close()


def calls_for(registry, model_dir, count: int, bad: tuple = ()) -> list[actions.InferCall]:
    path = str(model_dir / "two.hef")
    spec = reg.ModelSpec("generic", path, resolve_model_path(path, (str(model_dir),)), {}, HANDLERS["generic"])
    calls = []
    for index in range(count):
        data = two_inputs(model_dir, f"r{index}", seed=index, b_length=7 if index in bad else 8)["input_data"]
        request = actions.DeviceRequest("infer", "generic", path, spec=spec,
                                        inputs=HANDLERS["generic"].parse_input(data, InputLimits()),
                                        log_fields={"CLIENT_UID": 1000})
        calls.append(actions.InferCall(request, registry, WatchdogConfig(), None))
    return calls


def test_a_batch_is_as_large_as_its_results_and_its_device_time_allow(runtime, model_dir, monkeypatch):
    registry = reg.ModelRegistry(runtime, runtime.settings)
    [call] = calls_for(registry, model_dir, 1)
    assert call.batch_limit() == 1                    # not loaded: the first request loads it, alone
    registry.load(call.request.spec, call.request.log_fields)
    assert call.batch_limit() == 1                    # loaded, never run: its time is unknown
    call()
    [model] = registry._models.values()
    for frame_ms, limit in ((0.001, 8), (0.5, 4), (0.9, 2), (1.5, 1), (40.0, 1)):
        model.frame_ms = frame_ms                     # within scheduling.max_batch_ms (2) of device time
        assert call.batch_limit() == limit, frame_ms
    runtime.settings.replace(replace(runtime.settings.config, scheduling=SchedulingConfig(max_batch_ms=0)))
    model.frame_ms = 0.001
    assert call.batch_limit() == 1                    # 0: never
    runtime.settings.replace(replace(runtime.settings.config, scheduling=SchedulingConfig()))
    monkeypatch.setattr(network, "MAX_BATCH_RESULT_BYTES", 100)   # read when a model loads
    registry.release_all()
    call()
    [model] = registry._models.values()
    model.frame_ms = 0.001
    assert call.batch_limit() == 2                    # two results of 48 bytes


@pytest.fixture
def patient_runtime(tmp_path):
    """Batches of 8 however slow this machine runs the model."""
    yield from opened(simulated_config(tmp_path, scheduling=SchedulingConfig(max_batch_ms=1000)))


def test_a_failed_shared_call_fails_each_request_with_its_own_error(patient_runtime, model_dir):
    runtime = patient_runtime
    registry = reg.ModelRegistry(runtime, runtime.settings)
    calls = calls_for(registry, model_dir, 4, bad=(1,))
    assert calls[0].batch_key == calls[3].batch_key is not None
    calls[0]()                                        # loads the model (alone), and runs
    assert calls[0].batch_limit() == 8                # 48 bytes of results per request: 8 at most
    runtime.backend.inject_fault("raise", status=hs.QUEUE_IS_FULL)   # the next device call fails
    outcomes = actions.InferCall.run_batch(calls)
    assert [result for result, _ in outcomes] == [None] * 4
    errors = [error for _, error in outcomes]
    assert errors[1].code == p.BAD_REQUEST            # its own input: refused before the call
    shared = [errors[index] for index in (0, 2, 3)]
    assert {(error.code, error.message) for error in shared} == {(shared[0].code, shared[0].message)}
    assert "HAILO_QUEUE_IS_FULL" in shared[0].message and "loads again on the next request" in shared[0].message
    assert len({id(error) for error in shared}) == 3  # one exception object per request
    assert registry.snapshot == ()                    # the call shut the model down: unloaded
    # The next batch loads it again (the first call, alone) and runs the others together.
    outcomes = actions.InferCall.run_batch(calls_for(registry, model_dir, 3))
    assert [error for _, error in outcomes] == [None] * 3
    assert outcomes[0][0][2] > 0 and outcomes[1][0][2] == outcomes[2][0][2] == 0   # load_ms: the first loaded it
    assert [model["uses"] for model in registry.snapshot] == [3]


def test_a_batchs_time_per_request_counts_binding_its_inputs(patient_runtime, model_dir, monkeypatch):
    """Inputs that must be copied to the model's layout (CHW sent to an HWC
    model) cost the device thread that time in a batch too: it counts in the
    time per request that sizes the next batches, as it does alone."""
    registry = reg.ModelRegistry(patient_runtime, patient_runtime.settings)
    calls = calls_for(registry, model_dir, 3)
    calls[0]()
    handler_cls = HANDLERS["generic"]
    bind = handler_cls.bind
    # The registry's clock moves only while inputs are bound: 20 ms each.
    clock = [0.0]
    monkeypatch.setattr(reg, "time", SimpleNamespace(perf_counter=lambda: clock[0], time=time.time,
                                                     monotonic=time.monotonic))

    def slow_bind(self, inputs):
        clock[0] += 0.020
        return bind(self, inputs)
    monkeypatch.setattr(handler_cls, "bind", slow_bind)
    [model] = registry._models.values()
    model.frame_ms = 0.0
    outcomes = actions.InferCall.run_batch(calls[1:])
    assert [error for _, error in outcomes] == [None, None]
    # 20 ms a request, with the moving average's weight (a fifth) from 0.
    assert model.frame_ms == pytest.approx(reg.FRAME_MS_WEIGHT * 20)


def test_a_request_running_in_a_batch_is_running_for_cancel(start_daemon, model_dir):
    daemon = start_daemon(simulated={"infer_ms": 200}, scheduling={"max_batch_ms": 1000})
    warm(daemon, model_dir)                            # 200 ms a request: batches of up to 5
    blocker = Raw(daemon.socket_path)
    blocker.send(infer(model_dir, request_id="blocker", simulate_ms=500))
    wait_busy(daemon)
    connection = Raw(daemon.socket_path)
    for index in range(3):
        connection.send(two_inputs(model_dir, f"r{index}", seed=index))
    with Client(daemon.socket_path, timeout=30) as client:
        wait_until(lambda: "(a batch of 3)" in (client.status()["device_busy_with"] or ""), what="the batch")
    connection.send({"action": "cancel", "target": "r1", "request_id": "c"})
    answers = {answer["request_id"]: answer for answer in (connection.read() for _ in range(4))}
    assert (answers["c"]["state"], answers["c"]["cancelled"]) == ("running", False)
    assert [answers[f"r{index}"]["status"] for index in range(3)] == ["ok"] * 3
    blocker.close()
    connection.close()
