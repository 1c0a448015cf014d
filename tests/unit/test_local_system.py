"""As root, a home's cluster lives in a directory of the server's user: one per home.

No server: ``leaseflow.local.system`` on a stand-in ``SYSTEM_DATA`` in a temp dir, its
directories made for this user. A replaced home gets a fresh cluster; the clusters of
vanished temp homes are swept, and only those.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from leaseflow import errors
from leaseflow.local import private, system


@pytest.fixture(autouse=True)
def system_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``SYSTEM_DATA`` and the temp dir, both under this test's own directory."""
    monkeypatch.setattr(system, "SYSTEM_DATA", tmp_path / "sys")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    return tmp_path / "sys"


def made(home: Path) -> Path:
    """A home, as ``home_lock`` makes it before the server starts."""
    return private.ensure_home(home)


def test_a_homes_cluster_directory_is_private_and_names_its_home(tmp_path: Path):
    # When the cluster directory of a home is prepared
    home = made(tmp_path / "tmp" / "h")
    cluster = system.prepare(home, None)
    # Then it is a private directory of SYSTEM_DATA (private too) that names the home
    assert cluster == system.cluster_of(home) and cluster.parent == system.SYSTEM_DATA
    for folder in (cluster, system.SYSTEM_DATA):
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    assert system.read_record(cluster) == system.record_of(home)
    assert stat.S_IMODE(os.lstat(cluster / system.RECORD).st_mode) == 0o600


def test_the_same_home_keeps_its_cluster(tmp_path: Path):
    # Given a home whose cluster holds data
    home = made(tmp_path / "tmp" / "h")
    cluster = system.prepare(home, None)
    (cluster / "pgdata").mkdir()
    (cluster / "pgdata" / "PG_VERSION").write_text("18")
    # When it starts again
    assert system.prepare(home, None) == cluster
    # Then its data is still there
    assert (cluster / "pgdata" / "PG_VERSION").read_text() == "18"


def test_a_replaced_home_gets_a_fresh_cluster(tmp_path: Path):
    # Given a home whose cluster holds data
    home = made(tmp_path / "tmp" / "h")
    cluster = system.prepare(home, None)
    (cluster / "pgdata").mkdir()
    (cluster / "pgdata" / "PG_VERSION").write_text("18")
    # When the home is removed and a new one made at the same path (rm -rf .leaseflow)
    shutil.rmtree(home)
    home = made(home)
    # Then its start discards the old cluster: the same directory, empty, naming the new home
    assert system.prepare(home, None) == cluster
    assert sorted(p.name for p in cluster.iterdir()) == [system.RECORD]
    assert system.read_record(cluster) == system.record_of(home)


def test_making_a_cluster_sweeps_those_of_vanished_temp_homes_only(tmp_path: Path):
    # Given the clusters of a temp home now gone, of a temp home still there, and of a
    # home elsewhere now gone (an unmounted disk, maybe)
    gone, kept = made(tmp_path / "tmp" / "gone"), made(tmp_path / "tmp" / "kept")
    elsewhere = made(tmp_path / "disk" / "home")
    clusters = {home: system.prepare(home, None) for home in (gone, kept, elsewhere)}
    shutil.rmtree(gone)
    shutil.rmtree(elsewhere)
    # When another home's cluster is made
    system.prepare(made(tmp_path / "tmp" / "new"), None)
    # Then only the vanished temp home's cluster is gone
    assert not clusters[gone].exists()
    assert clusters[kept].exists() and clusters[elsewhere].exists()


def test_a_cluster_directory_of_another_kind_is_refused(tmp_path: Path):
    # Given a symlink planted where a home's cluster directory goes
    home = made(tmp_path / "tmp" / "h")
    private.private_dir(system.SYSTEM_DATA)
    target = tmp_path / "theirs"
    target.mkdir()
    system.cluster_of(home).symlink_to(target)
    # Then the home's start refuses it, and writes nothing through it
    with pytest.raises(errors.ConfigurationError, match="symlink"):
        system.prepare(home, None)
    assert list(target.iterdir()) == []
