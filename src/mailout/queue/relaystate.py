"""What the processes working one queue know about its relays: which rest,
until when and why, and which came back.

One small JSON file in the queue directory, ``relays.json``, maps a relay
(``host:port``) to its record::

    {"state": "resting", "since": T0, "until": T1, "why": "...", "at": T}
    {"state": "up", "since": T, "why": "...", "back": true, "at": T}

(times in seconds since the epoch: processes share it, even on several
hosts, so the monotonic clock will not do).  ``back`` marks a rest that
ended: the processors of the queue then promote the messages deferred for
want of a connection.  The queue knows nothing of mailers: the processor
hands this store to its mailer, whose relay rotation reads and writes it.

The file follows the queue's rules: 0600, never read or written through a
link, replaced atomically (written aside as a dot-file, then renamed over).
Writers do not lock: two processes recording two relays at the same moment
may lose one record.  Each process corrects that on its next connection
(a success ends a rest still recorded, a failure records a new one), so a
lost record costs at most one connection's worth of waiting.

The same processes count their connections to each relay here, when the
mailer limits them (``max-connections-per-relay``): slot N of a relay is
the file ``relay-slots/RELAY.N``, and a connection holds it open with an
exclusive ``flock`` for as long as the connection is open.  The kernel
drops the lock when the file is closed or its process ends, kill -9
included, so a dead process holds no slot and nothing needs cleaning up.
"""
import errno
import fcntl
import json
import logging
import math
import os
import stat
import threading
import time
import urllib.parse
import uuid
import weakref
from typing import Any
from typing import Optional

from mailout.queue import files
from mailout.queue.files import QueueError

log = logging.getLogger('mailout.queue')

#: The file's name in the queue directory.
FILENAME = 'relays.json'
#: Seconds after which a dot-file of an unfinished write is removed.
LEFTOVER_AGE = 3600

#: The directory of the relays' connection slots in the queue directory.
SLOTS = 'relay-slots'

Record = dict[str, Any]


class RelayStates:
    """The relay records of the queue directory ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, FILENAME)
        self._cached: tuple[Optional[tuple], dict[str, Record]] = (None, {})
        self._lock = threading.Lock()
        self._complained = False
        self._slots: weakref.WeakSet[Slot] = weakref.WeakSet()
        os.register_at_fork(after_in_child=self._after_fork)

    def __repr__(self) -> str:
        return f'<RelayStates {self.path}>'

    def _after_fork(self):
        self._lock = threading.Lock()
        # The parent's connections are not the child's: close the child's
        # copies of their slots' files, which frees nothing while the
        # parent has them open (flock(2)).
        for slot in list(self._slots):
            slot.release()

    def slot(self, relay: str, limit: int) -> Optional['Slot']:
        """One of the ``limit`` connection slots of ``relay``, held until
        its `Slot.release` (or the end of this process); None when every
        one is held, by any process working the queue."""
        directory = os.path.join(self.directory, SLOTS)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                raise QueueError(f'{directory} is not a directory (a '
                                 'link?)') from None
        name = urllib.parse.quote(relay, safe='[]:')
        for number in range(limit):
            fd = os.open(os.path.join(directory, f'{name}.{number}'),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            slot = Slot(fd)
            with self._lock:
                self._slots.add(slot)
            return slot
        return None

    def load(self) -> dict[str, Record]:
        """``{relay: record}`` as the file says now (a copy); empty if
        there is no file or it cannot be read.  Read again only when the
        file changed (one ``lstat`` otherwise)."""
        try:
            status = os.lstat(self.path)
        except OSError:
            return {}
        key = (status.st_ino, status.st_mtime_ns, status.st_size)
        with self._lock:
            if self._cached[0] == key:
                return {k: dict(v) for k, v in self._cached[1].items()}
        try:
            states = _valid(json.loads(files.read_regular(self.path)))
        except (OSError, ValueError, QueueError) as e:
            if not self._complained:
                self._complained = True
                log.warning('%r: cannot read it (%s): taken as empty, '
                            'written anew at the next change', self, e)
            return {}
        with self._lock:
            self._cached = (key, states)
        return {k: dict(v) for k, v in states.items()}

    def put(self, relay: str, record: Record) -> None:
        """Record ``record`` for ``relay`` (the others as they are)."""
        states = self.load()
        states[relay] = dict(record, at=time.time())
        self._write(states)

    def end_rests(self, why: str, now: Optional[float] = None) -> list[str]:
        """End every rest (``mailout queue retry``): those relays are up,
        ``back``, tried at the next connection.  The relays whose rest
        ended."""
        now = time.time() if now is None else now
        states = self.load()
        ended = sorted(r for r, s in states.items()
                       if s['state'] == 'resting')
        for relay in ended:
            states[relay] = {'state': 'up', 'since': now, 'why': why,
                             'back': True, 'at': now}
        if ended:
            self._write(states)
        return ended

    def remove_leftovers(self, now: float) -> None:
        """Remove the dot-files of writes that never finished (a process
        died between writing and renaming), an hour after they were made:
        a write takes milliseconds, on whichever host."""
        prefix = f'.{FILENAME}.'
        try:
            listing = os.listdir(self.directory)
        except OSError:
            return
        for name in listing:
            if name.startswith(prefix) and name.endswith('.tmp'):
                path = os.path.join(self.directory, name)
                if now - files.mtime(path, now) > LEFTOVER_AGE:
                    files.unlink(path)

    def _write(self, states):
        # A dot-file (no message, for any reader of the queue), its name
        # unique across the hosts sharing the queue.
        aside = os.path.join(self.directory,
                             f'.{FILENAME}.{uuid.uuid4().hex}.tmp')
        files.write_durably(aside, json.dumps(
            states, sort_keys=True, indent=1).encode('utf-8'))
        try:
            os.rename(aside, self.path)
        except OSError:
            files.unlink(aside)
            raise


class Slot:
    """A connection slot held: an open file locked with ``flock``."""

    def __init__(self, fd: int):
        self.fd: Optional[int] = fd

    def release(self) -> None:
        """Free the slot (closing the file drops the lock)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    # A thread that ended without closing its connection.
    __del__ = release


def _valid(data):
    """The well-formed records of ``data``; `QueueError` if it is not a
    mapping of them at all."""
    if not isinstance(data, dict):
        raise QueueError(f'{FILENAME} is not a JSON object')
    states = {}
    for relay, record in data.items():
        if isinstance(record, dict) \
                and record.get('state') in ('up', 'resting') \
                and all(_number(record.get(k)) for k in ('since', 'at')) \
                and (record['state'] == 'up' or _number(record.get('until'))):
            record['why'] = str(record.get('why') or '')
            states[str(relay)] = record
    return states


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)
