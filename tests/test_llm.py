"""Model type llm (genai LLM) and token-by-token generation (llm, vlm, vlm_chat).

Handlers run on the simulated backend directly (as the device thread runs
them), then the llm type goes through a real daemon's socket.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import handler_checks as hc
from hailo_devmgr.client import Client, tensor
from hailo_devmgr.daemon import registry as reg
from hailo_devmgr.daemon.backends import simulated as sim
from hailo_devmgr.daemon.backends.simulated import SimulatedBackend
from hailo_devmgr.daemon.config import Config, DeviceConfig, SimulatedConfig
from hailo_devmgr.daemon.cpu_affinity import CpuPlacement
from hailo_devmgr.daemon.handlers import HANDLERS, InputLimits
from hailo_devmgr.daemon.handlers.generation import StopText
from hailo_devmgr.daemon.model_files import resolve_model_path
from hailo_devmgr.daemon.settings import Settings
from hailo_devmgr.wire import protocol as p

LLM = HANDLERS["llm"]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "tell me about the red fox and the brown dog"}]


def parse(**data):
    return LLM.parse_input(data, InputLimits())


@pytest.fixture
def backend(tmp_path):
    return SimulatedBackend(SimulatedConfig(load_ms=0, infer_ms=0, token_ms=0, lock_path=str(tmp_path / "lock")),
                            DeviceConfig())


@pytest.fixture
def vdevice(backend):
    opened = backend.open_vdevice()
    yield opened
    opened.release()


@pytest.fixture
def llm(backend, vdevice, tmp_path):
    path = tmp_path / "llm.hef"
    path.write_text("context_capacity: 64\n")
    handler = LLM(backend.platform, vdevice, str(path), {})
    handler.load()
    yield handler
    handler.release()


# ------------------------------------------------------------------ input checks

@pytest.mark.parametrize("data, text", [
    ({}, "exactly one of messages (a chat list) or prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of messages"),
    ({"prompt": ""}, "input_data.prompt is empty"),
    ({"prompt": ["a"]}, "input_data.prompt must be a string (a chat goes in messages), got array"),
    ({"prompt": "x" * (256 * 1024 + 1)}, "input_data.prompt is longer than"),
    ({"messages": "hi"}, "input_data.messages must be a chat list of messages, got string"),
    ({"messages": []}, "input_data.messages is an empty chat list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "input_data.messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "input_data.messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]},
     "model type llm takes text only"),
    ({"prompt": "a", "temperature": -1}, "input_data.temperature must be >= 0"),
    ({"prompt": "a", "temperature": "hot"}, "input_data.temperature must be a number, got string"),
    ({"prompt": "a", "top_p": 1.5}, "input_data.top_p must be <= 1"),
    ({"prompt": "a", "top_k": 0}, "input_data.top_k must be >= 1"),
    ({"prompt": "a", "top_k": 2.5}, "input_data.top_k must be an integer"),
    ({"prompt": "a", "seed": -1}, "input_data.seed must be >= 0"),
    ({"prompt": "a", "seed": 2**32 - 1}, "input_data.seed must be <= 4294967294"),
    ({"prompt": "a", "max_generated_tokens": 0}, "input_data.max_generated_tokens must be >= 1"),
    ({"prompt": "a", "max_generated_tokens": 10**6}, "input_data.max_generated_tokens must be <= 8192"),
    ({"prompt": "a", "frequency_penalty": 0}, "input_data.frequency_penalty must be > 0 (1 is no penalty)"),
    ({"prompt": "a", "frequency_penalty": 1000}, "input_data.frequency_penalty must be <= 100"),
    ({"prompt": "a", "stop": "END"}, "input_data.stop must be a list of strings, got string"),
    ({"prompt": "a", "stop": ["ok", ""]}, "input_data.stop[1] must be a non-empty string"),
    ({"prompt": "a", "stop": [3]}, "input_data.stop[0] must be a non-empty string, got 3"),
    ({"prompt": "a", "stop": ["s"] * 17}, "input_data.stop has 17 strings, over the limit of 16"),
    ({"prompt": "a", "stop": ["x" * 257]}, "input_data.stop[0] is longer than 256 characters"),
    ({"prompt": "a", "keep_context": "yes"}, "input_data.keep_context must be true or false, got string"),
    ({"prompt": "a", "timeout_ms": 0}, "input_data.timeout_ms must be >= 1"),
])
def test_every_bad_input_is_a_clear_bad_request(data, text):
    with pytest.raises(p.RequestError) as info:
        parse(**data)
    assert info.value.code == p.BAD_REQUEST
    assert text in info.value.message


def test_input_data_must_be_an_object():
    with pytest.raises(p.RequestError) as info:
        LLM.parse_input(["hi"], InputLimits())
    assert info.value.code == p.BAD_REQUEST and "input_data must be an object" in info.value.message


def test_good_inputs_are_kept():
    inputs = parse(messages=CHAT, temperature=0, top_p=0.9, top_k=40, seed=7, max_generated_tokens=100,
                   stop=["END", "END"], frequency_penalty=1.1, keep_context=True)
    assert inputs["prompt"] == CHAT and inputs["stop"] == ["END"] and inputs["keep_context"] is True
    assert parse(prompt="raw")["keep_context"] is False


# ------------------------------------------------------------------ the handler on the device thread

def test_run_answers_text_and_statistics(llm, backend):
    result = llm.run(parse(messages=CHAT), 10_000)
    assert set(result) == {"text", "prompt_tokens", "generated_tokens", "prompt_ms", "generation_ms", "done_reason"}
    assert result["text"].startswith("Simulated LLM answer ") and "red fox" in result["text"]
    assert "<|im_end|>" not in result["text"]  # the end token is cut
    assert result["done_reason"] == "stop"
    assert result["prompt_tokens"] == len("Be brief.".split()) + len(CHAT[1]["content"].split())
    assert result["generated_tokens"] == len(result["text"].split()) + 1  # and the end token
    assert result["prompt_ms"] >= 0 and result["generation_ms"] >= 0
    assert ("llm_generate", llm.model_path) in backend.calls
    assert llm.run(parse(messages=CHAT), 10_000)["text"] == result["text"]  # deterministic


def test_max_generated_tokens_ends_with_done_reason_length(llm):
    result = llm.run(parse(prompt="one two three four five", max_generated_tokens=3), 10_000)
    assert result == {**result, "text": "Simulated LLM answer ", "generated_tokens": 3, "done_reason": "length"}


def test_generate_calls_on_token_per_token_on_the_calling_thread(llm):
    seen = []
    result = llm.generate(parse(prompt="alpha beta gamma"), 10_000,
                          lambda text: seen.append((text, threading.current_thread())) or True)
    assert "".join(text for text, _ in seen) == result["text"]
    assert len(seen) == result["generated_tokens"] - 1  # the end token is never passed on
    assert {thread for _, thread in seen} == {threading.current_thread()}
    assert result["done_reason"] == "stop"


def test_on_token_returning_false_aborts_the_generation_on_the_device(llm, backend):
    seen = []
    result = llm.generate(parse(prompt="alpha beta gamma", max_generated_tokens=500), 10_000,
                          lambda text: seen.append(text) or len(seen) < 2)
    assert seen == ["Simulated ", "LLM "] and result["text"] == "Simulated LLM "
    assert result["done_reason"] == "cancelled" and result["generated_tokens"] == 2
    assert ("llm_abort", llm.model_path, 2) in backend.calls
    # The model is usable at once: the aborted generation was released.
    assert llm.run(parse(prompt="again"), 10_000)["done_reason"] == "stop"


def test_abort_stops_the_token_loop_at_once(backend, vdevice, tmp_path):
    """With real time per token, cancelling after the first token costs no further token."""
    path = tmp_path / "slow.hef"
    path.write_text("token_ms: 300\n")
    handler = LLM(backend.platform, vdevice, str(path), {})
    handler.load()
    slept = []
    backend.sleep = slept.append   # the simulated device's clock: what it spent, not what the machine did
    result = handler.generate(parse(prompt="a b c d e f g h"), 10_000, lambda text: False)
    assert result["done_reason"] == "cancelled" and result["generated_tokens"] == 1
    assert slept == [0.3]  # one token's time on the device, not two
    handler.release()


def test_an_exception_from_on_token_aborts_and_propagates(llm, backend):
    def boom(text):
        raise RuntimeError("reader gone")
    with pytest.raises(RuntimeError, match="reader gone"):
        llm.generate(parse(prompt="alpha"), 10_000, boom)
    assert ("llm_abort", llm.model_path, 1) in backend.calls
    assert llm.llm.get_context_usage_size() == 0  # cleared after the failed request too


def test_stop_strings_merge_with_the_models_end_tokens_and_are_restored(llm, backend):
    calls = []
    real = llm.llm.set_stop_tokens
    llm.llm.set_stop_tokens = lambda tokens: calls.append(list(tokens)) or real(tokens)
    result = llm.run(parse(prompt="one two three four", stop=["three", "<|im_end|>"]), 10_000)
    assert calls == [["<|im_end|>", "three"], ["<|im_end|>"]]  # merged, then the built-in ones back
    assert result["text"] == "Simulated LLM answer " + result["text"].split()[3] + " one two "
    assert result["done_reason"] == "stop"
    assert llm.llm.get_stop_tokens() == ["<|im_end|>"]
    calls.clear()
    assert llm.run(parse(prompt="one two"), 10_000)["done_reason"] == "stop"
    assert calls == []  # no stop strings: the stop tokens are left alone


def test_replacing_the_end_token_in_the_simulation_runs_on_to_max_tokens(backend, vdevice, tmp_path):
    """What merging prevents: set_stop_tokens replaces the built-in end token (llm.hpp:532)."""
    path = tmp_path / "llm.hef"
    path.write_text("max_generated_tokens: 30\n")
    with backend.platform.genai.LLM(vdevice, str(path)) as model:
        model.set_stop_tokens(["never said"])
        with model.generate(prompt="hi") as completion:
            tokens = list(completion)
            assert completion.generation_status == sim.LLMGeneratorCompletionStatus.MAX_TOKENS_REACHED
        assert len(tokens) == 30 and "hi<|im_end|>and so on and so on " in "".join(tokens)
        model.set_stop_tokens(["  ", "x"])
        assert model.get_stop_tokens() == ["x"]  # an empty tokenization is dropped (llm.cpp:476)


def test_stop_text_is_cut_even_when_the_device_goes_on(llm):
    """A stop string the server does not see as its token sequence is cut from the text,
    and the generation is aborted there."""
    result = llm.run(parse(prompt="the quick brown fox", stop=["ick bro"], max_generated_tokens=100), 10_000)
    assert result["text"].endswith(": the qu") and result["done_reason"] == "stop"


def test_context_is_cleared_per_request_unless_keep_context(llm):
    llm.run(parse(prompt="one two three"), 10_000)
    assert llm.llm.get_context_usage_size() == 0
    first = llm.run(parse(messages=CHAT, keep_context=True), 10_000)
    used = llm.llm.get_context_usage_size()
    assert used > first["generated_tokens"]
    llm.run(parse(messages=[{"role": "user", "content": "and then?"}], keep_context=True), 10_000)
    assert llm.llm.get_context_usage_size() > used
    with pytest.raises(p.RequestError) as info:  # HailoRT 5.2 takes system messages on a fresh context only
        llm.run(parse(messages=CHAT, keep_context=True), 10_000)
    assert info.value.code == p.BAD_REQUEST and "fresh context" in info.value.message
    llm.run(parse(prompt="new"), 10_000)
    assert llm.llm.get_context_usage_size() == 0


def test_a_prompt_over_the_context_capacity_is_refused(llm):
    with pytest.raises(p.RequestError) as info:
        llm.run(parse(prompt=" ".join(["word"] * 65)), 10_000)
    assert info.value.code == p.BAD_REQUEST
    assert "prompt has 65 tokens; the model's context holds 64" in info.value.message
    assert llm.load_info() == {"model_info": {"context_capacity": 64, "stop_tokens": ["<|im_end|>"]}}


def test_temperature_0_is_greedy_and_options_reach_hailort(llm):
    seen = {}
    real = llm.llm.generate
    llm.llm.generate = lambda **kwargs: seen.update(kwargs) or real(**kwargs)
    llm.run(parse(prompt="x", temperature=0, top_p=0.5, top_k=3, seed=9, frequency_penalty=1.2,
                  max_generated_tokens=4), 10_000)
    assert seen == {"prompt": "x", "do_sample": False, "top_p": 0.5, "top_k": 3, "seed": 9,
                    "frequency_penalty": 1.2, "max_generated_tokens": 4}


def test_a_generation_past_its_budget_fails_and_is_aborted(backend, vdevice, tmp_path):
    path = tmp_path / "slow.hef"
    path.write_text("token_ms: 30\n")
    handler = LLM(backend.platform, vdevice, str(path), {})
    handler.load()
    with pytest.raises((p.RequestError, sim.HailoRTTimeout)):
        handler.run(parse(prompt="a b c d e f g h i j"), 100)
    assert handler.run(parse(prompt="a", max_generated_tokens=2), 10_000)["done_reason"] == "length"
    handler.release()


@pytest.mark.parametrize("stops, pieces, expected", [
    (["END"], ["ab", "E", "N", "D", "x"], ["ab", "", "", "", ""]),
    (["END"], ["ab", "E", "x"], ["ab", "", "Ex"]),
    (["<|im_end|>", "\n\nUser:"], ["hi\n", "\nUs", "er: no"], ["hi", "", ""]),
    ([], ["a", "b"], ["a", "b"]),
])
def test_stop_text_holds_back_a_possible_start_and_cuts_at_a_stop(stops, pieces, expected):
    stop_text = StopText(stops)
    assert [stop_text.feed(piece) for piece in pieces] == expected


# ------------------------------------------------------------------ VLM token by token

@pytest.mark.parametrize("model_type", ["vlm_chat", "vlm"])
def test_vlm_generate_token_by_token(backend, vdevice, tmp_path, model_type):
    path = tmp_path / "vlm.hef"
    path.write_text("VLM stand-in\n")
    handler = HANDLERS[model_type](backend.platform, vdevice, str(path), {})
    handler.load()
    image = tensor(np.full((336, 336, 3), 7, np.uint8))
    data = {"prompt": "describe the picture", **({"frames": [image]} if model_type == "vlm_chat" else {"image": image})}
    inputs = HANDLERS[model_type].parse_input(data, InputLimits())
    whole = handler.run(inputs, 10_000)
    seen = []
    result = handler.generate(inputs, 10_000, lambda text: seen.append(text) or True)
    assert whole == result["text"] + "<|im_end|>"  # run answers generate_all's text as it was
    assert "".join(seen) == result["text"] and len(seen) > 3
    assert result["done_reason"] == "stop" and result["prompt_tokens"] == 3
    assert result["generated_tokens"] == len(seen) + 1
    cancelled = handler.generate(inputs, 10_000, lambda text: False)
    assert cancelled["done_reason"] == "cancelled" and cancelled["generated_tokens"] == 1
    short = handler.generate({**inputs, "max_generated_tokens": 2}, 10_000, None)
    assert short["done_reason"] == "length" and short["generated_tokens"] == 2
    assert handler.vlm.get_context_usage_size() == 0
    handler.release()


# ------------------------------------------------------------------ the registry's generate

class _Runtime:
    def __init__(self, backend, vdevice):
        self.backend, self.platform, self.vdevice = backend, backend.platform, vdevice
        self.device_config = DeviceConfig()
        self.placement = CpuPlacement()   # not pinned
        self.on_close, self.on_open = [], []

    def require(self):
        return self.vdevice


def test_registry_generate_loads_on_demand_and_counts_uses(backend, vdevice, model_dir):
    (model_dir / "llm.hef").write_text("LLM stand-in\n")
    registry = reg.ModelRegistry(_Runtime(backend, vdevice), Settings(Config(max_loaded_models=4)))
    path = str(model_dir / "llm.hef")
    spec = reg.ModelSpec("llm", path, resolve_model_path(path, (str(model_dir),)), {}, LLM)
    seen = []
    result, run_ms = registry.generate(spec, parse(prompt="hello there"), 10_000, seen.append, {})
    assert "".join(seen) == result["text"] and run_ms >= 0
    assert [model["uses"] for model in registry.snapshot] == [1]
    with pytest.raises(p.RequestError) as info:
        registry.generate(reg.ModelSpec("generic", "/x", "/x", {}, HANDLERS["generic"]), {}, 1000, print, {})
    assert info.value.code == p.BAD_REQUEST and "streaming is for llm, vlm and vlm_chat" in info.value.message
    backend.inject_fault("raise", status=4)
    with pytest.raises(p.RequestError) as info:
        registry.generate(spec, parse(prompt="again"), 10_000, seen.append, {})
    assert info.value.code == p.INFERENCE_FAILED and "HAILO_TIMEOUT" in info.value.message
    assert [model["uses"] for model in registry.snapshot] == [2]
    registry.release_all()


# ------------------------------------------------------------------ through a daemon

def test_llm_load_and_infer_through_the_daemon(start_daemon, model_dir):
    (model_dir / "llm.hef").write_text("context_capacity: 2048\n")
    path = str(model_dir / "llm.hef")
    daemon = start_daemon(simulated={"token_ms": 1})
    with Client(daemon.socket_path, timeout=30) as client:
        loaded = client.load_model(path, "llm")
        assert loaded["status"] == "ok" and loaded["model_info"]["context_capacity"] == 2048
        answer = client.infer(path, {"messages": CHAT, "max_generated_tokens": 64, "stop": ["brown"]}, "llm")
        result = answer["result"]
        assert result["text"].startswith("Simulated LLM answer ") and result["text"].endswith("the red fox and the ")
        assert result["done_reason"] == "stop" and result["prompt_tokens"] == 12
        assert result["generated_tokens"] >= 10 and result["generation_ms"] >= 0
        result = client.infer(path, {"prompt": "count to ten", "max_generated_tokens": 2}, "llm")["result"]
        assert result["done_reason"] == "length" and result["generated_tokens"] == 2
        error = hc.refused(lambda: client.infer(path, {"prompt": "x", "top_p": 2}, "llm"))
        assert "input_data.top_p must be <= 1" in error.message
        assert any(model["model_type"] == "llm" for model in client.status()["loaded_models"])


def test_llm_needs_genai_and_says_so_on_hailort_4(start_daemon, model_dir):
    (model_dir / "llm.hef").write_text("LLM stand-in\n")
    daemon = start_daemon(simulated={"hailort_version": "4.23.0"})
    with Client(daemon.socket_path, timeout=30) as client:
        error = hc.refused(lambda: client.infer(str(model_dir / "llm.hef"), {"prompt": "hi"}, "llm"), p.LOAD_FAILED)
        assert "hailo_platform.genai.LLM" in error.message


@pytest.mark.parametrize("version", ["5.1.1", "5.2.0"])
@pytest.mark.parametrize("model_type", ["llm", "vlm_chat"])
def test_generate_on_every_recorded_version_with_genai(tmp_path, version, model_type):
    """The recorded surface of each version (5.1.1 has no ``tools``, 5.2 put ``videos``
    third) refuses any call shape the handlers must not make."""
    backend = SimulatedBackend(SimulatedConfig(load_ms=0, infer_ms=0, token_ms=0, hailort_version=version,
                                               lock_path=str(tmp_path / "lock")), DeviceConfig())
    vdevice = backend.open_vdevice()
    path = tmp_path / "model.hef"
    path.write_text("stand-in\n")
    handler = HANDLERS[model_type](backend.platform, vdevice, str(path), {})
    handler.load()
    data = ({"messages": CHAT, "stop": ["fox"], "temperature": 0, "top_k": 5} if model_type == "llm" else
            {"prompt": "what is it", "frames": [tensor(np.zeros((336, 336, 3), np.uint8))], "temperature": 0})
    inputs = HANDLERS[model_type].parse_input(data, InputLimits())
    seen = []
    result = handler.generate(inputs, 10_000, lambda text: seen.append(text) or True)
    assert result["done_reason"] == "stop" and "".join(seen) == result["text"]
    handler.release()
    vdevice.release()


def test_llm_load_fails_clearly_without_genai(tmp_path):
    backend = SimulatedBackend(SimulatedConfig(load_ms=0, hailort_version="4.23.0", lock_path=str(tmp_path / "lock")),
                               DeviceConfig())
    vdevice = backend.open_vdevice()
    handler = LLM(backend.platform, vdevice, "/nonexistent.hef", {})
    with pytest.raises(p.RequestError) as info:
        handler.load()
    assert info.value.code == p.LOAD_FAILED and "HailoRT 4.23.0 has none" in info.value.message
    vdevice.release()
