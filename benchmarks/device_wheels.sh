#!/usr/bin/env bash
# Here, where pip reaches its index, before a call on a lent GPU machine:
#   bash benchmarks/device_wheels.sh      # fills .whl/ (git-ignored), 11 MB
# The GPU machine reaches no index. Its image has jax (CUDA), flax, optax,
# chex, orbax-checkpoint, numpy, pillow, h5py, etils, protobuf, pyarrow, ...
# (/work/.library/device/KINDS.md, "Python packages already there") but not
# the packages below, which flax_resnet's data pipeline and configs import.
# Carry .whl on that call; benchmarks/device_check.sh installs them into
# /tmp/site without an index. The versions are the ones the tests run with;
# the image's Python is 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The closure of grain, ml_collections, tensorflow-datasets and tensorboardX
# minus what the image has (tests/test_benchmarks.py checks this list
# against those packages' own requirements).
WHEELS=(
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
  ml_collections==1.1.0
  tensorflow-datasets==4.9.10 dm-tree==0.1.10 immutabledict==4.3.1
  simple-parsing==0.1.9 docstring_parser==0.18.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  termcolor==3.3.0 toml==0.10.2 importlib_resources==7.1.0
  tensorboardX==2.6.5
)
# Published as source only; pure Python, so a wheel built here runs there.
SOURCE_ONLY=(promise==2.3)
# The image has these, at versions not on record; device_check.sh installs
# them only where the image's are older (googleapis-common-protos and
# tensorflow-metadata's generated code need protobuf >= 6.33.5).
IF_OLDER=(protobuf==6.33.5)

rm -rf .whl
mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 \
  -d .whl/if_older "${IF_OLDER[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl "${SOURCE_ONLY[@]}"
du -sh .whl
echo "carry .whl in the device call: bash benchmarks/device_check.sh"
