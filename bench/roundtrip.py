#!/usr/bin/env python
"""The round-trip benchmark (issue 13): mail to a relay 10 ms away.

    .venv/bin/python bench/roundtrip.py              # the full run (~3 min)
    .venv/bin/python bench/roundtrip.py --quick      # CI size (< 60 s)
    .venv/bin/python bench/roundtrip.py --smoke      # seconds; for the tests
    .venv/bin/python bench/roundtrip.py --delay-ms 25 --reps 3
    .venv/bin/python bench/roundtrip.py --json results.json --check-targets

A relay in another data centre is a fixed delay on each direction of the
byte stream, not a server that is slow to answer: a sink that sleeps before
each reply delays every reply in turn, so a client that pipelines gains
nothing against it.  This benchmark puts a TCP proxy between the clients
and the server (a helper process, ``--child-proxy``): every chunk it reads
is time-stamped and written on, in order, by a writer task for that
direction at arrival + ``--delay-ms`` (default 5 ms each way: a 10 ms round
trip).  The proxy follows each plain-text SMTP conversation (commands,
replies matched in order, data after a 354, BDAT) and counts *turns*: a
client burst that follows a server reply.  Turns that carry more than
EHLO/HELO/LHLO/STARTTLS/AUTH/QUIT are the round trips of mail transactions;
divided by the messages they are "RT/msg", the column that shows
pipelining (smtplib: 4.0, MAIL RCPT DATA and end of data; RFC 2920: 1.0).
"all turns/msg" adds each connection's EHLO and QUIT.  The TCP handshake
is not delayed (the proxy accepts at once): connection set-up costs half a
round trip less than over a real network.

The server is Postfix's ``smtp-sink`` (Debian package postfix), which
announces PIPELINING; a helper process (``--child-smtp-sink``) runs it with
``-c`` and time-stamps each message from its running counter.  Without
``smtp-sink`` the bench falls back to bench/sink.py (aiosmtpd), which does
not announce PIPELINING: then nothing pipelines, and the output says so.

Systems, interleaved in one run (A B C .. A B C .., the order rotated each
repetition; every ratio is taken within a repetition, the table shows
medians), all with ~2 KB messages (bench/run.py's):

- raw smtplib over 1 and N connections (connections opened once, no disk);
- a minimal RFC 2920 client written here (`PipeliningClient`), over 1 and
  N connections: after EHLO announced PIPELINING, it writes
  ``<previous message's data and dot> MAIL RCPT DATA`` in one write, reads
  the replies in order and sends the data after the 354: the limit;
- mailout's processor draining a queue of pre-queued messages (written
  with mailout's own Queue, as bench/run.py does) over 1 and N connections,
  and, where mailout's <smtp-mailer> has a ``pipelining`` key, with
  ``pipelining off`` over 1 connection;
- zope.sendmail's queue processor (interval 3 s; a connection a message);
- on loopback without the proxy: raw smtplib and mailout, 1 connection.

msg/s is the steady rate between the first and the last message the server
received; "1st msg" is start -> first message.  The benchmark asserts
nothing: it exits 0 when targets are missed, unless --check-targets.
"""
import argparse
import asyncio
import collections
import contextlib
import glob
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import xml.etree.ElementTree as ElementTree

HERE = os.path.dirname(os.path.abspath(__file__))
SMTP_SINK = '/usr/sbin/smtp-sink'
sys.path.insert(0, HERE)

import run  # noqa: E402 (bench/run.py: its drains, tables and Child)


# == helper processes (stdlib only: they start fast) ========================

def listening_socket():
    # IPPROTO_TCP explicitly, or asyncio sets no TCP_NODELAY on the
    # accepted sockets (see bench/sink.py).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(('127.0.0.1', 0))
    sock.listen(512)
    return sock


def nodelay(writer):
    sock = writer.get_extra_info('socket')
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve_until_stdin_closes(loop, first_line):
    """Print the first line, then run ``loop`` until stdin closes (the
    parent exited or closed the pipe)."""
    print(first_line, flush=True)

    def watch():
        sys.stdin.read()
        loop.call_soon_threadsafe(loop.stop)
    threading.Thread(target=watch, daemon=True).start()
    loop.run_forever()


async def control_loop(reader, writer, answer):
    """A line protocol: each line -> ``await answer(words)`` -> one line."""
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            words = line.decode('ascii').split()
            if words:
                reply = await answer([words[0].upper()] + words[1:])
                writer.write(reply.encode('ascii') + b'\n')
                await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


# -- the proxy --------------------------------------------------------------

#: Commands that open, secure or close a session; a turn of nothing else
#: is not a round trip of a mail transaction.
SESSION = frozenset((b'EHLO', b'HELO', b'LHLO', b'STARTTLS', b'AUTH',
                     b'QUIT'))


class Stats:

    def __init__(self):
        self.reset()

    def reset(self):
        self.connections = 0      # accepted since the reset
        self.turns = 0            # client bursts that follow a server reply
        self.mail_turns = 0       # ... carrying more than SESSION commands
        self.messages = 0         # 2xx replies to an end of data, delivered
        self.first = 0            # when the proxy wrote the first of them
        self.last = 0
        self.up = 0               # bytes client -> server
        self.down = 0             # bytes server -> client

    def as_dict(self):
        return dict(vars(self))


class Conversation:
    """One SMTP conversation as the proxy sees it.

    The client's bytes are split into command lines and message data; the
    server's replies are matched in order to the commands that wait for
    one (the first waits for the greeting).  After DATA the client must
    wait for the reply (RFC 2920), so the bytes that follow are data after
    a 354 and commands after anything else.  After STARTTLS's 220 the
    stream is opaque: every turn counts as a mail turn and no message is
    seen.
    """

    def __init__(self, stats):
        self.stats = stats
        self.waiting = collections.deque([b'CONNECT'])
        self.client = b''
        self.server = b''
        self.mode = 'command'       # data, wait (for DATA's reply), bdat,
        self.bdat_left = 0          # opaque
        self.server_spoke = False
        self.turn_is_mail = False

    def mail_turn(self):
        if not self.turn_is_mail:
            self.turn_is_mail = True
            self.stats.mail_turns += 1

    def from_client(self, data):
        if self.server_spoke:
            self.server_spoke = False
            self.turn_is_mail = False
            self.stats.turns += 1
        self.stats.up += len(data)
        if self.mode != 'command':
            self.mail_turn()
        if self.mode == 'opaque':
            return 0
        self.client += data
        self.parse_client()
        return 0

    def parse_client(self):
        buf = self.client
        while buf:
            if self.mode == 'data':
                self.mail_turn()
                end = buf.find(b'\r\n.\r\n')
                if end < 0:
                    buf = buf[-4:]          # a marker may straddle chunks
                    break
                buf = buf[end + 5:]
                self.waiting.append(b'.')
                self.mode = 'command'
            elif self.mode == 'bdat':
                self.mail_turn()
                take = min(self.bdat_left, len(buf))
                buf = buf[take:]
                self.bdat_left -= take
                if not self.bdat_left:
                    self.mode = 'command'
            elif self.mode == 'command':
                end = buf.find(b'\n')
                if end < 0:
                    break
                line, buf = buf[:end + 1], buf[end + 1:]
                words = line.split()
                verb = words[0].upper() if words else b''
                if verb not in SESSION:
                    self.mail_turn()
                if verb == b'BDAT' and len(words) > 1 and \
                        words[1].isdigit():
                    last = len(words) > 2 and words[2].upper() == b'LAST'
                    self.waiting.append(b'BDAT LAST' if last else b'BDAT')
                    self.bdat_left = int(words[1])
                    if self.bdat_left:
                        self.mode = 'bdat'
                    continue
                self.waiting.append(verb)
                if verb in (b'DATA', b'STARTTLS'):
                    self.mode = 'wait'
            else:                           # wait: until DATA's reply
                break
        self.client = buf

    def from_server(self, data):
        """Parse replies; return how many end a message successfully."""
        self.stats.down += len(data)
        if self.mode == 'opaque':
            return 0
        self.server += data
        delivered = 0
        resume = False
        while True:
            end = self.server.find(b'\n')
            if end < 0:
                break
            line = self.server[:end + 1]
            self.server = self.server[end + 1:]
            if line[3:4] == b'-':           # not the last line of a reply
                continue
            code = line[:3]
            command = self.waiting.popleft() if self.waiting else None
            if command in (b'.', b'BDAT LAST') and code[:1] == b'2':
                delivered += 1
            elif command == b'DATA' and self.mode == 'wait':
                if code == b'354':
                    self.mode = 'data'
                    # The data begins at the start of a line.
                    self.client = b'\r\n' + self.client
                else:
                    self.mode = 'command'
                resume = True
            elif command == b'STARTTLS' and self.mode == 'wait':
                if code == b'220':
                    self.mode = 'opaque'
                    self.client = b''
                    break
                self.mode = 'command'
                resume = True
        if resume and self.mode != 'opaque':
            self.parse_client()
        return delivered


async def relay(reader, writer, delay, parse, written):
    """Read from ``reader``, write each chunk to ``writer`` ``delay``
    seconds after it arrived, in order (a writer task of its own)."""
    loop = asyncio.get_running_loop()
    chunks = asyncio.Queue()

    async def write():
        while True:
            due, data, delivered = await chunks.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            written(delivered)
            await writer.drain()

    writing = asyncio.create_task(write())
    try:
        while True:
            data = await reader.read(65536)
            due = loop.time() + delay
            if not data:
                chunks.put_nowait((due, None, 0))
                break
            chunks.put_nowait((due, data, parse(data)))
        await writing
    finally:
        writing.cancel()


async def proxy_connection(client_reader, client_writer, upstream, delay,
                           stats):
    try:
        server_reader, server_writer = await asyncio.open_connection(
            '127.0.0.1', upstream)
    except OSError:
        client_writer.close()
        return
    nodelay(client_writer)
    nodelay(server_writer)
    stats.connections += 1
    conversation = Conversation(stats)

    def client_got(delivered):
        conversation.server_spoke = True
        if delivered:
            now = time.monotonic_ns()
            stats.messages += delivered
            stats.first = stats.first or now
            stats.last = now

    tasks = [
        asyncio.create_task(relay(client_reader, server_writer, delay,
                                  conversation.from_client, lambda n: None)),
        asyncio.create_task(relay(server_reader, client_writer, delay,
                                  conversation.from_server, client_got))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        for writer in (client_writer, server_writer):
            writer.close()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def proxy_main(upstream, delay_ms):
    """``--child-proxy UPSTREAM_PORT DELAY_MS``: print ``PORT
    CONTROL_PORT``; control: RESET -> OK, STATS -> a JSON object."""
    delay = delay_ms / 1000
    stats = Stats()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def answer(words):
        if words[0] == 'RESET':
            stats.reset()
            return 'OK'
        if words[0] == 'STATS':
            return json.dumps(stats.as_dict())
        return f'ERROR unknown command {words[0]}'

    proxy_sock, control_sock = listening_socket(), listening_socket()
    servers = [
        loop.run_until_complete(asyncio.start_server(
            lambda r, w: proxy_connection(r, w, upstream, delay, stats),
            sock=proxy_sock)),
        loop.run_until_complete(asyncio.start_server(
            lambda r, w: control_loop(r, w, answer), sock=control_sock))]
    try:
        serve_until_stdin_closes(loop, f'{proxy_sock.getsockname()[1]} '
                                       f'{control_sock.getsockname()[1]}')
    finally:
        for server in servers:
            server.close()


# -- smtp-sink and its counter ----------------------------------------------

_MESG = re.compile(rb'mesg=(\d+)')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_smtp_sink(path):
    """Start ``smtp-sink -c`` on a free loopback port and wait for its
    greeting; return (process, port)."""
    for _ in range(5):
        port = free_port()
        argv = [path, '-c']
        if os.geteuid() == 0:
            argv += ['-u', 'nobody']        # it refuses to run as root
        argv += [f'127.0.0.1:{port}', '256']
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(('127.0.0.1', port), 1) as s:
                    if s.recv(100).startswith(b'220'):
                        return process, port
            except OSError:
                time.sleep(0.02)
        process.kill()
        process.wait()
    raise RuntimeError(f'{path} did not start')


def smtp_sink_main(path):
    """``--child-smtp-sink PATH``: run smtp-sink, stamp each message from
    its ``-c`` counter, answer bench/sink.py's control protocol (RESET,
    COUNT, WAIT, DUPLICATES); print ``PORT CONTROL_PORT SMTP_SINK_PID``."""
    process, port = start_smtp_sink(path)
    state = types.SimpleNamespace(total=0, base=0, first=0, last=0,
                                  waiters=[])

    def count():
        return state.total - state.base

    def status():
        return f'{count()} {state.first} {state.last} 0'

    def counter_output():
        data = os.read(process.stdout.fileno(), 65536)
        if not data:
            loop.remove_reader(process.stdout.fileno())
            return
        now = time.monotonic_ns()
        numbers = _MESG.findall(data)
        if numbers and int(numbers[-1]) > state.total:
            state.total = int(numbers[-1])
            state.first = state.first or now
            state.last = now
            for waiter in list(state.waiters):
                n, future = waiter
                if count() >= n and not future.done():
                    future.set_result(None)
                    state.waiters.remove(waiter)

    async def answer(words):
        if words[0] == 'RESET':
            for _, future in state.waiters:
                if not future.done():
                    future.set_result(None)
            state.waiters.clear()
            state.base, state.first, state.last = state.total, 0, 0
            return 'OK'
        if words[0] == 'COUNT':
            return status()
        if words[0] == 'WAIT':
            n, timeout = int(words[1]), float(words[2])
            if count() < n:
                future = loop.create_future()
                state.waiters.append((n, future))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(future, timeout)
            return status()
        if words[0] == 'DUPLICATES':
            return '0'          # smtp-sink keeps no Message-Id
        return f'ERROR unknown command {words[0]}'

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.add_reader(process.stdout.fileno(), counter_output)
    control_sock = listening_socket()
    server = loop.run_until_complete(asyncio.start_server(
        lambda r, w: control_loop(r, w, answer), sock=control_sock))
    try:
        serve_until_stdin_closes(
            loop, f'{port} {control_sock.getsockname()[1]} {process.pid}')
    finally:
        server.close()
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# == the benchmark ===========================================================

class Server(run.Child):
    """The SMTP server and its message counter (bench/sink.py's control
    protocol)."""

    def reset(self):
        self.command('RESET')

    def wait(self, n, timeout):
        return tuple(map(int, self.command(f'WAIT {n} {timeout}').split()))

    def duplicates(self):
        return int(self.command('DUPLICATES'))


class Proxy(run.Child):

    def reset(self):
        self.command('RESET')

    def stats(self):
        return json.loads(self.command('STATS'))


class Target:
    """What a client connects to: the server, through the proxy or not;
    it quacks like bench/run.py's Sink, so that run.Bench's drains and
    run.Drain measure through it."""

    def __init__(self, server, proxy=None):
        self.server, self.proxy = server, proxy
        self.port = proxy.port if proxy else server.port
        self.process = types.SimpleNamespace(pid=server.pid)

    def reset(self):
        self.server.reset()
        if self.proxy:
            self.proxy.reset()

    def wait(self, n, timeout):
        return self.server.wait(n, timeout)

    def duplicates(self):
        return self.server.duplicates()


def start_server(choice):
    """(Server, name, announces PIPELINING)."""
    if choice in ('auto', 'smtp-sink') and os.path.exists(SMTP_SINK):
        server = Server([sys.executable, os.path.abspath(__file__),
                         '--child-smtp-sink', SMTP_SINK], 'smtp-sink')
        return server, 'smtp-sink', True
    if choice == 'smtp-sink':
        raise SystemExit(f'{SMTP_SINK} is missing (Debian: apt-get install '
                         f'postfix, see .ci/run)')
    server = Server([sys.executable, os.path.join(HERE, 'sink.py')],
                    'bench/sink.py')
    return server, 'aiosmtpd', False


def has_pipelining_key():
    """Whether the installed mailout's <smtp-mailer> has a ``pipelining``
    key (schema.xml, component.xml)."""
    import mailout
    directory = os.path.dirname(mailout.__file__)
    for path in glob.glob(os.path.join(directory, '*.xml')):
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError:
            continue
        for section in root.iter('sectiontype'):
            if section.get('name') != 'smtp-mailer':
                continue
            for key in section.iter('key'):
                if key.get('name') == 'pipelining':
                    return True
    return False


def round_trip_ms(port, count=20):
    """The median time of a NOOP (smtplib), in ms."""
    times = []
    with smtplib.SMTP('127.0.0.1', port, timeout=30) as connection:
        connection.ehlo()
        for _ in range(count):
            t = time.perf_counter()
            connection.noop()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


# -- the minimal pipelining client --------------------------------------------

class PipeliningClient:
    """The limit of one connection: a minimal RFC 2920 client.

    It waits for the greeting and EHLO's reply; when EHLO announced
    PIPELINING, it writes ``<data and dot of the previous message> MAIL
    RCPT DATA`` in one write, reads the replies in order (the dot's, then
    MAIL's, RCPT's, DATA's) and sends the message after the 354.  Without
    PIPELINING it waits for each reply, like smtplib.
    """

    def __init__(self, port, timeout=60):
        self.sock = socket.create_connection(('127.0.0.1', port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile('rb')
        self.expect(b'220')
        self.sock.sendall(b'EHLO bench.example.org\r\n')
        lines = self.expect(b'250')
        self.pipelining = any(line[4:].split()[:1] == [b'PIPELINING']
                              for line in lines)

    def reply(self):
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError('the server closed the connection')
            lines.append(line.upper())
            if line[3:4] != b'-':
                return line[:3], lines

    def expect(self, code):
        got, lines = self.reply()
        if got != code:
            raise RuntimeError(f'expected {code!r}, got {lines!r}')
        return lines

    def send(self, sender, recipients, messages):
        envelope = b'MAIL FROM:<%s>\r\n' % sender.encode() + b''.join(
            b'RCPT TO:<%s>\r\n' % r.encode() for r in recipients)
        commands = envelope + b'DATA\r\n'
        tail = b''
        for message in messages:
            data = re.sub(rb'(?m)^\.', b'..', message)
            if not data.endswith(b'\r\n'):
                data += b'\r\n'
            if self.pipelining:
                self.sock.sendall(tail + commands)
                if tail:
                    self.expect(b'250')
                self.expect(b'250')
                for _ in recipients:
                    self.expect(b'250')
                self.expect(b'354')
                tail = data + b'.\r\n'
            else:
                self.sock.sendall(envelope.split(b'\r\n', 1)[0] + b'\r\n')
                self.expect(b'250')
                for r in recipients:
                    self.sock.sendall(b'RCPT TO:<%s>\r\n' % r.encode())
                    self.expect(b'250')
                self.sock.sendall(b'DATA\r\n')
                self.expect(b'354')
                self.sock.sendall(data + b'.\r\n')
                self.expect(b'250')
        if tail:
            self.sock.sendall(tail)
            self.expect(b'250')

    def quit(self):
        self.sock.sendall(b'QUIT\r\n')
        with contextlib.suppress(OSError, RuntimeError):
            self.expect(b'221')
        self.file.close()
        self.sock.close()


# -- sizes and systems --------------------------------------------------------

#: Messages a measurement by system, and repetitions.  At a 10 ms round
#: trip smtplib does ~23 msg/s over 1 connection, a pipelining client
#: ~90; the sizes keep each measurement at 1-3 s once mailout pipelines.
SIZES = {
    'full': dict(raw1=60, rawN=360, pipe1=240, pipeN=960, mailout1=240,
                 mailoutN=960, mailout1_off=60, zope=40, lo_raw1=3000,
                 lo_mailout1=3000, lo_mailout1_off=3000, reps=7),
    'quick': dict(raw1=20, rawN=96, pipe1=60, pipeN=240, mailout1=60,
                  mailoutN=240, mailout1_off=20, zope=10, lo_raw1=1000,
                  lo_mailout1=1000, lo_mailout1_off=1000, reps=3),
    'smoke': dict(raw1=8, rawN=32, pipe1=16, pipeN=48, mailout1=16,
                  mailoutN=48, mailout1_off=8, zope=4, lo_raw1=100,
                  lo_mailout1=100, lo_mailout1_off=100, reps=1),
}

PROXIED = ('raw1', 'rawN', 'pipe1', 'pipeN', 'mailout1', 'mailoutN',
           'mailout1_off', 'zope')
LOOPBACK = ('lo_raw1', 'lo_mailout1', 'lo_mailout1_off')
#: Only where mailout's <smtp-mailer> has a ``pipelining`` key.
PIPELINING_OFF = ('mailout1_off', 'lo_mailout1_off')


def labels(n):
    return {
        'raw1': 'raw smtplib, 1 connection',
        'rawN': f'raw smtplib, {n} connections',
        'pipe1': 'pipelining client, 1 connection (limit)',
        'pipeN': f'pipelining client, {n} connections (limit)',
        'mailout1': 'mailout, 1 connection',
        'mailoutN': f'mailout, {n} connections',
        'mailout1_off': 'mailout, pipelining off, 1 connection',
        'zope': 'zope.sendmail, interval 3 s',
        'lo_raw1': 'raw smtplib, 1 connection',
        'lo_mailout1': 'mailout, 1 connection',
        'lo_mailout1_off': 'mailout, pipelining off, 1 connection',
    }


def make_bench_class(run):

    class RoundTripBench(run.Bench):

        def drain_pipelining(self, target, n, connections):
            def send(part):
                client = PipeliningClient(target.port)
                client.send(run.FROM, run.TO, part)
                client.quit()
            return self.drain_by_clients(send, target, n, connections,
                                         'pipelining client')

        def drain_mailout_with(self, target, n, connections, extra):
            saved = self.mailer_extra
            self.mailer_extra = '\n    '.join(
                [line for line in (saved, extra) if line])
            try:
                return self.drain_mailout(self.setting, target, n,
                                          connections)
            finally:
                self.mailer_extra = saved

    return RoundTripBench


# -- the run ------------------------------------------------------------------

def measure(bench, system, target, n, connections):
    """One drain of ``n`` messages by ``system``; a dict of figures."""
    run = bench.run
    proxy = target.proxy
    proxy_cpu = run.process_cpu(proxy.process.pid) if proxy else 0
    kind = system.removeprefix('lo_')
    conns = connections if kind.endswith('N') else 1
    if kind in ('raw1', 'rawN'):
        d = bench.drain_raw(bench.setting, target, n, conns)
    elif kind in ('pipe1', 'pipeN'):
        d = bench.drain_pipelining(target, n, conns)
    elif kind == 'mailout1_off':
        d = bench.drain_mailout_with(target, n, 1, 'pipelining off')
    elif kind in ('mailout1', 'mailoutN'):
        d = bench.drain_mailout_with(target, n, conns, '')
    elif kind == 'zope':
        d = bench.drain_zope(bench.setting, target, n, 3.0)
    else:
        raise ValueError(system)
    figures = dict(n=n, count=d.count, rate=d.rate, first_ms=d.first_s * 1e3,
                   cpu_ms=d.cpu / n * 1e3, server_cpu_ms=d.sink_cpu / n * 1e3)
    if proxy:
        stats = proxy.stats()
        figures.update(
            rt=stats['mail_turns'] / n, turns=stats['turns'] / n,
            proxy_messages=stats['messages'],
            connections=stats['connections'],
            proxy_cpu_ms=(run.process_cpu(proxy.process.pid) - proxy_cpu)
            / n * 1e3)
    return figures


def run_bench(args):
    mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
    size = dict(SIZES[mode])
    reps = args.reps or size.pop('reps')
    size.pop('reps', None)
    N = args.connections
    pipelining_key = has_pipelining_key()
    systems = [s for s in PROXIED + LOOPBACK
               if s not in PIPELINING_OFF or pipelining_key]
    if args.systems:
        wanted = args.systems.split(',')
        unknown = set(wanted) - set(PROXIED + LOOPBACK)
        if unknown:
            raise SystemExit(f'unknown system(s): {", ".join(unknown)}; '
                             f'choose from {", ".join(PROXIED + LOOPBACK)}')
        systems = [s for s in systems if s in wanted]

    workdir = tempfile.mkdtemp(prefix='mailout-roundtrip-',
                               dir=args.workdir)
    bench = make_bench_class(run)(args, workdir)
    bench.run = run
    bench.setting = run.Setting('plain', 'plain')
    results = dict(mode=mode, reps=reps, connections=N,
                   delay_ms=args.delay_ms, pipelining_key=pipelining_key,
                   systems=systems, runs={s: [] for s in systems})
    started = time.monotonic()
    children = []
    try:
        server, name, pipelines = start_server(args.server)
        children.append(server)
        proxy = Proxy([sys.executable, os.path.abspath(__file__),
                       '--child-proxy', str(server.port),
                       str(args.delay_ms)], 'the proxy')
        children.append(proxy)
        results.update(server=name, server_pipelining=pipelines)
        if not pipelines:
            why = 'smtp-sink not found' if args.server == 'auto' \
                else '--server aiosmtpd'
            bench.warn(f'{why}: the server is bench/sink.py (aiosmtpd), '
                       f'which does NOT announce PIPELINING, so nothing '
                       f'pipelines and the targets cannot be met; Debian\'s '
                       f'postfix package brings {SMTP_SINK}')
        proxied, direct = Target(server, proxy), Target(server)
        results['rtt_ms'] = dict(proxy=round_trip_ms(proxy.port),
                                 loopback=round_trip_ms(server.port))
        bench.log(f'server {name}; NOOP round trip through the proxy '
                  f'{results["rtt_ms"]["proxy"]:.2f} ms, direct '
                  f'{results["rtt_ms"]["loopback"]:.3f} ms')
        counts = [size[s] for s in systems]
        if any(s.startswith(('mailout', 'lo_mailout')) for s in systems):
            bench.template('mailout', max(counts))
        if 'zope' in systems:
            bench.template('zope', size['zope'])
        for rep in range(reps):
            for system in run.rotated(systems, rep):
                target = direct if system in LOOPBACK else proxied
                n = size[system]
                figures = measure(bench, system, target, n, N)
                results['runs'][system].append(figures)
                rt = f', {figures["rt"]:.2f} RT/msg' if 'rt' in figures \
                    else ''
                bench.log(f'  rep {rep + 1} {system:12} {n:5} msgs '
                          f'{figures["rate"]:8.1f} msg/s{rt}')
    finally:
        bench.cleanup()
        for child in children:
            child.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results['elapsed_s'] = time.monotonic() - started
    results['warnings'] = bench.warnings
    results['revision'] = run.revision()
    results['mailer_extra'] = bench.mailer_extra
    results['targets'] = targets(results, run)
    return results


# -- the report ---------------------------------------------------------------

def targets(results, run):
    """[(title, value, comparison, goal, met)] of issue 13."""
    runs = results['runs']
    N = results['connections']

    def rates(system):
        return [r['rate'] for r in runs.get(system, ())]

    def ratio(a, b):
        if a in runs and b in runs:
            return run.ratio(rates(a), rates(b))
        return None
    rt = run.median([r.get('rt') for r in runs.get('mailout1', ())])
    rows = [
        ('mailout 1 conn >= 3.5x raw smtplib 1 conn',
         ratio('mailout1', 'raw1'), '>=', 3.5),
        ('mailout 1 conn >= 0.9x pipelining client 1 conn',
         ratio('mailout1', 'pipe1'), '>=', 0.9),
        ('mailout 1 conn <= 1.2 round trips per message', rt, '<=', 1.2),
        (f'mailout {N} conns >= 0.9x pipelining client {N} conns',
         ratio('mailoutN', 'pipeN'), '>=', 0.9),
        ('loopback: mailout 1 conn >= 0.8x raw smtplib 1 conn',
         ratio('lo_mailout1', 'lo_raw1'), '>=', 0.8)]
    out = []
    for title, value, op, goal in rows:
        met = value is not None and (value >= goal if op == '>='
                                     else value <= goal)
        out.append(dict(target=title, value=value, op=op, goal=goal,
                        met=met))
    return out


def report(results):
    fmt, median = run.fmt, run.median
    table = run.Table()
    N = results['connections']
    label = labels(N)
    runs = results['runs']
    delay = results['delay_ms']
    table.text(f'mailout round-trip benchmark: {results["mode"]} run, '
               f'medians of {results["reps"]} repetitions, systems '
               f'interleaved; ratios are medians of per-repetition ratios')
    table.text(f'mailout {results["revision"]}, python '
               f'{sys.version.split()[0]}, {os.cpu_count()} CPU(s), load '
               f'average {os.getloadavg()[0]:.1f} at the end, '
               f'{time.strftime("%Y-%m-%d %H:%M")}')
    if results['server'] == 'smtp-sink':
        server = 'Postfix smtp-sink (announces PIPELINING)'
    else:
        server = ('bench/sink.py, aiosmtpd: does NOT announce PIPELINING, '
                  'so nothing pipelines')
    table.text(f'server: {server}')
    rtt = results.get('rtt_ms', {})
    table.text(f'proxy: {delay:g} ms each way; NOOP round trip through it '
               f'{fmt(rtt.get("proxy"), " ms")}, direct '
               f'{fmt(rtt.get("loopback"), " ms")}')
    table.text('mailout\'s <smtp-mailer> has a pipelining key: '
               + ('yes' if results['pipelining_key'] else 'no'))
    if results['mailer_extra']:
        table.text(f'extra <smtp-mailer> lines: {results["mailer_extra"]!r}')

    def rate(system):
        return [r['rate'] for r in runs[system]]

    def ratio_cell(system, other):
        if other not in runs or not runs[system]:
            return '-'
        return fmt(run.ratio(rate(system), rate(other)), 'x')

    def spread(system):
        values = rate(system)
        return f'{fmt(min(values))}-{fmt(max(values))}' if values else '-'

    proxied = [s for s in PROXIED if s in runs and runs[s]]
    if proxied:
        table.title(f'~2 KB messages to a server {2 * delay:g} ms away '
                    f'(proxy, {delay:g} ms each way)')
        rows = []
        for system in proxied:
            rs = runs[system]
            limit = 'pipeN' if system.endswith('N') else 'pipe1'
            rows.append([
                label[system], rs[0]['n'], fmt(median(rate(system))),
                spread(system),
                fmt(median(r['rt'] for r in rs)),
                fmt(median(r['turns'] for r in rs)),
                fmt(median(r['first_ms'] for r in rs), ' ms'),
                fmt(median(r['cpu_ms'] for r in rs), ' ms'),
                ratio_cell(system, 'raw1'), ratio_cell(system, limit)])
        table.rows(['system', 'msgs', 'msg/s', 'range', 'RT/msg',
                    'all turns/msg', '1st msg', 'CPU/msg', 'x smtplib 1c',
                    'x pipelining same conns'], rows)
        table.text('RT/msg: client turns in mail transactions per message, '
                   'counted at the proxy; all turns adds EHLO and QUIT')
    loop = [s for s in LOOPBACK if s in runs and runs[s]]
    if loop:
        table.title('~2 KB messages on loopback (no proxy)')
        rows = [[label[s], runs[s][0]['n'], fmt(median(rate(s))), spread(s),
                 fmt(median(r['cpu_ms'] for r in runs[s]), ' ms'),
                 fmt(median(r['server_cpu_ms'] for r in runs[s]), ' ms'),
                 ratio_cell(s, 'lo_raw1'),
                 ratio_cell(s, 'lo_mailout1_off')
                 if s.startswith('lo_mailout') else '-']
                for s in loop]
        table.rows(['system', 'msgs', 'msg/s', 'range', 'CPU/msg',
                    'server CPU', 'x smtplib 1c', 'x mailout off'], rows)

    table.title('Targets (issue 13)')
    rows = []
    for t in results['targets']:
        unit = '' if t['op'] == '<=' else 'x'
        rows.append([t['target'], fmt(t['value'], unit),
                     f'{t["op"]} {t["goal"]}{unit}',
                     'met' if t['met'] else 'MISSED'])
    table.rows(['target', 'measured', 'goal', ''], rows)
    return run.end_of_report(table, results)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='mailout over a real round trip (see the module '
                    'docstring)')
    parser.add_argument('--quick', action='store_true',
                        help='CI size (< 60 s)')
    parser.add_argument('--smoke', action='store_true',
                        help='a tiny run for the tests (seconds)')
    parser.add_argument('--reps', type=int,
                        help='repetitions (default: 7, --quick 3, --smoke 1)')
    parser.add_argument('--connections', type=int, default=8,
                        help='N, the parallel connections (default 8)')
    parser.add_argument('--delay-ms', type=float, default=5.0,
                        help='the proxy\'s delay each way (default 5 ms: '
                             'a 10 ms round trip)')
    parser.add_argument('--server', choices=('auto', 'smtp-sink', 'aiosmtpd'),
                        default='auto',
                        help='auto: smtp-sink where installed, else '
                             'bench/sink.py (aiosmtpd, no PIPELINING)')
    parser.add_argument('--systems', metavar='NAMES',
                        help='only these, comma-separated: '
                             + ','.join(PROXIED + LOOPBACK))
    parser.add_argument('--mailer-option', action='append', metavar='LINE',
                        help='an extra line for mailout\'s <smtp-mailer>; '
                             'repeatable')
    parser.add_argument('--json', metavar='PATH',
                        help='also write the raw results here')
    parser.add_argument('--check-targets', action='store_true',
                        help='exit 1 when a target is missed')
    parser.add_argument('--workdir', help='where to put the queues '
                        '(default: the system temp directory)')
    parser.add_argument('--keep', action='store_true',
                        help='keep the work directory')
    parser.add_argument('--quiet', action='store_true',
                        help='no progress lines on stderr')
    parser.add_argument('--child-proxy', nargs=2, help=argparse.SUPPRESS)
    parser.add_argument('--child-smtp-sink', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_proxy:
        proxy_main(int(args.child_proxy[0]), float(args.child_proxy[1]))
        return 0
    if args.child_smtp_sink:
        smtp_sink_main(args.child_smtp_sink)
        return 0
    import logging
    logging.basicConfig(level=logging.WARNING)
    results = run_bench(args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    print(report(results))
    if args.check_targets and not all(t['met'] for t in results['targets']):
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
