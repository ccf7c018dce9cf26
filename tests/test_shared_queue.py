"""Several processes, each with several sender threads, on one queue."""
import collections
import os
import re
import signal
import subprocess
import sys
import time

from helpers import write_config
from mailout.message import prepare
from mailout.queue import Queue

MESSAGES = int(os.environ.get('MAILOUT_SHARED_MESSAGES', 5000))
PROCESSES = 4

DRAIN = '''
import os, sys, time
from mailout import config
from mailout.factories import build_all
settings = config.load(sys.argv[1])
_, deliveries = build_all(settings)
processor = deliveries['default'].processor
processor.start()
queue = processor.queue
idle_since = None
while True:
    busy = any(os.listdir(os.path.join(queue.path, area))
               for area in ('new', 'cur'))
    if busy:
        idle_since = None
    elif idle_since is None:
        idle_since = time.monotonic()
    elif time.monotonic() - idle_since > 1.5:
        break
    time.sleep(0.05)
processor.stop()
'''


def fill(queue_path, count):
    queue = Queue(queue_path)
    for start in range(0, count, 500):
        queue.commit([
            queue.write(prepare('app@example.org', ['ann@example.org'],
                                f'Message-Id: <shared-{i}@test>\r\n'
                                f'Subject: {i}\r\n\r\nbody\r\n'))
            for i in range(start, min(start + 500, count))])


def start_processors(config):
    return [subprocess.Popen([sys.executable, '-c', DRAIN, config])
            for _ in range(PROCESSES)]


def received_ids(sink):
    ids = collections.Counter()
    for name in os.listdir(sink.directory):
        if name.endswith('.json'):
            with open(os.path.join(sink.directory, name), 'rb') as f:
                ids[re.search(rb'shared-(\d+)@', f.read()).group(1)] += 1
    return ids


def setup(tmp_path, sink):
    queue_path = str(tmp_path / 'shared-queue')
    config = write_config(tmp_path / 'mailout.conf', f'''
        <smtp-mailer relay>
          host 127.0.0.1:{sink.port}
          tls none
        </smtp-mailer>
        <queued-delivery default>
          mailer relay
          queue-path {queue_path}
          connections 2
          poll-interval 0.2s
        </queued-delivery>
    ''')
    fill(queue_path, MESSAGES)
    return queue_path, config


def test_four_processes_two_threads_each_exactly_once(tmp_path, start_sink):
    """4 processes x 2 sender threads drain one queue: each message is
    delivered exactly once."""
    sink = start_sink()
    queue_path, config = setup(tmp_path, sink)
    processes = start_processors(config)
    for p in processes:
        assert p.wait(300) == 0
    ids = received_ids(sink)
    assert len(ids) == MESSAGES
    assert max(ids.values()) == 1
    for area in ('new', 'cur', 'deferred', 'failed', 'tmp'):
        assert os.listdir(os.path.join(queue_path, area)) == []


def test_kill_9_of_one_processor_mid_run(tmp_path, start_sink):
    """kill -9 of one of the processors mid-run: the others take over its
    claims; nothing is lost and only messages in flight at the kill may
    arrive twice."""
    sink = start_sink()
    queue_path, config = setup(tmp_path, sink)
    processes = start_processors(config)
    victim = processes[0]
    deadline = time.monotonic() + 120
    while len(os.listdir(sink.directory)) < MESSAGES // 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    in_flight = {claim.split(',')[0]
                 for claim in os.listdir(os.path.join(queue_path, 'cur'))
                 if claim.split(',')[2] == str(victim.pid)}
    for p in processes[1:]:
        assert p.wait(300) == 0
    ids = received_ids(sink)
    assert len(ids) == MESSAGES, 'messages lost'
    duplicates = [i for i, n in ids.items() if n > 1]
    assert len(duplicates) <= len(in_flight) <= 2
    print(f'\nkill -9 mid-run: {MESSAGES} delivered, {len(in_flight)} in '
          f'flight at the kill, {len(duplicates)} duplicate(s)')
    for area in ('new', 'cur', 'deferred', 'failed'):
        assert os.listdir(os.path.join(queue_path, area)) == []
