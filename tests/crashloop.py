"""Crash tests: kill -9 a process that commits and delivers mail through
mailout at random moments, then check at an SMTP sink what arrived.

Run as ``python tests/crashloop.py --iterations 1000`` (``--help`` for the
options); tests/test_crash.py runs a shorter loop.

Each iteration starts a real child process (``crashloop.py --child``) that
builds mailout from a config file (a queued delivery with its processor on,
1 or 8 sender threads, pipelining on or off, so the child both commits and
delivers, its threads woken together by each commit, recovery every 50 ms)
and runs random transactions of 1-5 messages: most commit, some abort, some
fail in the vote of another resource manager (before or after mailout's
vote), some roll a savepoint back past some of their messages.  It reports
on stdout, one flushed line each::

    send ID RCPT,RCPT   before send()
    commit ID ...       before transaction.commit()
    committed ID ...    after commit() returned
    abort ID ...        before transaction.abort()
    doomed ID ...       before a commit that another resource will refuse
    rollback ID ...     before a savepoint rollback drops these messages

The harness SIGKILLs the child at a random moment: a random delay after it
is ready, or just after its k-th "commit" or "committed" line.  Then it
makes sure the sink has read what the dead child's connections sent (one
message of its own, `SinkProcess.sync`) and sorts the claims the dead child
held in ``cur/`` (messages in flight) by what the sink has:

* "end-of-data reply outstanding": the sink has a copy of the message for
  the claim's recipients beyond those already accounted for, so its final
  dot went out and the queue was not updated yet (RFC 1047's window
  between the relay's reply and the queue update): the one case where one
  more copy is allowed, for those recipients;
* "commands or nothing sent": the sink has no new copy (nothing of the
  message went out yet, or its commands, or part of its content; with
  pipelining, its MAIL, RCPT and DATA went out with the previous message's
  content; or the sink deferred it): it must not arrive twice.

With pipelining (RFC 2920) a sender thread holds up to two claims: the
message whose end-of-data reply it waits for, and the next one, whose
commands went out with that message's content.  Without, one.  The
harness then either drains the queue itself (``recover`` + ``run_once``)
and checks everything, or leaves recovery to the next child, which may be
killed in turn.

The sink (``crashloop.py --sink``) is a small aiosmtpd server of its own: it
offers PIPELINING, records each accepted message (Message-Id and
recipients) before it replies, is slow at DATA (each reply to the final
dot waits ``--data-delay-ms``, 10 ms by default, and sometimes up to 20 ms
more: all 8 threads of a child are mostly inside that window when it is
killed), refuses ``flaky@`` recipients with 451 now and then (partial
deferral) and sometimes answers 451 after DATA (whole deferral).

The promises checked (DESIGN.md section 3, items 1-3), per message and
recipient:

* a message whose commit returned arrived at least once;
* a message of an aborted, refused, rolled back or unfinished transaction
  never arrived;
* the messages of the commit the child was in when killed arrived at most
  once (or not at all);
* a message arrived more than once only if its end-of-data reply was
  outstanding at that many kills (its claim was "reply outstanding");
  those duplicates are counted apart, by mode (pipelining or not); any
  other is a failure ("duplicate");
* a killed child held at most one "reply outstanding" claim a sender
  thread, and at most one claim a thread without pipelining, two with;
* after each drain by the harness nothing is left in the queue (stuck).

The summary counts, for children with pipelining and without apart, the
kills, the claims held (of each kind) and the duplicates.
"""
import argparse
import collections
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

from helpers import stop_process

HERE = os.path.abspath(__file__)
FLAKY = 'flaky@example.org'
SYNC = 'sync@example.org'
RECIPIENTS = ('ann@example.org', 'bob@example.org')
_MESSAGE_ID = re.compile(rb'^Message-Id:\s*<([^>]+)>', re.I | re.M)


# -- the sink -----------------------------------------------------------------

def sink_main(records_path, seed, data_delay=0.0):
    """An SMTP server on 127.0.0.1 (ephemeral port, printed on stdout),
    offering PIPELINING, that appends one JSON line per accepted message to
    ``records_path`` before it replies, ``data_delay`` seconds or more
    later; exits when stdin closes.

    Not tests/smtpsink.py with options, because what the crash loop checks
    rests on three things that sink does not do: one random stream, seeded
    by ``--seed``, draws the 451s to ``flaky@`` (20 %), the 451s after DATA
    (3 %) and the extra delays (30 %, up to 20 ms), in the order the
    commands arrive; the ``sync@`` messages the harness sends take none of
    them; and records are lines appended to one file, which the harness
    reads on from where it stopped (`SinkProcess.new_records`) instead of
    listing a directory of thousands of files after each drain.
    """
    import asyncio

    from aiosmtpd.smtp import SMTP

    from smtpsink import serve_until_stdin_closes
    from smtpsink import tcp_listener

    rng = random.Random(seed)
    records = open(records_path, 'a')

    class Handler:
        async def handle_EHLO(self, server, session, envelope, hostname,
                              responses):
            # RFC 2920; aiosmtpd reads pipelined commands as they come.
            session.host_name = hostname
            responses.insert(-1, '250-PIPELINING')
            return responses

        async def handle_RCPT(self, server, session, envelope, address,
                              options):
            if address == FLAKY and rng.random() < 0.2:
                return '451 4.3.0 flaky: try again later'
            envelope.rcpt_tos.append(address)
            return '250 OK'

        async def handle_DATA(self, server, session, envelope):
            sync = envelope.rcpt_tos == [SYNC]
            if not sync and rng.random() < 0.03:
                return '451 4.3.0 not now'
            match = _MESSAGE_ID.search(envelope.original_content)
            records.write(json.dumps({
                'id': match.group(1).decode() if match else None,
                'rcpt': envelope.rcpt_tos}) + '\n')
            records.flush()
            if not sync:
                # Accepted but not yet confirmed: RFC 1047's window, as long
                # as the relay is slow at DATA.
                delay = data_delay
                if rng.random() < 0.3:
                    delay += rng.uniform(0, 0.02)
                await asyncio.sleep(delay)
            return '250 OK accepted'

    sock = tcp_listener()
    loop = asyncio.new_event_loop()
    handler = Handler()
    server = loop.run_until_complete(loop.create_server(
        lambda: SMTP(handler, hostname='crashsink.test'), sock=sock))
    print(sock.getsockname()[1], flush=True)
    try:
        serve_until_stdin_closes(loop, server)
    finally:
        records.close()


class SinkProcess:
    """The sink process, and the records it wrote so far."""

    def __init__(self, directory, seed, data_delay=0.0):
        self.records_path = os.path.join(directory, 'received.jsonl')
        open(self.records_path, 'w').close()
        self.process = subprocess.Popen(
            [sys.executable, HERE, '--sink', self.records_path,
             '--seed', str(seed), '--data-delay-ms', str(data_delay * 1000)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError('the crash sink did not start')
        self.port = int(line)
        self._offset = 0
        self._syncs = 0

    def new_records(self):
        """Records written since the last call (complete lines only)."""
        with open(self.records_path, 'rb') as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b'\n') + 1
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines()]

    def sync(self):
        """Send one message straight to the sink and return when it was
        accepted: connections of killed children it had read before are
        dealt with by then."""
        self._syncs += 1
        with smtplib.SMTP('127.0.0.1', self.port, timeout=30) as smtp:
            smtp.sendmail('harness@example.org', [SYNC],
                          f'Message-Id: <sync-{self._syncs}@test>\r\n\r\n'
                          'sync\r\n')

    def stop(self):
        stop_process(self.process)


# -- the child ----------------------------------------------------------------

class VoteRefused(Exception):
    pass


class RefusingVote:
    """A resource manager whose vote fails, sorting before or after
    mailout's (which sorts as '~mailout:...')."""

    def __init__(self, key):
        self.key = key

    def sortKey(self):
        return self.key

    def abort(self, txn):
        pass

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        raise VoteRefused('this resource manager votes no')

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        pass


def child_main(config_path, iteration, seed):
    """Commit, abort and refuse random transactions, report each step on
    stdout; then idle (the processor keeps delivering) until killed."""
    import transaction

    from mailout import config
    from mailout import factories

    rng = random.Random(seed)
    _, deliveries = factories.build_all(config.load(config_path))
    delivery = deliveries['crash']

    def say(*words):
        os.write(1, (' '.join(words) + '\n').encode())

    counter = iter(range(1, 1 << 30))

    def send_some(count):
        ids = []
        for _ in range(count):
            mid = f'crash-{iteration}-{next(counter)}@test'
            to = [a for a in RECIPIENTS if rng.random() < 0.6] \
                or [RECIPIENTS[0]]
            if rng.random() < 0.3:
                to.append(FLAKY)
            size = rng.choice((0, 0, 0, 0, 0, 0, 0, 2000, 60000, 250000))
            body = ''.join(f'line {i} of {mid}\r\n'
                           for i in range(size // 30 + 1))
            say('send', mid, ','.join(to))
            delivery.send('app@example.org', to,
                          f'From: app@example.org\r\nTo: {", ".join(to)}\r\n'
                          f'Message-Id: <{mid}>\r\n'
                          f'Subject: {mid}\r\n\r\n{body}')
            ids.append(mid)
        return ids

    say('ready')
    for _ in range(rng.randint(1, 40)):
        transaction.begin()
        kind = rng.random()
        ids = send_some(rng.randint(1, 5))
        if kind < 0.6:
            say('commit', *ids)
            transaction.commit()
            say('committed', *ids)
        elif kind < 0.75:
            say('abort', *ids)
            transaction.abort()
        elif kind < 0.87:
            transaction.get().join(RefusingVote(
                rng.choice(('aaa:refuser', '~~~:refuser'))))
            say('doomed', *ids)
            try:
                transaction.commit()
            except VoteRefused:
                transaction.abort()
            else:
                raise AssertionError('the refusing vote did not refuse')
        else:
            savepoint = transaction.savepoint()
            dropped = send_some(rng.randint(1, 3))
            say('rollback', *dropped)
            savepoint.rollback()
            say('commit', *ids)
            transaction.commit()
            say('committed', *ids)
    say('idle')
    threading.Event().wait()


class ChildProcess:
    """A child and the lines it wrote, read as they come."""

    def __init__(self, config_path, iteration, seed, stderr):
        self.process = subprocess.Popen(
            [sys.executable, HERE, '--child', config_path, str(iteration),
             '--seed', str(seed)],
            stdout=subprocess.PIPE, stderr=stderr)
        self.pid = self.process.pid
        self.lines = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        pending = b''
        fd = self.process.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            with self._changed:
                if not data:
                    self._eof = True
                    self._changed.notify_all()
                    return
                pending += data
                *complete, pending = pending.split(b'\n')
                self.lines.extend(line.decode() for line in complete)
                self._changed.notify_all()

    def wait_for(self, word, nth=1, timeout=10):
        """Wait until the ``nth`` line starting with ``word``; False if the
        child ended or the timeout passed first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                seen = sum(1 for line in self.lines
                           if line.split(' ', 1)[0] == word)
                if seen >= nth:
                    return True
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return False
                self._changed.wait(remaining)

    def kill(self):
        """SIGKILL, reap, and return every complete line it wrote."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        returncode = self.process.wait()
        self._reader.join(10)
        self.process.stdout.close()
        return returncode, list(self.lines)


# -- the harness --------------------------------------------------------------

#: How a child's sender threads send: a mode has its own counts.
PIPELINING, NO_PIPELINING = 'pipelining', 'no pipelining'


@dataclasses.dataclass
class ModeCounts:
    """What the kills of the children of one mode found in cur/."""
    kills: int = 0
    claims: int = 0                 # held by the killed children
    most_claims: int = 0            # by one child
    kills_over_threads: int = 0     # a child held more claims than threads
    reply_outstanding: int = 0      # claims whose final dot reached the sink
    most_reply_outstanding: int = 0     # by one child
    commands_or_nothing: int = 0    # claims the sink had no new copy of
    recipients_allowed: int = 0     # one more copy, reply outstanding
    duplicates: int = 0             # extra copies that came (x recipient)

    def text(self):
        return (f'{self.kills} kills, {self.claims} claims held (at most '
                f'{self.most_claims} in one child, more than its sender '
                f'threads at {self.kills_over_threads} kills): '
                f'{self.reply_outstanding} with the end-of-data reply '
                f'outstanding (at most {self.most_reply_outstanding} in one '
                f'child), {self.commands_or_nothing} with commands or nothing'
                f' sent; {self.recipients_allowed} recipients allowed one more'
                f' copy, {self.duplicates} duplicates came')


@dataclasses.dataclass
class Summary:
    iterations: int = 0
    seconds: float = 0.0
    seed: int = 0
    transactions: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    kills_at: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    recovered_by: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    modes: dict = dataclasses.field(default_factory=lambda: {
        PIPELINING: ModeCounts(), NO_PIPELINING: ModeCounts()})
    claims_in_flight: int = 0       # claims held by killed children
    most_claims_at_a_kill: int = 0  # by one child
    recipients_in_flight: int = 0   # their recipients
    tmp_files_at_kill: int = 0      # voted, not finished when killed
    rewrites_at_kill: int = 0       # killed while rewriting a claim
    committed: int = 0              # messages whose commit returned
    committed_delivered: int = 0
    unknown: int = 0                # in the commit that was killed
    unknown_delivered: int = 0
    not_to_send: int = 0            # aborted, refused, rolled back, unfinished
    not_to_send_delivered: int = 0
    recipient_copies: int = 0       # (message, recipient) arrivals in all
    duplicates_in_flight: int = 0   # extra copies of in-flight recipients
    duplicates_other: int = 0
    stuck: int = 0                  # files left after the last drain
    child_errors: int = 0
    failures: list = dataclasses.field(default_factory=list)

    @property
    def failure_kinds(self):
        """How many failures of each kind ("lost", "duplicate", ...)."""
        return collections.Counter(f.split(':', 1)[0] for f in self.failures)

    def text(self):
        t = self.transactions
        k = ', '.join(f'{n} {what}' for what, n in sorted(
            self.kills_at.items(), key=lambda i: -i[1]))
        r = ', '.join(f'{n} by {who}'
                      for who, n in sorted(self.recovered_by.items()))
        lines = [
            f'crash loop: {self.iterations} iterations in '
            f'{self.seconds:.1f} s (seed {self.seed})',
            f'  transactions: {t["commit"]} committed, {t["abort"]} aborted,'
            f' {t["doomed"]} refused in the vote, {t["rollback"]} with a '
            'savepoint rollback',
            f'  kills landed: {k}',
            f'  at the kill: {self.claims_in_flight} claims in flight in cur/'
            f' ({self.recipients_in_flight} recipients; at most '
            f'{self.most_claims_at_a_kill} in one child), '
            f'{self.tmp_files_at_kill} voted files in tmp/, '
            f'{self.rewrites_at_kill} claim rewrites in tmp/',
            *(f'  {mode}: {counts.text()}'
              for mode, counts in self.modes.items()),
            f'  recovery: {r}',
            f'  messages committed (commit returned): {self.committed}, '
            f'delivered: {self.committed_delivered}',
            f'  messages in the commit that was killed: {self.unknown}, '
            f'delivered: {self.unknown_delivered}, not delivered: '
            f'{self.unknown - self.unknown_delivered}',
            f'  messages aborted/refused/rolled back/unfinished: '
            f'{self.not_to_send}, not delivered: '
            f'{self.not_to_send - self.not_to_send_delivered}',
            f'  copies received (message x recipient): '
            f'{self.recipient_copies}',
            f'  duplicates: {self.duplicates_in_flight} of messages whose '
            'end-of-data reply was outstanding at a kill (RFC 1047 window, '
            f'allowed), {self.duplicates_other} other',
            f'  stuck in the queue after the last drain: {self.stuck}',
            f'  child errors logged: {self.child_errors}',
            f'  failures: {len(self.failures)}' + (' (' + ', '.join(
                f'{n} {kind}' for kind, n in self.failure_kinds.items())
                + ')' if self.failures else ''),
        ]
        lines += [f'    {f}' for f in self.failures[:30]]
        if len(self.failures) > 30:
            lines.append(f'    ... and {len(self.failures) - 30} more')
        return '\n'.join(lines)


CONFIG = '''<mailout>
<smtp-mailer relay>
  host 127.0.0.1:{port}
  tls none
  timeout 10s
  pipelining {pipelining}
</smtp-mailer>
<queued-delivery crash>
  mailer relay
  queue-path {queue}
  connections {connections}
  poll-interval 0.05s
  min-backoff 1s
  max-backoff 2s
</queued-delivery>
</mailout>
'''


@dataclasses.dataclass(frozen=True)
class Mode:
    """A child's config: its sender threads and whether they pipeline."""
    connections: int
    pipelining: bool

    @property
    def name(self):
        return PIPELINING if self.pipelining else NO_PIPELINING

    @property
    def most_claims(self):
        """Claims a child may hold: two a thread with pipelining."""
        return self.connections * (2 if self.pipelining else 1)


class CrashLoop:

    def __init__(self, directory, seed, max_delay=0.06, harness_share=0.7,
                 verbose=False, connections=8, data_delay=0.01):
        self.directory = directory
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_delay = max_delay
        self.connections = connections      # sender threads of a child
        self.data_delay = data_delay        # the sink's at the final dot
        self.harness_share = harness_share
        self.verbose = verbose
        self.queue_path = os.path.join(directory, 'queue')
        self.status = {}        # message id -> state (see _absorb)
        self.rcpts = {}         # message id -> recipients
        self.groups = {}        # message id -> the ids of its transaction
        self.allowed = collections.Counter()    # (id, rcpt) -> extra copies
        self.allowed_by = collections.defaultdict(list)  # ... -> their modes
        self.arrived = collections.Counter()    # (id, rcpt) -> copies
        self.summary = Summary(seed=seed)
        self._reported = set()

    def run(self, iterations):
        started = time.monotonic()
        self.sink = SinkProcess(self.directory, self.seed, self.data_delay)
        try:
            # A child has 1 or self.connections sender threads, pipelining
            # or not; the first config serves the harness's own drain (one
            # thread, pipelining).
            self.configs = {}
            for n in (1, self.connections):
                for pipelining in (True, False):
                    mode = Mode(n, pipelining)
                    self.configs[self._write_config(mode)] = mode
            from mailout import config
            from mailout import factories
            _, deliveries = factories.build_all(
                config.load(next(iter(self.configs))))
            self.delivery = deliveries['crash']
            self.queue = self.delivery.queue
            self.processor = self.delivery.processor
            for iteration in range(1, iterations + 1):
                self.iteration(iteration, last=iteration == iterations)
                self.summary.iterations = iteration
            time.sleep(0.2)     # stragglers of killed connections
            self.drain()
            self.check(final=True)
        finally:
            self.sink.stop()
            self.processor.mailer.close()
        self.summary.seconds = time.monotonic() - started
        return self.summary

    def _write_config(self, mode):
        path = os.path.join(
            self.directory, f'crash-{mode.connections}'
            f'{"-pipelining" if mode.pipelining else ""}.conf')
        with open(path, 'w') as f:
            f.write(CONFIG.format(
                port=self.sink.port, queue=self.queue_path,
                connections=mode.connections,
                pipelining='on' if mode.pipelining else 'off'))
        return path

    def iteration(self, n, last=False):
        stderr_path = os.path.join(self.directory, 'child-stderr.txt')
        config_path = self.rng.choice(list(self.configs))
        mode = self.configs[config_path]
        with open(stderr_path, 'wb') as stderr:
            child = ChildProcess(config_path, n,
                                 self.rng.randrange(1 << 32), stderr)
        if not child.wait_for('ready', timeout=30):
            returncode, lines = child.kill()
            self.fail(f'child: iteration {n}: the child did not start '
                      f'(exit {returncode}): {_tail(stderr_path)}')
            return
        how = self.rng.random()
        if how < 0.5:
            time.sleep(self.rng.uniform(0, self.max_delay))
        else:
            word = 'commit' if how < 0.8 else 'committed'
            child.wait_for(word, self.rng.randint(1, 6), timeout=1)
            time.sleep(self.rng.uniform(0, 0.003))
        returncode, lines = child.kill()
        if returncode != -signal.SIGKILL:
            self.fail(f'child: iteration {n}: the child ended by itself (exit '
                      f'{returncode}): {_tail(stderr_path)}')
        with open(stderr_path, 'rb') as f:
            errors = f.read().decode('utf-8', 'replace')
        if 'Traceback' in errors or 'ERROR' in errors \
                or 'unexpected error' in errors:
            self.summary.child_errors += 1
            self.fail(f'child: iteration {n}: the child logged an error: '
                      f'{errors[-2000:]}')
        self._absorb(lines)
        self._look_at_queue_after_kill(child.pid, n, mode)
        if last or self.rng.random() < self.harness_share:
            self.summary.recovered_by['the harness'] += 1
            self.drain()
            self.check(final=True)
        else:
            self.summary.recovered_by['the next child'] += 1
            self.check(final=False)
        if self.verbose:
            print(f'iteration {n} ({mode.connections} thread(s), '
                  f'{mode.name}): {len(lines)} lines, '
                  f'{len(self.summary.failures)} failures', flush=True)

    def _absorb(self, lines):
        """Update each message's state from what the killed child said."""
        last = 'nothing'
        for line in lines:
            word, *args = line.split(' ')
            last = word
            if word == 'send':
                self.status[args[0]] = 'unfinished'
                self.rcpts[args[0]] = tuple(args[1].split(','))
            elif word == 'commit':
                self.status.update(dict.fromkeys(args, 'unknown'))
                self.groups.update(dict.fromkeys(args, tuple(args)))
            elif word == 'committed':
                self.status.update(dict.fromkeys(args, 'committed'))
                self.summary.transactions['commit'] += 1
            elif word == 'abort':
                self.status.update(dict.fromkeys(args, 'aborted'))
                self.summary.transactions['abort'] += 1
            elif word == 'doomed':
                self.status.update(dict.fromkeys(args, 'doomed'))
                self.summary.transactions['doomed'] += 1
            elif word == 'rollback':
                self.status.update(dict.fromkeys(args, 'rolledback'))
                self.summary.transactions['rollback'] += 1
        self.summary.kills_at[{
            'nothing': 'before ready', 'ready': 'before the first send',
            'send': 'in or after send()', 'commit': 'inside commit',
            'committed': 'after a commit', 'abort': 'in abort',
            'doomed': 'in a refused commit', 'rollback': 'in a rollback',
            'idle': 'while idle (processor working)'}[last]] += 1

    def _look_at_queue_after_kill(self, pid, n, mode):
        """Sort the claims the dead child held by what the sink has (after
        a `SinkProcess.sync`: it has read all the child sent): a recipient
        with a copy beyond the extra copies allowed so far got this
        claim's message, whose end-of-data reply was outstanding, and may
        get one more copy; a claim with no such recipient had its commands
        or nothing sent, and gets no more.  A child holds at most one claim
        of the first kind a sender thread, and at most one claim a thread
        without pipelining, two with.  Count its unfinished writes."""
        from mailout.queue import names
        self._receive()
        counts = self.summary.modes[mode.name]
        counts.kills += 1
        held = outstanding = 0
        for name in os.listdir(os.path.join(self.queue_path, 'cur')):
            claim = names.Claim.parse(name)
            if claim is None or claim.pid != pid:
                continue
            try:
                mid, toaddrs = _read_queue_file(
                    os.path.join(self.queue_path, 'cur', name))
            except FileNotFoundError:
                continue
            held += 1
            self.summary.claims_in_flight += 1
            self.summary.recipients_in_flight += len(toaddrs)
            got = [to for to in toaddrs
                   if self.arrived[mid, to] > self.allowed[mid, to]]
            counts.recipients_allowed += len(got)
            for to in got:
                self.allowed[mid, to] += 1
                self.allowed_by[mid, to].append(mode.name)
            if got:
                outstanding += 1
                counts.reply_outstanding += 1
            else:
                counts.commands_or_nothing += 1
        counts.claims += held
        counts.most_claims = max(counts.most_claims, held)
        counts.most_reply_outstanding = max(counts.most_reply_outstanding,
                                            outstanding)
        counts.kills_over_threads += held > mode.connections
        self.summary.most_claims_at_a_kill = max(
            self.summary.most_claims_at_a_kill, held)
        if held > mode.most_claims:
            self.fail(f'claims: iteration {n}: the killed child held {held} '
                      f'claims with {mode.connections} sender thread(s), '
                      f'{mode.name}', key=('claims', n))
        if outstanding > mode.connections:
            self.fail(f'claims: iteration {n}: the killed child held '
                      f'{outstanding} claims whose end-of-data reply was '
                      f'outstanding with {mode.connections} sender '
                      f'thread(s), {mode.name}', key=('outstanding', n))
        for name in os.listdir(os.path.join(self.queue_path, 'tmp')):
            entry = names.in_tmp(name)
            if isinstance(entry, names.Rewrite):
                if entry.claim.pid == pid:
                    self.summary.rewrites_at_kill += 1
            elif isinstance(entry, names.TmpMessage) \
                    and entry.writer.pid == pid:
                self.summary.tmp_files_at_kill += 1

    def drain(self):
        """Recover and deliver everything queued, in this process."""
        q = self.queue
        for _ in range(200):
            q.recover()
            q.promote_due(now=time.time() + 1e9)
            try:
                self.processor.run_once()
            except Exception as e:
                self.fail(f'queue: run_once raised {e!r}')
                break
            if not any(os.listdir(os.path.join(q.path, area))
                       for area in ('new', 'cur', 'deferred')):
                break
        else:
            self.fail('queue: the queue did not drain: ' + ', '.join(
                f'{area}: {q.count(area)}'
                for area in ('new', 'cur', 'deferred')))
        if q.count('failed'):
            self.fail(f'queue: {q.count("failed")} message(s) in failed/: '
                      f'{os.listdir(os.path.join(q.path, "failed"))[:5]}')
        if q.count('tmp'):
            self.fail(f'queue: tmp/ not cleaned by recovery: '
                      f'{os.listdir(os.path.join(q.path, "tmp"))[:5]}')
        self.summary.stuck = sum(q.count(area) for area in (
            'new', 'cur', 'deferred', 'failed', 'tmp'))

    def _receive(self):
        """Count the copies the sink received so far (all a killed child
        sent included: `SinkProcess.sync`)."""
        self.sink.sync()
        for record in self.sink.new_records():
            if record['id'] and record['id'].startswith('crash-'):
                for to in record['rcpt']:
                    self.arrived[record['id'], to] += 1

    def check(self, final):
        """Compare what arrived with what the children said.  Only after a
        drain (``final``) must every committed message have arrived."""
        if final:
            self._receive()     # the copies the drain sent
        s = self.summary
        for counts in s.modes.values():
            counts.duplicates = 0
        s.committed = s.committed_delivered = s.unknown = \
            s.unknown_delivered = s.not_to_send = s.not_to_send_delivered \
            = s.recipient_copies = s.duplicates_in_flight \
            = s.duplicates_other = 0
        known = set()
        for mid, state in self.status.items():
            copies = [self.arrived[mid, to] for to in self.rcpts[mid]]
            known.update((mid, to) for to in self.rcpts[mid])
            s.recipient_copies += sum(copies)
            if state == 'committed':
                s.committed += 1
                s.committed_delivered += all(copies)
                if final and not all(copies):
                    self.fail(f'lost: {mid} (commit returned) never arrived'
                              f' for {self._missing(mid)}', key=('lost', mid))
            elif state == 'unknown':
                s.unknown += 1
                s.unknown_delivered += any(copies)
            else:
                s.not_to_send += 1
                s.not_to_send_delivered += any(copies)
                if any(copies):
                    self.fail(f'sent uncommitted: {mid} arrived though its '
                              f'transaction did not commit ({state})',
                              key=('sent', mid))
            for to in self.rcpts[mid]:
                extra = self.arrived[mid, to] - 1
                if extra <= 0:
                    continue
                allowed = min(extra, self.allowed[mid, to])
                s.duplicates_in_flight += allowed
                s.duplicates_other += extra - allowed
                for mode in self.allowed_by[mid, to][:allowed]:
                    s.modes[mode].duplicates += 1
                if extra > allowed:
                    self.fail(f'duplicate: {mid} arrived {extra + 1} times '
                              f'for {to}, its end-of-data reply outstanding '
                              f'at {self.allowed[mid, to]} kill(s)',
                              key=('dup', mid, to))
            if final and state == 'unknown' and any(copies) \
                    and not all(copies):
                self.fail(f'partly delivered: {mid} ({state}) arrived for '
                          f'some recipients only, missing '
                          f'{self._missing(mid)}', key=('partly', mid))
        if final:
            self._check_atomicity()
        for key, copies in self.arrived.items():
            if key not in known:
                self.fail(f'unexpected: {key} arrived x{copies}',
                          key=('unexpected',) + key)

    def _check_atomicity(self):
        # The commit a child was killed in may have happened or not, but
        # for all its messages alike: one arrived, so the transaction
        # reached tpc_finish (every resource manager voted yes, a ZODB
        # storage before mailout's finished) and the others must arrive.
        for mid, state in self.status.items():
            if state != 'unknown' or any(
                    self.arrived[mid, to] for to in self.rcpts[mid]):
                continue
            arrived = [other for other in self.groups[mid]
                       if any(self.arrived[other, to]
                              for to in self.rcpts[other])]
            if arrived:
                self.fail(f'partial commit: {mid} never arrived, though '
                          f'{arrived} of its transaction (the commit that was '
                          'killed) did',
                          key=('lost', mid))

    def _missing(self, mid):
        return [to for to in self.rcpts[mid] if not self.arrived[mid, to]]

    def fail(self, text, key=None):
        if key is None and text.startswith('queue:'):
            key = text
        if key is not None:
            if key in self._reported:
                return
            self._reported.add(key)
        self.summary.failures.append(text)
        if self.verbose:
            print('FAILURE:', text, flush=True)


def _read_queue_file(path):
    """(message id, recipients) of a queue file."""
    with open(path, 'rb') as f:
        data = f.read()
    envelope, _, message = data.partition(b'\r\n\r\n')
    toaddrs = [line.split(b': ', 1)[1].decode()
               for line in envelope.split(b'\r\n')
               if line.startswith(b'X-Mailout-To: ')]
    match = _MESSAGE_ID.search(message)
    return (match.group(1).decode() if match else None), toaddrs


def _tail(path, size=2000):
    try:
        with open(path, 'rb') as f:
            return f.read()[-size:].decode('utf-8', 'replace')
    except OSError as e:
        return str(e)


def run(iterations, seed=None, directory=None, verbose=False, **options):
    """Run the crash loop; return its `Summary`."""
    seed = random.randrange(1 << 32) if seed is None else seed
    own = directory is None
    directory = directory or tempfile.mkdtemp(prefix='mailout-crash-')
    try:
        return CrashLoop(directory, seed, verbose=verbose,
                         **options).run(iterations)
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--iterations', type=int, default=200)
    parser.add_argument('--seed', type=int)
    parser.add_argument('--max-delay-ms', type=float, default=60,
                        help='longest random delay before the kill')
    parser.add_argument('--connections', type=int, default=8,
                        help='sender threads of a child (or 1, at random; '
                             'pipelining on or off, at random)')
    parser.add_argument('--data-delay-ms', type=float, default=10,
                        help='how long the sink takes to answer the final '
                             'dot (slow at DATA)')
    parser.add_argument('--dir', help='work here and keep the files')
    parser.add_argument('-v', '--verbose', action='store_true')
    parser.add_argument('--sink', metavar='RECORDS', help=argparse.SUPPRESS)
    parser.add_argument('--child', nargs=2, metavar=('CONFIG', 'ITERATION'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        return sink_main(args.sink, args.seed, args.data_delay_ms / 1000)
    if args.child:
        return child_main(args.child[0], int(args.child[1]), args.seed)
    import logging
    logging.getLogger('mailout').addHandler(logging.NullHandler())
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    summary = run(args.iterations, args.seed, args.dir, args.verbose,
                  max_delay=args.max_delay_ms / 1000,
                  connections=args.connections,
                  data_delay=args.data_delay_ms / 1000)
    print(summary.text())
    return 1 if summary.failures else 0


if __name__ == '__main__':
    sys.exit(main())
