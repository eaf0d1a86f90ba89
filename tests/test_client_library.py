"""The client library as a service author uses it (issue 19): errors that say
whether a request may have run, reconnects, flow control, thread safety,
refusals that reach the client whatever it was sending, bounded shutdown."""
from __future__ import annotations

import asyncio
import inspect
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import SRC, DaemonProcess, die_with_parent, env_with_src, write_config
from hailo_devmgr.client import (AsyncClient, Client, ConnectionLost, DaemonUnreachable, DeviceError,
                                 NotConnected, RequestTimeout, tensor)

IMAGE = np.zeros((224, 224, 3), np.uint8)


def generic_input(array=IMAGE) -> dict:
    return {"inputs": {"input_layer1": array}}


def slow(ms: int) -> dict:
    return {"simulate_ms": ms}


def test_a_daemon_that_is_not_there_is_not_connected(tmp_path):
    with pytest.raises(NotConnected) as caught:
        Client(str(tmp_path / "none.sock")).ping()
    assert isinstance(caught.value, DaemonUnreachable)   # the older name still catches it

    async def scenario():
        await AsyncClient(str(tmp_path / "none.sock")).ping()
    with pytest.raises(NotConnected):
        asyncio.run(scenario())


def test_a_daemon_dying_after_the_request_was_sent_is_connection_lost(start_daemon, model_dir):
    daemon = start_daemon()
    path = str(model_dir / "net.hef")
    client = Client(daemon.socket_path, timeout=30)
    client.load_model(path, "generic")
    threading.Timer(0.5, daemon.process.kill).start()
    with pytest.raises(ConnectionLost):
        client.infer(path, {"inputs": {"input_layer1": tensor(IMAGE)}}, "generic", slow(5000))


@pytest.mark.parametrize("kind", ["blocking", "async v1", "async v2"])
def test_a_client_timeout_is_a_request_timeout_and_never_crosses_answers(daemon, model_dir, kind):
    path = str(model_dir / "net.hef")
    if kind == "blocking":
        client = Client(daemon.socket_path, timeout=0.3)
        with pytest.raises(RequestTimeout):
            client.infer(path, {"inputs": {"input_layer1": tensor(IMAGE)}}, "generic", slow(1500))
        assert "loaded_models" in client.status()     # its own answer, not the late infer's
        return

    async def scenario():
        client = AsyncClient(daemon.socket_path, timeout=0.3, pipelining=kind == "async v2")
        with pytest.raises(RequestTimeout):
            await client.infer(path, generic_input(), "generic", slow(1500))
        status = await client.status()
        await client.close()
        return status
    assert "loaded_models" in asyncio.run(scenario())


def test_the_blocking_client_carries_on_across_a_daemon_restart(tmp_path, model_dir):
    config = write_config(tmp_path, model_dir)
    socket_path = str(tmp_path / "sock" / "device.sock")
    client = Client(socket_path, timeout=30)
    first = DaemonProcess(tmp_path, config, socket_path).wait_ready()
    assert client.ping()["status"] == "ok"
    first.stop()
    second = DaemonProcess(tmp_path, config, socket_path).wait_ready()
    try:
        assert client.ping()["status"] == "ok"   # the request after the restart, not the one after that
    finally:
        client.close()
        second.stop()


def test_the_async_client_queues_within_the_daemons_limit_most_urgent_first(start_daemon, model_dir):
    daemon = start_daemon(scheduling={"max_inflight_per_connection": 4}, simulated={"infer_ms": 10})
    path = str(model_dir / "net.hef")
    finished: list[str] = []

    async def one(client, priority: str, index: int):
        await client.infer(path, generic_input(), "generic", priority=priority)
        finished.append(f"{priority} {index}")

    async def scenario():
        async with AsyncClient(daemon.socket_path, timeout=60) as client:
            await client.load_model(path, "generic")
            batch = [asyncio.ensure_future(one(client, "batch", i)) for i in range(300)]
            await asyncio.sleep(0.2)
            urgent = [asyncio.ensure_future(one(client, "interactive", i)) for i in range(3)]
            await asyncio.gather(*batch, *urgent)   # a busy answer would raise here
    asyncio.run(scenario())
    assert len(finished) == 303
    # Behind at most the requests already in flight, not behind the whole batch.
    assert max(finished.index(f"interactive {i}") for i in range(3)) < finished.index("batch 299") - 200


@pytest.mark.parametrize("kind", ["blocking", "async v1"])
def test_busy_past_the_connection_limit_reaches_a_client_sending_a_large_request(start_daemon, model_dir, kind):
    daemon = start_daemon(max_connections_per_uid=2)
    path = str(model_dir / "net.hef")
    big = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)   # 8 MB as base64
    holders = [Client(daemon.socket_path, timeout=10) for _ in range(2)]
    for holder in holders:
        holder.ping()
    try:
        if kind == "blocking":
            with pytest.raises(DeviceError) as caught:
                Client(daemon.socket_path, timeout=10).infer(path, {"inputs": {"input_layer1": tensor(big)}},
                                                             "generic")
        else:
            async def scenario():
                await AsyncClient(daemon.socket_path, timeout=10, pipelining=False).infer(
                    path, generic_input(big), "generic")
            with pytest.raises(DeviceError) as caught:
                asyncio.run(scenario())
        assert caught.value.code == "busy" and caught.value.retry_after_ms
    finally:
        for holder in holders:
            holder.close()


def test_one_blocking_client_shared_by_eight_threads(daemon, model_dir):
    path = str(model_dir / "two.hef")
    inputs = [{"a": tensor(np.full((4, 4, 3), i, np.uint8)), "b": tensor(np.full(8, i, np.float32))}
              for i in range(8 * 25)]
    with Client(daemon.socket_path, timeout=30) as alone:
        expected = [alone.infer(path, {"inputs": item}, "generic")["result"]["outputs"]["sum"] for item in inputs]
    shared = Client(daemon.socket_path, timeout=30)
    got: dict[int, np.ndarray] = {}
    errors: list[Exception] = []

    def work(first: int):
        try:
            for index in range(first, len(inputs), 8):
                got[index] = shared.infer(path, {"inputs": inputs[index]}, "generic")["result"]["outputs"]["sum"]
        except Exception as exc:  # any error fails the test below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    shared.close()
    assert errors == []
    assert all(np.array_equal(got[i], expected[i]) for i in range(len(inputs)))


def test_model_type_is_required_and_signatures_are_real():
    client = Client("/nonexistent.sock")
    with pytest.raises(TypeError):
        client.load_model("/models/net.hef")
    with pytest.raises(TypeError):
        client.unload_model("/models/net.hef")
    for cls in (Client, AsyncClient):
        parameters = inspect.signature(cls).parameters
        assert {"socket_path", "timeout", "max_message_bytes", "reconnect_s"} <= set(parameters)
    assert "transport" in inspect.signature(AsyncClient).parameters


HAMMER = """
import asyncio, sys
import numpy as np
from hailo_devmgr.client import AsyncClient, DeviceError, DaemonUnreachable
hints = set()
async def main():
    client = AsyncClient(sys.argv[1], timeout=20)
    image = np.zeros((224, 224, 3), np.uint8)
    async def loop():
        while True:
            try:
                await client.infer(sys.argv[2], {"inputs": {"input_layer1": image}}, "generic")
            except DeviceError as exc:
                if exc.code != "shutting_down":
                    raise
                hints.add(exc.retry_after_ms)   # resent at once, as a careless service would
            except DaemonUnreachable:
                return
    print("running", flush=True)
    await asyncio.gather(*(loop() for _ in range(16)))
asyncio.run(main())
print(sorted(hints, key=str))
"""


def test_shutdown_under_v2_traffic_is_bounded_and_says_when_to_retry(start_daemon, model_dir):
    daemon = start_daemon(simulated={"infer_ms": 5})
    path = str(model_dir / "net.hef")
    hammers = [subprocess.Popen([sys.executable, "-c", HAMMER, daemon.socket_path, path], env=env_with_src(),
                                stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent) for _ in range(3)]
    for hammer in hammers:
        assert hammer.stdout.readline().strip() == "running"
    time.sleep(1)
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    daemon.process.wait(30)
    took = time.monotonic() - started
    hints = [hammer.communicate(timeout=30)[0].strip().splitlines()[-1] for hammer in hammers]
    assert took < 10, took
    assert daemon.process.returncode == 0
    assert any(hint == "[1000]" for hint in hints), hints   # no None: every shutting_down has a hint


def test_a_stopping_daemon_leaves_the_next_daemons_socket_alone(tmp_path, model_dir):
    config = write_config(tmp_path, model_dir)
    socket_path = str(tmp_path / "sock" / "device.sock")
    old = DaemonProcess(tmp_path, config, socket_path).wait_ready()
    path = str(model_dir / "net.hef")
    busy = threading.Thread(target=lambda: _quietly(lambda: Client(socket_path, timeout=30).infer(
        path, {"inputs": {"input_layer1": tensor(IMAGE)}}, "generic", slow(2500))))
    busy.start()
    time.sleep(0.5)
    old.signal(signal.SIGTERM)          # it stops accepting, then waits for the running inference
    new = DaemonProcess(tmp_path, config, socket_path)
    try:
        new.wait_ready()
        old.process.wait(30)
        busy.join(30)
        assert Client(socket_path, timeout=10).ping()["status"] == "ok"
    finally:
        new.stop()
        old.stop()


def _quietly(call) -> None:
    try:
        call()
    except (DeviceError, DaemonUnreachable):
        pass


def test_the_module_reference_is_complete():
    """help() shows what a service author needs: the errors and what they mean."""
    import hailo_devmgr.client as module
    for name in ("NotConnected", "ConnectionLost", "RequestTimeout", "DeviceError"):
        assert name in module.__doc__
    assert SRC


def test_cancellations_under_load_never_cross_answers(start_daemon, model_dir):
    daemon = start_daemon(scheduling={"max_inflight_per_connection": 16}, simulated={"infer_ms": 2})
    path = str(model_dir / "two.hef")
    inputs = [{"a": np.full((4, 4, 3), i % 256, np.uint8), "b": np.full(8, i, np.float32)} for i in range(300)]
    with Client(daemon.socket_path, timeout=30) as alone:
        expected = [alone.infer(path, {"inputs": {k: tensor(v) for k, v in item.items()}},
                                "generic")["result"]["outputs"]["sum"] for item in inputs[:40]]

    async def scenario():
        rng = np.random.default_rng(7)
        async with AsyncClient(daemon.socket_path, timeout=30) as client:
            tasks = [asyncio.ensure_future(client.infer(path, {"inputs": inputs[i % 40]}, "generic"))
                     for i in range(300)]
            for index in rng.choice(300, 100, replace=False):
                await asyncio.sleep(float(rng.uniform(0, 0.003)))
                tasks[index].cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            after = await client.infer(path, {"inputs": inputs[3]}, "generic")
        return done, after
    done, after = asyncio.run(scenario())
    answered = [(i, answer) for i, answer in enumerate(done) if isinstance(answer, dict)]
    assert all(isinstance(answer, (dict, asyncio.CancelledError)) for answer in done), \
        [repr(answer) for answer in done if not isinstance(answer, (dict, asyncio.CancelledError))]
    assert len(answered) >= 200
    for index, answer in answered:
        assert np.array_equal(answer["result"]["outputs"]["sum"], expected[index % 40]), index
    assert np.array_equal(after["result"]["outputs"]["sum"], expected[3])


def test_timeout_ms_running_out_during_the_inference_is_a_timeout(daemon, model_dir):
    """One code for one cause: a deadline that passes on the device is `timeout`, as in the queue."""
    path = str(model_dir / "net.hef")
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic")
        with pytest.raises(DeviceError) as caught:
            client.infer(path, {"inputs": {"input_layer1": tensor(IMAGE)}}, "generic", slow(1500),
                         timeout_ms=300)
        assert caught.value.code == "timeout", caught.value
        assert client.infer(path, {"inputs": {"input_layer1": tensor(IMAGE)}}, "generic")["status"] == "ok"


def test_a_request_cancelled_before_its_frame_was_written_frees_its_slot(daemon, model_dir):
    """No answer comes for a frame never written: its flow-control slot and its
    pending entry must go at once, or the client stalls after 63 of them."""
    path = str(model_dir / "net.hef")

    async def scenario():
        async with AsyncClient(daemon.socket_path, timeout=30, transport="shm") as client:
            await client.infer(path, generic_input(), "generic")        # buffers registered
            big = np.zeros((1024, 1024, 3), np.uint8)
            for _ in range(3):
                async with client._buffers_lock:                       # the frame cannot be packed yet
                    task = asyncio.ensure_future(client.infer(path, generic_input(big), "generic"))
                    await asyncio.sleep(0.05)
                    task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return client._slots.used, dict(client._pending), await client.infer(path, generic_input(), "generic")
    used, pending, after = asyncio.run(scenario())
    assert (used, pending) == (0, {})
    assert after["status"] == "ok"


def test_a_large_request_with_non_ascii_text_is_not_held_back_by_its_own_bytes(start_daemon, model_dir):
    """Its own (wide) decoding cost is not an unread answer."""
    daemon = start_daemon(max_pending_bytes_per_uid=4 * 1024 * 1024, max_message_bytes=4 * 1024 * 1024,
                          frame_timeout_s=3)
    started = time.monotonic()
    with Client(daemon.socket_path, timeout=30) as client:
        answer = client.load_model(str(model_dir / "net.hef"), "generic", {"note": "café " + "x" * 1_500_000})
    assert answer["status"] == "ok"
    assert time.monotonic() - started < 2.5
