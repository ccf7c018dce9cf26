#!/usr/bin/env python
"""The mailout benchmark suite: mailout against the practical limits of
this machine and against zope.sendmail, in one run.

    .venv/bin/python bench/run.py            # the full run (<= 10 minutes)
    .venv/bin/python bench/run.py --quick    # a short run (<= 2 minutes)
    .venv/bin/python bench/run.py --smoke    # seconds; for tests/test_bench.py
    .venv/bin/python bench/run.py --only drain --settings loopback --reps 9
    .venv/bin/python bench/run.py --mailer-option 'messages-per-connection 999'

Every SMTP figure is measured against bench/sink.py, a separate process on
127.0.0.1 that counts messages and stamps their arrival.  Disk and CPU
timings swing several-fold within minutes on shared machines, so each
section runs its systems interleaved (A B C A B C ..., the order rotated
each repetition; enqueue even takes turns every 100 messages), each ratio is
taken between figures of the same repetition, and the table shows medians.

Sections (``--only``):

drain     a queue of ~2 KB messages drained by: raw smtplib over 1 and over
          N connections (the limit: connections opened once, no disk),
          zope.sendmail's QueueProcessorThread + SMTPMailer (interval 3 s
          and 0), mailout's processor with 1 and N connections; in three
          network settings: plain loopback, STARTTLS required (trustme
          certificate, verified by the client through ca-file), 10 ms delay
          on every reply.  msg/s is the steady rate from the first to the
          last arrival; "1st msg" is start -> first arrival; "CPU/msg" is
          the benchmark process's CPU (the system under test; the harness
          idles), "sink CPU" the sink's.
enqueue   messages through QueuedDelivery.send + transaction.commit(), 1 and
          100 a transaction (processor off), against the disk floor (write +
          fsync + rename, with and without a directory fsync after each
          message), and zope.sendmail's QueuedMailDelivery (no fsync at all).
latency   commit -> arrival at the sink of single messages, processor
          running, a message every 5-15 ms (p50/p99); and mailout with gaps
          longer than its poll interval, when it has let the relay go.
bigqueue  a 100,000 message queue: time from processor start until the
          first message arrives, and the processor's peak RSS (VmHWM) above
          the interpreter's baseline (VmRSS after imports and set-up), in a
          child process.
"""
import argparse
import contextlib
import json
import os
import random
import shutil
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
FROM = 'bench@example.org'
TO = ('sink@example.org',)
SECTIONS = ('drain', 'enqueue', 'latency', 'bigqueue')

# -- messages -----------------------------------------------------------------

_BODY = b''.join(
    b'Line %02d of a transactional message: your order has shipped, '
    b'thank you.\r\n' % i for i in range(24))


def make_message(i):
    """A ~2 KB message with CRLF line endings that mailout's `prepare`
    passes through unchanged (it has a Message-Id and a Date)."""
    return (b'Message-Id: <bench.%d@example.org>\r\n'
            b'Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n'
            b'From: Shop <bench@example.org>\r\n'
            b'To: Customer <sink@example.org>\r\n'
            b'Subject: Your order %d\r\n'
            b'X-Bench-Id: %d\r\n'
            b'MIME-Version: 1.0\r\n'
            b'Content-Type: text/plain; charset=utf-8\r\n'
            b'\r\n' % (i, i, i)) + _BODY


# -- the sink process ---------------------------------------------------------

class Child:
    """A helper process that prints ``PORT CONTROL_PORT [PID]`` and then
    answers one line per command line; it exits when its stdin closes."""

    def __init__(self, argv, what):
        self.what = what
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise RuntimeError(f'{what} did not start')
        words = [int(w) for w in line.split()]
        self.port, self.control_port = words[:2]
        #: The process that does the server's work (smtp-sink itself).
        self.pid = words[2] if len(words) > 2 else self.process.pid
        self._control = socket.create_connection(
            ('127.0.0.1', self.control_port))
        self._file = self._control.makefile('rw', encoding='ascii')

    def command(self, line):
        self._file.write(line + '\n')
        self._file.flush()
        return self._file.readline().strip()

    def stop(self):
        with contextlib.suppress(OSError):
            self._file.close()
            self._control.close()
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Sink(Child):
    """bench/sink.py in a child process, and its control channel."""

    def __init__(self, *options):
        self.options = options
        super().__init__([sys.executable, os.path.join(HERE, 'sink.py'),
                          *options], f'the sink {options}')

    def reset(self):
        self.command('RESET')

    def wait(self, n, timeout):
        """Wait for ``n`` messages; return (count, first_ns, last_ns,
        connections)."""
        return tuple(map(int, self.command(f'WAIT {n} {timeout}').split()))

    def stamps(self):
        return {int(k): v for k, v in json.loads(self.command('STAMPS'))
                .items()}

    def duplicates(self):
        return int(self.command('DUPLICATES'))


def wait_control(control_port, n, timeout):
    """WAIT on a sink's control channel from another process."""
    with socket.create_connection(('127.0.0.1', control_port)) as s:
        f = s.makefile('rw', encoding='ascii')
        f.write(f'WAIT {n} {timeout}\n')
        f.flush()
        return tuple(map(int, f.readline().split()))


# -- network settings ---------------------------------------------------------

class Setting:
    """How the sink runs and how each client reaches it."""

    def __init__(self, name, title, sink_options=(), starttls=False,
                 ca_file=None):
        self.name = name
        self.title = title
        self.sink_options = tuple(sink_options)
        self.starttls = starttls
        self.ca_file = ca_file

    def raw_connect(self, port):
        connection = smtplib.SMTP('127.0.0.1', port, timeout=60)
        connection.ehlo()
        if self.starttls:
            connection.starttls(
                context=ssl.create_default_context(cafile=self.ca_file))
            connection.ehlo()
        return connection

    def mailout_lines(self):
        if self.starttls:
            return f'tls starttls\n    ca-file {self.ca_file}'
        return 'tls none'

    def zope_mailer(self, port):
        from zope.sendmail.mailer import SMTPMailer
        # zope.sendmail's mailer takes no TLS context: its STARTTLS does
        # not verify the certificate (so it does less work than mailout).
        return SMTPMailer('127.0.0.1', port, force_tls=self.starttls,
                          no_tls=not self.starttls, timeout=60)


def make_certificate(directory):
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert('127.0.0.1', 'localhost')
    paths = {name: os.path.join(directory, name + '.pem')
             for name in ('ca', 'cert', 'key')}
    ca.cert_pem.write_to_path(paths['ca'])
    cert.private_key_pem.write_to_path(paths['key'])
    with open(paths['cert'], 'wb') as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return paths


# -- queues -------------------------------------------------------------------

def mailout_config(queue_path, port, setting=None, connections=1,
                   processor=True, mailer_extra=''):
    tls = setting.mailout_lines() if setting else 'tls none'
    return f"""
<mailout>
  <smtp-mailer relay>
    host 127.0.0.1
    port {port}
    {tls}
    timeout 60s
    {mailer_extra}
  </smtp-mailer>
  <queued-delivery bench>
    mailer relay
    queue-path {queue_path}
    connections {connections}
    processor {'on' if processor else 'off'}
  </queued-delivery>
</mailout>
"""


def mailout_delivery(queue_path, port, setting=None, connections=1,
                     processor=True, mailer_extra=''):
    from mailout import config
    from mailout import factories
    os.makedirs(queue_path, exist_ok=True)
    settings = config.loads(mailout_config(queue_path, port, setting,
                                           connections, processor,
                                           mailer_extra))
    _, deliveries = factories.build_all(settings)
    return deliveries['bench']


def make_mailout_template(path, n):
    """A mailout queue of ``n`` messages (ids 0..n-1, oldest first),
    written with mailout's own Queue.write + commit; fsync is skipped,
    as this queue is only ever hard-linked from."""
    from mailout.message import Envelope
    from mailout.queue import Queue
    queue = Queue.open(path)
    with mock.patch('os.fsync'):
        for start in range(0, n, 1000):
            names = [queue.write(Envelope(FROM, TO, make_message(i),
                                          f'bench.{i}@example.org'))
                     for i in range(start, min(n, start + 1000))]
            queue.commit(names)
    return path


def make_zope_template(path, n):
    """A zope.sendmail queue (Maildir) of ``n`` messages, files as
    zope.sendmail's QueuedMailDelivery writes them."""
    for area in ('cur', 'new', 'tmp'):
        os.makedirs(os.path.join(path, area), exist_ok=True)
    head = b'X-Zope-From: %s\nX-Zope-To: %s\n' % (
        FROM.encode(), ', '.join(TO).encode())
    now = int(time.time()) - n
    for i in range(n):
        name = os.path.join(path, 'new', f'{now}.{os.getpid()}.bench.{i:07d}')
        with open(name, 'wb') as f:
            f.write(head + make_message(i))
        os.utime(name, (now + i, now + i))     # zope sorts by mtime
    return path


def link_queue(template, path, n, areas):
    """A fresh queue at ``path`` holding the first ``n`` messages of
    ``template``, hard-linked (same names, same bytes, no copying)."""
    for area in areas:
        os.makedirs(os.path.join(path, area), mode=0o700, exist_ok=True)
    names = sorted(os.listdir(os.path.join(template, 'new')))[:n]
    if len(names) < n:
        raise RuntimeError(f'template {template} has only {len(names)}')
    for name in names:
        os.link(os.path.join(template, 'new', name),
                os.path.join(path, 'new', name))
    return path


MAILOUT_AREAS = ('tmp', 'new', 'cur', 'deferred', 'failed')
ZOPE_AREAS = ('tmp', 'new', 'cur')


# -- the measurements ---------------------------------------------------------

def process_cpu(pid):
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class Drain:
    """One drain: n messages, when it started, what the sink saw."""

    def __init__(self, sink, n):
        self.sink, self.n = sink, n
        sink.reset()
        self.sink_cpu = process_cpu(sink.process.pid)
        self.cpu = time.process_time()
        self.t0 = time.monotonic_ns()

    def finish(self, timeout):
        count, first, last, connections = self.sink.wait(self.n, timeout)
        self.cpu = time.process_time() - self.cpu
        self.sink_cpu = process_cpu(self.sink.process.pid) - self.sink_cpu
        self.count, self.connections = count, connections
        self.first_s = (first - self.t0) / 1e9      # start -> 1st arrival
        self.total_s = (last - self.t0) / 1e9       # start -> last arrival
        # The steady rate: first to last arrival.  Start-up (threads,
        # connections) shows in first_s; on small counts it would swamp
        # the rate.
        steady = (last - first) / 1e9
        self.rate = (count - 1) / steady if count > 1 and steady > 0 \
            else count / max(self.total_s, 1e-9)
        return self


class Bench:

    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.counter = 0
        self.zope_threads = []
        self.warnings = []
        self.templates = {}
        self.mailer_extra = '\n    '.join(args.mailer_option or ())

    def fresh(self, label):
        self.counter += 1
        return os.path.join(self.workdir, f'{label}-{self.counter}')

    def warn(self, text):
        self.warnings.append(text)
        print('  WARNING:', text, file=sys.stderr, flush=True)

    def log(self, text):
        if not self.args.quiet:
            print(text, file=sys.stderr, flush=True)

    def template(self, kind, n):
        have = self.templates.get(kind)
        if have is None or have[1] < n:
            path = self.fresh(f'template-{kind}')
            t = time.monotonic()
            if kind == 'mailout':
                make_mailout_template(path, n)
            else:
                make_zope_template(path, n)
            self.log(f'  (made a {kind} template queue of {n} messages in '
                     f'{time.monotonic() - t:.1f} s)')
            if have is not None:
                shutil.rmtree(have[0], ignore_errors=True)
            self.templates[kind] = have = (path, n)
        return have[0]

    def check(self, drain, what):
        duplicates = drain.sink.duplicates()
        if drain.count != drain.n or duplicates:
            self.warn(f'{what}: the sink got {drain.count} messages of '
                      f'{drain.n}, {duplicates} duplicate(s)')

    def timeout(self, n):
        return max(60, n * 0.3)

    # -- drain --------------------------------------------------------------

    def drain_raw(self, setting, sink, n, connections):
        """The limit: smtplib, each connection opened once, no disk."""
        def send(part):
            connection = setting.raw_connect(sink.port)
            for message in part:
                connection.sendmail(FROM, TO, message)
            connection.quit()
        return self.drain_by_clients(send, sink, n, connections,
                                     'raw smtplib')

    def drain_by_clients(self, send, sink, n, connections, what):
        """``n`` messages sent by ``send(messages)`` in as many threads as
        ``connections``, each its share (no disk): the drain."""
        messages = [make_message(i) for i in range(n)]
        errors = []

        def client(part):
            try:
                send(part)
            except Exception as e:          # reported, not hidden
                errors.append(e)

        threads = [threading.Thread(target=client,
                                    args=(messages[k::connections],))
                   for k in range(connections)]
        drain = Drain(sink, n)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        drain.finish(self.timeout(n))
        if errors:
            self.warn(f'{what}: {errors[0]!r}')
        self.check(drain, f'{what} x{connections}')
        return drain

    def drain_mailout(self, setting, sink, n, connections):
        path = link_queue(self.template('mailout', n),
                          self.fresh('mailout-drain'), n, MAILOUT_AREAS)
        delivery = mailout_delivery(path, sink.port, setting, connections,
                                    mailer_extra=self.mailer_extra)
        processor = delivery.processor
        drain = Drain(sink, n)
        processor.start()
        drain.finish(self.timeout(n))
        processor.stop()
        self.check(drain, f'mailout x{connections}')
        queue = delivery.queue
        left = sum(queue.count(a) for a in ('new', 'cur'))
        if left or queue.count('deferred') or queue.count('failed'):
            self.warn(f'mailout x{connections}: {left} left in the queue, '
                      f'{queue.count("deferred")} deferred, '
                      f'{queue.count("failed")} failed')
        shutil.rmtree(path, ignore_errors=True)
        return drain

    def zope_processor(self, path, mailer, interval):
        from zope.sendmail.queue import QueueProcessorThread
        thread = QueueProcessorThread(interval=interval)
        thread.setMailer(mailer)
        thread.setQueuePath(path)
        self.zope_threads.append(thread)
        return thread

    def stop_zope(self, thread):
        thread.stop()
        # With interval 3 the thread sleeps up to 3 s before it sees the
        # flag; it is a daemon, idle, and its directory stays until the end.
        thread.join(1 if thread.interval < 0.5 else 0)

    def drain_zope(self, setting, sink, n, interval):
        path = link_queue(self.template('zope', n), self.fresh('zope-drain'),
                          n, ZOPE_AREAS)
        thread = self.zope_processor(path, setting.zope_mailer(sink.port),
                                     interval)
        drain = Drain(sink, n)
        thread.start()
        drain.finish(self.timeout(n))
        self.stop_zope(thread)
        self.check(drain, f'zope.sendmail interval {interval}')
        return drain

    # -- enqueue ------------------------------------------------------------
    #
    # Each enqueuer is set up once a repetition and then called for chunks
    # of messages, the systems taking turns chunk by chunk: the disk's
    # mood swings within seconds, so they all see the same disk.

    def enqueuer_floor(self, dirsync):
        path = self.fresh('floor')
        tmp, new = os.path.join(path, 'tmp'), os.path.join(path, 'new')
        os.makedirs(tmp)
        os.makedirs(new)
        counter = iter(range(10 ** 9))

        def chunk(messages):
            for message in messages:
                # The bytes of a mailout queue file.
                data = b'X-Mailout-From: %s\r\nX-Mailout-To: %s\r\n\r\n%s' \
                    % (FROM.encode(), TO[0].encode(), message)
                name = f'{next(counter)}.bench'
                fd = os.open(os.path.join(tmp, name),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                os.rename(os.path.join(tmp, name), os.path.join(new, name))
                if dirsync:
                    fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
                    os.fsync(fd)
                    os.close(fd)

        def count():
            return len(os.listdir(new))
        return chunk, count, path

    def enqueuer_delivery(self, delivery, per_txn, path):
        import transaction

        def chunk(messages):
            transaction.abort()
            for start in range(0, len(messages), per_txn):
                for message in messages[start:start + per_txn]:
                    delivery.send(FROM, TO, message)
                transaction.commit()

        def count():
            return len(os.listdir(os.path.join(path, 'new')))
        return chunk, count, path

    def enqueuer(self, system):
        kind, per_txn = system.rsplit('_', 1)
        if kind == 'floor':
            return self.enqueuer_floor(per_txn == 'dirsync')
        per_txn = int(per_txn)
        if kind == 'mailout':
            path = self.fresh('mailout-enqueue')
            delivery = mailout_delivery(path, 25, processor=False)
        else:
            from zope.sendmail.delivery import QueuedMailDelivery
            path = self.fresh('zope-enqueue')
            for area in ZOPE_AREAS:
                os.makedirs(os.path.join(path, area))
            delivery = QueuedMailDelivery(path)
        return self.enqueuer_delivery(delivery, per_txn, path)

    def enqueue_round(self, systems, n, chunk_size):
        """Enqueue ``n`` messages with each system, chunk by chunk in
        turns; return {system: msg/s}."""
        enqueuers = {s: self.enqueuer(s) for s in systems}
        elapsed = dict.fromkeys(systems, 0.0)
        messages = [make_message(i) for i in range(n)]
        for k, start in enumerate(range(0, n, chunk_size)):
            part = messages[start:start + chunk_size]
            for system in rotated(systems, k):
                t0 = time.perf_counter()
                enqueuers[system][0](part)
                elapsed[system] += time.perf_counter() - t0
        for system, (_, count, path) in enqueuers.items():
            if count() != n:
                self.warn(f'enqueue {system}: {count()} queued of {n}')
            shutil.rmtree(path, ignore_errors=True)
        return {s: n / t for s, t in elapsed.items()}

    # -- latency ------------------------------------------------------------

    def latency(self, sink, send, start, stop, settle, duration=None,
                gaps=(0.005, 0.015), count=None):
        """Commit single messages ``send(i)`` with random gaps, for
        ``duration`` seconds or ``count`` messages, the processor running;
        return the commit->arrival latencies (ms) and commit times (ms)."""
        rng = random.Random(4711)
        start()
        time.sleep(0.2)                 # let the processor settle
        sink.reset()
        committed, commits = [], []
        deadline = time.monotonic() + (duration or 1e9)
        i = 0
        while time.monotonic() < deadline and (count is None or i < count):
            time.sleep(rng.uniform(*gaps))
            t = time.monotonic_ns()
            send(i)
            done = time.monotonic_ns()
            committed.append(done)
            commits.append((done - t) / 1e6)
            i += 1
        count, _, _, _ = sink.wait(i, settle + 30)
        stop()
        duplicates = sink.duplicates()
        if count != i or duplicates:
            self.warn(f'latency: the sink got {count} messages of {i}, '
                      f'{duplicates} duplicate(s)')
        stamps = sink.stamps()
        latencies = [(stamps[k] - committed[k]) / 1e6
                     for k in range(i) if k in stamps]
        return latencies, commits

    def latency_mailout(self, sink, **kw):
        import transaction
        path = self.fresh('mailout-latency')
        delivery = mailout_delivery(path, sink.port,
                                    mailer_extra=self.mailer_extra)
        transaction.abort()

        def send(i):
            delivery.send(FROM, TO, make_message(i))
            transaction.commit()
        result = self.latency(sink, send, delivery.processor.start,
                              delivery.processor.stop, 1, **kw)
        shutil.rmtree(path, ignore_errors=True)
        return result

    def latency_zope(self, sink, interval, **kw):
        import transaction
        from zope.sendmail.delivery import QueuedMailDelivery
        path = self.fresh('zope-latency')
        for area in ZOPE_AREAS:
            os.makedirs(os.path.join(path, area))
        delivery = QueuedMailDelivery(path)
        thread = self.zope_processor(path, Setting('', '').zope_mailer(
            sink.port), interval)
        transaction.abort()

        def send(i):
            delivery.send(FROM, TO, make_message(i))
            transaction.commit()
        return self.latency(sink, send, thread.start,
                            lambda: self.stop_zope(thread), interval, **kw)

    # -- bigqueue -----------------------------------------------------------

    def bigqueue(self, sink, system, n, stop_after):
        kind = 'mailout' if system == 'mailout' else 'zope'
        template = self.template(kind, n)
        path = self.fresh(f'{kind}-big')
        t = time.monotonic()
        link_queue(template, path, n,
                   MAILOUT_AREAS if kind == 'mailout' else ZOPE_AREAS)
        self.log(f'    (linked {n} files in {time.monotonic() - t:.1f} s)')
        sink.reset()
        spec = dict(system=system, path=path, port=sink.port,
                    control_port=sink.control_port, stop_after=stop_after,
                    mailer_extra=self.mailer_extra)
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), '--child-bigqueue',
             json.dumps(spec)], capture_output=True, text=True, timeout=600)
        shutil.rmtree(path, ignore_errors=True)
        if out.returncode:
            raise RuntimeError(f'bigqueue child failed:\n{out.stderr}')
        return json.loads(out.stdout.strip().splitlines()[-1])

    def cleanup(self):
        for thread in self.zope_threads:
            thread.stop()
        for thread in self.zope_threads:
            thread.join(5)


def proc_status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])         # kB
    raise KeyError(key)


def child_bigqueue(spec):
    """In a fresh interpreter: start a processor on a big queue, time the
    first arrival, and measure its peak RSS over the interpreter's."""
    spec = json.loads(spec)
    import gc
    if spec['system'] == 'mailout':
        delivery = mailout_delivery(spec['path'], spec['port'],
                                    mailer_extra=spec['mailer_extra'])
        processor = delivery.processor
        start, stop = processor.start, processor.stop
    else:
        from zope.sendmail.queue import QueueProcessorThread
        thread = QueueProcessorThread(interval=3.0)
        thread.setMailer(Setting('', '').zope_mailer(spec['port']))
        thread.setQueuePath(spec['path'])
        start, stop = thread.start, thread.stop
    gc.collect()
    baseline = proc_status('VmRSS')
    t0 = time.monotonic_ns()
    start()
    first = wait_control(spec['control_port'], 1, 120)
    last = wait_control(spec['control_port'], spec['stop_after'], 120)
    peak = proc_status('VmHWM')
    stop()
    print(json.dumps(dict(
        first_s=(first[1] - t0) / 1e9, baseline_kb=baseline, peak_kb=peak,
        rss_above_mb=(peak - baseline) / 1024, sent=last[0],
        rate=(last[0] - 1) / max((last[2] - first[1]) / 1e9, 1e-9))))


# -- statistics and the table -------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, p):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def fmt(value, unit=''):
    if value is None:
        return '-'
    if unit == 'x':
        return f'{value:.2f}x'
    if abs(value) >= 100:
        return f'{value:,.0f}{unit}'
    if abs(value) >= 10:
        return f'{value:.1f}{unit}'
    return f'{value:.2f}{unit}'


class Table:

    def __init__(self):
        self.lines = []

    def title(self, text):
        self.lines += ['', text, '-' * len(text)]

    def rows(self, header, rows):
        widths = [max(len(str(c)) for c in col)
                  for col in zip(header, *rows)]
        for i, row in enumerate([header] + rows):
            cells = [str(c).ljust(w) if j == 0 else str(c).rjust(w)
                     for j, (c, w) in enumerate(zip(row, widths))]
            self.lines.append('  '.join(cells).rstrip())
            if i == 0:
                self.lines.append('  '.join('-' * w for w in widths))

    def text(self, line=''):
        self.lines.append(line)

    def __str__(self):
        return '\n'.join(self.lines)


# -- sizing -------------------------------------------------------------------

DRAIN_SYSTEMS = ('raw1', 'rawN', 'zope3', 'zope0', 'mailout1', 'mailoutN')
ENQUEUE_SYSTEMS = ('floor_dirsync', 'floor_nodirsync', 'mailout_1',
                   'mailout_100', 'zope_1', 'zope_100')
LATENCY_SYSTEMS = ('mailout', 'zope3', 'zope0', 'mailout_idle')

SIZES = {
    # Messages a measurement, by setting and system; seconds of latency
    # runs; repetitions.  The full run takes 6-8 minutes on 2 busy cores.
    'full': {
        'loopback': dict(raw1=1200, rawN=1200, zope3=500, zope0=500,
                         mailout1=1200, mailoutN=1200),
        'starttls': dict(raw1=600, rawN=600, zope3=200, zope0=200,
                         mailout1=600, mailoutN=600),
        'delay10': dict(raw1=60, rawN=360, zope3=40, zope0=40,
                        mailout1=60, mailoutN=360),
        'enqueue': 1000, 'latency': 2.0, 'latency_zope3': 6.5,
        'latency_idle': 4, 'bigqueue': 100_000, 'bigqueue_after': 500,
        'reps': 5, 'reps_slow': 3,
    },
    'quick': {
        'loopback': dict(raw1=400, rawN=400, zope3=150, zope0=150,
                         mailout1=400, mailoutN=400),
        'starttls': dict(raw1=200, rawN=200, zope3=50, zope0=50,
                         mailout1=200, mailoutN=200),
        'delay10': dict(raw1=20, rawN=120, zope3=12, zope0=12,
                        mailout1=20, mailoutN=120),
        'enqueue': 200, 'latency': 1.0, 'latency_zope3': 3.5,
        'latency_idle': 2, 'bigqueue': 20_000, 'bigqueue_after': 100,
        'reps': 3, 'reps_slow': 3,
    },
    'smoke': {
        'loopback': dict(raw1=20, rawN=24, zope3=10, zope0=10,
                         mailout1=20, mailoutN=24),
        'starttls': dict(raw1=10, rawN=16, zope3=4, zope0=4,
                         mailout1=10, mailoutN=16),
        'delay10': dict(raw1=4, rawN=16, zope3=3, zope0=3,
                        mailout1=4, mailoutN=16),
        'enqueue': 20, 'latency': 0.2, 'latency_zope3': 0.2,
        'latency_idle': 1, 'bigqueue': 1000, 'bigqueue_after': 10,
        'reps': 1, 'reps_slow': 1,
    },
}


def rotated(items, k):
    k %= len(items)
    return list(items[k:]) + list(items[:k])


# -- the run ------------------------------------------------------------------

def run(args):
    mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
    size = SIZES[mode]
    reps = args.reps or size['reps']
    reps_slow = args.reps or size['reps_slow']   # latency, bigqueue
    N = args.connections
    only = set(args.only.split(',')) if args.only else set(SECTIONS)
    if only - set(SECTIONS):
        raise SystemExit(
            f'unknown section(s): {", ".join(only - set(SECTIONS))}; '
            f'choose from {", ".join(SECTIONS)}')
    settings_wanted = args.settings.split(',') if args.settings \
        else ['loopback', 'starttls', 'delay10']

    workdir = tempfile.mkdtemp(prefix='mailout-bench-', dir=args.workdir)
    bench = Bench(args, workdir)
    results = {'mode': mode, 'reps': reps, 'reps_slow': reps_slow,
               'connections': N, 'drain': {}, 'enqueue': {}, 'latency': {},
               'bigqueue': {}}
    started = time.monotonic()
    sinks = []
    try:
        cert = make_certificate(workdir)
        settings = {
            'loopback': Setting('loopback', '(a) plain loopback'),
            'starttls': Setting('starttls', '(b) STARTTLS required',
                                ('--starttls', cert['cert'], cert['key']),
                                starttls=True, ca_file=cert['ca']),
            'delay10': Setting('delay10', '(c) 10 ms delay on every reply',
                               ('--delay-ms', '10')),
        }
        unknown = set(settings_wanted) - set(settings)
        if unknown:
            raise SystemExit(f'unknown setting(s): {", ".join(unknown)}')
        plain_sink = None

        def new_sink(setting):
            sink = Sink(*setting.sink_options)
            sinks.append(sink)
            return sink

        if 'drain' in only:
            for name in settings_wanted:
                setting = settings[name]
                sink = new_sink(setting)
                counts = size[name]
                bench.log(f'drain, {setting.title}:')
                # The templates first, so that no measurement pays for them.
                bench.template('mailout', max(counts.values()))
                bench.template('zope', max(counts.values()))
                runs = {s: [] for s in DRAIN_SYSTEMS}
                for rep in range(reps):
                    for system in rotated(DRAIN_SYSTEMS, rep):
                        n = counts[system]
                        if system.startswith('raw'):
                            d = bench.drain_raw(
                                setting, sink, n, N if system == 'rawN' else 1)
                        elif system.startswith('zope'):
                            d = bench.drain_zope(
                                setting, sink, n,
                                3.0 if system == 'zope3' else 0.0)
                        else:
                            d = bench.drain_mailout(
                                setting, sink, n,
                                N if system == 'mailoutN' else 1)
                        runs[system].append(dict(
                            n=n, rate=d.rate, first_ms=d.first_s * 1e3,
                            cpu_ms=d.cpu / n * 1e3,
                            sink_cpu_ms=d.sink_cpu / n * 1e3,
                            connections=d.connections))
                        bench.log(f'  rep {rep + 1} {system:9} {n:5} msgs '
                                  f'{d.rate:8.1f} msg/s, 1st after '
                                  f'{d.first_s * 1e3:6.1f} ms, CPU '
                                  f'{d.cpu / n * 1e3:.2f} ms/msg, sink '
                                  f'{d.sink_cpu / n * 1e3:.2f} ms/msg')
                results['drain'][name] = runs
                if name == 'loopback':
                    plain_sink = sink
                else:
                    sink.stop()

        if 'enqueue' in only:
            n = size['enqueue']
            bench.log(f'enqueue ({n} messages a system and repetition, '
                      f'in turns of 100):')
            runs = {s: [] for s in ENQUEUE_SYSTEMS}
            for rep in range(reps):
                rates = bench.enqueue_round(
                    rotated(ENQUEUE_SYSTEMS, rep), n, 100)
                for system, rate in rates.items():
                    runs[system].append(rate)
                bench.log(f'  rep {rep + 1} ' + ', '.join(
                    f'{s} {r:.0f}' for s, r in rates.items()) + ' msg/s')
            results['enqueue'] = runs

        if ('latency' in only or 'bigqueue' in only) and plain_sink is None:
            plain_sink = new_sink(settings['loopback'])

        if 'latency' in only:
            bench.log('latency:')
            runs = {s: [] for s in LATENCY_SYSTEMS}
            for rep in range(reps_slow):
                for system in rotated(LATENCY_SYSTEMS, rep):
                    if system == 'mailout':
                        lat, commits = bench.latency_mailout(
                            plain_sink, duration=size['latency'])
                    elif system == 'mailout_idle':
                        # Gaps longer than the poll interval (1 s): the
                        # processor has let the relay go and reconnects.
                        lat, commits = bench.latency_mailout(
                            plain_sink, gaps=(1.2, 1.6),
                            count=size['latency_idle'])
                    elif system == 'zope3':
                        lat, commits = bench.latency_zope(
                            plain_sink, 3.0, duration=size['latency_zope3'])
                    else:
                        lat, commits = bench.latency_zope(
                            plain_sink, 0.0, duration=size['latency'])
                    runs[system].append(dict(
                        n=len(lat), p50=percentile(lat, 50),
                        p99=percentile(lat, 99), max=max(lat, default=None),
                        commit_p50=percentile(commits, 50),
                        commit_p99=percentile(commits, 99)))
                    r = runs[system][-1]
                    bench.log(f'  rep {rep + 1} {system:12} n={r["n"]:4} '
                              f'p50 {fmt(r["p50"])} ms  p99 '
                              f'{fmt(r["p99"])} ms')
            results['latency'] = runs

        if 'bigqueue' in only:
            n = size['bigqueue']
            bench.log(f'bigqueue ({n:,} messages):')
            runs = {'mailout': [], 'zope': []}
            bench.template('mailout', n)
            bench.template('zope', n)
            for rep in range(reps_slow):
                for system in rotated(list(runs), rep):
                    r = bench.bigqueue(plain_sink, system, n,
                                       size['bigqueue_after'])
                    runs[system].append(r)
                    bench.log(f'  rep {rep + 1} {system:8} first '
                              f'{r["first_s"]:.3f} s, RSS +'
                              f'{r["rss_above_mb"]:.1f} MB')
            results['bigqueue'] = runs
            results['bigqueue_n'] = n
    finally:
        bench.cleanup()
        for sink in sinks:
            sink.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results['elapsed_s'] = time.monotonic() - started
    results['warnings'] = bench.warnings
    results['revision'] = revision()
    results['mailer_extra'] = bench.mailer_extra
    return results


def revision():
    """The checkout's commit, '+' if the working tree differs."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                              cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'src'],
                               cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown revision'
    return (head + ('+' if dirty else '')) or 'unknown revision'


# -- the report ---------------------------------------------------------------

TITLES = {'loopback': '(a) plain loopback',
          'starttls': '(b) STARTTLS required (verified, trustme CA)',
          'delay10': '(c) the sink delays every reply by 10 ms'}


def ratio(a, b):
    """The median of per-repetition ratios a/b."""
    return median([x / y for x, y in zip(a, b) if x is not None and y])


def spread(values):
    return f'{fmt(min(values))}-{fmt(max(values))}'


def report(results):
    table = Table()
    N = results['connections']
    targets = []
    label = {'raw1': 'raw smtplib, 1 connection (limit)',
             'rawN': f'raw smtplib, {N} connections (limit)',
             'zope3': 'zope.sendmail, interval 3 s',
             'zope0': 'zope.sendmail, interval 0',
             'mailout1': 'mailout, 1 connection',
             'mailoutN': f'mailout, {N} connections'}
    table.text(f'mailout benchmark: {results["mode"]} run, medians of '
               f'{results["reps"]} repetitions ({results["reps_slow"]} for '
               f'latency and the big queue), systems interleaved; ratios '
               f'are medians of per-repetition ratios')
    table.text(f'mailout {results["revision"]}, python '
               f'{sys.version.split()[0]}, {os.cpu_count()} CPU(s), load '
               f'average {os.getloadavg()[0]:.1f} at the end, '
               f'{time.strftime("%Y-%m-%d %H:%M")}')
    if results['mailer_extra']:
        table.text(f'extra <smtp-mailer> lines: {results["mailer_extra"]!r}')

    for name, runs in results['drain'].items():
        table.title(f'Drain a queue of ~2 KB messages: {TITLES[name]}')
        rate = {s: [r['rate'] for r in runs[s]] for s in DRAIN_SYSTEMS}
        rows = []
        for system in DRAIN_SYSTEMS:
            rs = runs[system]
            limit = 'rawN' if system.endswith('N') else 'raw1'
            rows.append([
                label[system], rs[0]['n'], fmt(median(rate[system])),
                spread(rate[system]),
                fmt(1e3 / median(rate[system]), ' ms'),
                fmt(median(r['first_ms'] for r in rs), ' ms'),
                fmt(median(r['cpu_ms'] for r in rs), ' ms'),
                fmt(median(r['sink_cpu_ms'] for r in rs), ' ms'),
                fmt(ratio(rate[system], rate[limit]), 'x'),
                fmt(ratio(rate[system], rate['zope3']), 'x')])
        table.rows(['system', 'msgs', 'msg/s', 'range', 'wall/msg',
                    '1st msg', 'CPU/msg', 'sink CPU', 'x limit',
                    'x zope(3s)'], rows)
        if name == 'loopback':
            targets.append(('(a) loopback: mailout 1 conn >= 0.8x raw '
                            'smtplib 1 conn',
                            ratio(rate['mailout1'], rate['raw1']), 0.8))
        elif name == 'starttls':
            targets.append(('(b) STARTTLS: mailout 1 conn >= 3x '
                            'zope.sendmail',
                            ratio(rate['mailout1'], rate['zope3']), 3))
            targets.append((f'    (mailout {N} conns >= 3x zope.sendmail)',
                            ratio(rate['mailoutN'], rate['zope3']), 3))
        elif name == 'delay10':
            targets.append((f'(c) 10 ms: mailout {N} conns >= 10x '
                            'zope.sendmail',
                            ratio(rate['mailoutN'], rate['zope3']), 10))
            targets.append((f'(c) 10 ms: mailout {N} conns >= 0.8x raw '
                            f'smtplib {N} conns',
                            ratio(rate['mailoutN'], rate['rawN']), 0.8))

    if results['enqueue']:
        runs = results['enqueue']
        table.title('Enqueue through transaction.commit() (no processor)')
        names = {
            'floor_dirsync': 'disk floor: write+fsync+rename+dir fsync',
            'floor_nodirsync': 'disk floor: write+fsync+rename',
            'mailout_1': 'mailout, 1 message a transaction',
            'mailout_100': 'mailout, 100 messages a transaction',
            'zope_1': 'zope.sendmail, 1 a transaction (no fsync)',
            'zope_100': 'zope.sendmail, 100 a transaction (no fsync)'}
        rows = [[title, fmt(median(runs[s])), spread(runs[s]),
                 fmt(1e3 / median(runs[s]), ' ms'),
                 fmt(ratio(runs[s], runs['floor_dirsync']), 'x'),
                 fmt(ratio(runs[s], runs['floor_nodirsync']), 'x')]
                for s, title in names.items()]
        table.rows(['system', 'msg/s', 'range', 'per msg',
                    'x floor+dir fsync', 'x floor'], rows)
        targets.append(('enqueue 1/txn >= 0.7x floor with dir fsync',
                        ratio(runs['mailout_1'], runs['floor_dirsync']),
                        0.7))
        targets.append(('enqueue 100/txn >= 0.8x floor without dir fsync',
                        ratio(runs['mailout_100'], runs['floor_nodirsync']),
                        0.8))

    if results['latency']:
        runs = results['latency']
        table.title('Commit -> arrival of single messages, processor '
                    'running (loopback)')
        names = {'mailout': 'mailout, a message every 5-15 ms',
                 'mailout_idle': 'mailout, every 1.2-1.6 s (reconnects)',
                 'zope3': 'zope.sendmail, interval 3 s',
                 'zope0': 'zope.sendmail, interval 0 (busy polling)'}
        rows = []
        for system, title in names.items():
            rs = runs[system]
            rows.append([title, sum(r['n'] for r in rs),
                         fmt(median(r['p50'] for r in rs), ' ms'),
                         fmt(median(r['p99'] for r in rs), ' ms'),
                         fmt(max((r['max'] for r in rs
                                  if r['max'] is not None), default=None),
                             ' ms'),
                         fmt(median(r['commit_p50'] for r in rs), ' ms'),
                         fmt(median(r['commit_p99'] for r in rs), ' ms')])
        table.rows(['system', 'msgs', 'p50', 'p99', 'max', 'commit p50',
                    'commit p99'], rows)
        mo = runs['mailout']
        targets.append(('commit->arrival p50 < 10 ms',
                        median(r['p50'] for r in mo), ('<', 10, ' ms')))
        targets.append(('commit->arrival p99 < 50 ms',
                        median(r['p99'] for r in mo), ('<', 50, ' ms')))

    if results['bigqueue']:
        runs = results['bigqueue']
        n = results['bigqueue_n']
        table.title(f'A queue of {n:,} messages: processor start -> first '
                    f'arrival, peak RSS (child process)')
        names = {'mailout': 'mailout, 1 connection',
                 'zope': 'zope.sendmail, interval 3 s'}
        rows = [[title,
                 fmt(median(r['first_s'] * 1e3 for r in runs[s]), ' ms'),
                 fmt(max(r['first_s'] * 1e3 for r in runs[s]), ' ms'),
                 fmt(median(r['rss_above_mb'] for r in runs[s]), ' MB'),
                 fmt(median(r['baseline_kb'] / 1024 for r in runs[s]),
                     ' MB'),
                 fmt(median(r['rate'] for r in runs[s]))]
                for s, title in names.items()]
        table.rows(['system', 'first msg', 'worst', 'peak RSS - baseline',
                    'baseline RSS', 'msg/s then'], rows)
        mo = runs['mailout']
        targets.append((f'{n:,} queue: first message < 2 s',
                        median(r['first_s'] for r in mo), ('<', 2, ' s')))
        targets.append((f'{n:,} queue: peak RSS < 100 MB above baseline',
                        median(r['rss_above_mb'] for r in mo),
                        ('<', 100, ' MB')))

    if targets:
        table.title('Targets')
        rows = []
        for title, value, goal in targets:
            if isinstance(goal, tuple):
                _, bound, unit = goal
                ok = value is not None and value < bound
                rows.append([title, fmt(value, unit), f'< {bound}{unit}',
                             'met' if ok else 'MISSED'])
            else:
                ok = value is not None and value >= goal
                rows.append([title, fmt(value, 'x'), f'>= {goal}x',
                             'met' if ok else 'MISSED'])
        table.rows(['target', 'measured', 'goal', ''], rows)
    return end_of_report(table, results)


def end_of_report(table, results):
    """The warnings and total time that end a report; its text."""
    if results['warnings']:
        table.title('Warnings')
        for w in results['warnings']:
            table.text(f'  {w}')
    table.text('')
    table.text(f'total time {results["elapsed_s"]:.0f} s')
    return str(table)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='mailout benchmarks (see the module docstring)')
    parser.add_argument('--quick', action='store_true',
                        help='a short run (<= 2 minutes)')
    parser.add_argument('--smoke', action='store_true',
                        help='a tiny run that only checks that everything '
                             'works (seconds)')
    parser.add_argument('--only', metavar='SECTIONS',
                        help=f'comma-separated: {",".join(SECTIONS)}')
    parser.add_argument('--settings', metavar='NAMES',
                        help='drain settings, comma-separated: '
                             'loopback,starttls,delay10')
    parser.add_argument('--reps', type=int,
                        help='repetitions (default: 5, --quick 3; latency '
                             'and bigqueue 3)')
    parser.add_argument('--connections', type=int, default=8,
                        help='N, the parallel connections (default 8)')
    parser.add_argument('--mailer-option', action='append', metavar='LINE',
                        help='an extra line for mailout\'s <smtp-mailer> '
                             'section, e.g. "messages-per-connection 1000"; '
                             'repeatable (for A/B runs)')
    parser.add_argument('--json', metavar='PATH',
                        help='also write the raw results here')
    parser.add_argument('--workdir', help='where to put the queues '
                        '(default: the system temp directory)')
    parser.add_argument('--keep', action='store_true',
                        help='keep the work directory')
    parser.add_argument('--quiet', action='store_true',
                        help='no progress lines on stderr')
    parser.add_argument('--child-bigqueue', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_bigqueue:
        child_bigqueue(args.child_bigqueue)
        return
    import logging
    logging.basicConfig(level=logging.WARNING)
    results = run(args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    print(report(results))


if __name__ == '__main__':
    main()
