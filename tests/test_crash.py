"""Crash safety (DESIGN.md section 3, items 1-3), proved by kill -9 of
children with 1 or 8 sender threads, pipelining (RFC 2920) or not, against
a relay that offers PIPELINING and is slow at DATA.

tests/crashloop.py does the work; set MAILOUT_CRASH_ITERATIONS for a longer
run (and MAILOUT_CRASH_SEED to replay a seed's choices; timing still
varies), or run ``python tests/crashloop.py --iterations 1000``.
"""
import os

import pytest

import crashloop

pytestmark = pytest.mark.slow
ITERATIONS = int(os.environ.get('MAILOUT_CRASH_ITERATIONS', '400'))


def test_kill_9_at_random_moments(tmp_path):
    """kill -9 anywhere, 8 sender threads pipelining or not, against a relay
    slow at DATA: no loss, no uncommitted mail, duplicates only of messages
    whose end-of-data reply was outstanding at a kill (one such claim a
    thread; with pipelining a thread holds two claims, the next message's
    commands sent with this one's content, and those never arrive twice).
    """
    seed = os.environ.get('MAILOUT_CRASH_SEED')
    summary = crashloop.run(ITERATIONS, seed=int(seed) if seed else None,
                            directory=str(tmp_path))
    print()
    print(summary.text())
    assert summary.iterations == ITERATIONS
    assert summary.committed > ITERATIONS       # the children did work
    assert summary.most_claims_at_a_kill > 2    # more than 2 threads busy
    assert summary.failures == [], summary.text()
    assert summary.duplicates_other == 0 and summary.stuck == 0
    pipelining = summary.modes[crashloop.PIPELINING]
    plain = summary.modes[crashloop.NO_PIPELINING]
    # Both modes were killed with messages in either kind of claim.
    for counts in (pipelining, plain):
        assert counts.reply_outstanding and counts.commands_or_nothing
    # Killed pipelining with the next message claimed: more claims than
    # sender threads, 8 threads too (never without pipelining: that is a
    # failure).
    assert pipelining.kills_over_threads > 0
    assert pipelining.most_claims > 8
    assert plain.kills_over_threads == 0
