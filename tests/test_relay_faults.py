"""Relays whose replies do not end (tests/badrelay.py, a real server
process): one that stalls in the middle of a reply, one that trickles reply
lines, one that sends a reply without end.  Each must cost a sender thread
no more than about ``timeout`` and a bounded amount of memory, and rest the
relay for ``down-time`` like any timeout."""
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

import helpers
from helpers import HERE
from helpers import load_config
from helpers import message
from helpers import stop_process
from helpers import write_config
from mailout import mailers
from mailout.interfaces import TransientDeliveryError

FROM = 'sender@example.org'
TO = ['ann@example.org']
SCRIPT = os.path.join(os.path.dirname(sys.executable), 'mailout')
# Large enough to show an unbounded read, small enough not to hurt when it
# is one; the endless replies below end after this many bytes.
BIG_REPLY = 20_000_000


@pytest.fixture
def start_badrelay():
    """Start tests/badrelay.py with the given options; return its port."""
    processes = []

    def start(*options):
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, 'badrelay.py'), *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(process)
        return int(process.stdout.readline())
    yield start
    for process in processes:
        stop_process(process)


def smtp_mailer(port, timeout='1s'):
    settings = load_config(helpers.smtp_mailer(
        port, f'timeout {timeout}', 'down-time 60s')).mailers['relay']
    return mailers.SMTPMailer(settings)


def within(seconds, function, *args):
    """``(error or None, seconds taken)`` of ``function(*args)``, run in a
    thread; fails the test if it takes longer than ``seconds``."""
    outcome = []

    def run():
        started = time.monotonic()
        try:
            function(*args)
            outcome.append((None, time.monotonic() - started))
        except Exception as e:
            outcome.append((e, time.monotonic() - started))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f'still running after {seconds}s'
    return outcome[0]


FAULTS = [('stall', 'mail'), ('stall', 'rcpt'), ('stall', 'dot'),
          ('trickle', 'mail'), ('trickle', 'data'), ('trickle', 'dot'),
          ('endless', 'mail'), ('endless', 'dot')]


@pytest.mark.parametrize('fault, at', FAULTS)
def test_unending_reply_rests_the_relay(start_badrelay, caplog, fault, at):
    """A reply that stalls, trickles or does not end, to any command of the
    transaction: the message is deferred within about the 1 s timeout,
    saying what happened, and the relay is marked down, so that the next
    message does not wait for it."""
    caplog.set_level(logging.WARNING)
    port = start_badrelay('--fault', fault, '--at', at,
                          '--reply-size', str(BIG_REPLY))
    mailer = smtp_mailer(port)
    error, seconds = within(10, mailer.send, FROM, TO, message())
    assert isinstance(error, TransientDeliveryError), error
    assert seconds < 2
    expected = 'longer than 64 KiB' if fault == 'endless' \
        else 'timed out: no complete reply within 1s'
    assert f'127.0.0.1:{port}: ' in str(error) and expected in str(error)
    assert f'relay 127.0.0.1:{port} marked down for 60s' in caplog.text
    error, seconds = within(1, mailer.send, FROM, TO, message())
    assert 'marked down after' in str(error) and seconds < 0.1


@pytest.mark.parametrize('fault, at', [('stall', 'greeting'),
                                       ('trickle', 'greeting'),
                                       ('trickle', 'ehlo'),
                                       ('endless', 'ehlo')])
def test_unending_reply_while_connecting(start_badrelay, fault, at):
    """The greeting and EHLO are bounded in the same way."""
    port = start_badrelay('--fault', fault, '--at', at,
                          '--reply-size', str(BIG_REPLY))
    mailer = smtp_mailer(port)
    error, seconds = within(10, mailer.connect, '127.0.0.1', port)
    assert isinstance(error, TransientDeliveryError), error
    assert seconds < 2
    assert ('longer than 64 KiB' if fault == 'endless'
            else 'no complete reply within 1s') in str(error)


def test_relay_that_stops_reading_the_message(start_badrelay, caplog):
    """A relay that stops reading in the middle of the message: sending
    times out (it was called a lost connection) and the relay rests."""
    caplog.set_level(logging.WARNING)
    port = start_badrelay('--fault', 'deaf')
    mailer = smtp_mailer(port)
    big = message(body=('x' * 998 + '\r\n') * 10_000)          # 10 MB
    error, seconds = within(10, mailer.send, FROM, TO, big)
    assert isinstance(error, TransientDeliveryError), error
    assert seconds < 2
    assert 'RelayStalled: timed out: sending took over 1s' in str(error)
    assert f'relay 127.0.0.1:{port} marked down for 60s' in caplog.text


MEASURE = '''
import sys, tracemalloc
from mailout import config, mailers
settings = config.loads("""<mailout>
<smtp-mailer relay>
    host 127.0.0.1:%s
    tls none
    timeout 30s
</smtp-mailer>
</mailout>""").mailers['relay']
mailer = mailers.SMTPMailer(settings)
tracemalloc.start()
try:
    mailer.send('a@example.org', ['b@example.org'],
                b'Subject: x\\r\\n\\r\\nx\\r\\n')
except Exception as e:
    print(type(e).__name__, e, file=sys.stderr)
print(tracemalloc.get_traced_memory()[1])
'''


def test_endless_reply_memory_is_bounded(start_badrelay):
    """A 48 MB reply to MAIL FROM is cut off after 64 KiB: reading it costs
    well under a megabyte (it cost 103 MB: smtplib keeps every line)."""
    port = start_badrelay('--fault', 'endless', '--at', 'mail',
                          '--reply-size', str(48_000_000))
    result = subprocess.run([sys.executable, '-c', MEASURE % port],
                            capture_output=True, text=True, timeout=60)
    peak = int(result.stdout)
    assert 'longer than 64 KiB' in result.stderr
    assert peak < 1_000_000, f'peak {peak / 1e6:.1f} MB'


@pytest.mark.parametrize('at', ['greeting', 'ehlo'])
def test_check_ends_within_its_timeout(tmp_path, start_badrelay, at):
    """`mailout check --timeout 1` against a relay that trickles its
    greeting or EHLO reply ends in about a second, exit status 1, saying
    what happened."""
    port = start_badrelay('--fault', 'trickle', '--at', at)
    conf = write_config(tmp_path / 'mailout.conf',
                        helpers.smtp_mailer(port))
    started = time.monotonic()
    result = subprocess.run([SCRIPT, 'check', '-C', conf, '--timeout', '1'],
                            capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 5
    assert result.returncode == 1
    assert f'127.0.0.1:{port}  FAILED: RelayStalled: timed out: no ' \
        'complete reply within 1s' in result.stdout
    assert result.stdout.endswith('check FAILED (1 problem)\n')
