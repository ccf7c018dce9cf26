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

HOST is this process's host id (`set_host`: ``host-id``, else
``$MAILOUT_HOST_ID``, else the host name), ``~`` and its incarnation (the
machine's boot and pid namespace): a claim or write of this HOST is judged
by its pid, any other by its age.
"""
import dataclasses
import hashlib
import os
import re
import socket
import threading
import time
import uuid


def _host_id():
    """This host's id when none is configured: its name."""
    host = socket.gethostname() or 'localhost'
    return host.replace(',', '_').replace('/', '_')


def _incarnation():
    """Where this process's pid means something, as 8 hex digits: the
    machine's boot, the pid namespace and when its first process started
    (a new namespace may get an old one's number); '' where /proc does not
    say.  Files named with another are another host's, whatever their host
    id: a pid of an earlier boot, of another machine given the same host
    id, or of a container restarted under its old one says nothing about
    the process that has that pid here now."""
    parts = []
    for read, path in ((_read_line, '/proc/sys/kernel/random/boot_id'),
                       (os.readlink, '/proc/self/ns/pid'),
                       (_started, '/proc/1/stat')):
        try:
            parts.append(read(path))
        except (OSError, IndexError):
            pass
    if not parts:
        return ''
    return hashlib.sha256('|'.join(parts).encode()).hexdigest()[:8]


def _read_line(path):
    with open(path) as f:
        return f.readline().strip()


def _started(path):
    """When the process of a /proc/PID/stat file started (field 22)."""
    return _read_line(path).rsplit(')', 1)[1].split()[19]


def _named(host_id):
    """HOST for the host id ``host_id``: with this process's incarnation."""
    incarnation = _incarnation()
    return f'{host_id}~{incarnation}' if incarnation else host_id


#: The areas of a queue directory, in the order a message passes them.
AREAS = ('tmp', 'new', 'cur', 'deferred', 'failed', 'held')
_REASON = '.reason'
_REWRITE = '.rewrite'
_PREPARED, _COMMITTED = '.prepared', '.commit'

#: The environment variable naming this process's host when the
#: configuration does not (``host-id``).
HOST_ID_VARIABLE = 'MAILOUT_HOST_ID'
HOST_ID_RULE = ("1 to 64 ASCII letters, digits, '.', '-', '_' and '~', not "
                'ending in .commit, .prepared, .rewrite or .reason')
_HOST_ID = re.compile(r'[A-Za-z0-9._~-]{1,64}\Z')


def check_host_id(value):
    """``value`` if it may name a host in queue file names, else ValueError
    saying what may."""
    if not _HOST_ID.match(value) or value.endswith(
            (_REASON, _REWRITE, _PREPARED, _COMMITTED)):
        raise ValueError(f'not a host id: {value!r} (a host id is '
                         f'{HOST_ID_RULE})')
    return value


def _initial_host_id():
    value = os.environ.get(HOST_ID_VARIABLE)
    try:
        return check_host_id(value) if value else _host_id()
    except ValueError:      # said when the configuration is applied
        return _host_id()


#: This process's host id (`set_host`).
HOST_ID = _initial_host_id()
#: This host in the names of its tmp/ files and claims: the host id and
#: where its pids mean something (`_incarnation`).
HOST = _named(HOST_ID)
#: What fixed HOST for this process's life (None: nothing yet).
_host_fixed_by = None
_host_lock = threading.Lock()


def set_host(value=None):
    """Fix this process's host id: ``value`` (the ``host-id`` key), else
    ``$MAILOUT_HOST_ID``, else the default (host name and pid namespace).
    One process is one host: ValueError for a second, different value, or
    for one given after this process named a queue file with another."""
    global HOST, HOST_ID, _host_fixed_by
    if value:
        source = f'host-id {value}'
        check_host_id(value)
    elif os.environ.get(HOST_ID_VARIABLE):
        value = os.environ[HOST_ID_VARIABLE]
        source = f'${HOST_ID_VARIABLE}'
        try:
            check_host_id(value)
        except ValueError as e:
            raise ValueError(f'${HOST_ID_VARIABLE}: {e}') from None
    else:
        value, source = _host_id(), 'the host name'
    with _host_lock:
        if _host_fixed_by is not None and value != HOST_ID:
            raise ValueError(
                f'host id {value!r} (from {source}): this process is host '
                f'{HOST_ID!r} already (from {_host_fixed_by}); one process '
                'is one host, give every configuration it loads the same '
                'host-id')
        HOST_ID, HOST = value, _named(value)
        if _host_fixed_by is None:
            _host_fixed_by = source


def _reset_after_fork():
    global _host_lock
    _host_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _host_in_use():
    """HOST, fixed from now on: a file is being named with it."""
    global _host_fixed_by
    if _host_fixed_by is None:
        with _host_lock:
            if _host_fixed_by is None:
                _host_fixed_by = 'the queue files it named'
    return HOST


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
        return cls(str(time.time_ns()), writer, batch or unique, unique,
                   _host_in_use())

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
        return cls(name, _host_in_use(), os.getpid(), f'{token}-{number}')

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
