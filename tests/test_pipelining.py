"""PIPELINING (RFC 2920) against real server processes.

tests/smtpsink.py with ``--pipelining`` offers the extension and records,
for each message, whether its RCPT came in one write with its MAIL
(``pipelined``) and whether the next message's MAIL came with its final dot
(``followed``).  The fault matrix (tests/test_faults.py) runs every row
against such a sink too; the kill -9 loop (tests/crashloop.py) kills
pipelined senders.  Round trips over a real network delay are measured by
bench/roundtrip.py.
"""
import glob
import json
import os

import pytest

from helpers import enqueue
from helpers import files_in
from helpers import mailer_and_queue
from helpers import smtp_mailer
from mailout.interfaces import PermanentDeliveryError
from mailout.interfaces import Withdrawn
from mailout.processor import Processor
from mailout.queue.fileformat import parse

ANN = 'ann@example.org'
BOB = 'bob@example.org'
NOBODY = 'nobody@example.org'
UNKNOWN = '550 5.1.1 no such user'


def processor_for(tmp_path, sink, *mailer_lines):
    mailer, queue = mailer_and_queue(
        tmp_path, smtp_mailer(sink.port, 'timeout 5s', *mailer_lines))
    return Processor(queue, mailer), queue


def subjects(records):
    return [r['data'].split(b'Subject: ')[1].split(b'\r\n')[0].decode()
            for r in records]


def test_a_stream_of_messages_is_pipelined(tmp_path, start_sink):
    """Each message's MAIL, RCPT and DATA go out in one write, and its
    final dot with the next message's commands, over one connection."""
    sink = start_sink('--pipelining')
    processor, queue = processor_for(tmp_path, sink)
    enqueue(queue, *'abcde', to=(ANN, BOB))
    assert processor.run_once() == 5
    records = sink.messages()
    assert subjects(records) == list('abcde')
    assert [r['pipelined'] for r in records] == [True] * 5
    assert [r['followed'] for r in records] == [True] * 4 + [False]
    assert len({r['peer'] for r in records}) == 1
    assert [r['rcpt_tos'] for r in records] == [[ANN, BOB]] * 5


@pytest.mark.parametrize('offered, setting', [
    (False, 'pipelining on'), (True, 'pipelining off')])
def test_one_command_at_a_time(tmp_path, start_sink, offered, setting):
    """Without the extension, or with ``pipelining off``, each command
    waits for its reply."""
    sink = start_sink(*['--pipelining'][:offered])
    processor, queue = processor_for(tmp_path, sink, setting)
    enqueue(queue, 'a', 'b')
    processor.run_once()
    assert [(r['pipelined'], r['followed']) for r in sink.messages()] \
        == [(False, False)] * 2


def test_next_message_taken_before_the_outcome(tmp_path, start_sink):
    """`send_each` asks for the next envelope while the previous message's
    final reply is outstanding, and yields each outcome in order."""
    sink = start_sink('--pipelining', '--refuse', f'{NOBODY}={UNKNOWN}')
    mailer, _ = mailer_and_queue(tmp_path, smtp_mailer(sink.port))
    events = []

    def envelopes():
        for i, to in enumerate([(ANN,), (ANN, NOBODY), (BOB,)], 1):
            events.append(f'take {i}')
            yield ('app@example.org', to,
                   f'Subject: {i}\r\n\r\nbody\r\n'.encode())
    for envelope, outcome in mailer.send_each(envelopes()):
        events.append(f'outcome {envelope[2][9:10].decode()}: {outcome}')
    mailer.close()
    assert events == [
        'take 1', 'take 2', 'outcome 1: {}',
        'take 3', "outcome 2: {'nobody@example.org': "
                  "(550, '5.1.1 no such user')}",
        'outcome 3: {}']
    assert subjects(sink.messages()) == ['1', '2', '3']


def test_partial_refusal_in_a_pipelined_stream(tmp_path, start_sink):
    """A recipient refused at RCPT in mid-stream fails alone; the message
    goes to the others, and the stream goes on on the same connection."""
    sink = start_sink('--pipelining', '--refuse', f'{NOBODY}={UNKNOWN}')
    processor, queue = processor_for(tmp_path, sink)
    enqueue(queue, 'first', separately=True)
    [second] = enqueue(queue, 'second', to=(ANN, NOBODY))
    enqueue(queue, 'third', separately=True)
    processor.run_once()
    records = sink.messages()
    assert subjects(records) == ['first', 'second', 'third']
    assert records[1]['rcpt_tos'] == [ANN]
    assert all(r['followed'] for r in records[:2])
    assert len({r['peer'] for r in records}) == 1
    [failed] = files_in(queue, 'failed')
    assert failed.startswith(second)


def test_lone_dot_when_data_accepted_without_recipients(tmp_path,
                                                        start_sink):
    """A server that answers DATA with 354 though it refused every RCPT
    gets a lone dot: nothing is sent (RFC 2920 section 3.1); the message
    fails with the RCPT replies, and the next one goes out."""
    sink = start_sink('--pipelining', '--data-without-recipients',
                      '--refuse', f'{NOBODY}={UNKNOWN}')
    processor, queue = processor_for(tmp_path, sink)
    [refused] = enqueue(queue, 'refused', to=(NOBODY,), separately=True)
    enqueue(queue, 'next', separately=True)
    processor.run_once()
    empty = sorted(glob.glob(os.path.join(sink.directory, '*.empty')))
    assert [json.load(open(path)) for path in empty] == [{'size': 0}]
    assert subjects(sink.messages()) == ['next']
    [failed] = files_in(queue, 'failed')
    assert failed.startswith(refused)
    with open(os.path.join(queue.path, 'failed', failed)) as f:
        assert UNKNOWN in f.read()


def test_all_or_none_sends_data_only_when_every_recipient_took_it(
        tmp_path, start_sink):
    """A direct delivery's all-or-none send pipelines MAIL and RCPT but
    holds DATA back until every RCPT is answered: with one refused,
    nothing is sent, and the connection stays in step for the next."""
    sink = start_sink('--pipelining', '--data-without-recipients',
                      '--refuse', f'{NOBODY}={UNKNOWN}')
    mailer, _ = mailer_and_queue(tmp_path, smtp_mailer(sink.port))
    refused = mailer.send('app@example.org', [ANN, NOBODY],
                          b'Subject: held\r\n\r\nbody\r\n', all_or_none=True)
    assert refused == {NOBODY: (550, '5.1.1 no such user')}
    assert mailer.send('app@example.org', [ANN],
                       b'Subject: sent\r\n\r\nbody\r\n',
                       all_or_none=True) == {}
    mailer.close()
    assert subjects(sink.messages()) == ['sent']
    assert glob.glob(os.path.join(sink.directory, '*.empty')) == []


def test_dropped_after_the_dot_only_that_message_may_go_twice(
        tmp_path, start_sink):
    """The connection dies after the first message's final dot, with the
    second's commands already written: the first is deferred (the relay
    has it, RFC 1047); the second goes once, on a new connection."""
    sink = start_sink('--pipelining', '--drop-at', 'after-dot',
                      '--faults', '1')
    processor, queue = processor_for(tmp_path, sink)
    enqueue(queue, 'first', 'second', 'third', separately=True)
    processor.run_once()
    unanswered = glob.glob(os.path.join(sink.directory, '*.unanswered'))
    assert len(unanswered) == 1
    records = sink.messages()
    assert subjects(records) == ['second', 'third']
    assert len(files_in(queue, 'deferred')) == 1
    queue.promote_due(now=2e9)
    processor.run_once()
    assert subjects(sink.messages()) == ['second', 'third', 'first']


def test_421_after_the_dot_sends_the_next_on_a_new_connection(
        tmp_path, start_sink):
    """421 to the final dot closes the session: the next message, whose
    commands went with that dot and got no reply, goes on a new one."""
    sink = start_sink('--pipelining', '--data-reply',
                      '421 4.3.2 shutting down', '--faults', '1')
    processor, queue = processor_for(tmp_path, sink)
    enqueue(queue, 'first', 'second', separately=True)
    processor.run_once()
    assert subjects(sink.messages()) == ['second']
    [deferred] = files_in(queue, 'deferred')
    with open(os.path.join(queue.path, 'deferred', deferred)) as f:
        assert '421 4.3.2 shutting down' in f.read()


def test_smtputf8_needed_but_not_offered_in_a_stream(tmp_path, start_sink):
    """A message whose addresses need SMTPUTF8, which the relay lacks,
    is not pipelined behind the one before: it fails on its own, and the
    stream goes on."""
    sink = start_sink('--pipelining')
    mailer, _ = mailer_and_queue(tmp_path, smtp_mailer(sink.port,
                                                       'smtputf8 on'))
    outcomes = [outcome for _, outcome in mailer.send_each([
        ('app@example.org', [ANN], b'Subject: 1\r\n\r\nbody\r\n'),
        ('app@example.org', ['jürgen@example.org'],
         b'Subject: 2\r\n\r\nbody\r\n'),
        ('app@example.org', [BOB], b'Subject: 3\r\n\r\nbody\r\n')])]
    mailer.close()
    assert outcomes[0] == {} and outcomes[2] == {}
    assert isinstance(outcomes[1], PermanentDeliveryError)
    assert subjects(sink.messages()) == ['1', '3']


def test_lmtp_pipelined_replies_per_recipient(tmp_path, start_sink):
    """LMTP: each accepted recipient's reply after the dot, then the next
    message's replies, read in order from one pipelined stream."""
    sink = start_sink('--lmtp', '--pipelining', '--deliver-reply',
                      f'{BOB}=452 4.2.2 mailbox full')
    mailer, queue = mailer_and_queue(tmp_path, f'''
<lmtp-mailer relay>
  host 127.0.0.1:{sink.port}
  timeout 5s
</lmtp-mailer>''')
    processor = Processor(queue, mailer)
    enqueue(queue, 'first', 'second', to=(ANN, BOB))
    processor.run_once()
    records = sink.messages()
    assert [r['rcpt_tos'] for r in records] == [[ANN], [ANN]]
    assert [r['pipelined'] for r in records] == [True, True]
    assert records[0]['followed']
    deferred = files_in(queue, 'deferred')
    assert len(deferred) == 2
    for name in deferred:
        with open(os.path.join(queue.path, 'deferred', name), 'rb') as f:
            message = parse(name, f.read())
        assert message.toaddrs == (BOB,)
        assert '452 4.2.2 mailbox full' in message.attempts[-1]


def test_withdrawn_before_its_content_goes_out(tmp_path, start_sink):
    """``still_wanted`` says no once the server waits for a message's
    content (a claim taken over meanwhile): the connection is dropped,
    nothing of that message arrives, and the next goes on a new one."""
    sink = start_sink('--pipelining')
    mailer, _ = mailer_and_queue(tmp_path, smtp_mailer(sink.port))
    envelopes = [('app@example.org', [ANN], f'Subject: {i}\r\n\r\nx\r\n'
                  .encode()) for i in (1, 2, 3)]
    outcomes = [outcome for _, outcome in mailer.send_each(
        envelopes, still_wanted=lambda envelope: envelope is not
        envelopes[1])]
    mailer.close()
    assert outcomes[0] == {} and outcomes[2] == {}
    assert isinstance(outcomes[1], Withdrawn)
    records = sink.messages()
    assert subjects(records) == ['1', '3']
    assert records[0]['peer'] != records[1]['peer']


def test_many_recipients_pipelined_in_groups(tmp_path, start_sink):
    """RCPT commands go out at most `MAX_GROUP` at a time (both sides'
    buffers never fill), and each reply still meets its recipient: the
    refused one in the third group fails alone."""
    many = [f'user{i:03d}@example.org' for i in range(250)]
    sink = start_sink('--pipelining', '--refuse', f'{many[217]}={UNKNOWN}')
    mailer, _ = mailer_and_queue(tmp_path, smtp_mailer(sink.port))
    refused = mailer.send('app@example.org', many,
                          b'Subject: many\r\n\r\nbody\r\n')
    mailer.close()
    assert refused == {many[217]: (550, '5.1.1 no such user')}
    [record] = sink.messages()
    assert record['rcpt_tos'] == many[:217] + many[218:]
    assert record['pipelined']


def test_no_command_smuggled_from_a_queue_file(tmp_path, start_sink):
    """A queue file written by someone else, whose recipient holds a CR and
    an angle bracket, fails with its reason: no command or parameter of
    its making reaches the relay."""
    sink = start_sink('--pipelining')
    processor, queue = processor_for(tmp_path, sink)
    evil = 'ann@example.org>\rRCPT TO:<evil@example.org'
    with open(os.path.join(queue.path, 'new', '1.planted.host'), 'wb') as f:
        f.write(b'X-Mailout-From: app@example.org\r\n'
                b'X-Mailout-To: ' + evil.encode() + b'\r\n\r\n'
                b'Subject: planted\r\n\r\nbody\r\n')
    enqueue(queue, 'next', separately=True)
    processor.run_once()
    assert [r['rcpt_tos'] for r in sink.messages()] == [[ANN]]
    [failed] = files_in(queue, 'failed')
    with open(os.path.join(queue.path, 'failed', failed), 'rb') as f:
        assert b'553 5.1.3 malformed envelope address' in f.read()


def test_subscriber_sending_mail_while_a_pipelined_message_is_out(
        tmp_path, start_sink):
    """An event subscriber that sends mail from the processor's thread,
    through a direct delivery sharing the mailer, while the next queued
    message's commands are out on the kept session: its message goes to
    its own recipient over a session of its own, and the stream goes on."""
    import transaction
    import zope.component
    from helpers import config_text
    from helpers import load_config
    from mailout.factories import build_all
    from mailout.interfaces import IMailSentEvent
    sink = start_sink('--pipelining')
    _, deliveries = build_all(load_config(config_text(
        sink.port, queue_path=tmp_path / 'q', mailer_lines=['timeout 5s'],
        delivery_lines=['processor off'], direct=True)))
    queued, urgent = deliveries['default'], deliveries['urgent']
    assert queued.mailer is urgent.mailer
    notices = []

    @zope.component.adapter(IMailSentEvent)
    def notify_admin(event):
        if not notices:
            notices.append(urgent.send(
                'app@example.org', ['admin@example.org'],
                b'Subject: notice\r\n\r\nsent one\r\n'))
            transaction.commit()
    registry = zope.component.getGlobalSiteManager()
    registry.registerHandler(notify_admin)
    try:
        enqueue(queued.queue, 'first', 'second', 'third', separately=True)
        Processor(queued.queue, queued.mailer).run_once()
    finally:
        registry.unregisterHandler(notify_admin)
    received = {subject: record['rcpt_tos'] for subject, record in zip(
        subjects(sink.messages()), sink.messages())}
    assert received == {'first': [ANN], 'second': [ANN], 'third': [ANN],
                        'notice': ['admin@example.org']}
    assert sum(map(len, map(os.listdir, [
        os.path.join(queued.queue.path, area)
        for area in ('new', 'cur', 'deferred', 'failed')]))) == 0
