#!/usr/bin/env bash
# Builds, into DIR (default .gpu/wheels, an ignored folder), the wheels that hilum's worker needs
# on the lent GPU machines (Python 3.12, x86-64), which ship torch, timm, transformers, triton,
# aiohttp, requests, werkzeug and jinja2 but not DeepSpeed, webdataset, pydantic or
# prometheus_client, nor what reads and serves S3 (s3fs and its botocore stack; moto's server for
# the benchmarks' loopback S3), nor py-spy for pending.sh's profiles. Carry DIR's parent with the
# device call (< 64 MiB) and run benchmarks/gpu/pending.sh there.
# PYVER=3.11 builds the same kit for this machine's Python, to smoke-test pending.sh here first.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.gpu/wheels}
pyver=${PYVER:-3.12}
mkdir -p "$dir"
mkdir -p .git/info && { grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; }
# The versions the tests ran with: the project's venv's, when there is one.
py=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
pinned() {  # NAME -> NAME==VERSION as installed in the venv, else NAME (the newest)
  local v; v=$($py -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null) && echo "$1==$v" || echo "$1"
}
# DeepSpeed as a pure-Python wheel: no ops prebuilt (the GPU runs use torch's AdamW, "torch_adam").
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$dir" "$(pinned deepspeed)"
# moto[server] declares far more than its S3 server imports (cfn-lint, docker, graphql, openapi
# and JSON-schema validators for other AWS services): only what `moto_server` needs for S3 travels.
pkgs="webdataset braceexpand prometheus-client hjson py-cpuinfo msgpack einops ninja
      pydantic pydantic-core annotated-types typing-inspection typing-extensions py-spy
      s3fs fsspec aiobotocore aioitertools botocore boto3 s3transfer jmespath
      moto xmltodict responses flask flask-cors blinker itsdangerous cryptography cffi pycparser py-partiql-parser"
for p in $pkgs; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 --platform any -d "$dir" "$(pinned "$p")"
done
du -sh "$dir"
