"""A real SMTP server process for the tests: aiosmtpd on 127.0.0.1.

Run as ``python smtpsink.py --dir DIR [options]``.  It prints its port on
the first line of stdout, writes every accepted message to DIR as one JSON
file (``NNNNNN.json``: mail_from, rcpt_tos, data as latin-1 text, tls,
auth, peer = the client's port), and exits when its stdin closes, so it
dies with the test run.
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


class Recorder:

    def __init__(self, directory, args):
        self.directory = directory
        self.args = args
        self.counter = itertools.count(len(os.listdir(directory)) + 1)

    async def handle_MAIL(self, server, session, envelope, address,
                          mail_options):
        if self.args.mail_reply:
            return self.args.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return '250 OK'

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address in self.args.refuse:
            return self.args.refuse[address]
        envelope.rcpt_tos.append(address)
        return '250 OK'

    async def handle_DATA(self, server, session, envelope):
        record = {
            'mail_from': envelope.mail_from,
            'rcpt_tos': envelope.rcpt_tos,
            'data': envelope.original_content.decode('latin-1'),
            # session.ssl is only set by STARTTLS; implicit TLS (--ssl) shows
            # in the transport.
            'tls': session.ssl is not None
            or server.transport.get_extra_info('ssl_object') is not None,
            'auth': bool(session.authenticated),
            'peer': session.peer[1],
        }
        name = f'{next(self.counter):06d}.json'
        tmp = os.path.join(self.directory, '.' + name)
        with open(tmp, 'w') as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(self.directory, name))
        return '250 Message accepted'


class SinkSMTP(SMTP):
    """aiosmtpd's SMTP, optionally saying ``idle_reply`` (as Postfix says
    "421 4.4.2 ... timeout exceeded") before it closes an idle connection.
    """

    def __init__(self, handler, idle_reply=None, **options):
        super().__init__(handler, **options)
        self.idle_reply = idle_reply

    def _timeout_cb(self):
        if self.idle_reply and self.transport is not None:
            self.transport.write(self.idle_reply.encode('ascii') + b'\r\n')
        super()._timeout_cb()


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
    parser.add_argument('--auth', metavar='USER:PASSWORD')
    parser.add_argument('--refuse', action='append', default=[],
                        metavar='ADDRESS=REPLY',
                        help='answer RCPT TO:<ADDRESS> with REPLY')
    parser.add_argument('--mail-reply', metavar='REPLY',
                        help='answer every MAIL FROM with REPLY')
    parser.add_argument('--idle-timeout', type=float, metavar='SECONDS',
                        help='close a connection idle this long')
    parser.add_argument('--idle-reply', metavar='REPLY',
                        help='say REPLY before closing an idle connection')
    args = parser.parse_args(argv)
    args.refuse = dict(r.split('=', 1) for r in args.refuse)

    options = {'hostname': 'sink.test', 'idle_reply': args.idle_reply}
    if args.idle_timeout:
        options['timeout'] = args.idle_timeout
    if args.starttls:
        options['tls_context'] = tls_context(*args.starttls)
        options['require_starttls'] = args.require_starttls
    if args.auth:
        options['authenticator'] = authenticator(args.auth)
        options['auth_require_tls'] = False
    handler = Recorder(args.dir, args)

    # IPPROTO_TCP explicitly, or asyncio sets no TCP_NODELAY (+40 ms a
    # connection through Nagle and delayed ACKs).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(('127.0.0.1', 0))
    sock.listen(128)

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: SinkSMTP(handler, **options), sock=sock,
        ssl=tls_context(*args.ssl) if args.ssl else None))
    print(sock.getsockname()[1], flush=True)

    def stop_when_stdin_closes():
        sys.stdin.read()
        loop.call_soon_threadsafe(loop.stop)
    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == '__main__':
    main()
