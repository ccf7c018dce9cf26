"""What one delivery attempt means for each recipient: sent, deferred until
a later attempt, or failed for good.

`decide` is a pure function of what the mailer said and how long the
message has waited; it reads no clock and touches no queue.  The processor
records its `Decision` in the queue, then logs it and notifies events.
Which replies are permanent is said once, in `mailout.replies`.
"""
import dataclasses
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Optional

from mailout.interfaces import Refused
from mailout.interfaces import Reply
from mailout.replies import is_permanent


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When to try a deferred message again, and when to give up.

    The defaults are Postfix's (minimal_backoff_time, maximal_backoff_time,
    maximal_queue_lifetime), within RFC 5321 section 4.5.4.1.
    """
    min_backoff: float = 300
    max_backoff: float = 4000
    max_lifetime: float = 5 * 24 * 3600

    def next_attempt(self, attempts: int, now: float) -> float:
        """When to try again after ``attempts`` attempts, the last at
        ``now``: the backoff doubles from ``min_backoff`` up to
        ``max_backoff``."""
        return now + min(self.max_backoff,
                         self.min_backoff * 2 ** max(attempts - 1, 0))


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of one attempt, recipient by recipient.

    ``deferred`` and ``failed`` map an address to the ``(code, text)``
    reply that put it there.  ``until`` is when to try again; the processor
    needs it also when nothing is deferred, to release a message whose
    outcome it cannot record.
    """
    sent: tuple[str, ...]   # addresses that accepted the message
    deferred: Refused   # address -> reply: worth another attempt at `until`
    failed: Refused     # address -> reply: never to be tried again
    until: float        # seconds since the epoch
    tried: bool = True  # False: not sent anywhere (every relay rests)

    @property
    def deferred_reply(self) -> Optional[Reply]:
        """One reply that tells of every deferred recipient, or None."""
        return summary(self.deferred) if self.deferred else None

    @property
    def failed_reply(self) -> Optional[Reply]:
        """One reply that tells of every failed recipient, or None."""
        return summary(self.failed) if self.failed else None


def decide(toaddrs: Sequence[str], refused: Mapping[str, Reply],
           previous_attempts: int, queued_at: Optional[float], now: float,
           policy: RetryPolicy = RetryPolicy(), tried: bool = True
           ) -> Decision:
    """Decide what an attempt to send to ``toaddrs`` means.

    ``refused`` maps each recipient the mailer did not deliver to to its
    ``(code, text)`` reply (``code`` None for a failure with no reply);
    ``previous_attempts`` counts the attempts before this one, which ended
    at ``now``; ``queued_at`` is when the message was queued (None if
    unknown: then it counts as new).  A 5xx reply fails its recipient; any
    other defers it, unless the message has been in the queue for
    ``policy.max_lifetime``: then it fails too, its reply saying so.

    ``tried=False``: the message was not sent anywhere (every relay rests).
    That is no attempt: the backoff stays that of the attempts before
    (``min_backoff`` for a message never tried), and the processor records
    no attempt line.  The message is tried when a relay is back.
    """
    sent = tuple(a for a in toaddrs if a not in refused)
    failed = {a: r for a, r in refused.items() if is_permanent(r)}
    deferred = {a: r for a, r in refused.items() if a not in failed}
    age = now - (queued_at or now)
    if deferred and age >= policy.max_lifetime:
        failed.update((a, (r[0], f'{r[1]} (gave up after {int(age)}s in '
                              f'the queue)')) for a, r in deferred.items())
        deferred = {}
    until = policy.next_attempt(previous_attempts + tried, now)
    return Decision(sent, deferred, failed, until, tried)


def summary(refused: Mapping[str, Reply]) -> Reply:
    """One ``(code, text)`` reply for the replies of ``refused``: the reply
    if all share it, else each address with its own (the first code)."""
    replies = list(dict.fromkeys(refused.values()))
    if len(replies) == 1:
        return replies[0]
    return (replies[0][0], '; '.join(f'{a}: {c} {t}' if c else f'{a}: {t}'
                                     for a, (c, t) in refused.items()))
