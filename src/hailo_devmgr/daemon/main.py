"""`hailo-device-manager`: start, run and stop the daemon.

Startup, in order: config (a defect exits 1 with one line), logging, the
listener (inherited from systemd, else bound at ``socket_path``), the
device thread (first device open), READY=1, then pinned models are
pre-warmed in the background. Signal handlers only set things in motion;
shutdown is one method with ordered, logged steps.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import select
import signal
import sys
import time
from dataclasses import replace

from . import config as config_mod
from . import systemd
from .._version import __version__
from .backends import create_backend
from .cpu_affinity import CpuPlacement
from .device import Chore, DeviceRuntime, DeviceThread
from .registry import ModelRegistry
from .scheduler import QueueLimits, create_queue
from .settings import Settings, bytes_per_uid
from . import lending, memory, status
from .dispatch import Dispatcher
from .listener import Listener, bind_unix_socket, refuse_connections

log = logging.getLogger("hailo_devmgr")

EXIT_OK = 0
EXIT_CONFIG = 1      # bad configuration (the unit does not restart on it)
EXIT_STARTUP = 2     # could not listen, or the device thread did not stop
EXIT_SOFTWARE = 70   # unexpected internal error (EX_SOFTWARE; systemd restarts)
SHUTDOWN_DRAIN_S = 5.0
STATUS_INTERVAL_S = 1.0
# A broken config: answer waiting clients this long at most (the unit's
# StartLimitBurst= counts on it), checking the file every CONFIG_POLL_S.
CONFIG_ERROR_LINGER_S = 10.0
CONFIG_POLL_S = 0.2


def _pid(text: str) -> int:
    """A process id: a positive integer (0 and negatives would signal groups)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a process id (a positive integer), got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hailo-device-manager",
        description="Own the Hailo accelerator and share it over a Unix socket.")
    parser.add_argument("--config", metavar="PATH",
                        help=f"YAML configuration (default {config_mod.DEFAULT_CONFIG_PATH}, "
                             "or $HAILO_DEVICE_CONFIG)")
    parser.add_argument("--socket", metavar="PATH",
                        help="listen here when not started by systemd (overrides socket_path)")
    parser.add_argument("--backend", choices=config_mod.BACKENDS, help="override backend")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print it as JSON and exit")
    parser.add_argument("--reload", type=_pid, metavar="PID",
                        help="validate the configuration, then ask the daemon PID to reload it (SIGHUP); "
                             "exit 1 naming the line at fault when it is not valid (systemctl reload)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def load_config(args) -> config_mod.Config:
    config = config_mod.load(args.config)
    overrides = {}
    if args.socket:
        overrides["socket_path"] = args.socket
    if args.backend:
        overrides["backend"] = args.backend
    return replace(config, **overrides) if overrides else config


def queue_limits(config) -> QueueLimits:
    scheduling = config.scheduling
    return QueueLimits(scheduling.max_queue, scheduling.max_queue_per_client, scheduling.aging_s,
                       scheduling.affinity_max_skips, max_untaken_bytes=bytes_per_uid(config))


class Daemon:
    def __init__(self, config, args):
        self.settings = Settings(config)   # the one running configuration (settings.py)
        self.args = args
        self.notifier = systemd.Notifier()
        backend = create_backend(config)
        # The event loop's thread and the device thread share one CPU (cpu_affinity.py).
        self.placement = CpuPlacement.choose(config.cpu_affinity)
        self.runtime = DeviceRuntime(backend, self.settings, self.placement)
        self.registry = ModelRegistry(self.runtime, self.settings)
        budgets = lambda: self.runtime.budgets  # noqa: E731 - read at each use (settings.py)
        queue = create_queue(config.scheduling.policy, queue_limits(config),
                             lambda: self.registry.loaded_keys)
        self.device = DeviceThread(self.runtime, queue=queue, chores=[
            Chore("unload idle models", self.registry.idle_due, self.registry.unload_idle,
                  lambda: budgets().other_budget_s),
            Chore("reload pinned model", self.registry.restore_due, self.registry.restore_next_pin,
                  lambda: budgets().load_budget_s),
        ])
        self.dispatcher: Dispatcher | None = None
        self.listener: Listener | None = None
        self._stop = asyncio.Event()
        self._bound_path: str | None = None
        self._bound_inode: tuple | None = None
        self._watchdog_warned = False
        self._watch_settings()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.placement.pin_here()   # before any thread starts: the device thread inherits it
        listener = self._listener()
        self.dispatcher = Dispatcher(self.settings, self.device, self.runtime, self.registry,
                                     self.config.socket_path)
        self.collector = memory.CollectAfterConnections()
        self.listener = Listener(self.dispatcher, connection_ended=self.collector.connection_ended)
        self.dispatcher.after_reclaim = self.prewarm
        self.runtime.loan_path = lending.state_path(self.config.lend_state_file)
        self.runtime.loan = lending.load(self.runtime.loan_path)
        if self.runtime.loan is not None:
            log.warning("the device is still lent to %s: not opening it until hailo-devmgr reclaim",
                        self.runtime.loan.to)
        # Handlers first: a SIGTERM while the device opens still stops cleanly.
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        # The first device open comes before the server answers anything, so
        # no status ever shows the device as fine before it was opened (or
        # without the reason it could not be). Meanwhile clients wait in the
        # listen backlog, as they do under socket activation before READY.
        await loop.run_in_executor(None, self.device.start, self.config.watchdog.other_budget_s)
        await self.listener.start(listener)
        memory.freeze_startup_objects()
        self.notifier.ready(status.summary(self.dispatcher))
        log.info("hailo-device-manager %s ready on %s (backend %s; event loop and device thread: %s)",
                 __version__, self.dispatcher.socket_path, self.config.backend, self.placement.describe())
        if self.runtime.loan is None:
            self.prewarm()
        tasks = [asyncio.ensure_future(self._status_loop())]
        if self.notifier.watchdog_interval_s:
            tasks.append(asyncio.ensure_future(self._watchdog_loop(self.notifier.watchdog_interval_s)))
        if self.config.idle_exit_s:
            tasks.append(asyncio.ensure_future(self._idle_exit_loop()))
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        self.collector.cancel()
        return await self.shutdown()

    def _listener(self):
        fds = systemd.inherited_sockets()
        if fds:
            log.info("using the socket passed by systemd")
            return systemd.adopt_listener(fds)
        sock = bind_unix_socket(self.config.socket_path, self.config.socket_mode,
                                self.config.socket_dir_mode)
        self._bound_path = self.config.socket_path
        self._bound_inode = _inode(self._bound_path)
        return sock

    def prewarm(self) -> None:
        """Load pinned models after READY, in the background (READY never waits)."""
        for pin in self.config.pin:
            asyncio.ensure_future(self._prewarm_one(pin))

    async def _prewarm_one(self, pin) -> None:
        response = await self.dispatcher.preload(pin.model_type, pin.model_path, pin.model_params)
        if "error" in response:
            log.error("pinned model %s could not be loaded: %s", pin.model_path, response["error"])

    async def _status_loop(self) -> None:
        while True:
            self.notifier.status(status.summary(self.dispatcher))
            await asyncio.sleep(STATUS_INTERVAL_S)

    def _idle(self) -> bool:
        """Nothing would be lost by exiting: no client, no device work, no pinned model."""
        return (not self.dispatcher.sessions and self.device.queue_depth == 0
                and self.device.busy_with is None and not self.config.pin)

    async def _idle_exit_loop(self) -> None:
        """idle_exit_s: exit cleanly once idle that long (the socket restarts us)."""
        idle_since = None
        while True:
            await asyncio.sleep(min(1.0, self.config.idle_exit_s / 4))
            if not self.config.idle_exit_s or not self._idle():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.config.idle_exit_s:
                log.info("idle for %g s (idle_exit_s): exiting; the next connection starts the daemon again",
                         self.config.idle_exit_s)
                self._stop.set()
                return

    async def _watchdog_loop(self, interval_s: float) -> None:
        """WATCHDOG=1 only while the device thread is healthy: a hung HailoRT
        call must end in a watchdog restart, not a daemon that looks alive."""
        while True:
            problem = self.device.health()
            if problem is None:
                self.notifier.watchdog()
                self._watchdog_warned = False
            elif not self._watchdog_warned:
                log.error("withholding watchdog pings: %s", problem)
                self._watchdog_warned = True
            await asyncio.sleep(interval_s)

    async def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.args)
        except config_mod.ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        else:
            self._apply(new)
        self.notifier.ready(status.summary(self.dispatcher))

    @property
    def config(self):
        return self.settings.config

    def _watch_settings(self) -> None:
        """What a reload rebuilds beside the parts that read the settings at use."""
        settings = self.settings
        settings.watch(lambda: systemd.set_level(settings.config.log_level))
        settings.watch(lambda: self.device.queue.set_limits(queue_limits(settings.config)))
        # The registry is the device thread's: its pinned flags are redone there.
        settings.watch(lambda: self.device.submit(
            self.registry.settings_changed, label="apply configuration",
            budget_s=settings.config.watchdog.other_budget_s, client="daemon", priority=0))
        settings.watch(self.prewarm)  # pins added by the new file (loaded ones answer "already loaded")

    def _apply(self, new) -> None:
        waiting = self.settings.replace(new)
        if waiting:
            log.warning("configuration reloaded; %s change only after a restart", ", ".join(waiting))
        log.info("configuration reloaded")

    async def shutdown(self) -> int:
        log.info("stopping: refusing new work")
        self.notifier.stopping()
        self.dispatcher.shutting_down = True
        self.listener.stop_accepting()
        loop = asyncio.get_running_loop()
        log.info("stopping: answering queued work, finishing the running operation")
        stopped = await loop.run_in_executor(None, self.device.stop, SHUTDOWN_DRAIN_S)
        await self.listener.close_connections(grace_s=1.0)
        if self._bound_path and _inode(self._bound_path) == self._bound_inode:
            # Only the socket file we made: a daemon started by hand after us
            # (ours was stopping) has bound the same path anew.
            try:
                os.unlink(self._bound_path)
            except OSError:
                pass
        if not stopped:
            log.error("stopping: the device thread did not finish within %.0f s (%s)",
                      SHUTDOWN_DRAIN_S, self.device.busy_with)
            return EXIT_STARTUP
        log.info("stopped")
        return EXIT_OK


def _inode(path: str) -> tuple | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def raise_fd_limit() -> None:
    """Take the hard RLIMIT_NOFILE as the soft one, best effort.

    systemd gives a unit a soft limit of 1024 only for programs that still
    use select(); it recommends that programs that do not raise it
    themselves (systemd.exec(5), LimitNOFILE=). We use epoll (asyncio's
    selector) and start no other program that could be given the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. a hard limit of infinity, past fs.nr_open
        log.debug("kept the soft descriptor limit of %d (hard %d): %s", soft, hard, exc)
        return
    log.debug("raised the soft descriptor limit from %d to %d", soft, hard)


def config_error(args) -> str | None:
    """The configuration's error message, or None when it loads."""
    try:
        load_config(args)
    except config_mod.ConfigError as exc:
        return f"hailo-device-manager: configuration error: {exc}"
    return None


def client_waiting(listener) -> bool:
    readable, _, _ = select.select([listener], [], [], 0)
    return bool(readable)


def refuse_while_misconfigured(listener, args, message: str) -> None:
    """Socket-activated with a broken config: answer the waiting clients.

    Exiting at once would leave their connections queued on the socket, so
    systemd would start us again and again until its start limit fails the
    socket unit for good. Answering them gives each client the reason
    instead of a hang, keeps the socket usable once the file is fixed, and
    spaces out the starts (at most one per CONFIG_ERROR_LINGER_S while
    clients keep coming, well under the unit's StartLimitBurst=). Started
    with nobody waiting (systemctl start or restart), it fails at once. The
    answering ends as soon as the file changes, so no client is told an
    error the admin has already fixed; the next client starts us afresh.
    """
    if not client_waiting(listener):
        return
    reason = message.removeprefix("hailo-device-manager: ")
    systemd.Notifier().status(f"{reason}; answering clients with it until the file changes")
    deadline = time.monotonic() + CONFIG_ERROR_LINGER_S
    while time.monotonic() < deadline:
        refuse_connections(listener, reason, CONFIG_POLL_S)
        if config_error(args) != message:
            return


def misconfigured(args, message: str) -> int:
    print(message, file=sys.stderr)
    fds = [] if args.check_config or args.reload is not None else systemd.inherited_sockets()
    if fds:
        refuse_while_misconfigured(systemd.adopt_listener(fds), args, message)
    return EXIT_CONFIG


def ask_to_reload(pid: int) -> int:
    """``systemctl reload``: the file was valid, so the daemon may take it (it
    checks again, and keeps the running configuration if the file changed
    for the worse meanwhile). No /bin/kill needed: procps is not a dependency."""
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"hailo-device-manager: cannot signal the daemon (pid {pid}): {exc.strerror}", file=sys.stderr)
        return EXIT_STARTUP
    print(f"hailo-device-manager: configuration valid; daemon {pid} reloads it")
    return EXIT_OK


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args)
    except config_mod.ConfigError as exc:
        return misconfigured(args, f"hailo-device-manager: configuration error: {exc}")
    if args.check_config:
        print(json.dumps(config_mod.describe(config), indent=2))
        return EXIT_OK
    if args.reload is not None:
        return ask_to_reload(args.reload)
    systemd.setup_logging(config.log_level)
    raise_fd_limit()
    memory.return_large_blocks_to_the_system()
    try:
        return asyncio.run(Daemon(config, args).run())
    except (OSError, systemd.SystemdError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_STARTUP
    except Exception:
        # Not 1: that status means "fix the configuration" and is not restarted.
        log.exception("internal error")
        return EXIT_SOFTWARE
