"""mailout: transactional, queued, per-process configured mail-out for Zope.

    getUtility(IMailDelivery, 'default').send(fromaddr, toaddrs, message)

or the two functions below.  See README.rst.
"""
import email.message
from collections.abc import Iterable
from typing import Optional

from zope.component import getUtility

from mailout.interfaces import DeliveryError  # noqa: F401
from mailout.interfaces import IMailDelivery
from mailout.interfaces import InvalidAddress  # noqa: F401
from mailout.interfaces import InvalidHeader  # noqa: F401
from mailout.interfaces import InvalidMessageId  # noqa: F401
from mailout.interfaces import InvalidRecipient  # noqa: F401
from mailout.interfaces import InvalidSender  # noqa: F401
from mailout.interfaces import LineTooLong  # noqa: F401
from mailout.interfaces import MailoutError  # noqa: F401
from mailout.interfaces import MessageInput
from mailout.interfaces import MessageError  # noqa: F401
from mailout.interfaces import MessageTooLarge  # noqa: F401
from mailout.interfaces import NoRecipients  # noqa: F401
from mailout.interfaces import NonASCIIAddress  # noqa: F401
from mailout.interfaces import PermanentDeliveryError  # noqa: F401
from mailout.interfaces import TransientDeliveryError  # noqa: F401
from mailout.message import recipients_from_headers
from mailout.message import sender_from_headers

__all__ = [
    'send', 'send_message',
    'MailoutError', 'MessageError', 'InvalidAddress', 'InvalidSender',
    'InvalidRecipient', 'NoRecipients', 'NonASCIIAddress', 'InvalidHeader',
    'InvalidMessageId', 'LineTooLong', 'MessageTooLarge', 'DeliveryError',
    'TransientDeliveryError', 'PermanentDeliveryError',
]


def send(fromaddr: str, toaddrs: Iterable[str], message: MessageInput,
         delivery: str = 'default') -> str:
    """Send ``message`` (str, bytes or email.message.Message) from
    ``fromaddr`` to ``toaddrs`` if the current transaction commits; return
    its Message-Id."""
    return getUtility(IMailDelivery, delivery).send(fromaddr, toaddrs,
                                                    message)


def send_message(msg: email.message.Message, fromaddr: Optional[str] = None,
                 toaddrs: Optional[Iterable[str]] = None,
                 delivery: str = 'default') -> str:
    """Send an ``email.message.Message`` if the current transaction commits.

    The envelope comes from the headers where not given: Sender or From, and
    To, Cc and Bcc.  Bcc is never transmitted.  Returns the Message-Id.
    """
    if fromaddr is None:
        fromaddr = sender_from_headers(msg)
    if toaddrs is None:
        toaddrs = recipients_from_headers(msg)
    return send(fromaddr, toaddrs, msg, delivery)
