"""What the mesh needs to know about the API, read from the generated descriptors.

Retry safety comes from the protos themselves (``option idempotency_level``): reads
are NO_SIDE_EFFECTS, writes that carry a request_id are IDEMPOTENT, anything else is
unsafe to re-send. No hand-kept list of methods exists anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from meshbank.account.v1 import account_pb2
from meshbank.auth.v1 import auth_pb2
from meshbank.transfer.v1 import transfer_pb2

FILES: dict[str, FileDescriptor] = {
    "auth": auth_pb2.DESCRIPTOR,
    "account": account_pb2.DESCRIPTOR,
    "transfer": transfer_pb2.DESCRIPTOR,
}


class Safety(StrEnum):
    READ = "read"  # NO_SIDE_EFFECTS
    IDEMPOTENT = "idempotent"  # IDEMPOTENT: carries a request_id
    UNSAFE = "unsafe"  # IDEMPOTENCY_UNKNOWN: must not be re-sent once it reached a server


@dataclass(frozen=True)
class Method:
    service: str  # topology name: auth, account, transfer
    full_service: str  # meshbank.transfer.v1.TransferService
    name: str  # CreateTransfer
    safety: Safety
    http_verb: str  # POST
    http_template: str  # /v1/accounts/{account_id}:close

    @property
    def path(self) -> str:
        return f"/{self.full_service}/{self.name}"

    @property
    def http_regex(self) -> str:
        """A regex for this method's REST path (Envoy matches it without the query string)."""
        parts = re.split(r"(\{[^}]+\})", self.http_template)
        body = "".join("[^/:?]+" if p.startswith("{") else re.escape(p) for p in parts)
        return f"^{body}$"


def _http_rule(method_options: descriptor_pb2.MethodOptions) -> tuple[str, str]:
    rule = method_options.Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    if verb is None or verb == "custom":
        raise ValueError("every RPC needs a google.api.http get/put/post/delete/patch rule")
    return verb.upper(), str(getattr(rule, verb))


def full_service_name(service: str) -> str:
    (svc,) = FILES[service].services_by_name.values()
    return str(svc.full_name)


def methods() -> list[Method]:
    result = []
    for service, file in FILES.items():
        for svc in file.services_by_name.values():
            for m in svc.methods:
                level = m.GetOptions().idempotency_level
                safety = {
                    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS: Safety.READ,
                    descriptor_pb2.MethodOptions.IDEMPOTENT: Safety.IDEMPOTENT,
                }.get(level, Safety.UNSAFE)
                verb, template = _http_rule(m.GetOptions())
                result.append(Method(service, svc.full_name, m.name, safety, verb, template))
    return result


def safety_by_path() -> dict[str, Safety]:
    return {m.path: m.safety for m in methods()}
