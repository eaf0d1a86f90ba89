"""Faults a long-running daemon must survive: an exception storm, SIGTERM with
100 requests queued, and SIGKILL mid-request with the client reconnecting."""
from __future__ import annotations

import asyncio
import signal
import threading
import time

import numpy as np

from conftest import DaemonProcess
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import AsyncClient, Client, DaemonUnreachable

SMALL = np.zeros((224, 224, 3), np.uint8)


def test_an_exception_storm_fails_only_those_requests(start_daemon, model_dir):
    # All 100 in flight at once: under the default limit (64) a slow machine
    # answers some with `busy` before the device sees them.
    daemon = start_daemon(simulated={"load_ms": 1, "infer_ms": 0}, scheduling={"max_inflight_per_connection": 128})
    path = str(model_dir / "net.hef")

    async def storm():
        async with AsyncClient(daemon.socket_path, timeout=60) as client:
            await client.load_model(path, "generic")
            await client.request("simulate", fault={"kind": "raise", "status": 26, "count": 100})
            answers = await asyncio.gather(
                *(client.infer(path, {"inputs": {"input_layer1": SMALL}}, "generic") for _ in range(100)),
                return_exceptions=True)
            # Requests that waited in a row share a device call (a batch): fewer
            # calls than requests may have consumed the faults. The rest go.
            await client.request("simulate", clear_faults=True)
            after = await client.infer(path, {"inputs": {"input_layer1": SMALL}}, "generic")
            return answers, after

    answers, after = asyncio.run(storm())
    codes = {getattr(answer, "code", None) for answer in answers}
    # Each of the 100 answered with its own error: the first failed run unloads the
    # model (HailoRT shuts a model down after a failed submit), so later ones may fail
    # loading it again while the faults last.
    assert p.INFERENCE_FAILED in codes and codes <= {p.INFERENCE_FAILED, p.LOAD_FAILED}
    assert after["result"]["outputs"]["output_layer1"].shape == (512,)
    with Client(daemon.socket_path, timeout=10) as client:
        assert client.status()["runtime_broken_reason"] is None


def test_sigterm_with_100_queued_requests_answers_every_one(start_daemon, model_dir):
    daemon = start_daemon(simulated={"load_ms": 1, "infer_ms": 20},
                          scheduling={"max_inflight_per_connection": 128})
    path = str(model_dir / "net.hef")

    async def queue_and_stop():
        async with AsyncClient(daemon.socket_path, timeout=60) as client:
            await client.load_model(path, "generic")
            pending = [asyncio.ensure_future(client.infer(path, {"inputs": {"input_layer1": SMALL}}, "generic"))
                       for _ in range(100)]
            await asyncio.sleep(0.3)  # some have run, most wait
            daemon.signal(signal.SIGTERM)
            return await asyncio.gather(*pending, return_exceptions=True)

    answers = asyncio.run(queue_and_stop())
    done = [answer for answer in answers if isinstance(answer, dict)]
    refused = [answer for answer in answers if getattr(answer, "code", None) == p.SHUTTING_DOWN]
    others = [repr(answer)[:200] for answer in answers
              if not isinstance(answer, dict) and getattr(answer, "code", None) != p.SHUTTING_DOWN]
    assert len(done) + len(refused) == 100, others
    assert done and refused
    assert daemon.process.wait(15) == 0


def test_sigkill_mid_request_is_an_error_then_the_client_reconnects(tmp_path, model_dir):
    from conftest import write_config
    config = write_config(tmp_path, model_dir)
    socket_path = str(tmp_path / "sock" / "device.sock")
    first = DaemonProcess(tmp_path, config, socket_path).wait_ready()
    client = Client(socket_path, timeout=30, reconnect_s=30)
    errors = []

    def slow():
        try:
            client.infer(str(model_dir / "net.hef"), {"inputs": {"input_layer1": SMALL}}, "generic",
                         {"simulate_ms": 5000})
        except DaemonUnreachable as exc:
            errors.append(exc)

    worker = threading.Thread(target=slow)
    worker.start()
    time.sleep(1.0)
    first.process.kill()
    worker.join(30)
    assert len(errors) == 1  # an error at once, not a hang
    first.stop()

    # The client tries while nobody listens; the daemon comes back a second
    # later (started from this thread: PDEATHSIG ties it to the starting thread).
    answers: list = []
    pinger = threading.Thread(target=lambda: answers.append(client.ping()))
    pinger.start()
    time.sleep(1.0)
    restarted = DaemonProcess(tmp_path, config, socket_path).wait_ready()
    try:
        pinger.join(30)
        assert answers and answers[0]["status"] == "ok"  # reconnected once the socket accepted again
    finally:
        client.close()
        restarted.stop()


def test_the_async_client_opens_a_new_connection_after_a_restart(tmp_path, model_dir):
    """A v2 connection the daemon closed is replaced by the next request, which
    none of it had reached the daemon, so it goes again on the new connection
    (and registers its shared-memory buffers anew)."""
    from conftest import write_config
    config = write_config(tmp_path, model_dir, simulated={"load_ms": 1, "infer_ms": 0})
    socket_path = str(tmp_path / "sock" / "device.sock")
    path = str(model_dir / "net.hef")
    big = np.zeros((224, 224, 3), np.uint8)

    async def infer(client):
        return await client.infer(path, {"inputs": {"input_layer1": big}}, "generic")

    async def before(client):
        await client.connect()
        assert (await infer(client))["status"] == "ok"

    async def after(client):
        try:
            return await infer(client), await client.status()
        finally:
            await client.close()

    client = AsyncClient(socket_path, transport="shm", timeout=30)
    loop = asyncio.new_event_loop()
    try:
        first = DaemonProcess(tmp_path, config, socket_path).wait_ready()
        loop.run_until_complete(before(client))
        first.stop()
        second = DaemonProcess(tmp_path, config, socket_path).wait_ready()
        try:
            answer, status = loop.run_until_complete(after(client))
        finally:
            second.stop()
    finally:
        loop.close()
    assert answer["status"] == "ok"
    assert [c["shm_buffers"] for c in status["clients"] if c["protocol"] == 2] == [1]
