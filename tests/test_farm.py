"""A farm of relays: spreading, failover, resting, and SMTPUTF8."""
import time

from helpers import enqueue
from helpers import failed
from helpers import files_in
from helpers import mailer_and_queue
from helpers import smtp_mailer
from mailout.processor import Processor


def farm(tmp_path, ports, connections=1, extra=''):
    mailer, queue = mailer_and_queue(
        tmp_path, smtp_mailer(ports, 'timeout 2s', extra, name='farm'))
    return Processor(queue, mailer, connections=connections), queue


def empty(queue, *areas):
    return all(not files_in(queue, a) for a in areas)


def drain(processor, queue, timeout=20):
    processor.start()
    deadline = time.monotonic() + timeout
    while not empty(queue, 'new', 'cur') and time.monotonic() < deadline:
        time.sleep(0.01)
    processor.stop()


def test_connections_are_spread_over_relays(tmp_path, start_sink):
    """Two relays, four connections: both relays get a share."""
    sinks = [start_sink(), start_sink()]
    processor, queue = farm(tmp_path, [s.port for s in sinks], connections=4,
                            extra='messages-per-connection 5')
    enqueue(queue, *range(60))
    drain(processor, queue)
    counts = [len(s.messages()) for s in sinks]
    assert sum(counts) == 60 and min(counts) > 0, counts
    assert empty(queue, 'new', 'cur', 'deferred', 'failed')


def test_one_relay_down_others_take_its_share(tmp_path, start_sink):
    """Three relays, one down: everything arrives through the other two,
    nothing is deferred, lost or stuck."""
    sinks = [start_sink(), start_sink(), start_sink()]
    sinks[1].stop()
    processor, queue = farm(tmp_path, [s.port for s in sinks], connections=3,
                            extra='messages-per-connection 4')
    enqueue(queue, *range(60))
    drain(processor, queue)
    counts = [len(s.messages()) for s in sinks]
    assert counts[1] == 0 and counts[0] > 0 and counts[2] > 0, counts
    assert sum(counts) == 60
    assert empty(queue, 'new', 'cur', 'deferred', 'failed')


def test_relay_at_rest_defers_without_waiting(tmp_path, start_sink):
    """A single relay that failed rests: the messages behind are deferred
    at once instead of each waiting for a connection, and without an
    attempt counted (they were not tried: issue 11 item 3; the rest and
    its reason are in the queue's relays.json and the log)."""
    sink = start_sink()
    port = sink.port
    sink.stop()
    processor, queue = farm(tmp_path, [port], extra='down-time 1s')
    enqueue(queue, *range(5))
    start = time.monotonic()
    processor.run_once()
    assert time.monotonic() - start < 2
    assert len(files_in(queue, 'deferred')) == 5
    attempts = sorted(len(e.attempts) for e in queue.entries('deferred'))
    assert attempts == [0, 0, 0, 0, 1]
    [rest] = queue.relay_states.load().values()
    assert rest['state'] == 'resting' and 'refused' in rest['why']


def test_messages_per_connection(tmp_path, sink):
    """After messages-per-connection messages a new connection is opened."""
    processor, queue = farm(tmp_path, [sink.port],
                            extra='messages-per-connection 2')
    enqueue(queue, *range(5))
    processor.run_once()
    peers = [m['peer'] for m in sink.messages()]
    assert len(peers) == 5 and len(set(peers)) == 3


def test_smtputf8_addresses(tmp_path, start_sink):
    """With smtputf8 on, internationalised addresses go out with SMTPUTF8
    where the relay offers it, and fail clearly where it does not."""
    utf8_sink, plain_sink = start_sink('--smtputf8'), start_sink()
    for sink, outcome in ((utf8_sink, 'sent'), (plain_sink, 'failed')):
        (tmp_path / outcome).mkdir()
        processor, queue = farm(tmp_path / outcome, [sink.port],
                                extra='smtputf8 on')
        enqueue(queue, 0, to=('用户@例子.广告',), fromaddr='josé@exämple.org',
                smtputf8=True)
        processor.run_once()
        if outcome == 'sent':
            [received] = sink.messages()
            assert received['rcpt_tos'] == ['用户@例子.广告']
            assert 'SMTPUTF8' in received['mail_options']
        else:
            assert sink.messages() == []
            [name] = files_in(queue, 'failed')
            assert failed(queue, name).attempts[-1].endswith(
                '555 5.6.7 the relay does not offer SMTPUTF8, which the '
                'non-ASCII addresses need')
