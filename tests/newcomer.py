#!/usr/bin/env python3
"""`make newcomer`: the README's two commands on a pristine Debian, as a newcomer runs them.

For each supported release: a minbase rootfs with only make, git, python3
and ca-certificates; the checkout (with uncommitted changes) and ../shared
copied to /root/newcomer, a mode-0700 path as a root user's checkout is;
then `make run` (the daemon must answer `status`) and `make test`, with no
HOME and LANG=C. Runs in a throw-away container (systemd-nspawn, not booted,
like CI's machine); logs go to build/newcomer/<suite>.log.

Not part of `make test`: it installs the test dependencies afresh in each
release, so it takes a while (about 10 minutes a release here).
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import container as ct

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("bookworm", "trixie")
PACKAGES = ("make", "git", "python3", "ca-certificates")
TIMEOUT_S = 3600
HOME_DIR = "/root/newcomer"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# What the newcomer types, in order. `make run` runs in the background until
# its socket answers the README's `status` command; then `make test`.
SCRIPT = f"""
set -eu
mkdir -p {HOME_DIR} && chmod 0700 /root {HOME_DIR}
tar -x -C {HOME_DIR} -f /host/checkout.tar
cd {HOME_DIR}/main
echo "== make run"
setsid make run > /tmp/make-run.log 2>&1 &
run_pid=$!
tries=0
until PYTHONPATH=$PWD/src HAILO_DEVICE_SOCKET=$PWD/run/device.sock python3 -m hailo_devmgr.cli status \
      > /tmp/status.out 2>&1; do
  tries=$((tries + 1))
  if [ $tries -gt 600 ]; then echo "make run: no answer after 600 s"; cat /tmp/make-run.log; exit 1; fi
  sleep 1
done
echo "make run: the daemon answered status after about $tries s"; cat /tmp/status.out | head -5
kill -INT -$run_pid; wait $run_pid || true
echo "== make test"
make test
"""


def checkout_tar(target: Path) -> Path:
    """The work tree as git sees it (tracked and untracked, not ignored) beside ../shared."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], check=True, capture_output=True).stdout.split(b"\0")
    path = target / "checkout.tar"
    with tarfile.open(path, "w") as tar:
        for name in filter(None, (entry.decode() for entry in files)):
            if (ROOT / name).exists():
                tar.add(ROOT / name, arcname=f"main/{name}", recursive=False)
        shared = ROOT.parent / "shared"
        if shared.is_dir():
            tar.add(shared, arcname="shared")
    return path


def try_suite(suite: str, host_dir: Path, logs: Path) -> tuple[int, str]:
    root = ct.rootfs(suite, packages=PACKAGES)
    log = logs / f"{suite}.log"
    status = ct.run_in(root, SCRIPT, binds={str(host_dir): "/host"}, env={"PATH": ct.CLEAN_PATH, "LANG": "C"},
                       log_path=log, timeout=TIMEOUT_S)
    lines = ANSI.sub("", log.read_text(errors="replace")).splitlines()
    summary = [line for line in lines if line.startswith(("== ", "make run:", "====="))]
    return status, "\n".join(summary[-8:] or lines[-20:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=SUITES, help="only this release (repeatable)")
    args = parser.parse_args()
    reason = ct.unavailable_reason()
    if reason:
        print(f"newcomer: cannot run here: {reason}", file=sys.stderr)
        return 2
    logs = ROOT / "build" / "newcomer"
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="hailo-newcomer-") as host_dir:
        checkout_tar(Path(host_dir))
        for suite in args.suite or SUITES:
            print(f"--- {suite}: pristine minbase, checkout at {HOME_DIR}/main (mode 0700), LANG=C, no HOME",
                  flush=True)
            status, summary = try_suite(suite, Path(host_dir), logs)
            print(summary)
            print(f"--- {suite}: exit {status} (log: {shlex.quote(str(logs / f'{suite}.log'))})", flush=True)
            if status != 0:
                failed.append(suite)
    print("newcomer: " + (f"FAILED on {', '.join(failed)}" if failed else "both commands work on every release"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
