"""What leaseflow keeps on disk is private to its user, and never reached through a symlink.

Real files in a temp dir, no server: ``leaseflow.local.private`` (directories 0700,
files 0600, existing ones checked), the home's lock and owner files, and what a stale
``postmaster.pid`` may make leaseflow delete.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaseflow import errors
from leaseflow.local import owners, pgctl, private


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask that would leave new files open to everyone."""
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.fixture
def stranger() -> str:
    """A user other than this one."""
    name = "nobody"
    if pwd.getpwnam(name).pw_uid == os.geteuid():
        pytest.skip("this process runs as nobody")
    return name


# -- private directories ---------------------------------------------------------------


def test_a_missing_directory_is_made_0700_whatever_the_umask(tmp_path: Path, loose_umask: None):
    # When a private directory that does not exist is asked for
    made = private.private_dir(tmp_path / "d")
    # Then it exists, ours, mode 0700
    assert made == tmp_path / "d"
    assert mode(made) == 0o700
    assert os.lstat(made).st_uid == os.geteuid()


def test_a_symlink_planted_there_is_refused_and_never_followed(tmp_path: Path):
    # Given a symlink where the private directory goes, to a directory open to all
    target = tmp_path / "theirs"
    target.mkdir()
    target.chmod(0o777)
    (tmp_path / "d").symlink_to(target)
    # When the private directory is asked for
    with pytest.raises(errors.ConfigurationError, match="symlink"):
        private.private_dir(tmp_path / "d")
    # Then the symlink's target is left exactly as it was
    assert mode(target) == 0o777
    assert os.lstat(target).st_uid == os.geteuid()


def test_an_existing_directory_open_to_others_is_refused(tmp_path: Path):
    # Given a directory of ours that others may enter
    (tmp_path / "d").mkdir()
    (tmp_path / "d").chmod(0o755)
    # Then it is not taken for a private one, and left alone
    with pytest.raises(errors.ConfigurationError, match="open to other users"):
        private.private_dir(tmp_path / "d")
    assert mode(tmp_path / "d") == 0o755
    # But inside a home of leaseflow's, it is repaired
    private.private_dir(tmp_path / "d", repair=True)
    assert mode(tmp_path / "d") == 0o700


def test_an_existing_directory_of_another_user_is_refused(tmp_path: Path, stranger: str):
    # Given a private directory that is ours, where the stranger's should be
    (tmp_path / "d").mkdir(mode=0o700)
    # Then it is refused as the stranger's private directory, even with repair
    with pytest.raises(errors.ConfigurationError, match="belongs to uid"):
        private.private_dir(tmp_path / "d", stranger, repair=True)


def test_a_file_there_is_refused(tmp_path: Path):
    (tmp_path / "d").write_text("")
    with pytest.raises(errors.ConfigurationError, match="not a directory"):
        private.private_dir(tmp_path / "d")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_as_root_a_new_directory_is_given_to_its_user(tmp_path: Path, stranger: str):
    # When root asks for the stranger's private directory
    made = private.private_dir(tmp_path / "d", stranger)
    # Then it is the stranger's, mode 0700
    assert os.lstat(made).st_uid == pwd.getpwnam(stranger).pw_uid
    assert mode(made) == 0o700
    # And asking again accepts it as it is
    assert private.private_dir(made, stranger) == made


def test_missing_parents_are_made_private_and_existing_ones_left_alone(tmp_path: Path):
    # Given an existing directory open to all
    tmp_path.chmod(0o755)
    # When a path two levels below it is made
    private.make_dirs(tmp_path / "a" / "b")
    # Then the new levels are 0700, the existing one unchanged
    assert (mode(tmp_path / "a"), mode(tmp_path / "a" / "b")) == (0o700, 0o700)
    assert mode(tmp_path) == 0o755


# -- the home ---------------------------------------------------------------------------


def test_a_new_home_is_0700_with_its_gitignore(tmp_path: Path, loose_umask: None):
    # When a home is made below a directory that does not exist yet
    home = private.ensure_home(tmp_path / "p" / "home")
    # Then the home is private and ignores itself in git
    assert mode(home) == 0o700
    assert (home / ".gitignore").read_text().splitlines()[-1] == "*"
    assert mode(home / ".gitignore") == 0o600


def test_a_home_leaseflow_made_earlier_is_made_private(tmp_path: Path):
    # Given a home made by an earlier version: 0755, with leaseflow's .gitignore
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / ".gitignore").write_text(private.GITIGNORE)
    # When it is used
    private.ensure_home(home)
    # Then it is 0700
    assert mode(home) == 0o700


def test_a_users_own_home_is_left_as_it_is_unless_others_can_write_it(tmp_path: Path):
    # Given a home the user made, readable by others
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    # Then it is used and its mode left alone
    private.ensure_home(home)
    assert mode(home) == 0o755
    # But a home other users can write is refused, and left alone
    home.chmod(0o775)
    with pytest.raises(errors.ConfigurationError, match="written by other users"):
        private.ensure_home(home)
    assert mode(home) == 0o775


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_home_of_another_user_is_refused(tmp_path: Path, stranger: str):
    # Given a home (a symlink to it, here) that belongs to someone else
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, pwd.getpwnam(stranger).pw_uid, -1)
    (tmp_path / "home").symlink_to(theirs)
    # Then it is refused
    with pytest.raises(errors.ConfigurationError, match="belongs to uid"):
        private.ensure_home(tmp_path / "home")


def test_the_lock_and_owner_files_are_0600(tmp_path: Path, loose_umask: None):
    # Given a home whose lock an earlier version left 0644
    home = tmp_path / "home"
    with owners.home_lock(home):
        pass
    (home / "embedded.lock").chmod(0o644)
    # When it is locked again and this process registers as an owner
    with owners.home_lock(home):
        owners.register(home, os.getpid())
    # Then the home is 0700, the lock and owner files 0600, the owners' directory 0700
    assert mode(home) == 0o700
    assert mode(home / "embedded.lock") == 0o600
    assert mode(home / "owners") == 0o700
    assert mode(home / "owners" / str(os.getpid())) == 0o600


def test_a_symlink_planted_as_the_lock_is_refused(tmp_path: Path):
    # Given a home whose lock file is a symlink to a file elsewhere
    home = private.ensure_home(tmp_path / "home")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    victim.chmod(0o644)
    (home / "embedded.lock").symlink_to(victim)
    # Then locking refuses it, and the file it points to is untouched
    with pytest.raises(errors.ConfigurationError, match="symlink"), owners.home_lock(home):
        pass
    assert victim.read_text() == "keep"
    assert mode(victim) == 0o644


# -- the server's files -----------------------------------------------------------------


def test_a_stale_pid_file_cannot_point_leaseflow_at_other_files(tmp_path: Path):
    # Given a stale postmaster.pid (the server's user writes it) naming another directory
    pgdata, elsewhere = tmp_path / "pgdata", tmp_path / "elsewhere"
    pgdata.mkdir()
    elsewhere.mkdir()
    for name in (".s.PGSQL.5432", ".s.PGSQL.5432.lock"):
        (elsewhere / name).write_text("keep")
    (pgdata / ".s.PGSQL.5432.lock").write_text("")
    lines = ["999999999", str(pgdata), "0", "5432", str(elsewhere), "", "", ""]
    (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")
    # When its leftovers are cleared
    pgctl.kill_stale(pgdata)
    # Then only the data directory's own socket lock and the pid file are gone
    assert sorted(p.name for p in elsewhere.iterdir()) == [".s.PGSQL.5432", ".s.PGSQL.5432.lock"]
    assert not (pgdata / ".s.PGSQL.5432.lock").exists()
    assert not (pgdata / "postmaster.pid").exists()


def test_a_log_is_never_read_through_a_symlink(tmp_path: Path):
    # Given a server log that is a symlink to another file
    secret = tmp_path / "secret"
    secret.write_text("root's secret")
    (tmp_path / "postgres.log").symlink_to(secret)
    # Then its tail reads as empty
    assert private.read_tail(tmp_path / "postgres.log", 100) == ""
    # And a real log's tail is its last bytes
    (tmp_path / "real.log").write_text("0123456789")
    assert private.read_tail(tmp_path / "real.log", 4) == "6789"
