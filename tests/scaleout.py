"""Scale-out harness: several app hosts working one queue through a farm of
real Postfix relays; a relay stopped mid-run and started again, a host
frozen past the claim lease and another killed with SIGKILL, each while it
holds claims (issue 14, item 4).

Run as ``python tests/scaleout.py`` (``--help`` for the options), e.g. the
longer run ``python tests/scaleout.py --messages 20000 --rate 150``;
tests/test_scaleout.py runs a CI-sized one.  Needs root and Postfix
(/usr/sbin/postfix, see /work/shared/POSTFIX_NOTES.md).

The set-up, all on loopback, on ports the system picks:

* one recording SMTP sink (tests/smtpsink.py) on 127.0.0.1;
* ``--relays`` (2 or 3) private Postfix instances (tests/postfix.py),
  ``relayN.mailout.test`` on 127.0.0.(N+1), each relaying everything to the
  sink; each adds a Received header naming itself, the client's EHLO name
  and its queue id, so the sink tells which process handed a message to
  which relay;
* ``--hosts`` (3) simulated app hosts x ``--processes`` (2) real child
  processes (``scaleout.py --child``), each building mailout from a
  standalone config file of its own (``factories.build_all(config.load(
  path))``, as tests/crashloop.py's children do): an smtp-mailer listing
  every relay (``tls none``, ``timeout 5s``, ``down-time 2s``, EHLO name
  ``HOST-N.mailout.test``) and a queued delivery with its processor on (2
  connections, ``min-backoff 1s``, ``max-backoff 2s``, ``claim-lease
  3s``).  All hosts share one queue directory (the shared spool);
  ``--queues per-host`` gives each host its own.  A host's processes get
  ``MAILOUT_HOST_ID=host-X``: the others take a dead or frozen host's
  claims over after the lease.

The run: the harness hands out ``--messages`` messages in small
transactions (1-3 messages) to the committing processes, ``--rate`` a
second; each child reports on stdout ("commit IDS" before, "committed TIME
IDS" after the commit returned) while its processor delivers.  At set
shares of the messages:

1. once every relay carried mail, relay2 is stopped (``postfix stop``, or
   ``--relay-stop kill``: SIGKILL to its master; the harness waits until
   every process of that instance is gone);
2. at least ``--stop-seconds`` later, once the surviving relays carried
   mail accepted during the stop, relay2 is started again (its queue kept);
3. once relay2 carried mail again, where mailout has host ids and claim
   leases (and the queue is shared): host-b stops committing, commits one
   burst of messages, and its processes are frozen (SIGSTOP) until they
   are seen holding claims in cur/; they stay frozen until the other hosts
   took those claims over after the lease, then go on (SIGCONT): what
   they had on the wire at the freeze may arrive twice, the rest they
   withdraw (``--no-freeze``: skip this);
4. the last host is caught holding claims in the same way, then killed
   (SIGKILL).  The other hosts take its claims over (after the lease; by
   pid without one); with per-host queues, the host is started again
   (``--restart-after``) and recovers its own queue;
5. the rest of the messages are handed out; then the harness waits until
   every committed message arrived, mailout's queues and Postfix's are
   empty (``postqueue -f`` first), and stops the processes.

The checks, per message:

* lost: a message whose commit returned never arrived;
* duplicates are counted by cause and allowed only inside two windows:
  RFC 1047's (a claim the killed processes held at the kill may have been
  on the wire; relay2 stopped while it held a message whose final reply
  was not given: an extra copy from relay2 accepted around the stop, or
  the same Postfix queue id twice, Postfix to the sink) and the lease's (a
  claim the frozen host had on the wire at the freeze, or a live owner
  whose claim was taken over, as its log says); any other extra copy fails
  the run;
* nothing stuck: mailout's new/ cur/ deferred/ tmp/ failed/ held/ empty,
  every Postfix queue empty;
* relay2 accepted nothing while stopped, the survivors carried mail
  during the stop, relay2 carried mail again after its restart;
* each claim of the killed processes, and of the frozen ones, was
  delivered by another process;
* no child logged an error or a traceback.

Figures printed: committed, delivered, duplicates by cause, messages per
relay before, during and after the stop, how fast the survivors took over
(first delivery through a survivor after the stop, the longest gap in
deliveries after it, the latency of messages committed around it) and the
lease takeover (the freeze, and the kill, to the first delivery by another
process of a message the frozen, or the killed, host had claimed).

Everything stops by itself: the sink and the children exit when their
stdin closes (the harness is gone), and a watchdog process stops the
Postfix instances then.
"""
import argparse
import bisect
import collections
import dataclasses
import email.utils
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))

from helpers import stopped  # noqa: E402 (after the path it needs)

SENDER = 'app@example.org'
RECIPIENT = 'ann@example.org'
_MESSAGE_ID = re.compile(rb'^Message-Id:\s*<([^>]+)>', re.I | re.M)
#: The queue's warning when a claim comes back after its lease.
_TOOK_OVER = re.compile(r' took over (\S+) from host (\S+) \(pid (\d+)\)')
#: A sender's warning when it sent a message whose claim another host took
#: over meanwhile (the lease ran out on it), and when it withdrew one.
_TWICE = re.compile(r' <([^>]*)> \(queue id [^)]+\) was sent to .*'
                    r'may arrive twice')
_WITHDRAWN = re.compile(r' was taken over by another host before it was '
                        r'sent')
#: The processor's line for a message sent (INFO).
_SENT = re.compile(r' sent <([^>]*)> \(queue id ([^)]+)\)')
_RECEIVED = re.compile(
    r'^Received: from (\S+) .*?\sby (\S+) \(Postfix\) with \S+ id (\w+)'
    r'.*;\s*(.+?)\s*(?:\([^)]*\))?\s*$', re.S)
#: Areas of a queue directory (mailout.queue.names.AREAS, without an
#: import in the harness).
AREAS = ('tmp', 'new', 'cur', 'deferred', 'failed', 'held')


# -- the child ----------------------------------------------------------------

def message_text(mid, rng):
    size = rng.choice((0, 0, 0, 0, 0, 0, 0, 0, 3000, 30000))
    body = ''.join(f'line {i} of {mid}\r\n' for i in range(size // 30 + 1))
    return (f'From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: {mid}\r\n'
            f'Message-Id: <{mid}>\r\n'
            'Date: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\n' + body)


def child_main(config_path, label, seed):
    """Deliver with the processor of config_path's queued delivery; commit
    what the harness asks for on stdin ("send N": one transaction of N
    messages; "stop": stop the processor and exit), reporting on stdout;
    exit at once when stdin closes (the harness is gone)."""
    import logging

    import transaction

    from mailout import config
    from mailout import factories

    logging.basicConfig(
        level=logging.WARNING,
        format='%(asctime)s %(levelname)s %(name)s %(threadName)s: '
               '%(message)s')
    # "sent <MESSAGE-ID> (queue id NAME)": which queue file was which
    # message, for the claims another host took over.
    logging.getLogger('mailout.processor').setLevel(logging.INFO)
    rng = random.Random(seed)
    _, deliveries = factories.build_all(config.load(config_path))
    delivery = deliveries['scaleout']
    delivery.processor.start()
    counter = itertools.count(1)

    def say(*words):
        os.write(1, (' '.join(words) + '\n').encode())

    say('ready', str(os.getpid()))
    while True:
        line = sys.stdin.readline()
        if not line:
            os._exit(0)
        command, *args = line.split()
        if command == 'send':
            ids = [f'so-{label}-{next(counter)}@scaleout.test'
                   for _ in range(int(args[0]))]
            transaction.begin()
            for mid in ids:
                delivery.send(SENDER, [RECIPIENT], message_text(mid, rng))
            say('commit', *ids)
            transaction.commit()
            say('committed', f'{time.time():.6f}', *ids)
            say('done')
        elif command == 'stop':
            delivery.processor.stop()
            say('stopped')
            return


class Child:
    """A child process (one process of a simulated host) and what it said.
    """

    def __init__(self, harness, host, label, config_path, env, seed,
                 stderr_path):
        self.harness = harness
        self.host = host
        self.label = label                  # e.g. host-a-1
        self.stderr_path = stderr_path
        with open(stderr_path, 'wb') as stderr:
            self.process = subprocess.Popen(
                [sys.executable, HERE, '--child', config_path, label,
                 '--seed', str(seed)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                env=env)
        self.pid = self.process.pid
        self.committing = True
        self.killed = False
        self.asked = 0          # send commands written
        self.done = 0           # ... and answered
        self.words = collections.Counter()
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __repr__(self):
        return f'<Child {self.label} pid {self.pid}>'

    def _read(self):
        for line in self.process.stdout:
            word, *args = line.decode().split()
            if word == 'commit':
                self.harness.ledger.begin(args, self)
            elif word == 'committed':
                self.harness.ledger.commit(args[1:], float(args[0]), self)
            with self._changed:
                self.words[word] += 1
                if word == 'done':
                    self.done += 1
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, word, count=1, timeout=60):
        """Wait until the child said ``word`` ``count`` times; False if it
        ended or the timeout passed first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.words[word] < count:
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def tell(self, line):
        try:
            self.process.stdin.write(line.encode() + b'\n')
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            return False
        return True

    def send(self, count):
        """Ask for one transaction of ``count`` messages."""
        with self._changed:
            self.asked += 1
        self.harness.asked(count)
        return self.tell(f'send {count}')

    def wait_idle(self, timeout=60):
        """Wait until every send command was answered."""
        return self.wait_for('done', self.asked, timeout)

    def stop(self, timeout=30):
        """Stop the processor (it finishes the messages in hand) and end."""
        if self.process.poll() is None and self.tell('stop'):
            self.wait_for('stopped', timeout=timeout)
        self.close()

    def close(self, timeout=10):
        """Close stdin (the child exits), kill it if it does not."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(10)

    def errors(self):
        """Tracebacks and ERROR lines the child logged."""
        text = _read_text(self.stderr_path)
        return [line for line in text.splitlines()
                if ' ERROR ' in line or line.startswith('Traceback')
                or ' CRITICAL ' in line]


def _read_text(path):
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except OSError:
        return ''


# -- what the children committed ----------------------------------------------

class Ledger:
    """Message id -> who committed it and when (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.begun = {}         # id -> child: commit() called
        self.done = {}          # id -> (when commit() returned, child)

    def begin(self, ids, child):
        with self._lock:
            self.begun.update(dict.fromkeys(ids, child))

    def commit(self, ids, at, child):
        with self._lock:
            for mid in ids:
                self.done[mid] = (at, child)


# -- what the sink received ---------------------------------------------------

@dataclasses.dataclass
class Copy:
    """One message as the sink recorded it."""
    mid: str
    relay: str          # relayN (the Postfix instance's name)
    client: str         # EHLO name of the process that handed it over
    postfix_id: str     # the relay's queue id
    accepted: float     # Received's time stamp (whole seconds)
    arrived: float      # when the sink wrote it (the file's mtime)

    @property
    def accepted_by(self):
        """When the relay accepted it, at the latest: the arrival unless the
        relay kept it queued (Received's time is rounded down)."""
        return min(self.arrived, self.accepted + 1)


class Arrivals:
    """The sink's records, read as they come (each file once)."""

    def __init__(self, directory):
        self.directory = directory
        self.copies = []
        self._seen = set()
        self.unreadable = []

    def update(self):
        names = [n for n in os.listdir(self.directory)
                 if n.endswith('.json') and not n.startswith('.')
                 and n not in self._seen]
        for name in sorted(names):
            path = os.path.join(self.directory, name)
            arrived = os.stat(path).st_mtime
            with open(path) as f:
                record = json.load(f)
            self._seen.add(name)
            copy = parse_copy(record['data'].encode('latin-1'), arrived)
            if copy is None:
                self.unreadable.append(name)
            else:
                self.copies.append(copy)
        return self.copies


def parse_copy(data, arrived):
    from postfix import split_received
    headers, rest = split_received(data)
    match = _MESSAGE_ID.search(rest)
    if not headers or not match:
        return None
    received = re.sub(r'\r\n[ \t]+', ' ', headers[0])
    found = _RECEIVED.match(received)
    if not found:
        return None
    client, by, postfix_id, date = found.groups()
    return Copy(match.group(1).decode(), by.split('.')[0], client,
                postfix_id,
                email.utils.parsedate_to_datetime(date).timestamp(), arrived)


# -- Postfix instances die with the harness -----------------------------------

WATCHDOG = '''
import shutil, subprocess, sys
sys.stdin.read()
for etc, directory in zip(sys.argv[1::2], sys.argv[2::2]):
    subprocess.run(['/usr/sbin/postfix', '-c', etc, 'stop'],
                   capture_output=True, timeout=60)
    shutil.rmtree(directory, ignore_errors=True)
'''


def watchdog(instances):
    """A process that stops ``instances`` and removes their directories
    when its stdin closes: when the harness ends, however it ends."""
    args = [arg for instance in instances
            for arg in (instance.etc, instance.dir)]
    return subprocess.Popen([sys.executable, '-c', WATCHDOG, *args],
                            stdin=subprocess.PIPE, start_new_session=True)


# -- the harness --------------------------------------------------------------

class Failed(Exception):
    """A phase of the run did not happen in time."""


@dataclasses.dataclass
class Summary:
    messages: int = 0
    relays: int = 0
    hosts: int = 0
    processes: int = 0
    connections: int = 0
    queues: str = 'shared'
    seed: int = 0
    seconds: float = 0.0
    recovery: str = ''
    committed: int = 0
    trickled: int = 0               # committed while a phase waited
    delivered: int = 0              # distinct committed messages arrived
    copies: int = 0
    lost: list = dataclasses.field(default_factory=list)
    unexpected: list = dataclasses.field(default_factory=list)
    duplicates: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    per_relay: dict = dataclasses.field(default_factory=dict)
    stopped_relay: str = ''
    relay_stop: str = 'stop'
    stop_seconds: float = 0.0
    relay_queue_at_stop: int = 0    # kept by the stopped relay, sent later
    accepted_while_stopped: int = 0
    arrived_while_stopped: int = 0
    first_survivor_ms: float = None
    gap_after_stop_ms: float = None
    gap_window_s: float = None      # how long after the stop it is taken
    gap_before_stop_ms: float = None
    commit_gap_after_stop_ms: float = None     # the same, of the commits
    latency: dict = dataclasses.field(default_factory=dict)
    relay_back_s: float = None      # restart -> first mail accepted by it
    mailout_log: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    frozen_host: str = ''
    frozen_pids: list = dataclasses.field(default_factory=list)
    frozen_claims: int = 0
    frozen_seconds: float = 0.0
    frozen_taken_over: int = 0      # delivered by another process
    frozen_first_s: float = None
    frozen_last_s: float = None
    frozen_sent_too: int = 0        # ... and by the frozen host as well
    killed_host: str = ''
    killed_pids: list = dataclasses.field(default_factory=list)
    killed_claims: int = 0
    claim_hosts: list = dataclasses.field(default_factory=list)
    freezes: int = 0                # SIGSTOPs until claims were seen
    claims_taken_over: int = 0      # delivered by another process
    takeover_first_s: float = None
    takeover_last_s: float = None
    lease: float = None
    stuck: dict = dataclasses.field(default_factory=dict)
    postfix_stuck: dict = dataclasses.field(default_factory=dict)
    child_errors: list = dataclasses.field(default_factory=list)
    failures: list = dataclasses.field(default_factory=list)

    def text(self):
        lines = [
            f'scale-out run: {self.messages} messages, {self.relays} Postfix '
            f'relays, {self.hosts} hosts x {self.processes} processes x '
            f'{self.connections} connections, {self.queues} queue'
            f'{"s" if self.queues != "shared" else ""}, '
            f'{self.seconds:.1f} s (seed {self.seed})',
            f'  claims of the killed host come back: {self.recovery}',
            f'  committed {self.committed} (of them {self.trickled} while '
            f'the harness waited for a phase), delivered {self.delivered}, '
            f'copies received {self.copies}, lost {len(self.lost)}, '
            f'unexpected {len(self.unexpected)}',
            '  duplicates: ' + (', '.join(
                f'{n} {cause}' for cause, n in sorted(
                    self.duplicates.items())) or 'none'),
            f'  messages per relay, by when the relay accepted them '
            f'({self.stopped_relay} stopped for {self.stop_seconds:.1f} s, '
            + ('"postfix stop"' if self.relay_stop == 'stop'
               else 'its master killed') + '):',
        ]
        phases = ('before the stop', 'around the stop', 'during the stop',
                  'around the restart', 'after the restart')
        for phase in phases:
            counts = self.per_relay.get(phase, {})
            lines.append(f'    {phase:>18}: ' + ', '.join(
                f'{relay} {counts.get(relay, 0)}'
                for relay in sorted(self.per_relay.get('relays', ()))))
        lines += [
            f'  {self.stopped_relay} at the stop: {self.relay_queue_at_stop} '
            'message(s) in its queue, relayed after its restart; accepted '
            f'while stopped: {self.accepted_while_stopped}, reached the sink '
            f'while stopped: {self.arrived_while_stopped}',
            f'  survivors taking over: first delivery through a survivor '
            f'{_ms(self.first_survivor_ms)} after the stop; longest gap '
            f'between deliveries {_ms(self.gap_after_stop_ms)} in the '
            f'{_s(self.gap_window_s)} after the stop while mail was '
            f'committed at full rate (between commits '
            f'{_ms(self.commit_gap_after_stop_ms)}; between deliveries '
            f'{_ms(self.gap_before_stop_ms)} in the 5 s before the stop)',
            '  latency commit -> sink: ' + ', '.join(
                f'{k} {_ms(v)}' for k, v in self.latency.items()),
            f'  {self.stopped_relay} back: first message accepted by it '
            f'{_s(self.relay_back_s)} after its restart',
            '  mailout log (warnings): ' + (', '.join(
                f'{n} {what}' for what, n in sorted(
                    self.mailout_log.items())) or 'none'),
            (f'  freeze: {self.frozen_host} (pids '
             f'{", ".join(map(str, self.frozen_pids))}) frozen (SIGSTOP) '
             f'holding {self.frozen_claims} claim(s) for '
             f'{self.frozen_seconds:.2f} s, past the lease: '
             f'{self.frozen_taken_over} delivered by another host, first '
             f'{_s(self.frozen_first_s)}, last {_s(self.frozen_last_s)} '
             f'after the freeze; {self.frozen_sent_too} sent by the frozen '
             'host too (on the wire at the freeze)'
             if self.frozen_host else
             '  freeze: none (needs host ids and claim leases, a shared '
             'queue, 3 hosts)'),
            f'  kill: {self.killed_host} (pids '
            f'{", ".join(map(str, self.killed_pids))}) killed holding '
            f'{self.killed_claims} claim(s) (claims named '
            f'{", ".join(self.claim_hosts) or "-"}; '
            f'{self.freezes} freeze(s) to catch them)',
            f'  takeover: {self.claims_taken_over} of '
            f'{self.killed_claims} delivered by another process; first '
            f'{_s(self.takeover_first_s)}, last {_s(self.takeover_last_s)} '
            'after the kill'
            + (f' (lease {self.lease:g} s)'
               if self.queues == 'shared' else ''),
            '  left in mailout\'s queue: ' + (', '.join(
                f'{area} {n}' for area, n in self.stuck.items()) or '-'),
            '  left in Postfix\'s queues: ' + (', '.join(
                f'{relay} {n}' for relay, n in self.postfix_stuck.items())
                or '-'),
            f'  child errors logged: {len(self.child_errors)}',
            f'  failures: {len(self.failures)}',
        ]
        lines += [f'    {failure}' for failure in self.failures[:30]]
        lines += [f'    child: {error}' for error in self.child_errors[:10]]
        return '\n'.join(lines)


def _ms(seconds):
    return '-' if seconds is None else f'{seconds * 1000:.0f} ms'


def _s(seconds):
    return '-' if seconds is None else f'{seconds:.2f} s'


CONFIG = '''<mailout>
<smtp-mailer farm>
{hosts}
  tls none
  timeout 5s
  down-time {down_time}s
  messages-per-connection {per_connection}
  local-hostname {label}.mailout.test
</smtp-mailer>
<queued-delivery scaleout>
  mailer farm
  queue-path {queue}
  connections {connections}
  poll-interval {poll}s
  min-backoff 1s
  max-backoff 2s
  claim-lease {lease}s
</queued-delivery>
</mailout>
'''


class ScaleOut:
    """One run (see the module's docstring); `run` returns its `Summary`."""

    def __init__(self, directory, messages=600, relays=3, hosts=3,
                 processes=2, connections=2, rate=40.0, queues='shared',
                 lease=3.0, down_time=2.0, stop_seconds=4.0,
                 restart_after=2.0, per_connection=10, poll=0.5,
                 relay_stop='stop', freeze=True, seed=None, verbose=False):
        if not 2 <= relays <= 3 or hosts < 2 or processes < 1:
            raise ValueError('2 or 3 relays, 2 hosts or more')
        self.directory = directory
        self.messages = messages
        self.relay_count = relays
        self.host_names = [f'host-{chr(ord("a") + i)}' for i in range(hosts)]
        self.processes = processes
        self.connections = connections
        self.rate = rate
        self.queues = queues
        self.down_time = down_time
        self.stop_seconds = stop_seconds
        self.restart_after = restart_after
        self.relay_stop = relay_stop    # 'stop' or 'kill' (its master)
        self.per_connection = per_connection
        self.poll = poll
        self.seed = random.randrange(1 << 32) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.verbose = verbose
        self.lease = lease
        # A host frozen past the lease: only where another host can take
        # its claims over.
        self.freeze = freeze and queues == 'shared' \
            and hosts >= 3
        self.burst = min(max(30, messages // 10), 300)
        self.budget = messages - self.burst     # handed out by the feeder
        self.ledger = Ledger()
        self.children = []
        self.relays = []
        self.events = {}        # name -> time.time()
        self.killed_claims = {}     # claim file name -> message id
        self.frozen_claims = {}     # the same, of the frozen host
        self.frozen_labels = set()
        self.claim_hosts = []
        self.held_at_stop = set()
        self.summary = Summary(
            messages=messages, relays=relays, hosts=hosts,
            processes=processes, connections=connections, queues=queues,
            seed=self.seed, lease=self.lease, relay_stop=relay_stop)
        self._started = time.monotonic()
        self._cap = 0
        self._handed = 0        # by the feeder, not trickled
        self._trickled = 0
        self._asked = 0         # messages asked of the children in all
        self._capped_at = []    # when the feeder reached a cap
        self._feeding = threading.Condition()
        self._stop_feeding = False
        self.burst_committed = 0
        self.feeder = None

    def say(self, text):
        if self.verbose:
            print(f'[{time.monotonic() - self._started:7.2f}] {text}',
                  flush=True)

    # -- set-up -------------------------------------------------------------

    def queue_path(self, host):
        name = 'queue' if self.queues == 'shared' else f'queue-{host}'
        return os.path.join(self.directory, name)

    def _config(self, host, label):
        path = os.path.join(self.directory, f'{label}.conf')
        with open(path, 'w') as f:
            f.write(CONFIG.format(
                hosts='\n'.join(f'  host {r.address}:{r.port}'
                                for r in self.relays),
                down_time=f'{self.down_time:g}', label=label,
                per_connection=self.per_connection,
                queue=self.queue_path(host), connections=self.connections,
                poll=f'{self.poll:g}', lease=f'{self.lease:g}'))
        return path

    def start_child(self, host, number, committing=True):
        label = f'{host}-{number}'
        env = dict(os.environ)
        env['MAILOUT_HOST_ID'] = host
        child = Child(self, host, label, self._config(host, label), env,
                      self.rng.randrange(1 << 32),
                      os.path.join(self.directory, f'{label}.log'))
        child.committing = committing
        self.children.append(child)
        return child

    def wait_ready(self, children):
        for child in children:
            if not child.wait_for('ready', timeout=60):
                raise Failed(f'{child} did not start: '
                             f'{_read_text(child.stderr_path)[-2000:]}')

    # -- the feeder ---------------------------------------------------------

    def allow(self, share):
        """Let the feeder hand out messages up to ``share`` of its budget."""
        with self._feeding:
            self._cap = max(self._cap, round(self.budget * share))
            self._feeding.notify_all()

    def asked(self, count):
        with self._feeding:
            self._asked += count

    def stop_committing(self, children):
        """Take ``children`` out of the feeder's turns (under its lock: no
        send to them is under way once this returns)."""
        with self._feeding:
            for child in children:
                child.committing = False

    def _feed(self):
        """Hand out the budget, a transaction of 1-3 messages at a time,
        ``rate`` messages a second, up to the cap `allow` sets; while
        capped, one message every 0.25 s (the harness waits for mail to go
        somewhere), counted apart."""
        turn = itertools.count()
        while True:
            with self._feeding:
                if self._stop_feeding or self._handed >= self.budget:
                    return
                if self._handed >= self._cap:
                    self._feeding.wait(0.25)
                    if self._stop_feeding or self._handed < self._cap:
                        continue
                    count, trickle = 1, True
                else:
                    count = min(self.rng.randint(1, 3),
                                self._cap - self._handed)
                    trickle = False
                committing = [c for c in self.children if c.committing]
                if committing:
                    if trickle:
                        self._trickled += count
                    else:
                        self._handed += count
                        if self._handed == self._cap:
                            self._capped_at.append(time.time())
                    committing[next(turn) % len(committing)].send(count)
            time.sleep(count / self.rate if committing else 0.05)

    # -- conditions ---------------------------------------------------------

    def wait_until(self, condition, what, timeout=60):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise Failed(f'timed out after {timeout:g} s waiting for '
                             f'{what}')
            time.sleep(0.05)
        self.say(what)

    def committed(self):
        return len(self.ledger.done)

    def copies(self):
        return self.arrivals.update()

    def relay_carried(self, relay, after):
        return any(c.relay == relay and c.accepted_by > after
                   for c in self.copies())

    # -- the run ------------------------------------------------------------

    def run(self):
        from postfix import Postfix
        from postfix import RelaySink
        from postfix import start_all
        os.makedirs(self.directory, exist_ok=True)
        if os.listdir(self.directory):
            # An earlier run's sink records and queue would count here.
            raise ValueError(f'{self.directory} is not empty')
        sink_dir = os.path.join(self.directory, 'sink')
        self.sink = RelaySink(sink_dir)
        self.arrivals = Arrivals(sink_dir)
        guard = None
        feeder = None
        try:
            for n in range(1, self.relay_count + 1):
                self.relays.append(Postfix(
                    self.sink.port, address=f'127.0.0.{n + 1}',
                    name=f'relay{n}', sasl=False, fast_retry=True))
            guard = watchdog(self.relays)
            start_all(self.relays)
            self.say('relays up: ' + ', '.join(map(repr, self.relays)))
            for host in self.host_names:
                os.makedirs(self.queue_path(host), exist_ok=True)
            self.wait_ready([self.start_child(host, n)
                             for host in self.host_names
                             for n in range(1, self.processes + 1)])
            self.say('children ready')
            feeder = self.feeder = threading.Thread(target=self._feed,
                                                    daemon=True)
            feeder.start()
            self.phases()
            self.drain()
            self.say('drained')
        except Failed as e:
            self.summary.failures.append(str(e))
        finally:
            with self._feeding:
                self._stop_feeding = True
                self._feeding.notify_all()
            if feeder is not None:
                feeder.join(30)
            for child in self.children:
                if not child.killed:
                    child.stop()
            self.final_state()
            for relay in self.relays:
                relay.stop()
            if guard is not None:
                guard.stdin.close()
                guard.wait(60)
            self.sink.stop()
        self.analyse()
        self.summary.seconds = time.monotonic() - self._started
        return self.summary

    def phases(self):
        stopped = self.relays[1]
        self.summary.stopped_relay = stopped.name
        names = [r.name for r in self.relays]

        # Each phase's share of the messages is handed out in full before
        # its event; the next phase's share is allowed before the event,
        # so that mail keeps coming through it.
        def share(fraction):
            return round(self.budget * fraction)

        # 1. Mail through every relay, then relay2 stops.
        self.allow(0.3)
        self.wait_until(
            lambda: self.committed() >= share(0.3) and all(
                self.relay_carried(name, 0) for name in names),
            'every relay carried mail', timeout=60 + self.budget / 10)
        self.allow(0.55)
        self.events['stop'] = time.time()
        stopped.halt(kill=self.relay_stop == 'kill')
        self.events['stopped'] = time.time()
        self.say(f'{stopped.name} stopped')

        # 2. The survivors carry the mail, then relay2 starts again.
        survivors = [name for name in names if name != stopped.name]
        self.wait_until(
            lambda: self.committed() >= share(0.55)
            and time.time() - self.events['stopped'] >= self.stop_seconds
            and all(self.relay_carried(name, self.events['stopped'])
                    for name in survivors),
            'the survivors carried the mail', timeout=60 + self.budget / 10)
        self.allow(0.8)
        self.events['restart'] = time.time()
        stopped.start()
        self.events['restarted'] = time.time()
        self.say(f'{stopped.name} started again')

        # 3. relay2 carries mail again; a host is frozen past the lease,
        # one killed, each holding claims, while the others commit on.
        self.wait_until(
            lambda: self.committed() >= share(0.8) and any(
                c.relay == stopped.name
                and c.accepted >= int(self.events['restart'])
                for c in self.copies()),
            f'{stopped.name} carried mail again', timeout=90)
        self.allow(1.0)
        if self.freeze:
            self.freeze_a_host()
        self.kill_a_host()

        # 4. The rest of the messages.
        self.wait_until(
            lambda: not self.feeder.is_alive()
            and self.committed() >= self._asked,
            'every message handed out committed',
            timeout=60 + self.budget / self.rate * 3)

    def caught_holding_claims(self, victims, burst):
        """Stop ``victims`` committing, let the first commit ``burst``
        messages (which keep every sender thread busy for a while, the
        victims' too) and freeze them (SIGSTOP) until they are seen holding
        claims; return those, ``{claim file: Message-Id}``, the victims
        left frozen."""
        self.stop_committing(victims)
        for child in victims:
            if not child.wait_idle(60):
                raise Failed(f'{child} did not finish its commits')
        for attempt in range(5):
            victims[0].send(burst)
            if not victims[0].wait_idle(120):
                raise Failed(f'{victims[0]} did not commit its burst')
            self.burst_committed += burst
            held = self.freeze_holding_claims(victims)
            if held:
                return held
        raise Failed(f'{victims[0].host} was never seen holding a claim')

    def freeze_a_host(self):
        """Freeze one host (SIGSTOP) while it holds claims, until the other
        hosts took them over after the lease; then let it go on."""
        host = self.host_names[-2]
        victims = [c for c in self.children if c.host == host]
        pids = [c.pid for c in victims]
        self.summary.frozen_host = host
        held = self.caught_holding_claims(victims, max(self.burst // 2, 20))
        self.events['freeze'] = time.time()
        self.frozen_claims = held
        self.frozen_labels = {c.label for c in victims}
        self.summary.frozen_pids = sorted(pids)
        self.say(f'{host} frozen holding {len(held)} claims')
        cur = os.path.join(self.queue_path(host), 'cur')
        try:
            self.wait_until(
                lambda: not any(os.path.lexists(os.path.join(cur, name))
                                for name in held),
                f'{host}\'s claims taken over while it was frozen',
                timeout=self.lease * 3 + 30)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            self.events['thaw'] = time.time()
        with self._feeding:
            for child in victims:
                child.committing = True
        wanted = set(held.values())
        self.wait_until(
            lambda: wanted <= {c.mid for c in self.copies()
                               if c.client.split('.')[0]
                               not in self.frozen_labels},
            f'{host}\'s claims delivered by others', timeout=60)

    def kill_a_host(self):
        host = self.host_names[-1]
        victims = [c for c in self.children if c.host == host]
        self.summary.killed_host = host
        self.killed_claims = self.caught_holding_claims(victims, self.burst)
        self.events['kill'] = time.time()
        for child in victims:
            os.kill(child.pid, signal.SIGKILL)
            child.killed = True
        for child in victims:
            child.process.wait()
            child.close()
        self.summary.killed_pids = sorted(c.pid for c in victims)
        self.summary.claim_hosts = self.claim_hosts
        self.say(f'{host} killed holding {len(self.killed_claims)} claims')
        if self.queues != 'shared':
            # Nobody else works that queue: the host starts again (the
            # same host id), later, and takes its claims back by pid.
            time.sleep(self.restart_after)
            self.events['host restart'] = time.time()
            self.wait_ready([self.start_child(host, n, committing=False)
                             for n in range(self.processes + 1,
                                            2 * self.processes + 1)])
        killed = {c.label for c in victims}
        wanted = set(self.killed_claims.values())
        self.wait_until(
            lambda: wanted <= {c.mid for c in self.copies()
                               if c.client.split('.')[0] not in killed},
            'the killed host\'s claims delivered by others',
            timeout=60 + self.lease * 3)

    def freeze_holding_claims(self, victims, attempts=200):
        """Freeze ``victims`` until they are seen holding claims in cur/;
        those claims (the victims left frozen), or {} if they never were
        (thawed)."""
        pids = {c.pid for c in victims}
        for attempt in range(attempts):
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                for pid in pids:
                    if not stopped(pid):
                        raise Failed(f'{pid} did not stop')
                self.summary.freezes += 1
                held = self.claims_of(pids)
            except BaseException:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
                raise
            if held:
                return held
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            time.sleep(self.rng.uniform(0.002, 0.02))
        return {}

    def claims_of(self, pids):
        """{claim file name: message id} of the claims of ``pids`` (frozen,
        so the files stay as they are)."""
        from mailout.queue import names
        held = {}
        hosts = set()
        for host in self.host_names:
            cur = os.path.join(self.queue_path(host), 'cur')
            for filename in os.listdir(cur):
                claim = names.Claim.parse(filename)
                if claim is None or claim.pid not in pids:
                    continue
                try:
                    with open(os.path.join(cur, filename), 'rb') as f:
                        match = _MESSAGE_ID.search(f.read())
                except FileNotFoundError:   # not its own any more
                    continue
                held[filename] = match.group(1).decode() if match else None
                hosts.add(claim.host.rsplit('~', 1)[0])     # its host id
            if self.queues == 'shared':
                break
        self.claim_hosts = sorted(hosts)
        return held

    def drain(self):
        """Wait until every committed message arrived and every queue is
        empty."""
        timeout = 120 + self.messages / 20
        done = self.ledger.done
        self.wait_until(
            lambda: set(done) <= {c.mid for c in self.copies()},
            'every committed message arrived', timeout=timeout)
        self.wait_until(
            lambda: not any(self.mailout_left().values()),
            'mailout\'s queues empty', timeout=timeout)
        for relay in self.relays:
            relay.flush()
        for relay in self.relays:
            relay.wait_until_empty(timeout=timeout)
        self.say('Postfix queues empty')

    def mailout_left(self):
        left = collections.Counter()
        for host in (self.host_names if self.queues != 'shared'
                     else self.host_names[:1]):
            for area in AREAS:
                path = os.path.join(self.queue_path(host), area)
                if os.path.isdir(path):
                    left[area] += len(os.listdir(path))
        return left

    def final_state(self):
        """What is left in the queues once the children are gone."""
        s = self.summary
        s.stuck = {area: n for area, n in self.mailout_left().items() if n}
        for relay in self.relays:
            try:
                left = len(relay.queue()) if relay.started else None
            except Exception as e:          # noqa: BLE001 (reported)
                left = repr(e)
            if left:
                s.postfix_stuck[relay.name] = left
        killed = {str(c.pid) for c in self.children if c.killed}
        for child in self.children:
            s.child_errors += [f'{child.label}: {line}'
                               for line in child.errors()]
            for line in _read_text(child.stderr_path).splitlines():
                if ' WARNING ' not in line:
                    continue
                took = _TOOK_OVER.search(line)
                if took:
                    s.mailout_log[
                        'claims taken over from the killed host'
                        if took.group(3) in killed else
                        'claims taken over from the frozen host'
                        if int(took.group(3)) in s.frozen_pids else
                        'claims taken over from another live host'] += 1
                    continue
                if _TWICE.search(line):
                    s.mailout_log['sent, though taken over meanwhile'] += 1
                    continue
                if _WITHDRAWN.search(line):
                    s.mailout_log['withdrawn, taken over before sent'] += 1
                    continue
                for what, pattern in (
                        ('deferred', ' deferred for '),
                        ('relay marked down', ' marked down '),
                        ('relay back', ' back after ')):
                    if pattern in line:
                        s.mailout_log[what] += 1
                        break
                else:
                    s.mailout_log['other warnings'] += 1

    # -- the checks ---------------------------------------------------------

    def analyse(self):
        s = self.summary
        copies = self.arrivals.update()
        done = self.ledger.done
        s.committed = len(done)
        s.trickled = self._trickled
        s.copies = len(copies)
        by_id = collections.defaultdict(list)
        for copy in copies:
            by_id[copy.mid].append(copy)
        s.delivered = sum(1 for mid in done if mid in by_id)
        s.lost = sorted(mid for mid in done if mid not in by_id)
        s.unexpected = sorted(mid for mid in by_id if mid not in done)
        for mid in s.lost[:10]:
            s.failures.append(f'lost: {mid} (commit returned) never arrived')
        for mid in s.unexpected[:10]:
            s.failures.append(f'unexpected: {mid} arrived, never committed')
        if self.arrivals.unreadable:
            s.failures.append(f'sink records without a Postfix Received '
                              f'header or Message-Id: '
                              f'{self.arrivals.unreadable[:5]}')
        self._duplicates(by_id)
        if 'stop' in self.events:
            self._relay_figures(copies)
        if 'kill' in self.events:
            self._takeover(by_id)
        if 'freeze' in self.events:
            self._frozen(by_id)
        self._latency(by_id)
        if s.stuck:
            s.failures.append(f'stuck in mailout\'s queue: {s.stuck}')
        if s.postfix_stuck:
            s.failures.append(f'stuck in Postfix: {s.postfix_stuck}')
        if s.child_errors:
            s.failures.append(f'{len(s.child_errors)} error line(s) in the '
                              'children\'s logs')

    def _duplicates(self, by_id):
        s = self.summary
        killed = set(self.killed_claims.values())
        killed_labels = {c.label for c in self.children if c.killed}
        frozen = set(self.frozen_claims.values())
        stop = self.events.get('stop')
        stopped = self.events.get('stopped')
        # Claims taken over from a live owner (the lease ran out while it
        # still worked on them), by Message-Id.
        killed_pids = {str(c.pid) for c in self.children if c.killed}
        queue_names = {}            # queue id -> Message-Id
        live_takeovers = set()      # queue ids
        twice = set()               # Message-Ids
        for child in self.children:
            for line in _read_text(child.stderr_path).splitlines():
                sent = _SENT.search(line)
                if sent:
                    queue_names[sent.group(2)] = sent.group(1)
                took = _TOOK_OVER.search(line)
                if took and took.group(3) not in killed_pids:
                    live_takeovers.add(took.group(1))
                said = _TWICE.search(line)
                if said and not child.killed:
                    twice.add(said.group(1))
        taken_over = twice | {queue_names.get(name)
                              for name in live_takeovers}
        for mid, group in by_id.items():
            extra = len(group) - 1
            if extra <= 0:
                continue
            causes = []
            ids = collections.Counter((c.relay, c.postfix_id)
                                      for c in group)
            # Postfix to the sink: the stopped relay's smtp process died
            # after the dot, before the sink's reply; sent again after the
            # restart (the same Postfix queue id twice).
            for (relay, _), n in ids.items():
                if relay == s.stopped_relay and n > 1:
                    causes += ['RFC 1047: relay stop, Postfix to the sink'] \
                        * (n - 1)
            if mid in killed and any(c.client.split('.')[0] in killed_labels
                                     for c in group):
                # One copy from the killed process: it was on the wire.
                causes.append('RFC 1047: killed host in flight')
            if mid in frozen and any(
                    c.client.split('.')[0] in self.frozen_labels
                    for c in group):
                # The frozen host sent it (it was on the wire at the
                # freeze), another host after the lease.
                causes.append('lease: frozen host, on the wire at the '
                              'freeze')
            # Received's time is whole seconds (rounded down).
            if stop is not None and any(
                    c.relay == s.stopped_relay
                    and stop - 2 <= c.accepted <= stopped + 1
                    for c in group) and len(ids) > 1:
                causes.append('RFC 1047: relay stop, mailout to the relay')
            if mid in taken_over:
                causes.append('lease: taken over from a live owner')
            explained = causes[:extra]
            for cause in explained:
                s.duplicates[cause] += 1
            if extra > len(explained):
                s.duplicates['unexplained'] += extra - len(explained)
                s.failures.append(
                    f'duplicate: {mid} arrived {len(group)} times ('
                    + '; '.join(f'{c.client} -> {c.relay} {c.postfix_id} '
                                f'at {c.arrived:.3f}' for c in group)
                    + f'), explained: {explained or "none"}')

    def _relay_figures(self, copies):
        s = self.summary
        ev = self.events
        relays = [r.name for r in self.relays]
        s.stop_seconds = ev['restart'] - ev['stopped']
        bounds = [('before the stop', -1e18, ev['stop']),
                  ('around the stop', ev['stop'], ev['stopped']),
                  ('during the stop', ev['stopped'], ev['restart']),
                  ('around the restart', ev['restart'], ev['restarted']),
                  ('after the restart', ev['restarted'], 1e18)]
        name = s.stopped_relay
        # Kept in relay2's queue through its stop, relayed after its
        # restart: accepted before it stopped.
        held = [c for c in copies if c.relay == name
                and c.accepted < ev['stopped'] and c.arrived > ev['restart']]
        self.held_at_stop = {c.mid for c in held}
        per = {phase: collections.Counter() for phase, _, _ in bounds}
        for copy in copies:
            at = copy.accepted_by
            if copy in held:
                at = min(at, ev['stopped'] - 1e-6)
            for phase, start, end in bounds:
                if start <= at < end:
                    per[phase][copy.relay] += 1
                    break
        s.per_relay = {phase: dict(counts) for phase, counts in per.items()}
        s.per_relay['relays'] = relays
        mine = [c for c in copies if c.relay == name]
        s.relay_queue_at_stop = len(held)
        s.accepted_while_stopped = sum(
            1 for c in mine if c.accepted > ev['stopped']
            and c.accepted + 1 <= ev['restart'])
        s.arrived_while_stopped = sum(
            1 for c in mine if ev['stopped'] < c.arrived < ev['restart'])
        if s.accepted_while_stopped or s.arrived_while_stopped:
            s.failures.append(f'{name} took mail while stopped')
        survivors = [c for c in copies if c.relay != name]
        during = collections.Counter(
            c.relay for c in survivors
            if ev['stopped'] < c.accepted_by < ev['restart'])
        for relay in relays:
            if relay != name and not during[relay]:
                s.failures.append(f'{relay} carried nothing while {name} '
                                  'was stopped')
        after = [c for c in survivors if c.arrived > ev['stop']]
        if after:
            s.first_survivor_ms = min(c.arrived for c in after) - ev['stop']
        times = sorted(c.arrived for c in copies)
        # Up to 5 s after the stop, while the feeder was not held at its
        # cap (then it trickles: gaps of its own).
        end = min([t for t in self._capped_at if t > ev['stop']]
                  + [ev['restart'], ev['stop'] + 5])
        s.gap_window_s = end - ev['stop']
        s.gap_after_stop_ms = _longest_gap(times, ev['stop'], end)
        if times:
            s.gap_before_stop_ms = _longest_gap(
                times, max(ev['stop'] - 5, times[0]), ev['stop'])
        s.commit_gap_after_stop_ms = _longest_gap(
            sorted(at for at, _ in self.ledger.done.values()),
            ev['stop'], end)
        back = [c.accepted_by for c in mine
                if c.accepted >= int(ev['restart'])]
        if back:
            s.relay_back_s = max(min(back) - ev['restart'], 0.0)
        else:
            s.failures.append(f'{name} carried no mail after its restart')

    def _takeover(self, by_id):
        s = self.summary
        killed_labels = {c.label for c in self.children if c.killed}
        s.killed_claims = len(self.killed_claims)
        s.recovery = self._recovery()
        kill = self.events['kill']
        firsts = []
        for mid in set(self.killed_claims.values()):
            by_others = [c.arrived for c in by_id.get(mid, ())
                         if c.client.split('.')[0] not in killed_labels]
            if by_others:
                firsts.append(min(by_others) - kill)
            else:
                s.failures.append(f'takeover: {mid}, claimed by the killed '
                                  'host, was never delivered by another '
                                  'process')
        s.claims_taken_over = len(firsts)
        if firsts:
            s.takeover_first_s = min(firsts)
            s.takeover_last_s = max(firsts)

    def _frozen(self, by_id):
        s = self.summary
        s.frozen_claims = len(self.frozen_claims)
        s.frozen_seconds = self.events['thaw'] - self.events['freeze']
        firsts = []
        for mid in set(self.frozen_claims.values()):
            group = by_id.get(mid, ())
            by_others = [c.arrived for c in group if c.client.split('.')[0]
                         not in self.frozen_labels]
            if any(c.client.split('.')[0] in self.frozen_labels
                   for c in group) and by_others:
                s.frozen_sent_too += 1
            if by_others:
                firsts.append(min(by_others) - self.events['freeze'])
            else:
                s.failures.append(f'freeze: {mid}, claimed by the frozen '
                                  'host, was never delivered by another '
                                  'host')
        s.frozen_taken_over = len(firsts)
        if firsts:
            s.frozen_first_s = min(firsts)
            s.frozen_last_s = max(firsts)

    def _recovery(self):
        if self.queues != 'shared':
            return (f'the host is started again {self.restart_after:g} s '
                    'after the kill (its own queue) and takes them back by '
                    'pid')
        return (f'other hosts take them over after the lease '
                f'(claim-lease {self.lease:g}s)')

    def _latency(self, by_id):
        s = self.summary
        latencies = []
        around = []
        stop = self.events.get('stop')
        for mid, (at, _) in self.ledger.done.items():
            group = by_id.get(mid)
            if not group:
                continue
            latency = max(min(c.arrived for c in group) - at, 0.0)
            latencies.append(latency)
            if stop is not None and stop - 1 <= at <= stop + 2 \
                    and mid not in self.held_at_stop:
                around.append(latency)
        if latencies:
            latencies.sort()
            s.latency = {
                'median': latencies[len(latencies) // 2],
                'p99': latencies[int(len(latencies) * 0.99)],
                'max': latencies[-1]}
            if around:
                s.latency['max of those committed around the stop (but '
                          'those the stopped relay kept queued)'] = max(around)


def _longest_gap(times, start, end):
    """The longest time without an arrival in [start, end] (seconds)."""
    inside = [start] + times[bisect.bisect_left(times, start):
                             bisect.bisect_right(times, end)] + [end]
    return max(b - a for a, b in zip(inside, inside[1:]))


def run(directory=None, **options):
    """Run the harness; return its `Summary`."""
    own = directory is None
    directory = directory or tempfile.mkdtemp(prefix='mailout-scaleout-')
    try:
        return ScaleOut(directory, **options).run()
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--messages', type=int, default=2000)
    parser.add_argument('--rate', type=float, default=60,
                        help='messages handed out a second')
    parser.add_argument('--relays', type=int, default=3, choices=(2, 3))
    parser.add_argument('--hosts', type=int, default=3)
    parser.add_argument('--processes', type=int, default=2,
                        help='processes a host')
    parser.add_argument('--connections', type=int, default=2,
                        help='sender threads a process')
    parser.add_argument('--queues', choices=('shared', 'per-host'),
                        default='shared')
    parser.add_argument('--lease', type=float, default=3.0,
                        help='claim-lease (seconds), where supported')
    parser.add_argument('--stop-seconds', type=float, default=4.0,
                        help='relay2 stays stopped at least this long')
    parser.add_argument('--relay-stop', choices=('stop', 'kill'),
                        default='stop',
                        help='stop relay2 with "postfix stop", or kill its '
                             'master (SIGKILL)')
    parser.add_argument('--restart-after', type=float, default=2.0,
                        help='per-host queues: the killed host starts '
                             'again this long after the kill')
    parser.add_argument('--no-freeze', action='store_true',
                        help='do not freeze a host past the lease')
    parser.add_argument('--seed', type=int)
    parser.add_argument('--dir', help='work here and keep the files')
    parser.add_argument('-v', '--verbose', action='store_true')
    parser.add_argument('--child', nargs=2, metavar=('CONFIG', 'LABEL'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args.seed)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    summary = run(args.dir, messages=args.messages, rate=args.rate,
                  relays=args.relays, hosts=args.hosts,
                  processes=args.processes, connections=args.connections,
                  queues=args.queues, lease=args.lease,
                  stop_seconds=args.stop_seconds,
                  restart_after=args.restart_after,
                  relay_stop=args.relay_stop, freeze=not args.no_freeze,
                  seed=args.seed,
                  verbose=args.verbose)
    print(summary.text())
    return 1 if summary.failures else 0


if __name__ == '__main__':
    sys.exit(main())
