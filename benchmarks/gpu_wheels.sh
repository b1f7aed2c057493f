#!/usr/bin/env bash
# Builds .whl/: the wheels benchmarks/gpu_check.sh installs on the GPU machine, which has no package index.
# Run here (with PyPI), then carry .whl with the call. Only what that machine's image lacks (its torch,
# transformers, huggingface_hub, numpy, pillow, pytest... are used as they are; never a CUDA torch), at the
# versions of this project's environment, as CPython 3.12 manylinux x86-64 wheels (about 15 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
packages=(diffusers kornia kornia_rs jsonargparse docstring_parser typeshed_client importlib_metadata lazy_importer lightning)
rm -rf .whl
mkdir .whl
for name in "${packages[@]}"; do
  version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done
ls .whl
du -sh .whl
