"""Reading a genai generation token by token (llm, and vlm/vlm_chat's ``generate``).

HailoRT's ``LLM.generate(...)`` and ``VLM.generate(...)`` return an
``LLMGeneratorCompletion`` (``PY:4209`` and ``PY:4668`` at v5.2.0; ``PY:4211``
and ``PY:4638`` at v5.1.1, where ``PY`` is hailo_platform/pyhailort/pyhailort.py).
It is a context manager whose exit calls ``release()`` (``PY:4033-4048``),
and releasing a completion that is still GENERATING aborts the generation
on the device (``hailort/libhailort/src/genai/llm/llm.cpp:714-727``). So
leaving the ``with`` block is how a generation is cancelled, and it stops at
once.

Tokens are read with ``read(timeout_ms)`` (``PY:4062``, v5.2.0; ``PY:4065``,
v5.1.1) while ``generation_status`` (``PY:4052``; ``PY:4055`` at v5.1.1) is
GENERATING. Iterating the completion would do the same, but its
``__next__`` reads with a fixed 10 s timeout (``PY:4102-4105``); reading
ourselves lets one deadline cover the whole generation. Each token comes
with the status the server decided for it (``llm.cpp:905-908``):
MAX_TOKENS_REACHED when the count reached ``max_generated_tokens``, then
LOGICAL_END_OF_GENERATION when a stop sequence ended
(``hailort/hailort_server/genai/llm/llm_server.cpp:958-968``). The status
enum (``LLMGeneratorCompletionStatus``, ``pyhailort.cpp:1060``) is not
exported by ``hailo_platform``: we compare member names.

Stop texts: the server stops on *token sequences* and delivers the stop
token's own text as the last token; a model may also end by length and
then deliver its recovery sequence, with status GENERATING, before the
final status (``llm_server.cpp:1057-1067``). We therefore watch the text
too: a stop string (the model's own end tokens and the request's) is cut
from the answer, with everything after it, and text that might be the start
of one is held back until it is known not to be. When the text shows a stop
string while the server goes on (a string tokenized otherwise in context),
we leave the ``with`` block, which aborts the rest.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from ...wire.protocol import INFERENCE_FAILED, RequestError
from .base import ms_left

# The generate() callback: one piece of answer text; False cancels the generation.
OnToken = Callable[[str], bool]

DONE_STOP = "stop"
DONE_LENGTH = "length"
DONE_CANCELLED = "cancelled"


class StopText:
    """Passes answer text on, cut at the first stop string; holds back a possible start of one."""

    def __init__(self, stops: list[str]):
        self.stops = sorted({stop for stop in stops if stop}, key=len, reverse=True)
        self._longest = max((len(stop) for stop in self.stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``held + text`` that is certainly answer text."""
        if self.stopped:
            return ""
        pending = self._held + text
        found = [index for index in (pending.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.stopped, self._held = True, ""
            return pending[:min(found)]
        keep = 0
        for size in range(min(len(pending), self._longest - 1), 0, -1):
            tail = pending[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                keep = size
                break
        self._held = pending[len(pending) - keep:] if keep else ""
        return pending[:len(pending) - keep]

    def flush(self) -> str:
        """What is held back, at the end of a generation that met no stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def read_tokens(start: Callable[[], Any], *, timeout_ms: int, stops: list[str],
                max_generated_tokens: int | None, on_token: OnToken | None) -> dict:
    """Run one generation: ``start()`` calls ``generate(...)`` and returns the completion.

    Returns ``{text, generated_tokens, prompt_ms, generation_ms, done_reason}``;
    the caller adds ``prompt_tokens``. ``on_token(text)`` (on this thread, the
    device thread) gets each piece of answer text as it comes; when it
    returns False the generation is aborted and ``done_reason`` is
    "cancelled". An exception from it aborts the generation and propagates.
    """
    started = time.monotonic()
    deadline = started + timeout_ms / 1000
    stop_text = StopText(stops)
    parts: list[str] = []
    generated, first_at, done = 0, None, None

    def emit(piece: str) -> bool:
        if not piece:
            return True
        parts.append(piece)
        return on_token is None or on_token(piece) is not False

    with start() as completion:
        while completion.generation_status.name == "GENERATING":
            left = ms_left(deadline)
            if left <= 0:
                # Leaving the with block aborts the generation on the device.
                raise RequestError(INFERENCE_FAILED, f"Inference failed: the generation ran out of time after "
                                                     f"{generated} tokens (timeout {timeout_ms} ms) [HAILO_TIMEOUT (4)]")
            token = completion.read(left)
            generated += 1
            if first_at is None:
                first_at = time.monotonic()
            if not emit(stop_text.feed(str(token))):
                done = DONE_CANCELLED
                break
            if stop_text.stopped:
                done = DONE_STOP
                break
        if done is None:
            status = completion.generation_status.name
            done = {"MAX_TOKENS_REACHED": DONE_LENGTH, "ABORTED": DONE_CANCELLED}.get(status, DONE_STOP)
    if done != DONE_CANCELLED and not emit(stop_text.flush()):
        done = DONE_CANCELLED
    if done == DONE_STOP and max_generated_tokens is not None and generated >= max_generated_tokens:
        done = DONE_LENGTH  # the stop text came with the last allowed token, or in the recovery sequence
    ended = time.monotonic()
    first_at = first_at or ended
    return {
        "text": "".join(parts),
        "generated_tokens": generated,
        "prompt_ms": round((first_at - started) * 1000, 3),
        "generation_ms": round((ended - first_at) * 1000, 3),
        "done_reason": done,
    }


def sampling(inputs: dict) -> dict:
    """The sampling keywords for ``generate`` from parsed inputs (None: the model's default).

    HailoRT applies only the values given (``_fill_generator_params``,
    ``PY:4181-4196``) and refuses temperature 0 (``llm.cpp:553-565``): 0 is
    sent as ``do_sample=False``, greedy."""
    options = {key: inputs.get(key) for key in ("temperature", "top_p", "top_k", "frequency_penalty",
                                                "max_generated_tokens", "seed")}
    options = {key: value for key, value in options.items() if value is not None}
    if options.get("temperature") == 0:
        del options["temperature"]
        options["do_sample"] = False
    return options
