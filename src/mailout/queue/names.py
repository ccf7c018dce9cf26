"""The names of queue files: each kind a value type that parses a name
(None for a name that is not of that kind, e.g. another program's) and
formats it (``str``).  Nothing else builds or splits a queue file name.

    tmp/        TIME.PID-TOKEN_BATCH_UNIQUE.HOST     `TmpMessage`
                PID-TOKEN_BATCH.HOST.prepared        `Marker`
                PID-TOKEN_BATCH.HOST.commit          `Marker`, committed
                CLAIM.rewrite                        `Rewrite`
    new/, deferred/, failed/
                NAME (another program's names too)
                NAME.rHEX (`retry_name`), NAME+N (`failed_copy`)
    cur/        NAME,HOST,PID,TOKEN-N                `Claim`
    failed/     NAME.reason                          (`reason_of`)
"""
import dataclasses
import os
import socket
import time
import uuid


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


#: The areas of a queue directory, in the order a message passes them.
AREAS = ('tmp', 'new', 'cur', 'deferred', 'failed', 'held')
#: This host in the names of its tmp/ files and claims.
HOST = _host_id()
_REASON = '.reason'
_REWRITE = '.rewrite'
_PREPARED, _COMMITTED = '.prepared', '.commit'


def _pid(text):
    """The pid ``text`` names, or ValueError (also for a pid not written
    as mailout writes it, so that a parsed name formats as it was)."""
    pid = int(text)
    if not 0 < pid < 2 ** 31 or str(pid) != text:
        raise ValueError(text)
    return pid


def new_token():
    """A token for a process: with its pid it tells the process from an
    earlier one that had the same pid."""
    return uuid.uuid4().hex[:8]


@dataclasses.dataclass(frozen=True)
class Writer:
    """A process writing into tmp/: PID-TOKEN."""
    pid: int
    token: str

    @classmethod
    def parse(cls, text):
        try:
            pid, token = text.split('-')
            pid = _pid(pid)
        except ValueError:
            return None
        return cls(pid, token) if token else None

    def __str__(self):
        return f'{self.pid}-{self.token}'


@dataclasses.dataclass(frozen=True)
class Marker:
    """The commit marker of a batch in tmp/: PID-TOKEN_BATCH.HOST.prepared
    (made at the vote), renamed to .commit when the transaction commits."""
    writer: Writer
    batch: str
    host: str
    committed: bool

    @classmethod
    def parse(cls, name):
        for suffix, committed in ((_COMMITTED, True), (_PREPARED, False)):
            if name.endswith(suffix):
                break
        else:
            return None
        try:
            writer_batch, host = name[:-len(suffix)].split('.', 1)
            writer, batch = writer_batch.split('_')
        except ValueError:
            return None
        writer = Writer.parse(writer)
        return cls(writer, batch, host, committed) if writer else None

    def __str__(self):
        suffix = _COMMITTED if self.committed else _PREPARED
        return f'{self.writer}_{self.batch}.{self.host}{suffix}'


@dataclasses.dataclass(frozen=True)
class TmpMessage:
    """A message written into tmp/: TIME.PID-TOKEN_BATCH_UNIQUE.HOST (TIME
    in nanoseconds).  Its name stays the same in new/."""
    stamp: str              # time.time_ns()
    writer: Writer
    batch: str
    unique: str
    host: str

    @classmethod
    def new(cls, writer, batch=None):
        unique = uuid.uuid4().hex[:12]
        return cls(str(time.time_ns()), writer, batch or unique, unique, HOST)

    @classmethod
    def parse(cls, name):
        try:
            stamp, rest, host = name.split('.', 2)
            writer, batch, unique = rest.split('_')
            int(stamp)
        except ValueError:
            return None
        writer = Writer.parse(writer)
        return cls(stamp, writer, batch, unique, host) if writer else None

    def marker(self, committed):
        """The commit marker of this message's batch."""
        return Marker(self.writer, self.batch, self.host, committed)

    def __str__(self):
        return f'{self.stamp}.{self.writer}_{self.batch}_{self.unique}' \
               f'.{self.host}'


@dataclasses.dataclass(frozen=True)
class Claim:
    """A message claimed by a sender thread, in cur/: NAME,HOST,PID,TOKEN-N.
    Each claim has a name of its own (N counts a process's claims), so two
    threads racing for one file never share a claim.  NAME itself may hold
    commas (Maildir++ names)."""
    name: str
    host: str
    pid: int
    tag: str            # TOKEN-N

    @classmethod
    def new(cls, name, token, number):
        return cls(name, HOST, os.getpid(), f'{token}-{number}')

    @classmethod
    def parse(cls, filename):
        try:
            name, host, pid, tag = filename.rsplit(',', 3)
            pid = _pid(pid)
        except ValueError:
            return None
        return cls(name, host, pid, tag) if name and host else None

    @property
    def token(self):
        """The token of the process that claimed it."""
        return self.tag.split('-')[0]

    def __str__(self):
        return f'{self.name},{self.host},{self.pid},{self.tag}'


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """A claimed message's new version, written in tmp/ and renamed over
    the claim: CLAIM.rewrite."""
    claim: Claim

    @classmethod
    def parse(cls, name):
        if not name.endswith(_REWRITE):
            return None
        claim = Claim.parse(name[:-len(_REWRITE)])
        return cls(claim) if claim else None

    def __str__(self):
        return f'{self.claim}{_REWRITE}'


def in_tmp(name):
    """What the file ``name`` in tmp/ is: a `TmpMessage`, a `Marker` or a
    `Rewrite`; None for another program's file."""
    if name.endswith(_REWRITE):
        return Rewrite.parse(name)
    if name.endswith((_COMMITTED, _PREPARED)):
        return Marker.parse(name)
    return TmpMessage.parse(name)


def message_name(area, filename):
    """The message's name (its ID in the queue) of a file in ``area``: in
    cur/ a claim's NAME, elsewhere the file name."""
    claim = Claim.parse(filename) if area == 'cur' else None
    return claim.name if claim else filename


def queued_at(name):
    """When the message ``name`` entered the queue (seconds since the
    epoch), or None for a name not given by mailout."""
    # Our names start with time.time_ns() (19 digits); zope.sendmail's with
    # seconds.
    stamp = name.split('.', 1)[0]
    return int(stamp) / 1e9 if len(stamp) >= 19 and stamp.isdigit() else None


def failed_copy(name, number):
    """The name in failed/ of the ``number``-th failure of the message
    ``name``: NAME, then NAME+2, NAME+3, ..."""
    return name if number == 1 else f'{name}+{number}'


def retry_name(name):
    """A new name in new/ for the message ``name`` (NAME.rHEX), keeping the
    time it was queued."""
    return f'{name}.r{uuid.uuid4().hex[:6]}'


def reason_of(filename):
    """The file beside a quarantined file in failed/ saying why."""
    return filename + _REASON


def is_reason(filename):
    return filename.endswith(_REASON)
