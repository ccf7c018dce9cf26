"""The fault matrix: each way a relay can fail, against a real SMTP server
process (tests/smtpsink.py), through `Processor.run_once()` on a real queue.

Each row asserts where every message ended (DESIGN section 3.5): delivered
once, in ``deferred/`` with the reply in its ``X-Mailout-Attempt`` history,
or in ``failed/`` with the reply; and that nothing was lost: every
(message, recipient) is in exactly one of the sink, ``deferred/`` and
``failed/``, while ``new/``, ``cur/`` and ``tmp/`` are empty.

Every row runs twice: against a sink that offers PIPELINING (RFC 2920),
whose every recorded message must then have come pipelined, and against one
that does not; the outcomes are the same.

Most rows queue two messages and let the fault strike once (``--faults 1``):
the first message takes the fault, the second must go through on the same
or a new connection, and the first must go out (once) when retried.
"""
import collections
import functools
import glob
import json
import os
import time

import pytest

import helpers
from helpers import files_in
from helpers import mailer_and_queue
from helpers import smtp_mailer
from mailout.message import message_id_of
from mailout.processor import Processor
from mailout.queue.fileformat import parse

FROM = 'app@example.org'
ANN = 'ann@example.org'
BOB = 'bob@example.org'
CARL = 'carl@example.org'
USER = 'zope'
PASSWORD = 'S3cret-Pa55w0rd'
WRONG_PASSWORD = 'Wr0ng-Pa55w0rd'


@pytest.fixture(params=['one command at a time', 'pipelining'])
def start_sink(request, start_sink):
    """conftest's, offering PIPELINING or not."""
    pipelining = request.param == 'pipelining'
    sinks = []

    def start(*options):
        sinks.append(start_sink(*options, *['--pipelining'][:pipelining]))
        return sinks[-1]
    yield start
    for sink in sinks:
        for record in sink.messages():
            assert record['pipelined'] == pipelining


def processor_for(tmp_path, port, *mailer_keys):
    """A Processor (no threads) for a queue in tmp_path, whose SMTP mailer
    talks to 127.0.0.1:port with a 1 s timeout; "tls none" unless given.
    The relay never rests after a failure (down-time 0), so that each row
    shows what one fault does to one message; test_farm.py shows resting.
    """
    mailer, queue = mailer_and_queue(tmp_path, smtp_mailer(
        port, 'timeout 1s', 'down-time 0', *(mailer_keys or ['tls none']),
        tls=None))
    return Processor(queue, mailer), queue


#: Commit one message a subject (each in its own transaction, in that
#: order) from FROM; their Message-Ids.
enqueue = functools.partial(helpers.enqueue, fromaddr=FROM, to=(ANN,),
                            separately=True, message_ids=True)


def queued(queue, area):
    """``[(message id, QueuedMessage)]`` of ``deferred/`` or ``failed/``."""
    result = []
    for name in files_in(queue, area):
        if name.endswith('.reason'):    # beside a quarantined file
            continue
        with open(os.path.join(queue.path, area, name), 'rb') as f:
            message = parse(name, f.read())
        result.append((message_id_of(message.message), message))
    return result


def assert_outcome(queue, sinks, expected):
    """Each (message id, recipient) of ``expected`` is in exactly the one
    place named there ('sink' -- one of ``sinks`` --, 'deferred' or
    'failed'), nothing else is anywhere, and nothing is left in new/, cur/
    or tmp/."""
    for area in ('new', 'cur', 'tmp'):
        assert files_in(queue, area) == [], area
    places = collections.defaultdict(list)
    for sink in sinks if isinstance(sinks, list) else [sinks]:
        for record in sink.messages():
            for rcpt in record['rcpt_tos']:
                places[message_id_of(record['data']), rcpt].append('sink')
    for area in ('deferred', 'failed'):
        for message_id, message in queued(queue, area):
            for rcpt in message.toaddrs:
                places[message_id, rcpt].append(area)
    assert dict(places) == {key: [place] for key, place in expected.items()}


def only(queue, area, message_id):
    """The one file of ``message_id`` in ``area``."""
    [message] = [m for i, m in queued(queue, area) if i == message_id]
    return message


def last_attempt(queue, area, message_id):
    return only(queue, area, message_id).attempts[-1]


def unanswered(sink):
    """Message ids the sink received in full but never answered."""
    ids = []
    for path in sorted(glob.glob(os.path.join(sink.directory,
                                              '*.unanswered'))):
        with open(path) as f:
            ids.append(message_id_of(json.load(f)['data'].encode('latin-1')))
    return ids


def retry(processor, queue):
    """Promote every deferred message now and run the processor again."""
    queue.promote_due(now=time.time() + 10 ** 7)
    processor.run_once()


@pytest.mark.parametrize('reply, place', [
    ('451 4.3.0 try later', 'deferred'),
    ('421 4.3.2 shutting down', 'deferred'),
    ('550 5.7.1 sender rejected', 'failed')])
def test_mail_refused(tmp_path, start_sink, reply, place):
    """MAIL FROM refused: 4xx (421 too) defers, 5xx fails, with the reply."""
    sink = start_sink('--mail-reply', reply, '--faults', '1')
    processor, queue = processor_for(tmp_path, sink.port)
    first, second = enqueue(queue, 'first', 'second')
    processor.run_once()
    assert_outcome(queue, sink, {(first, ANN): place, (second, ANN): 'sink'})
    assert reply in last_attempt(queue, place, first)
    if place == 'deferred':
        retry(processor, queue)
        assert_outcome(queue, sink, {(first, ANN): 'sink',
                                     (second, ANN): 'sink'})


@pytest.mark.parametrize('reply, place', [
    ('450 4.2.1 mailbox busy', 'deferred'),
    ('421 4.3.2 shutting down', 'deferred'),
    ('550 5.1.1 no such user', 'failed')])
def test_rcpt_refused(tmp_path, start_sink, reply, place):
    """The only recipient refused: 4xx (421 too) defers, 5xx fails, with
    the reply."""
    sink = start_sink('--rcpt-reply', reply, '--faults', '1')
    processor, queue = processor_for(tmp_path, sink.port)
    first, second = enqueue(queue, 'first', 'second')
    processor.run_once()
    assert_outcome(queue, sink, {(first, ANN): place, (second, ANN): 'sink'})
    assert reply in last_attempt(queue, place, first)
    if place == 'deferred':
        retry(processor, queue)
        assert_outcome(queue, sink, {(first, ANN): 'sink',
                                     (second, ANN): 'sink'})


def test_rcpt_421_ends_the_transaction(tmp_path, start_sink):
    """421 (and a closed connection) at the second RCPT: the recipient
    accepted before it does not get the message either; all are deferred
    with the 421, and sent once on retry."""
    reply = '421 4.7.0 too many errors'
    sink = start_sink('--refuse', f'{BOB}={reply}')
    processor, queue = processor_for(tmp_path, sink.port)
    [message] = enqueue(queue, 'three', to=(ANN, BOB, CARL))
    processor.run_once()
    assert_outcome(queue, sink, {(message, ANN): 'deferred',
                                 (message, BOB): 'deferred',
                                 (message, CARL): 'deferred'})
    assert reply in last_attempt(queue, 'deferred', message)
    later = start_sink()    # the relay, back to normal
    retry(processor_for(tmp_path, later.port)[0], queue)
    assert_outcome(queue, [sink, later], {(message, ANN): 'sink',
                                          (message, BOB): 'sink',
                                          (message, CARL): 'sink'})


@pytest.mark.parametrize('option, reply, place', [
    ('--data-reply', '451 4.3.0 queue file write error', 'deferred'),
    ('--data-reply', '421 4.3.2 shutting down', 'deferred'),
    ('--data-reply', '554 5.6.0 message content rejected', 'failed'),
    ('--data-command-reply', '451 4.3.0 try later', 'deferred'),
    ('--data-command-reply', '554 5.5.1 no valid recipients', 'failed')])
def test_data_refused(tmp_path, start_sink, option, reply, place):
    """DATA refused (at the end of the data, or the command itself): 4xx
    (421 too) defers, 5xx fails, with the reply."""
    sink = start_sink(option, reply, '--faults', '1')
    processor, queue = processor_for(tmp_path, sink.port)
    first, second = enqueue(queue, 'first', 'second')
    processor.run_once()
    assert_outcome(queue, sink, {(first, ANN): place, (second, ANN): 'sink'})
    assert reply in last_attempt(queue, place, first)
    if place == 'deferred':
        retry(processor, queue)
        assert_outcome(queue, sink, {(first, ANN): 'sink',
                                     (second, ANN): 'sink'})


def test_some_recipients_refused(tmp_path, start_sink):
    """Some recipients refused: the accepted one gets it once (also after a
    retry), 5xx-refused fails, 4xx-refused is deferred, each with its reply.
    """
    sink = start_sink('--refuse', f'{BOB}=550 5.1.1 no such user',
                      '--refuse', f'{CARL}=450 4.2.1 mailbox busy')
    processor, queue = processor_for(tmp_path, sink.port)
    [message] = enqueue(queue, 'partly', to=(ANN, BOB, CARL))
    processor.run_once()
    assert_outcome(queue, sink, {(message, ANN): 'sink',
                                 (message, BOB): 'failed',
                                 (message, CARL): 'deferred'})
    assert '550 5.1.1 no such user' in last_attempt(queue, 'failed', message)
    assert '450 4.2.1 mailbox busy' in last_attempt(queue, 'deferred',
                                                    message)
    retry(processor, queue)     # carl is still refused; ann is not resent
    assert_outcome(queue, sink, {(message, ANN): 'sink',
                                 (message, BOB): 'failed',
                                 (message, CARL): 'deferred'})
    assert len(only(queue, 'deferred', message).attempts) == 2


@pytest.mark.parametrize('still_deferred', [False, True])
def test_recipients_failing_on_different_attempts(tmp_path, start_sink,
                                                  still_deferred):
    """Recipients refused with 5xx on different attempts all end in
    failed/ with their replies; a 4xx-refused one stays deferred."""
    dave = 'dave@example.org'
    to = (ANN, BOB, CARL) + ((dave,) if still_deferred else ())
    sink = start_sink('--refuse', f'{BOB}=550 5.1.1 no such user',
                      '--refuse', f'{CARL}=450 4.2.1 mailbox busy',
                      '--refuse', f'{dave}=450 4.2.1 mailbox busy')
    processor, queue = processor_for(tmp_path, sink.port)
    [message] = enqueue(queue, 'partly', to=to)
    processor.run_once()
    # The next attempt, at a relay that now knows carl is gone for good.
    later = start_sink('--refuse', f'{CARL}=550 5.1.1 gone',
                       '--refuse', f'{dave}=450 4.2.1 mailbox busy')
    processor = processor_for(tmp_path, later.port)[0]
    retry(processor, queue)
    expected = {(message, ANN): 'sink', (message, BOB): 'failed',
                (message, CARL): 'failed'}
    if still_deferred:
        expected[message, dave] = 'deferred'
    assert_outcome(queue, [sink, later], expected)  # ann got it once
    replies = [a for i, m in queued(queue, 'failed') if i == message
               for a in m.attempts]
    assert any('550 5.1.1 no such user' in a for a in replies)
    assert any('550 5.1.1 gone' in a for a in replies)


@pytest.mark.parametrize('reply, place', [
    ('451 4.3.0 queue file write error', 'deferred'),
    ('554 5.6.0 message content rejected', 'failed')])
def test_some_recipients_refused_then_data_refused(tmp_path, start_sink,
                                                   reply, place):
    """A recipient refused with 5xx, then DATA refused: that recipient
    fails with its own reply, the others follow the DATA reply."""
    sink = start_sink('--refuse', f'{BOB}=550 5.1.1 no such user',
                      '--data-reply', reply)
    processor, queue = processor_for(tmp_path, sink.port)
    [message] = enqueue(queue, 'partly', to=(ANN, BOB))
    processor.run_once()
    assert_outcome(queue, sink, {(message, ANN): place,
                                 (message, BOB): 'failed'})
    assert '550 5.1.1 no such user' in last_attempt(queue, 'failed', message)
    assert reply in last_attempt(queue, place, message)


@pytest.mark.parametrize('point', ['connect', 'mail', 'rcpt', 'data-start',
                                   'data-middle'])
def test_connection_dropped(tmp_path, start_sink, point):
    """The connection dropped before the final dot: deferred, and sent
    once when retried."""
    sink = start_sink('--drop-at', point, '--faults', '1')
    processor, queue = processor_for(tmp_path, sink.port)
    # 4 MB: more than the socket buffers take at once, so the client is
    # still writing when the sink (having read 64 KiB) hangs up.
    body = 'x' * 998 + '\r\n'
    body *= 4000 if point == 'data-middle' else 1
    first, second = enqueue(queue, 'first', 'second', body=body)
    processor.run_once()
    assert_outcome(queue, sink, {(first, ANN): 'deferred',
                                 (second, ANN): 'sink'})
    assert unanswered(sink) == []
    assert 'SMTPServerDisconnected' in last_attempt(queue, 'deferred', first)
    retry(processor, queue)
    assert_outcome(queue, sink, {(first, ANN): 'sink', (second, ANN): 'sink'})


def test_connection_dropped_after_the_dot(tmp_path, start_sink):
    """Dropped after the final dot, before the reply (RFC 1047): deferred
    and sent again, so the relay has it twice; the one duplicate SMTP
    cannot avoid (DESIGN 3.3)."""
    sink = start_sink('--drop-at', 'after-dot', '--faults', '1')
    processor, queue = processor_for(tmp_path, sink.port)
    first, second = enqueue(queue, 'first', 'second')
    processor.run_once()
    assert_outcome(queue, sink, {(first, ANN): 'deferred',
                                 (second, ANN): 'sink'})
    assert unanswered(sink) == [first]  # the relay has it, we cannot know
    assert 'closed' in last_attempt(queue, 'deferred', first)
    retry(processor, queue)
    assert_outcome(queue, sink, {(first, ANN): 'sink', (second, ANN): 'sink'})
    assert unanswered(sink) == [first]  # so the relay got `first` twice


@pytest.mark.parametrize('point', ['connect', 'mail', 'after-dot'])
def test_server_stalls(tmp_path, start_sink, point):
    """The relay stops answering (greeting, MAIL, after the dot): deferred
    after the 1 s timeout, then sent; after the dot it is a duplicate, as
    for a drop there."""
    sink = start_sink('--stall', '30', '--stall-at', point, '--faults', '1')
    processor, queue = processor_for(tmp_path, sink.port)
    first, second = enqueue(queue, 'first', 'second')
    start = time.monotonic()
    processor.run_once()
    assert time.monotonic() - start < 4
    assert_outcome(queue, sink, {(first, ANN): 'deferred',
                                 (second, ANN): 'sink'})
    assert 'timed out' in last_attempt(queue, 'deferred', first)
    retry(processor, queue)
    assert_outcome(queue, sink, {(first, ANN): 'sink', (second, ANN): 'sink'})
    assert unanswered(sink) == ([first] if point == 'after-dot' else [])


def test_server_down(tmp_path, start_sink):
    """Nothing listening on the relay's port: every message deferred at
    once with the connect error."""
    sink = start_sink()
    sink.stop()
    processor, queue = processor_for(tmp_path, sink.port)
    first, second = enqueue(queue, 'first', 'second')
    start = time.monotonic()
    processor.run_once()
    assert time.monotonic() - start < 1
    assert_outcome(queue, sink, {(first, ANN): 'deferred',
                                 (second, ANN): 'deferred'})
    for message in (first, second):
        attempt = last_attempt(queue, 'deferred', message)
        assert f'127.0.0.1:{sink.port}' in attempt
        assert 'Connection refused' in attempt or 'ConnectionRefused' \
            in attempt


def test_starttls_not_offered(tmp_path, start_sink, certs):
    """"tls starttls" and a relay without STARTTLS: deferred, nothing sent
    in the clear."""
    sink = start_sink()
    processor, queue = processor_for(tmp_path, sink.port, 'tls starttls',
                                     f'ca-file {certs.ca}')
    [message] = enqueue(queue, 'secret')
    processor.run_once()
    assert_outcome(queue, sink, {(message, ANN): 'deferred'})
    assert 'does not offer STARTTLS' in last_attempt(queue, 'deferred',
                                                     message)


def test_starttls_refused(tmp_path, start_sink, certs):
    """STARTTLS offered but answered 454: deferred with the reply, nothing
    sent in the clear."""
    reply = '454 4.7.0 TLS not available due to temporary reason'
    sink = start_sink('--starttls', certs.cert, certs.key,
                      '--starttls-reply', reply)
    processor, queue = processor_for(tmp_path, sink.port, 'tls starttls',
                                     f'ca-file {certs.ca}')
    [message] = enqueue(queue, 'secret')
    processor.run_once()
    assert_outcome(queue, sink, {(message, ANN): 'deferred'})
    assert reply in last_attempt(queue, 'deferred', message)


def test_untrusted_certificate(tmp_path, start_sink, certs):
    """A relay certificate nobody trusts (no ca-file): deferred with the
    verification error, nothing sent."""
    sink = start_sink('--starttls', certs.cert, certs.key)
    processor, queue = processor_for(tmp_path, sink.port, 'tls starttls')
    [message] = enqueue(queue, 'secret')
    processor.run_once()
    assert_outcome(queue, sink, {(message, ANN): 'deferred'})
    assert 'certificate verify failed' in last_attempt(queue, 'deferred',
                                                       message)


def test_auth_rejected(tmp_path, start_sink, certs):
    """AUTH answered 535: deferred (a relay setting, not the message, is
    wrong; as Postfix's smtp_sasl_auth_soft_bounce), password not kept."""
    sink = start_sink('--starttls', certs.cert, certs.key,
                      '--auth', f'{USER}:{PASSWORD}')
    processor, queue = processor_for(
        tmp_path, sink.port, 'tls starttls', f'ca-file {certs.ca}',
        f'username {USER}', f'password {WRONG_PASSWORD}')
    [message] = enqueue(queue, 'hello')
    processor.run_once()
    assert_outcome(queue, sink, {(message, ANN): 'deferred'})
    attempt = last_attempt(queue, 'deferred', message)
    assert 'AUTH failed: 535' in attempt
    assert WRONG_PASSWORD not in attempt


@pytest.mark.parametrize('idle_reply', [None, '421 4.4.2 sink.test Error: '
                                              'timeout exceeded'])
def test_idle_connection_closed_by_server(tmp_path, start_sink, idle_reply):
    """A kept-open connection the relay closed while idle (silently or with
    421): the next message goes out on a new one, no error."""
    options = ['--idle-timeout', '0.2']
    if idle_reply:
        options += ['--idle-reply', idle_reply]
    sink = start_sink(*options)
    processor, queue = processor_for(tmp_path, sink.port)
    [first] = enqueue(queue, 'first')
    # What a sender thread does on each wake-up: keep the connection open.
    assert processor.process_waiting() == 1
    assert processor.mailer.kept_connection is not None
    time.sleep(0.5)
    [second] = enqueue(queue, 'second')
    processor.run_once()
    assert_outcome(queue, sink, {(first, ANN): 'sink', (second, ANN): 'sink'})
    peers = [record['peer'] for record in sink.messages()]
    assert peers[0] != peers[1]


def test_8bit_body_sent_with_body_8bitmime(tmp_path, start_sink):
    """An 8-bit body goes with MAIL FROM ... BODY=8BITMIME (the relay
    offers 8BITMIME), unchanged; a 7-bit one without."""
    sink = start_sink()
    processor, queue = processor_for(tmp_path, sink.port)
    [eight] = enqueue(queue, 'eight', body='Grüße aus Köln\r\n')
    [seven] = enqueue(queue, 'seven', body='Hello\r\n')
    processor.run_once()
    assert_outcome(queue, sink, {(eight, ANN): 'sink', (seven, ANN): 'sink'})
    first, second = sink.messages()
    assert first['mail_options'] == ['BODY=8BITMIME']
    assert 'Grüße aus Köln\r\n'.encode() in first['data']
    assert second['mail_options'] == []
