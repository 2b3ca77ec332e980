"""The Dockerfile, checked offline (no container engine here to build it).

Pinned base image, multi-stage, the unprivileged user the manifests run as, and every
file it copies present in the tree and not excluded from the build context.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from regions import k8s
from regions.k8s_settings import image_problem

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
IGNORED = [
    line.strip()
    for line in (ROOT / ".dockerignore").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _ignored(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pattern) for p in prefixes for pattern in IGNORED)


def test_base_image_is_pinned_and_the_build_is_multi_stage() -> None:
    steps = _instructions()
    (default,) = [
        rest for word, rest in steps if word == "ARG" and rest.startswith("PYTHON_IMAGE=")
    ]
    assert image_problem(default.split("=", 1)[1]) is None
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)


def test_runs_as_the_unprivileged_user_the_manifests_expect() -> None:
    steps = _instructions()
    user = [rest for word, rest in steps if word == "USER"][-1]
    assert user == f"{k8s.SERVICE_UID}:{k8s.SERVICE_UID}"
    # The last stage copies only from the build stage (no sources, no compilers).
    last = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    copies = [rest for word, rest in steps[last:] if word == "COPY"]
    assert copies
    assert all(c.startswith("--from=build ") for c in copies)
    entrypoint = [rest for word, rest in steps if word == "ENTRYPOINT"][-1]
    assert entrypoint == '["meshbank"]'


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    for word, rest in _instructions():
        if word != "COPY" or rest.startswith("--from="):
            continue
        *sources, _destination = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not _ignored(source), f"{source} is excluded by .dockerignore"


def test_build_context_leaves_out_local_state() -> None:
    for path in (".venv", ".git", ".meshbank", "tests", "services/__pycache__"):
        assert _ignored(path), path
