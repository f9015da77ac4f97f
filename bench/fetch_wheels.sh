#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels bench/gpu_checks.sh installs on a machine that
# lacks them and has no network: opacus (+ opt_einsum, its one dependency a CUDA image may
# lack) and peft, the versions pyproject.toml pins. Run here, then carry ".whl" to the device.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps -d .whl "opacus==1.6.*" "opt_einsum>=3.3" "peft==0.21.*"
ls -l .whl
