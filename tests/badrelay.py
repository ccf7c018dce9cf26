"""A misbehaving SMTP server process for the tests: replies that never end.

Run as ``python badrelay.py --at POINT --fault FAULT``.  It speaks just
enough SMTP to take a message (greeting, EHLO, MAIL, RCPT, DATA, RSET,
NOOP, QUIT), and at POINT -- the greeting, or the reply to EHLO, MAIL, RCPT,
DATA or the final dot -- starts a multi-line reply that does not end:

- ``stall``: one line, then silence (the connection stays open);
- ``trickle``: a line every --interval seconds (default 0.2), for ever;
- ``endless``: lines as fast as the client reads them, for ever, or until
  --reply-size bytes, then a last line that ends the reply.

Or, with ``--fault deaf``, it answers DATA and then reads no more, so the
client's sending of the message stalls.

It listens on 127.0.0.1, prints its port on the first line of stdout and
exits when its stdin closes, as tests/smtpsink.py does.

Why not an option of tests/smtpsink.py: these faults break the framing of
SMTP replies (a multi-line reply with no last line, also in the greeting
and in EHLO's reply) or stop reading in the middle of DATA, which aiosmtpd
does for its handlers and does not let them change; so this server speaks
SMTP by hand, a few lines a command.
"""
import argparse
import asyncio
import itertools

from smtpsink import serve_until_stdin_closes
from smtpsink import tcp_listener

POINTS = ('greeting', 'ehlo', 'mail', 'rcpt', 'data', 'dot')
FAULTS = ('stall', 'trickle', 'endless', 'deaf')
CODES = {'greeting': '220', 'data': '354'}     # else 250


class BadRelay:

    def __init__(self, args):
        self.args = args

    async def serve(self, reader, writer):
        try:
            await self.session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError,
                asyncio.CancelledError):
            pass        # the client gave up (as a test wants), or stdin closed
        finally:
            writer.close()

    async def session(self, reader, writer):
        await self.reply(writer, 'greeting', '220 badrelay.test ESMTP')
        while True:
            line = await reader.readuntil(b'\n')
            verb = line[:4].upper()
            if verb in (b'EHLO', b'HELO'):
                await self.reply(writer, 'ehlo',
                                 '250-badrelay.test\r\n250 8BITMIME')
            elif verb == b'MAIL':
                await self.reply(writer, 'mail', '250 2.1.0 OK')
            elif verb == b'RCPT':
                await self.reply(writer, 'rcpt', '250 2.1.5 OK')
            elif verb == b'DATA':
                await self.reply(writer, 'data', '354 End data with .')
                if self.args.fault == 'deaf':
                    await asyncio.get_running_loop().create_future()
                while await reader.readuntil(b'\n') != b'.\r\n':
                    pass
                await self.reply(writer, 'dot', '250 2.0.0 queued')
            elif verb == b'QUIT':
                await self.reply(writer, 'quit', '221 2.0.0 bye')
                return
            else:               # RSET, NOOP
                await self.reply(writer, 'other', '250 2.0.0 OK')

    async def reply(self, writer, point, text):
        if point == self.args.at:
            await getattr(self, self.args.fault)(writer, CODES.get(point,
                                                                   '250'))
        writer.write(text.encode() + b'\r\n')
        await writer.drain()

    async def stall(self, writer, code):
        writer.write(f'{code}-this reply stops here\r\n'.encode())
        await writer.drain()
        await asyncio.get_running_loop().create_future()    # for ever

    async def trickle(self, writer, code):
        for n in itertools.count(1):
            writer.write(f'{code}-trickle line {n}\r\n'.encode())
            await writer.drain()
            await asyncio.sleep(self.args.interval)

    async def endless(self, writer, code):
        line = f'{code}-{"x" * 994}\r\n'.encode()         # 1000 bytes
        sent = 0
        while self.args.reply_size is None or sent < self.args.reply_size:
            writer.write(line)
            await writer.drain()
            sent += len(line)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument('--at', choices=POINTS)
    parser.add_argument('--fault', choices=FAULTS, required=True)
    parser.add_argument('--interval', type=float, default=0.2,
                        metavar='SECONDS', help='trickle: between lines')
    parser.add_argument('--reply-size', type=int, metavar='BYTES',
                        help='endless: end the reply after this many bytes')
    args = parser.parse_args(argv)
    sock = tcp_listener()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(
        BadRelay(args).serve, sock=sock))
    print(sock.getsockname()[1], flush=True)
    serve_until_stdin_closes(loop, server)
    # End the connections still open, quietly.
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


if __name__ == '__main__':
    main()
