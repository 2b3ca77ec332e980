#!/usr/bin/env bash
# Generates the Python code for protos/ into the directory given as $1 (gen/python):
# messages (*_pb2.py), gRPC stubs (*_pb2_grpc.py) and their typed stubs (.pyi, from
# mypy-protobuf). The compiler is grpcio-tools' bundled protoc, pinned with the runtime.
# buf has no grpc_python plugin binary to call, which is why buf lints and checks
# breaking changes but this script generates.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gen.sh OUTDIR}
mkdir -p "$out"
rm -rf "$out/meshbank"
protos=$(cd protos && find meshbank -name '*.proto' | sort)
# shellcheck disable=SC2086
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m grpc_tools.protoc \
  -I protos -I third_party/googleapis \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  $protos
