"""Monitoring: ``mailout metrics`` (Prometheus text format, read back with
prometheus_client's own parser), ``queue status`` as a Nagios check, and
the daemon's metrics endpoint, against real queues and SMTP sinks."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import transaction
from prometheus_client.parser import text_string_to_metric_families

from helpers import config_text
from helpers import write_config
from mailout.factories import build_all
from mailout import config
from mailout.queue import Queue

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'mailout')
FROM = 'app@example.org'


def mailout(*args):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True,
                          timeout=60)


def configure(tmp_path, port):
    return write_config(tmp_path / 'mailout.conf', config_text(
        port, tmp_path / 'queue',
        delivery_lines=['processor off', 'poll-interval 0.1s']))


def commit(path, *subjects):
    _, deliveries = build_all(config.load(path), processors=False)
    for subject in subjects:
        deliveries['default'].send(FROM, ['ann@example.org'],
                                   f'Subject: {subject}\r\n\r\nHi.\r\n')
    transaction.commit()
    return deliveries['default'].queue


def samples(text):
    """``{(metric name, state): value}`` of an exposition, strictly parsed.
    """
    return {(s.name, s.labels.get('state')): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples}


def age_messages(queue, seconds):
    """Make the waiting messages look queued ``seconds`` ago (their names
    carry the time)."""
    for name in queue.waiting():
        stamp, rest = name.split('.', 1)
        older = f'{int(stamp) - int(seconds * 1e9)}.{rest}'
        os.rename(os.path.join(queue.path, 'new', name),
                  os.path.join(queue.path, 'new', older))


def test_metrics_print_the_state_of_each_queue(tmp_path, sink):
    """Waiting, deferred and failed counts and the oldest ages, in a format
    Prometheus's parser reads."""
    path = configure(tmp_path, sink.port)
    queue = commit(path, 'one', 'two', 'three')
    age_messages(queue, 120)
    first, second, _ = queue.waiting()
    queue.defer(queue.claim(first), ('ann@example.org',), 'x 451 later',
                time.time() + 300)
    queue.fail(queue.claim(second), ('ann@example.org',), 'x 550 no')
    result = mailout('metrics', '-C', path)
    assert result.returncode == 0, result.stderr
    found = samples(result.stdout)
    assert found[('mailout_queue_messages', 'waiting')] == 1
    assert found[('mailout_queue_messages', 'deferred')] == 1
    assert found[('mailout_queue_messages', 'failed')] == 1
    assert found[('mailout_queue_messages', 'in_progress')] == 0
    assert 119 < found[('mailout_queue_oldest_age_seconds', 'waiting')] < 200
    assert 119 < found[('mailout_queue_oldest_age_seconds', 'deferred')] < 200
    [relay] = [s for family in text_string_to_metric_families(result.stdout)
               for s in family.samples if s.name == 'mailout_relay_up']
    assert relay.labels['relay'] == f'127.0.0.1:{sink.port}'
    assert relay.value == 1


def test_metrics_textfile_is_written_whole(tmp_path, sink):
    """--textfile writes the exposition to the file (renamed into place,
    no temporary left) and prints nothing."""
    path = configure(tmp_path, sink.port)
    commit(path, 'one')
    target = tmp_path / 'textfile' / 'mailout.prom'
    target.parent.mkdir()
    result = mailout('metrics', '-C', path, '--textfile', str(target))
    assert result.returncode == 0 and result.stdout == '', result.stderr
    assert os.listdir(target.parent) == ['mailout.prom']
    assert samples(target.read_text())[
        ('mailout_queue_messages', 'waiting')] == 1


def test_queue_status_as_a_nagios_check(tmp_path, sink):
    """One summary line; exit 0 (OK), 1 (WARNING: oldest past --warn-age),
    2 (CRITICAL: past --crit-age, or more failed than --max-failed)."""
    path = configure(tmp_path, sink.port)
    check = ('queue', 'status', '-C', path, '--warn-age', '5m',
             '--crit-age', '1h', '--max-failed', '0')
    result = mailout(*check)
    assert (result.returncode, result.stdout) == (
        0, 'MAILOUT OK - 0 waiting, 0 deferred, 0 failed, oldest -\n')
    queue = commit(path, 'one', 'two')
    age_messages(queue, 600)
    result = mailout(*check)
    assert result.returncode == 1
    assert result.stdout.startswith('MAILOUT WARNING - oldest 10m')
    age_messages(queue, 7200)
    assert mailout(*check).returncode == 2
    queue = Queue(queue.path)
    queue.fail(queue.claim(queue.waiting()[0]), ('ann@example.org',),
               'x 550 no')
    result = mailout('queue', 'status', '-C', path, '--max-failed', '0')
    assert result.returncode == 2
    assert result.stdout.startswith('MAILOUT CRITICAL - 1 failed > 0; ')
    assert result.stdout.count('\n') == 1


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_the_daemon_serves_its_counts(tmp_path, start_sink):
    """``process --metrics-port``: a scrape shows the messages the daemon
    sent and deferred, by reply class, and the queues' state."""
    sink = start_sink('--refuse', 'bob@example.org=451 4.2.0 later')
    path = configure(tmp_path, sink.port)
    port = free_port()
    daemon = subprocess.Popen([SCRIPT, 'process', '-C', path,
                               '--metrics-port', str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        _, deliveries = build_all(config.load(path), processors=False)
        deliveries['default'].send(FROM, ['ann@example.org',
                                          'bob@example.org'],
                                   'Subject: x\r\n\r\nHi.\r\n')
        transaction.commit()
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(
                        f'http://127.0.0.1:{port}/metrics', timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                text = ''
            counts = {(s.labels.get('outcome'), s.labels.get('reply_class')):
                      s.value for family in
                      text_string_to_metric_families(text)
                      for s in family.samples
                      if s.name == 'mailout_messages_total'}
            if counts or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counts == {('sent', '2xx'): 1, ('deferred', '4xx'): 1}
        assert samples(text)[('mailout_queue_messages', 'deferred')] == 1
        assert samples(text)[('mailout_relay_up', None)] == 1
    finally:
        daemon.terminate()
        daemon.communicate(timeout=30)
