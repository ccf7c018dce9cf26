"""Mailers: hand one message to a relay (zope.sendmail's IMailer).

``send(fromaddr, toaddrs, message)`` returns the recipients the server
refused, ``{address: (code, text)}``, and raises `TransientDeliveryError` or
`PermanentDeliveryError` when the message as a whole was not taken.  Each
thread keeps its own connection open across messages; ``close()`` ends the
calling thread's connection.

Every reply must arrive in full within the mailer's ``timeout`` of its
command having been sent (the greeting: of the connection being made) and
be at most `MAX_REPLY_SIZE` bytes; a relay that stalls, trickles or does
not stop replying is rested like one that timed out.
"""
import base64
import dataclasses
import functools
import hmac
import itertools
import logging
import os
import smtplib
import socket
import ssl
import stat
import subprocess
import threading
import time

from zope.interface import implementer

from mailout.interfaces import IMailoutMailer
from mailout.interfaces import PermanentDeliveryError
from mailout.interfaces import TransientDeliveryError
from mailout.replies import delivery_error

log = logging.getLogger(__name__)

#: The longest reply taken, in bytes.  RFC 5321 allows 512 a line; real
#: multi-line replies (the extensions after EHLO, an explained refusal)
#: stay within a few KB.  smtplib limits each line, not their number.
MAX_REPLY_SIZE = 64 * 1024


@implementer(IMailoutMailer)
class Mailer:
    """What every mailer shares: zope.sendmail's IMailer asks for ``vote``
    and ``abort``, and there is nothing to check before sending nor to
    undo; ``close`` ends the calling thread's connection, if any; ``probe``
    has nothing to check."""

    name = None
    smtputf8 = False

    def vote(self, fromaddr, toaddrs, message):
        pass

    def abort(self):
        pass

    def close(self):
        pass

    def probe(self, timeout=None):
        return []


class SMTPMailer(Mailer):
    """Deliver over SMTP or SMTPS, with STARTTLS and AUTH as configured.

    With several relays, new connections go to each in turn; a relay that
    fails to connect or stalls past the timeout is left alone for
    ``down-time`` while the others take its share.

    ``send(..., all_or_none=True)`` (what a direct delivery asks for) sends
    nothing when any recipient is refused at RCPT.
    """

    def __init__(self, settings):
        self.settings = settings
        self.name = settings.name
        self.smtputf8 = settings.smtputf8
        self._local = threading.local()
        self._turn = itertools.count()
        self._down = {}             # relay -> (monotonic time up again, why)
        self._down_lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)
        # An LMTP mailer's settings have no password.
        password_file = getattr(settings, 'password_file', None)
        if password_file:
            _warn_if_exposed(password_file)

    def _after_fork(self):
        # A forked child must not talk over its parent's connections (the
        # sockets are shared): forget them without QUIT.
        self._local = threading.local()
        self._down_lock = threading.Lock()

    def __repr__(self):
        relays = ', '.join(f'{h}:{p}' for h, p in self.settings.relays)
        return f'<SMTPMailer {self.name!r} {relays} tls={self.settings.tls}>'

    def send(self, fromaddr, toaddrs, message, all_or_none=False):
        args = fromaddr, toaddrs, message, all_or_none
        connection = getattr(self._local, 'connection', None)
        if connection is not None and \
                self._local.sent >= self.settings.messages_per_connection:
            self.close()
            connection = None
        if connection is not None:
            try:
                return self._send(connection, *args)
            except _Reconnect:
                # The server closed the idle connection before MAIL FROM
                # was accepted: nothing was sent, so try on a new one.
                self.close()
        self._local.connection, self._local.relay = self._connect()
        self._local.sent = 0
        try:
            return self._send(self._local.connection, *args)
        except _Reconnect as e:
            self.close()
            if isinstance(e.__cause__, TransientDeliveryError):
                raise e.__cause__ from None
            raise TransientDeliveryError((None, _describe(e.__cause__))) \
                from None

    def close(self):
        connection = getattr(self._local, 'connection', None)
        self._local.connection = None
        if connection is not None:
            try:
                connection.quit()
            except (smtplib.SMTPException, OSError):
                connection.close()

    def _send(self, connection, fromaddr, toaddrs, message, all_or_none):
        self._local.sent += 1
        # RFC 6152: say that an 8-bit body is one, where the relay can
        # take it.
        options = ['BODY=8BITMIME'] if not message.isascii() \
            and connection.has_extn('8bitmime') else []
        if not all(a.isascii() for a in (fromaddr, *toaddrs)):
            if not connection.has_extn('smtputf8'):
                # What Postfix says in this case; retrying cannot help.
                raise PermanentDeliveryError(
                    (555, '5.6.7 the relay does not offer SMTPUTF8, which '
                          'the non-ASCII addresses need'))
            options.append('SMTPUTF8')
        refused = {}
        try:
            try:
                code, text = connection.mail(fromaddr, options)
            except (smtplib.SMTPServerDisconnected, ConnectionError) as e:
                raise _Reconnect() from e
            if code == 421:
                # The server is closing the connection (Postfix says so
                # when it drops an idle one): nothing was sent.
                raise _Reconnect() from delivery_error(code, text)
            if code != 250:
                self._rset(connection)
                raise delivery_error(code, text)
            for address in toaddrs:
                code, text = connection.rcpt(address)
                if code == 421:
                    # Closing the connection: the transaction is over, for
                    # the recipients accepted so far too.
                    self.close()
                    return _abandoned(toaddrs, refused, code, text)
                if code not in (250, 251):
                    refused[address] = (code, _text(text))
            if len(refused) == len(toaddrs) or refused and all_or_none:
                self._rset(connection)
                return refused
            try:
                code, text = connection.data(message)
            except smtplib.SMTPDataError as e:
                # smtplib raises this for a non-354 answer to DATA.
                self._rset(connection)
                return _abandoned(toaddrs, refused, e.smtp_code, e.smtp_error)
            return self._after_data(connection, toaddrs, refused, code, text)
        except (smtplib.SMTPException, OSError) as e:
            # Connection lost or timed out mid-transaction.  If that was
            # after the final dot, the relay may have the message: RFC 1047's
            # window, and the one case where a retry can send it twice.
            self.close()
            reason = _describe(e)
            if isinstance(e, socket.timeout):   # a stalled relay
                self._mark_down(self._local.relay, reason)
            raise TransientDeliveryError(
                (None, f'{_address(self._local.relay)}: {reason}')) from None

    def _after_data(self, connection, toaddrs, refused, code, text):
        """The refused recipients, given the reply to the final dot."""
        if code != 250:
            self._rset(connection)
            return _abandoned(toaddrs, refused, code, text)
        return refused

    def _rset(self, connection):
        # After a refusal the server may have closed the connection (it
        # must after a 421): its reply counts, not the failed RSET.
        try:
            connection.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def _connect(self):
        """``(connection, relay)`` to the next relay that is up."""
        errors = []
        for relay in self._relays_in_turn():
            try:
                return self.connect(*relay), relay
            except TransientDeliveryError as e:
                self._mark_down(relay, str(e))
                errors.append(f'{_address(relay)}: {e}')
        if not errors:
            with self._down_lock:
                errors = [f'{_address(r)}: marked down after: {why}'
                          for r, (_, why) in self._down.items()]
        raise TransientDeliveryError((None, '; '.join(errors)))

    def probe(self, timeout=None):
        settings = self.settings if timeout is None else \
            dataclasses.replace(self.settings, timeout=timeout)
        results = []
        for host, port in self.settings.relays:
            result = dict(host=host, port=port, ok=False, server=None,
                          tls=None, auth=None, error=None)
            started = time.monotonic()
            try:
                connection = self.connect(host, port, settings)
            except TransientDeliveryError as e:
                result['error'] = e.reply[1]
            else:
                result.update(ok=True, **_negotiated(connection, settings))
                try:
                    connection.quit()
                except (smtplib.SMTPException, OSError):
                    connection.close()
            result['seconds'] = round(time.monotonic() - started, 3)
            results.append(result)
        return results

    def connect(self, host, port, settings=None):
        """A new connection to one relay: greeted, encrypted and
        authenticated as configured (the caller closes it).  Raises
        `TransientDeliveryError` saying what failed."""
        try:
            return self._open(host, port, settings or self.settings)
        except smtplib.SMTPAuthenticationError as e:
            reason = f'AUTH failed: {e.smtp_code} {_text(e.smtp_error)}'
        except (smtplib.SMTPException, OSError, ValueError) as e:
            # ValueError: a password file that is not UTF-8, a malformed
            # AUTH challenge.
            reason = _describe(e)
        raise TransientDeliveryError((None, reason))

    def _relays_in_turn(self):
        """The relays that are up, starting with the next one's turn; all of
        them when every one is down and its rest is over."""
        relays = self.settings.relays
        start = next(self._turn) % len(relays)
        now = time.monotonic()
        with self._down_lock:
            return [r for r in relays[start:] + relays[:start]
                    if self._down.get(r, (0,))[0] <= now]

    def _mark_down(self, relay, reason):
        if self.settings.down_time > 0:
            log.warning('%r: relay %s marked down for %gs: %s', self,
                        _address(relay), self.settings.down_time, reason)
            with self._down_lock:
                self._down[relay] = (time.monotonic()
                                     + self.settings.down_time, reason)

    def _open(self, host, port, s):
        context = self._tls_context if s.tls != 'none' else None
        local_hostname = s.local_hostname or _fqdn()
        if s.tls == 'ssl':
            connection = _SMTP_SSL(host, port, local_hostname=local_hostname,
                                   timeout=s.timeout, context=context)
        else:
            connection = _SMTP(host, port, local_hostname=local_hostname,
                               timeout=s.timeout)
        try:
            connection.ehlo_or_helo_if_needed()
            encrypted = s.tls == 'ssl'
            if s.tls in ('starttls', 'opportunistic'):
                if connection.has_extn('starttls'):
                    connection.starttls(context=context)
                    connection.ehlo()
                    encrypted = True
                elif s.tls == 'starttls':
                    raise TransientDeliveryError(
                        (None, 'the server does not offer STARTTLS, which '
                               '"tls starttls" requires'))
            if s.username:
                if not encrypted and not s.allow_plain_auth:
                    raise TransientDeliveryError(
                        (None, 'refusing AUTH over an unencrypted connection '
                               '(set allow-plain-auth to permit it)'))
                connection.login(s.username, s.read_password())
        except BaseException:
            connection.close()
            raise
        return connection

    @functools.cached_property
    def _tls_context(self):
        # Built once: loading the CA store costs ~20 ms of CPU.  Threads
        # may share one context.
        context = ssl.create_default_context(cafile=self.settings.ca_file)
        if not self.settings.verify_certificates:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _warn_if_exposed(path):
    # As ssh does for a private key: other users have no business there.
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return                  # reading it when connecting will say why
    if mode & 0o077:
        log.warning('password-file %s is open to group or others (mode '
                    '0%o): chmod 600 it', path, mode)


def _negotiated(connection, settings):
    """What a connection's session set-up achieved, for `probe`."""
    greeting = (connection.ehlo_resp or b'').decode('utf-8', 'replace')
    sock = connection.sock
    return {
        'server': greeting.split('\n', 1)[0].split(' ', 1)[0] or None,
        'tls': sock.version() if isinstance(sock, ssl.SSLSocket) else None,
        'auth': getattr(settings, 'username', None),
    }


def _address(relay):
    return '%s:%s' % relay


def _abandoned(toaddrs, refused, code, text):
    """A transaction the server ended with ``code`` after RCPT: raise its
    error, or, when some recipients were refused already, return every
    recipient with its own reply (so a 5xx-refused one fails now even if
    the message as a whole was only deferred)."""
    if not refused:
        raise delivery_error(code, text)
    reply = (code, _text(text))
    return {address: refused.get(address, reply) for address in toaddrs}


class _Reconnect(Exception):
    """A reused connection turned out to be closed."""


_fqdn_cache = None


def _fqdn():
    global _fqdn_cache
    if _fqdn_cache is None:
        _fqdn_cache = socket.getfqdn()
    return _fqdn_cache


def _text(text):
    return text.decode('utf-8', 'replace') if isinstance(text, bytes) \
        else str(text)


def _describe(error):
    if isinstance(error, smtplib.SMTPResponseException):
        return f'{error.smtp_code} {_text(error.smtp_error)}'
    return f'{type(error).__name__}: {error}' if str(error) \
        else type(error).__name__


class RelayStalled(socket.timeout):
    """The relay did not complete a reply: not within the timeout (it
    stalled or trickled), or not within `MAX_REPLY_SIZE` bytes.  A timeout,
    so the relay rests for down-time."""


#: AUTH challenges answered before giving up (smtplib's limit).
MAX_CHALLENGES = 5


class _Bounded:
    """What our connections change in smtplib's: each reply bounded in time
    and size, a timeout called one, and credentials sent as UTF-8.

    smtplib waits up to ``timeout`` for each read, so a relay that sends a
    line now and then holds the connection for ever; it keeps every line of
    a reply however many come, and reports a read or send that timed out as
    SMTPServerDisconnected, which is no reason to rest a relay.
    """

    def getreply(self):
        if self.file is None:   # smtplib resets it for a new socket or TLS
            self.file = _ReplyReader(self.sock, self.timeout)
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


class _ReplyReader:
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


class _SMTP(_Bounded, smtplib.SMTP):
    pass


class _SMTP_SSL(_Bounded, smtplib.SMTP_SSL):
    pass


class _LMTP(_Bounded, smtplib.LMTP):
    pass


class LMTPMailer(SMTPMailer):
    """Hand messages to an LMTP server (RFC 2033), such as Mailman 3's LMTP
    runner, over TCP or a unix socket.  The server answers the final dot
    once per accepted recipient; each recipient's reply counts."""

    def __repr__(self):
        return f'<LMTPMailer {self.name!r} {self.settings.destination}>'

    def _open(self, host, port, settings):
        # smtplib.LMTP takes a path starting with "/" as a unix socket.
        connection = _LMTP(host, port or 0,
                           local_hostname=settings.local_hostname
                           or _fqdn(), timeout=settings.timeout)
        try:
            connection.ehlo_or_helo_if_needed()     # LHLO
        except BaseException:
            connection.close()
            raise
        return connection

    def _after_data(self, connection, toaddrs, refused, code, text):
        # smtplib read the first reply only (CPython issue 76984); read one
        # more for every other accepted recipient, in RCPT order.
        accepted = [a for a in toaddrs if a not in refused]
        refused = dict(refused)
        for i, address in enumerate(accepted):
            try:
                if i:
                    code, text = connection.getreply()
            except (smtplib.SMTPException, OSError) as e:
                # Those answered so far keep their replies; the rest are
                # tried again.
                self.close()
                refused.update(dict.fromkeys(accepted[i:],
                                             (None, _describe(e))))
                break
            if code != 250:
                refused[address] = (code, _text(text))
        return refused


class SendmailMailer(Mailer):
    """Run the local sendmail program: ``sendmail -i -f FROM -- TO...``,
    with no shell, the message on its standard input."""

    # sysexits.h: what the program's exit status says about retrying.
    PERMANENT_EXITS = {64: 'EX_USAGE', 65: 'EX_DATAERR', 67: 'EX_NOUSER',
                       68: 'EX_NOHOST', 69: 'EX_UNAVAILABLE',
                       77: 'EX_NOPERM'}

    def __init__(self, settings):
        self.settings = settings
        self.name = settings.name

    def __repr__(self):
        return f'<SendmailMailer {self.name!r} {self.settings.path}>'

    def send(self, fromaddr, toaddrs, message, all_or_none=False):
        # sendmail takes every recipient or none.
        command = [self.settings.path, *self.settings.arguments,
                   '-i', '-f', fromaddr, '--', *toaddrs]
        # A local program takes the local line ending.
        message = message.replace(b'\r\n', b'\n')
        try:
            result = subprocess.run(command, input=message,
                                    capture_output=True,
                                    timeout=self.settings.timeout)
        except subprocess.TimeoutExpired:
            raise TransientDeliveryError(
                (None, f'{self.settings.path} did not finish within '
                       f'{self.settings.timeout:g}s')) from None
        except OSError as e:
            raise TransientDeliveryError(
                (None, f'cannot run {self.settings.path}: {e}')) from None
        if result.returncode == 0:
            return {}
        status = result.returncode
        output = ' '.join(result.stderr.decode('utf-8', 'replace').split())
        text = f'{self.settings.path} exited with status {status}' \
            + (f' ({self.PERMANENT_EXITS[status]})'
               if status in self.PERMANENT_EXITS else '') \
            + (f': {output}' if output else '')
        if status in self.PERMANENT_EXITS:
            raise PermanentDeliveryError((550, text))
        raise TransientDeliveryError((451, text))
