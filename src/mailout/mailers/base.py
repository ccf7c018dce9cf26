"""What every mailer shares."""
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import Optional

from zope.interface import implementer

from mailout.interfaces import DeliveryError
from mailout.interfaces import Envelope
from mailout.interfaces import IMailoutMailer
from mailout.interfaces import Outcome
from mailout.interfaces import Refused
from mailout.interfaces import Withdrawn


@implementer(IMailoutMailer)
class Mailer:
    """A base for mailers: zope.sendmail's IMailer asks for ``vote`` and
    ``abort``, and there is nothing to check before sending nor to undo;
    ``close`` ends the calling thread's connection, if any (here there is
    none); ``probe`` has nothing to check; there are no relays to rest
    (``share_relay_state``, ``resting``, ``probe_resting``).  A subclass gives ``name``,
    ``send`` and, where it has something to check, ``probe``."""

    name: Optional[str] = None
    smtputf8 = False

    def send(self, fromaddr: str, toaddrs: Sequence[str], message: bytes,
             all_or_none: bool = False) -> Refused:
        raise NotImplementedError

    def send_each(self, envelopes: Iterable[Envelope],
                  all_or_none: bool = False,
                  still_wanted: Optional[Callable[[Envelope], bool]] = None
                  ) -> Iterator[tuple[Envelope, Outcome]]:
        return send_each(self, envelopes, all_or_none, still_wanted)

    def vote(self, fromaddr, toaddrs, message):
        pass

    def abort(self):
        pass

    def close(self) -> None:
        pass

    def probe(self, timeout: Optional[float] = None) -> list[dict[str, Any]]:
        return []

    def share_relay_state(self, store: Any) -> None:
        """Keep the rests of this mailer's relays in ``store`` (what the
        processes working one queue share, `mailout.queue.RelayStates`);
        a mailer without relays has none to keep."""

    def resting(self) -> list[str]:
        """The relays (``host:port``) that rest: none without relays."""
        return []

    def probe_resting(self, timeout: Optional[float] = None
                      ) -> list[dict[str, Any]]:
        """`probe` the relays that rest: none without relays."""
        return []


def send_each(mailer, envelopes, all_or_none=False, still_wanted=None):
    """`IMailoutMailer.send_each` for any mailer: its ``send`` for each
    envelope in turn (zope.sendmail's mailers take no ``all_or_none`` and
    return None)."""
    for envelope in envelopes:
        outcome: Outcome
        if still_wanted is not None and not still_wanted(envelope):
            yield envelope, Withdrawn()
            continue
        args = (*envelope, True) if all_or_none else envelope
        try:
            outcome = mailer.send(*args) or {}
        except DeliveryError as e:
            outcome = e
        yield envelope, outcome
