"""The SMTP (and LMTP) mail transaction over an open session: MAIL, RCPT,
DATA, the message, and what the replies mean for each recipient.

Where the server offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA
go out in one write and their replies are read in order, matched by
position; the message's content may then be followed at once by the next
message's commands (`Transaction.group`), so that a stream of messages
costs one round trip each.  Otherwise each command waits for its reply.

Which replies are permanent is `mailout.replies`' to say.  A session the
server ended, or that is out of step after a failure, is ended here (its
socket is then None): the caller opens a new one for the next message.
"""
import re
import smtplib

from mailout.interfaces import PermanentDeliveryError
from mailout.interfaces import Refused
from mailout.mailers.connection import text
from mailout.mailers.session import end
from mailout.replies import delivery_error


class Reconnect(Exception):
    """A reused session turned out to be closed before MAIL FROM was
    accepted: nothing was sent, a new session may try again.  Its
    ``__cause__`` says why."""


def final_reply(connection, toaddrs, refused, code, reply):
    """The refused recipients, given SMTP's one reply to the final dot.

    The transaction is over whatever the reply (RFC 5321 section 4.1.1.4):
    no RSET, which would put its reply behind the next message's pipelined
    commands."""
    if code == 421:
        end(connection)         # the server is closing the session
    if code != 250:
        return abandoned(toaddrs, refused, code, reply)
    return refused


#: What no envelope address may contain: a control character would end or
#: split the command, an angle bracket its address.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>]')

#: The most commands written before their replies are read: a message for
#: thousands of recipients must not fill both sides' socket buffers, each
#: waiting for the other to read (RFC 2920 section 3.5).
MAX_GROUP = 100


class Transaction:
    """One message's mail transaction over ``connection``.

    `begin` sends MAIL, RCPT and DATA and reads their replies; when the
    server waits for the message, `content` is what to send (the caller
    may append the next transaction's `group` to it) and `end` reads the
    replies to the final dot.

    ``final_replies(connection, toaddrs, refused, code, text)`` reads what
    the server says after the final dot (SMTP: one reply, LMTP: one per
    accepted recipient) and returns the refused recipients.

    With ``all_or_none`` nothing is sent when any recipient is refused, so
    DATA waits for the RCPT replies even when pipelining.  Creating one
    raises `PermanentDeliveryError` when the addresses need SMTPUTF8 and
    the server does not offer it.
    """

    def __init__(self, connection, fromaddr, toaddrs, message,
                 all_or_none=False, pipelining=False,
                 final_replies=final_reply):
        self.connection = connection
        self.toaddrs = toaddrs
        self.message = message
        self.all_or_none = all_or_none
        self.final_replies = final_replies
        self.refused: Refused = {}
        self._commands = commands(connection, fromaddr, toaddrs, message)
        #: How many commands may be pipelined (all_or_none: not DATA).
        self._pipelined = len(self._commands) - all_or_none if pipelining \
            else 0
        self._written = 0           # how many commands went out

    def group(self) -> bytes:
        """The commands that go out in the first write (empty without
        pipelining)."""
        return b''.join(self._commands[:min(self._pipelined, MAX_GROUP)])

    def begin(self, sent: bool = False) -> bool:
        """Send MAIL, RCPT and DATA (the `group` unless ``sent``: it went
        out with the previous message) and read their replies.  True when
        the server waits for the message; otherwise the transaction is over
        and `refused` names the refused recipients with their replies.

        Raises `Reconnect` when the session was closed before MAIL FROM was
        accepted, a `DeliveryError` for a refusal of the whole message, and
        smtplib's errors and `OSError` when the session is lost mid-way.
        """
        connection, toaddrs = self.connection, self.toaddrs
        try:
            if sent:
                self._written = min(self._pipelined, MAX_GROUP)
            code, reply = self._reply(0)
        except (smtplib.SMTPServerDisconnected, ConnectionError) as e:
            raise Reconnect() from e
        if code == 421:
            # The server is closing the connection (Postfix says so when it
            # drops an idle one): nothing was sent.
            raise Reconnect() from delivery_error(code, reply)
        if code != 250:
            self._drain(1)
            rset(connection)
            raise delivery_error(code, reply)
        refused: Refused = {}
        for i, address in enumerate(toaddrs, 1):
            code, reply = self._reply(i)
            if code == 421:
                # Closing the connection: the transaction is over, for the
                # recipients accepted so far too.
                end(connection)
                self.refused = abandoned(toaddrs, refused, code, reply)
                return False
            if code not in (250, 251):
                refused[address] = (code, text(reply))
        self.refused = refused
        if len(refused) == len(toaddrs) or refused and self.all_or_none:
            self._drain(len(self._commands) - 1)
            rset(connection)
            return False
        code, reply = self._reply(len(self._commands) - 1)     # DATA
        if code != 354:
            rset(connection)
            self.refused = abandoned(toaddrs, refused, code, reply)
            return False
        return True

    def content(self) -> bytes:
        """The message as DATA sends it: dot-stuffed, ending in CRLF.CRLF.
        """
        data = re.sub(rb'(?m)^\.', b'..', self.message)
        if not data.endswith(b'\r\n'):
            data += b'\r\n'
        return data + b'.\r\n'

    def end(self) -> Refused:
        """Read the replies to the final dot (sent by the caller); return
        the refused recipients."""
        code, reply = self.connection.getreply()
        return self.final_replies(self.connection, self.toaddrs,
                                  self.refused, code, reply)

    def _reply(self, i):
        """The reply to command ``i``, which is sent first if it has not
        gone out: with the commands after it that may be pipelined, up to
        `MAX_GROUP`."""
        if i >= self._written:
            end = max(i + 1, min(self._pipelined, i + MAX_GROUP))
            self.connection.send(b''.join(self._commands[i:end]))
            self._written = end
        return self.connection.getreply()

    def _drain(self, i):
        """Read the replies still due to commands written, from command
        ``i`` on, the transaction having failed already: a DATA the server
        accepted gets a lone dot, which sends nothing (RFC 2920 section
        3.1).  A session lost meanwhile is ended; the failure stands."""
        try:
            for i in range(i, self._written):
                code, _ = self.connection.getreply()
                if code == 421:
                    end(self.connection)
                    return
                if code == 354:
                    self.connection.send(b'.\r\n')
                    self.connection.getreply()
        except (smtplib.SMTPException, OSError):
            end(self.connection)


def commands(connection, fromaddr, toaddrs, message):
    """MAIL, one RCPT per recipient and DATA, each a line of bytes.
    Addresses were checked when queued; a queue file from elsewhere could
    still smuggle a command or parameter into the session: refused."""
    for address in (fromaddr, *toaddrs):
        if _UNSAFE.search(address):
            raise PermanentDeliveryError(
                (553, f'5.1.3 malformed envelope address {address!r}'))
    # RFC 6152: say that an 8-bit body is one, where the relay can take it.
    options = ' BODY=8BITMIME' if not message.isascii() \
        and connection.has_extn('8bitmime') else ''
    encoding = 'ascii'
    if not all(a.isascii() for a in (fromaddr, *toaddrs)):
        if not connection.has_extn('smtputf8'):
            # What Postfix says in this case; retrying cannot help.
            raise PermanentDeliveryError(
                (555, '5.6.7 the relay does not offer SMTPUTF8, which '
                      'the non-ASCII addresses need'))
        options += ' SMTPUTF8'
        encoding = 'utf-8'
    # The addresses were validated when queued: bare, without CR or LF.
    lines = [f'MAIL FROM:<{fromaddr}>{options}',
             *(f'RCPT TO:<{a}>' for a in toaddrs), 'DATA']
    return [f'{line}\r\n'.encode(encoding) for line in lines]


def rset(connection):
    """Reset the transaction after a refusal.  The server may have closed
    the connection (it must after a 421): its reply counts, not the failed
    RSET, and the session ends."""
    if connection.sock is None:
        return
    try:
        connection.rset()
    except (smtplib.SMTPException, OSError):
        end(connection)


def abandoned(toaddrs, refused, code, reply):
    """A transaction the server ended with ``code`` after RCPT: raise its
    error, or, when some recipients were refused already, return every
    recipient with its own reply (so a 5xx-refused one fails now even if
    the message as a whole was only deferred)."""
    if not refused:
        raise delivery_error(code, reply)
    reply = (code, text(reply))
    return {address: refused.get(address, reply) for address in toaddrs}
