"""Crash safety (DESIGN.md section 3, items 1-3), proved by kill -9 of
children with 1 or 8 sender threads, against a relay slow at DATA.

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
    """kill -9 anywhere, 8 sender threads against a relay slow at DATA: no
    loss, no uncommitted mail, dups in flight only (a claim a thread)."""
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
