"""The durable on-disk queue: a Maildir with claim, defer and fail areas.

Layout of a queue directory (all 0700, files 0600)::

    tmp/        messages of transactions that have voted, not yet committed
                (TIME.PID-TOKEN_BATCH_UNIQUE.HOST), and the commit markers
                of their batches (PID-TOKEN_BATCH.HOST.prepared at the
                vote, renamed to .commit at the commit)
    new/        committed messages waiting for delivery
    cur/        messages claimed by a sender thread: NAME,HOST,PID,TOKEN-N
    deferred/   messages waiting for a retry; the file's mtime is when
                the retry is due
    failed/     messages that failed for good, with their attempt history

A message file is an envelope block, a blank line, then the message::

    X-Mailout-From: sender@example.org
    X-Mailout-To: one@example.org
    X-Mailout-Attempt: 2026-11-25T09:00:00Z 451 try later

(``X-Mailout-Ok:`` instead of ``X-Mailout-To:`` marks a recipient already
settled, written in place when the outcome could not be recorded.)

Every move between areas is one ``rename`` (a rewrite of the envelope is
written aside and renamed over the claimed file first), so a crash at any
point leaves each message in exactly one place; claims and unfinished
writes of dead processes are recovered.  Queue files are opened without
following links or blocking, and only regular files are read; anything
else is quarantined in ``failed/`` with a reason.  Files written by zope.sendmail's
queued delivery (``X-Zope-From`` and ``X-Zope-To`` lines before the
message) are read too; its dot-files are ignored, as Maildir readers do.
"""
import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import socket
import stat
import threading
import time
import uuid

from mailout.interfaces import MailoutError
from mailout.message import normalise_line_endings
from mailout.message import printable

log = logging.getLogger(__name__)

AREAS = ('tmp', 'new', 'cur', 'deferred', 'failed')
def _host_id():
    """This host in queue file names: its name and, where /proc tells, its
    pid namespace, so that containers sharing a host name (host network)
    never take each other's pids for their own."""
    host = socket.gethostname() or 'localhost'
    try:
        namespace = os.readlink('/proc/self/ns/pid')   # pid:[4026531836]
    except OSError:
        namespace = ''
    if namespace:
        host += '~' + ''.join(c for c in namespace if c.isdigit())
    return host.replace(',', '_').replace('/', '_')


_HOST = _host_id()
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
    process, so that commits wake the processor waiting on it.

    Every area must be a directory of this user's, not a link; missing
    areas are created (0700) and existing ones set to 0700.  A queue opened
    with ``writable=False`` (inspection) only reads: it creates and changes
    nothing and accepts areas of another owner."""

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

    def __init__(self, path, writable=True):
        self.path = os.path.realpath(path)
        self.writable = writable
        self._check_areas(announce=False)
        self._arrived = threading.Condition()
        self._arrivals = 0
        self._token = uuid.uuid4().hex[:8]
        self._claim_numbers = itertools.count()
        self._claims = set()        # claims held by this process, by name
        self._claims_lock = threading.Lock()
        self._unfinished = []       # committed batches still in tmp/
        self._unreleased = {}       # claim -> (settled, until), see release
        self._reported = set()      # names logged once
        os.register_at_fork(after_in_child=self._after_fork)

    def __repr__(self):
        return f'<Queue {self.path}>'

    def _after_fork(self):
        self._arrived = threading.Condition()
        self._token = uuid.uuid4().hex[:8]
        self._claims = set()
        self._claims_lock = threading.Lock()
        self._unfinished = []
        self._unreleased = {}

    @property
    def _writer(self):
        """This process, in the names of its tmp/ files: PID-TOKEN."""
        return f'{os.getpid()}-{self._token}'

    def _area(self, area, name=None):
        # No trailing slash for an area: it would make lstat follow a link.
        return os.path.join(self.path, area, *filter(None, [name]))

    def _check_areas(self, announce=True):
        """Refuse areas that are links, not directories or (writable) of
        another owner; create missing ones and set modes (writable)."""
        for area in ('',) + AREAS:
            path = self._area(area) if area else self.path
            try:
                mode = os.lstat(path)
            except FileNotFoundError:
                if not self.writable:
                    continue
                os.makedirs(path, 0o700, exist_ok=True)
                if announce:
                    log.warning('%r: %s was missing (removed under a running '
                                'process?): created it again', self, path)
                mode = os.lstat(path)
            if stat.S_ISLNK(mode.st_mode):
                raise QueueError(f'{path} is a symbolic link: refusing to '
                                 'use it as a queue area')
            if not stat.S_ISDIR(mode.st_mode):
                raise QueueError(f'{path} is not a directory')
            if not self.writable:
                continue
            if mode.st_uid != os.geteuid():
                raise QueueError(
                    f'{path} belongs to uid {mode.st_uid}, not to this user '
                    f'(uid {os.geteuid()}): run mailout as the queue\'s owner')
            if stat.S_IMODE(mode.st_mode) != 0o700:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY
                             | os.O_NOFOLLOW)
                try:
                    os.fchmod(fd, 0o700)
                finally:
                    os.close(fd)
                if announce:
                    log.warning('%r: %s had mode %o: set to 700', self, path,
                                stat.S_IMODE(mode.st_mode))

    def _listdir(self, area):
        """The names in ``area``, without dot-files (not messages, as in
        Maildir); none if the area is missing."""
        try:
            return [n for n in os.listdir(self._area(area))
                    if not n.startswith('.')]
        except FileNotFoundError:
            return []

    def _report_once(self, name, what):
        """Log ``what`` about the entry ``name`` once in this process's
        life; ``{}`` in ``what`` stands for the name, escaped."""
        if name not in self._reported:
            self._reported.add(name)
            log.warning('%r: %s', self, what.format(printable(name)))

    # -- writing (used by the transaction's data manager) -------------------

    def write(self, envelope, batch=None):
        """Write a message into ``tmp/`` durably; return its name.  Messages
        of one transaction share a ``batch`` (see `commit`)."""
        unique = uuid.uuid4().hex[:12]
        name = f'{time.time_ns()}.{self._writer}_{batch or unique}_{unique}' \
               f'.{_HOST}'
        data = _envelope_block(envelope.fromaddr, envelope.toaddrs) \
            + b'\r\n' + envelope.message
        try:
            _write_durably(self._area('tmp', name), data)
        except FileNotFoundError:       # tmp/ was removed under us
            self._check_areas()
            _write_durably(self._area('tmp', name), data)
        return name

    def prepare(self, names):
        """Make the commit marker of a batch written with `write` (at the
        vote), so that `commit` needs no new file: it renames it."""
        if len(names) > 1:
            _write_durably(self._area('tmp', _marker(names[0], '.prepared')),
                           b'')

    def commit(self, names):
        """Move written messages into ``new/``, all or none: from the
        renamed commit marker on, the batch is committed, and whoever sees
        the marker (recovery too) finishes the renames.  One directory
        fsync for all.  Never raises: if a rename fails (``new/`` removed
        or not writable), the batch stays committed in ``tmp/``, is logged
        loudly and moved by the next `recover`.  True if all went well."""
        marker = None
        try:
            if len(names) > 1:
                marker = self._area('tmp', _marker(names[0], '.commit'))
                try:
                    os.rename(self._area('tmp', _marker(names[0],
                                                        '.prepared')), marker)
                except FileNotFoundError:   # not prepared, or done already
                    if not os.path.lexists(marker):
                        _write_durably(marker, b'')
                _fsync_directory(self._area('tmp'))     # before any rename
            self._move_to_new(names)
        except OSError as e:
            log.critical('%r: %d committed message(s) could not be moved into '
                         'new/ (%s); they stay in tmp/ and are moved there when '
                         'the queue recovers', self, len(names), e)
            self._keep_unfinished(names, marker)
            return False
        if marker is not None:
            _unlink(marker)
        self.wake()
        return True

    def _move_to_new(self, names):
        for name in names:
            try:
                os.rename(self._area('tmp', name), self._area('new', name))
            except FileNotFoundError:
                if os.path.lexists(self._area('tmp', name)):
                    raise               # new/ is missing
                # recovery finished this batch meanwhile
        _fsync_directory(self._area('new'))

    def _keep_unfinished(self, names, marker):
        # The marker lets a restarted process finish the batch; it may be
        # impossible to make now (no space): then only this process knows.
        if marker is None:
            try:
                _write_durably(self._area('tmp', _marker(names[0], '.commit')),
                               b'')
                _fsync_directory(self._area('tmp'))
            except OSError:
                pass
        with self._claims_lock:
            self._unfinished.append(list(names))

    def _finish_unfinished(self):
        """Commit again the batches whose renames failed in this process
        (those with a marker in tmp/ are finished by `_clean_tmp` too)."""
        with self._claims_lock:
            batches, self._unfinished = self._unfinished, []
        for names in batches:
            if self.commit(names):
                log.warning('%r: %d committed message(s) moved into new/ '
                            'after all', self, len(names))

    def discard(self, names):
        for name in names:
            _unlink(self._area('tmp', name))
        if names:
            _unlink(self._area('tmp', _marker(names[0], '.prepared')))

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
        """Names in ``new/``, oldest first."""
        return sorted(self._listdir('new'))

    def claim(self, name):
        """Take ``new/NAME`` for the calling thread; None if another took
        it.  Each claim has a name of its own (NAME,HOST,PID,TOKEN-N), so
        two threads racing for one file never share a claim."""
        claimed = f'{name},{_HOST},{os.getpid()},' \
                  f'{self._token}-{next(self._claim_numbers)}'
        with self._claims_lock:
            self._claims.add(claimed)
        try:
            os.rename(self._area('new', name), self._area('cur', claimed))
        except FileNotFoundError:
            self.forget(claimed)
            return None
        except OSError:
            self.forget(claimed)
            raise
        return claimed

    def read(self, claimed):
        """The claimed message; `QueueError` for anything but a readable
        regular file."""
        return _parse(_claim_parts(claimed)[0],
                      _read_regular(self._area('cur', claimed)))

    def done(self, claimed):
        """The message was delivered to every recipient: forget it."""
        os.unlink(self._area('cur', claimed))
        self.forget(claimed)

    def defer(self, claimed, toaddrs, attempt, until):
        """Keep ``toaddrs`` of the message for a retry at ``until``."""
        self._rewrite(claimed, toaddrs, attempt)
        # The time first: once in deferred/, a processor may promote it.
        os.utime(self._area('cur', claimed), (until, until),
                 follow_symlinks=False)
        os.rename(self._area('cur', claimed),
                  self._area('deferred', _claim_parts(claimed)[0]))
        self.forget(claimed)

    def fail(self, claimed, toaddrs, attempt, keep_claim=False):
        """Move the message for ``toaddrs`` to ``failed/`` with its history.

        With ``keep_claim`` a copy goes to ``failed/`` and the claimed
        message stays (the other recipients are still to be handled)."""
        if keep_claim:
            data = _with_history(self.read(claimed), toaddrs, attempt)
            self._add_failed(claimed, lambda path: _write_durably(path, data))
            return
        self._rewrite(claimed, toaddrs, attempt)
        self._add_failed(claimed, lambda path: os.rename(
            self._area('cur', claimed), path))
        self.forget(claimed)

    def quarantine(self, claimed, reason):
        """Move an unreadable claimed entry to ``failed/`` as it is, with
        ``NAME.reason`` beside it."""
        def move(path):
            _write_durably(path + '.reason', (reason + '\n').encode())
            try:
                os.rename(self._area('cur', claimed), path)
            except OSError:
                _unlink(path + '.reason')
                raise
        self._add_failed(claimed, move)
        self.forget(claimed)

    def _add_failed(self, claimed, create):
        # Recipients of one message may fail on different attempts: each
        # failure keeps a record of its own (NAME, NAME+2, ...).  Only the
        # claim's holder fails a message; a name taken meanwhile (or a
        # planted NAME.reason) moves on to the next number.
        name = _claim_parts(claimed)[0]
        for number in itertools.count(1):
            path = self._area('failed', name if number == 1
                              else f'{name}+{number}')
            if os.path.lexists(path) or os.path.lexists(path + '.reason'):
                continue
            try:
                return create(path)
            except FileExistsError:
                continue

    def release(self, claimed, settled, until):
        """Give back a claim whose outcome could not be recorded (no space,
        an area removed or read-only): the recipients in ``settled`` are
        marked done in the file itself (an overwrite in place needs no new
        space), then the message goes to ``deferred/`` until ``until`` (or,
        failing that, to ``new/``), to be tried again once the fault clears
        -- never again for those recipients.  If even the mark cannot be
        written, this process keeps the claim and tries again at each
        `recover`: no other may send it to them again."""
        path = self._area('cur', claimed)
        name = _claim_parts(claimed)[0]
        _unlink(self._area('tmp', claimed + '.rewrite'))
        try:
            if settled and not _mark_settled(path, settled):
                log.error('%r: %s is in zope.sendmail\'s format: cannot mark '
                          '%s as done; they may get a second copy', self,
                          printable(name), printable(', '.join(settled)))
        except FileNotFoundError:
            self.forget(claimed)
            return
        except OSError as e:
            log.error('%r: cannot mark %s as sent to %s (%s): keeping it '
                      'claimed until it can be', self, printable(name),
                      printable(', '.join(settled)), e)
            with self._claims_lock:
                self._unreleased[claimed] = (settled, until)
            return
        try:
            os.utime(path, (until, until), follow_symlinks=False)
            os.rename(path, self._area('deferred', name))
        except OSError:
            try:
                os.rename(path, self._area('new', name))
            except OSError:
                pass        # recovery gives it back once it can
        with self._claims_lock:
            self._unreleased.pop(claimed, None)
        self.forget(claimed)

    def _release_kept(self):
        with self._claims_lock:
            kept = list(self._unreleased.items())
        for claimed, (settled, until) in kept:
            self.release(claimed, settled, until)

    def promote_due(self, now=None, horizon=None):
        """Move deferred messages whose time has come back to ``new/``.  A
        retry time more than ``horizon`` seconds ahead (the longest backoff)
        means the clock stepped back: that message is due now."""
        now = time.time() if now is None else now
        moved = 0
        for name in self._listdir('deferred'):
            path = self._area('deferred', name)
            due = _mtime(path, now)
            if due <= now or horizon is not None and due > now + horizon:
                with self._entry_errors(name):
                    try:
                        os.rename(path, self._area('new', name))
                        moved += 1
                    except FileNotFoundError:   # another processor moved it
                        pass
        return moved

    def recover(self, now=None):
        """Create missing areas, finish committed batches, give claims of
        dead owners back to ``new/`` and remove their unfinished writes
        from ``tmp/``; return how many claims came back.  A name that is
        not mailout's is left alone, and an entry that cannot be handled
        is skipped; each is logged once."""
        now = time.time() if now is None else now
        if self.writable:
            self._check_areas()
        self._finish_unfinished()
        self._release_kept()
        self._clean_tmp(now)
        recovered = 0
        for claimed in self._listdir('cur'):
            if _claim_parts(claimed) is None:
                self._report_once(claimed, "cur/{} is not a claim of "
                                  "mailout's: left alone")
                continue
            with self._entry_errors(claimed):
                if self._owner_is_dead(claimed, now):
                    try:
                        os.rename(self._area('cur', claimed),
                                  self._area('new',
                                             _claim_parts(claimed)[0]))
                        recovered += 1
                    except FileNotFoundError:
                        pass
        return recovered

    @contextlib.contextmanager
    def _entry_errors(self, name):
        # No single entry may stop the queue: log it once and go on.
        try:
            yield
        except OSError as e:
            if name not in self._reported:
                self._reported.add(name)
                log.warning('%r: skipped %s: %s', self, printable(name),
                            printable(str(e)))

    def _clean_tmp(self, now):
        # A commit marker means its transaction committed: finish moving
        # that batch to new/, whoever wrote it.  Writes of a dead writer
        # without one never committed: remove them.  Which local writers
        # are dead is decided before tmp/ is listed: a writer known dead
        # changes nothing any more, so the listing shows its final state.
        # (A listing taken while it lived could lack the marker it made
        # just before dying.)
        dead = {parts[0] for parts in map(_tmp_name_parts,
                                          self._listdir('tmp'))
                if parts and parts[2] == _HOST
                and self._local_writer_is_dead(parts[0])}
        names = self._listdir('tmp')
        committed = {}                  # (writer, batch) -> its marker
        for name in names:
            parts = _tmp_name_parts(name)
            if parts and name.endswith('.commit'):
                committed[parts[:2]] = name
        unfinished = set()              # batches with a file left behind
        for name in names:
            path = self._area('tmp', name)
            parts = _tmp_name_parts(name)
            if name.endswith('.rewrite'):
                if _claim_parts(name[:-len('.rewrite')]) is None:
                    self._report_once(name, "tmp/{} is not mailout's: left "
                                      "alone")
                elif self._owner_is_dead(name[:-len('.rewrite')], now):
                    with self._entry_errors(name):
                        _unlink(path)
            elif parts is None:
                self._report_once(name, "tmp/{} is not mailout's: left alone")
            elif name.endswith('.commit'):
                pass
            elif parts[:2] in committed:
                with self._entry_errors(name):
                    try:
                        os.rename(path, self._area('new', name))
                    except FileNotFoundError:
                        pass            # another process moved it
                if os.path.lexists(path):
                    unfinished.add(parts[:2])
            elif self._writer_is_dead(parts, path, now, TMP_LIFETIME, dead):
                with self._entry_errors(name):
                    _unlink(path)
        if committed:
            _fsync_directory(self._area('new'))
            for batch, marker in committed.items():
                if batch not in unfinished:
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
        _, host, pid, token = _claim_parts(claimed)
        if host != _HOST:
            # The rename that claimed (or rewrote) it set the file's ctime.
            return now - _ctime(self._area('cur', claimed), now) > CLAIM_LEASE
        if pid == os.getpid():
            with self._claims_lock:
                return token.split('-')[0] != self._token \
                    or claimed not in self._claims
        return not _pid_alive(pid)

    def forget(self, claimed):
        """Drop this process's record of a claim (settled, or its file is
        gone)."""
        with self._claims_lock:
            self._claims.discard(claimed)

    def read_failed(self, name):
        return _parse(name, _read_regular(self._area('failed', name)))

    def _rewrite(self, claimed, toaddrs, attempt):
        # Replace the claimed file in place (write aside, rename over), so a
        # crash leaves either the old or the new version, never both.
        aside = self._area('tmp', f'{claimed}.rewrite')
        _write_durably(aside,
                       _with_history(self.read(claimed), toaddrs, attempt))
        try:
            os.rename(aside, self._area('cur', claimed))
        except OSError:
            _unlink(aside)
            raise

    def count(self, area):
        return len(self._listdir(area))

    # -- inspection and repair (the mailout command) -------------------------

    def entries(self, area):
        """An `Entry` for each message in ``area``, oldest first.  Reads only
        the envelope block; an unreadable file is an entry with ``error``."""
        result = []
        for filename in self._listdir(area):
            if area == 'failed' and filename.endswith('.reason'):
                continue
            entry = self._entry(area, filename)
            if entry is not None:
                result.append(entry)
        result.sort(key=lambda e: (e.queued_at or e.mtime, e.name))
        return result

    def _entry(self, area, filename, whole=False):
        path = self._area(area, filename)
        try:
            mode = os.lstat(path)
        except FileNotFoundError:       # moved on meanwhile
            return None
        entry = Entry(_name_of(area, filename), area, filename,
                      mode.st_mtime, mode.st_size)
        claim = _claim_parts(filename) if area == 'cur' else None
        if claim:
            entry.claimed_by = claim[1:3]
        try:
            data = _read_regular(path, None if whole else _read_head)
            message = _parse(entry.name, data)
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:  # QueueError, UnicodeDecodeError
            entry.error = str(e)
        else:
            entry.fromaddr, entry.toaddrs = message.fromaddr, message.toaddrs
            entry.attempts = message.attempts
            entry.message = message.message if whole else None
        if area == 'failed':
            try:
                entry.error = _read_regular(
                    path + '.reason').decode('utf-8', 'replace').strip()
            except (OSError, QueueError):
                pass
        return entry

    def message_names(self):
        """The names of the messages in ``new/``, ``cur/``, ``deferred/``
        and ``failed/``."""
        return {_name_of(area, filename) for area in AREAS[1:]
                for filename in self._listdir(area)
                if not filename.endswith('.reason')}

    def locate(self, name):
        """The entries (each with its whole message) of the message ``name``
        in ``new/``, ``cur/``, ``deferred/`` and ``failed/``; a message
        partly delivered and partly failed is in two of them."""
        found = []
        for area in AREAS[1:]:
            for filename in self._listdir(area):
                if _name_of(area, filename) == name \
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
            for filename in self._listdir(area):
                pending.append(_queued_at(_name_of(area, filename))
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


def area_problems(path):
    """What is wrong with the queue directory ``path`` (for `mailout
    check`), without changing anything: a missing, linked, foreign, not
    writable or not 0700 area.  A queue that does not exist yet is fine
    if it can be created."""
    if not os.path.lexists(path):
        parent = os.path.dirname(path)
        return [] if os.access(parent, os.W_OK | os.X_OK) else \
            [f'{path} does not exist, and {parent} is not writable']
    problems = []
    for area in ('',) + AREAS:
        directory = os.path.join(path, area) if area else path
        try:
            mode = os.lstat(directory)
        except FileNotFoundError:
            problems.append(f'{directory} is missing')
            continue
        if stat.S_ISLNK(mode.st_mode) or not stat.S_ISDIR(mode.st_mode):
            problems.append(f'{directory} is not a directory (a link?)')
        elif mode.st_uid != os.geteuid():
            problems.append(f'{directory} belongs to uid {mode.st_uid}, not '
                            f'to this user (uid {os.geteuid()})')
        elif not os.access(directory, os.W_OK | os.X_OK):
            problems.append(f'{directory} is not writable by this user')
        elif stat.S_IMODE(mode.st_mode) != 0o700:
            problems.append(f'{directory} has mode '
                            f'{stat.S_IMODE(mode.st_mode):o}, not 700')
    return problems


@dataclasses.dataclass
class Entry:
    """What `Queue.entries` and `Queue.locate` tell about one queue file."""
    name: str               # the message's name (its ID in the queue)
    area: str
    filename: str           # in cur/: NAME,HOST,PID,TOKEN-N
    mtime: float            # in deferred/: when it is tried next
    size: int
    fromaddr: str = None
    toaddrs: tuple = ()
    attempts: tuple = ()
    error: str = None       # unreadable, or why it was quarantined
    message: bytes = None   # only from `Queue.locate`
    claimed_by: tuple = None    # in cur/: (host, pid)

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


#: A recipient line overwritten in place by `Queue.release` (same length):
#: the recipient is settled, not to be sent to again.
_TO, _SETTLED = b'X-Mailout-To: ', b'X-Mailout-Ok: '


def _parse(name, data):
    if data.startswith(b'X-Zope-From:'):
        return _parse_zope_sendmail(name, data)
    envelope, sep, message = data.partition(b'\r\n\r\n')
    if not sep:
        raise QueueError(f'queue file {name} has no envelope block')
    fromaddr, toaddrs, attempts, settled = None, [], [], 0
    for line in envelope.decode('utf-8').split('\r\n'):
        key, _, value = line.partition(': ')
        if key == 'X-Mailout-From':
            fromaddr = value
        elif key == 'X-Mailout-To':
            toaddrs.append(value)
        elif key == 'X-Mailout-Ok':
            settled += 1
        elif key == 'X-Mailout-Attempt':
            attempts.append(value)
        else:
            raise QueueError(f'queue file {name}: unknown line {line!r}')
    if fromaddr is None or not toaddrs and not settled:
        raise QueueError(f'queue file {name} lacks sender or recipients')
    return QueuedMessage(name, fromaddr, tuple(toaddrs), message,
                         tuple(attempts))


def _parse_zope_sendmail(name, data):
    # zope.sendmail: "X-Zope-From: a\nX-Zope-To: b, c\n" then the message.
    lines = data.split(b'\n', 2)
    if len(lines) < 3 or not lines[1].startswith(b'X-Zope-To:'):
        raise QueueError(f'zope.sendmail queue file {name} has no '
                         'X-Zope-To line')
    from_line, to_line, message = lines
    fromaddr = from_line.split(b':', 1)[1].strip().decode('utf-8')
    toaddrs = tuple(a.strip() for a in
                    to_line.split(b':', 1)[1].decode('utf-8').split(',')
                    if a.strip())
    if not fromaddr or not toaddrs:
        raise QueueError(f'zope.sendmail queue file {name} lacks sender or '
                         'recipients')
    return QueuedMessage(name, fromaddr, toaddrs,
                         normalise_line_endings(message))


def _mark_settled(path, addresses):
    """Overwrite the recipient lines of ``addresses`` in place (no new
    space needed); False for a file in zope.sendmail's format."""
    fd = _open_regular(path, os.O_RDWR)
    try:
        with os.fdopen(os.dup(fd), 'rb') as f:
            head = f.read()
        if head.startswith(b'X-Zope-From:'):
            return False
        lines = set(_TO + a.encode('utf-8') + b'\r\n' for a in addresses)
        offset = 0
        for line in head.split(b'\r\n\r\n', 1)[0].split(b'\r\n'):
            if line + b'\r\n' in lines:
                os.pwrite(fd, _SETTLED, offset)
            offset += len(line) + 2
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def _open_regular(path, flags=os.O_RDONLY):
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


def _read_regular(path, read=None):
    """The bytes of a regular queue file (or what ``read(f)`` returns)."""
    with os.fdopen(_open_regular(path), 'rb') as f:
        return read(f) if read else f.read()


def _write_durably(path, data):
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
        _unlink(path)
        raise
    os.close(fd)


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name_parts(name):
    """``(writer, batch, host)`` of a message or marker in tmp/ (the writer
    is PID-TOKEN); None for anything else."""
    try:
        for suffix in ('.commit', '.prepared'):
            if name.endswith(suffix):
                writer_batch, host = name[:-len(suffix)].split('.', 1)
                writer, batch = writer_batch.split('_')
                break
        else:
            stamp, rest, host = name.split('.', 2)
            writer, batch, _ = rest.split('_')
            int(stamp)
        pid, token = writer.split('-')
        if not 0 < int(pid) < 2 ** 31 or not token:
            return None
    except ValueError:
        return None
    return writer, batch, host


def _claim_parts(claimed):
    """``(name, host, pid, token)`` of a claim in cur/; None for a name
    that is not one.  NAME itself may hold commas (Maildir++ names)."""
    try:
        name, host, pid, token = claimed.rsplit(',', 3)
        pid = int(pid)
    except ValueError:
        return None
    if not 0 < pid < 2 ** 31 or not name or not host:
        return None
    return name, host, pid, token


def _name_of(area, filename):
    """The message's name of a file in ``area``: in cur/ a claim's NAME."""
    parts = _claim_parts(filename) if area == 'cur' else None
    return parts[0] if parts else filename


def _marker(name, suffix):
    """The commit marker (``.prepared``, then ``.commit``) of the batch of
    message ``name``."""
    writer, batch, host = _tmp_name_parts(name)
    return f'{writer}_{batch}.{host}{suffix}'


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _ctime(path, default):
    try:
        return os.lstat(path).st_ctime
    except FileNotFoundError:
        return default


def _mtime(path, default):
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return default


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True
