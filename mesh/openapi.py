"""The OpenAPI 3 document of the REST API, generated from the protos alone.

The edges' gRPC-JSON transcoder derives the REST API from the ``google.api.http``
annotations; this module derives its description from the same descriptors, so the
document cannot drift from what the edges accept (``make check-gen`` regenerates it and
fails on a diff). It follows what the transcoder does, with the print options of
``mesh.envoy.edge()``:

* proto3 JSON mapping: fields by their ``json_name`` (lowerCamelCase), int64 as decimal
  strings, enums as their value names, Timestamp as RFC 3339, Duration as ``"1.5s"``;
* responses print every scalar, enum and repeated field even at its default value
  (``always_print_primitive_fields``), so those are ``required`` in response schemas;
* GET: ``{field}`` path parameters, every other field a query parameter; POST with
  ``body: "*"``: the request message minus the path parameters as a JSON body;
* unknown fields and query parameters are rejected, hence ``additionalProperties: false``;
* errors: the JSON form of ``google.rpc.Status`` with its typed details, and the HTTP
  status the transcoder maps each gRPC code to (``convert_grpc_status``).

Descriptions are the proto comments, so the descriptor set read here must be built with
source info (``buf build`` without ``--exclude-source-info``; see tools/gen.sh).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

Schema = dict[str, Any]
FieldType = descriptor_pb2.FieldDescriptorProto

# Where the edges serve the document (mesh.envoy); reachable without a token.
DOCUMENT_PATH = "/v1/openapi.yaml"
OUR_PACKAGE_PREFIX = "meshbank."
# The auth service issues the tokens, so its calls take none; every other service's
# calls need `authorization: Bearer <access token>` (services/common/authn.py).
TOKENLESS_SERVICES = frozenset({"meshbank.auth.v1.AuthService"})
ERROR_DETAILS = (
    "google.rpc.ErrorInfo",
    "google.rpc.BadRequest",
    "google.rpc.ResourceInfo",
    "google.rpc.PreconditionFailure",
    "google.rpc.RetryInfo",
)
# HTTP status of each gRPC code the API documents (docs/api.md), as the transcoder maps
# them (the grpc-gateway table): FAILED_PRECONDITION is a 400 like INVALID_ARGUMENT.
ERROR_RESPONSES = {
    "400": "INVALID_ARGUMENT (a BadRequest lists every bad field), FAILED_PRECONDITION "
    "(a ledger rule forbids it now), or a request the transcoder could not map "
    "(malformed JSON, a value of the wrong type, an unknown field or query parameter).",
    "401": "UNAUTHENTICATED: no, malformed, expired or forged token; wrong credentials.",
    "403": "PERMISSION_DENIED: a valid token that is not allowed to do this.",
    "404": "NOT_FOUND: the account or transfer does not exist; or an unknown path.",
    "409": "ALREADY_EXISTS: the request_id was used for a different request.",
    "503": "UNAVAILABLE: the database is unreachable or too contended, or no healthy "
    "instance answers; safe to retry with the same request_id.",
    # What the edge itself answers (mesh/edge_policy.py: quotas and limits).
    "408": "DEADLINE_EXCEEDED: the request did not arrive within the edge's request "
    "timeout (headers and body).",
    "413": "INVALID_ARGUMENT: the request body is larger than the edge accepts.",
    "429": "RESOURCE_EXHAUSTED: over the caller's quota (per token subject; Login and "
    "IssueClientToken also per client address); retry after Retry-After seconds.",
    "431": "INVALID_ARGUMENT: the request headers are larger than the edge accepts.",
    "504": "DEADLINE_EXCEEDED: the service did not answer within the edge's route timeout; "
    "the outcome is unknown, so retry with the same request_id.",
}
# Responses that carry headers a client must read.
ERROR_HEADERS: dict[str, Schema] = {
    "429": {
        "Retry-After": {
            "description": "Seconds until the quota admits this caller again.",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
}
# Envoy itself answers these in text/plain: the transcoder's 400 for a request it cannot
# map, 404 for a path of no RPC, 503 when no upstream is healthy and 504 when the
# upstream did not answer in time.
ENVOY_TEXT_ERRORS = frozenset({"400", "404", "503", "504"})
_INT64 = {
    FieldType.TYPE_INT64,
    FieldType.TYPE_SINT64,
    FieldType.TYPE_SFIXED64,
}
_UINT64 = {FieldType.TYPE_UINT64, FieldType.TYPE_FIXED64}
_INT32 = {FieldType.TYPE_INT32, FieldType.TYPE_SINT32, FieldType.TYPE_SFIXED32}
_UINT32 = {FieldType.TYPE_UINT32, FieldType.TYPE_FIXED32}
_SCALARS: dict[int, Schema] = {
    FieldType.TYPE_STRING: {"type": "string"},
    FieldType.TYPE_BYTES: {"type": "string", "format": "byte"},
    FieldType.TYPE_BOOL: {"type": "boolean"},
    FieldType.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldType.TYPE_FLOAT: {"type": "number", "format": "float"},
    **{t: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"} for t in _INT64},
    **{t: {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"} for t in _UINT64},
    **{t: {"type": "integer", "format": "int32"} for t in _INT32},
    **{
        t: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
        for t in _UINT32
    },
}
# Well-known types have their own JSON forms (not objects).
_WELL_KNOWN: dict[str, Schema] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "A duration in seconds with an `s` suffix, for example `1.5s`.",
    },
}


class DocumentError(ValueError):
    """The descriptors cannot be described (an RPC without a usable http rule...)."""


@dataclass(frozen=True)
class _Message:
    proto: descriptor_pb2.DescriptorProto
    comment: str
    field_comments: dict[str, str]


def _clean(comment: str) -> str:
    lines = [line.strip() for line in comment.strip().splitlines()]
    # Paragraph breaks stay; the line breaks of the proto source do not.
    return re.sub(r"(?<!\n)\n(?!\n)", " ", "\n".join(lines)).strip()


class _Index:
    """Messages, enums and comments of a descriptor set, by fully qualified name."""

    def __init__(self, fds: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, _Message] = {}
        self.enums: dict[str, tuple[descriptor_pb2.EnumDescriptorProto, str]] = {}
        self.files = sorted(fds.file, key=lambda f: f.name)
        for file in self.files:
            comments = {
                tuple(loc.path): _clean(loc.leading_comments)
                for loc in file.source_code_info.location
                if loc.leading_comments
            }
            prefix = f".{file.package}" if file.package else ""
            for i, message in enumerate(file.message_type):
                self._add_message(prefix, message, (4, i), comments)
            for i, enum in enumerate(file.enum_type):
                self.enums[f"{prefix}.{enum.name}"] = (enum, comments.get((5, i), ""))
        self.comments_by_file = {
            f.name: {
                tuple(loc.path): _clean(loc.leading_comments)
                for loc in f.source_code_info.location
                if loc.leading_comments
            }
            for f in self.files
        }

    def _add_message(
        self,
        prefix: str,
        message: descriptor_pb2.DescriptorProto,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = _Message(
            message,
            comments.get(path, ""),
            {f.name: comments.get((*path, 2, k), "") for k, f in enumerate(message.field)},
        )
        for j, nested in enumerate(message.nested_type):
            self._add_message(name, nested, (*path, 3, j), comments)
        for j, enum in enumerate(message.enum_type):
            self.enums[f"{name}.{enum.name}"] = (enum, comments.get((*path, 4, j), ""))


def _json_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    """The field's JSON name: protoc/buf fill json_name; else protoc's lowerCamelCase rule."""
    if field.HasField("json_name"):
        return field.json_name
    head, *rest = field.name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _component(full_name: str) -> str:
    return full_name.lstrip(".")


def _ref(full_name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{_component(full_name)}"}


def _described(schema: Schema, description: str) -> Schema:
    if not description:
        return schema
    if "$ref" in schema:  # OpenAPI 3.0 ignores siblings of $ref
        return {"allOf": [schema], "description": description}
    return {**schema, "description": description}


class _Builder:
    def __init__(self, index: _Index) -> None:
        self.index = index
        self.schemas: dict[str, Schema] = {}
        self.response_types: set[str] = set()

    # -- schemas ---------------------------------------------------------------------

    def _map_entry(self, field: descriptor_pb2.FieldDescriptorProto) -> _Message | None:
        entry = self.index.messages.get(field.type_name)
        if entry is not None and entry.proto.options.map_entry:
            return entry
        return None

    def _value_schema(self, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        if field.type == FieldType.TYPE_ENUM:
            self._enum(field.type_name)
            return _ref(field.type_name)
        if field.type == FieldType.TYPE_MESSAGE:
            if field.type_name in _WELL_KNOWN:
                return dict(_WELL_KNOWN[field.type_name])
            if field.type_name not in self.index.messages:
                raise DocumentError(f"{field.name}: unknown message type {field.type_name}")
            self.message(field.type_name)
            return _ref(field.type_name)
        if field.type not in _SCALARS:
            raise DocumentError(f"{field.name}: unsupported field type {field.type}")
        return dict(_SCALARS[field.type])

    def field_schema(self, field: descriptor_pb2.FieldDescriptorProto, comment: str) -> Schema:
        entry = self._map_entry(field) if field.type == FieldType.TYPE_MESSAGE else None
        if entry is not None:
            # A map is a JSON object: keys are strings, values the value field's form.
            value = next(f for f in entry.proto.field if f.name == "value")
            return _described(
                {"type": "object", "additionalProperties": self._value_schema(value)}, comment
            )
        schema = self._value_schema(field)
        if field.label == FieldType.LABEL_REPEATED:
            schema = {"type": "array", "items": schema}
        return _described(schema, comment)

    def _enum(self, full_name: str) -> None:
        name = _component(full_name)
        if name in self.schemas:
            return
        enum, comment = self.index.enums[full_name]
        self.schemas[name] = _described(
            {"type": "string", "enum": [v.name for v in enum.value]}, comment
        )

    def message(self, full_name: str, without: Iterable[str] = (), as_name: str = "") -> str:
        """Add the schema of a message (minus some fields) and return its component name."""
        name = as_name or _component(full_name)
        if name in self.schemas:
            return name
        if full_name == ".google.protobuf.Any":
            self.schemas[name] = {
                "type": "object",
                "required": ["@type"],
                "properties": {"@type": {"type": "string"}},
                "additionalProperties": True,
            }
            return name
        message = self.index.messages[full_name]
        skip = set(without)
        self.schemas[name] = {}  # reserve the name: messages may refer to themselves
        fields = [f for f in message.proto.field if f.name not in skip]
        schema: Schema = {
            "type": "object",
            "properties": {
                _json_name(f): self.field_schema(f, message.field_comments[f.name]) for f in fields
            },
            "additionalProperties": False,
        }
        if full_name in self.response_types:
            # The edge prints scalars, enums and repeated fields even when they hold
            # their default value; unset message fields are left out.
            required = [
                _json_name(f)
                for f in fields
                if f.type != FieldType.TYPE_MESSAGE or f.label == FieldType.LABEL_REPEATED
            ]
            if required:
                schema["required"] = required
        self.schemas[name] = _described(schema, message.comment)
        return name

    def reachable(self, full_name: str, seen: set[str] | None = None) -> set[str]:
        seen = set() if seen is None else seen
        if full_name in seen or full_name in _WELL_KNOWN or full_name not in self.index.messages:
            return seen
        seen.add(full_name)
        for f in self.index.messages[full_name].proto.field:
            if f.type == FieldType.TYPE_MESSAGE:
                self.reachable(f.type_name, seen)
        return seen

    # -- errors ----------------------------------------------------------------------

    def status_schema(self) -> Schema:
        details = []
        for detail in ERROR_DETAILS:
            name = self.message(f".{detail}")
            details.append(
                {
                    "allOf": [
                        {
                            "type": "object",
                            "required": ["@type"],
                            "properties": {
                                "@type": {
                                    "type": "string",
                                    "enum": [f"type.googleapis.com/{detail}"],
                                }
                            },
                        },
                        # The detail's own fields next to "@type" (the JSON form of Any).
                        {"$ref": f"#/components/schemas/{name}"},
                    ]
                }
            )
        # The detail schemas forbid unknown properties, which would reject "@type":
        # relax them, since they appear only inside an Any here.
        for detail in ERROR_DETAILS:
            self.schemas[detail]["additionalProperties"] = True
        status = self.index.messages[".google.rpc.Status"]
        return {
            "type": "object",
            "description": status.comment,
            "properties": {
                "code": {"type": "integer", "format": "int32", "description": "The gRPC code."},
                "message": {"type": "string", "description": "A message for a developer."},
                "details": {
                    "type": "array",
                    "description": "Typed details: an ErrorInfo (domain meshbank.dev, a "
                    "stable reason) and, by code, a BadRequest, ResourceInfo, "
                    "PreconditionFailure or RetryInfo.",
                    "items": {"oneOf": details},
                },
            },
        }


def _template_fields(template: str) -> list[str]:
    fields = re.findall(r"\{([^}=]+)(?:=[^}]*)?\}", template)
    if any("." in f for f in fields):
        raise DocumentError(f"{template}: nested path fields are not supported")
    return fields


def _query_parameter(
    builder: _Builder, field: descriptor_pb2.FieldDescriptorProto, comment: str
) -> Schema:
    if field.type == FieldType.TYPE_MESSAGE and field.type_name not in _WELL_KNOWN:
        raise DocumentError(f"{field.name}: a message field cannot be a query parameter")
    parameter: Schema = {
        "name": _json_name(field),
        "in": "query",
        "required": False,
        "schema": builder.field_schema(field, ""),
    }
    if comment:
        parameter["description"] = comment
    if field.label == FieldType.LABEL_REPEATED:
        parameter["explode"] = True
    return parameter


def _operation(
    builder: _Builder,
    service: descriptor_pb2.ServiceDescriptorProto,
    package: str,
    method: descriptor_pb2.MethodDescriptorProto,
    comment: str,
    template: str,
    body: str,
) -> Schema:
    request = builder.index.messages[method.input_type]
    path_fields = _template_fields(template)
    by_name = {f.name: f for f in request.proto.field}
    unknown = [f for f in path_fields if f not in by_name]
    if unknown:
        raise DocumentError(f"{method.name}: path fields {unknown} are not request fields")
    parameters = [
        {
            "name": f,
            "in": "path",
            "required": True,
            "schema": builder.field_schema(by_name[f], ""),
            **({"description": c} if (c := request.field_comments[f]) else {}),
        }
        for f in path_fields
    ]
    operation: Schema = {
        "operationId": f"{service.name}_{method.name}",
        "tags": [service.name],
        "summary": comment.split(". ")[0].rstrip(".") if comment else method.name,
        "description": f"{comment}\n\ngRPC: `{package}.{service.name}/{method.name}`.".strip(),
    }
    if body == "*":
        component = builder.message(
            method.input_type,
            without=path_fields,
            as_name=f"{_component(method.input_type)}.Body" if path_fields else "",
        )
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}
            },
        }
    elif body:
        raise DocumentError(f"{method.name}: only body '*' or no body is supported")
    else:
        parameters += [
            _query_parameter(builder, f, request.field_comments[f.name])
            for f in request.proto.field
            if f.name not in path_fields
        ]
    if parameters:
        operation["parameters"] = parameters
    builder.message(method.output_type)
    operation["responses"] = {
        "200": {
            "description": "OK",
            "content": {"application/json": {"schema": _ref(method.output_type)}},
        },
        **{
            code: {"$ref": f"#/components/responses/Error{code}"}
            for code in sorted(ERROR_RESPONSES)
        },
    }
    return operation


def _http_rule(method: descriptor_pb2.MethodDescriptorProto) -> tuple[str, str, str]:
    rule = method.options.Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    if verb is None or verb == "custom":
        raise DocumentError(f"{method.name}: needs a google.api.http get/post/... rule")
    if rule.additional_bindings:
        raise DocumentError(f"{method.name}: additional_bindings are not supported")
    return verb, str(getattr(rule, verb)), rule.body


def build(fds: descriptor_pb2.FileDescriptorSet, *, title: str = "meshbank") -> Schema:
    """The OpenAPI 3.0 document for every meshbank service in the descriptor set."""
    index = _Index(fds)
    builder = _Builder(index)
    ours = [f for f in index.files if f.package.startswith(OUR_PACKAGE_PREFIX)]
    if not ours:
        raise DocumentError("the descriptor set holds no meshbank.* file")
    requests: set[str] = set()
    for file in ours:
        for service in file.service:
            for method in service.method:
                builder.response_types |= builder.reachable(method.output_type)
                requests |= builder.reachable(method.input_type)
    both = builder.response_types & requests
    if both:
        raise DocumentError(f"messages used in both requests and responses: {sorted(both)}")

    paths: dict[str, dict[str, Schema]] = {}
    tags = []
    for file in ours:
        comments = index.comments_by_file[file.name]
        for s, service in enumerate(file.service):
            tags.append({"name": service.name, "description": comments.get((6, s), "")})
            needs_token = f"{file.package}.{service.name}" not in TOKENLESS_SERVICES
            for m, method in enumerate(service.method):
                verb, template, body = _http_rule(method)
                op = _operation(
                    builder,
                    service,
                    file.package,
                    method,
                    comments.get((6, s, 2, m), ""),
                    template,
                    body,
                )
                op["security"] = [{"bearerAuth": []}] if needs_token else []
                path_ops = paths.setdefault(template, {})
                if verb in path_ops:
                    raise DocumentError(f"{verb.upper()} {template} is mapped twice")
                path_ops[verb] = op
    status = builder.status_schema()
    builder.schemas["google.rpc.Status"] = status
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": "v1",
            "description": (
                "The REST/JSON form of meshbank's gRPC API, served by every edge "
                "(gRPC-JSON transcoding of the protos' google.api.http annotations). "
                "Generated from the protos by mesh/openapi.py: do not edit. int64 values "
                "(amounts, balances) are JSON strings; enums are their value names. Every "
                "error is a google.rpc.Status with an ErrorInfo (domain meshbank.dev) "
                "among its details."
            ),
        },
        "servers": [{"url": "/", "description": "an edge or the global entry"}],
        "tags": tags,
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(builder.schemas.items())),
            "responses": {
                f"Error{code}": {
                    "description": text,
                    **({"headers": ERROR_HEADERS[code]} if code in ERROR_HEADERS else {}),
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/google.rpc.Status"}
                        },
                        **(
                            {"text/plain": {"schema": {"type": "string"}}}
                            if code in ENVOY_TEXT_ERRORS
                            else {}
                        ),
                    },
                }
                for code, text in sorted(ERROR_RESPONSES.items())
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An access token from POST /v1/auth:login (users) or "
                    "POST /v1/auth:token (partners).",
                }
            },
        },
    }


def dump(document: Schema) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def load_descriptor_set(path: Path) -> descriptor_pb2.FileDescriptorSet:
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(path.read_bytes())
    return fds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("descriptor", type=Path, help="FileDescriptorSet with source info")
    parser.add_argument("out", type=Path, help="where to write the YAML document")
    args = parser.parse_args(argv)
    try:
        document = build(load_descriptor_set(args.descriptor))
    except DocumentError as err:
        print(f"openapi: {err}", file=sys.stderr)
        return 1
    args.out.write_text(dump(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
