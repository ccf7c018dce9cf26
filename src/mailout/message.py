"""Validation and normalisation of what ``send()`` is given.

The only module that parses messages.  Whatever passes `prepare` can be
queued and sent as it is: line endings are CRLF, the header block is well
formed, ``Message-Id`` and ``Date`` are present and ``Bcc`` and
``Resent-Bcc`` are gone.

Messages are sized before they are parsed and parsed without splitting
them into lines: a message costs a few times its own size in memory, and
one over the limit hardly more than itself.
"""
import dataclasses
import email.errors
import email.generator
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import io
import os
import re
import socket
import time
import unicodedata
import uuid
from collections.abc import Iterable
from typing import Optional

from mailout.interfaces import InvalidHeader
from mailout.interfaces import InvalidMessageId
from mailout.interfaces import InvalidRecipient
from mailout.interfaces import InvalidSender
from mailout.interfaces import LineTooLong
from mailout.interfaces import MessageInput
from mailout.interfaces import MessageError
from mailout.interfaces import MessageTooLarge
from mailout.interfaces import NoRecipients
from mailout.interfaces import NonASCIIAddress

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r'[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?'
_ADDR_SPEC = re.compile(
    rf'(?:{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[^"\\\r\n]|\\[^\r\n])*")'  # local
    rf'@(?:{_LABEL}(?:\.{_LABEL})*|\[[^\[\]\\\s]+\])\Z')          # domain
# Printable ASCII but colon (RFC 5322 ftext).
_HEADER_NAME = re.compile(r'[!-9;-~]+\Z')
# In a CRLF header block: a line that is neither a field nor a fold.
_MALFORMED_HEADER_LINE = re.compile(rb'^(?![ \t]|[!-9;-~]+:)(?!\Z)', re.M)
# The fields prepare() reads or removes, and where a field ends.
_NOTED_FIELD = re.compile(rb'^(message-id|date|bcc|resent-bcc):', re.M | re.I)
_FIELD_END = re.compile(rb'\r\n(?![ \t])')
_REMOVED_FIELDS = (b'bcc', b'resent-bcc')
_LONG_LINE = re.compile(rb'^[^\r\n]{999}', re.M)
# For sizing before normalising: a blank line in any line-ending style
# (two line endings in a row), and a field that prepare() may remove.
_BLANK_LINE = {str: re.compile(r'\n\r|\n\n|\r\r'),
               bytes: re.compile(rb'\n\r|\n\n|\r\r')}
_REMOVED_FIELD_START = {
    str: re.compile(r'(?:\A|[\r\n])(?:resent-)?bcc:', re.I),
    bytes: re.compile(rb'(?:\A|[\r\n])(?:resent-)?bcc:', re.I)}
_TEXT_LINE = re.compile(r'([^\r\n]*)(?:\r\n|\r|\n)')
# A line break that is not a fold (one followed by a space or tab).
_INJECTED_LINE = re.compile(r'(?:\r\n|\r(?!\n)|(?<!\r)\n)(?![ \t])')
_ID_TEXT = r'[^<>\s@\x00-\x1f\x7f]+'
_MESSAGE_ID = re.compile(rf'<({_ID_TEXT}@{_ID_TEXT})>\Z')


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A message ready for the queue or a mailer."""
    fromaddr: str
    toaddrs: tuple[str, ...]
    message: bytes
    message_id: str     # without angle brackets, as zope.sendmail returns it


def prepare(fromaddr: str, toaddrs: Iterable[str], message: MessageInput,
            max_size: Optional[int] = None,
            smtputf8: bool = False) -> Envelope:
    """Check and normalise one message; return an `Envelope`.

    ``message`` is ``str``, ``bytes`` or an ``email.message.Message``.
    Non-ASCII addresses pass only with ``smtputf8`` (the mailer's setting).
    Raises a `MessageError` subclass naming what is wrong.
    """
    fromaddr = check_address(fromaddr, InvalidSender, 'sender', smtputf8)
    toaddrs = check_recipients(toaddrs, smtputf8)
    if max_size:
        smallest = _smallest_size(message)
        if smallest > max_size:
            _too_large(f'at least {smallest}', max_size)
    data = normalise_line_endings(_as_bytes(message))
    end = _header_end(data)
    if end == len(data) and not data.endswith(b'\r\n'):
        data += b'\r\n'       # headers only, the last without a line ending
        end += 2
    _check_header_block(data, end)
    fields = _noted_fields(data, end)
    message_id = _message_id(data, fields)
    added = b''
    if message_id is None:
        message_id = new_message_id()
        added += b'Message-Id: <%s>\r\n' % message_id.encode()
    if not any(name == b'date' for name, _, _ in fields):
        added += b'Date: %s\r\n' % email.utils.formatdate().encode()
    removed = [(start, stop) for name, start, stop in fields
               if name in _REMOVED_FIELDS]
    size = len(added) + len(data) - sum(stop - start
                                        for start, stop in removed)
    if max_size and size > max_size:
        _too_large(size, max_size)
    if added or removed:
        # Joined from views of data: no copy but the result.
        view = memoryview(data)
        kept: list[bytes | memoryview] = [added]
        start = 0
        for stop, next_start in removed:
            kept.append(view[start:stop])
            start = next_start
        kept.append(view[start:])
        data = b''.join(kept)
    _check_line_length(data)
    return Envelope(fromaddr, toaddrs, data, message_id)


def _too_large(size, max_size):
    raise MessageTooLarge(
        f'message is {size} bytes, over this delivery\'s '
        f'max-message-size of {max_size} bytes')


def _smallest_size(message):
    """A lower bound of the size ``message`` will have once prepared, found
    without copying or parsing it.

    Normalising line endings and adding headers only grow a message, and
    UTF-8 takes a byte at least per character: only the removed fields (Bcc,
    Resent-Bcc, all in the header block) can make it smaller.  A message
    object is at least the text of its parts.
    """
    if isinstance(message, (str, bytes)):
        kind = bytes if isinstance(message, bytes) else str   # or subclasses
        blank = _BLANK_LINE[kind].search(message)
        header_end = blank.start() if blank else len(message)
        removable = _REMOVED_FIELD_START[kind].search(message, 0, header_end)
        if removable is None:
            return len(message)
        return len(message) - (header_end - removable.start())
    if isinstance(message, email.message.Message):
        # _payload, not get_payload(): that encodes the text to look for
        # surrogates, a copy of it.
        return sum(len(part._payload) for part in message.walk()
                   if isinstance(part._payload, str))
    return 0


def redirected(envelope: Envelope, address: str) -> Envelope:
    """``envelope`` sent to ``address`` instead of its recipients, which an
    ``X-Mailout-Original-To`` header keeps (folded, as a header must be)."""
    lines, line = [], 'X-Mailout-Original-To:'
    for recipient in envelope.toaddrs:
        if len(line) + len(recipient) > 76 and line.endswith(','):
            lines.append(line)
            line = ''
        line += f' {recipient},'
    lines.append(line.rstrip(','))
    header = ('\r\n'.join(lines) + '\r\n').encode('utf-8')
    return dataclasses.replace(envelope, toaddrs=(address,),
                               message=header + envelope.message)


def sender_from_headers(msg: email.message.Message) -> str:
    """The envelope sender of an ``email.message.Message``: its Sender, or
    its one From address."""
    senders = _addresses(msg, 'Sender') or _addresses(msg, 'From')
    if len(senders) != 1:
        raise InvalidSender(
            'cannot take the envelope sender from the headers: need one '
            f'Sender or one From address, found {len(senders)}; pass fromaddr')
    return senders[0]


def recipients_from_headers(msg: email.message.Message) -> list[str]:
    """The envelope recipients of an ``email.message.Message``: To, Cc and
    Bcc."""
    return _addresses(msg, 'To', 'Cc', 'Bcc')


def printable(text: object) -> str:
    """``text`` with every character a terminal or log reader could act on
    or not see (controls, DEL, format characters such as bidi overrides,
    line and paragraph separators, non-ASCII spaces) escaped as ``repr``
    escapes it; printable text, non-ASCII letters included, is kept."""
    text = str(text)
    if text.isprintable():
        return text
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_UNNAMED = {'Cc': 'a control character', 'Co': 'a private-use character',
            'Cn': 'an unassigned character'}


def _hidden_character(text):
    """The first character of ``text`` a reader would not see as it is
    (control, format, separator, non-ASCII space, U+FFFD), or None."""
    if text.isprintable() and '\ufffd' not in text:
        return None
    return next(c for c in text if not c.isprintable() or c == '\ufffd')


def check_address(address: str, error: type[MessageError], role: str,
                  smtputf8: bool = False) -> str:
    """Return ``address`` as a bare addr-spec or raise ``error``."""
    if isinstance(address, bytes):
        address = address.decode('ascii', 'replace')
    if not isinstance(address, str):
        raise error(f'{role} must be a string, not {type(address).__name__}')
    if any(c in address for c in '\r\n\0'):
        raise error(f'{role} {address!r} contains a line break or NUL')
    try:
        address.encode('utf-8')
    except UnicodeEncodeError:
        raise error(f'{role} {address!r} is not valid Unicode') from None
    hidden = _hidden_character(address)
    if hidden is not None:
        kind = ('a replacement character: undecodable bytes?'
                if hidden == '\ufffd' else
                unicodedata.name(hidden, '') or _UNNAMED[
                    unicodedata.category(hidden)])
        raise error(f'{role} {address!r} contains U+{ord(hidden):04X} '
                    f'({kind}); an address may contain no control, format '
                    'or separator character')
    address = address.strip()
    if '<' in address:      # "Name <addr>", as smtplib accepts it
        name, parsed = email.utils.parseaddr(address)
        if not parsed or '<' in parsed:
            raise error(f'{role} {address!r} is not an address')
        address = parsed
    if not address:
        raise error(f'{role} is empty')
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


def check_recipients(toaddrs: Iterable[str],
                     smtputf8: bool = False) -> tuple[str, ...]:
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


def new_message_id() -> str:
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
        for part in message.walk():
            _check_part_headers(part)
        buffer = io.BytesIO()
        generator = _LineByLineGenerator(
            buffer, mangle_from_=False,
            policy=message.policy.clone(linesep='\r\n'))
        try:
            generator.flatten(message)
            return buffer.getvalue()
        except (email.errors.MessageError, ValueError) as e:
            raise InvalidHeader(f'cannot serialise the message: {e}') \
                from None
    raise MessageError(
        'message must be str, bytes or email.message.Message, not '
        f'{type(message).__name__}')


class _LineByLineGenerator(email.generator.BytesGenerator):
    """What ``Message.as_bytes()`` uses, but writing a part's lines as it
    finds them: the base class splits the whole text into a list first,
    which for a text of many short lines costs many times its size."""

    def _write_lines(self, text):
        end = 0
        for line in _TEXT_LINE.finditer(text):
            self.write(line.group(1))
            self.write(self._NL)
            end = line.end()
        if end < len(text):
            self.write(text[end:])


def _check_part_headers(part):
    """Refuse what would let a header of a message object (of any of its
    parts) become another header or break the header block."""
    for name, value in part.raw_items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise InvalidHeader(
                f'malformed header name {name!r}: a header name is printable '
                'ASCII without space or colon')
        if not isinstance(value, (str, email.header.Header)):
            raise InvalidHeader(
                f'header {name} has a value of type {type(value).__name__}, '
                'not text: give a str')
        text = str(value)
        if _INJECTED_LINE.search(text):
            raise InvalidHeader(
                f'header {name} contains a line break that starts a new '
                f'header (header injection?): {text[:60]!r}')
        if '\0' in text:
            raise InvalidHeader(f'header {name} contains NUL: {text[:60]!r}')


def normalise_line_endings(data: bytes) -> bytes:
    """Every line ending as CRLF; ``data`` itself if it has no other.

    By whole-buffer replacing, not per line: a message of many short lines
    would cost dozens of times its size as a list of pieces.
    """
    crlf = data.count(b'\r\n')
    if data.count(b'\r') == crlf == data.count(b'\n'):
        return data
    if crlf:
        data = data.replace(b'\r\n', b'\n')
    if b'\r' in data:
        data = data.replace(b'\r', b'\n')
    return data.replace(b'\n', b'\r\n')


def _check_line_length(data):
    long_line = _LONG_LINE.search(data)
    if long_line:
        start = long_line.start()
        end = data.find(b'\r\n', start)
        length = (len(data) if end < 0 else end) - start
        raise LineTooLong(
            f'a line of the message is {length} bytes; SMTP allows 998. '
            'Encode the body (quoted-printable or base64), e.g. by building '
            'it with email.message.EmailMessage.set_content()')


def _header_end(data):
    """Where the header block of CRLF message bytes ends (after the CRLF of
    its last line; the blank line and body follow)."""
    end = data.find(b'\r\n\r\n')
    return len(data) if end < 0 else end + 2


def _check_header_block(data, end):
    """Each line of ``data[:end]`` is a field or the fold of one."""
    nul = data.find(b'\0', 0, end)
    if nul >= 0:
        previous_end = data.rfind(b'\r\n', 0, nul)
        start = 0 if previous_end < 0 else previous_end + 2
        raise InvalidHeader(
            f'header line contains NUL: {_line_at(data, start)!r}')
    if data[:1] in (b' ', b'\t'):
        malformed = 0
    else:
        match = _MALFORMED_HEADER_LINE.search(data, 0, end)
        malformed = match.start() if match else None
    if malformed is not None:
        where = 'first line' if malformed == 0 else 'header block'
        raise InvalidHeader(
            f'message has a malformed {where}: {_line_at(data, malformed)!r}; '
            'a message starts with headers ("Name: value"), then a blank '
            'line')


def _line_at(data, start):
    """The line of ``data`` at ``start``, at most 60 bytes of it."""
    end = data.find(b'\r\n', start, start + 60)
    return data[start:start + 60 if end < 0 else end + 2]


def _noted_fields(data, end):
    """``[(lowercase name, start, stop)]`` of the fields of the header block
    ``data[:end]`` that prepare() reads or removes."""
    fields = []
    for match in _NOTED_FIELD.finditer(data, 0, end):
        # Without a line ending the field ends with the data (a queue file
        # of zope.sendmail's may be cut short).
        field_end = _FIELD_END.search(data, match.end(), end)
        stop = field_end.end() if field_end else end
        fields.append((match.group(1).lower(), match.start(), stop))
    return fields


def subject_of(data: bytes) -> Optional[str]:
    """The Subject (RFC 2047 words decoded) of message bytes, or None."""
    head = data[:_header_end(data)]
    try:
        parsed = email.parser.BytesHeaderParser(
            policy=email.policy.default).parsebytes(head)
        subject = parsed['Subject']
    except (email.errors.MessageError, ValueError, IndexError):
        return None
    return ' '.join(str(subject).split()) if subject is not None else None


def message_id_of(data: bytes) -> Optional[str]:
    """The Message-Id (without brackets) of message bytes, or None."""
    end = _header_end(data)
    try:
        _check_header_block(data, end)
        return _message_id(data, _noted_fields(data, end))
    except MessageError:
        return None


def _message_id(data, fields):
    values = [data[start:stop].split(b':', 1)[1]
              for name, start, stop in fields if name == b'message-id']
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
