"""The queue's state machine: `Queue` moves each message from area to area.

Every move between areas is one ``rename`` (a rewrite of the envelope is
written aside and renamed over the claimed file first), so a crash at any
point leaves each message in exactly one place.
"""
import contextlib
import itertools
import logging
import os
import stat
import threading
import time

from mailout.message import printable
from mailout.queue import fileformat
from mailout.queue import files
from mailout.queue import names
from mailout.queue.files import QueueError
from mailout.queue.inspection import Inspection
from mailout.queue.recovery import CLAIM_LEASE
from mailout.queue.recovery import Recovery
from mailout.queue.relaystate import RelayStates

log = logging.getLogger('mailout.queue')


class Queue(Recovery, Inspection):
    """One queue directory.  Use `Queue.open`: one object per directory and
    process, so that commits wake the processor waiting on it.

    Every area must be a directory of this user's, not a link; missing
    areas are created (0700) and existing ones set to 0700.  A queue opened
    with ``writable=False`` (inspection) only reads: it creates and changes
    nothing and accepts areas of another owner."""

    _open: dict[str, 'Queue'] = {}
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
        #: This process in the names of its files (with its pid).
        self.token = names.new_token()
        self._claim_numbers = itertools.count()
        # The claims held by this process, by name: True once in cur/.
        self._claims: dict[str, bool] = {}
        self._claims_lock = threading.Lock()
        # Held while a claim's times are set (`renew_claims`, `postpone`).
        self._times_lock = threading.Lock()
        #: Seconds after which another host takes back a claim that was not
        #: renewed (``claim-lease``): the same on every host of the queue.
        self.claim_lease: float = CLAIM_LEASE
        self._unfinished = []       # committed batches still in tmp/
        self._unreleased = {}       # claim -> (settled, until), see release
        self._reported = set()      # names logged once
        #: What the processes working this queue know of its relays.
        self.relay_states = RelayStates(self.path)
        os.register_at_fork(after_in_child=self._after_fork)

    def __repr__(self):
        return f'<Queue {self.path}>'

    def _after_fork(self):
        self._arrived = threading.Condition()
        self.token = names.new_token()
        self._claims = {}
        self._claims_lock = threading.Lock()
        self._times_lock = threading.Lock()
        self._unfinished = []
        self._unreleased = {}

    @property
    def _writer(self):
        """This process, in the names of its tmp/ files."""
        return names.Writer(os.getpid(), self.token)

    def _area(self, area, name=None):
        # No trailing slash for an area: it would make lstat follow a link.
        return os.path.join(self.path, area, *filter(None, [name]))

    def _check_areas(self, announce=True):
        """Refuse areas that are links, not directories or (writable) of
        another owner; create missing ones and set modes (writable)."""
        for area in ('',) + names.AREAS:
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
        name = str(names.TmpMessage.new(self._writer, batch))
        data = fileformat.message_file(envelope.fromaddr, envelope.toaddrs,
                                       envelope.message)
        try:
            files.write_durably(self._area('tmp', name), data)
        except FileNotFoundError:       # tmp/ was removed under us
            self._check_areas()
            files.write_durably(self._area('tmp', name), data)
        return name

    def prepare(self, written):
        """Make the commit marker of a batch written with `write` (at the
        vote), so that `commit` needs no new file: it renames it."""
        if len(written) > 1:
            files.write_durably(self._marker(written, committed=False), b'')

    def commit(self, written):
        """Move written messages into ``new/``, all or none: from the
        renamed commit marker on, the batch is committed, and whoever sees
        the marker (recovery too) finishes the renames.  One directory
        fsync for all.  Never raises: if a rename fails (``new/`` removed
        or not writable), the batch stays committed in ``tmp/``, is logged
        loudly and moved by the next `recover`.  True if all went well."""
        marker = None
        try:
            if len(written) > 1:
                marker = self._marker(written, committed=True)
                try:
                    os.rename(self._marker(written, committed=False), marker)
                except FileNotFoundError:   # not prepared, or done already
                    if not os.path.lexists(marker):
                        files.write_durably(marker, b'')
                files.fsync_directory(self._area('tmp'))    # before any rename
            self._move_to_new(written)
        except OSError as e:
            log.critical('%r: %d committed message(s) could not be moved into '
                         'new/ (%s); they stay in tmp/ and are moved there when '
                         'the queue recovers', self, len(written), e)
            self._keep_unfinished(written, marker)
            return False
        if marker is not None:
            files.unlink(marker)
        self.wake()
        return True

    def _marker(self, written, committed):
        """The path of the commit marker of the batch ``written``."""
        marker = names.TmpMessage.parse(written[0]).marker(committed)
        return self._area('tmp', str(marker))

    def _move_to_new(self, written):
        for name in written:
            try:
                os.rename(self._area('tmp', name), self._area('new', name))
            except FileNotFoundError:
                if os.path.lexists(self._area('tmp', name)):
                    raise               # new/ is missing
                # recovery finished this batch meanwhile
        files.fsync_directory(self._area('new'))

    def _keep_unfinished(self, written, marker):
        # The marker lets a restarted process finish the batch; it may be
        # impossible to make now (no space): then only this process knows.
        if marker is None:
            try:
                files.write_durably(self._marker(written, committed=True), b'')
                files.fsync_directory(self._area('tmp'))
            except OSError:
                pass
        with self._claims_lock:
            self._unfinished.append(list(written))

    def _finish_unfinished(self):
        """Commit again the batches whose renames failed in this process
        (those with a marker in tmp/ are finished by `_clean_tmp` too)."""
        with self._claims_lock:
            batches, self._unfinished = self._unfinished, []
        for written in batches:
            if self.commit(written):
                log.warning('%r: %d committed message(s) moved into new/ '
                            'after all', self, len(written))

    def discard(self, written):
        for name in written:
            files.unlink(self._area('tmp', name))
        if written:
            files.unlink(self._marker(written, committed=False))

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
        claimed = str(names.Claim.new(name, self.token,
                                      next(self._claim_numbers)))
        # Recorded before the rename, so that recovery never sees it unheld.
        with self._claims_lock:
            self._claims[claimed] = False
        try:
            os.rename(self._area('new', name), self._area('cur', claimed))
        except FileNotFoundError:
            self.forget(claimed)
            return None
        except OSError:
            self.forget(claimed)
            raise
        with self._claims_lock:
            if claimed in self._claims:
                self._claims[claimed] = True
        return claimed

    def holds(self, claimed):
        """Whether this process's claim is still there: False once another
        host took it over (its file is gone), and then it is forgotten."""
        if os.path.lexists(self._area('cur', claimed)):
            return True
        self.forget(claimed)
        return False

    def renew_claims(self):
        """Touch every claim this process holds, so that other hosts see
        it alive (they measure the file's ctime against ``claim_lease``);
        its times stay as they are.  A claim whose file vanished (taken
        over) is forgotten.  How many were renewed."""
        with self._claims_lock:
            held = [claimed for claimed, made in self._claims.items() if made]
        renewed = 0
        for claimed in held:
            path = self._area('cur', claimed)
            with self._entry_errors(claimed):
                try:
                    with self._times_lock:
                        times = os.lstat(path)
                        os.utime(path, ns=(times.st_atime_ns,
                                           times.st_mtime_ns),
                                 follow_symlinks=False)
                    renewed += 1
                except FileNotFoundError:
                    self.forget(claimed)
        return renewed

    def read(self, claimed):
        """The claimed message; `QueueError` for anything but a readable
        regular file."""
        return fileformat.parse(names.Claim.parse(claimed).name,
                                files.read_regular(self._area('cur', claimed)))

    def done(self, claimed):
        """The message was delivered to every recipient: forget it."""
        os.unlink(self._area('cur', claimed))
        self.forget(claimed)

    def defer(self, claimed, toaddrs, attempt, until):
        """Keep ``toaddrs`` of the message for a retry at ``until``."""
        self._rewrite(claimed, toaddrs, attempt)
        self.postpone(claimed, until)

    def postpone(self, claimed, until):
        """Put the message back in ``deferred/`` until ``until`` as it is,
        with no attempt added (`defer` adds one first)."""
        path = self._area('cur', claimed)
        # The time first: once in deferred/, a processor may promote it.
        # (No renewal may set the old one back in between.)
        with self._times_lock:
            os.utime(path, (until, until), follow_symlinks=False)
            os.rename(path,
                      self._area('deferred', names.Claim.parse(claimed).name))
        self.forget(claimed)

    def fail(self, claimed, toaddrs, attempt, keep_claim=False):
        """Move the message for ``toaddrs`` to ``failed/`` with its history.

        With ``keep_claim`` a copy goes to ``failed/`` and the claimed
        message stays (the other recipients are still to be handled)."""
        if keep_claim:
            data = fileformat.with_history(self.read(claimed), toaddrs,
                                           attempt)
            self._add_failed(claimed,
                             lambda path: files.write_durably(path, data))
            return
        self._rewrite(claimed, toaddrs, attempt)
        self._add_failed(claimed, lambda path: os.rename(
            self._area('cur', claimed), path))
        self.forget(claimed)

    def quarantine(self, claimed, reason):
        """Move an unreadable claimed entry to ``failed/`` as it is, with
        ``NAME.reason`` beside it."""
        def move(path):
            files.write_durably(names.reason_of(path),
                                (reason + '\n').encode())
            try:
                os.rename(self._area('cur', claimed), path)
            except OSError:
                files.unlink(names.reason_of(path))
                raise
        self._add_failed(claimed, move)
        self.forget(claimed)

    def _add_failed(self, claimed, create):
        # Recipients of one message may fail on different attempts: each
        # failure keeps a record of its own (NAME, NAME+2, ...).  Only the
        # claim's holder fails a message; a name taken meanwhile (or a
        # planted NAME.reason) moves on to the next number.
        name = names.Claim.parse(claimed).name
        for number in itertools.count(1):
            path = self._area('failed', names.failed_copy(name, number))
            if os.path.lexists(path) \
                    or os.path.lexists(names.reason_of(path)):
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
        claim = names.Claim.parse(claimed)
        name = claim.name
        files.unlink(self._area('tmp', str(names.Rewrite(claim))))
        try:
            if settled and not fileformat.mark_settled(path, settled):
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
            with self._times_lock:
                os.utime(path, (until, until), follow_symlinks=False)
                os.rename(path, self._area('deferred', name))
        except FileNotFoundError:
            if os.path.lexists(path):   # deferred/ is missing
                self._release_to_new(path, name)
        except OSError:
            self._release_to_new(path, name)
        with self._claims_lock:
            self._unreleased.pop(claimed, None)
        self.forget(claimed)

    def _release_to_new(self, path, name):
        try:
            os.rename(path, self._area('new', name))
        except OSError:
            pass        # recovery gives it back once it can

    def _release_kept(self):
        with self._claims_lock:
            kept = list(self._unreleased.items())
        for claimed, (settled, until) in kept:
            self.release(claimed, settled, until)

    def hold(self, name, area='new'):
        """Move ``name`` from ``area`` (new or deferred) to ``held/``;
        False if it left ``area`` meanwhile (another processor took it)."""
        try:
            os.rename(self._area(area, name), self._area('held', name))
        except FileNotFoundError:
            return False
        return True

    def release_held(self, name):
        """Move ``name`` from ``held/`` back to ``new/``, to be sent at once;
        False if it left ``held/`` meanwhile."""
        try:
            os.rename(self._area('held', name), self._area('new', name))
        except FileNotFoundError:
            return False
        self.wake()
        return True

    def promote_due(self, now=None, horizon=None):
        """Move deferred messages whose time has come back to ``new/``.  A
        retry time more than ``horizon`` seconds ahead (the longest backoff)
        means the clock stepped back: that message is due now."""
        now = time.time() if now is None else now
        moved = 0
        for name in self._listdir('deferred'):
            path = self._area('deferred', name)
            due = files.mtime(path, now)
            if due <= now or horizon is not None and due > now + horizon:
                with self._entry_errors(name):
                    try:
                        os.rename(path, self._area('new', name))
                        moved += 1
                    except FileNotFoundError:   # another processor moved it
                        pass
        return moved

    def promote_deferred(self, select):
        """Move the deferred messages for which ``select(message)`` (a
        `fileformat.QueuedMessage` read from the file's head) is true back
        to ``new/``, to be sent now whatever their retry time (a relay came
        back).  Unreadable ones wait for their time.  How many moved."""
        moved = 0
        for name in self._listdir('deferred'):
            path = self._area('deferred', name)
            with self._entry_errors(name):
                try:
                    message = fileformat.parse(name, files.read_regular(
                        path, fileformat.read_head))
                except (ValueError, FileNotFoundError):
                    continue        # unreadable: left for its retry time
                if not select(message):
                    continue
                try:
                    os.rename(path, self._area('new', name))
                    moved += 1
                except FileNotFoundError:   # another processor moved it
                    pass
        if moved:
            self.wake()
        return moved

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

    def forget(self, claimed):
        """Drop this process's record of a claim (settled, or its file is
        gone)."""
        with self._claims_lock:
            self._claims.pop(claimed, None)

    def _rewrite(self, claimed, toaddrs, attempt):
        # Replace the claimed file in place (write aside, rename over), so a
        # crash leaves either the old or the new version, never both; a
        # claim taken over meanwhile stays gone (FileNotFoundError).
        aside = self._area(
            'tmp', str(names.Rewrite(names.Claim.parse(claimed))))
        files.write_durably(aside, fileformat.with_history(
            self.read(claimed), toaddrs, attempt))
        try:
            files.replace_existing(aside, self._area('cur', claimed))
        except OSError:
            files.unlink(aside)
            raise


def _reset_after_fork():
    Queue._open_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)

