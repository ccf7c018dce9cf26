"""The durable on-disk queue: a Maildir with claim, defer and fail areas.

Layout of a queue directory (all 0700, files 0600)::

    tmp/        messages of transactions that have voted, not yet committed
                (TIME.PID-TOKEN_BATCH_UNIQUE.HOST), and commit markers
    new/        committed messages waiting for delivery
    cur/        messages claimed by a sender: NAME,HOST,PID,TOKEN
    deferred/   messages waiting for a retry; the file's mtime is when
                the retry is due
    failed/     messages that failed for good, with their attempt history

A message file is an envelope block, a blank line, then the message::

    X-Mailout-From: sender@example.org
    X-Mailout-To: one@example.org
    X-Mailout-Attempt: 2026-11-25T09:00:00Z 451 try later

Every move between areas is one ``rename`` (a rewrite of the envelope is
written aside and renamed over the claimed file first), so a crash at any
point leaves each message in exactly one place; claims and unfinished
writes of dead processes are recovered.  Files written by zope.sendmail's
queued delivery (``X-Zope-From`` and ``X-Zope-To`` lines before the
message) are read too; its dot-files are ignored, as Maildir readers do.
"""
import dataclasses
import errno
import os
import socket
import threading
import time
import uuid

from mailout.interfaces import MailoutError
from mailout.message import normalise_line_endings

AREAS = ('tmp', 'new', 'cur', 'deferred', 'failed')
_HOST = (socket.gethostname() or 'localhost').replace(',', '_') \
    .replace('/', '_')
#: Claims by another host whose file was not touched for this long are
#: taken back: that host's processor is presumed dead.
CLAIM_LEASE = 600
#: Unfinished writes by another host are removed after this long (Maildir's
#: customary 36 hours).
TMP_LIFETIME = 36 * 3600


class QueueError(MailoutError, ValueError):
    """A queue file is unreadable or malformed."""


@dataclasses.dataclass
class QueuedMessage:
    name: str
    fromaddr: str
    toaddrs: tuple
    message: bytes
    attempts: tuple = ()    # "TIME REPLY" lines, oldest first

    @property
    def queued_at(self):
        """When the message entered the queue (seconds since the epoch), or
        None for a file not named by mailout."""
        return _queued_at(self.name)


class Queue:
    """One queue directory.  Use `Queue.open`: one object per directory and
    process, so that commits wake the processor waiting on it."""

    _open = {}
    _open_lock = threading.Lock()

    @classmethod
    def open(cls, path):
        path = os.path.realpath(path)
        with cls._open_lock:
            queue = cls._open.get(path)
            if queue is None:
                queue = cls._open[path] = cls(path)
            return queue

    def __init__(self, path):
        self.path = path
        for area in AREAS:
            os.makedirs(os.path.join(path, area), mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        self._arrived = threading.Condition()
        self._arrivals = 0
        self._token = uuid.uuid4().hex[:8]
        self._claims = set()        # claims held by this process, by name
        self._claims_lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    def __repr__(self):
        return f'<Queue {self.path}>'

    def _after_fork(self):
        self._arrived = threading.Condition()
        self._token = uuid.uuid4().hex[:8]
        self._claims = set()
        self._claims_lock = threading.Lock()

    @property
    def _writer(self):
        """This process, in the names of its tmp/ files: PID-TOKEN."""
        return f'{os.getpid()}-{self._token}'

    def _area(self, area, name=''):
        return os.path.join(self.path, area, name)

    # -- writing (used by the transaction's data manager) -------------------

    def write(self, envelope, batch=None):
        """Write a message into ``tmp/`` durably; return its name.  Messages
        of one transaction share a ``batch`` (see `commit`)."""
        unique = uuid.uuid4().hex[:12]
        name = f'{time.time_ns()}.{self._writer}_{batch or unique}_{unique}' \
               f'.{_HOST}'
        data = _envelope_block(envelope.fromaddr, envelope.toaddrs) \
            + b'\r\n' + envelope.message
        _write_durably(self._area('tmp', name), data)
        return name

    def commit(self, names):
        """Move written messages into ``new/``, all or none: a commit marker
        in ``tmp/`` tells recovery to finish the renames of a process that
        died among them.  One directory fsync for all.  Only renames can
        fail here, and they do not on a sane disk."""
        marker = None
        if len(names) > 1:
            marker = self._area('tmp', _commit_marker(names[0]))
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))
            _fsync_directory(self._area('tmp'))     # before any rename
        for name in names:
            os.rename(self._area('tmp', name), self._area('new', name))
        _fsync_directory(self._area('new'))
        if marker is not None:
            os.unlink(marker)
        self.wake()

    def discard(self, names):
        for name in names:
            _unlink(self._area('tmp', name))

    # -- waking the processor ------------------------------------------------

    def wake(self):
        with self._arrived:
            self._arrivals += 1
            self._arrived.notify_all()

    @property
    def arrivals(self):
        """A count of commits; pass it to `wait`."""
        return self._arrivals

    def wait(self, timeout, seen):
        """Wait until something arrived after ``seen`` (an earlier return
        value) or ``timeout`` passed; return the new arrival count."""
        with self._arrived:
            if self._arrivals == seen:
                self._arrived.wait(timeout)
            return self._arrivals

    # -- processing ----------------------------------------------------------

    def waiting(self):
        """Names in ``new/``, oldest first (dot-files are not messages)."""
        return sorted(name for name in os.listdir(self._area('new'))
                      if not name.startswith('.'))

    def claim(self, name):
        """Take ``new/NAME`` for this thread; None if another took it."""
        claimed = f'{name},{_HOST},{os.getpid()},{self._token}'
        with self._claims_lock:
            self._claims.add(claimed)
        try:
            os.rename(self._area('new', name), self._area('cur', claimed))
        except FileNotFoundError:
            with self._claims_lock:
                self._claims.discard(claimed)
            return None
        return claimed

    def read(self, claimed):
        with open(self._area('cur', claimed), 'rb') as f:
            data = f.read()
        return _parse(claimed.split(',', 1)[0], data)

    def done(self, claimed):
        """The message was delivered to every recipient: forget it."""
        os.unlink(self._area('cur', claimed))
        self._unclaim(claimed)

    def defer(self, claimed, toaddrs, attempt, until):
        """Keep ``toaddrs`` of the message for a retry at ``until``."""
        self._rewrite(claimed, toaddrs, attempt)
        # The time first: once in deferred/, a processor may promote it.
        os.utime(self._area('cur', claimed), (until, until))
        os.rename(self._area('cur', claimed),
                  self._area('deferred', claimed.split(',', 1)[0]))
        self._unclaim(claimed)

    def fail(self, claimed, toaddrs, attempt, keep_claim=False):
        """Move the message for ``toaddrs`` to ``failed/`` with its history.

        With ``keep_claim`` a copy goes to ``failed/`` and the claimed
        message stays (the other recipients are still to be handled)."""
        name = self._failed_name(claimed.split(',', 1)[0])
        if keep_claim:
            _write_durably(self._area('failed', name),
                           _with_history(self.read(claimed), toaddrs, attempt))
            return
        self._rewrite(claimed, toaddrs, attempt)
        os.rename(self._area('cur', claimed), self._area('failed', name))
        self._unclaim(claimed)

    def _failed_name(self, name):
        # Recipients of one message may fail on different attempts: each
        # failure keeps a record of its own (NAME, NAME+2, ...).  Only the
        # claim's holder fails a message, so checking first is safe.
        candidate, number = name, 1
        while os.path.lexists(self._area('failed', candidate)):
            number += 1
            candidate = f'{name}+{number}'
        return candidate

    def quarantine(self, claimed, reason):
        """Move an unreadable claimed file to ``failed/`` as it is, with
        ``NAME.reason`` beside it."""
        name = self._failed_name(claimed.split(',', 1)[0])
        with open(self._area('failed', name + '.reason'), 'w') as f:
            f.write(reason + '\n')
        os.rename(self._area('cur', claimed), self._area('failed', name))
        self._unclaim(claimed)

    def promote_due(self, now=None):
        """Move deferred messages whose time has come back to ``new/``."""
        now = time.time() if now is None else now
        moved = 0
        for entry in os.scandir(self._area('deferred')):
            try:
                if entry.stat().st_mtime <= now:
                    os.rename(entry.path, self._area('new', entry.name))
                    moved += 1
            except FileNotFoundError:       # another processor moved it
                pass
        return moved

    def recover(self, now=None):
        """Give claims of dead owners back to ``new/`` and remove their
        unfinished writes from ``tmp/``; return how many claims came back."""
        now = time.time() if now is None else now
        self._clean_tmp(now)
        recovered = 0
        for claimed in os.listdir(self._area('cur')):
            if self._owner_is_dead(claimed, now):
                try:
                    os.rename(self._area('cur', claimed),
                              self._area('new', claimed.split(',', 1)[0]))
                    recovered += 1
                except FileNotFoundError:
                    pass
        return recovered

    def _clean_tmp(self, now):
        # A dead writer's commit marker means its transaction committed:
        # finish moving that batch to new/.  Its other writes never
        # committed: remove them.  Which local writers are dead is decided
        # before tmp/ is listed: a writer known dead changes nothing any
        # more, so the listing shows its final state.  (A listing taken
        # while it lived could lack the marker it made just before dying.)
        dead = {parts[0] for parts in map(_tmp_name_parts,
                                          os.listdir(self._area('tmp')))
                if parts and parts[2] == _HOST
                and self._local_writer_is_dead(parts[0])}
        names = os.listdir(self._area('tmp'))
        committed = {}                  # (writer, batch) -> its marker
        for name in names:
            parts = _tmp_name_parts(name)
            if parts and name.endswith('.commit') and self._writer_is_dead(
                    parts, self._area('tmp', name), now, CLAIM_LEASE, dead):
                committed[parts[:2]] = name
        for name in names:
            path = self._area('tmp', name)
            if name.endswith('.rewrite'):
                if self._owner_is_dead(name[:-len('.rewrite')], now):
                    _unlink(path)
                continue
            parts = _tmp_name_parts(name)
            if parts is None or name.endswith('.commit'):
                continue
            if parts[:2] in committed:
                try:
                    os.rename(path, self._area('new', name))
                except FileNotFoundError:   # another process moved it
                    pass
            elif self._writer_is_dead(parts, path, now, TMP_LIFETIME, dead):
                _unlink(path)
        if committed:
            _fsync_directory(self._area('new'))
            for marker in committed.values():
                _unlink(self._area('tmp', marker))

    def _local_writer_is_dead(self, writer):
        pid, token = writer.split('-')
        if int(pid) == os.getpid():     # this pid, or a predecessor's
            return token != self._token
        return not _pid_alive(int(pid))

    @staticmethod
    def _writer_is_dead(parts, path, now, lifetime, dead):
        writer, _, host = parts
        if host != _HOST:
            return now - _mtime(path, now) > lifetime
        return writer in dead

    def _owner_is_dead(self, claimed, now):
        try:
            _, host, pid, token = claimed.split(',')
            pid = int(pid)
        except ValueError:
            return True             # not a claim of ours: take it
        if host != _HOST:
            # The rename that claimed (or rewrote) it set the file's ctime.
            return now - _ctime(self._area('cur', claimed), now) > CLAIM_LEASE
        if pid == os.getpid():
            with self._claims_lock:
                return token != self._token or claimed not in self._claims
        return not _pid_alive(pid)

    def _unclaim(self, claimed):
        with self._claims_lock:
            self._claims.discard(claimed)

    def read_failed(self, name):
        with open(self._area('failed', name), 'rb') as f:
            return _parse(name, f.read())

    def _rewrite(self, claimed, toaddrs, attempt):
        # Replace the claimed file in place (write aside, rename over), so a
        # crash leaves either the old or the new version, never both.
        aside = self._area('tmp', f'{claimed}.rewrite')
        _write_durably(aside,
                       _with_history(self.read(claimed), toaddrs, attempt))
        os.rename(aside, self._area('cur', claimed))

    def count(self, area):
        return sum(not name.startswith('.')
                   for name in os.listdir(self._area(area)))

    # -- inspection and repair (the mailout command) -------------------------

    def entries(self, area):
        """An `Entry` for each message in ``area``, oldest first.  Reads only
        the envelope block; an unreadable file is an entry with ``error``."""
        result = []
        for filename in os.listdir(self._area(area)):
            if filename.startswith('.') or \
                    area == 'failed' and filename.endswith('.reason'):
                continue
            entry = self._entry(area, filename)
            if entry is not None:
                result.append(entry)
        result.sort(key=lambda e: (e.queued_at or e.mtime, e.name))
        return result

    def _entry(self, area, filename, whole=False):
        path = self._area(area, filename)
        try:
            with open(path, 'rb') as f:
                stat = os.fstat(f.fileno())
                data = f.read() if whole else _read_head(f)
        except FileNotFoundError:       # moved on meanwhile
            return None
        entry = Entry(filename.split(',', 1)[0], area, filename,
                      stat.st_mtime, stat.st_size)
        try:
            message = _parse(entry.name, data)
        except ValueError as e:         # QueueError, UnicodeDecodeError
            entry.error = str(e)
        else:
            entry.fromaddr, entry.toaddrs = message.fromaddr, message.toaddrs
            entry.attempts = message.attempts
            entry.message = message.message if whole else None
        if area == 'failed':
            try:
                with open(self._area('failed', filename + '.reason'),
                          encoding='utf-8', errors='replace') as f:
                    entry.error = f.read().strip()
            except FileNotFoundError:
                pass
        return entry

    def locate(self, name):
        """The entries (each with its whole message) of the message ``name``
        in ``new/``, ``cur/``, ``deferred/`` and ``failed/``; a message
        partly delivered and partly failed is in two of them."""
        found = []
        for area in AREAS[1:]:
            for filename in os.listdir(self._area(area)):
                if filename.split(',', 1)[0] == name \
                        and not filename.endswith('.reason'):
                    entry = self._entry(area, filename, whole=True)
                    if entry is not None:
                        found.append(entry)
        return found

    def status(self, now=None):
        """Counts per area, the age of the oldest message not yet settled
        (new, cur, deferred), the next retry, and the newest attempt line
        of the deferred and failed messages."""
        now = time.time() if now is None else now
        deferred, failed = self.entries('deferred'), self.entries('failed')
        # A deferred file's mtime is its next attempt, not its age.
        pending = [e.queued_at for e in deferred if e.queued_at]
        for area in ('new', 'cur'):
            for filename in os.listdir(self._area(area)):
                if filename.startswith('.'):
                    continue
                pending.append(_queued_at(filename.split(',', 1)[0])
                               or _mtime(self._area(area, filename), now))
        attempts = [(a, e.mtime) for e in deferred + failed
                    for a in e.attempts[-1:]]
        return {
            'waiting': self.count('new'),
            'in_progress': self.count('cur'),
            'deferred': len(deferred),
            'failed': len(failed),
            'oldest_age': max(now - min(pending), 0) if pending else None,
            'next_attempt': min((e.mtime for e in deferred), default=None),
            'last_error': max(attempts, key=lambda a: (a[0][:20], a[1]))[0]
            if attempts else None,
        }

    def retry(self, name, area=None):
        """Move ``name`` from ``failed/`` or ``deferred/`` (``area``, if
        it is in both) back to ``new/`` to be tried at once; return the
        area it came from and its name in ``new/``.  That name is ``name``
        unless another part of the message (a partial failure) is still in
        the queue, which a later move could overwrite: then it is
        ``NAME.rHEX``, keeping the time it was queued."""
        areas = [e.area for e in self.locate(name)]
        movable = [a for a in ('failed', 'deferred')
                   if a in areas and area in (None, a)]
        if not movable:
            raise QueueError(f'{name} is not in {area or "failed"}/'
                             + ('' if area else ' or deferred/')
                             + (f' (it is in {", ".join(areas)}/)'
                                if areas else ''))
        if len(movable) > 1:
            raise QueueError(f'{name} is in failed/ and deferred/: say which '
                             'one to retry')
        area = movable[0]
        target = name if len(areas) == 1 else f'{name}.r{uuid.uuid4().hex[:6]}'
        try:
            os.rename(self._area(area, name), self._area('new', target))
        except FileNotFoundError:
            if area == 'deferred' and os.path.exists(self._area('new', name)):
                return area, name   # a processor promoted it meanwhile
            raise QueueError(f'{name} left {area}/ meanwhile') from None
        if area == 'failed':
            _unlink(self._area('failed', name + '.reason'))
        _fsync_directory(self._area('new'))
        self.wake()
        return area, target

    def purge(self, area, name):
        """Delete ``name`` from ``area`` (new, deferred or failed) for good.
        """
        if area not in ('new', 'deferred', 'failed'):
            raise QueueError(f'cannot purge from {area}/: the message is '
                             'being delivered')
        try:
            os.unlink(self._area(area, name))
        except FileNotFoundError:
            raise QueueError(f'{name} left {area}/ meanwhile') from None
        if area == 'failed':
            _unlink(self._area('failed', name + '.reason'))


@dataclasses.dataclass
class Entry:
    """What `Queue.entries` and `Queue.locate` tell about one queue file."""
    name: str               # the message's name (its ID in the queue)
    area: str
    filename: str           # in cur/: NAME,HOST,PID,TOKEN
    mtime: float            # in deferred/: when it is tried next
    size: int
    fromaddr: str = None
    toaddrs: tuple = ()
    attempts: tuple = ()
    error: str = None       # unreadable, or why it was quarantined
    message: bytes = None   # only from `Queue.locate`

    @property
    def queued_at(self):
        return _queued_at(self.name)


def _queued_at(name):
    # Our names start with time.time_ns() (19 digits); zope.sendmail's with
    # seconds.
    stamp = name.split('.', 1)[0]
    return int(stamp) / 1e9 if len(stamp) >= 19 and stamp.isdigit() else None


def _read_head(f, chunk=8192, limit=1024 * 1024):
    """The start of a queue file, up to and including its envelope block."""
    data = b''
    while len(data) < limit:
        more = f.read(chunk)
        data += more
        if not more or b'\r\n\r\n' in data \
                or (data.startswith(b'X-Zope-From:') and data.count(b'\n') >= 2):
            break
    return data


def _reset_after_fork():
    Queue._open_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _with_history(message, toaddrs, attempt):
    """A queue file for ``message`` to ``toaddrs``, with one more attempt."""
    return _envelope_block(message.fromaddr, toaddrs,
                           message.attempts + (attempt,)) \
        + b'\r\n' + message.message


def _envelope_block(fromaddr, toaddrs, attempts=()):
    lines = [f'X-Mailout-From: {fromaddr}']
    lines += [f'X-Mailout-To: {to}' for to in toaddrs]
    lines += [f'X-Mailout-Attempt: {attempt}' for attempt in attempts]
    return ''.join(line + '\r\n' for line in lines).encode('utf-8')


def _parse(name, data):
    if data.startswith(b'X-Zope-From:'):
        return _parse_zope_sendmail(name, data)
    envelope, sep, message = data.partition(b'\r\n\r\n')
    if not sep:
        raise QueueError(f'queue file {name} has no envelope block')
    fromaddr, toaddrs, attempts = None, [], []
    for line in envelope.decode('utf-8').split('\r\n'):
        key, _, value = line.partition(': ')
        if key == 'X-Mailout-From':
            fromaddr = value
        elif key == 'X-Mailout-To':
            toaddrs.append(value)
        elif key == 'X-Mailout-Attempt':
            attempts.append(value)
        else:
            raise QueueError(f'queue file {name}: unknown line {line!r}')
    if fromaddr is None or not toaddrs:
        raise QueueError(f'queue file {name} lacks sender or recipients')
    return QueuedMessage(name, fromaddr, tuple(toaddrs), message,
                         tuple(attempts))


def _parse_zope_sendmail(name, data):
    # zope.sendmail: "X-Zope-From: a\nX-Zope-To: b, c\n" then the message.
    from_line, to_line, message = data.split(b'\n', 2)
    message = normalise_line_endings(message)
    fromaddr = from_line.split(b':', 1)[1].strip().decode('utf-8')
    toaddrs = tuple(a.strip() for a in
                    to_line.split(b':', 1)[1].decode('utf-8').split(',')
                    if a.strip())
    return QueuedMessage(name, fromaddr, toaddrs, message)


def _write_durably(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name_parts(name):
    """``(writer, batch, host)`` of a message or commit marker in tmp/
    (the writer is PID-TOKEN); None for anything else."""
    try:
        if name.endswith('.commit'):
            writer_batch, host = name[:-len('.commit')].split('.', 1)
            writer, batch = writer_batch.split('_')
        else:
            _, rest, host = name.split('.', 2)
            writer, batch, _ = rest.split('_')
        int(writer.split('-')[0])
        writer.split('-')[1]
    except (ValueError, IndexError):
        return None
    return writer, batch, host


def _commit_marker(name):
    """The commit marker of the batch of message ``name``."""
    writer, batch, host = _tmp_name_parts(name)
    return f'{writer}_{batch}.{host}.commit'


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _ctime(path, default):
    try:
        return os.stat(path).st_ctime
    except FileNotFoundError:
        return default


def _mtime(path, default):
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return default


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True
