#!/bin/sh
# Coverage-guided fuzzing of framing and request parsing with atheris.
#
#   fuzz/atheris.sh              # make fuzz: FUZZ_SECONDS (default 300); atheris must install
#   fuzz/atheris.sh --optional   # make test: a short run, skipped (and said so) without atheris
#
# atheris is on PyPI only. It is installed with pip into a venv under
# build/ that sees Debian's packages (--system-site-packages: numpy, yaml),
# so nothing is installed into the system Python (PEP 668) and it works as
# root on a fresh Debian 12 machine (needs python3-venv, in TEST_DEPS).
# Output: build/fuzz/atheris.log; corpus build/fuzz/corpus; crashers
# build/fuzz/crashes/ (keep one as a test: tests/fuzz_regressions/README.md).
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
VENV=${FUZZ_VENV:-$ROOT/build/fuzz-venv}
OUT=${FUZZ_DIR:-$ROOT/build/fuzz}
RUN_SECONDS=${FUZZ_SECONDS:-300}
OPTIONAL=0
[ "${1:-}" = "--optional" ] && OPTIONAL=1

mkdir -p "$OUT/corpus" "$OUT/crashes"

unavailable() {
    if [ "$OPTIONAL" = 1 ]; then
        echo "fuzz: SKIPPED the atheris run: $1 (the hypothesis fuzz tests ran with pytest)"
        exit 0
    fi
    echo "fuzz: atheris unavailable: $1" >&2
    exit 1
}

if ! "$VENV/bin/python" -c "import atheris" 2>/dev/null; then
    echo "fuzz: installing atheris (pip, PyPI) into $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV" >"$OUT/install.log" 2>&1 \
        || unavailable "cannot create a venv with $PYTHON (is python3-venv installed?), see $OUT/install.log"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input atheris \
        >>"$OUT/install.log" 2>&1 \
        || unavailable "pip could not install atheris (no wheel for this Python or machine, or no network), see $OUT/install.log"
fi

VERSION=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('atheris'))" 2>/dev/null)
STAMP="$OUT/.run-started"
touch "$STAMP"
echo "fuzz: atheris $VERSION on fuzz/fuzz_frames.py for ${RUN_SECONDS} s (log: $OUT/atheris.log)"
"$VENV/bin/python" "$ROOT/fuzz/fuzz_frames.py" -max_total_time="$RUN_SECONDS" -timeout=10 -max_len=8192 \
    -rss_limit_mb=2048 -dict="$ROOT/fuzz/frames.dict" -artifact_prefix="$OUT/crashes/" \
    "$OUT/corpus" >"$OUT/atheris.log" 2>&1
STATUS=$?

RUNS=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$OUT/atheris.log" | tail -n 1 | sed 's/Done //; s/ second/ s/')
CORPUS=$(find "$OUT/corpus" -type f | wc -l)
CRASHERS=$(find "$OUT/crashes" -type f -newer "$STAMP" | wc -l)
KNOWN=$(grep -o 'met known issue [a-z0-9-]*' "$OUT/atheris.log" | sed 's/met known issue //' | sort -u | tr '\n' ' ')
echo "fuzz: ${RUNS:-stopped before its first report}; corpus $CORPUS inputs; crashers $CRASHERS; known issues met: ${KNOWN:-none}"
if [ "$STATUS" -ne 0 ] || [ "$CRASHERS" -ne 0 ]; then
    tail -n 40 "$OUT/atheris.log"
    echo "fuzz: FAILED: crasher(s) in $OUT/crashes/ (replay: $VENV/bin/python fuzz/fuzz_frames.py FILE)" >&2
    exit 1
fi
