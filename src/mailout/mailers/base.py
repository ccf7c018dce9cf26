"""What every mailer shares."""
from zope.interface import implementer

from mailout.interfaces import IMailoutMailer


@implementer(IMailoutMailer)
class Mailer:
    """A base for mailers: zope.sendmail's IMailer asks for ``vote`` and
    ``abort``, and there is nothing to check before sending nor to undo;
    ``close`` ends the calling thread's connection, if any (here there is
    none); ``probe`` has nothing to check.  A subclass gives ``name``,
    ``send`` and, where it has something to check, ``probe``."""

    name = None
    smtputf8 = False

    def send(self, fromaddr, toaddrs, message, all_or_none=False):
        raise NotImplementedError

    def vote(self, fromaddr, toaddrs, message):
        pass

    def abort(self):
        pass

    def close(self):
        pass

    def probe(self, timeout=None):
        return []
