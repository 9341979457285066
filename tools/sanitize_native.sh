#!/usr/bin/env bash
# Build qkov.fastpath._native once with AddressSanitizer + UndefinedBehaviorSanitizer into a
# temporary directory and run the native tests against that build.
#
#   tools/sanitize_native.sh [extra pytest args]
#
# How: a copy of src/qkov in a mktemp -d directory, its _native.c compiled there with
# -fsanitize=address,undefined, put first on PYTHONPATH (ahead of the editable install's
# src/), with the sanitizer runtimes preloaded into python (torch runs under them with
# detect_leaks=0). A pytest plugin checks, before any test runs, that qkov and
# qkov.fastpath._native really are the sanitized copies and that libasan is mapped.
# Any sanitizer report aborts the process (-fno-sanitize-recover=all, halt_on_error) and the
# script exits non-zero; the output is also searched for reports as a second check.
#
# Environment: PYTHON (default python), QKOV_NATIVE_SRC (the C file to build, default
# src/qkov/fastpath/_native.c: point it at a scratch copy to try a change),
# QKOV_SANITIZE_TESTS (test files, default tests/test_native.py, plus
# tests/test_sanitized.py where it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SRC=${QKOV_NATIVE_SRC:-src/qkov/fastpath/_native.c}
CC=${CC:-gcc}
start=$SECONDS

die() { echo "sanitize_native: $*" >&2; exit 1; }
command -v "$CC" > /dev/null || die "no $CC: the sanitized build needs gcc"
[ -f "$SRC" ] || die "no C source at $SRC"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Where python's headers are and what the extension's file is called, from this python.
read -r ext include < <("$PY" -c 'import sysconfig as s; print(s.get_config_var("EXT_SUFFIX"), s.get_paths()["include"])')
so_name="_native$ext"

# The package, minus whatever was built in place, with the sanitized module in its place.
mkdir -p "$tmp/site"
cp -r src/qkov "$tmp/site/qkov"
find "$tmp/site/qkov" \( -name '__pycache__' -o -name '*.so' -o -name '*.pyd' \) -prune -exec rm -rf {} +
so="$tmp/site/qkov/fastpath/$so_name"

# setup.py's flags (-std=gnu11 -fopenmp-simd) with -O1 -g and the sanitizers instead of -O3.
# float-cast-overflow is not part of GCC's -fsanitize=undefined; a NaN or out-of-range float
# converted to an int is undefined behaviour too.
"$CC" -shared -fPIC -std=gnu11 -fopenmp-simd -O1 -g -fno-omit-frame-pointer \
    -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all \
    -I"$include" "$SRC" -o "$so"
nm -D "$so" | grep -q __asan_report || die "$so has no ASan instrumentation"
nm -D "$so" | grep -q __ubsan_handle || die "$so has no UBSan instrumentation"

asan=$("$CC" -print-file-name=libasan.so)
ubsan=$("$CC" -print-file-name=libubsan.so)
[ -f "$asan" ] && [ -f "$ubsan" ] || die "no sanitizer runtimes ($asan, $ubsan): install libasan/libubsan for $CC"

# Fails the session before the first test unless the sanitized copies are the ones imported.
cat > "$tmp/site/_qkov_sanitized_check.py" << 'EOF'
import importlib, os
import pytest

def pytest_configure(config):
    want, root = os.environ["QKOV_SANITIZED_SO"], os.environ["QKOV_SANITIZED_ROOT"]
    qkov = importlib.import_module("qkov")
    mod = importlib.import_module("qkov.fastpath._native")
    got = os.path.realpath(getattr(mod, "__file__", "") or "")
    with open("/proc/self/maps") as f:
        asan_mapped = "libasan" in f.read()
    print(f"sanitized qkov.fastpath._native: {got}")
    if got != os.path.realpath(want) or not os.path.realpath(qkov.__file__).startswith(root + os.sep):
        raise pytest.UsageError(f"not the sanitized build: qkov from {qkov.__file__}, _native from {got}, want {want}")
    if not asan_mapped:
        raise pytest.UsageError("the ASan runtime is not loaded in this process")
EOF

if [ -n "${QKOV_SANITIZE_TESTS:-}" ]; then
    read -r -a tests <<< "$QKOV_SANITIZE_TESTS"
else
    tests=(tests/test_native.py)
    [ -f tests/test_sanitized.py ] && tests+=(tests/test_sanitized.py)
fi

echo "sanitize_native: built $so from $SRC in $((SECONDS - start)) s; running ${tests[*]}"
log="$tmp/pytest.log"
set +e
env LD_PRELOAD="$asan:$ubsan" \
    ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=1:strict_init_order=1:check_initialization_order=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    PYTHONPATH="$tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 QKOV_NATIVE=1 \
    QKOV_SANITIZED_SO="$so" QKOV_SANITIZED_ROOT="$(realpath "$tmp/site")" \
    "$PY" -m pytest -q -p no:cacheprovider -p _qkov_sanitized_check -s "${tests[@]}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if grep -qE 'ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer' "$log"; then
    echo "sanitize_native: FAILED: a sanitizer report (above) after $((SECONDS - start)) s" >&2
    exit 1
fi
[ "$rc" -eq 0 ] || { echo "sanitize_native: FAILED: pytest exited $rc after $((SECONDS - start)) s" >&2; exit "$rc"; }
echo "sanitize_native: OK, no sanitizer reports, in $((SECONDS - start)) s"
