"""Connections to a relay: smtplib's, with every reply bounded.

Every reply must arrive in full within the connection's ``timeout`` of its
command having been sent (the greeting: of the connection being made) and
be at most `MAX_REPLY_SIZE` bytes; a relay that stalls, trickles or does
not stop replying raises `RelayStalled`, a timeout, so that the mailer
rests the relay like one that timed out.  Credentials are sent as UTF-8.
A connection may go to one address of the host name (``connect_to``): the
name is still the one TLS checks the certificate against.
"""
import base64
import hmac
import smtplib
import socket
import time

#: The longest reply taken, in bytes.  RFC 5321 allows 512 a line; real
#: multi-line replies (the extensions after EHLO, an explained refusal)
#: stay within a few KB.  smtplib limits each line, not their number.
MAX_REPLY_SIZE = 64 * 1024


class RelayStalled(socket.timeout):
    """The relay did not complete a reply: not within the timeout (it
    stalled or trickled), or not within `MAX_REPLY_SIZE` bytes.  A timeout,
    so the relay rests for down-time."""


#: AUTH challenges answered before giving up (smtplib's limit).
MAX_CHALLENGES = 5


class BoundedReplies:
    """What our connections change in smtplib's: each reply bounded in time
    and size, a timeout called one, and credentials sent as UTF-8.

    smtplib waits up to ``timeout`` for each read, so a relay that sends a
    line now and then holds the connection for ever; it keeps every line of
    a reply however many come, and reports a read or send that timed out as
    SMTPServerDisconnected, which is no reason to rest a relay.
    """

    def __init__(self, *args, connect_to=None, **kwargs):
        #: The address connected to instead of the host name (None: the
        #: name); smtplib checks the certificate against the name.
        self.connect_to = connect_to
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        return super()._get_socket(self.connect_to or host, port, timeout)

    def getreply(self):
        if self.file is None:   # smtplib resets it for a new socket or TLS
            self.file = ReplyReader(self.sock, self.timeout)
        try:
            code, lines = self.file.reply()
        except BaseException:
            self.close()        # as smtplib does: the replies are out of step
            raise
        return code, b'\n'.join(line[4:].strip(b' \t\r\n') for line in lines)

    def send(self, s):
        try:
            super().send(s)
        except smtplib.SMTPServerDisconnected as e:
            if isinstance(e.__context__, socket.timeout):
                raise RelayStalled(f'timed out: sending took over '
                                   f'{self.timeout:g}s') from None
            raise

    def auth(self, mechanism, authobject, *, initial_response_ok=True):
        # smtplib's, but RFC 4954 credentials are UTF-8: smtplib encodes them
        # as ASCII, and its UnicodeEncodeError quotes the password.
        def encoded(response):
            return base64.b64encode(response.encode('utf-8')).decode('ascii')
        mechanism = mechanism.upper()
        response = authobject() if initial_response_ok else None
        if response is None:
            self._auth_challenge_count = 0
            code, reply = self.docmd('AUTH', mechanism)
        else:
            self._auth_challenge_count = 1
            code, reply = self.docmd('AUTH',
                                     f'{mechanism} {encoded(response)}')
        while code == 334 and self._auth_challenge_count <= MAX_CHALLENGES:
            self._auth_challenge_count += 1
            code, reply = self.docmd(encoded(
                authobject(base64.decodebytes(reply))))
        if code in (235, 503):
            return code, reply
        raise smtplib.SMTPAuthenticationError(code, reply)

    def auth_cram_md5(self, challenge=None):
        if challenge is None:       # CRAM-MD5 has no initial response
            return None
        digest = hmac.HMAC(self.password.encode('utf-8'), challenge, 'md5')
        return f'{self.user} {digest.hexdigest()}'


class ReplyReader:
    """The replies coming over one socket, each complete within ``timeout``
    and `MAX_REPLY_SIZE` bytes."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout
        self.buffer = bytearray()

    def reply(self):
        """``(code, lines)`` of the next reply; code -1 if it has none."""
        deadline = time.monotonic() + self.timeout
        lines, size = [], 0
        while True:
            line = self._readline(deadline, MAX_REPLY_SIZE - size)
            lines.append(line)
            size += len(line)
            try:
                code = int(line[:3])
            except ValueError:
                code = -1
                break
            if line[3:4] != b'-':
                break
        self.sock.settimeout(self.timeout)      # for sending and TLS
        return code, lines

    def _readline(self, deadline, limit):
        while True:
            end = self.buffer.find(b'\n', 0, limit) + 1
            if end:
                line = bytes(self.buffer[:end])
                del self.buffer[:end]
                return line
            if len(self.buffer) >= limit:
                raise RelayStalled(f'reply longer than '
                                   f'{MAX_REPLY_SIZE // 1024} KiB, cut off')
            self.buffer += self._receive(deadline)

    def _receive(self, deadline):
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise socket.timeout()
            self.sock.settimeout(remaining)
            data = self.sock.recv(8192)
        except socket.timeout:
            raise RelayStalled(f'timed out: no complete reply within '
                               f'{self.timeout:g}s') from None
        except OSError as e:
            raise smtplib.SMTPServerDisconnected(
                f'Connection unexpectedly closed: {e}') from None
        if not data:
            raise smtplib.SMTPServerDisconnected(
                'Connection unexpectedly closed')
        return data

    def close(self):
        pass                    # the socket is smtplib's to close


class SMTPConnection(BoundedReplies, smtplib.SMTP):
    """An SMTP connection with bounded replies."""


class SMTPSSLConnection(BoundedReplies, smtplib.SMTP_SSL):
    """An SMTPS (implicit TLS) connection with bounded replies."""


class LMTPConnection(BoundedReplies, smtplib.LMTP):
    """An LMTP connection with bounded replies."""


def text(value):
    """A reply's text as str."""
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) \
        else str(value)


def describe(error):
    """An error of smtplib or the socket as one line: the server's reply,
    or the exception's type and message."""
    if isinstance(error, smtplib.SMTPResponseException):
        return f'{error.smtp_code} {text(error.smtp_error)}'
    return f'{type(error).__name__}: {error}' if str(error) \
        else type(error).__name__
