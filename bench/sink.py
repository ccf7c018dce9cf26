"""A counting SMTP sink for the benchmarks: aiosmtpd on 127.0.0.1.

Run as ``python bench/sink.py [--starttls CERT KEY] [--delay-ms N]``.  It
prints ``SMTP_PORT CONTROL_PORT`` on the first line of stdout and exits when
its stdin closes (so it dies with the benchmark).  It keeps nothing of a
message but its arrival: a count, and the arrival time
(``time.monotonic_ns()``, which on Linux is one clock for every process) of
each message that carries an ``X-Bench-Id: N`` header.

The control channel is a line protocol on CONTROL_PORT:

    RESET                   forget counts and arrival times -> OK
    COUNT                   -> COUNT FIRST_NS LAST_NS CONNECTIONS
    WAIT N TIMEOUT          block until COUNT >= N or TIMEOUT seconds passed,
                            then answer as COUNT
    STAMPS                  -> one JSON object {id: arrival_ns}
    DUPLICATES              -> how many ids arrived more than once

``--delay-ms N`` delays every final reply line (greeting, EHLO's last line,
MAIL, RCPT, DATA, the final dot, QUIT) by N ms: one simulated WAN round
trip per command, as smtplib does no pipelining.

It is not tests/smtpsink.py because it must be fast and cheap to measure
through: it writes nothing to disk (tests/smtpsink.py writes and renames a
JSON file for every message, work that would be timed with mailout's), and
its control channel answers counts and arrival times without a directory
listing.
"""
import argparse
import asyncio
import json
import socket
import ssl
import sys
import threading
import time

from aiosmtpd.smtp import SMTP

_ID = b'\nX-Bench-Id: '


class Counter:

    def __init__(self):
        self.reset()

    def reset(self):
        self.count = 0
        self.first = 0
        self.last = 0
        self.connections = 0
        self.duplicates = 0
        self.stamps = {}
        self.waiters = []

    def arrived(self, content):
        now = time.monotonic_ns()
        self.count += 1
        if not self.first:
            self.first = now
        self.last = now
        start = content.find(_ID)       # never the first header line
        if start >= 0:
            start += len(_ID)
            end = content.find(b'\r', start)
            key = content[start:end].decode('ascii').strip()
            if key in self.stamps:
                self.duplicates += 1
            else:
                self.stamps[key] = now
        for waiter in list(self.waiters):
            n, future = waiter
            if self.count >= n and not future.done():
                future.set_result(None)
                self.waiters.remove(waiter)

    def status(self):
        return f'{self.count} {self.first} {self.last} {self.connections}'


class Handler:

    def __init__(self, counter):
        self.counter = counter

    async def handle_DATA(self, server, session, envelope):
        self.counter.arrived(envelope.content)
        return '250 OK'


class SinkSMTP(SMTP):

    def __init__(self, handler, counter, delay, **options):
        super().__init__(handler, **options)
        self.delay = delay
        counter.connections += 1

    async def push(self, status):
        if self.delay:
            final = status[3:4] not in ('-', b'-')
            if final:
                await asyncio.sleep(self.delay)
        await super().push(status)


async def control(counter, reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            words = line.decode('ascii').split()
            if not words:
                continue
            command = words[0].upper()
            if command == 'RESET':
                for _, future in counter.waiters:
                    if not future.done():
                        future.set_result(None)
                counter.reset()
                reply = 'OK'
            elif command == 'COUNT':
                reply = counter.status()
            elif command == 'WAIT':
                n, timeout = int(words[1]), float(words[2])
                if counter.count < n:
                    future = asyncio.get_running_loop().create_future()
                    counter.waiters.append((n, future))
                    try:
                        await asyncio.wait_for(future, timeout)
                    except asyncio.TimeoutError:
                        pass
                reply = counter.status()
            elif command == 'STAMPS':
                reply = json.dumps(counter.stamps)
            elif command == 'DUPLICATES':
                reply = str(counter.duplicates)
            else:
                reply = f'ERROR unknown command {command}'
            writer.write(reply.encode('ascii') + b'\n')
            await writer.drain()
    finally:
        writer.close()


def listening_socket():
    # IPPROTO_TCP explicitly, or asyncio sets no TCP_NODELAY on the
    # accepted sockets (+40 ms a connection: Nagle and delayed ACKs).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(('127.0.0.1', 0))
    sock.listen(512)
    return sock


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--starttls', nargs=2, metavar=('CERT', 'KEY'),
                        help='offer and require STARTTLS with this '
                             'certificate chain and key (PEM files)')
    parser.add_argument('--delay-ms', type=float, default=0,
                        help='delay every reply by this many ms')
    args = parser.parse_args(argv)

    counter = Counter()
    handler = Handler(counter)
    options = {'hostname': 'sink.bench', 'decode_data': False,
               'data_size_limit': None}
    if args.starttls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*args.starttls)
        options['tls_context'] = context
        options['require_starttls'] = True
    delay = args.delay_ms / 1000

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    smtp_sock = listening_socket()
    control_sock = listening_socket()
    smtp_server = loop.run_until_complete(loop.create_server(
        lambda: SinkSMTP(handler, counter, delay, **options),
        sock=smtp_sock))
    control_server = loop.run_until_complete(asyncio.start_server(
        lambda r, w: control(counter, r, w), sock=control_sock))
    print(smtp_sock.getsockname()[1], control_sock.getsockname()[1],
          flush=True)

    def stop_when_stdin_closes():
        sys.stdin.read()
        loop.call_soon_threadsafe(loop.stop)
    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    try:
        loop.run_forever()
    finally:
        smtp_server.close()
        control_server.close()


if __name__ == '__main__':
    main()
