"""What a queue file holds: an envelope block, a blank line, then the
message::

    X-Mailout-From: sender@example.org
    X-Mailout-To: one@example.org
    X-Mailout-Attempt: 2026-11-25T09:00:00Z 451 try later

(``X-Mailout-Ok:`` instead of ``X-Mailout-To:`` marks a recipient already
settled, written in place when the outcome could not be recorded.)

Files written by zope.sendmail's queued delivery (``X-Zope-From`` and
``X-Zope-To`` lines before the message) are read too.
"""
import calendar
import dataclasses
import os
import time

from mailout.message import normalise_line_endings
from mailout.queue import names
from mailout.queue.files import QueueError
from mailout.queue.files import open_regular


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
        return names.queued_at(self.name)


def message_file(fromaddr, toaddrs, message, attempts=()):
    """The contents of a queue file."""
    lines = [f'X-Mailout-From: {fromaddr}']
    lines += [f'X-Mailout-To: {to}' for to in toaddrs]
    lines += [f'X-Mailout-Attempt: {attempt}' for attempt in attempts]
    return ''.join(line + '\r\n' for line in lines).encode('utf-8') \
        + b'\r\n' + message


def with_history(message, toaddrs, attempt):
    """A queue file for ``message`` to ``toaddrs``, with one more attempt."""
    return message_file(message.fromaddr, toaddrs, message.message,
                        message.attempts + (attempt,))


#: A recipient line overwritten in place by `Queue.release` (same length):
#: the recipient is settled, not to be sent to again.
_TO, _SETTLED = b'X-Mailout-To: ', b'X-Mailout-Ok: '


def parse(name, data):
    """The `QueuedMessage` in ``data``, the file of message ``name``;
    `QueueError` (or `UnicodeDecodeError`) if it is malformed."""
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


def answered(attempt):
    """Whether the attempt line ``attempt`` (``TIME CODE TEXT``, or ``TIME
    TEXT`` when no server replied) has a reply code: False for a failure to
    connect, a refused or timed-out connection, a failed TLS handshake --
    an attempt that never reached a server's verdict on the message."""
    return parse_attempt(attempt)['code'] is not None


#: How queue files and the log write a time: UTC, to the second.
STAMP = '%Y-%m-%dT%H:%M:%SZ'


def stamp(seconds):
    """``seconds`` since the epoch as `STAMP` says."""
    return time.strftime(STAMP, time.gmtime(seconds))


def attempted_at(attempt):
    """When the attempt line ``attempt`` was written (seconds since the
    epoch), or None if it does not start with a UTC time stamp."""
    try:
        return calendar.timegm(time.strptime(attempt[:20], STAMP))
    except ValueError:
        return None


def attempt_line(reply, when):
    """The ``X-Mailout-Attempt`` value of an attempt at ``when`` (seconds
    since the epoch) that got ``reply``: ``TIME CODE TEXT``, or ``TIME
    TEXT`` when no server answered; on one line."""
    code, text = reply
    when = stamp(when)
    text = ' '.join(str(text).split())
    return f'{when} {code} {text}' if code else f'{when} {text}'


def parse_attempt(line):
    """``{'time', 'code', 'text'}`` of an attempt line (``code`` None when
    no server answered)."""
    stamp, _, rest = line.partition(' ')
    code, _, text = rest.partition(' ')
    if len(code) == 3 and code.isdigit():
        return {'time': stamp, 'code': int(code), 'text': text}
    return {'time': stamp, 'code': None, 'text': rest}


def read_head(f, chunk=8192, limit=1024 * 1024):
    """The start of a queue file: its envelope block and the message's
    header block (as much as ``limit`` holds)."""
    data = b''
    while len(data) < limit:
        more = f.read(chunk)
        data += more
        if not more or _headers_read(data):
            break
    return data


def _headers_read(data):
    if data.startswith(b'X-Zope-From:'):
        lines = data.split(b'\n', 2)
        return len(lines) == 3 and (b'\n\n' in lines[2]
                                    or b'\r\n\r\n' in lines[2])
    return data.count(b'\r\n\r\n') >= 2


def mark_settled(path, addresses):
    """Overwrite the recipient lines of ``addresses`` in place (no new
    space needed); False for a file in zope.sendmail's format."""
    fd = open_regular(path, os.O_RDWR)
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
