"""Private files and directories: owner-only, checked, never reached through a symlink.

What leaseflow keeps on disk (the home, the embedded server's directories, the lock and
owner files, beat's schedule) is made for one user: directories 0700, files 0600. A
directory that already exists is used only if it is a real directory (not a symlink),
owned by the expected user and closed to everyone else; otherwise a
:class:`~leaseflow.errors.ConfigurationError` says why. Nothing here changes the
permissions of a directory leaseflow did not make.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from pathlib import Path

from leaseflow import errors

#: The home's ``.gitignore``; its first line marks a home leaseflow made.
GITIGNORE = "# created by leaseflow: its embedded database\n*\n"


def private_dir(path: Path, user: str | None = None, *, repair: bool = False) -> Path:
    """``path``, a directory only ``user`` (default: this process's user) can enter.

    Created with mode 0700 (and given to ``user``) when missing. An existing one must be
    a real directory owned by ``user`` with no access for group or others: else
    ``ConfigurationError``; with ``repair`` (a directory inside a home of leaseflow's),
    a looser mode is made 0700 instead. A symlink at ``path`` is never followed.
    """
    uid, gid = _ids(user)
    created = True
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        created = False
    except OSError as exc:
        raise errors.ConfigurationError(f"cannot create {path}: {exc}") from exc
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:  # ELOOP: a symlink; ENOTDIR: not a directory
        raise errors.ConfigurationError(
            f"{path} is not a directory leaseflow can use: {_kind(path)}; "
            "leaseflow uses only a private directory of its own there: remove it"
        ) from exc
    try:
        if created:
            os.fchmod(fd, 0o700)  # whatever the umask
            if os.fstat(fd).st_uid != uid:
                os.fchown(fd, uid, gid)
        elif repair and os.fstat(fd).st_uid == uid:
            os.fchmod(fd, 0o700)
        _check_private(path, os.fstat(fd), uid)
    finally:
        os.close(fd)
    return path


def ensure_home(home: Path) -> Path:
    """``home`` ready for leaseflow's files; created private (0700) when missing.

    An existing home must be a directory of this user that nobody else can write (a
    home leaseflow made earlier, with a looser mode, is made 0700). The home itself
    may be a symlink the user made; its parents are left as they are.
    """
    if not os.path.lexists(home):
        home.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(home, 0o700)
        except FileExistsError:
            pass  # another process made it meanwhile
        else:
            os.chmod(home, 0o700)
            write_private(home / ".gitignore", GITIGNORE)
    try:
        st = os.stat(home)
    except OSError as exc:
        raise errors.ConfigurationError(f"LEASEFLOW_HOME {home} is unusable: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise errors.ConfigurationError(f"LEASEFLOW_HOME {home} is not a directory")
    if st.st_uid != os.geteuid():
        raise errors.ConfigurationError(
            f"LEASEFLOW_HOME {home} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.geteuid()}): choose a home of your own"
        )
    if st.st_mode & 0o077 and _made_by_leaseflow(home):
        os.chmod(home, 0o700)
    elif st.st_mode & 0o022:
        raise errors.ConfigurationError(
            f"LEASEFLOW_HOME {home} can be written by other users "
            f"(mode {stat.S_IMODE(st.st_mode):o}): make it private (chmod 700)"
        )
    return home


def open_private(path: Path, flags: int) -> int:
    """A descriptor of the file ``path``, created 0600, never opened through a symlink.

    A file of this user's found with a looser mode is made 0600.
    """
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise errors.ConfigurationError(f"{path} is a symlink: leaseflow never follows it") from exc
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to the file ``path`` (0600), never through a symlink."""
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_TRUNC), "w") as f:
        f.write(text)


def write_new(path: Path, text: str) -> None:
    """Create the file ``path`` (0600) with ``text``; ``FileExistsError`` if anything is there."""
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_EXCL), "w") as f:
        f.write(text)


def make_dirs(path: Path) -> Path:
    """``path`` and its missing parents, each one made 0700; existing ones are left alone."""
    missing = []
    folder = path
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
    return path


def read_tail(path: Path, size: int) -> str:
    """The last ``size`` bytes of the file ``path`` ('' if absent), not through a symlink.

    For logs written by another user (the embedded server's), read as root.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(0, end - size))
        return f.read().decode(errors="replace")


def _ids(user: str | None) -> tuple[int, int]:
    if user is None:
        return os.geteuid(), os.getegid()
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _check_private(path: Path, st: os.stat_result, uid: int) -> None:
    if st.st_uid != uid:
        raise errors.ConfigurationError(
            f"{path} belongs to uid {st.st_uid}, not to uid {uid}: leaseflow uses only a "
            "private directory of its own there: remove it"
        )
    if st.st_mode & 0o077:
        raise errors.ConfigurationError(
            f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}): leaseflow "
            "uses only a private directory (0700) there: remove it"
        )


def _kind(path: Path) -> str:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return str(exc)
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    return "not a directory"


def _made_by_leaseflow(home: Path) -> bool:
    try:
        with (home / ".gitignore").open() as f:
            return f.readline() == GITIGNORE.splitlines(keepends=True)[0]
    except OSError:
        return False
