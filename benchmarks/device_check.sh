#!/usr/bin/env bash
# On a lent GPU machine, from the repository root: bash benchmarks/device_check.sh
# Installs jax's CUDA build first if jax sees no GPU (needs pip's index or a
# wheel cache; without either, device_check.py says "error: no GPU/TPU backend").
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
"$PY" -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")' 2>/dev/null ||
  "$PY" -m pip install -q -U 'jax[cuda12]' || echo 'device_check.sh: could not install jax[cuda12]' >&2
exec "$PY" benchmarks/device_check.py --out "${OUT:-.}/device_check.json" "$@"
