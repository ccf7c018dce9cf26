"""``mailout demo``: mail through a queued delivery to an embedded SMTP
server, end to end."""
import asyncio
import os
import socket
import sys
import tempfile
import threading
import time

from mailout.cli.base import FAILED
from mailout.cli.base import OK
from mailout.cli.base import Command
from mailout.cli.base import Result

DEMO_CONFIG = '''\
<mailout>
  <smtp-mailer demo-relay>
    host 127.0.0.1:{port}
    tls none
  </smtp-mailer>
  <queued-delivery default>
    mailer demo-relay
    queue-path {directory}/queue
  </queued-delivery>
</mailout>
'''

DEMO_ZCML = '''\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:mail="http://namespaces.zope.org/mailout">
  <include package="mailout" file="meta.zcml" />
  <include package="mailout" />
  <mail:deliveries config="{config}" />
</configure>
'''

AREAS = ('tmp', 'new', 'cur', 'deferred', 'failed')


class Demo(Command):
    """A tour, told as it happens: its text is its output (no --json)."""

    name = 'demo'
    help = ('send mail through a queued delivery to an embedded SMTP '
            'server, end to end')
    common_options = False

    def log_level(self, args):
        return None

    def run(self, args):
        """Start an SMTP server on 127.0.0.1, configure a queued delivery
        through ZConfig and ZCML, commit some messages, abort one, show
        what arrived."""
        import transaction
        from zope.component import getUtility
        from zope.configuration import xmlconfig
        from zope.event import notify
        from zope.processlifetime import ProcessStarting

        from mailout.interfaces import IMailDelivery

        received = []
        port = _start_server(received)
        directory = tempfile.mkdtemp(prefix='mailout-demo-')
        config_path = os.path.join(directory, 'mailout.conf')
        with open(config_path, 'w') as f:
            f.write(DEMO_CONFIG.format(port=port, directory=directory))
        print(f'SMTP server listening on 127.0.0.1:{port}')
        print(f'configuration: {config_path}')
        print(DEMO_CONFIG.format(port=port, directory=directory))

        xmlconfig.string(DEMO_ZCML.format(config=config_path))
        notify(ProcessStarting())           # what Zope says when it is ready
        delivery = getUtility(IMailDelivery, 'default')
        print(f'ZCML registered {delivery!r}')

        for i in range(1, args.messages + 1):
            message_id = delivery.send(
                'demo@example.org', [f'user{i}@example.org'],
                f'From: demo@example.org\r\nTo: user{i}@example.org\r\n'
                f'Subject: demo message {i}\r\n\r\nHello from mailout.\r\n')
            transaction.commit()
            print(f'committed message {i} <{message_id}>')
        delivery.send('demo@example.org', ['aborted@example.org'],
                      'Subject: this one is aborted\r\n\r\nNever sent.\r\n')
        transaction.abort()
        print('aborted a transaction with one more message')

        deadline = time.monotonic() + 10
        while len(received) < args.messages and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)                     # would anything else arrive?
        held = {area: delivery.queue.count(area) for area in AREAS}
        ok = (len(received) == args.messages and not any(held.values())
              and all('aborted' not in r[2] for r in received))
        return Result({'ok': ok, 'received': list(received), 'queue': held},
                      OK if ok else FAILED)

    def text(self, result):
        data = result.data
        print(f"\nthe SMTP server received {len(data['received'])} "
              'message(s):')
        for mail_from, rcpt_tos, subject in data['received']:
            print(f'  from {mail_from} to {", ".join(rcpt_tos)}: {subject}')
        print('queue now holds: ' + ', '.join(
            f'{area} {count}' for area, count in data['queue'].items()))
        print('demo ' + ('succeeded' if data['ok'] else 'FAILED'))

    def add_arguments(self, parser):
        parser.add_argument('--messages', type=int, default=3, metavar='N',
                            help='how many messages to commit (default 3)')


def _start_server(received):
    """An aiosmtpd server in a thread; returns its port."""
    try:
        from aiosmtpd.smtp import SMTP
    except ImportError:
        sys.exit("mailout demo needs aiosmtpd: pip install 'mailout[demo]'")

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            subject = next((line[9:] for line in
                            envelope.content.decode('utf-8', 'replace')
                            .splitlines() if line.startswith('Subject: ')),
                           '')
            received.append((envelope.mail_from, envelope.rcpt_tos, subject))
            return '250 OK'

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.bind(('127.0.0.1', 0))
    sock.listen()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(loop.create_server(
        lambda: SMTP(Handler(), hostname='demo.invalid'), sock=sock))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return sock.getsockname()[1]
