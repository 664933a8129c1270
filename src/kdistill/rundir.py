"""The run directory `output_dir/name`: one real directory inside `output_dir`, locked.

Every path a run writes is reached through `RunDirectory.path` (no `..`, no link on the way),
and a lock per directory keeps two runs on one name from overwriting each other.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from kdistill.errors import ConfigError
from kdistill.io import _NOFOLLOW, _reason, make_dirs, refuse_symlink

try:  # POSIX; without it (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

MAX_NAME = 100  # characters in a run name: well under any file system's 255-byte limit


def check_run_name(name: Any, where: str = "name") -> str:
    """`name` if it is one directory name: not empty, `.` or `..`, no path separator, no NUL,
    at most MAX_NAME characters; else one ConfigError naming `where`."""
    if not isinstance(name, str) or not name:
        raise ConfigError(where, f"must be a non-empty name, got {name!r}")
    if len(name) > MAX_NAME:
        raise ConfigError(where, f"is {len(name)} characters long; a run name has at most "
                          f"{MAX_NAME}")
    if name in (".", ".."):
        raise ConfigError(where, f"{name!r} is not a run name: the run directory must be a "
                          "new directory inside output_dir")
    if any(sep and sep in name for sep in ("/", "\\", "\0", os.sep, os.altsep)):
        raise ConfigError(where, f"{name!r} contains a path separator; a run name is one "
                          "directory inside output_dir (set output_dir to choose where)")
    return name


class RunDirectory:
    """`output_dir/name`, checked to be one real directory inside `output_dir` and locked.

        with RunDirectory.open(cfg.output_dir, cfg.name) as rd:
            stage_dir = rd.dir("seed-0", "student")        # created; no link on the way
            metrics = rd.path("seed-0", "student", "metrics.jsonl")

    The lock is an exclusive `fcntl.flock` on `<run>/.lock`, which holds the owner's pid. The
    kernel releases a flock when its process dies however it dies (kill -9, OOM killer), so a
    killed run never leaves a stale lock: the next run takes it over (`stale_pid` then says
    whose it was). A second live run on the same directory stops at once, naming the holder.
    """

    LOCK = ".lock"

    def __init__(self, output_dir: Path, name: str) -> None:
        self.output_dir = Path(output_dir)
        self.name = check_run_name(name)
        self.root = self.output_dir / self.name
        self.stale_pid: int | None = None  # a killed run's pid, found in the lock we took
        self._fd: int | None = None

    @classmethod
    def open(cls, output_dir: str | Path, name: str, *, lock: bool = True) -> RunDirectory:
        """Check and create the run directory; with `lock` (rank 0 under torchrun), lock it."""
        rd = cls(Path(output_dir), name)
        if rd.output_dir.is_symlink() and not rd.output_dir.is_dir():
            refuse_symlink(rd.output_dir, "output_dir")  # a dangling link
        make_dirs(rd.output_dir, where="output_dir")
        refuse_symlink(rd.root, "the run directory")
        make_dirs(rd.root, where="name")
        inside = rd.root.resolve().parent == rd.output_dir.resolve()
        if not inside:  # unreachable with a checked name; kept as the invariant's guard
            raise ConfigError("name", f"{rd.root} is not inside {rd.output_dir}")
        if lock:
            rd._lock()
        return rd

    def _lock(self) -> None:
        if fcntl is None:
            return
        path = self.root / self.LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                refuse_symlink(path, "the lock file")
            raise ConfigError(str(path), f"cannot create the run's lock file "
                              f"({_reason(path, exc)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(str(path), f"cannot lock the run directory "
                                  f"({exc.strerror})") from None
            raise ConfigError(str(self.root), f"another kdistill run (pid {holder}) is using "
                              "this run directory; wait for it to finish or choose another "
                              "name") from None
        previous = os.read(fd, 32).decode("ascii", "replace").strip()
        self.stale_pid = int(previous) if previous.isdigit() else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def close(self) -> None:
        """Release the lock (the file stays: removing it would let two runs lock two files)."""
        if self._fd is not None:
            # Emptied first: a pid left in the file means its run ended without releasing it.
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, *parts: str) -> Path:
        """`root/parts...`, each part one name (a `/` inside a part separates names), none of
        them `.` or `..`, and no existing link along the way: ConfigError naming it."""
        names = [n for part in parts for n in str(part).split("/")]
        path = self.root
        for name in names:
            if name in ("", ".", "..") or "\\" in name or "\0" in name:
                raise ConfigError(str(self.root), f"{'/'.join(names)!r} is not a path inside "
                                  "the run directory")
            path = path / name
            refuse_symlink(path)
        return path

    def dir(self, *parts: str) -> Path:
        """`path(*parts)`, created (ConfigError naming it if it cannot be)."""
        return make_dirs(self.path(*parts))
