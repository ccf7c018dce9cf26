"""Inspection and repair of a queue (the mailout command), for `Queue`."""
import dataclasses
import os
import stat
import time
from typing import Optional

from mailout.message import message_id_of
from mailout.message import subject_of
from mailout.queue import fileformat
from mailout.queue import files
from mailout.queue import names
from mailout.queue.files import QueueError


@dataclasses.dataclass
class Entry:
    """What `Queue.entries` and `Queue.locate` tell about one queue file."""
    name: str                   # the message's name (its ID in the queue)
    area: str
    filename: str               # in cur/: NAME,HOST,PID,TOKEN-N
    mtime: float                # in deferred/: when it is tried next
    size: int
    # (Optional, not "X | None": Python 3.9 evaluates these.)
    fromaddr: Optional[str] = None
    toaddrs: tuple = ()
    attempts: tuple = ()
    error: Optional[str] = None     # unreadable, or why it was quarantined
    message: Optional[bytes] = None     # only from `Queue.locate`
    claimed_by: Optional[tuple] = None  # in cur/: (host, pid)
    message_id: Optional[str] = None    # without angle brackets
    subject: Optional[str] = None

    @property
    def queued_at(self):
        return names.queued_at(self.name)


class Inspection:
    """What `Queue` tells about its messages, and how they are retried or
    purged by hand (a part of `Queue`: it uses the queue's areas)."""

    def count(self, area):
        return len(self._listdir(area))

    def entries(self, area, headers=True):
        """An `Entry` for each message in ``area``, oldest first.  Reads only
        the envelope and header blocks; an unreadable file is an entry with
        ``error``.  ``headers=False``: no Message-Id or Subject (for
        counts, which need neither)."""
        result = []
        for filename in self._listdir(area):
            if area == 'failed' and names.is_reason(filename):
                continue
            entry = self._entry(area, filename, headers=headers)
            if entry is not None:
                result.append(entry)
        result.sort(key=lambda e: (e.queued_at or e.mtime, e.name))
        return result

    def _entry(self, area, filename, whole=False, headers=True):
        path = self._area(area, filename)
        try:
            mode = os.lstat(path)
        except FileNotFoundError:       # moved on meanwhile
            return None
        entry = Entry(names.message_name(area, filename), area, filename,
                      mode.st_mtime, mode.st_size)
        claim = names.Claim.parse(filename) if area == 'cur' else None
        if claim:
            entry.claimed_by = (claim.host, claim.pid)
        try:
            data = files.read_regular(
                path, None if whole else fileformat.read_head)
            message = fileformat.parse(entry.name, data)
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:  # QueueError, UnicodeDecodeError
            entry.error = str(e)
        else:
            entry.fromaddr, entry.toaddrs = message.fromaddr, message.toaddrs
            entry.attempts = message.attempts
            entry.message = message.message if whole else None
            if headers:
                entry.message_id = message_id_of(message.message)
                entry.subject = subject_of(message.message)
        if area == 'failed':
            try:
                entry.error = files.read_regular(
                    names.reason_of(path)).decode('utf-8', 'replace').strip()
            except (OSError, QueueError):
                pass
        return entry

    def names_of_message_id(self, message_id):
        """The names of the messages whose Message-Id is ``message_id``
        (with or without angle brackets); each file's head is read."""
        wanted = message_id.strip().strip('<>')
        return {entry.name for area in names.AREAS[1:]
                for entry in self.entries(area)
                if entry.message_id == wanted}

    def message_names(self):
        """The names of the messages in ``new/``, ``cur/``, ``deferred/``
        and ``failed/``."""
        return {names.message_name(area, filename)
                for area in names.AREAS[1:]
                for filename in self._listdir(area)
                if not names.is_reason(filename)}

    def locate(self, name):
        """The entries (each with its whole message) of the message ``name``
        in ``new/``, ``cur/``, ``deferred/`` and ``failed/``; a message
        partly delivered and partly failed is in two of them."""
        found = []
        for area in names.AREAS[1:]:
            for filename in self._listdir(area):
                if names.message_name(area, filename) == name \
                        and not names.is_reason(filename):
                    entry = self._entry(area, filename, whole=True)
                    if entry is not None:
                        found.append(entry)
        return found

    def status(self, now=None):
        """Counts per area, the age of the oldest message not yet settled
        (new, cur, deferred) and of the oldest waiting (new) and deferred
        one, the next retry, and the newest attempt line of the deferred
        and failed messages."""
        now = time.time() if now is None else now
        deferred = self.entries('deferred', headers=False)
        failed = self.entries('failed', headers=False)

        def queued_times(area):
            return [names.queued_at(names.message_name(area, filename))
                    or files.mtime(self._area(area, filename), now)
                    for filename in self._listdir(area)]

        def oldest(times):
            return max(now - min(times), 0) if times else None
        waiting, in_progress = queued_times('new'), queued_times('cur')
        # A deferred file's mtime is its next attempt, not its age.
        deferred_since = [e.queued_at for e in deferred if e.queued_at]
        attempts = [(a, e.mtime) for e in deferred + failed
                    for a in e.attempts[-1:]]
        return {
            'waiting': len(waiting),
            'in_progress': len(in_progress),
            'deferred': len(deferred),
            'failed': len(failed),
            'held': self.count('held'),
            'oldest_age': oldest(waiting + in_progress + deferred_since),
            'oldest_waiting_age': oldest(waiting),
            'oldest_deferred_age': oldest(deferred_since),
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
        target = name if len(areas) == 1 else names.retry_name(name)
        try:
            os.rename(self._area(area, name), self._area('new', target))
        except FileNotFoundError:
            if area == 'deferred' and os.path.exists(self._area('new', name)):
                return area, name   # a processor promoted it meanwhile
            raise QueueError(f'{name} left {area}/ meanwhile') from None
        if area == 'failed':
            files.unlink(self._area('failed', names.reason_of(name)))
        files.fsync_directory(self._area('new'))
        self.wake()
        return area, target

    def purge(self, area, name):
        """Delete ``name`` from ``area`` (new, deferred, failed or held) for
        good."""
        if area not in ('new', 'deferred', 'failed', 'held'):
            raise QueueError(f'cannot purge from {area}/: the message is '
                             'being delivered')
        try:
            os.unlink(self._area(area, name))
        except FileNotFoundError:
            raise QueueError(f'{name} left {area}/ meanwhile') from None
        if area == 'failed':
            files.unlink(self._area('failed', names.reason_of(name)))


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
    for area in ('',) + names.AREAS:
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
