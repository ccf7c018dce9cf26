"""The retry decision: what one attempt means for each recipient."""
import dataclasses

import pytest

from mailout import processor
from mailout.retry import Decision
from mailout.retry import RetryPolicy
from mailout.retry import decide
from mailout.retry import summary

NOW = 1_800_000_000.0
MINUTE, DAY = 60, 24 * 3600
POLICY = RetryPolicy(min_backoff=300, max_backoff=4000, max_lifetime=5 * DAY)

ANN, BOB, CAT = 'ann@example.org', 'bob@example.org', 'cat@example.org'
BUSY = (451, '4.3.0 try again later')
FULL = (452, '4.2.2 mailbox full')
UNKNOWN = (550, '5.1.1 no such user')
REFUSED = (None, 'ConnectionRefusedError: [Errno 111] Connection refused')


def gave_up(reply, age):
    return reply[0], f'{reply[1]} (gave up after {age}s in the queue)'


# to: the message's remaining recipients; refused: what the mailer said;
# tries: attempts before this one; age: seconds since queued (None: unknown);
# then the decision, with `retry in` = until - NOW.
DECISIONS = [
    #            to               refused                   tries age
    #            sent             deferred                  failed    retry in
    pytest.param((ANN, BOB),      {},                       0, MINUTE,
                 (ANN, BOB),      {},                       {},       300,
                 id='all accepted'),
    pytest.param((ANN, BOB, CAT), {ANN: UNKNOWN, BOB: BUSY}, 0, MINUTE,
                 (CAT,),          {BOB: BUSY},              {ANN: UNKNOWN},
                 300, id='one 5xx, one 4xx, one accepted'),
    pytest.param((ANN, BOB),      {ANN: BUSY, BOB: FULL},   0, MINUTE,
                 (),              {ANN: BUSY, BOB: FULL},   {},       300,
                 id='all 4xx'),
    pytest.param((ANN, BOB),      {ANN: UNKNOWN, BOB: UNKNOWN}, 0, MINUTE,
                 (),              {},      {ANN: UNKNOWN, BOB: UNKNOWN},
                 300, id='all 5xx'),
    pytest.param((ANN,),          {ANN: REFUSED},           0, MINUTE,
                 (),              {ANN: REFUSED},           {},       300,
                 id='connection refused (no reply code)'),
    pytest.param((ANN,),          {ANN: BUSY},              9, 5 * DAY - 1,
                 (),              {ANN: BUSY},              {},       4000,
                 id='4xx a second before max lifetime'),
    pytest.param((ANN,),          {ANN: BUSY},              9, 5 * DAY,
                 (),              {},          {ANN: gave_up(BUSY, 5 * DAY)},
                 4000, id='4xx at max lifetime: gives up'),
    pytest.param((ANN, BOB),      {ANN: REFUSED},           12, 6 * DAY,
                 (BOB,),          {},        {ANN: gave_up(REFUSED, 6 * DAY)},
                 4000, id='connection refused past max lifetime: gives up'),
    pytest.param((ANN, BOB),      {ANN: UNKNOWN, BOB: BUSY}, 12, 6 * DAY,
                 (),      {},  {ANN: UNKNOWN, BOB: gave_up(BUSY, 6 * DAY)},
                 4000, id='past max lifetime: 5xx keeps its own reply'),
    pytest.param((BOB, CAT),      {BOB: BUSY},              1, 10 * MINUTE,
                 (CAT,),          {BOB: BUSY},              {},       600,
                 id='second try, ann failed on the first (not in to)'),
    pytest.param((ANN,),          {ANN: BUSY},              2, DAY,
                 (),              {ANN: BUSY},              {},       1200,
                 id='backoff doubles: third try'),
    pytest.param((ANN,),          {ANN: BUSY},              3, DAY,
                 (),              {ANN: BUSY},              {},       2400,
                 id='backoff doubles: fourth try'),
    pytest.param((ANN,),          {ANN: BUSY},              4, DAY,
                 (),              {ANN: BUSY},              {},       4000,
                 id='backoff capped: fifth try'),
    pytest.param((ANN,),          {ANN: BUSY},              40, DAY,
                 (),              {ANN: BUSY},              {},       4000,
                 id='backoff capped: 41st try'),
    pytest.param((ANN,),          {ANN: BUSY},              0, -DAY,
                 (),              {ANN: BUSY},              {},       300,
                 id='clock stepped back before queued_at: not too old'),
    pytest.param((ANN,),          {ANN: BUSY},              0, None,
                 (),              {ANN: BUSY},              {},       300,
                 id='queued_at unknown: counts as new'),
]


@pytest.mark.parametrize(
    'to, refused, tries, age, sent, deferred, failed, retry_in', DECISIONS)
def test_decide(to, refused, tries, age, sent, deferred, failed, retry_in):
    """Each row: what the mailer said and the message's age -> a decision."""
    said = dict(refused)
    queued_at = None if age is None else NOW - age
    decision = decide(to, refused, tries, queued_at, NOW, POLICY)
    assert decision == Decision(sent, deferred, failed, NOW + retry_in)
    assert refused == said          # pure: the mailer's answer is untouched


SUMMARIES = [
    pytest.param({}, None, id='none'),
    pytest.param({ANN: BUSY}, BUSY, id='one'),
    pytest.param({ANN: BUSY, BOB: BUSY}, BUSY, id='all the same'),
    pytest.param({ANN: BUSY, BOB: FULL},
                 (451, f'{ANN}: 451 4.3.0 try again later; '
                       f'{BOB}: 452 4.2.2 mailbox full'),
                 id='different: each address, first code'),
    pytest.param({ANN: REFUSED, BOB: BUSY},
                 (None, f'{ANN}: {REFUSED[1]}; '
                        f'{BOB}: 451 4.3.0 try again later'),
                 id='no code first'),
]


@pytest.mark.parametrize('deferred, reply', SUMMARIES)
def test_deferred_reply(deferred, reply):
    """One reply tells of every deferred recipient."""
    decision = Decision((), deferred, {}, NOW)
    assert decision.deferred_reply == reply
    assert decision.failed_reply is None


@pytest.mark.parametrize('failed, reply', SUMMARIES)
def test_failed_reply(failed, reply):
    """One reply tells of every failed recipient."""
    decision = Decision((), {}, failed, NOW)
    assert decision.failed_reply == reply
    assert decision.deferred_reply is None


def test_summary_keeps_the_order_of_recipients():
    """Several replies are listed in the order of the recipients."""
    assert summary({BOB: FULL, ANN: BUSY})[1].startswith(BOB)


def test_default_policy_is_postfix():
    """Without a policy: Postfix's 300 s, 4000 s and five days."""
    decision = decide((ANN,), {ANN: BUSY}, 0, NOW - 5 * DAY, NOW)
    assert decision.failed == {ANN: gave_up(BUSY, 5 * DAY)}
    assert decide((ANN,), {ANN: BUSY}, 0, NOW, NOW).until == NOW + 300
    assert decide((ANN,), {ANN: BUSY}, 9, NOW, NOW).until == NOW + 4000


def test_decision_is_frozen():
    """A decision is a value: the processor cannot change it by accident."""
    decision = decide((ANN,), {}, 0, NOW, NOW, POLICY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.until = NOW


def test_processor_reexports_the_policy():
    """``from mailout.processor import RetryPolicy`` keeps working."""
    assert processor.RetryPolicy is RetryPolicy
