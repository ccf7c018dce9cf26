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

New connections are spread over the relays in proportion to their weights
(smooth weighted round robin: weights 3 and 1 give A A B A ...).  A rotation
made with ``resolve`` looks up each relay's host name (again after
`RESOLVED_FOR` seconds): a name with several addresses is that many relays,
each used and resting on its own, named ``host[address]:port``, sharing the
name's weight; the name stays the one TLS checks the certificate against.

With ``max_connections``, at most that many connections are open to one
relay at a time: a connection holds one of the relay's slots in each store
(`mailout.queue.RelayStates` counts over every process working the queue,
`MemoryRelayStates` in this process).  A relay whose slots are all taken
is skipped for the next; when every relay is full, `lease` waits for a
slot, at most ``wait`` seconds.
"""
import collections
import logging
import math
import random
import socket
import threading
import time
from typing import Any
from typing import NamedTuple
from typing import Optional

from mailout.interfaces import TransientDeliveryError

log = logging.getLogger('mailout.mailers')  # the name the README documents


#: How long the addresses a relay's host name resolved to are used before
#: it is resolved again (seconds).
RESOLVED_FOR = 60.0


class Relay(NamedTuple):
    """A relay of a resolving rotation: ``host`` and ``port`` as configured
    (the name TLS checks), ``ip`` the address connected to (None: the host
    name, which did not resolve), ``several``: the name has several
    addresses, so this one is a relay of its own."""
    host: str
    port: Any
    ip: Optional[str] = None
    several: bool = False


def address(relay):
    """``host:port`` of a ``(host, port)`` relay; ``host[ip]:port`` of one
    address of a host name that has several."""
    if getattr(relay, 'several', False):
        return f'{relay.host}[{relay.ip}]:{relay.port}'
    return '%s:%s' % tuple(relay[:2])


class RelaysResting(TransientDeliveryError):
    """No relay was tried: every one rests.  The message never left, so
    the processor counts no attempt."""


class RelaysBusy(RelaysResting):
    """No relay was tried: every one that is up had all its connections
    open (``max-connections-per-relay``) for as long as a connection may
    take.  No attempt counts, as while every relay rests."""


class NoSlot:
    """The slot of a connection to a relay without a connection limit."""

    def release(self) -> None:
        pass


class Slots:
    """A connection's slots in every store; released together."""

    def __init__(self, slots):
        self.slots = slots

    def release(self) -> None:
        slots, self.slots = self.slots, []
        for slot in slots:
            slot.release()


class MemorySlot:
    """A connection slot counted in this process (`MemoryRelayStates`)."""

    def __init__(self, store, relay):
        self._store, self._counts, self._relay = store, store._open, relay

    def release(self) -> None:
        counts, self._counts = self._counts, None
        # Not a slot of the parent's, in a forked child: its counts and
        # lock are not the child's.
        if counts is not None and counts is self._store._open:
            with self._store._lock:
                counts[self._relay] -= 1

    def __del__(self):
        # A thread that ended without closing its connection.
        self.release()


class MemoryRelayStates:
    """Relay records and connection slots kept in this process only (a
    mailer no queue shares a store with: a direct delivery's, ``mailout
    check``'s)."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, Any]] = {}
        # Reentrant: a slot that a thread dropped unreleased may be freed
        # by the garbage collector while this thread holds the lock.
        self._lock = threading.RLock()
        self._open: collections.Counter[str] = collections.Counter()

    def load(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._states.items()}

    def put(self, relay: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._states[relay] = dict(record, at=time.time())

    def slot(self, relay: str, limit: int) -> Optional[MemorySlot]:
        """One of the ``limit`` connection slots of ``relay`` in this
        process, or None when they are all taken."""
        with self._lock:
            if self._open[relay] >= limit:
                return None
            self._open[relay] += 1
            return MemorySlot(self, relay)

    def after_fork(self):
        # The child has none of its parent's connections.
        self._lock = threading.RLock()
        self._open = collections.Counter()


class RelayRotation:
    """The relays of one mailer, in turn, and which of them rest.

    Threads share one rotation.  ``owner`` is named in the log lines that
    say a relay rests or is back.  ``weights`` (one a relay, default 1
    each) spread new connections in proportion; with ``resolve``, each
    address of a host name is a relay (`Relay`); ``max_connections``
    (0: no limit) and ``wait``: see the module's docstring.
    """

    def __init__(self, relays, down_time: float, owner: object,
                 weights=None, resolve: bool = False,
                 max_connections: int = 0, wait: float = 0.0) -> None:
        self.relays = tuple(relays)
        self.weights = tuple(weights or (1,) * len(self.relays))
        self.down_time = down_time
        self.owner = owner
        self.resolve = resolve
        self.max_connections = max_connections
        self.wait = wait
        self._memory = MemoryRelayStates()
        self.stores: list[Any] = [self._memory]
        self._lock = threading.Lock()
        self._current: dict[str, float] = {}    # smooth weighted round robin
        self._resolved: dict[Any, tuple[float, list[str]]] = {}

    def after_fork(self):
        """In a forked child: a lock held by another thread of the parent
        stays held for ever."""
        self._memory.after_fork()
        self._lock = threading.Lock()

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
        tried).  (With ``max_connections``, use `lease`, which says when
        the connection's slot is free again.)"""
        connection, relay, _ = self.lease(open)
        return connection, relay

    def lease(self, open, avoid=()):
        """`connect`, and a function to call when the connection is closed
        (it frees the connection's slot).  The relays in ``avoid`` are not
        tried (a message's relay that died).  Full relays are skipped; when
        only full ones are left, this waits for a slot, at most ``wait``
        seconds, then raises `RelaysBusy` (or, if some relays failed too,
        `TransientDeliveryError` naming each)."""
        errors: list[str] = []
        tried = {address(r) for r in avoid}
        deadline, pause = None, 0.002
        while True:
            full = []
            for relay in self.in_turn():
                if address(relay) in tried:
                    continue
                slot = self.slot(relay)
                if slot is None:
                    full.append(relay)
                    continue
                try:
                    connection = open(relay)
                except TransientDeliveryError as e:
                    slot.release()
                    self.mark_down(relay, str(e))
                    errors.append(f'{address(relay)}: {e}')
                    tried.add(address(relay))
                    continue
                except BaseException:
                    slot.release()
                    raise
                self.came_up(relay)
                return connection, relay, slot.release
            if not full:
                break
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.wait
            if now >= deadline:
                busy = [f'{address(r)}: max-connections-per-relay '
                        f'{self.max_connections} reached, no connection '
                        f'free within {self.wait:g}s' for r in full]
                if errors:
                    raise TransientDeliveryError((None, '; '.join(
                        errors + busy)))
                raise RelaysBusy((None, '; '.join(busy)))
            # Polled: a slot of another process frees no lock here.
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.05)
        if not errors:
            states = self.states()
            raise RelaysResting((None, '; '.join(
                f'{address(r)}: marked down after: '
                f'{states.get(address(r), {}).get("why") or "?"}'
                for r, _ in self.members())))
        raise TransientDeliveryError((None, '; '.join(errors)))

    def slot(self, relay):
        """A connection slot of ``relay`` (its `release` frees it), or None
        when all ``max_connections`` are taken, in any store."""
        if not self.max_connections:
            return NoSlot()
        taken = []
        for store in self.stores:
            try:
                slot = store.slot(address(relay), self.max_connections)
            except (OSError, ValueError) as e:  # read-only, a link?
                # Not counted there, rather than no mail sent at all.
                log.error('%r: cannot count the connections to relay %s: '
                          '%s', self.owner, address(relay), e)
                continue
            if slot is None:
                Slots(taken).release()
                return None
            taken.append(slot)
        return Slots(taken)

    def members(self) -> list[tuple[Any, float]]:
        """``(relay, weight)`` of each relay: each address of a host name
        with several when resolving, with its share of the name's weight.
        """
        if not self.resolve:
            return list(zip(self.relays, self.weights))
        members: list[tuple[Any, float]] = []
        for (host, port), weight in zip(self.relays, self.weights):
            ips = self._addresses(host, port)
            if not ips:
                members.append((Relay(host, port), weight))
            for ip in ips:
                members.append((Relay(host, port, ip, len(ips) > 1),
                                weight / len(ips)))
        return members

    def _addresses(self, host, port) -> list[str]:
        """The addresses ``host`` resolves to, looked up at most every
        `RESOLVED_FOR` seconds; none for a unix socket or a name that does
        not resolve (connecting to it says why)."""
        if port is None or host.startswith('/'):
            return []
        now = time.monotonic()
        until, ips = self._resolved.get((host, port), (0.0, []))
        if now < until:
            return ips
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            infos = []
        ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self._resolved[host, port] = (now + RESOLVED_FOR, ips)
        return ips

    def in_turn(self):
        """The relays that are up, starting with the one whose turn it is
        (by weight), then the others, most due first; all of them when
        every one is down and its rest is over."""
        states, now = self.states(), time.time()
        up = [(address(r), r, w) for r, w in self.members()
              if rest_of(states.get(address(r)), now,
                         self.down_time) is None]
        if not up:
            return []
        with self._lock:
            current = {key: (self._current[key] if key in self._current
                             else start_of_turn(weight)) + weight
                       for key, _, weight in up}
            first = max(current, key=current.__getitem__)
            current[first] -= sum(weight for _, _, weight in up)
            self._current = current
        order = sorted(range(len(up)), key=lambda i: (
            up[i][0] != first, -current[up[i][0]], i))
        return [up[i][1] for i in order]

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
        return [address(r) for r, _ in self.members()
                if states.get(address(r), {}).get('state') == 'resting']


def start_of_turn(weight: float) -> float:
    """Where a relay new to this process starts in the weighted turn: at
    random, so that processes started together do not all open their
    first connections to the first relay."""
    return random.random() * weight


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


