"""Several processes, each with 8 sender threads, on one queue, against a
relay slow at DATA (tests/smtpsink.py --data-delay).

MAILOUT_SHARED_MESSAGES sets how many messages the processes drain (CI runs
20000); each test prints its counts: committed, delivered, duplicates
(extra copies) and stuck (files left in the queue).
"""
import collections
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import HERE
from helpers import areas
from helpers import config_text
from helpers import files_in
from helpers import stopped
from helpers import write_config
from mailout.message import prepare
from mailout.queue import Queue
from mailout.queue import names

MESSAGES = int(os.environ.get('MAILOUT_SHARED_MESSAGES', 2000))
PROCESSES = 4
THREADS = 8                 # sender threads (connections) a process
DATA_DELAY = '0.01'         # seconds the relay takes to answer the final dot

# A processor process: start the processor of config argv[1]; commit the
# messages shared-argv[2] ... shared-(argv[2] + argv[3] - 1), one a
# transaction, argv[4] seconds apart (each commit wakes all its threads);
# end when new/ and cur/ stay empty.
DRAIN = '''
import logging, os, sys, time
logging.basicConfig(level=logging.WARNING,
                    format='%(levelname)s %(name)s: %(message)s')
sys.path.insert(0, sys.argv[5])
from mailout import config
from mailout.factories import build_all
from test_shared_queue import fill
settings = config.load(sys.argv[1])
_, deliveries = build_all(settings)
processor = deliveries['default'].processor
processor.start()
queue = processor.queue
fill(queue, int(sys.argv[3]), batch=1, pause=float(sys.argv[4]),
     first=int(sys.argv[2]))
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


def fill(queue, count, batch=500, pause=0, first=0):
    """Commit messages shared-first ... shared-(first + count - 1) to
    ``queue`` (a `Queue` or its path), ``batch`` a transaction, ``pause``
    seconds apart."""
    if isinstance(queue, str):
        queue = Queue(queue)
    end = first + count
    for start in range(first, end, batch):
        queue.commit([
            queue.write(prepare('app@example.org', ['ann@example.org'],
                                f'Message-Id: <shared-{i}@test>\r\n'
                                f'Subject: {i}\r\n\r\nbody\r\n'))
            for i in range(start, min(start + batch, end))])
        if pause:
            time.sleep(pause)


class Processors:
    """``count`` processes that drain the queue of ``config`` and end when
    it stays empty, each committing ``commits`` messages of its own first
    (numbered from ``first``, ``pause`` seconds apart); their stderr
    (WARNING and up) goes to files."""

    def __init__(self, tmp_path, config, count, first=0, commits=0,
                 pause=0.003):
        self.logs = [str(tmp_path / f'processor-{n}.log')
                     for n in range(count)]
        self.processes = []
        for n, log in enumerate(self.logs):
            with open(log, 'wb') as stderr:
                self.processes.append(subprocess.Popen(
                    [sys.executable, '-c', DRAIN, config,
                     str(first + n * commits), str(commits), str(pause),
                     HERE], stderr=stderr))

    def wait(self, processes=None, timeout=None):
        timeout = timeout or max(300, MESSAGES / 20)
        deadline = time.monotonic() + timeout
        for p in processes or self.processes:
            assert p.wait(max(deadline - time.monotonic(), 1)) == 0

    def errors(self):
        """The tracebacks and ERROR lines the processes logged."""
        found = []
        for log in self.logs:
            with open(log, errors='replace') as f:
                text = f.read()
            if 'Traceback' in text or 'ERROR' in text:
                found.append(f'{log}:\n{text[-3000:]}')
        return found


def message_number(path):
    """N of the message shared-N in a queue file."""
    with open(path, 'rb') as f:
        return int(re.search(rb'shared-(\d+)@', f.read()).group(1))


def received_ids(sink):
    ids = collections.Counter()
    for name in os.listdir(sink.directory):
        if name.endswith('.json') and not name.startswith('.'):
            with open(os.path.join(sink.directory, name), 'rb') as f:
                ids[re.search(rb'shared-(\d+)@', f.read()).group(1)] += 1
    return ids


@dataclasses.dataclass
class Tally:
    committed: int
    delivered: int          # distinct messages that arrived
    duplicates: int         # extra copies
    duplicated: set         # the messages that arrived more than once
    stuck: dict             # area -> files left in it
    seconds: float

    @property
    def stuck_total(self):
        return sum(len(names) for names in self.stuck.values())


def tally(what, committed, queue_path, sink, started):
    """Count what arrived and what is left in the queue; print the counts.
    """
    ids = received_ids(sink)
    result = Tally(
        committed=committed, delivered=len(ids),
        duplicates=sum(n - 1 for n in ids.values()),
        duplicated={int(i) for i, n in ids.items() if n > 1},
        stuck=areas(queue_path),
        seconds=time.monotonic() - started)
    print(f'\n{what}: committed {result.committed}, delivered '
          f'{result.delivered}, duplicates {result.duplicates}, stuck '
          f'{result.stuck_total}, in {result.seconds:.1f} s')
    return result


def setup(tmp_path, sink, count=MESSAGES, poll_interval='0.2s'):
    """A queue with ``count`` messages and a config for its processors."""
    queue_path = str(tmp_path / 'shared-queue')
    config = write_config(tmp_path / 'mailout.conf', config_text(
        sink.port, queue_path, delivery_lines=(
            f'connections {THREADS}', f'poll-interval {poll_interval}')))
    fill(queue_path, count)
    return queue_path, config


def test_one_process_eight_threads_exactly_once(tmp_path, start_sink,
                                                caplog):
    """8 sender threads of one process, woken together by each commit and
    racing for the same files, with a relay slow at DATA and frequent
    recovery: each message is delivered exactly once, with no error."""
    from mailout import config
    from mailout.factories import build_all
    count = 400
    sink = start_sink('--data-delay', '0.02')
    queue_path, config_path = setup(tmp_path, sink, 0, poll_interval='0.05s')
    _, deliveries = build_all(config.load(config_path))
    processor = deliveries['default'].processor
    started = time.monotonic()
    processor.start()
    # One message a commit in this process: each commit wakes all 8
    # threads, which list new/ again while others still claim from the
    # last listing.
    fill(processor.queue, count, batch=1, pause=0.003)
    deadline = time.monotonic() + 60
    while (len(received_ids(sink)) < count or any(
            files_in(queue_path, area)
            for area in ('new', 'cur'))) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)             # a late second copy
    processor.stop()
    result = tally('1 process x 8 threads', count, queue_path, sink,
                   started)
    errors = [r for r in caplog.records if r.levelname == 'ERROR']
    print(f'{len(errors)} error(s) logged' + ''.join(sorted({
        f', {type(r.exc_info[1]).__name__}' if r.exc_info
        else f', {r.getMessage()}' for r in errors})))
    assert result.duplicates == 0, sorted(result.duplicated)[:20]
    assert errors == []
    assert result.delivered == count
    assert result.stuck_total == 0, result.stuck


@pytest.mark.slow
def test_four_processes_eight_threads_each_exactly_once(tmp_path,
                                                        start_sink):
    """4 processes x 8 sender threads, each process committing its share
    of the messages one a transaction while they send, drain one queue
    through a relay slow at DATA: each message is delivered exactly once,
    with no error, and nothing is left."""
    sink = start_sink('--data-delay', DATA_DELAY)
    commits = MESSAGES // PROCESSES
    queued = MESSAGES - commits * PROCESSES
    queue_path, config = setup(tmp_path, sink, queued)
    started = time.monotonic()
    processors = Processors(tmp_path, config, PROCESSES, first=queued,
                            commits=commits)
    processors.wait()
    result = tally(f'{PROCESSES} processes x {THREADS} threads', MESSAGES,
                   queue_path, sink, started)
    assert processors.errors() == []
    assert result.duplicates == 0, sorted(result.duplicated)[:20]
    assert result.delivered == MESSAGES
    assert result.stuck_total == 0, result.stuck


@pytest.mark.slow
def test_kill_9_of_one_processor_mid_run(tmp_path, start_sink):
    """kill -9 of one of 4 processors (8 threads each) mid-run: the others
    take over its claims; nothing is lost and only the messages it had in
    flight at the kill (at most one a thread) may arrive twice."""
    sink = start_sink('--data-delay', DATA_DELAY)
    queue_path, config = setup(tmp_path, sink)
    started = time.monotonic()
    processors = Processors(tmp_path, config, PROCESSES)
    victim = processors.processes[0]
    deadline = time.monotonic() + 120
    while len(os.listdir(sink.directory)) < MESSAGES // 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Stopped, it can neither take nor finish a claim, and its claims are
    # not recovered (it lives): cur/ shows exactly what it has in flight.
    victim.send_signal(signal.SIGSTOP)
    assert stopped(victim.pid), 'the victim did not stop'
    in_flight = {message_number(os.path.join(queue_path, 'cur', claim))
                 for claim in files_in(queue_path, 'cur')
                 if names.Claim.parse(claim).pid == victim.pid}
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    processors.wait(processors.processes[1:])
    result = tally(f'kill -9 of 1 of {PROCESSES} processes x {THREADS} '
                   f'threads ({len(in_flight)} in flight at the kill)',
                   MESSAGES, queue_path, sink, started)
    assert processors.errors() == []
    assert result.delivered == MESSAGES, 'messages lost'
    assert result.duplicated <= in_flight
    assert len(in_flight) <= THREADS
    assert result.stuck_total == 0, result.stuck
