"""Relay rotation: which relay a new connection goes to.

Any transport with several interchangeable destinations (SMTP relays, an
LMTP server, the hosts of an HTTP API) uses it the same way: `connect`
tries the relays that are up, each in turn, with a function that opens a
connection to one; a relay that fails, or that the transport later finds
stalled (`mark_down`), rests for ``down_time`` seconds while the others take
its share.  The first successful connection to a relay after a rest
(`came_up`: a message's or a probe's) ends it and logs "relay back".

Rests are kept in a store of relay records: in memory (`MemoryRelayStates`)
until the processor of a queue shares the queue's store
(`mailout.queue.RelayStates`) with the mailer, so that every process
working that queue sees the same rests, and the queue's processors see a
relay come back.  A store has ``load()`` (``{relay: record}``) and
``put(relay, record)``; a record says ``state`` ("up" or "resting"),
``since``, ``until`` (resting), ``why`` and ``at`` (when written), ``back``
(up after a rest).  Times are the wall clock's: processes share them.
"""
import itertools
import logging
import math
import threading
import time
from typing import Any
from typing import Optional

from mailout.interfaces import TransientDeliveryError

log = logging.getLogger('mailout.mailers')  # the name the README documents


def address(relay):
    """``host:port`` of a ``(host, port)`` relay."""
    return '%s:%s' % relay


class RelaysResting(TransientDeliveryError):
    """No relay was tried: every one rests.  The message never left, so
    the processor counts no attempt."""


class MemoryRelayStates:
    """Relay records kept in this process only (a mailer no queue shares
    a store with: a direct delivery's, ``mailout check``'s)."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._states.items()}

    def put(self, relay: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._states[relay] = dict(record, at=time.time())

    def after_fork(self):
        self._lock = threading.Lock()


class RelayRotation:
    """The relays of one mailer, in turn, and which of them rest.

    Threads share one rotation.  ``owner`` is named in the log lines that
    say a relay rests or is back.
    """

    def __init__(self, relays, down_time: float, owner: object) -> None:
        self.relays = tuple(relays)
        self.down_time = down_time
        self.owner = owner
        self._turn = itertools.count()
        self._memory = MemoryRelayStates()
        self.stores: list[Any] = [self._memory]

    def after_fork(self):
        """In a forked child: a lock held by another thread of the parent
        stays held for ever."""
        self._memory.after_fork()

    def share(self, store) -> None:
        """Keep rests in ``store`` (a queue's `RelayStates`) from now on,
        with any other store shared before (a mailer serving several
        queues), instead of in memory."""
        if self.stores == [self._memory]:
            self.stores = []
        if store not in self.stores:
            self.stores.append(store)

    def states(self) -> dict[str, dict[str, Any]]:
        """``{host:port: record}``: the newest record of each relay that
        has one (a relay without one is up)."""
        return merged(*(store.load() for store in self.stores))

    def _put(self, relay, record):
        for store in self.stores:
            try:
                store.put(address(relay), record)
            except OSError as e:    # no space, a read-only queue
                log.error('%r: cannot record that relay %s is %s: %s',
                          self.owner, address(relay), record['state'], e)

    def connect(self, open):
        """``(connection, relay)`` of ``open(relay)`` for the next relay that
        is up.  ``open`` raises `TransientDeliveryError` for a relay that
        cannot be used now: that relay rests and the next is tried.  Raises
        `TransientDeliveryError` naming every relay's failure when none
        could be opened, `RelaysResting` when every relay rests (none was
        tried)."""
        errors = []
        for relay in self.in_turn():
            try:
                connection = open(relay)
            except TransientDeliveryError as e:
                self.mark_down(relay, str(e))
                errors.append(f'{address(relay)}: {e}')
            else:
                self.came_up(relay)
                return connection, relay
        if not errors:
            states = self.states()
            raise RelaysResting((None, '; '.join(
                f'{address(r)}: marked down after: '
                f'{states.get(address(r), {}).get("why") or "?"}'
                for r in self.relays)))
        raise TransientDeliveryError((None, '; '.join(errors)))

    def in_turn(self):
        """The relays that are up, starting with the next one's turn; all of
        them when every one is down and its rest is over."""
        relays = self.relays
        start = next(self._turn) % len(relays)
        states, now = self.states(), time.time()
        return [r for r in relays[start:] + relays[:start]
                if rest_of(states.get(address(r)), now,
                           self.down_time) is None]

    def mark_down(self, relay, reason):
        """Let ``relay`` rest for down-time (if any), because of ``reason``.
        """
        if self.down_time > 0:
            log.warning('%r: relay %s marked down for %gs: %s', self.owner,
                        address(relay), self.down_time, reason)
            self._rest(relay, reason, self.states().get(address(relay)))

    def _rest(self, relay, reason, previous=None):
        now = time.time()
        since = previous['since'] if previous \
            and previous['state'] == 'resting' else now
        self._put(relay, {'state': 'resting', 'since': since,
                          'until': now + self.down_time, 'why': reason})

    def came_up(self, relay) -> None:
        """A connection to ``relay`` succeeded: if it rested (or its rest
        was over but no connection had said so), it is back -- logged once,
        and recorded so that the processors working the queue promote what
        waited for it."""
        record = self.states().get(address(relay))
        if record is None or record['state'] != 'resting':
            return
        now = time.time()
        log.warning('%r: relay %s back after %s down (it rested after: %s)',
                    self.owner, address(relay), _took(now - record['since']),
                    record['why'])
        self._put(relay, {'state': 'up', 'since': now, 'back': True,
                          'why': 'connected'})

    def still_down(self, relay, reason: str) -> None:
        """A probe of ``relay`` failed: if its rest is over, it rests
        again, quietly (the rest began with a warning)."""
        record = self.states().get(address(relay))
        if record is not None and record['state'] == 'resting' \
                and self.down_time > 0 \
                and rest_of(record, time.time(), self.down_time) is None:
            log.debug('%r: relay %s still down: %s', self.owner,
                      address(relay), reason)
            self._rest(relay, reason, record)

    def resting(self) -> list[str]:
        """``host:port`` of each relay of this rotation that rests (or whose
        rest is over but no connection has ended it yet)."""
        states = self.states()
        return [address(r) for r in self.relays
                if states.get(address(r), {}).get('state') == 'resting']


def rest_of(record: Optional[dict[str, Any]], now: float,
            longest: float = math.inf) -> Optional[float]:
    """When the rest in ``record`` ends, if it has not ended by ``now``;
    None for a relay that is up or whose rest is over.  A rest ending more
    than ``longest`` seconds ahead (the clock stepped back) is over."""
    if record is None or record['state'] != 'resting':
        return None
    until = record['until']
    return until if now < until <= now + longest else None


def merged(*stores: dict[str, dict[str, Any]]
           ) -> dict[str, dict[str, Any]]:
    """The newest record of each relay (by ``at``) over several stores' (a
    mailer that serves several queues shares each of their stores)."""
    result: dict[str, dict[str, Any]] = {}
    for states in stores:
        for relay, record in states.items():
            if relay not in result or record['at'] > result[relay]['at']:
                result[relay] = record
    return result


def _took(seconds: float) -> str:
    return f'{seconds:.0f}s' if seconds < 120 else f'{seconds / 60:.0f}m'


