"""The SMTP mailer: relay rotation, session set-up and the mail transaction
put together, with one kept-open connection per thread."""
import dataclasses
import functools
import os
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import Optional

from mailout.interfaces import DeliveryError
from mailout.interfaces import Envelope
from mailout.interfaces import Outcome
from mailout.interfaces import Refused
from mailout.interfaces import TransientDeliveryError
from mailout.interfaces import Withdrawn
from mailout.mailers import session
from mailout.mailers.base import Mailer
from mailout.mailers.connection import describe
from mailout.mailers.relays import address
from mailout.mailers.relays import RelayRotation
from mailout.mailers.transaction import final_reply
from mailout.mailers.transaction import Reconnect
from mailout.mailers.transaction import Transaction


class ThreadConnection(threading.local):
    """The calling thread's session with a relay, kept open between
    messages: the connection cache.  A connection whose socket is None was
    ended (by the transaction or smtplib) and is not reused.  ``release``
    frees the connection's slot (max-connections-per-relay) once it is
    closed."""

    connection = None
    relay = None
    release = None
    sent = 0
    busy = False    # it owes the replies to a pipelined message's commands

    def reusable(self, limit):
        """The open connection, unless it has sent ``limit`` messages (then
        it is ended) or there is none."""
        if self.connection is not None and self.sent >= limit:
            self.end()
        if self.connection is not None and self.connection.sock is None:
            self.connection = None
            self._release()
        return self.connection

    def keep(self, connection, relay, release=None):
        self.end()
        self.connection, self.relay, self.sent = connection, relay, 0
        self.release = release

    def end(self):
        connection, self.connection = self.connection, None
        if connection is not None:
            session.end(connection)
        self._release()

    def drop(self):
        """Close the connection without a word (QUIT could be taken for
        a message's content)."""
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()
        self._release()

    def _release(self):
        release, self.release = self.release, None
        if release is not None:
            release()

    def set_aside(self):
        """This thread's session, put aside (the thread has none now)."""
        state = self.connection, self.relay, self.release, self.sent, \
            self.busy
        self.connection = self.relay = self.release = None
        self.sent, self.busy = 0, False
        return state

    def restore(self, state):
        """End the session of now, take back the one `set_aside` gave."""
        self.end()
        self.connection, self.relay, self.release, self.sent, self.busy = \
            state


class Lost(Exception):
    """The session with ``relay`` was lost (closed, reset, timed out) after
    it was set up, or the relay turned it away at once (421 to the first
    MAIL).  ``error`` is the message's outcome unless another relay takes
    it, ``reason`` why the relay rests; ``following`` is the next
    envelope, taken meanwhile and not sent; ``timed_out``: the relay
    stalled (it rests whatever happens next)."""

    def __init__(self, relay, reason, error, following=None,
                 timed_out=False):
        super().__init__(reason)
        self.relay, self.reason, self.error = relay, reason, error
        self.following, self.timed_out = following, timed_out


class SMTPMailer(Mailer):
    """Deliver over SMTP or SMTPS, with STARTTLS and AUTH as configured.

    With several relays, new connections go to each in turn (in
    proportion to their weights; each address of a host name with several
    is a relay of its own), at most ``max-connections-per-relay`` open to
    one at a time; a relay that fails to connect, turns the session away
    (421) or stalls past the timeout is left alone for ``down-time`` while
    the others take its share.  A message whose session was lost goes out
    through another relay at once, and the relay that lost it rests.

    ``send(..., all_or_none=True)`` (what a direct delivery asks for) sends
    nothing when any recipient is refused at RCPT.
    """

    #: Reads what the server says after the final dot (LMTP: one reply
    #: per accepted recipient).
    final_replies = staticmethod(final_reply)

    def __init__(self, settings):
        self.settings = settings
        self.name = settings.name
        self.smtputf8 = settings.smtputf8
        self.rotation = RelayRotation(
            settings.relays, settings.down_time, self,
            weights=getattr(settings, 'weights', None), resolve=True,
            max_connections=getattr(settings, 'max_connections_per_relay',
                                    0),
            wait=settings.timeout)
        if getattr(settings, 'max_connections_per_relay', 0):
            #: A processor's sender thread ends its session as soon as it
            #: is idle (not 15 s later): no idle one holds a relay's slot.
            self.keep_idle = 0
        self._local = ThreadConnection()
        os.register_at_fork(after_in_child=self._after_fork)
        # An LMTP mailer's settings have no password.
        password_file = getattr(settings, 'password_file', None)
        if password_file:
            session.warn_if_exposed(password_file)

    def _after_fork(self):
        # A forked child must not talk over its parent's connections (the
        # sockets are shared): forget them without QUIT.
        self._local = ThreadConnection()
        self.rotation.after_fork()

    def __repr__(self):
        relays = ', '.join(map(address, self.settings.relays))
        return f'<SMTPMailer {self.name!r} {relays} tls={self.settings.tls}>'

    def send(self, fromaddr: str, toaddrs: Sequence[str], message: bytes,
             all_or_none: bool = False) -> Refused:
        [(_, outcome)] = self.send_each([(fromaddr, toaddrs, message)],
                                        all_or_none)
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    def send_each(self, envelopes: Iterable[Envelope],
                  all_or_none: bool = False,
                  still_wanted: Optional[Callable[[Envelope], bool]] = None
                  ) -> Iterator[tuple[Envelope, Outcome]]:
        """`IMailoutMailer.send_each` over this thread's session.

        Where the relay offers PIPELINING (and ``pipelining`` is on), a
        message's content goes out together with the next message's MAIL,
        RCPT and DATA, so ``envelopes`` is asked for the next one before
        this one's outcome is known.  If the session is lost then, only the
        message whose final dot was sent may have gone (RFC 1047); the
        next one is sent again on a new session.
        """
        local = self._local
        if local.busy:
            # Called on a thread whose session owes the replies to a
            # pipelined message (an event subscriber of the processor
            # sending mail while the processor settles the one before):
            # a session of its own, ended when done.
            state = local.set_aside()
            try:
                yield from self.send_each(envelopes, all_or_none,
                                          still_wanted)
            finally:
                local.restore(state)
            return
        envelopes = iter(envelopes)
        try:
            envelope, begun = next(envelopes, None), None
            while envelope is not None:
                outcome, following, begun = self._deliver(
                    envelope, begun, all_or_none, envelopes, still_wanted)
                local.busy = begun is not None
                try:
                    yield envelope, outcome
                finally:
                    local.busy = False
                envelope = following if following is not None \
                    else next(envelopes, None)
        except BaseException:
            # Broken off (an error taking the next envelope, the caller
            # stopped): the session may be mid-message or owe replies.
            self._local.drop()
            raise

    def _deliver(self, envelope, begun, all_or_none, envelopes,
                 still_wanted):
        """``(outcome, following, begun)``: the outcome of sending
        ``envelope`` (``begun``: its `Transaction`, whose commands went out
        with the previous message), and the next envelope if it was taken
        from ``envelopes`` meanwhile, with its transaction if begun."""
        local = self._local
        if begun is not None and begun.connection is not local.connection:
            begun = None        # its session is gone: it is sent again
        if begun is not None or local.reusable(
                self.settings.messages_per_connection) is not None:
            try:
                return self._transact(envelope, begun, all_or_none,
                                      envelopes, still_wanted)
            except Reconnect:
                # The server closed the kept session before MAIL FROM was
                # accepted (Postfix closes an idle one, saying 421):
                # nothing was sent, a new session takes the message.
                self.close()
            except Lost as lost:
                return self._fail_over(lost, envelope, all_or_none,
                                       envelopes, still_wanted)
        try:
            local.keep(*self.rotation.lease(self._connect_to))
        except TransientDeliveryError as e:
            return e, None, None
        try:
            return self._transact(envelope, None, all_or_none, envelopes,
                                  still_wanted)
        except (Reconnect, Lost) as e:
            # A new session lost, or turned away at the first MAIL: the
            # relay is as good as dead.
            return self._fail_over(self._as_lost(e), envelope, all_or_none,
                                   envelopes, still_wanted)

    def _fail_over(self, lost, envelope, all_or_none, envelopes,
                   still_wanted):
        """`_deliver` after ``lost``: the message is sent once more, at
        once, over a new session with another relay, and the relay that
        lost it rests.  When no other relay is up, the outcome is
        ``lost.error`` and the relay rests only if it stalled, as with a
        single relay: the next message tries it again (one lost session
        is no outage, and the probes only wake messages that waited).

        Sending again at once after a session lost past the final dot is
        no worse than the later retry, which would send it again too: the
        relay may have it either way (RFC 1047), so the duplicate risk is
        the same, and the message is not held back for a backoff by a
        relay that died.  A following message whose commands went out but
        whose content did not is simply sent again (after this one, as
        ``following``)."""
        local = self._local
        self.close()
        try:
            local.keep(*self.rotation.lease(self._connect_to,
                                            avoid=[lost.relay]))
        except TransientDeliveryError:
            if lost.timed_out:
                self.rotation.mark_down(lost.relay, lost.reason)
            return lost.error, lost.following, None
        self.rotation.mark_down(lost.relay, lost.reason)
        more = envelopes if lost.following is None else iter(())
        try:
            outcome, following, begun = self._transact(
                envelope, None, all_or_none, more, still_wanted)
        except (Reconnect, Lost) as e:
            again = self._as_lost(e)
            self.close()
            if again.timed_out:
                self.rotation.mark_down(again.relay, again.reason)
            return again.error, lost.following or again.following, None
        if lost.following is not None:
            return outcome, lost.following, None
        return outcome, following, begun

    def _as_lost(self, error):
        """`Lost` for a `Lost` or for a `Reconnect` of a new session."""
        if isinstance(error, Lost):
            return error
        cause = error.__cause__
        if isinstance(cause, TransientDeliveryError):
            return Lost(self._local.relay, str(cause), cause)
        reason = describe(cause)
        return Lost(self._local.relay, reason,
                    TransientDeliveryError((None, reason)))

    def _transact(self, envelope, begun, all_or_none, envelopes,
                  still_wanted):
        local = self._local
        connection = local.connection
        local.sent += 1
        pipelining = self.settings.pipelining \
            and connection.has_extn('pipelining')
        following = follow = None
        try:
            transaction = begun or Transaction(
                connection, *envelope, all_or_none, pipelining,
                self.final_replies)
            if not transaction.begin(sent=begun is not None):
                return transaction.refused, None, None
        except DeliveryError as e:
            return e, None, None
        except (smtplib.SMTPException, OSError) as e:
            raise self._lost(e) from e
        if still_wanted is not None and not still_wanted(envelope):
            # The server waits for the content: only a dropped connection
            # ends the transaction without sending anything.
            local.drop()
            return Withdrawn(), None, None
        if pipelining and not all_or_none \
                and local.sent < self.settings.messages_per_connection:
            following = next(envelopes, None)
            follow = self._follow(connection, following)
        try:
            connection.send(transaction.content()
                            + (follow.group() if follow else b''))
            outcome = transaction.end()
        except DeliveryError as e:
            outcome = e
        except (smtplib.SMTPException, OSError) as e:
            # If the final dot went out, the relay may have the message:
            # RFC 1047's window, and the one case where a retry can send it
            # twice.  The following message was not sent: it goes again.
            raise self._lost(e, following) from e
        return outcome, following, \
            follow if connection.sock is not None else None

    def _lost(self, error, following=None):
        """The session was lost or timed out mid-transaction: end it; the
        `Lost` to raise."""
        relay = self._local.relay
        self.close()
        reason = describe(error)
        return Lost(relay, reason, TransientDeliveryError(
            (None, f'{address(relay)}: {reason}')), following,
            isinstance(error, socket.timeout))

    def _follow(self, connection, envelope):
        """The pipelined transaction of ``envelope``, to begin with the
        current message's end (None: there is none, or its addresses need
        what the relay lacks; it is then sent, and refused, on its own)."""
        if envelope is None:
            return None
        try:
            return Transaction(connection, *envelope, pipelining=True,
                               final_replies=self.final_replies)
        except DeliveryError:
            return None

    def close(self) -> None:
        if not self._local.busy:    # else: a nested sender's, ended already
            self._local.end()

    @property
    def kept_connection(self) -> Optional[smtplib.SMTP]:
        """The connection this thread keeps open to a relay between
        messages (the connection cache), or None."""
        return self._local.connection

    def probe(self, timeout: Optional[float] = None) -> list[dict[str, Any]]:
        """`IMailoutMailer.probe`: each relay, each address of a host name
        with several (its result then says which: ``address``)."""
        return self._probe([r for r, _ in self.rotation.members()], timeout)

    def probe_resting(self, timeout: Optional[float] = None
                      ) -> list[dict[str, Any]]:
        """`probe` the relays that rest only (a processor does, every few
        seconds, while messages wait for them): one that answers is back.
        """
        resting = set(self.rotation.resting())
        return self._probe([r for r, _ in self.rotation.members()
                            if address(r) in resting], timeout)

    def _probe(self, relays, timeout):
        settings = self.settings if timeout is None else \
            dataclasses.replace(self.settings, timeout=timeout)
        results = []
        for relay in relays:
            result = dict(host=relay[0], port=relay[1], ok=False,
                          server=None, tls=None, auth=None, error=None)
            if getattr(relay, 'several', False):
                result['address'] = relay.ip
            started = time.monotonic()
            slot = self.rotation.slot(relay)
            if slot is None:
                # Its connections are all open: it answers.
                result['error'] = (f'all {self.rotation.max_connections} '
                                   'connections open '
                                   '(max-connections-per-relay)')
            else:
                try:
                    self._probe_one(relay, settings, result)
                finally:
                    slot.release()
            result['seconds'] = round(time.monotonic() - started, 3)
            results.append(result)
        return results

    def _probe_one(self, relay, settings, result):
        try:
            connection = self._connect_to(relay, settings)
        except TransientDeliveryError as e:
            result['error'] = e.reply[1]
            self.rotation.still_down(relay, e.reply[1])
        else:
            result.update(ok=True, **session.negotiated(connection, settings))
            session.end(connection)
            self.rotation.came_up(relay)

    def share_relay_state(self, store) -> None:
        """Keep the relays' rests in ``store``, which the processes working
        one queue share (`RelayRotation.share`)."""
        self.rotation.share(store)

    def resting(self) -> list[str]:
        """``host:port`` of each relay that rests, or whose rest is over
        but no connection has ended it yet."""
        return self.rotation.resting()

    def connect(self, host, port, settings=None, ip=None):
        """A new session with one relay (at ``ip``, one of the host's
        addresses, if given): greeted, encrypted and authenticated as
        configured (the caller ends it).  Raises `TransientDeliveryError`
        saying what failed."""
        return session.connect(functools.partial(self._open, ip=ip), host,
                               port, settings or self.settings)

    def _connect_to(self, relay, settings=None):
        return self.connect(relay[0], relay[1], settings,
                            getattr(relay, 'ip', None))

    def _open(self, host, port, settings, ip=None):
        context = self._tls_context if settings.tls != 'none' else None
        return session.open_smtp(host, port, settings, context, ip)

    @functools.cached_property
    def _tls_context(self):
        # Built once: loading the CA store costs ~20 ms of CPU.  Threads
        # may share one context.
        return session.tls_context(self.settings)
