"""Validation and normalisation of what ``send()`` is given.

The only module that parses messages.  Whatever passes `prepare` can be
queued and sent as it is: line endings are CRLF, the header block is well
formed, ``Message-Id`` and ``Date`` are present and ``Bcc`` is gone.
"""
import dataclasses
import email.errors
import email.message
import email.utils
import os
import re
import socket
import time
import uuid

from mailout.interfaces import InvalidHeader
from mailout.interfaces import InvalidMessageId
from mailout.interfaces import InvalidRecipient
from mailout.interfaces import InvalidSender
from mailout.interfaces import LineTooLong
from mailout.interfaces import MessageError
from mailout.interfaces import MessageTooLarge
from mailout.interfaces import NoRecipients
from mailout.interfaces import NonASCIIAddress

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r'[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?'
_ADDR_SPEC = re.compile(
    rf'(?:{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[^"\\\r\n]|\\[^\r\n])*")'  # local
    rf'@(?:{_LABEL}(?:\.{_LABEL})*|\[[^\[\]\\\s]+\])\Z')          # domain
_LINE_ENDING = re.compile(rb'\r\n|\r|\n')
_FIELD_NAME = re.compile(rb'[!-9;-~]+:')
# A line break that is not a fold (one followed by a space or tab).
_INJECTED_LINE = re.compile(r'(?:\r\n|\r(?!\n)|(?<!\r)\n)(?![ \t])')
_MESSAGE_ID = re.compile(r'<([^<>\s@]+@[^<>\s@]+)>\Z')


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A message ready for the queue or a mailer."""
    fromaddr: str
    toaddrs: tuple
    message: bytes
    message_id: str     # without angle brackets, as zope.sendmail returns it


def prepare(fromaddr, toaddrs, message, max_size=None, smtputf8=False):
    """Check and normalise one message; return an `Envelope`.

    ``message`` is ``str``, ``bytes`` or an ``email.message.Message``.
    Non-ASCII addresses pass only with ``smtputf8`` (the mailer's setting).
    Raises a `MessageError` subclass naming what is wrong.
    """
    fromaddr = check_address(fromaddr, InvalidSender, 'sender', smtputf8)
    toaddrs = check_recipients(toaddrs, smtputf8)
    data = normalise_line_endings(_as_bytes(message))
    header, body = _split(data)
    fields = _fields(header)
    message_id = _message_id(fields)
    added = b''
    if message_id is None:
        message_id = new_message_id()
        added += b'Message-Id: <%s>\r\n' % message_id.encode()
    if not any(name == b'date' for name, _ in fields):
        added += b'Date: %s\r\n' % email.utils.formatdate().encode()
    kept = b''.join(raw for name, raw in fields if name != b'bcc')
    data = added + kept + body
    _check_line_length(data)
    if max_size and len(data) > max_size:
        raise MessageTooLarge(
            f'message is {len(data)} bytes, over this delivery\'s '
            f'max-message-size of {max_size} bytes')
    return Envelope(fromaddr, toaddrs, data, message_id)


def sender_from_headers(msg):
    """The envelope sender of an ``email.message.Message``: its Sender, or
    its one From address."""
    senders = _addresses(msg, 'Sender') or _addresses(msg, 'From')
    if len(senders) != 1:
        raise InvalidSender(
            'cannot take the envelope sender from the headers: need one '
            f'Sender or one From address, found {len(senders)}; pass fromaddr')
    return senders[0]


def recipients_from_headers(msg):
    """The envelope recipients of an ``email.message.Message``: To, Cc and
    Bcc."""
    return _addresses(msg, 'To', 'Cc', 'Bcc')


def printable(text):
    """``text`` with every character a terminal or log reader could act on
    or not see (controls, DEL, format characters such as bidi overrides,
    line and paragraph separators, non-ASCII spaces) escaped as ``repr``
    escapes it; printable text, non-ASCII letters included, is kept."""
    text = str(text)
    if text.isprintable():
        return text
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_address(address, error, role, smtputf8=False):
    """Return ``address`` as a bare addr-spec or raise ``error``."""
    if isinstance(address, bytes):
        address = address.decode('ascii', 'replace')
    if not isinstance(address, str):
        raise error(f'{role} must be a string, not {type(address).__name__}')
    if any(c in address for c in '\r\n\0'):
        raise error(f'{role} {address!r} contains a line break or NUL')
    address = address.strip()
    if '<' in address:      # "Name <addr>", as smtplib accepts it
        name, parsed = email.utils.parseaddr(address)
        if not parsed or '<' in parsed:
            raise error(f'{role} {address!r} is not an address')
        address = parsed
    if not address:
        raise error(f'{role} is empty')
    try:
        address.encode('utf-8')
    except UnicodeEncodeError:
        raise error(f'{role} {address!r} is not valid Unicode') from None
    if not address.isascii() and not smtputf8:
        raise NonASCIIAddress(
            f'{role} {address!r} is not ASCII: that needs SMTPUTF8; turn on '
            "smtputf8 in the mailer's section if its relay offers it")
    local, _, domain = address.rpartition('@')
    # Non-ASCII letters (SMTPUTF8, RFC 6531) count as letters.
    ascii_form = ''.join(c if c.isascii() else 'a' for c in address)
    if not _ADDR_SPEC.match(ascii_form) or len(local.encode()) > 64 \
            or len(address.encode()) > 254:
        raise error(f'{role} {address!r} is not a valid address '
                    '(expected local-part@domain)')
    return address


def check_recipients(toaddrs, smtputf8=False):
    if isinstance(toaddrs, (str, bytes)):
        raise InvalidRecipient(
            f'toaddrs must be a list of addresses, not a string: {toaddrs!r}')
    try:
        toaddrs = list(toaddrs)
    except TypeError:
        raise InvalidRecipient(
            f'toaddrs must be a list of addresses, not '
            f'{type(toaddrs).__name__}') from None
    if not toaddrs:
        raise NoRecipients('no recipients')
    checked = (check_address(a, InvalidRecipient, 'recipient', smtputf8)
               for a in toaddrs)
    return tuple(dict.fromkeys(checked))     # in order, without repeats


_hostname = None


def new_message_id():
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname() or 'localhost'
    return f'{time.strftime("%Y%m%d%H%M%S")}.{os.getpid()}.' \
           f'{uuid.uuid4().hex[:16]}@{_hostname}'


def _as_bytes(message):
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        try:
            return message.encode('utf-8')
        except UnicodeEncodeError as e:
            raise MessageError(
                f'message text cannot be encoded as UTF-8 ({e.reason} at '
                f'position {e.start})') from None
    if isinstance(message, email.message.Message):
        for name, value in message.items():
            if _INJECTED_LINE.search(str(value)):
                raise InvalidHeader(
                    f'header {name} contains a line break that starts a new '
                    f'header (header injection?): {str(value)[:60]!r}')
        try:
            return message.as_bytes(
                policy=message.policy.clone(linesep='\r\n'))
        except (email.errors.MessageError, ValueError) as e:
            raise InvalidHeader(f'cannot serialise the message: {e}') \
                from None
    raise MessageError(
        'message must be str, bytes or email.message.Message, not '
        f'{type(message).__name__}')


def normalise_line_endings(data):
    """Every line ending as CRLF."""
    return _LINE_ENDING.sub(b'\r\n', data)


def _check_line_length(data):
    longest = max(map(len, data.split(b'\r\n')))
    if longest > 998:
        raise LineTooLong(
            f'a line of the message is {longest} bytes; SMTP allows 998. '
            'Encode the body (quoted-printable or base64), e.g. by building '
            'it with email.message.EmailMessage.set_content()')


def _split(data):
    """Header block (each line with its CRLF) and the rest (blank line and
    body)."""
    end = data.find(b'\r\n\r\n')
    if end < 0:
        return data if data.endswith(b'\r\n') else data + b'\r\n', b''
    return data[:end + 2], data[end + 2:]


def _fields(header):
    """``[(lowercase name, raw lines)]`` of a header block."""
    fields = []
    for line in header.splitlines(keepends=True):
        if b'\0' in line:
            raise InvalidHeader(f'header line contains NUL: {line[:60]!r}')
        if line[:1] in (b' ', b'\t') and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        elif _FIELD_NAME.match(line):
            fields.append((line.split(b':', 1)[0].lower(), line))
        else:
            where = 'first line' if not fields else 'header block'
            raise InvalidHeader(
                f'message has a malformed {where}: {line[:60]!r}; a message '
                'starts with headers ("Name: value"), then a blank line')
    return fields


def message_id_of(data):
    """The Message-Id (without brackets) of message bytes, or None."""
    try:
        return _message_id(_fields(_split(data)[0]))
    except MessageError:
        return None


def _message_id(fields):
    values = [raw.split(b':', 1)[1] for name, raw in fields
              if name == b'message-id']
    if not values:
        return None
    if len(values) > 1:
        raise InvalidMessageId('message has more than one Message-Id header')
    value = b' '.join(values[0].split()).decode('ascii', 'replace')
    match = _MESSAGE_ID.match(value)
    if not match:
        raise InvalidMessageId(
            f'malformed Message-Id {value!r}: expected <left@right>')
    return match.group(1)


def _addresses(msg, *names):
    if not isinstance(msg, email.message.Message):
        raise MessageError('send_message() takes an email.message.Message, '
                           f'not {type(msg).__name__}')
    values = [v for name in names for v in msg.get_all(name, [])]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]
