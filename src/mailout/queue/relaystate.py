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
"""
import json
import logging
import math
import os
import threading
import time
import uuid
from typing import Any
from typing import Optional

from mailout.queue import files
from mailout.queue.files import QueueError

log = logging.getLogger('mailout.queue')

#: The file's name in the queue directory.
FILENAME = 'relays.json'

Record = dict[str, Any]


class RelayStates:
    """The relay records of the queue directory ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, FILENAME)
        self._cached: tuple[Optional[tuple], dict[str, Record]] = (None, {})
        self._lock = threading.Lock()
        self._complained = False
        os.register_at_fork(after_in_child=self._after_fork)

    def __repr__(self) -> str:
        return f'<RelayStates {self.path}>'

    def _after_fork(self):
        self._lock = threading.Lock()

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
