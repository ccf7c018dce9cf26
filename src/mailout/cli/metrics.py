"""``mailout metrics``: the state of the queues in Prometheus's text
format, printed or written for node_exporter's textfile collector."""
import time

from mailout.cli.base import Result
from mailout.cli.base import config_data
from mailout.cli.queue import QueueCommand


class Metrics(QueueCommand):
    group = None
    name = 'metrics'
    help = 'queue state in the Prometheus text format'
    description = (
        'Per queue: messages waiting, in progress, deferred and failed, and '
        'the age of the oldest waiting and oldest deferred message, in the '
        'Prometheus text exposition format.  --textfile writes it '
        "atomically (for node_exporter's textfile collector) and prints "
        'nothing.')

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument('--textfile', metavar='PATH',
                            help='write to PATH (a .prom file) instead')

    def run(self, args):
        from prometheus_client import generate_latest
        from prometheus_client import write_to_textfile

        from mailout.metrics import queue_registry
        source, statuses = self.statuses(args, time.time())
        registry = queue_registry(
            (s['deliveries'], s['path'], s) for s in statuses)
        if args.textfile:
            write_to_textfile(args.textfile, registry)
        return Result({'ok': True, 'config': config_data(args, source),
                       'queues': statuses,
                       'textfile': args.textfile,
                       'exposition': generate_latest(registry).decode()})

    def text(self, result):
        if not result.data['textfile']:
            print(result.data['exposition'], end='')
