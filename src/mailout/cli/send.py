"""``mailout send``: send a test message through a configured delivery."""
import dataclasses
import email.message
import logging
import socket

from mailout.cli.base import FAILED
from mailout.cli.base import OK
from mailout.cli.base import USAGE
from mailout.cli.base import Command
from mailout.cli.base import CommandError
from mailout.cli.base import Result
from mailout.cli.base import config_data
from mailout.cli.base import load_settings
from mailout.cli.base import seconds_argument
from mailout.message import printable


class Send(Command):
    name = 'send'
    help = 'send a test message'
    description = (
        'Send a test message through a configured delivery.  Queued: commit '
        "it, then run that queue's processor once and report what happened "
        'to it (other messages due in that queue go too).  Direct: commit '
        '(the relay takes it or the commit fails).  Exit 1 unless sent.')

    def add_arguments(self, parser):
        parser.add_argument('--from', dest='fromaddr', required=True,
                            metavar='ADDRESS', help='envelope sender and From')
        parser.add_argument('--to', dest='toaddrs', required=True,
                            action='append', metavar='ADDRESS',
                            help='recipient (repeatable)')
        parser.add_argument('--subject', default='mailout test message')
        parser.add_argument('--body', default=None,
                            help='text (default: a line naming host and '
                                 'delivery)')
        parser.add_argument('--delivery', metavar='NAME',
                            help="delivery to use (default 'default', or "
                                 'the only one)')
        parser.add_argument('--timeout', type=seconds_argument,
                            metavar='SECONDS',
                            help="instead of the mailers' timeout")

    def log_level(self, args):
        return logging.CRITICAL     # the report says what happened

    def run(self, args):
        import transaction

        from mailout import factories
        from mailout.config import QueuedDeliverySettings
        from mailout.interfaces import MailoutError
        from mailout.cli.process import Tracker
        settings, source = load_settings(args)
        if args.timeout:
            settings = dataclasses.replace(settings, mailers={
                key: _with_timeout(mailer, args.timeout)
                for key, mailer in settings.mailers.items()})
        name = _delivery_name(args.delivery, settings.deliveries)
        chosen = settings.deliveries[name]
        queued = isinstance(chosen, QueuedDeliverySettings)
        # Only the chosen delivery: no other queue opened, no other mailer
        # built (nor its password file checked).
        mailer = factories.build_mailer(settings.mailers[chosen.mailer])
        delivery = factories.build_delivery(chosen, mailer, processor=False)
        if queued:
            processor = factories.build_processor(chosen, delivery.queue,
                                                  mailer)
        msg = _message(args, name, source)
        result = {'delivery': name, 'queued': queued,
                  'config': config_data(args, source)}
        try:
            result['message_id'] = delivery.send(args.fromaddr, args.toaddrs,
                                                 msg)
        except MailoutError as e:
            transaction.abort()
            raise CommandError(USAGE, f'{type(e).__name__}: {e}') from None
        try:
            transaction.commit()
        except Exception as e:
            transaction.abort()
            result.update(ok=False, outcome='failed',
                          error=f'{type(e).__name__}: {e}')
            return Result(result, FAILED)
        if not queued:
            result.update(ok=True, outcome='sent', to=list(args.toaddrs))
            return Result(result)

        result['path'] = delivery.queue.path
        with Tracker(keep=Tracker.KINDS) as tracker:
            processor.run_once()
        mine = [r for r in tracker.records
                if r['message_id'] == result['message_id']]
        result['events'] = mine
        result['others'] = len(tracker.records) - len(mine)
        kinds = {r['event'] for r in mine}
        result['outcome'] = ('failed' if 'failed' in kinds else
                             'deferred' if 'deferred' in kinds else
                             'sent' if 'sent' in kinds else 'queued')
        result['ok'] = kinds == {'sent'} or result['outcome'] == 'queued'
        return Result(result, OK if result['ok'] else FAILED)

    def text(self, result):
        data = result.data
        print(f"message <{printable(data.get('message_id'))}> via "
              + ('queued' if data['queued'] else 'direct')
              + f" delivery {data['delivery']}"
              + (f" ({data['path']})" if data.get('path') else ''))
        if 'error' in data:
            print(f"  not sent: {printable(data['error'])}")
        elif not data['queued']:
            print(f"  sent to {printable(', '.join(data['to']))}")
        elif data['outcome'] == 'queued':
            print('  queued; another processor took it (it was not seen '
                  'here)')
        for record in data.get('events', ()):
            to = printable(', '.join(record['to']))
            line = f"  {record['event']} to {to}"
            if record['reply']:
                line += f": {printable(record['reply'])}"
            if record['event'] != 'sent':
                line += f"  (mailout queue show {printable(record['id'])})"
            print(line)
        if data.get('others'):
            print(f"  ({data['others']} other message(s) of the queue "
                  'went too)')


def _delivery_name(name, deliveries):
    """The delivery ``--delivery`` names, or 'default', or the only one."""
    if name is None:
        if 'default' in deliveries:
            name = 'default'
        elif len(deliveries) == 1:
            [name] = deliveries
        else:
            raise CommandError(USAGE, 'which delivery? give --delivery '
                                      f'({", ".join(deliveries)})')
    if name not in deliveries:
        raise CommandError(USAGE, f'no delivery {name!r} (deliveries: '
                                  f'{", ".join(deliveries)})')
    return name


def _message(args, name, source):
    """The test message; refuses line breaks in the options."""
    for option, values in (('--from', [args.fromaddr]), ('--to', args.toaddrs),
                           ('--subject', [args.subject])):
        for value in values:
            if '\r' in value or '\n' in value:
                raise CommandError(
                    USAGE, f'{option} {value!r} contains a line break')
    msg = email.message.EmailMessage()
    msg['From'] = args.fromaddr
    msg['To'] = ', '.join(args.toaddrs)
    msg['Subject'] = args.subject
    msg.set_content(args.body if args.body is not None else
                    f'A test message sent by "mailout send" from '
                    f'{socket.getfqdn()} through delivery {name!r} '
                    f'({source}).\n')
    return msg


def _with_timeout(mailer, timeout):
    """Mailer settings with ``timeout`` (for those that have one)."""
    if 'timeout' in {f.name for f in dataclasses.fields(mailer)}:
        return dataclasses.replace(mailer, timeout=timeout)
    return mailer
