"""llm: a large language model through hailo_platform.genai.LLM (Hailo-10H, HailoRT 5.1.1+).

input_data: exactly one of

- ``messages``: a chat list ``[{"role": "system"|"user"|"assistant",
  "content": str or [{"type": "text", "text"}]}]`` (handlers/chat.py; no
  image parts: that is vlm_chat), rendered with the model's own chat
  template by HailoRT;
- ``prompt``: a raw string, sent as it is (no template);

and optionally ``temperature`` (0 = greedy), ``top_p``, ``top_k``,
``seed``, ``max_generated_tokens``, ``frequency_penalty`` (HailoRT's
repetition penalty: 1 is none), ``stop`` (a list of strings),
``keep_context`` (default false) and ``timeout_ms``.

Result: ``{text, prompt_tokens, generated_tokens, prompt_ms,
generation_ms, done_reason: "stop"|"length"|"cancelled"}``. ``run`` is the
normal infer; ``generate(inputs, timeout_ms, on_token)`` gives the answer
piece by piece as the device makes it (handlers/generation.py).

Context: HailoRT keeps the conversation between calls. Unless
``keep_context`` is true the context is cleared before and after the
request, so one client's conversation never reaches another's request.
With ``keep_context`` the request continues what the model holds (a
session of one client: any other client's request without it clears it);
a system message then needs a fresh context (HailoRT 5.2 refuses it,
``minja_wrapper.cpp:83-84``).
"""
from __future__ import annotations

from typing import Any

from ...wire.protocol import BAD_REQUEST, RequestError, json_type, optional_number, shown
from . import chat, generation
from .base import MAX_TIMEOUT_MS, Handler, InputLimits, genai_class, require_object

# The calls below are in LLM from 5.1.1 on (5.0.1's genai is not recorded; docs/hailort-api.md).
MINIMUM_HAILORT = (5, 1, 1)
MAX_GENERATED_TOKENS = 8192
MAX_STOPS = 16
MAX_STOP_CHARS = 256
# HAILO_RANDOM_SEED is UINT32_MAX: "random" (hailort.h:84); we take the others.
MAX_SEED = 2**32 - 2
MAX_TOP_K = 100_000
MAX_FREQUENCY_PENALTY = 100.0


def _stops(data: dict) -> list[str]:
    value = data.get("stop")
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(BAD_REQUEST, f"input_data.stop must be a list of strings, got {json_type(value)}")
    if len(value) > MAX_STOPS:
        raise RequestError(BAD_REQUEST, f"input_data.stop has {len(value)} strings, over the limit of {MAX_STOPS}")
    for index, stop in enumerate(value):
        if not isinstance(stop, str) or not stop:
            raise RequestError(BAD_REQUEST, f"input_data.stop[{index}] must be a non-empty string, got "
                                            f"{shown(stop)}")
        if len(stop) > MAX_STOP_CHARS:
            raise RequestError(BAD_REQUEST, f"input_data.stop[{index}] is longer than {MAX_STOP_CHARS} characters")
    return list(dict.fromkeys(value))


def _prompt(data: dict) -> str | list[dict]:
    has_messages, has_prompt = data.get("messages") is not None, data.get("prompt") is not None
    if has_messages == has_prompt:
        raise RequestError(BAD_REQUEST, "input_data needs exactly one of messages (a chat list) or prompt "
                                        "(a raw string)")
    if has_prompt:
        prompt = data["prompt"]
        if not isinstance(prompt, str):
            raise RequestError(BAD_REQUEST, f"input_data.prompt must be a string (a chat goes in messages), "
                                            f"got {json_type(prompt)}")
        if not prompt:
            raise RequestError(BAD_REQUEST, "input_data.prompt is empty")
        return chat.prompt_field(data)
    if not isinstance(data["messages"], list):
        raise RequestError(BAD_REQUEST, f"input_data.messages must be a chat list of messages, got "
                                        f"{json_type(data['messages'])}")
    messages = chat.prompt_field(data, key="messages")
    if chat.image_slots(messages):
        raise RequestError(BAD_REQUEST, "input_data.messages has image parts; model type llm takes text "
                                        "only (images go to vlm_chat)")
    return messages


class LlmHandler(Handler):
    model_type = "llm"
    # LLM sends the HEF path string to the chip's server (llm.cpp:185-201, v5.2.0).
    sends_path_to_device = True

    @classmethod
    def parse_input(cls, input_data: Any, limits: InputLimits) -> dict:
        data = require_object(input_data, "input_data")
        where = "input_data."
        keep_context = data.get("keep_context", False)
        if not isinstance(keep_context, bool):
            raise RequestError(BAD_REQUEST, f"input_data.keep_context must be true or false, got "
                                            f"{json_type(keep_context)}")
        penalty = optional_number(data, "frequency_penalty", None, maximum=MAX_FREQUENCY_PENALTY, where=where)
        if penalty is not None and penalty <= 0:
            # HailoRT divides or multiplies scores by it (hailort_server/genai/llm/post_process.cpp:26)
            # and refuses 0 (llm.cpp:561-562): 1 is no penalty.
            raise RequestError(BAD_REQUEST, f"input_data.frequency_penalty must be > 0 (1 is no penalty), "
                                            f"got {shown(penalty)}")
        return {
            "prompt": _prompt(data),
            "temperature": optional_number(data, "temperature", None, minimum=0, maximum=100, where=where),
            "top_p": optional_number(data, "top_p", None, minimum=0, maximum=1, where=where),
            "top_k": optional_number(data, "top_k", None, minimum=1, maximum=MAX_TOP_K, integer=True, where=where),
            "seed": optional_number(data, "seed", None, minimum=0, maximum=MAX_SEED, integer=True, where=where),
            "max_generated_tokens": optional_number(data, "max_generated_tokens", None, minimum=1,
                                                    maximum=MAX_GENERATED_TOKENS, integer=True, where=where),
            "frequency_penalty": penalty,
            "stop": _stops(data),
            "keep_context": keep_context,
            "timeout_ms": optional_number(data, "timeout_ms", None, minimum=1, maximum=MAX_TIMEOUT_MS,
                                          integer=True, where=where),
        }

    # -- on the device thread ---------------------------------------------

    def load(self) -> None:
        llm_class = genai_class(self.platform, "LLM", self.model_type, MINIMUM_HAILORT)
        # LLM(vdevice, model_path, lora_name="", optimize_memory_on_device=False):
        # PY:4148 (v5.1.1), PY:4145 (v5.2.0).
        self.llm = llm_class(self.vdevice, self.model_path)
        # The model's own end tokens: set_stop_tokens replaces them ("This replaces any
        # previously set stop tokens, including the built-in end-of-sentence tokens",
        # include/hailo/genai/llm/llm.hpp:532), so a request's stops are merged with these.
        # get_stop_tokens: PY:4483 (v5.1.1), PY:4506 (v5.2.0).
        self.end_tokens = [str(token) for token in self.llm.get_stop_tokens()]
        # Fixed when the model was compiled: PY:4361 (v5.1.1), PY:4384 (v5.2.0).
        self.context_capacity = int(self.llm.max_context_capacity())
        # Whether the host's chat template is at its first prompt (reset by clear_context,
        # llm.cpp:375): HailoRT 5.2 takes a system message only then.
        self.fresh = True

    def load_info(self) -> dict:
        return {"model_info": {"context_capacity": self.context_capacity, "stop_tokens": list(self.end_tokens)}}

    def run(self, inputs: dict, timeout_ms: int) -> dict:
        return self.generate(inputs, timeout_ms, None)

    def generate(self, inputs: dict, timeout_ms: int, on_token: generation.OnToken | None) -> dict:
        """One generation; ``on_token(text) -> bool`` per piece of text (False cancels)."""
        timeout_ms = min(inputs["timeout_ms"] or timeout_ms, timeout_ms)
        keep = inputs["keep_context"]
        prompt = inputs["prompt"]
        if not keep:
            self._clear()
        elif not self.fresh and isinstance(prompt, list) and any(m["role"] == "system" for m in prompt):
            raise RequestError(BAD_REQUEST, "input_data.messages has a system message but keep_context "
                                            "continues a conversation: HailoRT takes system messages only on a "
                                            "fresh context (send keep_context false to start one)")
        prompt_tokens = self._count(prompt)
        # get_context_usage_size: PY:4346 (v5.1.1), PY:4369 (v5.2.0).
        used = int(self.llm.get_context_usage_size()) if keep else 0
        if prompt_tokens + used > self.context_capacity:
            kept = f" ({used} already used by the kept context)" if used else ""
            raise RequestError(BAD_REQUEST, f"input_data prompt has {prompt_tokens} tokens; the model's context "
                                            f"holds {self.context_capacity}{kept}")
        extra = [stop for stop in inputs["stop"] if stop not in self.end_tokens]
        stops = self.end_tokens + extra
        try:
            if extra:
                # set_stop_tokens: PY:4463 (v5.1.1), PY:4486 (v5.2.0).
                self.llm.set_stop_tokens(stops)
            options = generation.sampling(inputs)
            self.fresh = False
            # Keywords only (5.2 put `tools` second, PY:4209; 5.1.1 has none, PY:4211).
            result = generation.read_tokens(lambda: self.llm.generate(prompt=prompt, **options),
                                            timeout_ms=timeout_ms, stops=stops,
                                            max_generated_tokens=inputs["max_generated_tokens"],
                                            on_token=on_token)
        finally:
            try:
                if extra:
                    self.llm.set_stop_tokens(self.end_tokens)
            finally:
                if not keep:
                    self._clear()
        return {"text": result["text"], "prompt_tokens": prompt_tokens,
                **{key: value for key, value in result.items() if key != "text"}}

    def _clear(self) -> None:
        # clear_context: PY:4381 (v5.1.1), PY:4404 (v5.2.0); fails while a generation runs
        # (llm.cpp:373-374), which never overlaps here: the completion was released first.
        self.llm.clear_context()
        self.fresh = True

    def _count(self, prompt: str | list[dict]) -> int:
        """Tokens of the prompt's text (tokenize: PY:4323 v5.1.1, PY:4346 v5.2.0). For a chat
        list the message texts only: the template's role markers are not counted."""
        text = prompt if isinstance(prompt, str) else "\n".join(chat.texts(prompt))
        return len(self.llm.tokenize(text))

    def release(self) -> None:
        # PY:4165 (v5.1.1), PY:4162 (v5.2.0): idempotent; the object is unusable after it.
        self.llm.release()
