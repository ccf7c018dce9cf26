"""A relay farm at scale (issue 14 item 3), against real SMTP server
processes (tests/smtpsink.py): a message whose relay dies mid-session goes
out through another relay at once; a relay that turns every connection away
(421 or 4xx at the greeting, EHLO or a fresh session's MAIL) rests like a
dead one; max-connections-per-relay holds over every process working a
queue; relay weights; a host name with several addresses is spread over
them, each address resting on its own, its certificate checked against the
name."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import ZConfig

from helpers import enqueue
from helpers import files_in
from helpers import load_config
from helpers import mailer_and_queue
from helpers import message
from helpers import write_config
from mailout import mailers
from mailout.interfaces import TransientDeliveryError
from mailout.processor import Processor
from mailout.queue import Queue
from mailout.queue import RelayStates

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'mailout')


def section(hosts, *keys, name='farm'):
    """An ``<smtp-mailer NAME>`` section: one ``host`` line each of
    ``hosts`` (an int is a port on 127.0.0.1), "tls none" unless ``keys``
    give tls, then ``keys``."""
    lines = [f'host 127.0.0.1:{h}' if isinstance(h, int) else f'host {h}'
             for h in hosts]
    if not any(key.startswith('tls ') for key in keys):
        lines.append('tls none')
    lines.extend(keys)
    return '<smtp-mailer %s>\n%s\n</smtp-mailer>' % (
        name, '\n'.join(f'  {line}' for line in lines))


def farm(tmp_path, hosts, *keys, connections=1):
    """A processor (no threads) of a queue in tmp_path whose mailer has
    ``hosts`` and ``keys`` (`section`)."""
    mailer, queue = mailer_and_queue(tmp_path, section(hosts, *keys))
    return Processor(queue, mailer, connections=connections), queue


def smtp(hosts, *keys):
    """An SMTP mailer of no queue (its relays' rests and connection slots
    in this process only)."""
    return mailers.SMTPMailer(
        load_config(section(hosts, *keys)).mailers['farm'])


def ids(sink, extension='json'):
    """The subjects of what ``sink`` recorded (``unanswered``: received in
    full but never answered)."""
    found = []
    for name in sorted(os.listdir(sink.directory)):
        if name.endswith('.' + extension) and not name.startswith('.'):
            with open(os.path.join(sink.directory, name)) as f:
                data = json.load(f)['data']
            found.append(data.split('Subject: ', 1)[1].split('\r\n', 1)[0])
    return found


def rests(queue):
    """``{relay: why}`` of the relays that rest, as the queue records."""
    return {relay: record['why'] for relay, record
            in queue.relay_states.load().items()
            if record['state'] == 'resting'}


def settled(queue):
    """Nothing deferred, failed or left behind."""
    return all(not files_in(queue, area)
               for area in ('new', 'cur', 'deferred', 'failed', 'tmp'))


def connections(sink):
    """What --count-connections recorded: open, peak, total."""
    with open(os.path.join(sink.directory, 'connections')) as f:
        return json.load(f)


# -- a. failover per message --------------------------------------------------

@pytest.mark.parametrize('fault', [
    ('--drop-at', 'mail'), ('--drop-at', 'rcpt'), ('--drop-at', 'data-start'),
    ('--drop-at', 'data-middle'), ('--stall', '30', '--stall-at', 'rcpt')])
def test_relay_dies_mid_session(tmp_path, start_sink, fault):
    """The session with a relay is lost or times out after it was set up:
    the message goes out through the other relay at once (nothing is
    deferred), and the dead relay rests."""
    dying, other = start_sink(*fault, '--faults', '1'), start_sink()
    processor, queue = farm(tmp_path, [dying.port, other.port], 'timeout 1s')
    body = 'x' * 998 + '\r\n'
    body *= 4000 if fault[1] == 'data-middle' else 1  # more than buffers hold
    enqueue(queue, 'first', 'second', separately=True, body=body)
    processor.run_once()
    assert settled(queue)
    assert ids(dying) == [] and ids(dying, 'unanswered') == []
    assert ids(other) == ['first', 'second']
    [(relay, why)] = rests(queue).items()
    assert relay == f'127.0.0.1:{dying.port}'
    assert ('timed out' if '--stall' in fault else 'SMTPServerDisconnected') \
        in why


def test_relay_dies_after_the_dot(tmp_path, start_sink):
    """Lost after the final dot (RFC 1047: the relay may have it): sent
    again through the other relay at once, as a retry would; the message
    whose commands went out with it (pipelined) but whose content did not
    is simply sent again."""
    dying = start_sink('--pipelining', '--drop-at', 'after-dot',
                       '--faults', '1')
    other = start_sink('--pipelining')
    processor, queue = farm(tmp_path, [dying.port, other.port], 'timeout 1s')
    enqueue(queue, 'first', 'second', 'third', separately=True)
    processor.run_once()
    assert settled(queue)
    assert ids(dying, 'unanswered') == ['first'] and ids(dying) == []
    assert ids(other) == ['first', 'second', 'third']
    assert list(rests(queue)) == [f'127.0.0.1:{dying.port}']


def test_no_other_relay_up(tmp_path, start_sink):
    """When no other relay can take it, the message is deferred with the
    lost session's reason, and the relay that lost it does not rest, as
    with a single relay (the next message tries it again); the one that
    refused the connection rests."""
    dying, down = start_sink('--drop-at', 'rcpt'), start_sink()
    down.stop()
    processor, queue = farm(tmp_path, [dying.port, down.port], 'timeout 1s')
    enqueue(queue, 'first')
    processor.run_once()
    [entry] = queue.entries('deferred')
    assert f'127.0.0.1:{dying.port}: SMTPServerDisconnected: Connection ' \
        'unexpectedly closed' in entry.attempts[-1]
    assert list(rests(queue)) == [f'127.0.0.1:{down.port}']


# -- b. a relay that turns every connection away -------------------------------

@pytest.mark.parametrize('option, reply', [
    ('--greeting-reply', '421 4.3.2 sink.test busy, try later'),
    ('--ehlo-reply', '421 4.3.2 sink.test shutting down'),
    ('--ehlo-reply', '454 4.7.0 sink.test too many sessions'),
    ('--mail-reply', '421 4.3.2 sink.test shutting down')])
def test_relay_turning_connections_away_rests(tmp_path, start_sink, option,
                                              reply):
    """A relay that answers 421 or 4xx to every greeting, EHLO (and HELO),
    or the first MAIL of a fresh session rests like a dead one, with its
    reply as the reason; the messages go to the other relay at once."""
    busy, other = start_sink(option, reply), start_sink()
    processor, queue = farm(tmp_path, [busy.port, other.port], 'timeout 1s')
    enqueue(queue, 'first', 'second', separately=True)
    processor.run_once()
    assert settled(queue)
    assert ids(busy) == [] and ids(other) == ['first', 'second']
    assert rests(queue) == {f'127.0.0.1:{busy.port}': reply}


# -- c. max-connections-per-relay ----------------------------------------------

PROCESSES, THREADS, SLOTS = 2, 4, 2


@pytest.mark.parametrize('limit', [SLOTS, 0])
def test_max_connections_over_processes(tmp_path, start_sink, limit):
    """Two ``mailout process`` processes of four sender threads each on one
    queue, two relays slow at DATA: with max-connections-per-relay 2 no
    relay ever has more than 2 connections open, and every message goes
    out (the threads wait for a slot); without it they have more."""
    sinks = [start_sink('--count-connections', '--data-delay', '0.1')
             for _ in range(2)]
    keys = ['timeout 20s'] + [f'max-connections-per-relay {limit}'] * bool(
        limit)
    conf = write_config(tmp_path / 'mailout.conf', '%s\n%s' % (
        section([s.port for s in sinks], *keys, name='relay'), f'''
        <queued-delivery default>
          mailer relay
          queue-path {tmp_path}/queue
          processor off
          connections {THREADS}
        </queued-delivery>'''))
    queue = Queue.open(tmp_path / 'queue')
    enqueue(queue, *range(24), separately=True)
    processes = [subprocess.Popen([SCRIPT, 'process', '--once', '-C', conf],
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for _ in range(PROCESSES)]
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
    assert settled(queue)
    delivered = ids(sinks[0]) + ids(sinks[1])
    assert sorted(delivered, key=int) == [str(i) for i in range(24)]
    peaks = [connections(sink)['peak'] for sink in sinks]
    if limit:
        assert peaks == [SLOTS, SLOTS], peaks
    else:
        assert max(peaks) > SLOTS, peaks
    assert [connections(sink)['open'] for sink in sinks] == [0, 0]


def test_slot_dies_with_its_process(tmp_path):
    """A connection slot is a lock the kernel drops when its process dies,
    even by kill -9: nothing is left to clean up."""
    states = RelayStates(str(tmp_path))
    holder = subprocess.Popen([sys.executable, '-c', f'''
import time
from mailout.queue import RelayStates
slot = RelayStates({str(tmp_path)!r}).slot('relay.test:25', 1)
print('held' if slot else 'none', flush=True)
time.sleep(60)
'''], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        assert states.slot('relay.test:25', 1) is None
        assert states.slot('relay.test:25', 2) is not None  # a second one
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    slot = states.slot('relay.test:25', 1)
    assert slot is not None
    assert states.slot('relay.test:25', 1) is None
    slot.release()
    assert states.slot('relay.test:25', 1) is not None


def send_in_thread(mailer, subject, keep=None):
    """Send one message from a thread of its own, which keeps its
    connection (and slot) until ``keep`` is set; the thread and a list
    that gets the outcome and seconds taken."""
    outcome = []

    def run():
        started = time.monotonic()
        try:
            mailer.send('app@example.org', ['ann@example.org'],
                        message(subject))
            outcome.append(('sent', time.monotonic() - started))
        except TransientDeliveryError as e:
            outcome.append((e, time.monotonic() - started))
        if keep is not None:
            keep.wait(10)
        mailer.close()
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def subjects(sink):
    return [m['data'].split(b'Subject: ')[1].split(b'\r\n')[0].decode()
            for m in sink.messages()]


def test_full_relay_is_skipped(start_sink):
    """Without a queue, slots count in the process.  A relay whose
    connections are all open is skipped for another at once."""
    a, b = start_sink(), start_sink()
    mailer = smtp([a.port, b.port], 'max-connections-per-relay 1',
                  'timeout 5s')
    keep = threading.Event()
    holder, outcome = send_in_thread(mailer, 'held', keep)  # a's only slot
    a.wait_for(1)
    # b's turn, then a's again: a is full, so b.
    for subject in ('first', 'second'):
        thread, outcome = send_in_thread(mailer, subject)
        thread.join()
        assert outcome[0][0] == 'sent' and outcome[0][1] < 1
    keep.set()
    holder.join()
    assert subjects(a) == ['held'] and subjects(b) == ['first', 'second']


def test_every_relay_full_waits_for_a_slot(start_sink):
    """When every relay's connections are all open, a new one waits for a
    slot; no longer than the timeout, then the message was not tried (no
    attempt counts: as while every relay rests)."""
    sink = start_sink('--count-connections')
    mailer = smtp([sink.port], 'max-connections-per-relay 1', 'timeout 1s')
    keep = threading.Event()
    holder, _ = send_in_thread(mailer, 'held', keep)
    sink.wait_for(1)
    thread, outcome = send_in_thread(mailer, 'waits too long')
    thread.join()
    [(error, took)] = outcome
    assert isinstance(error, mailers.RelaysResting), error
    assert 0.9 < took < 2
    assert str(error) == (f'127.0.0.1:{sink.port}: max-connections-per-'
                          'relay 1 reached, no connection free within 1s')
    thread, outcome = send_in_thread(mailer, 'waits')
    time.sleep(0.5)
    keep.set()                      # the holder closes its connection
    thread.join()
    [(sent, took)] = outcome
    assert sent == 'sent' and 0.4 < took < 1
    holder.join()
    assert subjects(sink) == ['held', 'waits']
    assert connections(sink)['peak'] == 1


def test_idle_session_gives_its_slot_back_at_once(tmp_path, start_sink):
    """With connections limited, a sender thread with nothing to do ends
    its session after its poll interval, not 15 s later: no idle session
    holds a slot that another process or delivery waits for."""
    sink = start_sink('--count-connections')
    processor, queue = farm(tmp_path, [sink.port],
                            'max-connections-per-relay 1')
    enqueue(queue, 'one')
    processor.start()
    try:
        sink.wait_for(1)
        deadline = time.monotonic() + 5
        while connections(sink)['open'] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connections(sink)['open'] == 0
    finally:
        processor.stop()


def test_message_untried_for_a_full_relay_is_tried_again_soon(tmp_path,
                                                              start_sink):
    """A message that found every relay full is deferred untried for a
    poll interval, not for its backoff (300 s): with one slot, which the
    first sender thread's kept connection holds, the second thread's
    message is soon tried again, and goes (by whichever thread)."""
    sink = start_sink()
    processor, queue = farm(tmp_path, [sink.port],
                            'max-connections-per-relay 1', 'timeout 1s',
                            connections=2)
    enqueue(queue, 'first', 'second')
    processor.start()
    try:
        sink.wait_for(2, timeout=12)
    finally:
        processor.stop()
    assert sorted(subjects(sink)) == ['first', 'second']


@pytest.mark.slow
def test_processes_start_their_turns_at_random(tmp_path, start_sink):
    """Processes started together do not all open their first connection
    to the first relay: ten ``mailout process --once``, a message each,
    over three relays, reach more than one of them (all ten on one: a
    chance of 1 in 20,000 at random; every time when each process started
    with the first relay)."""
    sinks = [start_sink() for _ in range(3)]
    queue_path = tmp_path / 'q'
    config = write_config(tmp_path / 'mailout.conf', section(
        [sink.port for sink in sinks]) + f'\n<queued-delivery default>\n'
        f'  mailer farm\n  queue-path {queue_path}\n</queued-delivery>\n')
    queue = Queue(str(queue_path))
    for i in range(10):
        enqueue(queue, i)
        subprocess.run([os.path.join(os.path.dirname(sys.executable),
                                     'mailout'), 'process', '--once', '-C',
                        config], check=True, capture_output=True)
    counts = [len(sink.messages()) for sink in sinks]
    assert sum(counts) == 10
    assert max(counts) < 10, counts


# -- d. weights ------------------------------------------------------------------

def test_weights_spread_new_connections_in_proportion(tmp_path, start_sink):
    """``host HOST:PORT weight=3`` takes three new connections for each of
    a relay of weight 1 (the default)."""
    heavy, light = start_sink(), start_sink()
    processor, queue = farm(tmp_path, [f'127.0.0.1:{heavy.port} weight=3',
                                       light.port],
                            'messages-per-connection 1')
    enqueue(queue, *range(40))
    processor.run_once()
    assert settled(queue)
    assert (len(heavy.messages()), len(light.messages())) == (30, 10)


def test_weight_syntax():
    """``weight=N`` after the host, N at least 1; ``host HOST[:PORT]``
    alone as before; anything else is refused with its line."""
    relay = load_config(section(['mx1.test:26 weight=3', 'mx2.test',
                                 '[::1]:27  weight=1'])).mailers['farm']
    assert relay.relays == (('mx1.test', 26), ('mx2.test', 25),
                            ('::1', 27))
    assert relay.weights == (3, 1, 1)
    for bad in ('mx1.test weight=0', 'mx1.test weight=x',
                'mx1.test colour=red', 'mx1.test weight=2 weight=3',
                'mx1.test 3'):
        with pytest.raises(ZConfig.ConfigurationError) as error:
            load_config(section([bad]))
        assert 'weight' in str(error.value), bad


# -- e. a host name with several addresses ------------------------------------

NAME = 'relays.test'


@pytest.fixture
def two_addresses(monkeypatch):
    """``relays.test`` resolves to 127.0.0.1 and 127.0.0.2, as a name with
    two A records would (the real resolver for any other name).  Nothing
    else here can make a name resolve so: /etc/hosts is the machine's, and
    "localhost" has one address on this one."""
    resolve = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host != NAME:
            return resolve(host, port, family, type, proto, flags)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, '',
                 (address, port)) for address in ('127.0.0.1', '127.0.0.2')]
    monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)


def start_pair(start_sink, *options):
    """Sinks on 127.0.0.1 and 127.0.0.2, on one port."""
    for _ in range(5):
        second = start_sink('--address', '127.0.0.2', *options)
        try:
            first = start_sink('--port', str(second.port), *options)
        except RuntimeError:        # that port is taken on 127.0.0.1
            second.stop()
            continue
        return first, second
    raise RuntimeError('no port free on both addresses')


@pytest.fixture(scope='module')
def name_cert(tmp_path_factory):
    """A CA file, and a certificate and key for relays.test only."""
    import trustme
    directory = tmp_path_factory.mktemp('name-cert')
    ca = trustme.CA()
    server = ca.issue_cert(NAME)
    paths = [str(directory / name) for name in ('ca.pem', 'cert.pem',
                                                 'key.pem')]
    ca.cert_pem.write_to_path(paths[0])
    server.cert_chain_pems[0].write_to_path(paths[1])
    server.private_key_pem.write_to_path(paths[2])
    return paths


def test_name_with_two_addresses(tmp_path, start_sink, two_addresses,
                                 name_cert):
    """Both addresses of the name take new connections in turn, over TLS
    whose certificate is checked against the name; one that goes down
    rests on its own while the other takes everything."""
    ca, cert, key = name_cert
    first, second = start_pair(start_sink, '--starttls', cert, key)
    processor, queue = farm(
        tmp_path, [f'{NAME}:{first.port}'], 'tls starttls', f'ca-file {ca}',
        'messages-per-connection 1')
    enqueue(queue, *range(20))
    processor.run_once()
    assert settled(queue)
    assert len(first.messages()) == len(second.messages()) == 10
    assert all(m['tls'] for m in first.messages() + second.messages())

    second.stop()
    enqueue(queue, *range(20, 30))
    processor.run_once()
    assert settled(queue)
    assert len(first.messages()) == 20
    assert list(rests(queue)) == [f'{NAME}[127.0.0.2]:{first.port}']
    # ``queue status`` shows the address that rests under its name.
    config = write_config(tmp_path / 'mailout.conf', section(
        [f'{NAME}:{first.port}'], 'tls starttls', f'ca-file {ca}')
        + f'\n<queued-delivery default>\n  mailer farm\n  queue-path '
        f'{queue.path}\n</queued-delivery>\n')
    status = json.loads(subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), 'mailout'), 'queue',
         'status', '--json', '-C', str(config)], capture_output=True,
        text=True).stdout)
    assert status['ok'], status
    assert [(r['relay'], r['state']) for r in
            status['queues'][0]['relays']] == [
        (f'{NAME}:{first.port}', 'up'),
        (f'{NAME}[127.0.0.2]:{first.port}', 'resting')]


def test_certificate_is_checked_against_the_name(tmp_path, start_sink,
                                                 two_addresses, certs):
    """The certificate must name the configured host, not the address
    connected to: one for 127.0.0.1 and localhost does not do for
    relays.test."""
    first, second = start_pair(start_sink, '--starttls', certs.cert,
                               certs.key)
    processor, queue = farm(
        tmp_path, [f'{NAME}:{first.port}'], 'tls starttls',
        f'ca-file {certs.ca}')
    enqueue(queue, 'first')
    processor.run_once()
    [entry] = queue.entries('deferred')
    assert "Hostname mismatch, certificate is not valid for 'relays.test'" \
        in entry.attempts[-1]
    assert first.messages() == second.messages() == []


def test_name_weight_is_shared_by_its_addresses(tmp_path, start_sink,
                                                two_addresses):
    """A name's weight is its share: ``relays.test weight=2`` with two
    addresses and a relay of weight 1 take a third each."""
    first, second = start_pair(start_sink)
    third = start_sink()
    processor, queue = farm(tmp_path, [f'{NAME}:{first.port} weight=2',
                                       third.port],
                            'messages-per-connection 1')
    enqueue(queue, *range(30))
    processor.run_once()
    assert settled(queue)
    assert [len(s.messages()) for s in (first, second, third)] == [10] * 3
