"""Scale-out (issue 14, item 4): 3 hosts x 2 processes sharing one queue,
3 real Postfix relays on 127.0.0.2-4; relay2 stopped mid-run and started
again, one host frozen past the claim lease (where mailout has one), one
killed (SIGKILL), each while it holds claims.

tests/scaleout.py does the work; MAILOUT_SCALEOUT_MESSAGES sets the size
(CI: 600), ``python tests/scaleout.py --messages 20000 --rate 150`` is the
longer run.  Skipped without Postfix (or root, which a private Postfix
needs), but failed instead under CI (CI or MAILOUT_TEST_POSTFIX set).
"""
import os

import pytest

import postfix as pf
import scaleout

pytestmark = pytest.mark.slow
MESSAGES = int(os.environ.get('MAILOUT_SCALEOUT_MESSAGES', '600'))


@pytest.fixture
def postfix_required():
    if os.environ.get('CI') and not os.path.exists(pf.POSTFIX):
        pytest.fail(f'{pf.POSTFIX} is missing but CI is set')
    pf.require()
    if os.geteuid() != 0:
        if pf.required() or os.environ.get('CI'):
            pytest.fail('a private Postfix needs root')
        pytest.skip('a private Postfix needs root')


def run(tmp_path, **options):
    seed = os.environ.get('MAILOUT_SCALEOUT_SEED')
    summary = scaleout.run(str(tmp_path / 'run'),
                           seed=int(seed) if seed else None, **options)
    print()
    print(summary.text())
    return summary


def check(summary):
    """What every run must show (scaleout's checks, and the figures that
    prove each phase happened)."""
    s = summary
    assert s.failures == [], s.text()
    # No loss, no unexplained duplicates.
    assert s.committed >= s.messages
    assert s.lost == [] and s.unexpected == []
    assert s.delivered == s.committed
    assert s.duplicates['unexplained'] == 0
    assert sum(s.duplicates.values()) == s.copies - s.delivered
    # Nothing stuck.
    assert s.stuck == {} and s.postfix_stuck == {}
    # relay2 took nothing while stopped; the others carried the mail; it
    # carried mail again after its restart.
    during = s.per_relay['during the stop']
    assert during.get('relay2', 0) == 0
    assert during.get('relay1', 0) > 0 and during.get('relay3', 0) > 0
    assert s.accepted_while_stopped == 0 and s.arrived_while_stopped == 0
    assert s.per_relay['after the restart'].get('relay2', 0) > 0
    assert s.relay_back_s is not None
    # The killed host held claims; every one was delivered by another
    # process.
    assert s.killed_claims > 0
    assert s.claims_taken_over == s.killed_claims
    assert s.child_errors == []


def test_shared_queue_relay_stop_and_host_kill(tmp_path, postfix_required):
    """The shared spool: the killed host's claims are taken over by the
    other hosts after the claim lease (each host its own host id)."""
    summary = run(tmp_path, messages=MESSAGES, rate=40)
    check(summary)
    assert summary.claim_hosts == ['host-c']
    # Held back by the lease (3 s, counted from the claim's last renewal),
    # not by pid.
    assert summary.takeover_first_s > 1.0
    assert summary.takeover_last_s < summary.lease + 30
    # host-b, frozen past the lease: the others took its claims.
    assert summary.frozen_claims > 0
    assert summary.frozen_taken_over == summary.frozen_claims
    assert summary.frozen_first_s > 1.0


def test_per_host_queues(tmp_path, postfix_required):
    """Each host its own queue: the killed host's queue waits for the
    host to start again, which takes its claims back."""
    summary = run(tmp_path, messages=max(MESSAGES // 2, 200), rate=40,
                  queues='per-host')
    check(summary)
    assert summary.takeover_first_s >= 2.0     # --restart-after
