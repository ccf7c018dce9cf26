"""The processor: outcomes, retries, failed mail and events."""
import os
import time

import pytest
import zope.event
from zope.interface.verify import verifyObject

from helpers import enqueue
from helpers import failed
from helpers import files_in
from helpers import mailer_and_queue
from helpers import smtp_mailer
from mailout.interfaces import IMailDeferredEvent
from mailout.interfaces import IMailFailedEvent
from mailout.interfaces import IMailSentEvent
from mailout.interfaces import PermanentDeliveryError
from mailout.interfaces import TransientDeliveryError
from mailout.processor import Processor
from mailout.processor import RetryPolicy
from mailout.queue import Queue


@pytest.fixture
def events():
    seen = []
    zope.event.subscribers.append(seen.append)
    yield seen
    zope.event.subscribers.remove(seen.append)


def processor_for(tmp_path, port, **options):
    mailer, queue = mailer_and_queue(tmp_path,
                                     smtp_mailer(port, 'timeout 3s'))
    return Processor(queue, mailer, **options), queue


def test_partial_refusal(tmp_path, start_sink, events):
    """Accepted recipients get it once; a 5xx-refused one fails with the
    reply; a 4xx-refused one is deferred alone; each outcome is an event."""
    sink = start_sink('--refuse', 'bob@example.org=550 5.1.1 no such user',
                      '--refuse', 'carl@example.org=450 4.2.1 mailbox busy')
    processor, queue = processor_for(tmp_path, sink.port)
    [name] = enqueue(queue, 'x', to=('ann@example.org', 'bob@example.org',
                                     'carl@example.org'))
    before = time.time()
    processor.run_once()
    [received] = sink.messages()
    assert received['rcpt_tos'] == ['ann@example.org']
    assert (files_in(queue, 'failed') == [name]
            and files_in(queue, 'deferred') == [name])
    with open(os.path.join(queue.path, 'failed', name), 'rb') as f:
        failed = f.read()
    assert b'X-Mailout-To: bob@example.org\r\n' in failed
    assert b'550 5.1.1 no such user' in failed
    deferred_path = os.path.join(queue.path, 'deferred', name)
    with open(deferred_path, 'rb') as f:
        deferred = f.read()
    assert b'X-Mailout-To: carl@example.org\r\n' in deferred
    assert b'ann@' not in deferred.split(b'\r\n\r\n')[0]
    assert os.stat(deferred_path).st_mtime >= before + 300   # min-backoff
    sent, failed_event, deferred_event = events
    assert IMailSentEvent.providedBy(sent) and verifyObject(IMailSentEvent,
                                                            sent)
    assert sent.toaddrs == ('ann@example.org',)
    assert verifyObject(IMailFailedEvent, failed_event)
    assert failed_event.toaddrs == ('bob@example.org',)
    assert failed_event.reply == (550, '5.1.1 no such user')
    assert verifyObject(IMailDeferredEvent, deferred_event)
    assert deferred_event.reply == (450, '4.2.1 mailbox busy')
    assert sent.message_id == failed_event.message_id
    assert sent.queue_id == name == deferred_event.queue_id


class ScriptedMailer:
    """A test double: answers each send with the next scripted outcome."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.sent = []

    def send(self, fromaddr, toaddrs, message):
        outcome = self.outcomes.pop(0) if self.outcomes else {}
        if isinstance(outcome, Exception):
            raise outcome
        self.sent.append(toaddrs)
        return outcome

    def close(self):
        pass


def test_backoff_doubles_up_to_max_then_succeeds(tmp_path, events):
    """Transient failures defer with doubling backoff capped at max-backoff;
    the message goes out when the relay recovers."""
    queue = Queue(str(tmp_path / 'q'))
    down = TransientDeliveryError((None, 'Connection refused'))
    mailer = ScriptedMailer(down, down, down, down, {})
    processor = Processor(queue, mailer,
                          retry=RetryPolicy(min_backoff=10, max_backoff=25))
    [name] = enqueue(queue, 'x')
    waits = []
    for attempt in range(4):
        now = time.time()
        processor.run_once()
        path = os.path.join(queue.path, 'deferred', name)
        waits.append(round(os.stat(path).st_mtime - now))
        queue.promote_due(now=time.time() + 1000)
    assert waits == [10, 20, 25, 25]
    processor.run_once()
    assert mailer.sent == [('ann@example.org',)]
    assert all(files_in(queue, a) == [] for a in ('new', 'cur', 'deferred',
                                                  'failed'))
    assert [type(e).__name__ for e in events] == ['MailDeferredEvent'] * 4 \
        + ['MailSentEvent']


def test_expired_message_fails_with_history(tmp_path, events):
    """A message still failing after max-lifetime fails for good, with every
    attempt kept beside it."""
    queue = Queue(str(tmp_path / 'q'))
    down = TransientDeliveryError((451, '4.3.0 try later'))
    processor = Processor(queue, ScriptedMailer(down, down),
                          retry=RetryPolicy(min_backoff=1, max_backoff=1,
                                            max_lifetime=0.5))
    [name] = enqueue(queue, 'x')
    processor.run_once()
    assert files_in(queue, 'deferred') == [name]
    time.sleep(0.6)
    queue.promote_due(now=time.time() + 10)
    processor.run_once()
    assert files_in(queue, 'failed') == [name]
    message = failed(queue, name)
    assert len(message.attempts) == 2
    assert 'gave up after' in message.attempts[-1]
    assert IMailFailedEvent.providedBy(events[-1])


def test_deferred_message_does_not_block_others(tmp_path):
    """One deferred message does not hold up the ones behind it."""
    queue = Queue(str(tmp_path / 'q'))
    mailer = ScriptedMailer(TransientDeliveryError((421, 'busy')), {}, {})
    processor = Processor(queue, mailer)
    [first] = enqueue(queue, 'x', to=('first@example.org',))
    enqueue(queue, 'x', to=('second@example.org',))
    enqueue(queue, 'x', to=('third@example.org',))
    assert processor.run_once() == 3
    assert mailer.sent == [('second@example.org',), ('third@example.org',)]
    assert files_in(queue, 'deferred') == [first]


def test_permanent_error_fails_whole_message(tmp_path, events):
    """A 5xx for the whole message moves it to failed/ with the reply."""
    queue = Queue(str(tmp_path / 'q'))
    processor = Processor(queue, ScriptedMailer(
        PermanentDeliveryError((554, '5.7.1 rejected as spam'))))
    [name] = enqueue(queue, 'x', to=('a@example.org', 'b@example.org'))
    processor.run_once()
    assert files_in(queue, 'failed') == [name]
    assert failed(queue, name).toaddrs == ('a@example.org',
                                           'b@example.org')
    assert events[-1].reply == (554, '5.7.1 rejected as spam')


def test_unexpected_mailer_error_defers(tmp_path):
    """A bug-like exception in the mailer defers (never loses) the
    message."""
    queue = Queue(str(tmp_path / 'q'))
    processor = Processor(queue, ScriptedMailer(RuntimeError('boom')))
    [name] = enqueue(queue, 'x')
    processor.run_once()
    assert files_in(queue, 'deferred') == [name]


def test_relay_down_defers_everything_quickly(tmp_path):
    """With the relay down, every message is deferred and nothing is lost.
    """
    processor, queue = processor_for(tmp_path, 1)
    names = enqueue(queue, *['x'] * 5, separately=True)
    start = time.monotonic()
    processor.run_once()
    assert time.monotonic() - start < 5
    assert files_in(queue, 'deferred') == sorted(names)


def test_rate_limit_spaces_messages(tmp_path):
    """With ``rate 5`` the processor sends no more than 5 a second after a
    burst of one second's worth."""
    queue = Queue(str(tmp_path / 'q'))
    mailer = ScriptedMailer()
    processor = Processor(queue, mailer, rate=5)
    for i in range(10):
        enqueue(queue, str(i))
    start = time.monotonic()
    assert processor.run_once() == 10
    assert time.monotonic() - start >= 0.9


def test_failing_subscriber_does_not_resend(tmp_path):
    """A subscriber that raises on IMailSentEvent neither stops the
    processor nor leaves the sent message in the queue to go again."""
    def broken(event):
        raise RuntimeError('subscriber bug')
    zope.event.subscribers.append(broken)
    try:
        queue = Queue(str(tmp_path / 'q'))
        mailer = ScriptedMailer()
        processor = Processor(queue, mailer)
        enqueue(queue, '1')
        enqueue(queue, '2')
        assert processor.run_once() == 2
    finally:
        zope.event.subscribers.remove(broken)
    assert len(mailer.sent) == 2
    assert all(files_in(queue, a) == [] for a in ('new', 'cur', 'deferred'))


def test_retries_are_not_starved_by_new_mail(tmp_path):
    """A deferred message whose time has come goes out while new mail keeps
    arriving, not only once new/ is empty."""
    queue = Queue(str(tmp_path / 'q'))

    class Busy(ScriptedMailer):
        def send(self, fromaddr, toaddrs, message):
            if len(self.sent) < 300:            # mail keeps coming
                enqueue(queue, 'x', to=('new@example.org',))
            time.sleep(0.002)
            return super().send(fromaddr, toaddrs, message)
    mailer = Busy()
    processor = Processor(queue, mailer, poll_interval=0.05)
    [name] = enqueue(queue, 'x', to=('retry@example.org',))
    claimed = queue.claim(name)
    queue.defer(claimed, ('retry@example.org',), 'x 451 later',
                time.time() + 0.1)
    for _ in range(20):
        enqueue(queue, 'x', to=('new@example.org',))
    processor.process_waiting()     # what each sender thread runs
    position = mailer.sent.index(('retry@example.org',))
    assert position < 150, position


def test_processor_restarts_cleanly(tmp_path, sink):
    """stop() then start() runs exactly ``connections`` threads again, and
    run_once() works on a stopped processor."""
    import threading
    processor, queue = processor_for(tmp_path, sink.port, connections=2)
    processor.start()
    processor.stop()
    processor.start()
    senders = [t for t in threading.enumerate()
               if t.name.startswith('mailout  sender')]
    assert len(senders) == 2
    processor.stop()
    enqueue(queue, 'x')
    assert processor.run_once() == 1
