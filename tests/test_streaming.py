"""Streamed generation over protocol v2 (issue 17, part 1): ``infer`` with
``"stream": true`` answers chunk frames, then one final frame; cancel and a
client that goes away stop the generation on the device; a client that does
not read never holds the device (streaming.TokenStream's bound)."""
from __future__ import annotations

import asyncio
import time

import pytest

from hailo_devmgr.client import Client
from hailo_devmgr.daemon import streaming
from wire import Raw

PROMPT = {"prompt": "tell me a long story", "max_generated_tokens": 8}


@pytest.fixture
def llm(model_dir):
    (model_dir / "llm.hef").write_text("context_capacity: 4096\n")
    return str(model_dir / "llm.hef")


def stream_request(path: str, inputs: dict, request_id="s1") -> dict:
    return {"action": "infer", "model_type": "llm", "model_path": path, "input_data": inputs,
            "stream": True, "request_id": request_id}


def read_stream(raw: Raw, request_id="s1") -> tuple[list[str], dict]:
    """Chunks until the final frame of ``request_id``."""
    chunks = []
    while True:
        answer = raw.read()
        assert answer is not None, "the daemon closed the connection mid-stream"
        assert answer["request_id"] == request_id and answer.get("stream") is True, answer
        if answer["done"]:
            return chunks, answer
        chunks.append(answer["chunk"])


def device_free_within(client: Client, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if client.status().get("device_busy_with") is None:
            return True
        time.sleep(0.05)
    return False


def test_chunks_then_one_final_answer_with_statistics(start_daemon, llm):
    daemon = start_daemon(simulated={"token_ms": 1})
    raw = Raw(daemon.socket_path)
    raw.send(stream_request(llm, PROMPT))
    chunks, final = read_stream(raw)
    result = final["status"] == "ok" and final["result"]
    assert result and "".join(chunks) == result["text"] and len(chunks) >= 2
    assert result["done_reason"] == "length" and result["generated_tokens"] == 8
    assert result["prompt_tokens"] > 0 and "stop_reason" not in result
    assert final["load_time_ms"] > 0   # this request loaded the model on demand ...
    # The same request unstreamed gives the same text (the simulation is deterministic).
    with Client(daemon.socket_path, timeout=30) as client:
        again = client.infer(llm, PROMPT, "llm")
        assert again["result"]["text"] == result["text"]
        assert "load_time_ms" not in again   # ... this one found it loaded
    raw.close()


@pytest.mark.parametrize("message, text", [
    ({"model_type": "generic", "input_data": {"inputs": {}}}, "model type generic does not stream tokens"),
    ({"stream": "yes"}, "stream must be true or false"),
    ({"request_id": None}, "stream: true needs a request_id"),
])
def test_bad_stream_requests_are_clear_bad_requests(start_daemon, llm, message, text):
    daemon = start_daemon(simulated={"token_ms": 1})
    raw = Raw(daemon.socket_path)
    request = {**stream_request(llm, PROMPT), **message}
    if request["request_id"] is None:
        del request["request_id"]
    raw.send(request)
    answer = raw.read()
    assert answer["code"] == "bad_request" and text in answer["error"], answer
    if message.get("stream") == "yes":
        assert "done" not in answer   # not a stream: a plain error answer
    else:
        assert answer["stream"] is True and answer["done"] is True   # a refused stream ends too
    raw.close()


def test_streaming_needs_protocol_2(start_daemon, llm):
    daemon = start_daemon(simulated={"token_ms": 1})
    raw = Raw(daemon.socket_path, hello=False)
    raw.send(stream_request(llm, PROMPT))
    answer = raw.read()
    assert answer["code"] == "bad_request" and "needs protocol 2" in answer["error"]
    raw.close()


def test_cancel_stops_the_generation_and_the_final_answer_says_so(start_daemon, llm):
    daemon = start_daemon(simulated={"token_ms": 20})
    raw = Raw(daemon.socket_path)
    raw.send(stream_request(llm, {"prompt": "go on", "max_generated_tokens": 3000}))
    first = raw.read()
    assert first["done"] is False and first["chunk"]
    raw.send({"action": "cancel", "target": "s1", "request_id": "c1"})
    answers = {}
    while "s1" not in answers or not answers["s1"]["done"]:
        answer = raw.read()
        answers[answer["request_id"]] = answer
    assert answers["c1"]["cancelled"] is True and answers["c1"]["state"] == "stopping"
    result = answers["s1"]["result"]
    assert result["done_reason"] == "cancelled" and result["stop_reason"] == "cancelled by the client"
    assert result["generated_tokens"] < 3000
    raw.close()


def test_a_client_that_goes_away_stops_its_generation(start_daemon, llm, model_dir):
    # 3000 tokens at 20 ms would hold the device for a minute.
    daemon = start_daemon(simulated={"token_ms": 20})
    raw = Raw(daemon.socket_path)
    raw.send(stream_request(llm, {"prompt": "go on", "max_generated_tokens": 3000}))
    assert raw.read()["done"] is False
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.status()["device_busy_with"] is not None
        raw.close()
        assert device_free_within(client, 20.0), client.status()["device_busy_with"]
        # And the next generation runs.
        assert client.infer(llm, {"prompt": "hi", "max_generated_tokens": 2}, "llm")["result"]["generated_tokens"] == 2


# ------------------------------------------------------------ the token buffer itself

def test_a_reader_that_falls_behind_stops_the_generation_not_the_device():
    """on_token never waits: past the bound it answers False (the handler then
    leaves the generation), with the reason in stop_reason."""
    async def main():
        tokens = streaming.TokenStream(asyncio.get_running_loop(), max_pending_bytes=100)
        answers = [tokens.on_token("x" * 30) for _ in range(4)]   # nobody reads meanwhile
        assert answers == [True, True, True, False]
        assert tokens.on_token("more") is False
        assert "did not read its tokens (120 bytes waiting, at most 100)" in tokens.stop_reason
        sent = []

        async def send(text):
            sent.append(text)
        tokens.finish()
        await tokens.forward(send)
        assert sent == ["x" * 120]   # what was kept still goes out, in one chunk
    asyncio.run(main())


def test_tokens_gathered_between_wake_ups_go_out_as_one_chunk():
    async def main():
        tokens = streaming.TokenStream(asyncio.get_running_loop())
        sent = []

        async def send(text):
            sent.append(text)
        writer = asyncio.ensure_future(tokens.forward(send))
        for piece in ("a", "b", "c"):   # no await between them: one wake-up
            assert tokens.on_token(piece)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert tokens.on_token("d")
        await asyncio.sleep(0)
        tokens.finish()
        await writer
        assert sent == ["abc", "d"]
    asyncio.run(main())


# ------------------------------------------------------------ the client library

def test_blocking_client_iterates_the_text_then_has_the_final_answer(start_daemon, llm):
    daemon = start_daemon(simulated={"token_ms": 1})
    with Client(daemon.socket_path, timeout=30) as client:
        generation = client.generate(llm, PROMPT, "llm")
        pieces = list(generation)
        result = generation.result["result"]
        assert len(pieces) >= 2 and "".join(pieces) == result["text"] and result["done_reason"] == "length"
        assert client.ping()["status"] == "ok"   # the connection is free again


def test_blocking_client_leaving_early_stops_the_generation(start_daemon, llm):
    daemon = start_daemon(simulated={"token_ms": 20})
    with Client(daemon.socket_path, timeout=30) as client:
        for _ in client.generate(llm, {"prompt": "go on", "max_generated_tokens": 3000}, "llm"):
            break
        with Client(daemon.socket_path, timeout=30) as other:
            assert device_free_within(other, 20.0)
        assert client.ping()["status"] == "ok"   # on a new connection


def test_async_client_streams_and_other_requests_share_the_connection(start_daemon, llm):
    from hailo_devmgr.client import AsyncClient
    daemon = start_daemon(simulated={"token_ms": 5})

    async def main():
        async with AsyncClient(daemon.socket_path, timeout=30) as client:
            generation = client.generate(llm, {"prompt": "a story", "max_generated_tokens": 30}, "llm")
            pieces, pings = [], []
            async for text in generation:
                pieces.append(text)
                if len(pings) < 2:
                    pings.append((await client.ping())["status"])   # pipelined beside the stream
            result = generation.result["result"]
            assert "".join(pieces) == result["text"] and 0 < result["generated_tokens"] <= 30
            assert pings == ["ok", "ok"]
            # Leaving early cancels it on the device.
            async for _ in client.generate(llm, {"prompt": "go on", "max_generated_tokens": 3000}, "llm"):
                break
            deadline = time.monotonic() + 20
            while (await client.status())["device_busy_with"] is not None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    asyncio.run(main())


def test_clients_against_a_v1_daemon_get_the_whole_text_in_one_piece(start_daemon, llm):
    daemon = start_daemon(simulated={"token_ms": 1})
    with Client(daemon.socket_path, timeout=30, transport="base64") as client:   # says no hello: v1
        generation = client.generate(llm, PROMPT, "llm")
        assert list(generation) == [generation.result["result"]["text"]]
