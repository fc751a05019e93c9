#!/usr/bin/env bash
# On a lent GPU machine, from the repository root: bash benchmarks/device_check.sh
# With .whl/ carried along (bash benchmarks/device_wheels.sh fills it where
# pip reaches an index), installs those wheels into /tmp/site first: the GPU
# machine reaches no index. Where jax sees no GPU, device_check.py says so in
# one `error:` line (exit 2) after jax's own message on why CUDA did not start.
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
if compgen -G '.whl/*.whl' >/dev/null; then
  wheels=(.whl/*.whl)
  for wheel in .whl/if_older/*.whl; do  # only where the image's is older
    [ -e "$wheel" ] || continue
    name=${wheel##*/}; name=${name%%-*}; carried=${wheel##*/"$name"-}
    if "$PY" -c 'import sys
from importlib import metadata
from packaging.version import Version
try:
  sys.exit(Version(metadata.version(sys.argv[1])) >= Version(sys.argv[2]))
except metadata.PackageNotFoundError:
  pass' "$name" "${carried%%-*}"; then
      wheels+=("$wheel")
    fi
  done
  # One install: a second --target --upgrade would replace the namespace
  # folder (google/) the first one filled.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --no-warn-conflicts --upgrade --target /tmp/site "${wheels[@]}" || {
    echo "error: .whl/: pip could not install it into /tmp/site (its message" \
      "is above); the wheels are for the GPU image's Python 3.12 on x86_64" \
      "(PYTHON=$PY): refill .whl with bash benchmarks/device_wheels.sh" >&2
    exit 1
  }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # flax_resnet, uninstalled
export PYTHONUNBUFFERED=1  # a call cut off at its limit shows where it was
exec "$PY" benchmarks/device_check.py --out "${OUT:-.}/device_check.json" "$@"
