"""Queue processors: the threads that deliver queued mail.

One `Processor` per queued delivery.  Threads start when the process is
ready to serve (zope.processlifetime's ``IProcessStarting``, see
configure.zcml) or, where nothing says so, lazily on the first commit that
queues mail; never at import or while ZCML loads.  A forked child forgets
its parent's threads and starts its own on first use.  Threads are daemons;
at interpreter exit each finishes the message in hand and leaves the rest on
disk.
"""
import atexit
import collections
import dataclasses
import errno
import functools
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING
from typing import Optional

import zope.event
from zope.interface import implementer

from mailout.interfaces import IMailDeferredEvent
from mailout.interfaces import IMailFailedEvent
from mailout.interfaces import IMailSentEvent
from mailout.interfaces import DeliveryError
from mailout.interfaces import IMailoutMailer
from mailout.interfaces import Withdrawn
from mailout import mailers
from mailout.mailers.relays import RelaysBusy
from mailout.mailers.relays import RelaysResting
from mailout.queue import fileformat
from mailout.message import message_id_of
from mailout.message import printable
from mailout.queue.fileformat import attempt_line
from mailout.queue.fileformat import stamp
from mailout.retry import RetryPolicy
from mailout.retry import decide

if TYPE_CHECKING:
    from mailout.queue import Queue

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _MailEvent:
    message_id: str
    fromaddr: str
    toaddrs: tuple
    delivery: str
    queue_id: str


@implementer(IMailSentEvent)
class MailSentEvent(_MailEvent):
    pass


@implementer(IMailDeferredEvent)
@dataclasses.dataclass
class MailDeferredEvent(_MailEvent):
    reply: tuple


@implementer(IMailFailedEvent)
@dataclasses.dataclass
class MailFailedEvent(_MailEvent):
    reply: tuple


#: Seconds a sender thread keeps its idle connection open, so that sparse
#: mail does not pay for a new connection each time; a mailer's
#: ``keep_idle`` says otherwise (none while connections to a relay are
#: limited: an idle one would hold a slot that others wait for).
KEEP_IDLE_CONNECTION = 15

#: While a relay rests and messages wait in deferred/, a processor probes
#: the mailer's relays this often (seconds), so that a relay that comes
#: back is used within seconds, not at the next retry minutes later.
PROBE_INTERVAL = 2.0

#: How long such a probe may take a relay (seconds): a relay that does not
#: answer within it is still down for this purpose.
PROBE_TIMEOUT = 5.0


class RateLimit:
    """At most ``rate`` messages a second over all sender threads, for
    relays that throttle; bursts of up to one second's worth."""

    def __init__(self, rate):
        self.rate = rate
        self._allowance = rate
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, stopping):
        """Wait for a message's turn; True if ``stopping`` was set first."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._allowance = min(
                    self.rate, self._allowance + (now - self._last) * self.rate)
                self._last = now
                if self._allowance >= 1:
                    self._allowance -= 1
                    return False
                pause = (1 - self._allowance) / self.rate
            if stopping.wait(pause):
                return True


class Processor:
    """Deliver the messages of one queue with one mailer, over
    ``connections`` sender threads (each keeps its own connection)."""

    def __init__(self, queue: 'Queue', mailer: IMailoutMailer, name: str = '',
                 poll_interval: float = 1.0, retry: RetryPolicy = RetryPolicy(),
                 connections: int = 1, rate: Optional[float] = None,
                 hold: bool = False):
        self.queue = queue
        self.mailer = mailer
        self.name = name
        self.poll_interval = poll_interval
        self.retry = retry
        self.connections = connections
        self.rate = RateLimit(rate) if rate else None
        self.hold = hold        # move mail to held/, never send it
        self._threads: list[threading.Thread] = []
        self._pid: Optional[int] = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # Listed in new/, not yet tried:
        self._names: collections.deque[str] = collections.deque()
        self._names_lock = threading.Lock()
        self._last_maintenance = None       # time.monotonic()
        # The relays' rests are kept in the queue directory, where every
        # process working the queue sees them (a mailer without relays has
        # none to keep).
        share = getattr(mailer, 'share_relay_state', None)
        if share is not None:
            share(queue.relay_states)
        self._last_probe = -PROBE_INTERVAL  # time.monotonic()
        self._probing: Optional[threading.Thread] = None
        self._seen_back = 0.0   # the newest relay-back acted upon
        self._renewing: Optional[threading.Thread] = None

    def __repr__(self):
        return f'<Processor {self.name!r} {self.queue.path}>'

    @property
    def running(self):
        return self._pid == os.getpid() \
            and any(t.is_alive() for t in self._threads)

    def start(self) -> None:
        """Start the threads unless they run in this process already."""
        with self._lock:
            if self.running:
                return
            self._stopping = threading.Event()
            self._pid = os.getpid()
            self._threads = [
                threading.Thread(target=self._run, args=(self._stopping,),
                                 daemon=True,
                                 name=f'mailout {self.name} sender {i}')
                for i in range(self.connections)]
            for thread in self._threads:
                thread.start()
            self._renewing = self._renew_while(self._stopping)
            _started.add(self)
            log.info('started %r with %d connection(s)', self,
                     self.connections)
            if self.hold:
                log.warning('%r: hold on: mail is queued and held, never '
                            'sent', self)

    def stop(self, timeout: float = 10) -> None:
        """Finish the messages in hand, then stop; the rest stays queued."""
        with self._lock:
            threads, self._threads = self._threads, []
        if not threads or self._pid != os.getpid():
            return
        self._stopping.set()
        self.queue.wake()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        log.info('stopped %r', self)      # the renewal thread ends too

    def _forget_after_fork(self):
        # The threads did not come along into the child; a lock may have
        # been held by one of them.
        self._lock = threading.Lock()
        self._names_lock = threading.Lock()
        self._names = collections.deque()
        self._threads = []
        self._probing = None
        self._renewing = None
        if self.rate is not None:
            self.rate = RateLimit(self.rate.rate)

    def _run(self, stopping):
        # ``stopping`` is this generation's: a thread that outlives stop()'s
        # join does not carry on with the next start()'s threads.
        idle_since = time.monotonic()
        keep_idle = getattr(self.mailer, 'keep_idle', KEEP_IDLE_CONNECTION)
        while not stopping.is_set():
            arrivals = self.queue.arrivals
            try:
                if self.process_waiting(stopping):
                    idle_since = time.monotonic()
            except Exception:
                log.exception('%r: unexpected error; continuing', self)
            self.queue.wait(self.poll_interval, arrivals)
            if time.monotonic() - idle_since >= keep_idle:
                self.mailer.close()         # idle: let the relay go
        self.mailer.close()

    def _renew_while(self, running):
        """Start a thread that renews this process's claims every quarter of
        the queue's claim lease until ``running`` is set, so that no other
        host takes over a message whose send takes long; return it."""
        def renew():
            while not running.wait(self.queue.claim_lease / 4):
                try:
                    self.queue.renew_claims()
                except Exception:
                    log.exception('%r: renewing the claims failed', self)
        thread = threading.Thread(target=renew, daemon=True,
                                  name=f'mailout {self.name} renewal')
        thread.start()
        return thread

    def _maintain(self):
        """Recover dead claims and promote due deferred messages, at most
        once a poll interval for all threads, also while new mail keeps
        them busy.  The interval is measured on the monotonic clock: the
        wall clock may step back."""
        now = time.monotonic()
        with self._names_lock:
            if self._last_maintenance is not None \
                    and now - self._last_maintenance < self.poll_interval:
                return
            self._last_maintenance = now
        self._recover()

    def _recover(self):
        self.queue.recover()
        self.queue.promote_due(horizon=self.retry.max_backoff)
        self._watch_relays()

    def _watch_relays(self):
        """When a relay came back (a connection after its rest, in any
        process working this queue, or `mailout queue retry`), promote the
        messages deferred for want of a connection: they never reached a
        server, so trying them now costs nothing.  While a relay rests and
        messages are deferred, probe the resting relays every
        `PROBE_INTERVAL` (in a thread of its own): the probe's success is
        such a connection."""
        if self._promote_if_back():
            return
        probe = getattr(self.mailer, 'probe_resting', None)
        resting = getattr(self.mailer, 'resting', None)
        now = time.monotonic()
        with self._names_lock:
            if probe is None or resting is None \
                    or now - self._last_probe < PROBE_INTERVAL \
                    or self._probing is not None \
                    and self._probing.is_alive():
                return
            self._last_probe = now
            if not resting() or not self.queue.count('deferred'):
                return
            # In a thread of its own: a relay that does not answer holds
            # the probe for its timeout, and no sender thread should wait.
            self._probing = threading.Thread(
                target=self._probe, args=(probe,), daemon=True,
                name=f'mailout {self.name} probe')
            self._probing.start()

    def _probe(self, probe):
        try:
            probe(PROBE_TIMEOUT)
        except Exception:
            log.exception('%r: probing the relays failed', self)
            return
        self._promote_if_back()

    def _promote_if_back(self):
        back = [(record['since'], relay) for relay, record
                in self.queue.relay_states.load().items()
                if record['state'] == 'up' and record.get('back')
                and record['since'] > self._seen_back]
        if not back:
            return False
        with self._names_lock:
            newest = max(back)[0]
            if newest <= self._seen_back:
                return False
            self._seen_back = newest
        moved = self.queue.promote_deferred(self._waits_for_a_relay)
        if moved:
            log.info('%r: relay %s back: %d message(s) deferred for want of '
                     'a connection are sent now', self,
                     ', '.join(sorted(relay for _, relay in back)), moved)
        return True

    def _next_name(self):
        # One listing of new/ serves every sender thread until it is used
        # up; a name another process took meanwhile fails its claim.
        with self._names_lock:
            if not self._names:
                self._names.extend(self.queue.waiting())
            return self._names.popleft() if self._names else None

    def process_waiting(self,
                        stopping: Optional[threading.Event] = None) -> int:
        """Deliver until ``new/`` is empty or ``stopping`` is set; return
        how many were handled."""
        stopping = stopping or threading.Event()

        def names():
            while not stopping.is_set():
                self._maintain()
                name = self._next_name()
                if name is None or self.rate is not None \
                        and self.rate.wait(stopping):
                    return
                yield name
        return self._deliver_names(names())

    def run_once(self) -> int:
        """Recover, promote due messages and deliver what is waiting now
        over ``connections`` threads, then return how many were handled;
        for scripts, cron and tests.  Messages deferred meanwhile wait for
        a later run, so it always ends."""
        self._recover()
        probing = self._probing
        if probing is not None:     # a relay that answers is used now
            probing.join()
        waiting = collections.deque(self.queue.waiting())
        handled: collections.Counter[int] = collections.Counter()

        def names():
            while not (self.rate is not None
                       and self.rate.wait(threading.Event())):
                try:
                    yield waiting.popleft()
                except IndexError:
                    return

        def work():
            try:
                handled[threading.get_ident()] += self._deliver_names(names())
            finally:
                self.mailer.close()
        workers = [threading.Thread(target=work, name=f'mailout {self.name} '
                                    f'once {i}') for i in
                   range(max(min(self.connections, len(waiting)), 1))]
        done = threading.Event()
        renewing = self._renew_while(done)
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        finally:
            done.set()
            renewing.join()
        return sum(handled.values())

    def _waits_for_a_relay(self, message):
        """Whether the deferred ``message`` waits for nothing but a relay:
        its last attempt reached no server (no reply code: refused, timed
        out, TLS failed), or it was not tried (every relay rested) either
        ever or since its retry time came."""
        if not message.attempts:
            return True
        last = message.attempts[-1]
        if not fileformat.answered(last):
            return True
        at = fileformat.attempted_at(last)
        backoff = self.retry.next_attempt(len(message.attempts), 0)
        return at is not None and at + backoff <= time.time()

    def _deliver_names(self, names):
        """Deliver the waiting messages ``names`` gives (or, with ``hold``,
        hold them); how many were this thread's to handle."""
        handled = 0

        def claimed():
            nonlocal handled
            for name in names:
                if self.hold:
                    held = self.queue.hold(name)
                    if held:
                        log.info('%r: held %s (hold on)', self,
                                 printable(name))
                    handled += held
                    continue
                claimed = self.queue.claim(name)
                if claimed is not None:
                    handled += 1
                    yield claimed
        self._deliver(claimed())
        return handled

    def deliver(self, claimed: str) -> None:
        """Send one claimed message and move it where its outcome says."""
        self._deliver([claimed])

    def _deliver(self, claimed):
        """Send the ``claimed`` messages, each read when the mailer is
        ready to send it, and settle each as soon as its own outcome is
        known."""
        taken = {}      # id(envelope): (claimed, message, Message-Id)

        def envelopes(claimed):
            for name in claimed:
                message = self._read(name)
                if message is not None:
                    envelope = (message.fromaddr, message.toaddrs,
                                message.message)
                    taken[id(envelope)] = (name, message,
                                           message_id_of(message.message))
                    yield envelope
        def still_wanted(envelope):
            # Asked right before the content goes out: another host may
            # have taken the claim over (this process was frozen, or its
            # renewals late, past the claim lease).
            return self.queue.holds(taken[id(envelope)][0])
        send_each = getattr(self.mailer, 'send_each', None) \
            or functools.partial(mailers.send_each, self.mailer)
        # A rate limit waits before each message: none may wait meanwhile
        # with its final reply outstanding.
        batches = ([name] for name in claimed) if self.rate else [claimed]
        for batch in batches:
            try:
                for envelope, outcome in send_each(
                        envelopes(batch), still_wanted=still_wanted):
                    if isinstance(outcome, Withdrawn):
                        self._withdrawn(*taken.pop(id(envelope)))
                    else:
                        self._settle(*taken.pop(id(envelope)), outcome)
            except Exception as e:
                log.exception('%r: the mailer failed', self)
                # As far as we know, these went to no one.
                for name, message, message_id in taken.values():
                    self._settle(name, message, message_id,
                                 (None, f'{type(e).__name__}: {e}'))
                taken.clear()

    def _withdrawn(self, claimed, message, message_id):
        """The claim was taken over before the message went out: it is the
        other host's now; nothing was sent, nothing is recorded."""
        self.queue.forget(claimed)
        log.warning('%r: %s was taken over by another host before it was '
                    'sent (this process was late renewing its claim): not '
                    'sent here', self, _message_ids(message_id, message.name))

    def _read(self, claimed):
        """The claimed message, ready to send; None when it is not (taken
        from us, unreadable: moved to failed/, or settled already)."""
        try:
            message = self.queue.read(claimed)
        except FileNotFoundError:       # taken from us meanwhile
            self.queue.forget(claimed)
            return None
        except OSError as e:
            if e.errno in _UNREADABLE:
                self._quarantine(claimed, e)
            else:                       # EMFILE, EIO, ...: may pass
                log.error('%r: cannot read %s now (%s): trying again later',
                          self, printable(claimed), printable(str(e)))
                self.queue.release(claimed, (), time.time()
                                   + self.retry.min_backoff)
            return None
        except ValueError as e:         # QueueError, UnicodeDecodeError
            self._quarantine(claimed, e)
            return None
        if not message.toaddrs:         # settled, but could not be removed
            log.info('%r: %s was delivered to every recipient already: '
                     'removing it', self,
                     _message_ids(message_id_of(message.message),
                                  message.name))
            try:
                self.queue.done(claimed)
            except FileNotFoundError:   # taken from us meanwhile
                self.queue.forget(claimed)
            return None
        return message

    def _quarantine(self, claimed, error):
        log.error('%r: unreadable queue file %s: %s', self,
                  printable(claimed), printable(str(error)))
        try:
            self.queue.quarantine(claimed, _attempt((None, str(error))))
        except OSError as e:
            log.error('%r: cannot move %s to failed/ (%s): left for a later '
                      'attempt', self, printable(claimed), printable(str(e)))
            self.queue.release(claimed, (), time.time()
                               + self.retry.min_backoff)

    def _settle(self, claimed, message, message_id, outcome):
        """Record ``outcome`` (the refused recipients, a `DeliveryError`
        or an error's reply) in the queue, then log and notify it: neither
        a crash nor a failing subscriber past that point can make the
        message go twice."""
        tried = not isinstance(outcome, RelaysResting)  # no attempt
        busy = isinstance(outcome, RelaysBusy)
        if isinstance(outcome, DeliveryError):  # for every recipient alike
            outcome = outcome.reply
        refused = outcome if isinstance(outcome, dict) \
            else dict.fromkeys(message.toaddrs, outcome)
        now = time.time()
        decision = decide(message.toaddrs, refused, len(message.attempts),
                          message.queued_at, now, self.retry, tried)
        if busy and decision.deferred:
            # Every relay's connections were taken: one frees soon, and
            # no "relay back" would say so.
            decision = dataclasses.replace(decision,
                                           until=now + self.poll_interval)
        decision = self._record(claimed, message, message_id, decision)
        self._announce(message, message_id, decision)

    def _record(self, claimed, message, message_id, decision):
        """Apply ``decision`` to the queue; return what is on disk."""
        failed, deferred = decision.failed, decision.deferred
        recorded = ()                   # recipients whose outcome is on disk
        try:
            if failed:
                self.queue.fail(claimed, tuple(failed),
                                _attempt(decision.failed_reply),
                                keep_claim=bool(deferred))
                recorded = tuple(failed)
            if deferred and not decision.tried:
                self.queue.postpone(claimed, decision.until)
            elif deferred:
                self.queue.defer(claimed, tuple(deferred),
                                 _attempt(decision.deferred_reply),
                                 decision.until)
            elif not failed:
                self.queue.done(claimed)
        except FileNotFoundError as e:
            if self.queue.holds(claimed):   # an area is missing
                return self._release(claimed, message, message_id, decision,
                                     recorded, e)
            self._taken_over(message, message_id, decision)
            return dataclasses.replace(
                decision, deferred={},
                failed={a: failed[a] for a in recorded})
        except OSError as e:
            return self._release(claimed, message, message_id, decision,
                                 recorded, e)
        return decision

    def _release(self, claimed, message, message_id, decision, recorded,
                 error):
        """No space, an area removed or read-only: release the message for
        a later attempt, never again to those who have it."""
        log.error('%r: cannot record the outcome of %s (%s): released for '
                  'another attempt after %s', self,
                  _message_ids(message_id, message.name),
                  printable(str(error)), stamp(decision.until))
        self.queue.release(claimed, decision.sent + recorded, decision.until)
        return dataclasses.replace(
            decision, deferred={},
            failed={a: decision.failed[a] for a in recorded})

    def _taken_over(self, message, message_id, decision):
        """The claim vanished while the message was being sent (this process
        was frozen or its renewals late past the claim lease): another host
        took the message over and sends it itself."""
        shown = _message_ids(message_id, message.name)
        if decision.sent:
            log.warning('%r: %s was sent to %s, but meanwhile its claim was '
                        'taken over by another host, which sends it too: it '
                        'may arrive twice', self, shown,
                        _listed(decision.sent))
        else:
            log.warning('%r: %s was not delivered here (%s), and meanwhile '
                        'its claim was taken over by another host, which '
                        'sends it: nothing recorded here', self, shown,
                        _reply_text(decision.deferred_reply
                                    or decision.failed_reply))

    def _announce(self, message, message_id, decision):
        """Log ``decision`` and notify its events."""
        about = message_id, message.fromaddr
        where = self.name, message.name
        # Each line names the message as mail logs do (its Message-Id) and
        # as the mailout command does (its queue id); a queue file may come
        # from anywhere, so what a log line shows is escaped.
        shown = _message_ids(message_id, message.name)
        if decision.sent:
            log.info('%r: sent %s to %s', self, shown, _listed(decision.sent))
            self._notify(MailSentEvent(*about, decision.sent, *where))
        if decision.failed:
            reply = decision.failed_reply
            log.error('%r: %s failed for %s: %s', self, shown,
                      _listed(decision.failed), _reply_text(reply))
            self._notify(MailFailedEvent(*about, tuple(decision.failed),
                                         *where, reply))
        if decision.deferred:
            reply = decision.deferred_reply
            log.warning('%r: %s deferred for %s until %s%s: %s', self,
                        shown, _listed(decision.deferred),
                        stamp(decision.until),
                        '' if decision.tried else
                        ' or a relay is back, not tried (no attempt counted)',
                        _reply_text(reply))
            self._notify(MailDeferredEvent(*about, tuple(decision.deferred),
                                           *where, reply))

    def _notify(self, event):
        try:
            zope.event.notify(event)
        except Exception:
            log.exception('%r: a subscriber to %s failed', self,
                          type(event).__name__)


#: Errors reading a queue file that say it will never be readable.
_UNREADABLE = {errno.EACCES, errno.EPERM, errno.ELOOP, errno.EISDIR,
               errno.ENXIO, errno.EINVAL}


def _message_ids(message_id, queue_id):
    """``<MESSAGE-ID> (queue id QUEUE-ID)``, escaped, for a log line."""
    return printable(f'<{message_id or "?"}> (queue id {queue_id})')


def _reply_text(reply):
    """A reply for a log line, with its code (unless it is a summary that
    gives each recipient's code)."""
    code, text = reply
    shown = code and f' {code} ' not in f' {text} '
    return printable(f'{code} {text}' if shown else text)


def _listed(addresses):
    return printable(', '.join(addresses))


def _attempt(reply):
    return attempt_line(reply, time.time())


# -- the processors of this process --------------------------------------------

_registered: list[Processor] = []  # by ZCML, for start_all
_started: 'weakref.WeakSet[Processor]' = weakref.WeakSet()  # for stop_all


def register(processor: Processor) -> None:
    """Remember ``processor`` for `start_all` (a ZCML action calls this)."""
    if processor not in _registered:
        _registered.append(processor)


def registered() -> list[Processor]:
    """The processors remembered for `start_all`, in order."""
    return list(_registered)


def forget_registered() -> None:
    """Forget every processor remembered for `start_all` (for tests that
    load ZCML again in one process)."""
    _registered.clear()


def start_all(event: object = None) -> None:
    """Start every registered processor; the ``IProcessStarting`` handler."""
    for processor in _registered:
        processor.start()


def stop_all(timeout: float = 10) -> None:
    """Stop every processor started in this process (at interpreter exit)."""
    for processor in list(_started):
        processor.stop(timeout)


def _after_fork_in_child():
    for processor in list(_started):
        processor._forget_after_fork()
    _started.clear()


atexit.register(stop_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
