"""Session set-up with one relay: connect, greet, STARTTLS, AUTH; what it
achieved; and ending a session."""
import functools
import logging
import os
import smtplib
import ssl
import stat
import socket

from mailout.interfaces import TransientDeliveryError
from mailout.mailers.connection import describe
from mailout.mailers.connection import LMTPConnection
from mailout.mailers.connection import SMTPConnection
from mailout.mailers.connection import SMTPSSLConnection
from mailout.mailers.connection import text

log = logging.getLogger('mailout.mailers')  # the name the README documents


def connect(open, host, port, settings):
    """``open(host, port, settings)``, a new session with one relay (the
    caller ends it), or `TransientDeliveryError` saying what failed."""
    try:
        return open(host, port, settings)
    except smtplib.SMTPAuthenticationError as e:
        reason = f'AUTH failed: {e.smtp_code} {text(e.smtp_error)}'
    except (smtplib.SMTPException, OSError, ValueError) as e:
        # ValueError: a password file that is not UTF-8, a malformed
        # AUTH challenge.
        reason = describe(e)
    raise TransientDeliveryError((None, reason))


def open_smtp(host, port, settings, context, ip=None):
    """An SMTP session: greeted, encrypted and authenticated as
    ``settings`` (an smtp-mailer's) say; ``context`` for TLS; to ``ip``,
    one of ``host``'s addresses, if given."""
    s = settings
    local_hostname = s.local_hostname or fqdn()
    if s.tls == 'ssl':
        connection = SMTPSSLConnection(host, port,
                                       local_hostname=local_hostname,
                                       timeout=s.timeout, context=context,
                                       connect_to=ip)
    else:
        connection = SMTPConnection(host, port, local_hostname=local_hostname,
                                    timeout=s.timeout, connect_to=ip)
    try:
        greet(connection)
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


def open_lmtp(host, port, settings, ip=None):
    """An LMTP session, greeted (LHLO).  A ``host`` starting with "/" is a
    unix socket (smtplib.LMTP's rule)."""
    connection = LMTPConnection(host, port or 0,
                                local_hostname=settings.local_hostname
                                or fqdn(), timeout=settings.timeout,
                                connect_to=ip)
    try:
        greet(connection)                       # LHLO
    except BaseException:
        connection.close()
        raise
    return connection


def greet(connection):
    """EHLO (LMTP: LHLO), or HELO where the server does not know EHLO
    (smtplib's ehlo_or_helo_if_needed).  But a 4xx reply to EHLO (421:
    closing, overloaded) says "not now", not "say HELO": it is raised as
    `smtplib.SMTPHeloError`, so the relay rests with that reply as the
    reason."""
    code, reply = connection.ehlo()
    if 400 <= code < 500:
        raise smtplib.SMTPHeloError(code, reply)
    if not 200 <= code < 300:
        code, reply = connection.helo()
        if not 200 <= code < 300:
            raise smtplib.SMTPHeloError(code, reply)


def negotiated(connection, settings):
    """What a session's set-up achieved: the server's name from its
    EHLO/LHLO reply, the TLS version, the user authenticated as."""
    greeting = (connection.ehlo_resp or b'').decode('utf-8', 'replace')
    sock = connection.sock
    return {
        'server': greeting.split('\n', 1)[0].split(' ', 1)[0] or None,
        'tls': sock.version() if isinstance(sock, ssl.SSLSocket) else None,
        'auth': getattr(settings, 'username', None),
    }


def end(connection):
    """End a session politely (QUIT), or just close it.  Never raises."""
    try:
        connection.quit()
    except (smtplib.SMTPException, OSError):
        connection.close()


def tls_context(settings):
    """The TLS context of ``settings``: certificates verified against
    ``ca_file`` (or the system's store) unless turned off."""
    context = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.verify_certificates:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@functools.cache
def fqdn():
    """This host's name for EHLO (looked up once: it may take a DNS query).
    """
    return socket.getfqdn()


def warn_if_exposed(path):
    """Log a warning when the password file ``path`` is open to group or
    others (as ssh does for a private key)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return                  # reading it when connecting will say why
    if mode & 0o077:
        log.warning('password-file %s is open to group or others (mode '
                    '0%o): chmod 600 it', path, mode)
