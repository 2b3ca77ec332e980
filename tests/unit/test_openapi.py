"""The OpenAPI document: valid OpenAPI 3, one operation per RPC, the proto3 JSON mapping.

`make check-gen` proves the committed document is what the generator makes of the
protos; these tests prove what the generator makes is right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2
from openapi_spec_validator import validate

from mesh import api, envoy, openapi
from meshbank.account.v1 import account_pb2
from meshbank.auth.v1 import auth_pb2
from meshbank.transfer.v1 import transfer_pb2
from regions import local

COMMITTED = local.descriptor_path().with_name("openapi.yaml")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMMITTED.read_text())
    return loaded


def _descriptor_set(*roots: FileDescriptor) -> descriptor_pb2.FileDescriptorSet:
    """The files and everything they import, from the generated modules (no comments)."""
    fds = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dep in file.dependencies:
            add(dep)
        file.CopyToProto(fds.file.add())

    for root in (*roots, error_details_pb2.DESCRIPTOR, status_pb2.DESCRIPTOR):
        add(root)
    return fds


def _schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["components"]["schemas"][name]
    return schema


def test_the_committed_document_is_valid_openapi_3(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.")


def test_every_rpc_has_its_operation_with_the_right_security(document: dict[str, Any]) -> None:
    methods = api.methods()
    assert len(methods) == 12
    for m in methods:
        op = document["paths"][m.http_template][m.http_verb.lower()]
        assert op["operationId"] == f"{m.full_service.rsplit('.', 1)[1]}_{m.name}"
        assert f"gRPC: `{m.path.lstrip('/')}`" in op["description"]
        assert op["security"] == ([] if m.service == "auth" else [{"bearerAuth": []}])
        assert set(op["responses"]) == {"200", *openapi.ERROR_RESPONSES}
    count = sum(len(ops) for ops in document["paths"].values())
    assert count == len(methods)


def test_proto3_json_mapping(document: dict[str, Any]) -> None:
    account = _schema(document, "meshbank.account.v1.Account")
    props = account["properties"]
    # lowerCamelCase json names, int64 as strings, enums by name, timestamps as RFC 3339.
    assert "balanceMinor" in props
    assert "balance_minor" not in props
    assert props["balanceMinor"]["type"] == "string"
    assert props["balanceMinor"]["format"] == "int64"
    assert props["state"]["allOf"][0]["$ref"].endswith("meshbank.account.v1.AccountState")
    state = _schema(document, "meshbank.account.v1.AccountState")
    assert state["enum"] == [
        "ACCOUNT_STATE_UNSPECIFIED",
        "ACCOUNT_STATE_OPEN",
        "ACCOUNT_STATE_CLOSED",
    ]
    assert props["createTime"]["format"] == "date-time"
    # The edge prints every primitive field; unset messages (closeTime) are left out.
    assert "balanceMinor" in account["required"]
    assert "closeTime" not in account["required"]
    assert account["additionalProperties"] is False
    # Requests require nothing (proto3): the services validate and say what is missing.
    assert "required" not in _schema(document, "meshbank.transfer.v1.CreateTransferRequest")


def test_get_takes_query_parameters_and_post_a_body_without_path_fields(
    document: dict[str, Any],
) -> None:
    get = document["paths"]["/v1/accounts/{account_id}"]["get"]
    params = {(p["in"], p["name"]): p for p in get["parameters"]}
    assert set(params) == {
        ("path", "account_id"),
        ("query", "consistency"),
        ("query", "maxStaleness"),
    }
    assert params[("path", "account_id")]["required"] is True
    assert params[("query", "maxStaleness")]["schema"]["pattern"].endswith("s$")

    close = document["paths"]["/v1/accounts/{account_id}:close"]["post"]
    ref = close["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = _schema(document, ref.rsplit("/", 1)[1])
    assert set(body["properties"]) == {"requestId"}


def test_errors_are_google_rpc_status_with_typed_details(document: dict[str, Any]) -> None:
    status = _schema(document, "google.rpc.Status")
    kinds = [
        d["allOf"][0]["properties"]["@type"]["enum"][0]
        for d in status["properties"]["details"]["items"]["oneOf"]
    ]
    assert kinds == [f"type.googleapis.com/{d}" for d in openapi.ERROR_DETAILS]
    # ErrorInfo.metadata is a map: a JSON object of strings, not a list of entries.
    metadata = _schema(document, "google.rpc.ErrorInfo")["properties"]["metadata"]
    assert metadata["type"] == "object"
    assert metadata["additionalProperties"] == {"type": "string"}
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}


def test_the_generator_describes_the_generated_modules_too() -> None:
    """Without source info there are no descriptions, but the same paths and schemas."""
    built = openapi.build(
        _descriptor_set(account_pb2.DESCRIPTOR, auth_pb2.DESCRIPTOR, transfer_pb2.DESCRIPTOR)
    )
    validate(built)
    committed = yaml.safe_load(COMMITTED.read_text())
    assert list(built["paths"]) == list(committed["paths"])
    assert set(built["components"]["schemas"]) == set(committed["components"]["schemas"])


def test_an_rpc_without_an_http_rule_is_refused() -> None:
    fds = _descriptor_set(auth_pb2.DESCRIPTOR)
    auth = next(f for f in fds.file if f.name == "meshbank/auth/v1/auth.proto")
    auth.service[0].method[0].options.ClearExtension(annotations_pb2.http)
    with pytest.raises(openapi.DocumentError, match=r"Login: needs a google\.api\.http"):
        openapi.build(fds)


def test_the_edges_serve_the_document_without_the_transcoder() -> None:
    from regions import topology

    paths = envoy.Paths(Path("/etc/meshbank/pki"), Path("/etc/meshbank/meshbank.binpb"))
    edge = envoy.edge(topology.load(), "us-east", paths)
    listener = edge["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    config = hcm["route_config"]
    route = config["virtual_hosts"][0]["routes"][0]
    assert route["match"]["path"] == openapi.DOCUMENT_PATH
    assert route["direct_response"]["body"] == {"filename": "/etc/meshbank/openapi.yaml"}
    disabled = route["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]
    assert disabled["disabled"] is True
    assert config["max_direct_response_body_size_bytes"] > COMMITTED.stat().st_size
