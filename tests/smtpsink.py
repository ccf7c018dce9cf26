"""A real SMTP server process for the tests: aiosmtpd on 127.0.0.1.

Run as ``python smtpsink.py --dir DIR [options]``.  It prints its port on
the first line of stdout, writes every accepted message to DIR as one JSON
file (``NNNNNN.json``: mail_from, mail_options, rcpt_tos, data as latin-1
text, tls, auth, peer = the client's port), and exits when its stdin
closes, so it dies with the test run.

Faults, for the fault matrix (tests/test_faults.py): scripted replies
(--mail-reply, --rcpt-reply, --data-command-reply, --data-reply,
--starttls-reply), a connection dropped (--drop-at) or stalled (--stall,
--stall-at) at a given point, a relay slow at DATA (--data-delay: each
accepted message is recorded, then its reply waits).  --faults N applies
them to the first N occasions only, then the sink behaves (--refuse and
--data-delay are not counted).  A message
received in full but never answered (dropped or stalled "after-dot", the
RFC 1047 window) is written as ``NNNNNN.unanswered`` instead of ``.json``.
Like a real server, the sink closes the connection after any 421 reply.
--port PORT listens on that port (a sink started again after an outage).
--pipelining offers PIPELINING (RFC 2920; aiosmtpd reads pipelined commands
as they come) and records per message whether the client pipelined: its
RCPT came with its MAIL (``pipelined``), the next message's MAIL came with
its final dot (``followed``).  --data-without-recipients answers DATA with
354 when no recipient was accepted, as some servers do, and records what
came up to the dot as ``NNNNNN.empty`` (``size``: a lone dot is 0).
--address ADDRESS listens on another loopback address (127.0.0.2: Linux
answers on all of 127/8).  --greeting-reply and --ehlo-reply (which answers
HELO too) script a relay that turns every connection away (421: overloaded,
shutting down).  --count-connections keeps the file ``connections`` in DIR
up to date: JSON ``{"open", "peak", "total"}``, the connections open now,
the most ever open at once, and all.

This is the SMTP (and LMTP) server for tests: `helpers.Sink` runs it and
reads what it recorded, conftest's ``sink`` and ``start_sink`` fixtures
start it.  Two others stay apart, each saying why in its docstring:
tests/badrelay.py (replies that never end, below what aiosmtpd lets a
handler do) and the crash loop's sink in tests/crashloop.py (one seeded
random stream, an append-only record file); bench/sink.py only counts.
Both test servers use `tcp_listener` and `serve_until_stdin_closes`.
"""
import argparse
import asyncio
import itertools
import json
import os
import socket
import ssl
import sys
import threading

from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import AuthResult
from aiosmtpd.smtp import syntax


class Recorder:

    def __init__(self, directory, args):
        self.directory = directory
        self.args = args
        self.counter = itertools.count(len(os.listdir(directory)) + 1)
        self.faults_left = args.faults
        self.connections = {'open': 0, 'peak': 0, 'total': 0}

    def connected(self, change):
        """A connection was opened (``change`` 1) or closed (-1): write
        the counts (--count-connections)."""
        counts = self.connections
        counts['open'] += change
        counts['peak'] = max(counts['peak'], counts['open'])
        counts['total'] += change > 0
        tmp = os.path.join(self.directory, '.connections')
        with open(tmp, 'w') as f:
            json.dump(counts, f)
        os.rename(tmp, os.path.join(self.directory, 'connections'))

    def fault(self):
        """Whether a configured fault happens now; uses up one of --faults.
        """
        if self.faults_left is None:
            return True
        if self.faults_left > 0:
            self.faults_left -= 1
            return True
        return False

    async def handle_MAIL(self, server, session, envelope, address,
                          mail_options):
        if self.args.auth_required and not session.authenticated:
            return '530 5.7.0 Authentication required'
        if self.args.mail_reply and self.fault():
            return self.args.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return '250 OK'

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address in self.args.refuse:
            return self.args.refuse[address]
        if self.args.rcpt_reply and self.fault():
            return self.args.rcpt_reply
        envelope.rcpt_tos.append(address)
        return '250 OK'

    async def handle_EHLO(self, server, session, envelope, hostname,
                          responses):
        session.host_name = hostname
        if self.args.pipelining:
            responses.insert(-1, '250-PIPELINING')
        return responses

    async def handle_DATA(self, server, session, envelope):
        record = {
            'mail_from': envelope.mail_from,
            'mail_options': envelope.mail_options,
            'rcpt_tos': envelope.rcpt_tos,
            'data': envelope.original_content.decode('latin-1'),
            # session.ssl is only set by STARTTLS; implicit TLS (--ssl) shows
            # in the transport.
            'tls': session.ssl is not None
            or server.transport.get_extra_info('ssl_object') is not None,
            'auth': bool(session.authenticated),
            # The client's port; on a unix socket, the connection's id.
            'peer': session.peer[1] if isinstance(session.peer, tuple)
            else id(server),
            'pipelined': server.pipelined,
            'followed': server.buffered().upper().startswith(b'MAIL'),
        }
        misbehaviour = server.fault_at('after-dot')
        if misbehaviour:
            # The whole message is here, but the client never hears so.
            self.save(record, 'unanswered')
            await server.misbehave(misbehaviour)
        if self.args.data_reply and self.fault():
            return self.args.data_reply
        if self.args.lmtp:
            reply = self.lmtp_replies(envelope, record)
        else:
            self.save(record, 'json')
            reply = '250 Message accepted'
        if self.args.data_delay:
            # Slow at DATA: the message is recorded, its reply waits (the
            # loop serves the other connections meanwhile).
            await asyncio.sleep(self.args.data_delay)
        return reply

    def lmtp_replies(self, envelope, record):
        # LMTP answers the final dot once per accepted recipient; each line
        # of the returned text goes out as one reply.
        replies = [self.args.deliver_reply.get(rcpt, '250 2.0.0 delivered')
                   for rcpt in envelope.rcpt_tos]
        record['rcpt_tos'] = [rcpt for rcpt, reply in
                              zip(envelope.rcpt_tos, replies)
                              if reply.startswith('2')]
        if record['rcpt_tos']:
            self.save(record, 'json')
        return '\r\n'.join(replies)

    def save(self, record, extension):
        name = f'{next(self.counter):06d}.{extension}'
        tmp = os.path.join(self.directory, '.' + name)
        with open(tmp, 'w') as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(self.directory, name))


class LHLOMixin:
    """LMTP's greeting (aiosmtpd.lmtp.LMTP's, over the sink's faults)."""
    show_smtp_greeting = False

    @syntax('LHLO hostname')
    async def smtp_LHLO(self, arg):
        await super().smtp_EHLO(arg)

    async def smtp_EHLO(self, arg):
        await self.push('500 Error: command "EHLO" not recognized')

    smtp_HELO = smtp_EHLO


#: Where --drop-at and --stall-at can strike: before the greeting, on the
#: MAIL, RCPT or DATA command (before replying), after some of the message
#: data, and after the final dot (before replying).
POINTS = ('connect', 'mail', 'rcpt', 'data-start', 'data-middle',
          'after-dot')


class SinkSMTP(SMTP):
    """aiosmtpd's SMTP with the sink's faults; optionally saying
    ``idle_reply`` (as Postfix says "421 4.4.2 ... timeout exceeded") before
    it closes an idle connection.
    """

    def __init__(self, handler, idle_reply=None, **options):
        super().__init__(handler, **options)
        self.idle_reply = idle_reply
        self.args = handler.args
        self.pipelined = False      # the current MAIL came with its RCPT
        self.counted = False        # by --count-connections

    def connection_made(self, transport):
        # Made again by STARTTLS: counted once.
        if self.args.count_connections and self.transport is None:
            self.counted = True
            self.event_handler.connected(1)
        super().connection_made(transport)

    def connection_lost(self, error):
        if self.counted:
            self.counted = False
            self.event_handler.connected(-1)
        super().connection_lost(error)

    def buffered(self):
        """What the client sent that is not read yet."""
        return bytes(self._reader._buffer)

    def _timeout_cb(self):
        if self.idle_reply and self.transport is not None:
            self.transport.write(self.idle_reply.encode('ascii') + b'\r\n')
        super()._timeout_cb()

    def fault_at(self, point):
        """'drop' or 'stall' if the connection is to misbehave at
        ``point`` now, else None."""
        for kind, at in (('drop', self.args.drop_at),
                         ('stall', self.args.stall_at)):
            if at == point and self.event_handler.fault():
                return kind
        return None

    async def misbehave(self, kind):
        """Close the connection (after stalling for --stall seconds if
        ``kind`` is 'stall') without a word; never returns."""
        if kind == 'stall':
            await asyncio.sleep(self.args.stall)
        if self.transport is not None:
            self.transport.close()
        # connection_lost() cancels this coroutine.
        await asyncio.get_running_loop().create_future()

    async def push(self, status):
        await super().push(status)
        # "421 <domain> Service not available, closing transmission channel"
        if isinstance(status, bytes):
            status = status.decode('ascii', 'replace')
        if status.startswith('421 ') and self.transport is not None:
            self.transport.close()

    async def _handle_client(self):
        misbehaviour = self.fault_at('connect')
        if misbehaviour:
            await self.misbehave(misbehaviour)
        if self.args.greeting_reply and self.event_handler.fault():
            await self.push(self.args.greeting_reply)
            await self.misbehave('drop')
        await super()._handle_client()

    async def smtp_EHLO(self, arg):
        if self.args.ehlo_reply and self.event_handler.fault():
            await self.push(self.args.ehlo_reply)
            return
        await super().smtp_EHLO(arg)

    async def smtp_HELO(self, arg):
        if self.args.ehlo_reply and self.event_handler.fault():
            await self.push(self.args.ehlo_reply)
            return
        await super().smtp_HELO(arg)

    async def smtp_MAIL(self, arg):
        self.pipelined = self.buffered().upper().startswith(b'RCPT')
        misbehaviour = self.fault_at('mail')
        if misbehaviour:
            await self.misbehave(misbehaviour)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        misbehaviour = self.fault_at('rcpt')
        if misbehaviour:
            await self.misbehave(misbehaviour)
        await super().smtp_RCPT(arg)

    async def smtp_STARTTLS(self, arg):
        if self.args.starttls_reply and self.event_handler.fault():
            await self.push(self.args.starttls_reply)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_DATA(self, arg):
        misbehaviour = self.fault_at('data-start')
        if misbehaviour:
            await self.misbehave(misbehaviour)
        if self.args.data_without_recipients and self.envelope.mail_from \
                and not self.envelope.rcpt_tos:
            await self.push('354 End data with <CR><LF>.<CR><LF>')
            size = 0
            while (line := await self._reader.readuntil(b'\r\n')) \
                    != b'.\r\n':
                size += len(line)
            self.event_handler.save({'size': size}, 'empty')
            self._set_rset_state()
            await self.push('554 5.5.1 Error: no valid recipients')
            return
        if self.args.data_command_reply and self.envelope.rcpt_tos \
                and self.event_handler.fault():
            await self.push(self.args.data_command_reply)
            return
        misbehaviour = self.fault_at('data-middle')
        if not misbehaviour:
            return await super().smtp_DATA(arg)
        await self.push('354 End data with <CR><LF>.<CR><LF>')
        received = 0
        while received < 64 * 1024:     # some of the message, not all
            line = await self._reader.readuntil(b'\r\n')
            if line == b'.\r\n':
                break
            received += len(line)
        await self.misbehave(misbehaviour)


def authenticator(credentials):
    user, password = credentials.split(':', 1)

    def check(server, session, envelope, mechanism, auth_data):
        ok = (auth_data.login.decode(), auth_data.password.decode()) \
            == (user, password)
        # handled=False: let aiosmtpd answer 535; handled=True would mean
        # this function had replied itself, and the client waits forever.
        return AuthResult(success=ok, handled=False)
    return check


def tls_context(cert, key):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument('--dir', required=True)
    parser.add_argument('--starttls', nargs=2, metavar=('CERT', 'KEY'))
    parser.add_argument('--ssl', nargs=2, metavar=('CERT', 'KEY'))
    parser.add_argument('--require-starttls', action='store_true')
    parser.add_argument('--lmtp', action='store_true',
                        help='speak LMTP (RFC 2033) instead of SMTP')
    parser.add_argument('--unix', metavar='PATH',
                        help='listen on this unix socket (prints 0)')
    parser.add_argument('--port', type=int, default=0,
                        help='listen on this TCP port (default: one the '
                             'system picks), e.g. that of a sink stopped '
                             'for an outage')
    parser.add_argument('--address', default='127.0.0.1',
                        help='listen on this IPv4 address (default '
                             '127.0.0.1; 127.0.0.2 and so on answer too)')
    parser.add_argument('--greeting-reply', metavar='REPLY',
                        help='greet with REPLY instead of 220, then close')
    parser.add_argument('--ehlo-reply', metavar='REPLY',
                        help='answer EHLO and HELO with REPLY')
    parser.add_argument('--count-connections', action='store_true',
                        help='keep DIR/connections up to date: the '
                             'connections open, the peak, the total')
    parser.add_argument('--deliver-reply', action='append', default=[],
                        metavar='ADDRESS=REPLY',
                        help='LMTP: answer the final dot for ADDRESS with '
                             'REPLY')
    parser.add_argument('--smtputf8', action='store_true',
                        help='offer SMTPUTF8 (RFC 6531)')
    parser.add_argument('--pipelining', action='store_true',
                        help='offer PIPELINING (RFC 2920)')
    parser.add_argument('--data-without-recipients', action='store_true',
                        help='answer DATA with 354 when no recipient was '
                             'accepted')
    parser.add_argument('--auth', metavar='USER:PASSWORD')
    parser.add_argument('--auth-required', action='store_true',
                        help='with --auth: answer MAIL FROM before AUTH '
                             'with 530')
    parser.add_argument('--refuse', action='append', default=[],
                        metavar='ADDRESS=REPLY',
                        help='answer RCPT TO:<ADDRESS> with REPLY')
    parser.add_argument('--mail-reply', metavar='REPLY',
                        help='answer every MAIL FROM with REPLY')
    parser.add_argument('--idle-timeout', type=float, metavar='SECONDS',
                        help='close a connection idle this long')
    parser.add_argument('--idle-reply', metavar='REPLY',
                        help='say REPLY before closing an idle connection')
    parser.add_argument('--rcpt-reply', metavar='REPLY',
                        help='answer every RCPT TO with REPLY')
    parser.add_argument('--data-command-reply', metavar='REPLY',
                        help='answer the DATA command with REPLY, not 354')
    parser.add_argument('--data-reply', metavar='REPLY',
                        help='answer the end of the message data with REPLY '
                             '(the message is not recorded)')
    parser.add_argument('--data-delay', type=float, metavar='SECONDS',
                        help='wait this long before answering the final '
                             'dot of an accepted message (a relay slow at '
                             'DATA); other connections are served meanwhile')
    parser.add_argument('--starttls-reply', metavar='REPLY',
                        help='answer STARTTLS (offered) with REPLY')
    parser.add_argument('--drop-at', choices=POINTS,
                        help='close the connection there, without a reply')
    parser.add_argument('--stall', type=float, metavar='SECONDS',
                        help='say nothing for this long (default an hour), '
                             'then close the connection')
    parser.add_argument('--stall-at', choices=POINTS,
                        help='where to stall (default: connect, before the '
                             'greeting)')
    parser.add_argument('--faults', type=int, metavar='N',
                        help='apply the faults above N times only')
    args = parser.parse_args(argv)
    args.refuse = dict(r.split('=', 1) for r in args.refuse)
    args.deliver_reply = dict(r.split('=', 1) for r in args.deliver_reply)
    if args.stall is not None and args.stall_at is None:
        args.stall_at = 'connect'
    if args.stall is None:
        args.stall = 3600

    options = {'hostname': 'sink.test', 'idle_reply': args.idle_reply}
    if args.idle_timeout:
        options['timeout'] = args.idle_timeout
    if args.smtputf8:
        options['enable_SMTPUTF8'] = True
    if args.starttls:
        options['tls_context'] = tls_context(*args.starttls)
        options['require_starttls'] = args.require_starttls
    if args.auth:
        options['authenticator'] = authenticator(args.auth)
        options['auth_require_tls'] = False
    handler = Recorder(args.dir, args)

    # IPPROTO_TCP explicitly, or asyncio sets no TCP_NODELAY (+40 ms a
    # connection through Nagle and delayed ACKs).
    if args.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.unix)
    else:
        sock = tcp_listener(args.port, args.address)
    sock.listen(128)
    protocol = SinkLMTP if args.lmtp else SinkSMTP

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: protocol(handler, **options), sock=sock,
        ssl=tls_context(*args.ssl) if args.ssl else None))
    print(0 if args.unix else sock.getsockname()[1], flush=True)
    serve_until_stdin_closes(loop, server)


def tcp_listener(port=0, address='127.0.0.1'):
    """A socket listening on ``address``, on ``port`` (0: one the system
    picks).  Made
    with IPPROTO_TCP, or asyncio sets no TCP_NODELAY on its connections
    (+40 ms each through Nagle and delayed ACKs)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(128)
    return sock


def serve_until_stdin_closes(loop, *servers):
    """Run ``loop`` until standard input closes (the test run that started
    this process is gone), then close ``servers``."""
    def stop_when_stdin_closes():
        sys.stdin.read()
        loop.call_soon_threadsafe(loop.stop)
    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    try:
        loop.run_forever()
    finally:
        for server in servers:
            server.close()


class SinkLMTP(LHLOMixin, SinkSMTP):
    """The sink speaking LMTP."""


if __name__ == '__main__':
    main()
