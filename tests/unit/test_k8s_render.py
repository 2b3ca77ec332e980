"""`meshbank render k8s` on the default topology: schema-valid manifests and their invariants.

The manifests are rendered once through the CLI into a temporary directory and read
back from the files, so these tests check what an operator would apply.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh import api, k8s_envoy, lint
from mesh.k8s_envoy import POD
from regions import k8s, topology
from regions.k8s_settings import image_problem
from services import cli
from services.common import telemetry

Manifest = dict[str, Any]
DEFAULT: dict[str, Any] = yaml.safe_load(topology.DEFAULT_TOPOLOGY.read_text())
SECRET_NAME = re.compile(r"PASSWORD|PASSPHRASE|SECRET|TOKEN|PRIVATE|_KEY$", re.IGNORECASE)


@pytest.fixture(scope="module")
def topo() -> topology.Topology:
    return topology.load()


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k8s")
    assert cli.main(["render", "k8s", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def files(out: Path) -> dict[str, dict[str, list[Manifest]]]:
    """``files[region][file name]``: the objects of each written file."""
    loaded: dict[str, dict[str, list[Manifest]]] = {}
    for path in sorted(out.glob("*/*.yaml")):
        loaded.setdefault(path.parent.name, {})[path.name] = list(
            yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader)
        )
    return loaded


def objects(files: dict[str, dict[str, list[Manifest]]]) -> Iterator[tuple[str, Manifest]]:
    for region, by_file in files.items():
        for manifests in by_file.values():
            for m in manifests:
                yield region, m


def of_kind(files: dict[str, dict[str, list[Manifest]]], kind: str) -> list[tuple[str, Manifest]]:
    return [(r, m) for r, m in objects(files) if m["kind"] == kind]


def workloads(files: dict[str, dict[str, list[Manifest]]]) -> list[tuple[str, Manifest]]:
    return [(r, m) for r, m in objects(files) if m["kind"] in ("Deployment", "StatefulSet")]


def pod_specs(files: dict[str, dict[str, list[Manifest]]]) -> list[tuple[str, str, Manifest]]:
    specs = []
    for region, m in objects(files):
        if m["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs.append((region, m["metadata"]["name"], m["spec"]["template"]["spec"]))
    return specs


def containers(pod: Manifest) -> list[Manifest]:
    return [*pod.get("initContainers", []), *pod["containers"]]


_PARSED: dict[str, Any] = {}


def envoy_config(files: dict[str, dict[str, list[Manifest]]], region: str, name: str) -> Any:
    """The parsed Envoy config of a ConfigMap (parsed once; callers must not modify it)."""
    (cm,) = [
        m for r, m in of_kind(files, "ConfigMap") if r == region and m["metadata"]["name"] == name
    ]
    text = cm["data"]["envoy.yaml"]
    if text not in _PARSED:
        _PARSED[text] = yaml.load(text, Loader=yaml.CSafeLoader)
    return _PARSED[text]


def test_three_regions_each_with_every_workload(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    assert sorted(files) == sorted(topo.region_names)
    for region in topo.region_names:
        names = {(m["kind"], m["metadata"]["name"]) for r, m in objects(files) if r == region}
        for service in topo.services:
            for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
                assert (kind, service) in names, (region, kind, service)
            assert ("ConfigMap", f"{service}-sidecar") in names
        assert {("Deployment", "edge"), ("StatefulSet", "cockroachdb")} <= names
        assert ("Namespace", f"meshbank-{region}") in names
        namespaces = {m["metadata"].get("namespace") for r, m in objects(files) if r == region}
        assert namespaces == {None, f"meshbank-{region}"}
    jobs = of_kind(files, "Job")
    assert [r for r, _ in jobs] == [k8s.primary_region(topo)]


def test_every_manifest_passes_kubernetes_validate(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    assert topo.kubernetes is not None
    version = topo.kubernetes.version
    failures = {}
    checked = 0
    for region, m in objects(files):
        try:
            kubernetes_validate.validate(m, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.caught.absolute_path)
            failures[f"{region} {m['kind']}/{m['metadata']['name']} {where}"] = exc.caught.message
        checked += 1
    assert failures == {}
    assert checked > 100


def test_schema_validation_catches_a_broken_manifest(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    """The check above can fail: a typo'd field and a wrong type are both refused."""
    assert topo.kubernetes is not None
    _, deployment = of_kind(files, "Deployment")[0]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(typo, topo.kubernetes.version, strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "3"
    with pytest.raises(kubernetes_validate.ValidationError, match="'3' is not of type"):
        kubernetes_validate.validate(wrong, topo.kubernetes.version, strict=True)


def test_replicas_budgets_and_autoscalers(files: dict[str, dict[str, list[Manifest]]]) -> None:
    pdbs = {(r, m["metadata"]["name"]): m for r, m in of_kind(files, "PodDisruptionBudget")}
    hpas = {(r, m["metadata"]["name"]): m for r, m in of_kind(files, "HorizontalPodAutoscaler")}
    for region, w in workloads(files):
        name = w["metadata"]["name"]
        assert w["spec"]["replicas"] >= 3, (region, name)
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        pdb = pdbs[(region, name)]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert pdb["spec"]["maxUnavailable"] == 1
        if w["kind"] == "Deployment":
            # A rollout never drops below the desired count.
            assert w["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for (region, name), hpa in hpas.items():
        deployment = next(
            m
            for r, m in of_kind(files, "Deployment")
            if r == region and m["metadata"]["name"] == name
        )
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] >= 3
        assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    assert {n for _, n in hpas} == set(topology.SERVICE_NAMES)


def test_pods_spread_over_the_regions_zones(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    for region, w in workloads(files):
        pod = w["spec"]["template"]["spec"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        by_key = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
        zone = by_key["topology.kubernetes.io/zone"]
        assert zone["whenUnsatisfiable"] == "DoNotSchedule"
        assert zone["maxSkew"] == 1
        assert zone["labelSelector"]["matchLabels"].items() <= labels.items()
        assert "kubernetes.io/hostname" in by_key
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        (expr,) = term["matchExpressions"]
        assert expr["values"] == list(topo.region(region).zones)


def test_probes_resources_and_the_health_port(files: dict[str, dict[str, list[Manifest]]]) -> None:
    for region, name, pod in pod_specs(files):
        for c in containers(pod):
            resources = c["resources"]
            assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
            if name.startswith("meshbank-migrate"):
                continue
            assert "readinessProbe" in c, (region, name, c["name"])
            assert "livenessProbe" in c, (region, name, c["name"])
    for region, deployment in of_kind(files, "Deployment"):
        name = deployment["metadata"]["name"]
        if name == "edge":
            continue
        pod = deployment["spec"]["template"]["spec"]
        (service,) = pod["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert service[probe]["grpc"] == {
                "port": POD.health,
                "service": api.full_service_name(name),
            }
        # The probe port is the sidecar's health listener, which passes exactly the
        # gRPC health check to the service and nothing else.
        config = envoy_config(files, region, f"{name}-sidecar")
        (health,) = [
            listener
            for listener in config["static_resources"]["listeners"]
            if listener["address"]["socket_address"]["port_value"] == POD.health
        ]
        hcm = health["filter_chains"][0]["filters"][0]["typed_config"]
        (vhost,) = hcm["route_config"]["virtual_hosts"]
        to_service = [r for r in vhost["routes"] if r.get("route", {}).get("cluster")]
        assert to_service == [
            {
                "match": {"path": "/grpc.health.v1.Health/Check"},
                "route": {"cluster": "local_service", "timeout": "2s"},
            }
        ]
        assert vhost["routes"][-1]["direct_response"]["status"] == 404
        (sidecar,) = pod["initContainers"]
        assert sidecar["restartPolicy"] == "Always"  # a native sidecar
        assert sidecar["readinessProbe"]["httpGet"]["port"] == POD.health


def test_every_container_is_non_root_and_read_only(
    files: dict[str, dict[str, list[Manifest]]],
) -> None:
    for region, name, pod in pod_specs(files):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, (region, name, c["name"])
            assert sc["runAsUser"] > 0
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
    for _, ns in of_kind(files, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_images_are_pinned(files: dict[str, dict[str, list[Manifest]]]) -> None:
    images = {c["image"] for _, _, pod in pod_specs(files) for c in containers(pod)}
    assert len(images) == 3
    assert {i: image_problem(i) for i in images if image_problem(i)} == {}
    assert not any(i.endswith(":latest") or ":" not in i.rsplit("/", 1)[-1] for i in images)


@pytest.mark.parametrize(
    ("reference", "pinned"),
    [
        ("ghcr.io/meshbank/meshbank:0.1.0", True),
        ("docker.io/envoyproxy/envoy:distroless-v1.40.0", True),
        ("registry:5000/team/app@sha256:" + "a" * 64, True),
        ("ghcr.io/meshbank/meshbank:latest", False),
        ("ghcr.io/meshbank/meshbank", False),
        ("ghcr.io/meshbank/meshbank:1.2", False),
        ("ghcr.io/meshbank/meshbank:main", False),
        ("Not An Image", False),
    ],
)
def test_image_pinning_rule(reference: str, pinned: bool) -> None:
    assert (image_problem(reference) is None) is pinned


def test_secrets_are_referenced_never_written(
    topo: topology.Topology, out: Path, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    assert of_kind(files, "Secret") == []
    text = "\n".join(p.read_text() for p in out.glob("*/*.yaml"))
    assert "-----BEGIN" not in text
    assert not re.search(r"://[^/@\s]*:[^/@\s]*@", text), "a password in a URL"
    referenced: dict[str, set[str]] = {}
    for region, _, pod in pod_specs(files):
        ns = f"meshbank-{region}"
        for c in containers(pod):
            for var in c.get("env", []):
                if SECRET_NAME.search(var["name"]):
                    assert "value" not in var, var
                    referenced.setdefault(ns, set()).add(var["valueFrom"]["secretKeyRef"]["name"])
                assert "password" not in var.get("value", "").lower()
        for volume in pod["volumes"]:
            if "secret" in volume:
                referenced.setdefault(ns, set()).add(volume["secret"]["secretName"])
    assert {ns: sorted(s) for ns, s in referenced.items()} == k8s.required_secrets(topo)


def test_services_export_their_spans_sampled_like_the_proxies(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    assert topo.kubernetes is not None
    for _, deployment in of_kind(files, "Deployment"):
        if deployment["metadata"]["name"] == "edge":
            continue
        (service,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {v["name"]: v.get("value") for v in service["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{topo.kubernetes.trace_collector}"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert float(env["OTEL_TRACES_SAMPLER_ARG"]) == topo.trace_sample_percent / 100
        telemetry.load_config(env)  # what the service validates at start


def test_service_is_reachable_only_through_its_sidecar(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    assert topo.kubernetes is not None
    for region, deployment in of_kind(files, "Deployment"):
        name = deployment["metadata"]["name"]
        if name == "edge":
            continue
        (service,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {v["name"]: v.get("value") for v in service["env"]}
        assert env["MESHBANK_LISTEN_ADDRESS"] == f"127.0.0.1:{POD.service}"
        assert "ports" not in service
        config = envoy_config(files, region, f"{name}-sidecar")
        listeners = {
            listener["name"]: listener["address"]["socket_address"]
            for listener in config["static_resources"]["listeners"]
        }
        assert listeners["inbound"] == {"address": k8s_envoy.ANY, "port_value": POD.inbound}
        assert all(
            a["address"] == "127.0.0.1"
            for n, a in listeners.items()
            if n not in ("inbound", "health")
        )
        inbound = next(
            listener
            for listener in config["static_resources"]["listeners"]
            if listener["name"] == "inbound"
        )
        tls = inbound["filter_chains"][0]["transport_socket"]["typed_config"]
        assert tls["require_client_certificate"] is True
        assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"

    policies = {(r, m["metadata"]["name"]): m["spec"] for r, m in of_kind(files, "NetworkPolicy")}
    for region in topo.region_names:
        deny = policies[(region, "default-deny-ingress")]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}
        spec = policies[(region, "services-only-from-edges")]
        (rule,) = spec["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": POD.inbound}]
        sources = rule["from"]
        selectors = [s["podSelector"] for s in sources if "podSelector" in s]
        assert selectors == [
            {
                "matchExpressions": [
                    {"key": "app.kubernetes.io/component", "operator": "In", "values": ["edge"]}
                ]
            }
        ]
        cidrs = {s["ipBlock"]["cidr"] for s in sources if "ipBlock" in s}
        assert cidrs == {topo.kubernetes.pod_cidrs[r] for r in topo.region_names if r != region}
        assert all(ipaddress.ip_network(c) for c in cidrs)
        # The selector picks exactly the service pods.
        service_labels = {
            m["metadata"]["name"]: m["spec"]["template"]["metadata"]["labels"]
            for r, m in of_kind(files, "Deployment")
            if r == region
        }
        picked = {
            n
            for n, labels in service_labels.items()
            if labels["app.kubernetes.io/component"]
            in spec["podSelector"]["matchExpressions"][0]["values"]
        }
        assert picked == set(topo.services)


def test_edges_fail_over_in_topology_order_by_service_dns(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    for region in topo.region_names:
        config = envoy_config(files, region, "edge-envoy")
        assert lint.lint(config) == []
        (listener,) = config["static_resources"]["listeners"]
        assert listener["address"]["socket_address"] == {
            "address": k8s_envoy.ANY,
            "port_value": POD.edge,
        }
        clusters = config["static_resources"]["clusters"]
        for cluster in (c for c in clusters if c["name"] in topo.services):
            service = cluster["name"]
            assert cluster["type"] == "STRICT_DNS"
            order = [
                (loc["priority"], loc["locality"]["region"], len(loc["lb_endpoints"]))
                for loc in cluster["load_assignment"]["endpoints"]
            ]
            assert order == [(p, r, 1) for p, r in enumerate(topo.region(region).preference)]
            hosts = [
                loc["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                for loc in cluster["load_assignment"]["endpoints"]
            ]
            assert hosts == [
                {
                    "address": f"{service}.meshbank-{r}.svc.cluster.local",
                    "port_value": POD.inbound,
                }
                for r in topo.region(region).preference
            ]
            assert cluster["transport_socket"]["name"] == "envoy.transport_sockets.tls"


def test_sidecar_database_clusters_reach_every_regions_nodes(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    for region in topo.region_names:
        for service in topo.services:
            config = envoy_config(files, region, f"{service}-sidecar")
            assert lint.lint(config) == []
            for cluster in config["static_resources"]["clusters"]:
                if not cluster["name"].startswith("database_"):
                    continue
                endpoints = [
                    (
                        loc["priority"],
                        loc["lb_endpoints"][0]["endpoint"]["address"]["socket_address"],
                        loc["lb_endpoints"][0]["endpoint"]["health_check_config"]["port_value"],
                    )
                    for loc in cluster["load_assignment"]["endpoints"]
                ]
                assert endpoints == [
                    (
                        p,
                        {
                            "address": f"cockroachdb.meshbank-{r}.svc.cluster.local",
                            "port_value": POD.cockroach_sql,
                        },
                        POD.cockroach_http,
                    )
                    for p, r in enumerate(topo.region(region).preference)
                ]
                (check,) = cluster["health_checks"]
                assert check["http_health_check"]["path"] == "/health?ready=1"
                assert check["transport_socket_match_criteria"] == {"health": "tls"}


def test_no_envoy_config_keeps_an_address_of_the_local_port_plan(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    local_ports = set(topo.all_ports())

    def ports(node: Any) -> Iterator[int]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "port_value":
                    yield value
                else:
                    yield from ports(value)
        elif isinstance(node, list):
            for item in node:
                yield from ports(item)

    for region, cm in of_kind(files, "ConfigMap"):
        if "envoy.yaml" in cm.get("data", {}):
            used = set(ports(envoy_config(files, region, cm["metadata"]["name"])))
            assert used, cm["metadata"]["name"]
            assert not used & local_ports, (region, cm["metadata"]["name"])


def test_addressing_refuses_a_port_it_cannot_place(topo: topology.Topology) -> None:
    assert topo.kubernetes is not None
    addressing = k8s_envoy.Addressing.for_topology(topo, topo.kubernetes)
    config = {
        "static_resources": {
            "listeners": [
                {"name": "new", "address": {"socket_address": {"address": "x", "port_value": 1}}}
            ],
            "clusters": [],
        }
    }
    with pytest.raises(k8s_envoy.AddressingError, match="listener new: port 1"):
        addressing.apply(config)


def test_cockroachdb_joins_every_region_and_migrations_cover_them(
    topo: topology.Topology, files: dict[str, dict[str, list[Manifest]]]
) -> None:
    assert topo.kubernetes is not None
    localities = set()
    for _, sts in of_kind(files, "StatefulSet"):
        (node,) = sts["spec"]["template"]["spec"]["containers"]
        args = dict(a.removeprefix("--").split("=", 1) for a in node["args"] if "=" in a)
        localities.add(args["locality"])
        joined = args["join"].split(",")
        assert len(joined) == 3 * topo.kubernetes.cockroach_nodes
        for other in topo.region_names:
            assert f"cockroachdb-0.cockroachdb.meshbank-{other}.svc.cluster.local:26257" in joined
        assert args["certs-dir"]
        assert "--insecure" not in node["args"]
        assert node["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "datadir"
    assert localities == {f"region={r}" for r in topo.region_names}

    ((_, job),) = of_kind(files, "Job")
    pod = job["spec"]["template"]["spec"]
    (migrate,) = pod["containers"]
    assert migrate["command"] == ["meshbank", "migrate"]
    env = {v["name"]: v.get("value") for v in migrate["env"]}
    assert env["MESHBANK_DATABASE_URL"].startswith("cockroachdb+psycopg://meshbank@")
    assert "sslmode=verify-full" in env["MESHBANK_DATABASE_URL"]
    # The migration reads the regions of its ADD REGION statements from the topology
    # ConfigMap it mounts: the same regions the nodes were started with.
    (cm,) = [
        m
        for r, m in of_kind(files, "ConfigMap")
        if r == k8s.primary_region(topo) and m["metadata"]["name"] == "meshbank-topology"
    ]
    mounted = topology.parse(yaml.safe_load(cm["data"]["topology.yaml"]))
    assert mounted.region_names == topo.region_names
    assert env["MESHBANK_TOPOLOGY"].startswith(
        next(m["mountPath"] for m in migrate["volumeMounts"] if m["name"] == "topology")
    )
    from regions import migrate as migrations

    ddl = migrations.offline_sql("cockroachdb")
    assert f'SET PRIMARY REGION "{mounted.region_names[0]}"' in ddl
    for other in mounted.region_names[1:]:
        assert f'ADD REGION IF NOT EXISTS "{other}"' in ddl


def _topology_with(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(DEFAULT)
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    if value is None:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("kubernetes.replicas.auth", 2, "kubernetes.replicas.auth: must be an integer from 3"),
        ("kubernetes.images.services", "ghcr.io/meshbank/meshbank:latest", "not an exact version"),
        ("kubernetes.images.envoy", "envoyproxy/envoy", "neither a tag nor a digest"),
        ("kubernetes.images.cockroachdb", None, "kubernetes.images.cockroachdb: a pinned image"),
        ("kubernetes.pod_cidrs.us-west", "10.10.128.0/17", "overlaps us-east"),
        ("kubernetes.pod_cidrs.eu-west", "nonsense", "kubernetes.pod_cidrs.eu-west: a CIDR"),
        ("kubernetes.version", "1.26.0", "at least 1.30.0"),
        ("kubernetes.max_replicas.account", 2, "kubernetes.max_replicas.account"),
        ("kubernetes.replicas.ledger", 3, "unknown service 'ledger'"),
        ("kubernetes.namespace", "x", "kubernetes.namespace: unknown key"),
    ],
)
def test_bad_kubernetes_settings_are_refused(path: str, value: Any, message: str) -> None:
    with pytest.raises(topology.TopologyError, match=re.escape(message)):
        topology.parse(_topology_with(path, value))


def test_kubernetes_defaults_are_the_minimums() -> None:
    data = _topology_with("kubernetes.replicas", None)
    data["kubernetes"].pop("max_replicas")
    settings = topology.parse(data).kubernetes
    assert settings is not None
    assert dict(settings.replicas) == {s: 3 for s in topology.SERVICE_NAMES}
    assert dict(settings.max_replicas) == {s: 9 for s in topology.SERVICE_NAMES}
    assert settings.namespace("us-west") == "meshbank-us-west"


def test_render_without_a_kubernetes_section_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "topology.yaml"
    source.write_text(yaml.safe_dump(_topology_with("kubernetes", None)))
    assert (
        cli.main(["render", "k8s", "--out", str(tmp_path / "out"), "--topology", str(source)]) == 2
    )
    assert "no `kubernetes` section" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_render_refuses_an_unpinned_image_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["render", "k8s", "--out", str(tmp_path), "--image", "ghcr.io/meshbank/meshbank:main"]
    assert cli.main(argv) == 2
    assert "--image" in capsys.readouterr().err


def test_every_pod_mounts_config_maps_that_exist_in_its_namespace(
    files: dict[str, dict[str, list[Manifest]]],
) -> None:
    config_maps = {(r, m["metadata"]["name"]) for r, m in of_kind(files, "ConfigMap")}
    for region, name, pod in pod_specs(files):
        volumes = {v["name"]: v for v in pod["volumes"]}
        claims = {
            t["metadata"]["name"]
            for r, m in of_kind(files, "StatefulSet")
            if r == region and m["metadata"]["name"] == name
            for t in m["spec"]["volumeClaimTemplates"]
        }
        for c in containers(pod):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes.keys() | claims, (region, name, mount["name"])
        for volume in volumes.values():
            if "configMap" in volume:
                assert (region, volume["configMap"]["name"]) in config_maps, (region, name)
        envoys = [c for c in containers(pod) if c["name"] == "envoy"]
        if name in ("cockroachdb",) or name.startswith("meshbank-migrate"):
            assert envoys == []
            continue
        # The proxy runs the generated config of its own ConfigMap.
        (proxy,) = envoys
        config_map = volumes["envoy-config"]["configMap"]["name"]
        assert config_map == ("edge-envoy" if name == "edge" else f"{name}-sidecar")
        (mount,) = [m for m in proxy["volumeMounts"] if m["name"] == "envoy-config"]
        assert proxy["args"][:2] == ["-c", f"{mount['mountPath']}/envoy.yaml"]


def test_render_into_a_file_path_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "not-a-directory"
    target.write_text("")
    assert cli.main(["render", "k8s", "--out", str(target)]) == 2
    assert "cannot write" in capsys.readouterr().err
