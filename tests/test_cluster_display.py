"""`fedplane clusters` and `fedplane cluster NAME` show each cluster's health with the time since
its last heartbeat, why it is not ready, when it was lost, and whether it is an edge cluster."""

from __future__ import annotations

from rich.console import Console, RenderableType

from fedplane.client import display
from fedplane.runtime import timestamps
from fedplane.v1 import types_pb2 as pb


def render(renderable: RenderableType) -> str:
    console = Console(record=True, width=240)
    console.print(renderable)
    return console.export_text()


def cluster(name: str, health: int, age: float | None, **fields: object) -> pb.Cluster:
    out = pb.Cluster(name=name, health=health, **fields)  # type: ignore[arg-type]
    if age is not None:
        out.last_heartbeat.CopyFrom(timestamps.at(1_700_000_000))
        out.heartbeat_age_seconds = age
    return out


def test_the_table_shows_each_state_and_the_heartbeats_age() -> None:
    rows = [
        cluster("a-ready", pb.READY, 2.4),
        cluster("b-unknown", pb.UNKNOWN, 42),
        cluster("c-lost", pb.LOST, 3 * 60 + 59, lost_time=timestamps.at(1_700_000_060)),
        cluster("d-edge", pb.UNKNOWN, 2 * 3600 + 1, edge=True),
        cluster("e-new", pb.NOT_READY, None),
    ]
    lines = {
        line.split()[1]: line for line in render(display.cluster_table(rows)).splitlines() if "│" in line[:2]
    }
    assert (
        lines["a-ready"].split("│")[2].strip() == "READY" and lines["a-ready"].split("│")[3].strip() == "2s"
    )
    assert "UNKNOWN" in lines["b-unknown"] and "│ 42s " in lines["b-unknown"]
    assert "LOST" in lines["c-lost"] and "│ 3m " in lines["c-lost"]
    assert "d-edge (edge)" in lines["d-edge"] and "│ 2h " in lines["d-edge"]
    assert "NOT_READY" in lines["e-new"] and "│ - " in lines["e-new"]


def test_the_detail_says_why_since_when_and_whether_edge() -> None:
    lost = cluster(
        "c-lost",
        pb.LOST,
        75,
        lost_time=timestamps.at(1_700_000_060),
        edge=True,
        health_reason="lost: its lease expired (no heartbeat for over 60s)",
    )
    text = render(display.cluster_detail(lost))
    assert "LOST (lost: its lease expired (no heartbeat for over 60s))" in text
    assert "(1m ago)" in text
    assert "Lost since" in text and display.format_time(lost.lost_time) in text
    assert "Edge" in text and "yes" in text

    ready = render(display.cluster_detail(cluster("a", pb.READY, 1)))
    assert "Lost since" not in ready and "(1s ago)" in ready


def test_ages_are_short() -> None:
    assert [display.format_age(s) for s in (0, 59.9, 60, 3599, 3600, 86399, 86400 * 3)] == [
        "0s",
        "59s",
        "1m",
        "59m",
        "1h",
        "23h",
        "3d",
    ]
