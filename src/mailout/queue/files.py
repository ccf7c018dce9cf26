"""Safe operations on queue files: they are opened without following a
link or blocking, only regular files are read, and writes are durable."""
import ctypes
import errno
import os
import stat

from mailout.interfaces import MailoutError


class QueueError(MailoutError, ValueError):
    """A queue file is unreadable or malformed."""


def open_regular(path, flags=os.O_RDONLY):
    """Open a queue file without following a link or blocking (a FIFO);
    `QueueError` for anything but a regular file."""
    _check_regular(path, os.lstat(path).st_mode)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):     # swapped meanwhile
            raise QueueError(f'{os.path.basename(path)} is not a regular '
                             'file') from None
        raise
    try:
        _check_regular(path, os.fstat(fd).st_mode)
    except QueueError:
        os.close(fd)
        raise
    return fd


def _check_regular(path, mode):
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFDIR: 'a directory', stat.S_IFLNK: 'a symbolic link',
                stat.S_IFIFO: 'a FIFO', stat.S_IFSOCK: 'a socket'}.get(
            stat.S_IFMT(mode), 'a device')
        raise QueueError(f'{os.path.basename(path)} is {kind}, not a '
                         'regular file')


def read_regular(path, read=None):
    """The bytes of a regular queue file (or what ``read(f)`` returns)."""
    with os.fdopen(open_regular(path), 'rb') as f:
        return read(f) if read else f.read()


def write_durably(path, data):
    """Create ``path`` (0600, never through a link) with ``data`` and fsync
    it; a failed write leaves no partial file behind."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)        # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink(path)
        raise
    os.close(fd)


def fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path):
    """Remove ``path`` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):       # not Linux, or an old libc
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                         ctypes.c_char_p, ctypes.c_uint]
    return function


_renameat2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def replace_existing(source, target):
    """Rename ``source`` over ``target`` only if ``target`` is there:
    FileNotFoundError (``source`` left as it is) if it is not -- a claim
    taken over meanwhile must not come back to life.  Atomic where the
    system can exchange two names (Linux's renameat2); elsewhere (NFS,
    other systems) a check just before the rename leaves a window of
    microseconds."""
    if _renameat2 is not None and _renameat2(
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
            _RENAME_EXCHANGE) == 0:
        unlink(source)                  # the old version, swapped aside
        return
    # Not exchanged: a name missing (said below), or no exchange here
    # (EINVAL on NFS, ENOSYS, EPERM from a seccomp policy, ...).
    if not os.path.lexists(target):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT),
                                target)
    os.rename(source, target)


def ctime(path, default):
    try:
        return os.lstat(path).st_ctime
    except FileNotFoundError:
        return default


def mtime(path, default):
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return default
