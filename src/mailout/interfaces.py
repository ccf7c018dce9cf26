"""Interfaces, events and exceptions of mailout.

What mailout promises (each is proved by the test suite):

1. Commit semantics: a message handed to ``send()`` is delivered if and only
   if its transaction commits.  Abort, a failed vote of another resource
   manager, or a savepoint rollback past the ``send()`` sends nothing and
   leaves no file behind.
2. Durability: once ``transaction.commit()`` returns, a queued message is on
   disk (file and directory fsync'ed) and survives a crash.
3. Exactly-once hand-off to the relay, except for the window SMTP cannot close
   (the connection dies after the final ``.`` and before the reply, RFC 1047).
4. Bad input never enters the queue: ``send()`` raises a subclass of
   `MailoutError` naming what is wrong.
5. Security: TLS certificates are verified unless a setting says otherwise;
   secrets appear in no log, repr or exception; queue files are 0600 and queue
   directories 0700.

The delivery and mailer interfaces are zope.sendmail's, so code written for
zope.sendmail works unchanged.
"""
from zope.interface import Attribute
from zope.interface import Interface
from zope.sendmail.interfaces import IDirectMailDelivery  # noqa: F401
from zope.sendmail.interfaces import IMailDelivery  # noqa: F401
from zope.sendmail.interfaces import IMailer  # noqa: F401
from zope.sendmail.interfaces import IQueuedMailDelivery  # noqa: F401


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
