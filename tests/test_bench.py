"""Keep the benchmark suite (bench/) from rotting: run its smoke mode.

It asserts that every section ran and printed its table, never a speed.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, 'bench', 'run.py')

pytest.importorskip('aiosmtpd')
pytest.importorskip('trustme')


def test_bench_smoke(tmp_path):
    results = tmp_path / 'results.json'
    out = subprocess.run(
        [sys.executable, RUN, '--smoke', '--quiet', '--workdir',
         str(tmp_path), '--json', str(results)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    table = out.stdout
    for heading in (
            'Drain a queue of ~2 KB messages: (a) plain loopback',
            'Drain a queue of ~2 KB messages: (b) STARTTLS required',
            'Drain a queue of ~2 KB messages: (c) the sink delays every '
            'reply by 10 ms',
            'Enqueue through transaction.commit()',
            'Commit -> arrival of single messages',
            'processor start -> first arrival, peak RSS',
            'Targets'):
        assert heading in table, table
    for row in ('raw smtplib, 1 connection (limit)',
                'raw smtplib, 8 connections (limit)',
                'zope.sendmail, interval 3 s', 'zope.sendmail, interval 0',
                'mailout, 1 connection', 'mailout, 8 connections',
                'disk floor: write+fsync+rename+dir fsync',
                'mailout, 1 message a transaction',
                'mailout, 100 messages a transaction'):
        assert row in table, table
    # Every message arrived exactly once everywhere.
    assert 'Warnings' not in table, table
    data = json.loads(results.read_text())
    assert set(data['drain']) == {'loopback', 'starttls', 'delay10'}
    for setting in data['drain'].values():
        for runs in setting.values():
            assert all(r['rate'] > 0 for r in runs)
    # The work directory is cleaned up.
    assert [p.name for p in tmp_path.iterdir()] == ['results.json']
