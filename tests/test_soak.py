"""A short run of bench/soak.py (``make soak`` runs it for minutes), and its own checks.

No timing is asserted: only that no answer was lost, crossed or
unexpected, that every kind of request was made, and that the daemon's
descriptors came back to where they started.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("soak", module)
    spec.loader.exec_module(module)
    return module


soak = load_soak()


def test_short_soak_loses_crosses_and_leaks_nothing():
    figures = soak.run(seconds=10, clients=8, seed=7)
    soak.print_table(figures)  # shown with -s, or when it fails
    assert figures["problems"] == [] and figures["ok"], figures
    assert (figures["lost"], figures["crossed"], figures["unexpected"], figures["hung_clients"]) == (0, 0, 0, 0)
    assert figures["fds"]["end"] <= figures["fds"]["start"], figures["fds"]
    assert figures["daemon_alive"] and figures["daemon_tracebacks"] == 0
    scenarios = figures["scenarios"]
    for model_type in soak.MODEL_TYPES:
        assert scenarios.get(f"infer {model_type}"), f"no infer {model_type} in {scenarios}"
    for kind in ("ping", "status", "device_status", "bad: path outside (link)", "bad: tensor shape",
                 "disconnect mid-frame", "disconnect before the answer", "too_large, then closed"):
        assert scenarios.get(kind), f"no {kind!r} in {scenarios}"
    outcomes = figures["outcomes"]
    for code in ("forbidden", "model_not_found", "bad_request", "unknown_action", "too_large"):
        assert outcomes.get(f"expected {code}"), outcomes


class FakeConn:
    """Answers from a script instead of a daemon, to see the soak's checks fire."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.sent = []

    def ask(self, message):
        self.sent.append(message)
        answer = self.answers.pop(0)
        return answer(message) if callable(answer) else answer

    def close(self):
        pass


def client_with(answers) -> tuple:
    tally = soak.Tally()
    client = soak.Client(3, "/nonexistent", {"small": "/m/small.hef", "vlm": "/m/vlm.hef",
                                             "speech": "/m/speech.hef", "escape": "/m/escape.hef",
                                             "missing": "/m/missing.hef"},
                         deadline=0, tally=tally, references={}, seed=1)
    client.conn = FakeConn(answers)
    return client, tally


def echo(payload):
    return lambda message: {"status": "ok", "request_id": message["request_id"], **payload}


def test_an_answer_for_another_request_counts_as_crossed():
    client, tally = client_with([{"status": "ok", "request_id": "c99-1", "loaded_models": [],
                                  "uptime_seconds": 1}])
    client.ask("ping", {"action": "ping"}, client.ok(lambda a: True))
    assert tally.outcomes == {"crossed": 1}


def test_a_changed_result_for_the_same_input_counts_as_crossed():
    good = {"result": {"dtype": "float32", "shape": [4], "data_b64": "AAAAAAAAAAAAAAAAAAAAAA=="}}
    other = {"result": {"dtype": "float32", "shape": [4], "data_b64": "AACAPwAAAAAAAAAAAAAAAA=="}}
    client, tally = client_with([echo(good), echo(good), echo(other)])
    for _ in range(3):
        client.ask("infer depth", {"action": "infer"},
                   client.crossed_or(("depth", 3, 0), lambda r: soak.is_tensor(r, [4])))
    assert tally.outcomes == {"ok": 2, "crossed": 1}


def test_a_wrong_code_or_shape_is_unexpected_and_a_missing_answer_lost():
    def lost(message):
        raise soak.Lost("the daemon closed the connection")
    client, tally = client_with([echo({"code": "busy", "error": "later"}),
                                 echo({"result": "text"}), lost])
    client.ask("bad", {"action": "load_model"}, client.error("forbidden"))
    client.ask("infer depth", {"action": "infer"}, client.ok(lambda a: soak.is_tensor(a.get("result"), [4])))
    client.ask("ping", {"action": "ping"}, client.ok(lambda a: True))
    assert tally.outcomes == {"unexpected": 2, "lost": 1}
    assert len(tally.problems) == 3


@pytest.mark.parametrize("value, shape, ok", [
    ({"dtype": "float32", "shape": [2], "data_b64": "AAAAAAAAAAA="}, [2], True),
    ({"dtype": "float32", "shape": [2], "data_b64": "AAAA"}, [2], False),
    ({"dtype": "uint8", "shape": [2], "data_b64": "AAA="}, [2], False),
    ("text", [2], False),
])
def test_tensor_shape_check(value, shape, ok):
    assert soak.is_tensor(value, shape) is ok


def test_the_simulated_operation_log_is_bounded():
    """Found by the soak: backend.calls grew by one entry per operation for the
    daemon's lifetime (the RSS kept climbing)."""
    from hailo_devmgr.daemon.backends import simulated
    from hailo_devmgr.daemon.config import SimulatedConfig
    chip = simulated._SimulatedChip(SimulatedConfig())
    for index in range(simulated.CALL_LOG_ENTRIES + 500):
        chip.record("run", index)
    log = chip.call_log()
    assert len(log) == simulated.CALL_LOG_ENTRIES and log[-1] == ("run", simulated.CALL_LOG_ENTRIES + 499)
    assert isinstance(log, list)
