"""Every Envoy config embedded in the Kubernetes manifests passes `envoy --mode validate`.

The configs are taken from the rendered ConfigMaps (what a cluster would mount). They
name files under the pods' mount points; validation loads those files, so the mount
prefixes are pointed at throwaway certificates and the real descriptor set in a
temporary directory, and nothing else in the configs is changed.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from mesh import envoy, pki, public_tls
from regions import k8s, local, topology
from services import cli


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("k8s-envoy")
    t = topology.load()
    assert cli.main(["render", "k8s", "--out", str(base / "manifests")]) == 0

    ca = pki.LocalCA(base / "tls")
    for identity in envoy.identities(t):
        ca.issue(identity)
    # What a cert-manager Certificate for the edges' partner-facing names would hold.
    public = ca.issue_server("edge", public_tls.names(t, t.region_names[0]))
    (base / "public-tls").mkdir()
    shutil.copy(public.cert, base / "public-tls" / "tls.crt")
    shutil.copy(public.key, base / "public-tls" / "tls.key")
    shutil.copy(ca.ca_cert_path, base / "public-tls" / "ca.crt")
    (base / "db").mkdir()
    # Any CA certificate will do for the database health checks' trust anchor.
    shutil.copy(ca.ca_cert_path, base / "db" / "ca.crt")
    (base / "api").mkdir()
    shutil.copy(local.descriptor_path(), base / "api" / k8s.DESCRIPTOR_NAME)
    shutil.copy(
        local.descriptor_path().with_name(k8s.OPENAPI_NAME), base / "api" / k8s.OPENAPI_NAME
    )
    mounts = {
        f"{k8s.TLS_DIR}/": f"{base / 'tls'}/",
        f"{k8s.PUBLIC_TLS_DIR}/": f"{base / 'public-tls'}/",
        f"{k8s.DB_CERTS_DIR}/": f"{base / 'db'}/",
        f"{k8s.API_DIR}/": f"{base / 'api'}/",
    }

    found: dict[str, Path] = {}
    for manifest_file in sorted((base / "manifests").glob("*/*.yaml")):
        for m in yaml.safe_load_all(manifest_file.read_text()):
            if m["kind"] != "ConfigMap" or "envoy.yaml" not in m.get("data", {}):
                continue
            text = m["data"]["envoy.yaml"]
            for mount, there in mounts.items():
                text = text.replace(mount, there)
            name = f"{manifest_file.parent.name}-{m['metadata']['name']}"
            path = base / "configs" / f"{name}.yaml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            found[name] = path
    return found


def _validate(path: Path) -> str | None:
    out = subprocess.run(
        [local.envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = out.stdout + out.stderr
    if out.returncode != 0:
        return output[-2000:]
    # A deprecated field works today and breaks on a later Envoy: refuse it now.
    if "Deprecated field" in output:
        return "uses a deprecated field:\n" + output[-2000:]
    return None


def test_every_embedded_envoy_config_validates(configs: dict[str, Path]) -> None:
    t = topology.load()
    # Per region: one sidecar config per service and the edge's.
    assert len(configs) == len(t.region_names) * (len(t.services) + 1)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(configs, pool.map(_validate, configs.values()), strict=True))
    assert {name: why for name, why in results.items() if why} == {}


def test_validation_rejects_a_broken_embedded_config(
    configs: dict[str, Path], tmp_path: Path
) -> None:
    """The check can fail: a missing certificate file is refused by validate mode."""
    name = next(n for n in configs if n.endswith("-edge-envoy"))
    broken = tmp_path / "broken.yaml"
    broken.write_text(configs[name].read_text().replace(".crt", ".missing.crt", 1))
    assert _validate(broken) is not None
