#!/usr/bin/env bash
# Test mimkernels as users get it: a wheel built against the torch of a given venv, installed there, then the
# demo's self-check and the whole test suite run against the installed copy (not this checkout's sources).
#
#   tests/test_installed_wheel.sh VENV [pytest args...]
#
# `make test-floor` runs it in .venv-floor (the oldest torch / Triton we support, requirements-floor.txt). The
# wheel is built from a copy of the tracked and untracked-but-not-ignored files, so no build output of another
# torch (build/, mimkernels/_C*.so) leaks into it; tests/ and benchmarks/ run from a folder without mimkernels/,
# so `import mimkernels` can only find the installed wheel.
set -euo pipefail
venv=$(cd "$1" && pwd); shift
root=$(cd "$(dirname "$0")/.." && pwd)
py="$venv/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir "$work/src" "$work/wheel" "$work/run"
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$work/src")
(cd "$work/src" && "$py" -m pip wheel --quiet --no-build-isolation --no-deps -w "$work/wheel" .)
"$py" -m pip install --quiet --no-deps --force-reinstall "$work"/wheel/mimkernels-*.whl
cp -r "$root/tests" "$root/benchmarks" "$root/pyproject.toml" "$work/run/"

cd "$work/run"
"$py" - <<'EOF'
import pathlib, sys, sysconfig
import mimkernels
where = pathlib.Path(mimkernels.__file__).resolve()
assert where.is_relative_to(pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()), where
import mimkernels._C  # the wheel carries the compiled extension
print(f"installed wheel: {where.parent} (python {sys.version.split()[0]})")
EOF
"$py" -m mimkernels --no-train
"$py" -m pytest -q -p no:cacheprovider "$@"
