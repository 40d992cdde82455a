#!/usr/bin/env bash
# Builds, into DIR (default .gpu/wheels, an ignored folder), the wheels that hilum's worker needs
# on the lent GPU machines (Python 3.12, x86-64), which ship torch, timm, transformers and triton
# but not DeepSpeed, webdataset, pydantic or prometheus_client (nor py-spy, for pending.sh's
# profiles). Carry DIR's parent with the device call (< 64 MiB) and run benchmarks/gpu/pending.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.gpu/wheels}
mkdir -p "$dir"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
# DeepSpeed as a pure-Python wheel: no ops prebuilt (the GPU runs use torch's AdamW, "torch_adam").
# The version the tests ran with: the project's venv's, when there is one.
py=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$dir" "deepspeed==$($py -c 'import importlib.metadata as m; print(m.version("deepspeed"))' 2>/dev/null || echo 0.19.7)"
for p in webdataset==1.0.2 braceexpand==0.1.7 prometheus-client hjson py-cpuinfo msgpack einops ninja \
         pydantic pydantic-core annotated-types typing-inspection typing-extensions py-spy; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dir" "$p"
done
du -sh "$dir"
