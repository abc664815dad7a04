"""What a security review checks: listeners stay on loopback, scoring writes only under
--out, and no secret reaches a log line or a written file."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import psutil
import pytest

from cellpipe.cli import main as cli_main
from cellpipe.serving.server import ServerInfo
from test_scoring_served import _setup
from test_serving import exported, server, trained  # noqa: F401 (module fixtures)


def _listening_addresses(pid: int) -> list[str]:
    """Every address the process and its children listen on (TCP)."""
    root = psutil.Process(pid)
    addresses = []
    for process in [root, *root.children(recursive=True)]:
        for connection in process.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN:
                addresses.append(connection.laddr.ip)
    return addresses


def test_the_local_triton_listens_on_loopback_only(server: tuple[ServerInfo, Path]  # noqa: F811
                                                   ) -> None:
    info, _ = server
    addresses = _listening_addresses(info.pid)
    assert len(addresses) >= 3  # HTTP, gRPC, metrics
    assert all(_is_loopback(address) for address in addresses), addresses


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def _snapshot(root: Path) -> dict[str, float]:
    return {str(path): path.stat().st_mtime for path in root.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_scoring_writes_nothing_outside_its_results_folder(
        server: tuple[ServerInfo, Path], tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    info, _ = server
    inbox, out, params_file = _setup(tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    assert cli_main(["score", str(inbox), "--out", str(out), "--url", info.grpc_url,
                     "--params", str(params_file)]) == 0
    changed = {path for path, mtime in _snapshot(tmp_path).items() if before.get(path) != mtime}
    outside = sorted(path for path in changed if not Path(path).is_relative_to(out))
    assert outside == []
    assert any(Path(path).is_relative_to(out / "slides") for path in changed)
