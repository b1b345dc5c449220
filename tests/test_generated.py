"""The committed stubs (fedplane/v1, fedplane/hub/etcdpb) must be exactly what tools/genproto.py
makes from proto/."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import genproto  # noqa: E402


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    genproto.generate(tmp_path)
    for package, src in genproto.PACKAGES.items():
        fresh_dir, committed_dir = tmp_path / src / package, ROOT / src / package
        fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
        committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}
        stale = sorted(name for name in fresh if committed.get(name) != fresh[name])
        extra = sorted(set(committed) - set(fresh))
        assert not stale and not extra, (
            f"{package} is stale (differs: {stale}, not generated: {extra}); run: python tools/genproto.py"
        )
