"""The ``meshbank`` command: run services, bring the local system up and down, manage principals."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from regions import local
from regions.drills import DRILLS
from regions.nemesis import FAULT_KINDS

if TYPE_CHECKING:
    from services.common.config import ServiceConfig

log = logging.getLogger("meshbank")


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("MESHBANK_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _setup_json_logging(service: str, config: ServiceConfig) -> None:
    """Services log JSON lines (services/common/jsonlog.py); operator commands keep text."""
    from services.common import jsonlog

    jsonlog.configure(
        service=service,
        region=config.region,
        instance=config.instance_id,
        level=os.environ.get("MESHBANK_LOG_LEVEL", "INFO"),
    )


def _database_url() -> str:
    """The database of MESHBANK_DATABASE_URL, else that of the local deployment."""
    url = os.environ.get("MESHBANK_DATABASE_URL")
    if url:
        return url
    state = local.state_dir()
    if not (state / "secrets.json").exists():
        raise SystemExit(
            "meshbank: no MESHBANK_DATABASE_URL and no local deployment in "
            f"{state} (run `meshbank up` first)"
        )
    return local.primary_url(state, local.load_topology())


def cmd_serve(args: argparse.Namespace) -> int:
    from services import app
    from services.common import config as config_mod
    from services.common import telemetry
    from services.common.server import serve

    try:
        config = config_mod.load(needs_key_passphrase="auth" in args.services)
        service = "+".join(sorted(args.services))
        _setup_json_logging(service, config)
        tracer_provider = telemetry.setup(
            os.environ,
            service=f"meshbank-{service}",
            region=config.region,
            zone=os.environ.get("MESHBANK_ZONE", ""),
            instance_id=config.instance_id,
        )
    except config_mod.ConfigError as exc:
        print(f"meshbank serve: {exc}", file=sys.stderr)
        return 2
    built = app.build(config, set(args.services))
    metrics_server = built.metrics.serve(config.metrics_address) if config.metrics_address else None
    try:
        serve(
            built.registrations,
            config.listen_address,
            workers=config.grpc_workers,
            grace=config.shutdown_grace_seconds,
            reflect=app.API_SERVICES,
            interceptors=[built.metrics.interceptor()],
        )
    finally:
        if metrics_server is not None:
            metrics_server.stop()
        built.engine.dispose()
        if tracer_provider is not None:
            tracer_provider.shutdown()  # exports the spans still buffered
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    from regions import migrate

    migrate.upgrade(_database_url())
    print("database migrated to", migrate.current(_database_url()))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    state = local.state_dir()
    from mesh import public_tls

    # Refused here with the reason, before anything starts (the supervisor checks again).
    topology = local.load_topology()
    if topology.edge.tls.own_certificate:
        try:
            public_tls.check_own(topology)
        except public_tls.PublicTlsError as exc:
            print(f"meshbank up: {exc}", file=sys.stderr)
            return 2
    if args.detach:
        status = local.start_detached(state, timeout=args.timeout)
        from services.seed import print_quickstart

        print_quickstart(state, status)
        return 0
    if local.supervisor_pid(state) is not None:
        print(f"meshbank is already running (state in {state}); `meshbank down` stops it")
        return 1
    local.Supervisor(state, topology).run()
    return 0


def cmd_mesh_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mesh import envoy
    from regions import topology

    topo = topology.load(args.topology)
    out = Path(args.out)
    paths = envoy.Paths(Path(args.pki_dir), Path(args.descriptor or local.descriptor_path()))
    for name in envoy.write(topo, paths, out):
        print(out / name)
    return 0


def cmd_render_k8s(args: argparse.Namespace) -> int:
    from pathlib import Path

    from regions import k8s, topology

    path = Path(args.topology or os.environ.get("MESHBANK_TOPOLOGY") or topology.DEFAULT_TOPOLOGY)
    try:
        topo = topology.load(path)
        descriptor = local.descriptor_path()
        rendered = k8s.render(
            topo,
            path.read_text(),
            descriptor.read_bytes(),
            descriptor.with_name(k8s.OPENAPI_NAME).read_text(),
            args.image,
        )
    except (topology.TopologyError, k8s.RenderError) as exc:
        print(f"meshbank render k8s: {exc}", file=sys.stderr)
        return 2
    try:
        written = k8s.write(rendered, Path(args.out))
    except OSError as exc:
        print(f"meshbank render k8s: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    for file in written:
        print(file)
    print("apply each region's directory to its cluster; first create these Secrets:")
    for namespace, secrets in k8s.required_secrets(topo).items():
        print(f"  {namespace}: {' '.join(secrets)}")
    return 0


def cmd_mesh_lint(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from mesh import lint

    problems = []
    for path in sorted(Path(args.dir).glob("*.yaml")):
        problems += [f"{path.name}: {p}" for p in lint.lint(yaml.safe_load(path.read_text()))]
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_region_kill(args: argparse.Namespace) -> int:
    roles = [r for r in args.roles.split(",") if r]
    killed = local.kill_region(local.state_dir(), args.region, roles)
    print(f"held {args.region} ({', '.join(roles)}) down; killed {len(killed)} processes")
    return 0


def cmd_region_restore(args: argparse.Namespace) -> int:
    local.restore_region(local.state_dir(), args.region)
    print(f"released {args.region}; the supervisor restarts its processes")
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    from regions import drills

    def progress(message: str) -> None:
        print(f"drill: {message}", file=sys.stderr)

    try:
        result = drills.run(
            args.name,
            local.state_dir(),
            local.load_topology(),
            hold=args.hold,
            restore_timeout=args.restore_timeout,
            log=progress,
        )
    except drills.DrillError as exc:
        print(f"meshbank drill: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict()) if args.json else drills.table(result))
    return 0 if result.passed else 1


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def cmd_check_bank(args: argparse.Namespace) -> int:
    import signal

    import sqlalchemy

    from regions import bank_check, nemesis

    def progress(message: str) -> None:
        print(f"check bank: {message}", file=sys.stderr)

    # SIGTERM like Ctrl-C: the check heals every fault it injected before it exits.
    signal.signal(signal.SIGTERM, _interrupt)

    try:
        options = bank_check.Options(
            duration=args.duration,
            accounts=args.accounts,
            clients=args.clients,
            faults=tuple(nemesis.parse_kinds(args.faults)),
            hold=args.hold,
            seed=args.seed,
        )
        report = bank_check.run(local.state_dir(), local.load_topology(), options, log=progress)
    except (bank_check.CheckError, nemesis.NemesisError, local.LocalError) as exc:
        print(f"meshbank check bank: {exc}", file=sys.stderr)
        return 2
    except sqlalchemy.exc.OperationalError as exc:  # the leader went away during setup
        print(f"meshbank check bank: the database: {exc.orig}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meshbank check bank: interrupted; every injected fault was healed", file=sys.stderr)
        return 130
    print(json.dumps(report.as_dict()) if args.json else bank_check.summary(report))
    return 0 if report.valid else 1


def cmd_down(_args: argparse.Namespace) -> int:
    state = local.state_dir()
    if local.stop(state):
        print("meshbank stopped")
    else:
        print("meshbank was not running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = local.state_dir()
    status = local.read_status(state)
    running = local.supervisor_pid(state) is not None
    if status is None or not running:
        status = {"phase": "stopped", "regions": [], "processes": [], "endpoints": {}}
    if args.json:
        print(json.dumps(status))
    else:
        print(f"phase: {status['phase']}")
        for proc in status["processes"]:
            mark = "healthy" if proc["healthy"] else "UNHEALTHY"
            where = f"{proc['region']:8} {proc['role']:8} {proc['service']:10}"
            print(f"  {where} pid={proc['pid']} {mark}")
        for name, address in status["endpoints"].items():
            print(f"  {name}: {address}")
    return 0 if status["phase"] == "running" else 3


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise SystemExit("meshbank: the passwords differ")
    return first


def _refused(exc: Exception) -> int:
    """Print why an operator command was refused (and each bad field); exit code 1."""
    print(f"meshbank: {getattr(exc, 'message', exc)}", file=sys.stderr)
    for v in getattr(exc, "violations", []):
        print(f"  {v.field}: {v.description}", file=sys.stderr)
    return 1


def cmd_users_create(args: argparse.Namespace) -> int:
    from services import app
    from services.common import errors

    admin = app.auth_admin(_database_url())
    try:
        admin.create_user(args.name, _read_password())
    except errors.DomainError as exc:
        return _refused(exc)
    print(f"created user users/{args.name}")
    return 0


def cmd_partners_create(args: argparse.Namespace) -> int:
    from services import app
    from services.common import errors

    admin = app.auth_admin(_database_url())
    scopes = [s for s in args.scopes.replace(",", " ").split() if s]
    try:
        client_id, secret = admin.create_partner(args.name, scopes)
    except errors.DomainError as exc:
        return _refused(exc)
    print(f"created partner {args.name} with scopes {' '.join(scopes)}")
    print(f"client_id:     {client_id}")
    print(f"client_secret: {secret}")
    print("Store the secret now: only its hash is kept, it cannot be shown again.")
    return 0


def cmd_rotate_keys(_args: argparse.Namespace) -> int:
    from services import app

    passphrase = os.environ.get("MESHBANK_KEY_PASSPHRASE")
    if not passphrase and not os.environ.get("MESHBANK_DATABASE_URL"):
        passphrase = local.load_secrets(local.state_dir())["key_passphrase"]
    if not passphrase:
        raise SystemExit("meshbank: MESHBANK_KEY_PASSPHRASE is not set")
    kid = app.auth_admin(_database_url()).rotate_signing_key(passphrase)
    from services.auth.handlers import KEY_PUBLICATION_DELAY

    delay = int(KEY_PUBLICATION_DELAY.total_seconds())
    print(
        f"new signing key {kid}: published now, signing new tokens in {delay} s; "
        "earlier keys verify until their tokens expire"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshbank", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run one or more gRPC services (config from MESHBANK_* env)")
    s.add_argument("services", nargs="+", choices=["account", "transfer", "auth"])
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("migrate", help="apply the database migrations")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("up", help="start PostgreSQL and the services under a supervisor")
    s.add_argument("--detach", action="store_true", help="return once everything is healthy")
    s.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="with --detach: seconds to wait for everything to be healthy",
    )
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("down", help="stop everything `up` started")
    s.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="show the processes of the local deployment")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_status)

    mesh = sub.add_parser("mesh", help="Envoy configuration").add_subparsers(
        dest="sub", required=True
    )
    s = mesh.add_parser("render", help="write every proxy's config generated from the topology")
    s.add_argument("--out", required=True)
    s.add_argument("--topology", help="topology file (default: regions/topology.yaml)")
    s.add_argument("--pki-dir", default="/etc/meshbank/pki", help="where certificates will be")
    s.add_argument("--descriptor", help="descriptor set path (default: gen/descriptors/...)")
    s.set_defaults(func=cmd_mesh_render)
    s = mesh.add_parser("lint", help="check generated configs for the known Envoy traps")
    s.add_argument("dir")
    s.set_defaults(func=cmd_mesh_lint)

    render = sub.add_parser("render", help="deployment manifests").add_subparsers(
        dest="sub", required=True
    )
    s = render.add_parser("k8s", help="Kubernetes manifests, one directory per region's cluster")
    s.add_argument("--out", required=True, help="directory (written as OUT/<region>/*.yaml)")
    s.add_argument("--topology", help="topology file (default: regions/topology.yaml)")
    s.add_argument("--image", help="services image, pinned (overrides kubernetes.images.services)")
    s.set_defaults(func=cmd_render_k8s)

    region = sub.add_parser("region", help="failure drills on the local deployment").add_subparsers(
        dest="sub", required=True
    )
    s = region.add_parser("kill", help="SIGKILL a region's processes and keep them down")
    s.add_argument("region")
    killable = ",".join(r for r in local.ROLES if r not in ("global", "tracing"))
    s.add_argument(
        "--roles",
        default=killable,
        help=f"comma-separated subset of {killable} (default: all)",
    )
    s.set_defaults(func=cmd_region_kill)
    s = region.add_parser("restore", help="let the supervisor restart a killed region")
    s.add_argument("region")
    s.set_defaults(func=cmd_region_restore)

    s = sub.add_parser("drill", help="run a failover drill against the running deployment")
    s.add_argument("name", choices=DRILLS)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--hold", type=float, default=12.0, help="seconds the fault lasts")
    s.add_argument(
        "--restore-timeout",
        type=float,
        default=120.0,
        help="seconds to wait after the fault for health and replication to be whole",
    )
    s.set_defaults(func=cmd_drill)

    check = sub.add_parser("check", help="consistency checks under faults").add_subparsers(
        dest="sub", required=True
    )
    s = check.add_parser(
        "bank",
        help="Jepsen-style bank check: concurrent transfers under a nemesis, then a ledger audit",
    )
    s.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    s.add_argument("--accounts", type=int, default=8, help="accounts holding the total (2-100)")
    s.add_argument("--clients", type=int, default=4, help="transfer clients, half gRPC, half REST")
    s.add_argument(
        "--faults",
        default="all",
        help=f"all, none, or a comma-separated subset of {','.join(FAULT_KINDS)}",
    )
    s.add_argument("--hold", type=float, help="seconds each fault lasts (default: per kind)")
    s.add_argument("--seed", type=int, help="seed of the load and the fault targets")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_check_bank)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="sub", required=True)
    s = users.add_parser("create", help="create a user (password from stdin or a prompt)")
    s.add_argument("name")
    s.set_defaults(func=cmd_users_create)

    partners = sub.add_parser("partners", help="manage partners").add_subparsers(
        dest="sub", required=True
    )
    s = partners.add_parser("create", help="create a partner; prints its client secret once")
    s.add_argument("name")
    s.add_argument(
        "--scopes",
        required=True,
        help="comma-separated: accounts.read,accounts.write,accounts.admin,"
        "transfers.read,transfers.write",
    )
    s.set_defaults(func=cmd_partners_create)

    auth = sub.add_parser("auth", help="token signing keys").add_subparsers(
        dest="sub", required=True
    )
    s = auth.add_parser("rotate-keys", help="add a new signing key")
    s.set_defaults(func=cmd_rotate_keys)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from regions.netns import NetnsError
    from regions.topology import TopologyError

    _setup_logging()
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (local.LocalError, TopologyError, NetnsError) as exc:
        # An operator's mistake or the machine's state: the reason, not a traceback.
        print(f"meshbank: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
