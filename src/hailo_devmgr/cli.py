"""`hailo-devmgr`: talk to the device manager from a shell.

Exit status, for scripts: 0 success; 1 the daemon answered with an error
(its code is printed), also to `wait`; 2 bad command line; 3 the daemon
cannot be reached; 75 `wait` timed out (EX_TEMPFAIL, "TEMPFAIL" in
systemctl status: try again later).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from . import config, selftest
from . import protocol as p
from ._version import __version__
from .client import Client, DaemonUnreachable, DeviceError, default_socket_path
from .tensors import encode_results

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 75
# Answers that mean "a moment": a daemon stopping for a restart, or a full queue.
TRANSIENT_CODES = (p.SHUTTING_DOWN, p.BUSY)
WAIT_POLL_S = 0.1


def _json_arg(text: str):
    """JSON given inline, or @FILE to read it from a file (- for stdin)."""
    try:
        if text.startswith("@"):
            source = sys.stdin if text == "@-" else open(text[1:], encoding="utf-8")
            with source:
                return json.load(source)
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})")


def _type_and_path(text: str) -> tuple[str, str]:
    model_type, _, path = text.partition("=")
    if model_type not in selftest.TYPES or not path:
        raise argparse.ArgumentTypeError(f"want TYPE=PATH with TYPE one of {', '.join(selftest.TYPES)}")
    return model_type, path


def _selftest(client: Client, args) -> int:
    if args.model:
        models = dict(args.model)
    else:
        settings = config.load(args.config, required=False)
        models = selftest.find_models(settings.model_dirs, settings.pin)
        if not models:
            print(f"hailo-devmgr: no model to test in {', '.join(settings.model_dirs)} (nor pinned in "
                  f"{args.config}); name one with --model TYPE=PATH", file=sys.stderr)
            return EXIT_ERROR
    status = client.status()
    print(f"backend {status.get('backend')}, HailoRT {status.get('hailort_version') or 'unknown'}, "
          f"device {status.get('device_id') or 'none'}")
    rows = selftest.run(client, models)
    print(selftest.table(rows))
    return EXIT_OK if all(row.ok for row in rows) else EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hailo-devmgr", description=__doc__.split("\n")[0],
                                     epilog="Exit status: 0 ok, 1 error answer, 2 usage, "
                                            "3 daemon unreachable, 75 wait timed out.")
    parser.add_argument("--socket", default=None,
                        help=f"daemon socket (default $HAILO_DEVICE_SOCKET or {default_socket_path()})")
    parser.add_argument("--json", action="store_true", help="print the daemon's raw JSON answer")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="daemon, device and loaded models")
    commands.add_parser("device", help="device identity, temperature and networks")
    commands.add_parser("ping", help="check that the daemon answers")
    wait = commands.add_parser("wait", help="wait until the daemon answers (for service scripts)")
    wait.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds (30)")
    selftest = commands.add_parser("selftest", help="load and run one model of each installed type (first boot)")
    selftest.add_argument("--config", default=config.DEFAULT_CONFIG_PATH, metavar="PATH",
                          help=f"where model_dirs and pin: are read (default {config.DEFAULT_CONFIG_PATH})")
    selftest.add_argument("--model", action="append", default=[], type=_type_and_path, metavar="TYPE=PATH",
                          help="test this model (repeatable) instead of looking in the model folders")
    for name, text in (("load", "load a model"), ("unload", "unload a model"), ("infer", "run one inference")):
        command = commands.add_parser(name, help=text)
        command.add_argument("model_path")
        command.add_argument("--type", dest="model_type", default="vlm", help="model type (default vlm)")
        if name != "unload":
            command.add_argument("--params", type=_json_arg, default=None, metavar="JSON",
                                 help="model_params as JSON, or @FILE")
        if name == "infer":
            command.add_argument("--input", dest="input_data", type=_json_arg, required=True,
                                 metavar="JSON", help="input_data as JSON, or @FILE, or @- for stdin")
    return parser


def _describe_result(value):
    """Tensors shown as dtype and shape instead of base64."""
    if isinstance(value, np.ndarray):
        return f"<tensor {value.dtype.name} {list(value.shape)}>"
    if isinstance(value, dict):
        return {key: _describe_result(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_describe_result(item) for item in value]
    return value


def _print_status(response: dict) -> None:
    print(f"backend:     {response.get('backend')}  (hailo-device-manager {response.get('version')}, "
          f"HailoRT {response.get('hailort_version') or 'not loaded'})")
    print(f"device:      {response.get('device_id') or 'none'}")
    if response.get("runtime_broken_reason"):
        print(f"unavailable: {response['runtime_broken_reason']}")
    if response.get("throttled"):
        print("thermal:     overheated: new work is refused until the chip cools")
    if response.get("runtime_faults"):
        print(f"faults:      {response['runtime_faults']} runtime fault(s), "
              f"{response.get('runtime_recoveries', 0)} recovered by rebuilding the device")
    print(f"uptime:      {response.get('uptime_seconds', 0):.0f} s   queue: {response.get('queue_depth')}   "
          f"evictions: {response.get('total_lru_evictions')}")
    models = response.get("loaded_models") or []
    print(f"models:      {len(models)} loaded")
    for model in models:
        pinned = " (pinned)" if model.get("pinned") else ""
        if not pinned and model.get("keep_alive_s") is not None:
            pinned = f" (unloaded after {model['keep_alive_s']:g} s idle)"
        print(f"  {model['model_type']:<9} {model['model_path']}{pinned}")


def _wait(client_factory, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with client_factory() as client:
                client.ping()
            return EXIT_OK
        except DeviceError as exc:
            if exc.code not in TRANSIENT_CODES:
                # The daemon answered, with an error (e.g. its configuration is broken):
                # say what it said rather than wait for an answer that came.
                print(f"hailo-devmgr: the daemon answered: {exc}", file=sys.stderr)
                return EXIT_ERROR
            last = exc
        except DaemonUnreachable as exc:
            last = exc
        if time.monotonic() >= deadline:
            print(f"hailo-devmgr: no answer within {timeout_s:g} s ({last})", file=sys.stderr)
            return EXIT_TIMEOUT
        time.sleep(WAIT_POLL_S)


def run(args) -> int:
    socket_path = args.socket or default_socket_path()

    def client_factory():
        return Client(socket_path, timeout=None)

    if args.command == "wait":
        return _wait(lambda: Client(socket_path, timeout=2.0), args.timeout)
    with client_factory() as client:
        if args.command == "selftest":
            return _selftest(client, args)
        if args.command in ("status", "ping"):
            response = client.request(args.command)
        elif args.command == "device":
            response = client.device_status()
        elif args.command == "load":
            response = client.load_model(args.model_path, args.model_type, args.params)
        elif args.command == "unload":
            response = client.unload_model(args.model_path, args.model_type)
        else:
            response = client.infer(args.model_path, args.input_data, args.model_type, args.params,
                                    decode=not args.json)
    if args.json:
        print(json.dumps(encode_results(response), indent=2))
    elif args.command == "status":
        _print_status(response)
    elif args.command == "ping":
        print(f"ok (uptime {response.get('uptime_seconds', 0):.0f} s)")
    elif args.command == "infer":
        print(json.dumps(_describe_result(response.get("result")), indent=2))
        print(f"inference_time_ms: {response.get('inference_time_ms')}", file=sys.stderr)
    elif args.command == "device":
        print(json.dumps(response, indent=2))
    else:
        print(response.get("message", "ok"))
    return EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DaemonUnreachable as exc:
        print(f"hailo-devmgr: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except DeviceError as exc:
        print(f"hailo-devmgr: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
