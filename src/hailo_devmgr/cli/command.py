"""`hailo-devmgr`: talk to the device manager from a shell.

Exit status, for scripts: 0 success; 1 the daemon answered with an error
(its code is printed), also to `wait`; 2 bad command line; 3 the daemon
cannot be reached; 75 no answer within --timeout (EX_TEMPFAIL, "TEMPFAIL"
in systemctl status: try again later).

Every command gives up after --timeout seconds: a few for status and ping,
longer than the daemon's default watchdog budgets for load and infer (a
large model's load on demand, then its inference).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ..daemon import config
from . import lend as lending
from . import selftest
from ..wire import protocol as p
from .._version import __version__
from ..client import Client, DaemonUnreachable, DeviceError, RequestTimeout, default_socket_path, tensor
from ..wire.tensors import encode_results

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 75
# Seconds each command waits for its answer (--timeout). load and infer: past
# the default watchdog budgets (load 300 s, infer 120 s), so the daemon's
# own limits end a hung call first.
DEFAULT_TIMEOUTS = {"status": 5.0, "ping": 5.0, "device": 10.0, "wait": 30.0, "unload": 90.0,
                    "load": 360.0, "infer": 480.0, "selftest": 900.0,
                    # lend and exclusive: at least --wait more (the daemon waits that long for the device).
                    "lend": 30.0, "reclaim": 60.0, "exclusive": 30.0}
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


def _tensor_arg(text: str) -> tuple[list[str], str]:
    """KEY=FILE: where in input_data (dots for nesting) and the file."""
    key, _, path = text.partition("=")
    if not key or not path:
        raise argparse.ArgumentTypeError("want KEY=FILE, e.g. inputs.x=x.npy (dots nest keys)")
    return key.split("."), path


def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(size) for size in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want sizes like 224,224,3, got {text!r}")


def _read_tensor(path: str, dtype: str | None, shape: tuple[int, ...] | None) -> np.ndarray:
    """A .npy file as it is, or raw bytes read as --dtype and --shape."""
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    if dtype is None or shape is None:
        raise ValueError(f"{path}: raw bytes need --dtype and --shape (or save it as .npy)")
    return np.fromfile(path, dtype=np.dtype(dtype)).reshape(shape)


def input_data(args) -> dict:
    """--input's JSON with each --tensor KEY=FILE set in it."""
    data = args.input_data if args.input_data is not None else {}
    for keys, path in args.tensors:
        where = data
        for key in keys[:-1]:
            where = where.setdefault(key, {})
        where[keys[-1]] = tensor(_read_tensor(path, args.dtype, args.shape))
    return data


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
                                            "3 daemon unreachable, 75 no answer within --timeout.")
    parser.add_argument("--socket", default=None,
                        help=f"daemon socket (default $HAILO_DEVICE_SOCKET or {default_socket_path()})")
    parser.add_argument("--json", action="store_true", help="print the daemon's raw JSON answer")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(commands, "status", "daemon, device and loaded models")
    _command(commands, "device", "device identity, temperature and networks")
    _command(commands, "ping", "check that the daemon answers")
    wait = _command(commands, "wait", "wait until the daemon answers (for service scripts)")
    wait.add_argument("--device", action="store_true",
                      help="also wait until the device is not lent to another program")
    lend_command = _command(commands, "lend", "release the device for another program (admins)")
    lend_command.add_argument("--to", required=True, metavar="NAME", help="who borrows it (shown in status)")
    _add_wait(lend_command)
    _command(commands, "reclaim", "take a lent device back and reopen it (admins)")
    exclusive = _command(commands, "exclusive", "lend the device to COMMAND, run it, take it back (admins)")
    exclusive.add_argument("--to", default=None, metavar="NAME", help="borrower name (default: the command)")
    _add_wait(exclusive)
    exclusive.add_argument("run", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    selftest = _command(commands, "selftest", "load and run one model of each installed type (first boot)")
    selftest.add_argument("--config", default=config.DEFAULT_CONFIG_PATH, metavar="PATH",
                          help=f"where model_dirs and pin: are read (default {config.DEFAULT_CONFIG_PATH})")
    selftest.add_argument("--model", action="append", default=[], type=_type_and_path, metavar="TYPE=PATH",
                          help="test this model (repeatable) instead of looking in the model folders")
    for name, text in (("load", "load a model"), ("unload", "unload a model"), ("infer", "run one inference")):
        command = _command(commands, name, text)
        command.add_argument("model_path")
        command.add_argument("--type", dest="model_type", default=None,
                             help="model type: generic, clip, vlm, vlm_chat, whisper, ocr, depth, pose "
                                  "(required for load; else taken from the loaded model's entry in status)")
        if name != "unload":
            command.add_argument("--params", type=_json_arg, default=None, metavar="JSON",
                                 help="model_params as JSON, or @FILE")
        if name == "infer":
            _add_input_arguments(command)
    return parser


def _add_wait(command) -> None:
    command.add_argument("--wait", type=float, default=30.0, metavar="S",
                         help="wait up to S seconds for the work on the device to finish (default 30)")


def _command(commands, name: str, text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=text)
    default = DEFAULT_TIMEOUTS[name]
    command.add_argument("--timeout", type=float, default=default, metavar="S",
                         help=f"give up after S seconds without an answer (default {default:g})")
    return command


def _add_input_arguments(command) -> None:
    command.add_argument("--input", dest="input_data", type=_json_arg, default=None,
                         metavar="JSON", help="input_data as JSON, or @FILE, or @- for stdin")
    command.add_argument("--tensor", dest="tensors", action="append", default=[], type=_tensor_arg,
                         metavar="KEY=FILE", help="a tensor from a .npy file (or raw bytes, with --dtype "
                         "and --shape) set at KEY of input_data, e.g. inputs.x=x.npy (repeatable)")
    command.add_argument("--dtype", default=None, help="element type of raw --tensor files (e.g. uint8)")
    command.add_argument("--shape", type=_shape_arg, default=None, metavar="SIZES",
                         help="shape of raw --tensor files (e.g. 224,224,3)")


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


def _wait(client_factory, timeout_s: float, device: bool = False) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with client_factory() as client:
                answer = client.ping()
            if not (device and answer.get("lent_to")):
                return EXIT_OK
            last = f"the device is lent to {answer['lent_to']}"
        except DeviceError as exc:
            if exc.code not in TRANSIENT_CODES:
                # The daemon answered, with an error (e.g. its configuration is broken):
                # say what it said rather than wait for an answer that came.
                print(f"hailo-devmgr: the daemon answered: {exc}", file=sys.stderr)
                return EXIT_ERROR
            last = exc
        except (DaemonUnreachable, RequestTimeout) as exc:  # e.g. a daemon still starting
            last = exc
        if time.monotonic() >= deadline:
            print(f"hailo-devmgr: no answer within {timeout_s:g} s ({last})", file=sys.stderr)
            return EXIT_TIMEOUT
        time.sleep(WAIT_POLL_S)


class UsageError(Exception):
    """A command line the daemon cannot be asked (exit 2)."""


def model_type(client: Client, args) -> str:
    """--type, or the type of the loaded model at this path (status says)."""
    if args.model_type:
        return args.model_type
    types = {model["model_type"] for model in client.status().get("loaded_models") or []
             if model.get("model_path") == args.model_path}
    if len(types) != 1:
        found = f"loaded as {', '.join(sorted(types))}" if types else "not loaded"
        raise UsageError(f"{args.model_path} is {found}: say which with --type")
    [found] = types
    print(f"hailo-devmgr: --type {found} (from the loaded model)", file=sys.stderr)
    return found


def _request(client: Client, args) -> dict:
    if args.command in ("status", "ping"):
        return client.request(args.command)
    if args.command == "device":
        return client.device_status()
    if args.command == "lend":
        return lending.lend(client, args.to, args.wait)
    if args.command == "reclaim":
        return lending.reclaim(client)
    if args.command == "load":
        if not args.model_type:
            raise UsageError("load needs --type (generic, clip, vlm, vlm_chat, whisper, ocr, depth, pose)")
        return client.load_model(args.model_path, args.model_type, args.params)
    if args.command == "unload":
        return client.unload_model(args.model_path, model_type(client, args))
    if args.input_data is None and not args.tensors:
        raise UsageError("infer needs --input or --tensor")
    try:
        data = input_data(args)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--tensor: {exc}") from None
    return client.infer(args.model_path, data, model_type(client, args), args.params, decode=not args.json)


def run(args) -> int:
    socket_path = args.socket or default_socket_path()
    if args.command == "wait":
        return _wait(lambda: Client(socket_path, timeout=min(args.timeout, 2.0)), args.timeout, args.device)
    timeout = max(args.timeout, getattr(args, "wait", 0.0) + 10.0)
    if args.command == "exclusive":
        command = args.run[1:] if args.run[:1] == ["--"] else args.run
        if not command:
            raise UsageError("exclusive needs a command after --, e.g. exclusive -- hailortcli scan")
        return lending.exclusive(lambda: Client(socket_path, timeout=timeout), command, args.to, args.wait)
    with Client(socket_path, timeout=timeout) as client:
        if args.command == "selftest":
            return _selftest(client, args)
        response = _request(client, args)
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
    elif args.command == "lend":
        print(f"device lent to {response['lent_to']}")
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
    except RequestTimeout:
        print(f"hailo-devmgr: no answer within {args.timeout:g} s (--timeout); "
              "see systemctl status hailo-device-manager", file=sys.stderr)
        return EXIT_TIMEOUT
    except UsageError as exc:
        print(f"hailo-devmgr: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
