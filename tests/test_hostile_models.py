"""Hostile clients, part models: another uid's model can be neither unloaded
through keep_alive nor swapped for one loaded with other model_params.

The victim is ATTACKER_2 (another unprivileged uid), the attacker ATTACKER;
root (an admin) only reads status and checks what admins may do.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import Client, tensor
from hostile import ATTACKER, ATTACKER_2, attack, hostile_daemon, needs_root, socket_folder  # noqa: F401
from test_daemon_models import loaded_paths, wait_until

pytestmark = needs_root

VICTIM = ATTACKER_2

# One request through the client library as ARGS[0] with the fields ARGS[1]
# (JSON); input_data "image" stands for a zero 224x224x3 picture, as clip or
# generic take it (too large for a command line). Prints the raw answer, or the error.
REQUEST = """
import json
import numpy as np
from hailo_devmgr.client import Client, DeviceError, tensor
fields = json.loads(ARGS[1])
if fields.get("input_data") == "image":
    picture = tensor(np.zeros((224, 224, 3), np.uint8))
    fields["input_data"] = ({"mode": "image", "tensor": picture} if fields["model_type"] == "clip"
                            else {"inputs": {"input_layer1": picture}})
with Client(SOCK, timeout=30) as client:
    try:
        print(json.dumps(client.request(ARGS[0], _decode=False, **fields)))
    except DeviceError as error:
        print(json.dumps({"code": error.code, "error": error.message}))
"""


def as_uid(uid: int, readable_src: str, daemon, action: str, **fields) -> dict:
    return json.loads(attack(uid, readable_src, daemon.socket_path, REQUEST, action, json.dumps(fields)))


def models_of(daemon) -> list[dict]:
    with Client(daemon.socket_path, timeout=30) as client:
        return client.status()["loaded_models"]


def still_loaded(daemon, path: str, seconds: float = 0.5) -> bool:
    """Whether ``path`` is loaded after the idle chore had time to unload it."""
    time.sleep(seconds)
    return path in [model["model_path"] for model in models_of(daemon)]


# -- 7: keep_alive of another uid's model --------------------------------------

def test_another_uid_cannot_unload_a_model_through_keep_alive(hostile_daemon, readable_src, model_dir):
    daemon = hostile_daemon()
    path = str(model_dir / "net.hef")
    generic = {"model_type": "generic", "model_path": path}
    assert as_uid(VICTIM, readable_src, daemon, "load_model", **generic)["message"] == "Model loaded"

    refused = as_uid(ATTACKER, readable_src, daemon, "load_model", **generic, keep_alive=0)
    assert refused["code"] == p.FORBIDDEN
    assert f"loaded by another user (uid {VICTIM})" in refused["error"] and "keep_alive" in refused["error"]
    refused = as_uid(ATTACKER, readable_src, daemon, "infer", **generic, keep_alive="1ms",
                     input_data="image")
    assert refused["code"] == p.FORBIDDEN
    assert still_loaded(daemon, path)
    assert f"load_model refused: Model {path} was loaded by another user" in daemon.log()

    # Leaving it as it is, or keeping it forever, is no harm.
    assert as_uid(ATTACKER, readable_src, daemon, "load_model", **generic)["message"] == "Model already loaded"
    assert as_uid(ATTACKER, readable_src, daemon, "load_model", **generic, keep_alive=-1)["status"] == "ok"
    # An admin (root) may shorten it.
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic", keep_alive=0)
        wait_until(lambda: path not in loaded_paths(client), what="the admin's keep_alive 0")


def test_another_uid_may_extend_a_keep_alive_but_not_shorten_it(hostile_daemon, readable_src, model_dir):
    daemon = hostile_daemon(keep_alive={"default": 0})
    path = str(model_dir / "net.hef")
    generic = {"model_type": "generic", "model_path": path}
    as_uid(VICTIM, readable_src, daemon, "load_model", **generic, keep_alive="10m")

    for shorter in ("1m", 0, "599s"):
        refused = as_uid(ATTACKER, readable_src, daemon, "load_model", **generic, keep_alive=shorter)
        assert refused["code"] == p.FORBIDDEN, shorter
    assert as_uid(ATTACKER, readable_src, daemon, "load_model", **generic, keep_alive="1h")["status"] == "ok"
    [model] = models_of(daemon)
    assert model["keep_alive_s"] == 3600
    # Without keep_alive the configured 0 would end it: for another uid's model it does not.
    assert as_uid(ATTACKER, readable_src, daemon, "load_model", **generic)["status"] == "ok"
    assert still_loaded(daemon, path)
    assert models_of(daemon)[0]["keep_alive_s"] == 3600

    # The owner may end it, and the log line of that unload names who asked.
    assert as_uid(VICTIM, readable_src, daemon, "load_model", **generic, keep_alive=0)["status"] == "ok"
    with Client(daemon.socket_path, timeout=30) as client:
        wait_until(lambda: path not in loaded_paths(client), what="the owner's keep_alive 0")
    [line] = [line for line in daemon.log().splitlines() if f"unloaded generic:{path}: idle for" in line]
    assert f"CLIENT_UID={VICTIM}" in line


# -- 8: model_params are part of what a request gets -----------------------------

@pytest.fixture
def evil_hef(model_dir) -> str:
    """A file the attacker placed in the model folder."""
    path = model_dir / "evil.hef"
    path.write_text("the attacker's own network\n")
    return str(path)


def embedding(answer: dict) -> str:
    assert answer.get("status") == "ok", answer
    return answer["result"]["data_b64"]


@pytest.mark.parametrize("victim_params", [{}, {"text_hef_path": "clip_text.hef"}], ids=["no params", "params"])
def test_a_model_loaded_with_other_params_never_answers_another_uid(hostile_daemon, readable_src, model_dir,
                                                                    evil_hef, victim_params):
    daemon = hostile_daemon(max_loaded_models=2)
    path = str(model_dir / "net.hef")
    params = {key: str(model_dir / name) for key, name in victim_params.items()}
    clip = {"model_type": "clip", "model_path": path}
    mine = embedding(as_uid(VICTIM, readable_src, daemon, "infer", **clip, model_params=params,
                            input_data="image"))

    # Two other models evict the victim's; then the same cache key with the attacker's image HEF.
    for name in ("other.hef", "two.hef"):
        as_uid(ATTACKER, readable_src, daemon, "load_model", model_type="generic", model_path=str(model_dir / name))
    assert path not in [model["model_path"] for model in models_of(daemon)]
    swapped = as_uid(ATTACKER, readable_src, daemon, "load_model", **clip,
                     model_params={**params, "image_hef_path": evil_hef})
    assert swapped["message"] == "Model loaded"

    assert embedding(as_uid(VICTIM, readable_src, daemon, "infer", **clip, model_params=params,
                            input_data="image")) == mine
    clips = {json.dumps(model["model_params"], sort_keys=True): model for model in models_of(daemon)}
    assert sorted(clips) == sorted(json.dumps(shown, sort_keys=True)
                                   for shown in (params, {**params, "image_hef_path": evil_hef}))


def test_unload_by_name_takes_only_the_requesters_own_instances(hostile_daemon, readable_src, model_dir, evil_hef):
    daemon = hostile_daemon()
    path = str(model_dir / "net.hef")
    clip = {"model_type": "clip", "model_path": path}
    as_uid(VICTIM, readable_src, daemon, "load_model", **clip)
    as_uid(ATTACKER, readable_src, daemon, "load_model", **clip, model_params={"image_hef_path": evil_hef})
    assert len(models_of(daemon)) == 2

    assert as_uid(ATTACKER, readable_src, daemon, "unload_model", **clip)["message"] == "Model unloaded"
    [left] = models_of(daemon)
    assert left["model_params"] == {}
    refused = as_uid(ATTACKER, readable_src, daemon, "unload_model", **clip)
    assert refused["code"] == p.FORBIDDEN and f"(uid {VICTIM})" in refused["error"]


def test_a_v1_service_loads_with_params_and_infers_without(hostile_daemon, readable_src, model_dir, evil_hef):
    """hailo_clip_service loads with model_params before every infer and infers without them:
    it gets its own model, never one another uid loaded with other params."""
    daemon = hostile_daemon()
    path = str(model_dir / "net.hef")
    clip = {"model_type": "clip", "model_path": path}
    as_uid(ATTACKER, readable_src, daemon, "load_model", **clip, model_params={"image_hef_path": evil_hef})
    with Client(daemon.socket_path, timeout=30) as client:  # the image embedding of model_path itself
        bare = client.infer(path, {"mode": "image", "tensor": tensor(np.zeros((224, 224, 3), np.uint8))}, "clip",
                            decode=False)["result"]["data_b64"]

    params = {"text_hef_path": str(model_dir / "clip_text.hef")}
    assert as_uid(VICTIM, readable_src, daemon, "load_model", **clip, model_params=params)["status"] == "ok"
    code = attack(VICTIM, readable_src, daemon.socket_path, """
        import numpy as np
        from hailo_devmgr.client import Client, tensor
        with Client(SOCK, timeout=30) as client:
            client.infer(ARGS[0], {"mode": "text", "tensor": tensor(np.zeros((77, 512), np.float32))}, "clip")
            print(client.infer(ARGS[0], {"mode": "image", "tensor": tensor(np.zeros((224, 224, 3), np.uint8))},
                               "clip", decode=False)["result"]["data_b64"])
        """, path)
    assert code.strip() == bare  # the victim's own model (image from model_path), not the attacker's


def test_pinned_params_are_the_pins_own(hostile_daemon, readable_src, model_dir, evil_hef):
    path = str(model_dir / "net.hef")
    params = {"text_hef_path": str(model_dir / "clip_text.hef")}
    daemon = hostile_daemon(pin=[{"model_type": "clip", "model_path": path, "model_params": params}])
    with Client(daemon.socket_path, timeout=30) as client:
        wait_until(lambda: path in loaded_paths(client), what="the pinned model")
    clip = {"model_type": "clip", "model_path": path}
    assert as_uid(ATTACKER, readable_src, daemon, "load_model", **clip, model_params=params)["message"] == \
        "Model already loaded"
    assert as_uid(ATTACKER, readable_src, daemon, "load_model", **clip,
                  model_params={**params, "image_hef_path": evil_hef})["message"] == "Model loaded"
    pinned = {model["pinned"]: model["model_params"] for model in models_of(daemon)}
    assert pinned == {True: params, False: {**params, "image_hef_path": evil_hef}}

    assert as_uid(ATTACKER, readable_src, daemon, "unload_model", **clip)["message"] == "Model unloaded"
    refused = as_uid(ATTACKER, readable_src, daemon, "unload_model", **clip)
    assert refused["code"] == p.FORBIDDEN and "pinned" in refused["error"]
    assert [model["pinned"] for model in models_of(daemon)] == [True]
