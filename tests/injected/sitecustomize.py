"""A machine as a test needs it, without root or a mount: every Python process whose
PYTHONPATH starts with this folder (infer_mp.py and its workers) sees it.

FAKE_MEMORY_MB=N: /proc/meminfo says the machine has N MB (MemTotal).

PILLOW_MAX_IMAGE_PIXELS=N: Pillow's own limit (PIL.Image.MAX_IMAGE_PIXELS, 89 MP: it warns past
it and refuses past twice it) set to N, so that a small test image meets it as a huge scan would.

CASE_INSENSITIVE=folder: looking a name up in that folder (os.stat, os.lstat: what
os.path.exists uses) ignores case, as on SMB, APFS or NTFS: `A.json` is found as `a.json`.

UNLISTABLE=folder: listing that folder (os.scandir, os.listdir) fails with EACCES, as for a folder
without read permission (which root would read anyway).

SIGNAL_ON_STDERR=SIGINT:text: the process sends itself that signal once, just after it first writes
`text` to stderr (a Ctrl-C at that instant, e.g. while it prints its summary).

FAULTY_DISK: the folder it names fails as a real disk would, with the error the kernel gives:

    FAULTY_DISK='{"folder": "/tmp/x/disk", "error": "ENOSPC", "capacity": 409600}'
        writes fail once the files in the folder would hold more than `capacity` bytes (a full disk);
    FAULTY_DISK='{"folder": "/tmp/x/disk", "error": "EROFS"}'   (or "EACCES")
        anything that would change the folder fails: opening a file to write, making or removing
        a file or folder, renaming (a read-only mount, or no permission, even for root);
    "after": "/tmp/x/trigger" in either makes the folder fail only once that file exists
        (a disk that fills or is remounted read-only in the middle of a run).

The error is raised where the change is attempted, as OSError(errno, strerror, path), so the
code under test meets exactly what it would meet on a real disk. Without FAULTY_DISK, nothing
is changed.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os

_SETTINGS = json.loads(os.environ.get("FAULTY_DISK") or "null")
_MEMORY_MB = os.environ.get("FAKE_MEMORY_MB")


def _inside(path, dir_fd=None) -> bool:
    """Is this path (possibly relative to dir_fd) in the faulty folder?"""
    if isinstance(path, int):
        return False
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    real = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(path)), ""))
    real = os.path.join(real, os.path.basename(path))
    folder = os.path.realpath(_SETTINGS["folder"])
    return real == folder or real.startswith(folder + os.sep)


def _failing() -> bool:
    return _SETTINGS["after"] is None or os.path.exists(_SETTINGS["after"])


def _refuse(path) -> None:
    code = getattr(errno, _SETTINGS["error"])
    raise OSError(code, os.strerror(code), os.fsdecode(path) if not isinstance(path, int) else path)


def _used() -> int:
    total = 0
    for folder, _, names in os.walk(_SETTINGS["folder"]):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _check_space(path, more: int) -> None:
    if more and _failing() and _used() + more > _SETTINGS["capacity"]:
        _refuse(path)


class _FullDiskFile:
    """A file object whose writes fail once the folder is full."""

    def __init__(self, handle, path):
        self._handle, self._path = handle, path

    def write(self, data):
        encoded = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        _check_space(self._path, len(encoded))
        return self._handle.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_full_fds: set[int] = set()


def _install() -> None:
    real_open, real_os_open, real_write = builtins.open, os.open, os.write
    full = _SETTINGS["error"] == "ENOSPC"
    _SETTINGS.setdefault("after", None)

    def open_(file, mode="r", *args, **kwargs):
        writing = any(flag in mode for flag in "wax+")
        if writing and _inside(file):
            if not full and _failing():
                _refuse(file)
            if full:
                return _FullDiskFile(real_open(file, mode, *args, **kwargs), file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & _WRITE_FLAGS and _inside(path, dir_fd):
            if not full and _failing():
                _refuse(path)
            descriptor = real_os_open(path, flags, mode, dir_fd=dir_fd)
            if full:
                _full_fds.add(descriptor)
            return descriptor
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def os_write(fd, data):
        if fd in _full_fds:
            _check_space(fd, len(data))
        return real_write(fd, data)

    def os_close(fd):
        _full_fds.discard(fd)  # (the number goes to the next file or pipe opened)
        return real_close(fd)

    real_close = os.close
    builtins.open = io.open = open_
    os.open, os.write, os.close = os_open, os_write, os_close
    if full:
        return

    def refusing(function, *arguments):
        """`function`, refused where a path argument ((position, its dir_fd keyword)) is inside."""

        def wrapper(*args, **kwargs):
            for position, fd_keyword in arguments:
                if position < len(args) and _inside(args[position], kwargs.get(fd_keyword)) and _failing():
                    _refuse(args[position])
            return function(*args, **kwargs)

        return wrapper

    one = ((0, "dir_fd"),)
    two = ((0, "src_dir_fd"), (1, "dst_dir_fd"))
    for name, arguments in (("mkdir", one), ("rmdir", one), ("remove", one), ("unlink", one), ("chmod", one),
                            ("utime", one), ("rename", two), ("replace", two), ("link", two),
                            ("symlink", ((1, "dir_fd"),))):
        setattr(os, name, refusing(getattr(os, name), *arguments))
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and _inside(path) and _failing():
            return False
        return real_access(path, mode, *args, **kwargs)

    os.access = access


def _install_memory() -> None:
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and os.fspath(file) == "/proc/meminfo" and "b" not in mode:
            return io.StringIO(f"MemTotal:       {int(_MEMORY_MB) * 1024} kB\n")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = open_


def _install_case_insensitive(folder: str) -> None:
    real_stat, real_lstat = os.stat, os.lstat
    folder = os.path.realpath(folder)

    def folded(function):
        def lookup(path, *args, **kwargs):
            try:
                return function(path, *args, **kwargs)
            except FileNotFoundError:
                if isinstance(path, int) or kwargs.get("dir_fd") is not None:
                    raise
                parent, name = os.path.split(os.path.abspath(os.fsdecode(path)))
                if not os.path.realpath(parent).startswith(folder):
                    raise
                for other in os.listdir(parent):
                    if other.casefold() == name.casefold():
                        return function(os.path.join(parent, other), *args, **kwargs)
                raise

        return lookup

    os.stat, os.lstat = folded(real_stat), folded(real_lstat)


def _install_signal_on_stderr(setting: str) -> None:
    import signal
    import sys

    name, _, text = setting.partition(":")

    class SignallingStream:
        def __init__(self, stream):
            self.stream, self.fired = stream, False

        def write(self, data):
            written = self.stream.write(data)
            if not self.fired and text in data:
                self.fired = True
                self.stream.flush()
                os.kill(os.getpid(), getattr(signal, name))
            return written

        def __getattr__(self, attribute):
            return getattr(self.stream, attribute)

    sys.stderr = SignallingStream(sys.stderr)


def _install_unlistable(folder: str) -> None:
    real_scandir, real_listdir = os.scandir, os.listdir
    folder = os.path.realpath(folder)

    def refusing(function):
        def listing(path=".", *args, **kwargs):
            if not isinstance(path, int) and os.path.realpath(os.fsdecode(path)) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return function(path, *args, **kwargs)

        return listing

    os.scandir, os.listdir = refusing(real_scandir), refusing(real_listdir)


if os.environ.get("UNLISTABLE"):
    _install_unlistable(os.environ["UNLISTABLE"])
if os.environ.get("SIGNAL_ON_STDERR"):
    _install_signal_on_stderr(os.environ["SIGNAL_ON_STDERR"])
if os.environ.get("PILLOW_MAX_IMAGE_PIXELS"):
    from PIL import Image as _Image

    _Image.MAX_IMAGE_PIXELS = int(os.environ["PILLOW_MAX_IMAGE_PIXELS"])
if _SETTINGS:
    _install()
if os.environ.get("CASE_INSENSITIVE"):
    _install_case_insensitive(os.environ["CASE_INSENSITIVE"])
if _MEMORY_MB:
    _install_memory()
