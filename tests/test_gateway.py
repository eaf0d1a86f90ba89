"""The Ollama/OpenAI gateway (issue 17, parts 2 and 3), checked with the real clients.

The official ``ollama`` and ``openai`` Python packages are not Debian's: `make
test` installs them with pip into build/client-venv (pinned in the Makefile's
CLIENT_PACKAGES). The client code of each test runs unchanged in that venv's
python as a subprocess against ``hailo-devmgr-http --listen-ollama`` on a
simulated daemon, and prints what it saw as JSON. Without the venv these
tests are skipped, unless HAILO_CLIENT_VENV names it (as `make test` does):
then a missing venv fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import die_with_parent, env_with_src
from hailo_devmgr.client import Client, tensor
from test_http import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("HAILO_CLIENT_VENV") or ROOT / "build" / "client-venv")
TOKEN_MS = 5


def venv_python() -> str:
    python = VENV / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import ollama, openai"],
                                             capture_output=True).returncode != 0:
        if os.environ.get("HAILO_CLIENT_VENV"):
            pytest.fail(f"{VENV} has no ollama and openai packages (make test creates it)")
        pytest.skip(f"no client venv at {VENV}: run `make test` (or `make client-venv`) to install "
                    "the official ollama and openai packages")
    return str(python)


def run_client(base: str, code: str, timeout: float = 60) -> dict:
    """Run ``code`` in the venv with ``HOST`` (the gateway's URL); it prints one JSON line last."""
    script = "import json, os, sys\nHOST = os.environ['GATEWAY']\n" + textwrap.dedent(code)
    done = subprocess.run([venv_python(), "-c", script], env={**os.environ, "GATEWAY": base, "NO_PROXY": "*"},
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def http(method: str, url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def public_dir():
    """A folder any uid can reach (the gateway may run as nobody)."""
    folder = Path(tempfile.mkdtemp(prefix="hailo-gw-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def models(model_dir, public_dir):
    """The model files and the catalog (with one model pulled by a stand-in hailo-ollama)."""
    (model_dir / "llm.hef").write_text("context_capacity: 4096\n")
    data = public_dir / "hailo-ollama"
    (data / "models" / "manifests" / "qwen2" / "1.5b").mkdir(parents=True)
    (data / "models" / "manifests" / "qwen2" / "1.5b" / "manifest.json").write_text(json.dumps(
        {"hef_h10h": "qwen2.hef", "template_params": {}, "generation_params": {"temperature": 0.5}}))
    (data / "models" / "manifests" / "not-pulled" / "7b").mkdir(parents=True)
    (data / "models" / "manifests" / "not-pulled" / "7b" / "manifest.json").write_text(
        json.dumps({"hef_h10h": "absent.hef", "template_params": {}}))
    (data / "models" / "blob").mkdir()
    (model_dir / "qwen2.hef").write_text("context_capacity: 2048\n")
    (data / "models" / "blob" / "qwen2.hef").symlink_to(model_dir / "qwen2.hef")
    catalog = public_dir / "models.yaml"
    catalog.write_text(yaml.safe_dump({
        "models": {"tiny-llm": {"path": str(model_dir / "llm.hef"), "type": "llm",
                                "options": {"num_predict": 6}},
                   "tiny-vlm:2b": {"path": str(model_dir / "vlm.hef"), "type": "vlm"},
                   "clip-not-a-chat:1": {"path": str(model_dir / "llm.hef"), "type": "llm",
                                         "keep_alive": "2m"}},
        "hailo_ollama_data": str(data)}))
    for path in (catalog, *data.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return catalog


@pytest.fixture
def gateway(start_daemon, models, public_dir, tmp_path):
    """Factory: gateway(token_ms=TOKEN_MS, user=None) -> (base URL, daemon)."""
    started = []

    def start(token_ms: float = TOKEN_MS, user: int | None = None, readable_src: str | None = None):
        socket_path = str(public_dir / "sock" / "device.sock")
        daemon = start_daemon(simulated={"token_ms": token_ms}, socket_path=socket_path, socket_mode="0666")
        port = free_port()
        argv = [sys.executable, "-m", "hailo_devmgr.http", "--device-socket", socket_path,
                "--listen-ollama", f"127.0.0.1:{port}", "--catalog", str(models)]
        env = env_with_src()
        preexec = die_with_parent
        if user is not None:
            env["PYTHONPATH"] = readable_src
            env["PYTHONDONTWRITEBYTECODE"] = "1"

            def preexec():
                os.setgid(user)
                os.setgroups([])
                os.setuid(user)
                die_with_parent()
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, preexec_fn=preexec, cwd="/")
        started.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "the gateway exited"
            try:
                if http("GET", base + "/api/version")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the gateway did not answer"
            time.sleep(0.05)
        return base, daemon

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def device_free_within(socket_path: str, seconds: float) -> float | None:
    """Seconds until the daemon says the device is idle, or None."""
    started = time.monotonic()
    with Client(socket_path, timeout=10) as client:
        while time.monotonic() - started < seconds:
            if client.status().get("device_busy_with") is None:
                return time.monotonic() - started
            time.sleep(0.02)
    return None


def test_list_show_ps_and_version(gateway):
    base, _ = gateway()
    seen = run_client(base, """
        import ollama
        client = ollama.Client(host=HOST)
        listed = client.list()
        shown = client.show('tiny-vlm:2b')
        client.generate(model='tiny-llm', prompt='')          # loads it
        running = client.ps()
        print(json.dumps({
            'names': sorted(model.model for model in listed.models),
            'sizes': [model.size for model in listed.models],
            'details': listed.models[0].details.format,
            'capabilities': shown.capabilities, 'model_info': dict(shown.modelinfo),
            'running': [model.model for model in running.models],
            'expires': [model.expires_at.isoformat() for model in running.models]}))
    """)
    assert seen["names"] == ["clip-not-a-chat:1", "qwen2:1.5b", "tiny-llm:latest", "tiny-vlm:2b"]
    assert all(size > 0 for size in seen["sizes"]) and seen["details"] == "hef"
    assert seen["capabilities"] == ["completion", "vision"]
    assert seen["model_info"]["general.architecture"] == "hailo.vlm"
    # One file under two names (tiny-llm and clip-not-a-chat): listed once, under its first name.
    assert len(seen["running"]) == 1 and seen["running"][0] in ("tiny-llm:latest", "clip-not-a-chat:1")
    status, body = http("GET", base + "/api/version")
    assert status == 200 and json.loads(body)["version"].count(".") == 2
    assert http("HEAD", base + "/")[0] == 200


def test_chat_streamed_and_not_and_generate(gateway):
    base, _ = gateway()
    seen = run_client(base, """
        import ollama
        client = ollama.Client(host=HOST)
        question = [{'role': 'user', 'content': 'Name a red fruit.'}]
        parts = list(client.chat(model='tiny-llm', messages=question, stream=True))
        whole = client.chat(model='tiny-llm', messages=question, stream=False)
        generated = client.generate(model='tiny-llm', prompt='Why is the sky blue?', options={'num_predict': 5})
        raw = client.generate(model='tiny-llm', prompt='Once upon', raw=True, stream=False)
        last = parts[-1]
        print(json.dumps({
            'pieces': [part.message.content for part in parts[:-1]], 'last_content': last.message.content,
            'final': {key: last[key] for key in ('done', 'done_reason', 'total_duration', 'load_duration',
                      'prompt_eval_count', 'prompt_eval_duration', 'eval_count', 'eval_duration')},
            'role': parts[0].message.role,
            'whole': whole.message.content, 'whole_done': whole.done, 'whole_eval': whole.eval_count,
            'generated': generated.response, 'generated_eval': generated.eval_count,
            'generated_reason': generated.done_reason, 'raw': raw.response}))
    """)
    assert len(seen["pieces"]) >= 2 and seen["role"] == "assistant" and seen["last_content"] == ""
    final = seen["final"]
    assert final["done"] is True and final["done_reason"] == "length"   # the catalog's num_predict 6
    assert final["eval_count"] == 6 and final["prompt_eval_count"] > 0
    assert final["total_duration"] >= final["eval_duration"] > 0 and final["prompt_eval_duration"] > 0
    assert final["eval_duration"] >= 5 * TOKEN_MS * 1e6 * 0.9
    assert "".join(seen["pieces"]) == seen["whole"] and seen["whole_done"] and seen["whole_eval"] == 6
    assert seen["generated"] and seen["generated_eval"] == 5 and seen["generated_reason"] == "length"
    assert seen["raw"]


def test_chat_with_an_image_goes_to_the_vlm(gateway):
    base, _ = gateway()
    seen = run_client(base, """
        import io
        import ollama
        from PIL import Image
        picture = io.BytesIO()
        Image.new('RGB', (640, 480), (200, 30, 30)).save(picture, format='PNG')
        client = ollama.Client(host=HOST)
        answer = client.chat(model='tiny-vlm:2b', messages=[
            {'role': 'user', 'content': 'What is in this picture?', 'images': [picture.getvalue()]}])
        try:
            client.chat(model='tiny-llm', messages=[{'role': 'user', 'content': 'hi', 'images': [picture.getvalue()]}])
            refused = None
        except ollama.ResponseError as exc:
            refused = [exc.status_code, exc.error]
        try:
            client.chat(model='tiny-llm', messages=[{'role': 'user', 'content': 'hi'}],
                        tools=[{'type': 'function', 'function': {'name': 'f', 'description': 'd',
                                'parameters': {'type': 'object', 'properties': {}}}}])
            tools = None
        except ollama.ResponseError as exc:
            tools = [exc.status_code, exc.error]
        print(json.dumps({'text': answer.message.content, 'done': answer.done, 'refused': refused, 'tools': tools}))
    """)
    assert seen["text"] and seen["done"]
    assert seen["refused"][0] == 400 and "does not support images" in seen["refused"][1]
    assert seen["tools"] == [400, "model 'tiny-llm:latest' does not support tools"]


def test_keep_alive_zero_unloads_and_empty_requests_load(gateway):
    base, daemon = gateway()
    seen = run_client(base, """
        import ollama
        client = ollama.Client(host=HOST)
        loaded = client.chat(model='tiny-llm', messages=[])
        after_load = [model.model for model in client.ps().models]
        client.chat(model='tiny-llm', messages=[{'role': 'user', 'content': 'hi'}], keep_alive=0)
        after_zero = [model.model for model in client.ps().models]
        client.generate(model='tiny-llm', prompt='', keep_alive='5m')
        forever = client.generate(model='tiny-llm', prompt='', keep_alive=-1)
        unloaded = client.generate(model='tiny-llm', prompt='', keep_alive=0)
        print(json.dumps({'load': loaded.done_reason, 'after_load': after_load, 'after_zero': after_zero,
                          'forever': forever.done_reason, 'unload': unloaded.done_reason,
                          'end': [model.model for model in client.ps().models]}))
    """)
    assert seen["load"] == "load" and seen["after_load"] and seen["after_zero"] == []
    assert seen["forever"] == "load" and seen["unload"] == "unload" and seen["end"] == []
    status, body = http("POST", base + "/api/generate", {"model": "tiny-llm", "prompt": "", "keep_alive": "5 min"})
    assert status == 400 and json.loads(body) == {"error": 'time: invalid duration "5 min"'}


def test_unknown_model_and_unserved_routes(gateway):
    base, _ = gateway()
    seen = run_client(base, """
        import ollama
        client = ollama.Client(host=HOST)
        errors = []
        for call in (lambda: client.chat(model='nope', messages=[{'role': 'user', 'content': 'hi'}]),
                     lambda: list(client.chat(model='nope:7b', messages=[{'role': 'user', 'content': 'hi'}],
                                              stream=True)),
                     lambda: client.show('nope'),
                     lambda: client.embed(model='tiny-llm', input='hi')):
            try:
                call()
                errors.append(None)
            except ollama.ResponseError as exc:
                errors.append([exc.status_code, exc.error])
        print(json.dumps(errors))
    """)
    assert seen[0] == [404, "model 'nope' not found"] and seen[1] == [404, "model 'nope:7b' not found"]
    assert seen[2] == [404, "model 'nope' not found"]
    assert seen[3][0] == 404 and "embeddings are not served" in seen[3][1]


def test_openai_models_and_streamed_chat(gateway):
    base, _ = gateway()
    seen = run_client(base, """
        import base64, io
        import openai
        from PIL import Image
        client = openai.OpenAI(base_url=HOST + '/v1', api_key='unused')
        ids = sorted(model.id for model in client.models.list())
        chunks = list(client.chat.completions.create(
            model='tiny-llm', messages=[{'role': 'user', 'content': 'Name a red fruit.'}], stream=True,
            stream_options={'include_usage': True}, max_tokens=6))
        text = ''.join(chunk.choices[0].delta.content or '' for chunk in chunks if chunk.choices)
        finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1]
        usage = chunks[-1].usage
        whole = client.chat.completions.create(model='tiny-llm', max_tokens=6,
                                               messages=[{'role': 'user', 'content': 'Name a red fruit.'}])
        picture = io.BytesIO()
        Image.new('RGB', (100, 300), (0, 90, 200)).save(picture, format='JPEG')
        url = 'data:image/jpeg;base64,' + base64.b64encode(picture.getvalue()).decode()
        seeing = client.chat.completions.create(model='tiny-vlm:2b', messages=[{'role': 'user', 'content': [
            {'type': 'text', 'text': 'What colour?'}, {'type': 'image_url', 'image_url': {'url': url}}]}])
        try:
            client.chat.completions.create(model='nope', messages=[{'role': 'user', 'content': 'hi'}])
            missing = None
        except openai.NotFoundError as exc:
            missing = [exc.status_code, exc.body]
        print(json.dumps({'ids': ids, 'text': text, 'finish': finish, 'object': chunks[0].object,
                          'usage': usage.model_dump() if usage else None,
                          'whole': whole.choices[0].message.content, 'whole_usage': whole.usage.model_dump(),
                          'seeing': seeing.choices[0].message.content, 'missing': missing}))
    """)
    assert "tiny-llm:latest" in seen["ids"] and "qwen2:1.5b" in seen["ids"]
    assert seen["object"] == "chat.completion.chunk" and seen["finish"] == "length"
    assert seen["text"] == seen["whole"] and seen["text"]
    assert seen["usage"]["completion_tokens"] == 6 and seen["usage"]["prompt_tokens"] > 0
    assert seen["usage"]["total_tokens"] == seen["usage"]["prompt_tokens"] + 6
    assert seen["whole_usage"] == seen["usage"]
    assert seen["seeing"]
    assert seen["missing"][0] == 404 and seen["missing"][1]["message"] == "model 'nope' not found"


def test_a_client_that_leaves_mid_stream_stops_the_generation(gateway):
    base, daemon = gateway(token_ms=20)
    # 2000 tokens x 20 ms = 40 s if it ran to its end.
    seen = run_client(base, """
        import time
        import ollama
        client = ollama.Client(host=HOST)
        # A raw prompt: the simulated model then never says its end token.
        stream = client.generate(model='tiny-llm', prompt='go on', raw=True, stream=True,
                                 options={'num_predict': 2000})
        pieces = 0
        for part in stream:
            pieces += 1
            if pieces == 5:
                break
        client._client.close()    # the HTTP connection goes, as when a program stops reading
        print(json.dumps({'pieces': pieces, 'left_at': time.time()}))
    """)
    assert seen["pieces"] == 5
    waited = device_free_within(daemon.socket_path, 5)
    assert waited is not None, "the generation went on after its client left"


def test_four_chats_at_once_with_clip_between_generations(gateway, model_dir, readable_src):
    """Four chats through the gateway and a CLIP request from another service on the device
    socket: the chats all finish, and CLIP is served between two generations, not after all four."""
    user = 65534 if os.getuid() == 0 else None   # the gateway as its own uid, as under systemd
    base, daemon = gateway(token_ms=20, user=user, readable_src=readable_src)
    clip: dict = {}

    def clip_when_busy():
        with Client(daemon.socket_path, timeout=60) as client:
            # Loaded first, as a CLIP service keeps it: else model affinity rightly lets
            # the chats on the loaded LLM pass it (scheduling.affinity_max_skips).
            client.load_model(str(model_dir / "net.hef"), "clip")
            deadline = time.monotonic() + 30
            while client.status().get("device_busy_with") is None and time.monotonic() < deadline:
                time.sleep(0.01)
            image = np.zeros((224, 224, 3), np.uint8)
            answer = client.infer(str(model_dir / "net.hef"), {"mode": "image", "tensor": tensor(image)}, "clip",
                                  priority="interactive")
            clip["at"], clip["ok"] = time.time(), answer["status"] == "ok"

    thread = threading.Thread(target=clip_when_busy)
    thread.start()
    seen = run_client(base, """
        import asyncio, time
        import ollama
        async def one(index):
            client = ollama.AsyncClient(host=HOST)
            words = ' '.join(['word'] * 11)   # the simulated answer: 4 words, the question's first 12, the end
            answer = await client.chat(model='tiny-llm', options={'num_predict': 40},
                                       messages=[{'role': 'user', 'content': f'story {index} {words}'}])
            return [answer.eval_count, time.time()]
        async def main():
            return await asyncio.gather(*(one(index) for index in range(4)))
        print(json.dumps(asyncio.run(main())))
    """)
    thread.join(60)
    assert [count for count, _ in seen] == [17] * 4
    assert clip.get("ok"), "the CLIP request did not finish"
    if user is not None:   # fairness between uids: CLIP runs after the first generation, not after all four
        assert sum(at > clip["at"] for _, at in seen) >= 2, (clip, seen)


def test_socket_activated_by_name_it_serves_the_gateway_only(start_daemon, models):
    """The descriptor named ollama (hailo-devmgr-ollama.socket's FileDescriptorName=) gets the
    gateway and nothing binds 5099; an unnamed one stays the status port (test_http.py)."""
    daemon = start_daemon()
    port = free_port()
    argv = [shutil.which("systemd-socket-activate"), "-l", f"127.0.0.1:{port}", "--fdname=ollama",
            "-E", "PYTHONPATH", sys.executable, "-m", "hailo_devmgr.http", "--device-socket", daemon.socket_path,
            "--catalog", str(models)]
    process = subprocess.Popen(argv, env=env_with_src(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = http("GET", base + "/api/version")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert status == 200 and "version" in json.loads(body)
        assert http("GET", base + "/metrics")[0] == 404
        assert json.loads(http("GET", base + "/api/tags")[1])["models"]
    finally:
        process.terminate()
        process.wait(10)
