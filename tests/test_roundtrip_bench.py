"""Keep bench/roundtrip.py (issue 13) working: its smoke mode, through the
proxy that delays each direction by 5 ms, against Postfix's smtp-sink.

Besides the table's structure it checks what the proxy counts for the two
reference clients, properties of the proxy and of those clients, not of
mailout: raw smtplib waits for 4 round trips a message (MAIL, RCPT, DATA,
end of data), the bench's RFC 2920 client for ~1, and only when the server
announces PIPELINING.  It asserts no speed and no target of mailout's.
"""
import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDTRIP = os.path.join(ROOT, 'bench', 'roundtrip.py')
SMTP_SINK = '/usr/sbin/smtp-sink'

pytest.importorskip('aiosmtpd')


def require_smtp_sink():
    """Skip without smtp-sink; fail under CI, which installs Debian's
    postfix (.ci/run)."""
    if os.path.exists(SMTP_SINK):
        return
    if os.environ.get('CI') or os.environ.get('MAILOUT_TEST_POSTFIX'):
        pytest.fail(f'{SMTP_SINK} is missing under CI (.ci/run installs '
                    f'the postfix package, which brings it)')
    pytest.skip(f'{SMTP_SINK} not installed (Debian package postfix)')


def bench(tmp_path, *options):
    results = tmp_path / 'results.json'
    out = subprocess.run(
        [sys.executable, ROUNDTRIP, '--smoke', '--quiet', '--workdir',
         str(tmp_path), '--json', str(results), *options],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    data = json.loads(results.read_text()) if results.exists() else None
    return out, data


def rt(data, system):
    """Median round trips per message that the proxy counted."""
    return statistics.median(r['rt'] for r in data['runs'][system])


def test_roundtrip_smoke(tmp_path):
    require_smtp_sink()
    out, data = bench(tmp_path)
    assert out.returncode == 0, out.stderr
    table = out.stdout
    for line in ('server: Postfix smtp-sink (announces PIPELINING)',
                 'proxy: 5 ms each way',
                 '~2 KB messages to a server 10 ms away (proxy, 5 ms each '
                 'way)',
                 '~2 KB messages on loopback (no proxy)',
                 'Targets (issue 13)'):
        assert line in table, table
    for column in ('msg/s', 'range', 'RT/msg', 'all turns/msg',
                   'x smtplib 1c', 'x pipelining same conns'):
        assert column in table, table
    for row in ('raw smtplib, 1 connection', 'raw smtplib, 8 connections',
                'pipelining client, 1 connection (limit)',
                'pipelining client, 8 connections (limit)',
                'mailout, 1 connection', 'mailout, 8 connections',
                'zope.sendmail, interval 3 s',
                'mailout 1 conn >= 3.5x raw smtplib 1 conn',
                'mailout 1 conn >= 0.9x pipelining client 1 conn',
                'mailout 1 conn <= 1.2 round trips per message',
                'mailout 8 conns >= 0.9x pipelining client 8 conns',
                'loopback: mailout 1 conn >= 0.8x raw smtplib 1 conn'):
        assert row in table, table
    # Every message arrived, no client failed.
    assert 'Warnings' not in table, table
    assert data['server'] == 'smtp-sink' and data['server_pipelining']
    assert len(data['targets']) == 5
    for system, runs in data['runs'].items():
        assert runs, system
        for r in runs:
            assert r['count'] == r['n'] and r['rate'] > 0, (system, r)
            if not system.startswith('lo_'):
                # The proxy saw every message's end-of-data reply.
                assert r['proxy_messages'] == r['n'], (system, r)
    if data['pipelining_key']:
        assert 'mailout, pipelining off, 1 connection' in table
    # What the proxy counts for the reference clients.
    assert 3.95 <= rt(data, 'raw1') <= 4.05
    assert 3.95 <= rt(data, 'rawN') <= 4.05
    assert rt(data, 'pipe1') <= 1.3
    assert rt(data, 'pipeN') <= 1.3
    # The work directory is cleaned up.
    assert [p.name for p in tmp_path.iterdir()] == ['results.json']


def test_roundtrip_without_pipelining_server(tmp_path):
    """With the aiosmtpd sink (the fallback where smtp-sink is missing) the
    output says that nothing pipelines, the bench's client does not
    pipeline, and --check-targets turns the missed targets into exit 1."""
    out, data = bench(tmp_path, '--server', 'aiosmtpd', '--check-targets',
                      '--systems', 'raw1,pipe1,mailout1')
    assert out.returncode == 1, out.stderr
    assert 'does NOT announce PIPELINING' in out.stdout, out.stdout
    assert 'MISSED' in out.stdout
    assert data['server'] == 'aiosmtpd' and not data['server_pipelining']
    assert 3.95 <= rt(data, 'pipe1') <= 4.05
    assert all(r['count'] == r['n'] for runs in data['runs'].values()
               for r in runs)
