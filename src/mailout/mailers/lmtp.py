"""The LMTP mailer (RFC 2033): an SMTP mailer that says LHLO and reads one
reply per accepted recipient after the message."""
import smtplib

from mailout.mailers import session
from mailout.mailers.connection import describe
from mailout.mailers.connection import text
from mailout.mailers.smtp import SMTPMailer


def final_replies(connection, toaddrs, refused, code, reply):
    """Each accepted recipient's reply to the final dot, in RCPT order.

    smtplib read the first one only (CPython issue 76984); read one more
    for every other accepted recipient."""
    accepted = [a for a in toaddrs if a not in refused]
    refused = dict(refused)
    for i, address in enumerate(accepted):
        try:
            if i:
                code, reply = connection.getreply()
        except (smtplib.SMTPException, OSError) as e:
            # Those answered so far keep their replies; the rest are tried
            # again.
            session.end(connection)
            refused.update(dict.fromkeys(accepted[i:], (None, describe(e))))
            break
        if code != 250:
            refused[address] = (code, text(reply))
    return refused


class LMTPMailer(SMTPMailer):
    """Hand messages to an LMTP server (RFC 2033), such as Mailman 3's LMTP
    runner, over TCP or a unix socket.  The server answers the final dot
    once per accepted recipient; each recipient's reply counts."""

    final_replies = staticmethod(final_replies)

    def __repr__(self):
        return f'<LMTPMailer {self.name!r} {self.settings.destination}>'

    def _open(self, host, port, settings, ip=None):
        return session.open_lmtp(host, port, settings, ip)
