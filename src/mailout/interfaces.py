"""Interfaces, events and exceptions of mailout.

What mailout promises (DESIGN.md section 3; each is proved by the tests):

1. Commit semantics: a message handed to ``send()`` is delivered if and only
   if its transaction commits.  Abort, a failed vote of another resource
   manager, or a savepoint rollback past the ``send()`` sends nothing and
   leaves no file behind.  Once every resource voted, the mail is never
   discarded.
2. Durability: once ``transaction.commit()`` returns, a queued message is on
   disk (file and directory fsync'ed) and survives ``kill -9`` and power
   loss.
3. Exactly-once hand-off to the relay, except for the window SMTP cannot close
   (the connection dies after the final ``.`` and before the reply, RFC 1047):
   a crash anywhere else neither loses nor duplicates a message.
4. Shared queues: any number of sender threads and processes (on several
   hosts too) may work one queue; each message is claimed by exactly one, and
   a claim whose owner died is recovered.
5. Failures: a transient failure (4xx, no connection, timeout) defers the
   message with backoff, a permanent one (5xx) moves it to ``failed/`` with
   the reply; recipients that accepted are never sent to again; after
   ``max-lifetime`` a deferred message fails.  Nothing is dropped silently:
   every outcome is logged and notified as an event, and an unreadable queue
   file lands in ``failed/`` with its reason.
6. Bad input never enters the queue: ``send()`` raises a subclass of
   `MailoutError` naming what is wrong.
7. Security: TLS certificates are verified unless a setting says otherwise;
   AUTH needs TLS unless allowed; secrets appear in no log, repr or
   exception; queue files are 0600 and queue directories 0700, and no link
   in a queue is followed.

The delivery and mailer interfaces are zope.sendmail's, so code written for
zope.sendmail works unchanged; `IMailoutMailer` adds to `IMailer` what
mailout's deliveries need of a mailer.
"""
import email.message
from collections.abc import Sequence
from typing import Optional
from typing import Union

from zope.interface import Attribute
from zope.interface import Interface
from zope.sendmail.interfaces import IDirectMailDelivery  # noqa: F401
from zope.sendmail.interfaces import IMailDelivery  # noqa: F401
from zope.sendmail.interfaces import IMailer  # noqa: F401
from zope.sendmail.interfaces import IQueuedMailDelivery  # noqa: F401


#: A server's reply, ``(code, text)``; the code is None when there was no
#: reply (the connection failed or was lost).
Reply = tuple[Optional[int], str]
#: The recipients a mailer refused, each with its reply.
Refused = dict[str, Reply]
#: What ``send()`` takes as a message.
MessageInput = Union[str, bytes, email.message.Message]
#: What a mailer's ``send_each`` takes for each message: ``(fromaddr,
#: toaddrs, message)`` as ``send`` takes them.
Envelope = tuple[str, Sequence[str], bytes]


class IMailoutMailer(IMailer):
    """What mailout's deliveries and processors ask of a mailer: zope.sendmail's
    `IMailer`, with what ``send`` returns and raises written down, ``close``
    and ``probe``.

    A mailer knows nothing of transactions and queues: it hands one message
    to the next hop now, or says why not.  Many threads call one mailer at
    once (a queued delivery's sender threads); it may keep a connection per
    thread open between messages.  A process that forks must not let the
    child use the parent's connections.

    ``vote`` and ``abort`` (zope.sendmail's) are no-ops for every mailer of
    mailout: there is nothing to check before sending nor to undo.

    A mailer whose relays rest after a failure may also offer, and the
    processor then uses (`mailout.mailers.Mailer` has no-op versions):
    ``share_relay_state(store)`` (keep the rests in the store the
    processes working one queue share), ``resting()`` (the ``host:port``
    of the relays that rest) and ``probe_resting(timeout=None)`` (`probe`
    those only, so that a relay that is back is noticed at once).
    """

    name = Attribute("The mailer's name: its section name in the "
                     "configuration and its IMailer utility name.")

    smtputf8 = Attribute(
        "True if this mailer may be given non-ASCII (SMTPUTF8, RFC 6531) "
        "addresses.  ``send()`` of a delivery refuses them otherwise, before "
        "anything is queued.  A mailer that says True and then finds the "
        "next hop cannot take them raises `PermanentDeliveryError`.")

    def send(fromaddr, toaddrs, message, all_or_none=False):
        """Hand one message to the next hop; return the refused recipients.

        ``fromaddr`` is the envelope sender and ``toaddrs`` a non-empty
        sequence of envelope recipients, both validated already (str, no
        CR/LF, ASCII unless `smtputf8`).  ``message`` is the message as
        bytes, with CRLF line endings and no line over 998 bytes.

        The return value is ``{address: (code, text)}`` of the recipients the
        next hop refused while it took the message for the others: an empty
        dict when every recipient has it.  ``code`` is the server's reply
        code, or None for a refusal with no reply (the connection was lost
        after some recipients were answered); `mailout.replies.is_permanent`
        says which of them to give up on.  A recipient in the result did not
        get the message; every other one did.  When every recipient is
        refused the result names them all and nothing was sent.

        With ``all_or_none`` (what a direct delivery asks for) the message is
        sent to nobody when any recipient is refused before it is sent (at
        RCPT): the result then names the refused ones and nothing was sent.
        Refusals that come after the message (an LMTP server answers for
        each recipient then) are too late for that and are returned as
        without ``all_or_none``.

        Raises `TransientDeliveryError` when nobody got the message and a
        later try may succeed (a 4xx reply, no relay reachable, a timeout,
        a TLS or AUTH failure), and `PermanentDeliveryError` when nobody got
        it and no later try can succeed (a 5xx reply).  The error's
        ``reply`` is ``(code, text)``; its text names no secret.

        The one case in which a recipient may get the message twice: the
        connection is lost after the message was sent and before the reply
        to it (RFC 1047); then ``send`` raises `TransientDeliveryError` and
        the caller tries again.
        """

    def send_each(envelopes, all_or_none=False, still_wanted=None):
        """Send each ``(fromaddr, toaddrs, message)`` of the iterable
        ``envelopes`` as ``send`` would; yield ``(envelope, outcome)`` for
        each, in order, as soon as its outcome is known: the refused
        recipients, or the `DeliveryError` that ``send`` would raise.

        ``still_wanted(envelope)``, if given, is asked right before a
        message's content goes out: False withdraws it (its outcome is
        `Withdrawn`, and nothing of it was sent).

        An envelope is asked for only when the mailer can send it: a mailer
        that pipelines (RFC 2920) asks for the next one while the previous
        one's final reply is outstanding.  Every envelope taken is yielded
        exactly once, unless the caller stops iterating.  Optional:
        `mailout.mailers.Mailer` gives one that calls ``send`` for each.
        """

    def close():
        """End the calling thread's connection, if any (politely: QUIT).

        Never raises.  The next ``send`` of this thread opens a new one.
        """

    def probe(timeout=None):
        """Try each destination as ``send`` would reach it, sending nothing.

        For an SMTP or LMTP mailer that is: connect, greet, STARTTLS and
        AUTH as configured, then QUIT, to every configured relay in the
        configured order (whether or not it rests after a failure; probing
        changes no rotation state).  ``timeout`` (seconds) replaces the
        configured timeout for this probe; None keeps it.

        Returns a list with one dict per destination, in configuration
        order, each with these keys (every key always present; values are
        plain str, int, float, bool or None, so the list is JSON-ready)::

            host     the relay's host name or address, or an LMTP server's
                     unix socket path (str)
            port     its port (int), None for a unix socket
            ok       True if the whole session set-up succeeded
            server   the name the server gave in its EHLO/LHLO reply, or
                     None (failed, or the server gave none)
            tls      the TLS version negotiated ('TLSv1.3'), None without
            auth     the user name authenticated as, None without AUTH
            error    why it failed (text without secrets), None if ok
            seconds  how long the probe of this destination took (float)

        An empty list means the mailer has nothing it can check without
        sending a message (the sendmail program, memory).  Never raises for
        a destination that fails: that is a result with ``ok`` False.
        """


class IMailEvent(Interface):
    """Something happened to a queued message."""

    message_id = Attribute("The Message-Id, without angle brackets.")
    fromaddr = Attribute("The envelope sender.")
    toaddrs = Attribute("The envelope recipients this event is about.")
    delivery = Attribute("The name of the queued delivery.")
    queue_id = Attribute("The message's name in the queue, as "
                         "``mailout queue show`` takes it.")


class IMailSentEvent(IMailEvent):
    """The relay accepted the message for `toaddrs`."""


class IMailDeferredEvent(IMailEvent):
    """A transient failure: the message will be tried again later."""

    reply = Attribute("The server's reply (code and text) or the error.")


class IMailFailedEvent(IMailEvent):
    """A permanent failure: the message moved to the queue's failed area."""

    reply = Attribute("The server's reply (code and text) or the error.")


# -- Exceptions ---------------------------------------------------------------

class MailoutError(Exception):
    """Base class of every error mailout raises."""


class MessageError(MailoutError, ValueError):
    """``send()`` was given something that cannot be sent; nothing was queued.
    """


class InvalidAddress(MessageError):
    """A sender or recipient address is malformed."""


class InvalidSender(InvalidAddress):
    """The envelope sender is missing or malformed."""


class InvalidRecipient(InvalidAddress):
    """A recipient address is malformed."""


class NoRecipients(MessageError):
    """The message has no envelope recipient."""


class NonASCIIAddress(InvalidAddress):
    """An address is not ASCII and the mailer does not allow SMTPUTF8."""


class InvalidHeader(MessageError):
    """The message's header block is missing or malformed."""


class InvalidMessageId(InvalidHeader):
    """The Message-Id header is not of the form ``<left@right>``."""


class LineTooLong(MessageError):
    """A line is longer than SMTP's 998 bytes (RFC 5321 section 4.5.3.1.6).
    """


class MessageTooLarge(MessageError):
    """The message exceeds the delivery's ``max-message-size``."""


class DeliveryError(MailoutError):
    """A mailer could not hand a message over.

    ``reply`` is ``(code, text)`` as the server said it, or ``(None, text)``
    for an error with no server reply (refused connection, timeout, TLS).
    """

    def __init__(self, reply):
        self.reply = reply
        code, text = reply
        super().__init__(text if code is None else f'{code} {text}')


class TransientDeliveryError(DeliveryError):
    """Try again later: 4xx reply, refused connection, timeout, TLS error."""


class PermanentDeliveryError(DeliveryError):
    """Do not try again: a 5xx reply."""


class Withdrawn(TransientDeliveryError):
    """``send_each``'s ``still_wanted`` said no before the message's
    content went out: nothing was sent."""

    def __init__(self):
        super().__init__((None, 'withdrawn before it was sent'))


#: What became of one message given to ``send_each``: the refused
#: recipients as ``send`` returns them, or the error it would raise.
Outcome = Union[Refused, DeliveryError]
