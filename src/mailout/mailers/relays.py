"""Relay rotation: which relay a new connection goes to.

Any transport with several interchangeable destinations (SMTP relays, an
LMTP server, the hosts of an HTTP API) uses it the same way: `connect`
tries the relays that are up, each in turn, with a function that opens a
connection to one; a relay that fails, or that the transport later finds
stalled (`mark_down`), rests for ``down_time`` seconds while the others take
its share.
"""
import itertools
import logging
import threading
import time

from mailout.interfaces import TransientDeliveryError

log = logging.getLogger('mailout.mailers')  # the name the README documents


def address(relay):
    """``host:port`` of a ``(host, port)`` relay."""
    return '%s:%s' % relay


class RelayRotation:
    """The relays of one mailer, in turn, and which of them rest.

    Threads share one rotation.  ``owner`` is named in the log line that
    says a relay rests.
    """

    def __init__(self, relays, down_time, owner):
        self.relays = tuple(relays)
        self.down_time = down_time
        self.owner = owner
        self._turn = itertools.count()
        self._down = {}             # relay -> (monotonic time up again, why)
        self._lock = threading.Lock()

    def after_fork(self):
        """In a forked child: a lock held by another thread of the parent
        stays held for ever."""
        self._lock = threading.Lock()

    def connect(self, open):
        """``(connection, relay)`` of ``open(relay)`` for the next relay that
        is up.  ``open`` raises `TransientDeliveryError` for a relay that
        cannot be used now: that relay rests and the next is tried.  Raises
        `TransientDeliveryError` naming every relay's failure when none
        could be opened."""
        errors = []
        for relay in self.in_turn():
            try:
                return open(relay), relay
            except TransientDeliveryError as e:
                self.mark_down(relay, str(e))
                errors.append(f'{address(relay)}: {e}')
        if not errors:
            with self._lock:
                errors = [f'{address(r)}: marked down after: {why}'
                          for r, (_, why) in self._down.items()]
        raise TransientDeliveryError((None, '; '.join(errors)))

    def in_turn(self):
        """The relays that are up, starting with the next one's turn; all of
        them when every one is down and its rest is over."""
        relays = self.relays
        start = next(self._turn) % len(relays)
        now = time.monotonic()
        with self._lock:
            return [r for r in relays[start:] + relays[:start]
                    if self._down.get(r, (0,))[0] <= now]

    def mark_down(self, relay, reason):
        """Let ``relay`` rest for down-time (if any), because of ``reason``.
        """
        if self.down_time > 0:
            log.warning('%r: relay %s marked down for %gs: %s', self.owner,
                        address(relay), self.down_time, reason)
            with self._lock:
                self._down[relay] = (time.monotonic() + self.down_time,
                                     reason)
