"""The CLI answers an operator's mistake with its reason and exit status 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from services import cli


def test_a_port_plan_in_the_ephemeral_range_is_refused_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHBANK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MESHBANK_BASE_PORT", "33000")
    assert cli.main(["up", "--detach"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshbank: ports 33000..")
    assert "ephemeral range" in err
    assert "Traceback" not in err
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_a_broken_topology_file_is_refused_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "topology.yaml"
    bad.write_text("regions: []\n")
    monkeypatch.setenv("MESHBANK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MESHBANK_TOPOLOGY", str(bad))
    assert cli.main(["up", "--detach"]) == 2
    assert capsys.readouterr().err.startswith("meshbank: ")
