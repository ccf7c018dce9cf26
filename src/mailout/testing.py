"""Test doubles for applications that send mail through mailout.

`Outbox.install()` replaces every registered ``IMailDelivery`` utility with
a `MemoryDelivery` of the same name.  A memory delivery joins transactions
like the real ones: a committed transaction records its messages in the
outbox, an aborted one records nothing, and validation at ``send()`` is the
real one.

pytest: add ``pytest_plugins = ['mailout.testing']`` to your conftest.py and
use the ``mail_outbox`` fixture.  zope.testrunner: use `MailoutLayer` (or
base your layer on it) and read ``MailoutLayer.outbox``.
"""
import dataclasses
import email
import email.policy

from zope.component import getGlobalSiteManager
from zope.interface import implementer

from mailout.delivery import _Delivery
from mailout.interfaces import IMailDelivery
from mailout.mailers import Mailer

try:
    import pytest
except ImportError:     # pragma: no cover - pytest is optional
    pytest = None       # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class SentMessage:
    """One message that would have been sent."""
    delivery: str
    fromaddr: str
    toaddrs: tuple
    message: bytes
    message_id: str

    @property
    def email(self):
        """The message parsed as an ``email.message.EmailMessage``."""
        return email.message_from_bytes(self.message,
                                        policy=email.policy.default)


class MemoryMailer(Mailer):
    """An IMailer that keeps what it is given in ``sent``."""

    def __init__(self, smtputf8=False, name='memory'):
        self.sent = []
        self.smtputf8 = smtputf8
        self.name = name

    def send(self, fromaddr, toaddrs, message, all_or_none=False):
        self.sent.append((fromaddr, tuple(toaddrs), message))
        return {}


@implementer(IMailDelivery)
class MemoryDelivery(_Delivery):
    """A delivery that records committed messages in an `Outbox`."""

    def __init__(self, name, outbox, mailer=None, **kw):
        super().__init__(name, mailer or MemoryMailer(), **kw)
        self.outbox = outbox

    def _vote(self, envelopes):
        return list(envelopes)

    def _finish(self, envelopes):
        self.outbox.messages.extend(
            SentMessage(self.name, e.fromaddr, e.toaddrs, e.message,
                        e.message_id) for e in envelopes)


class Outbox:
    """What committed transactions would have sent, in order."""

    def __init__(self):
        self.messages = []
        self._replaced = []

    def __len__(self):
        return len(self.messages)

    def __iter__(self):
        return iter(self.messages)

    def clear(self):
        del self.messages[:]

    def install(self, names=('default',)):
        """Replace the registered deliveries (and register ``names`` where
        none is) with memory deliveries."""
        registry = getGlobalSiteManager()
        registered = dict(registry.getUtilitiesFor(IMailDelivery))
        for name in names:
            registered.setdefault(name, None)
        for name, original in registered.items():
            self._replaced.append((name, original))
            registry.registerUtility(self._stand_in(name, original),
                                     IMailDelivery, name)
        return self

    def _stand_in(self, name, original):
        # Validates as the original would: same size limit, same SMTPUTF8
        # setting, same transaction manager.
        mailer = MemoryMailer(getattr(getattr(original, 'mailer', None),
                                      'smtputf8', False))
        return MemoryDelivery(
            name, self, mailer,
            max_message_size=getattr(original, 'max_message_size', None),
            transaction_manager=getattr(original, 'transaction_manager',
                                        None))

    def uninstall(self):
        """Put the original utilities back."""
        registry = getGlobalSiteManager()
        for name, original in reversed(self._replaced):
            if original is None:
                registry.unregisterUtility(provided=IMailDelivery, name=name)
            else:
                registry.registerUtility(original, IMailDelivery, name)
        del self._replaced[:]


class MailoutLayer:
    """A zope.testrunner layer: memory deliveries for every test, emptied
    between tests."""

    outbox = None

    @classmethod
    def setUp(cls):
        cls.outbox = Outbox().install()

    @classmethod
    def tearDown(cls):
        cls.outbox.uninstall()
        cls.outbox = None

    @classmethod
    def testSetUp(cls):
        cls.outbox.clear()

    @classmethod
    def testTearDown(cls):
        import transaction
        transaction.abort()


if pytest is not None:
    @pytest.fixture
    def mail_outbox():
        """An `Outbox`: every IMailDelivery utility, and 'default', records
        committed messages instead of sending them."""
        outbox = Outbox().install()
        try:
            yield outbox
        finally:
            outbox.uninstall()
