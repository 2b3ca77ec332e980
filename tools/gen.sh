#!/usr/bin/env bash
# Generates everything derived from protos/ into the directory given as $1 (gen/):
#   python/       messages (*_pb2.py), gRPC stubs (*_pb2_grpc.py) and typed stubs (.pyi,
#                 from mypy-protobuf); the compiler is grpcio-tools' bundled protoc,
#                 pinned together with the runtime. (buf has no grpc_python plugin
#                 binary to call, which is why buf lints and checks breaking changes
#                 but protoc generates the Python.)
#   descriptors/  meshbank.binpb, the FileDescriptorSet (with google.api and
#                 google.rpc) that Envoy's gRPC-JSON transcoder loads, and
#                 openapi.yaml, the OpenAPI 3 document of that REST API
#                 (mesh/openapi.py) that the edges serve at /v1/openapi.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gen.sh OUTDIR}
mkdir -p "$out/python" "$out/descriptors"
rm -rf "$out/python/meshbank"
protos=$(cd protos && find meshbank -name '*.proto' | sort)
# shellcheck disable=SC2086
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m grpc_tools.protoc \
  -I protos -I third_party/googleapis \
  --python_out="$out/python" --grpc_python_out="$out/python" \
  --mypy_out=quiet:"$out/python" --mypy_grpc_out=quiet:"$out/python" \
  $protos
.venv/bin/buf build --as-file-descriptor-set --exclude-source-info -o "$out/descriptors/meshbank.binpb"
# The OpenAPI document's descriptions are the proto comments, so it is generated from a
# second descriptor set that keeps the source info (the edges' one does not need it).
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
.venv/bin/buf build --as-file-descriptor-set -o "$src/with-source-info.binpb"
.venv/bin/python -m mesh.openapi "$src/with-source-info.binpb" "$out/descriptors/openapi.yaml"
