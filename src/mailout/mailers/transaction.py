"""The SMTP (and LMTP) mail transaction over an open session: MAIL, RCPT,
DATA, and what the replies mean for each recipient.

Which replies are permanent is `mailout.replies`' to say.  A session the
server ended, or that is out of step after a failure, is ended here (its
socket is then None): the caller opens a new one for the next message.
"""
import smtplib

from mailout.interfaces import PermanentDeliveryError
from mailout.mailers.connection import text
from mailout.mailers.session import end
from mailout.replies import delivery_error


class Reconnect(Exception):
    """A reused session turned out to be closed before MAIL FROM was
    accepted: nothing was sent, a new session may try again.  Its
    ``__cause__`` says why."""


def final_reply(connection, toaddrs, refused, code, reply):
    """The refused recipients, given SMTP's one reply to the final dot."""
    if code != 250:
        rset(connection)
        return abandoned(toaddrs, refused, code, reply)
    return refused


def transact(connection, fromaddr, toaddrs, message, all_or_none=False,
             final_replies=final_reply):
    """Send one message over ``connection``; return the refused recipients
    as `IMailoutMailer.send` does.

    ``final_replies(connection, toaddrs, refused, code, text)`` reads what
    the server says after the final dot (SMTP: one reply, LMTP: one per
    accepted recipient) and returns the refused recipients.

    Raises `Reconnect` when the session was closed before MAIL FROM was
    accepted, a `DeliveryError` for a refusal of the whole message, and
    smtplib's errors and `OSError` when the session is lost mid-way (then
    the caller ends it: if that was after the final dot, the relay may have
    the message, RFC 1047's window).
    """
    # RFC 6152: say that an 8-bit body is one, where the relay can take it.
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
        code, reply = connection.mail(fromaddr, options)
    except (smtplib.SMTPServerDisconnected, ConnectionError) as e:
        raise Reconnect() from e
    if code == 421:
        # The server is closing the connection (Postfix says so when it
        # drops an idle one): nothing was sent.
        raise Reconnect() from delivery_error(code, reply)
    if code != 250:
        rset(connection)
        raise delivery_error(code, reply)
    for address in toaddrs:
        code, reply = connection.rcpt(address)
        if code == 421:
            # Closing the connection: the transaction is over, for the
            # recipients accepted so far too.
            end(connection)
            return abandoned(toaddrs, refused, code, reply)
        if code not in (250, 251):
            refused[address] = (code, text(reply))
    if len(refused) == len(toaddrs) or refused and all_or_none:
        rset(connection)
        return refused
    try:
        code, reply = connection.data(message)
    except smtplib.SMTPDataError as e:
        # smtplib raises this for a non-354 answer to DATA.
        rset(connection)
        return abandoned(toaddrs, refused, e.smtp_code, e.smtp_error)
    return final_replies(connection, toaddrs, refused, code, reply)


def rset(connection):
    """Reset the transaction after a refusal.  The server may have closed
    the connection (it must after a 421): its reply counts, not the failed
    RSET, and the session ends."""
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
