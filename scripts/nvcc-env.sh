#!/usr/bin/env bash
# Puts CUDA 13.0's nvcc, installed from PyPI into a cached virtualenv, in NVCC, so that
# build.rs compiles the kernels on a machine without a CUDA toolkit (CI does this too).
#
#   eval "$(scripts/nvcc-env.sh)"    # run: installs if needed, prints `export NVCC=...`
#   source scripts/nvcc-env.sh       # bash only: installs if needed, exports NVCC here
#
# The virtualenv is ${TUNELOOP_CUDA_VENV:-$HOME/.cache/tuneloop/cuda-13.0}; pip runs only
# when the pins recorded in it differ from the ones below. All five pins are needed: an
# unpinned nvidia-nvvm pulls a newer cicc whose PTX the 13.0 ptxas rejects. $PYTHON
# (default python3) creates the virtualenv.

TUNELOOP_CUDA_PINS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"

# A function that returns instead of exiting, so that sourcing this file never ends
# (or sets options in) the caller's shell. Progress goes to stderr: stdout is for eval.
tuneloop_nvcc_env() {
    local venv="${TUNELOOP_CUDA_VENV:-$HOME/.cache/tuneloop/cuda-13.0}"
    local stamp="$venv/tuneloop-cuda-pins.txt"
    local site nvcc

    if [[ ! -x "$venv/bin/python" ]]; then
        echo "nvcc-env: creating virtualenv $venv" >&2
        "${PYTHON:-python3}" -m venv "$venv" >&2 || return 1
    fi
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || return 1
    nvcc="$site/nvidia/cu13/bin/nvcc"

    if [[ "$(cat "$stamp" 2>/dev/null)" != "$TUNELOOP_CUDA_PINS" || ! -x "$nvcc" ]]; then
        echo "nvcc-env: installing $TUNELOOP_CUDA_PINS" >&2
        # shellcheck disable=SC2086 # one word per pin
        "$venv/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
            $TUNELOOP_CUDA_PINS >&2 || return 1
        printf '%s\n' "$TUNELOOP_CUDA_PINS" >"$stamp" || return 1
    fi
    if [[ ! -x "$nvcc" ]]; then
        echo "nvcc-env: no nvcc at $nvcc after installing $TUNELOOP_CUDA_PINS" >&2
        return 1
    fi
    export NVCC="$nvcc"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    tuneloop_nvcc_env
    printf 'export NVCC=%q\n' "$NVCC"
else
    tuneloop_nvcc_env
fi
