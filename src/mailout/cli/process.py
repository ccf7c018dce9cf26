"""``mailout process``: run the queue processors, as a daemon or once."""
import collections
import logging
import os
import signal
import sys
import threading
import time

from mailout.cli.base import FAILED
from mailout.cli.base import OK
from mailout.cli.base import Command
from mailout.cli.base import CommandError
from mailout.cli.base import Result
from mailout.cli.base import age
from mailout.cli.base import config_data
from mailout.cli.base import status_data
from mailout.cli.base import load_settings
from mailout.cli.base import processors
from mailout.cli.base import seconds_argument
from mailout.message import printable


class Tracker:
    """Counts what the processors did, from mailout's events, by delivery;
    keeps a record of the events of the kinds in ``keep`` only, so that a
    daemon's memory stays flat."""

    KINDS = ('sent', 'deferred', 'failed')

    def __init__(self, on_event=None, keep=()):
        self.records = []
        self.on_event = on_event
        self.keep = keep
        self._counts = collections.Counter()    # (delivery, kind) -> count
        self._lock = threading.Lock()

    def __enter__(self):
        import zope.event
        zope.event.subscribers.append(self)
        return self

    def __exit__(self, *exc):
        import zope.event
        zope.event.subscribers.remove(self)

    def __call__(self, event):
        from mailout.interfaces import IMailDeferredEvent
        from mailout.interfaces import IMailFailedEvent
        from mailout.interfaces import IMailSentEvent
        for kind, interface in zip(self.KINDS, (
                IMailSentEvent, IMailDeferredEvent, IMailFailedEvent)):
            if interface.providedBy(event):
                break
        else:
            return
        with self._lock:
            self._counts[event.delivery, kind] += 1
        if not self.on_event and kind not in self.keep:
            return
        reply = getattr(event, 'reply', None)
        record = {'event': kind, 'delivery': event.delivery,
                  'id': event.queue_id,
                  'message_id': event.message_id, 'from': event.fromaddr,
                  'to': list(event.toaddrs),
                  'reply': None if reply is None else _reply(reply)}
        with self._lock:
            if kind in self.keep:
                self.records.append(record)
            if self.on_event is not None:
                self.on_event(record)

    def counts(self, delivery=None):
        with self._lock:
            return {kind: sum(n for (d, k), n in self._counts.items()
                              if k == kind and delivery in (None, d))
                    for kind in self.KINDS}


def _reply(reply):
    code, text = reply
    return f'{code} {text}' if code else str(text)


class _Progress:
    """While a long ``process --once`` drains, its counts on stderr: one
    line updated in place on a terminal, a line every `EVERY` seconds
    otherwise (a log, cron's mail); nothing for a short run."""

    #: Seconds between lines off a terminal, and before the first line.
    EVERY = 10.0
    QUIET_FOR = 2.0

    def __init__(self, tracker, enabled=True):
        self.tracker = tracker
        self.enabled = enabled
        self.terminal = sys.stderr.isatty()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._shown = False

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        if self.enabled:
            self._thread.join()
            if self._shown and self.terminal:
                sys.stderr.write('\n')

    def _run(self):
        started = time.monotonic()
        if self._done.wait(self.QUIET_FOR):
            return
        while True:
            counts = self.tracker.counts()
            line = (f'mailout process --once: {sum(counts.values())} '
                    f"handled in {age(time.monotonic() - started)}: "
                    f"{counts['sent']} sent, {counts['deferred']} deferred, "
                    f"{counts['failed']} failed")
            if self.terminal:
                sys.stderr.write(f'\r{line}\x1b[K')
            else:
                sys.stderr.write(line + '\n')
            sys.stderr.flush()
            self._shown = True
            if self._done.wait(1.0 if self.terminal else self.EVERY):
                return


class Process(Command):
    name = 'process'
    help = 'run the queue processors of every queued delivery'
    description = (
        'Deliver the mail of every queued delivery in CONFIG (also those '
        'with "processor off", which is what this command is for) until '
        'SIGTERM or SIGINT; then finish the messages in hand and exit 0.  '
        'A second signal exits at once; claimed messages go back to the '
        'queue when a processor recovers them.  With --once, deliver what '
        'is due now and print what happened (exit 1 if a message was '
        'deferred or failed).  With --json the daemon prints one JSON '
        'object a line: started, each sent/deferred/failed, stopped.')

    def add_arguments(self, parser):
        parser.add_argument('--once', action='store_true',
                            help='deliver what is due, print a summary, exit')
        parser.add_argument('--grace', type=seconds_argument, default=60.0,
                            metavar='SECONDS',
                            help='how long to wait for messages in hand at '
                                 'a stop (default 60)')
        parser.add_argument('--metrics-port', type=int, metavar='PORT',
                            help='the daemon serves Prometheus metrics (the '
                                 "queues' state and the messages it "
                                 'handled) on 127.0.0.1:PORT/metrics')

    def log_level(self, args):
        # The daemon's log is its account of each message; --once reports
        # each outcome itself.
        return logging.CRITICAL if args.once else logging.INFO

    def run(self, args):
        settings, source = load_settings(args)
        found = processors(settings)
        if not found:
            raise CommandError(FAILED, f'{source} has no queued delivery: '
                                       'nothing to process')
        source = config_data(args, source)
        if args.once:
            return self.once(source, found, progress=not args.json)
        return self.daemon(args, source, found, settings)

    # -- --once

    def once(self, source, found, progress=True):
        queues = []
        with Tracker(keep=('deferred', 'failed')) as tracker, \
                _Progress(tracker, enabled=progress):
            for name, delivery, processor in found:
                handled = processor.run_once()
                queues.append({'delivery': name, 'path': delivery.queue.path,
                               'handled': handled, **tracker.counts(name),
                               'now': status_data(delivery.queue.status())})
        totals = tracker.counts()
        ok = not totals['deferred'] and not totals['failed']
        return Result({'ok': ok, 'config': source, 'queues': queues,
                       **totals, 'events': tracker.records},
                      OK if ok else FAILED)

    # -- the daemon: a stream of events, each shown as it happens

    def daemon(self, args, source, found, settings):
        lock = threading.Lock()

        def emit(data):
            with lock:
                self.show(args, Result(data, lines=True))
        stop = threading.Event()

        def on_signal(signum, frame):
            if stop.is_set():
                print(f'mailout process: {signal.Signals(signum).name} '
                      'again: leaving now; claimed messages return to the '
                      'queue when a processor recovers them',
                      file=sys.stderr, flush=True)
                os._exit(FAILED)
            stop.set()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        if args.metrics_port is not None:
            _serve_metrics(args.metrics_port, found, settings)
        started = time.time()
        # Each message's event is JSON only: the text of the daemon is its
        # log (on stderr).
        with Tracker(on_event=emit if args.json else None) as tracker:
            for name, delivery, processor in found:
                processor.start()
            emit({'event': 'started', 'config': source, 'pid': os.getpid(),
                  'queues': [{'delivery': name, 'path': delivery.queue.path,
                              'connections': processor.connections}
                             for name, delivery, processor in found]})
            while not stop.wait(1):
                pass
            if not args.json:       # a note for people, no result
                print('stopping: finishing the messages in hand',
                      flush=True)
            # Stop all at once: each finishes its message in hand,
            # meanwhile no other one starts a new message.
            stoppers = [threading.Thread(target=processor.stop,
                                         args=(args.grace,))
                        for _, _, processor in found]
            for thread in stoppers:
                thread.start()
            for thread in stoppers:
                thread.join()
        return Result({'event': 'stopped',
                       'uptime': round(time.time() - started, 3),
                       'queues': [{'delivery': name, **tracker.counts(name)}
                                  for name, _, _ in found],
                       **tracker.counts()}, lines=True)

    # -- text

    def text(self, result):
        data = result.data
        render = {'started': self._started, 'stopped': self._stopped,
                  None: self._once}[data.get('event')]
        render(data)

    def _once(self, data):
        if not any(r['handled'] for r in data['queues']):
            return          # nothing to do: nothing for cron to mail
        for r in data['queues']:
            now = r['now']
            print(f"{r['delivery']} ({r['path']}): {r['handled']} handled: "
                  f"{r['sent']} sent, {r['deferred']} deferred, "
                  f"{r['failed']} failed; now {now['waiting']} waiting, "
                  f"{now['deferred']} deferred, {now['failed']} failed")
        for record in data['events']:
            print(f"  {record['event']}: {printable(record['id'])} to "
                  f"{printable(', '.join(record['to']))}: "
                  f"{printable(record['reply'])}")

    def _started(self, data):
        print(f"mailout process {data['pid']}: {data['config']['source']}",
              flush=True)
        for q in data['queues']:
            print(f"  processing {q['delivery']} ({q['path']}) with "
                  f"{q['connections']} connection(s)", flush=True)
        print('stop with SIGTERM or SIGINT', flush=True)

    def _stopped(self, data):
        for q in data['queues']:
            print(f"  {q['delivery']}: {q['sent']} sent, {q['deferred']} "
                  f"deferred, {q['failed']} failed", flush=True)
        print(f"stopped after {age(data['uptime'])}", flush=True)


def _serve_metrics(port, found, settings):
    """Serve the queues' state and relays (computed at each scrape) and the
    counts of this daemon's messages on 127.0.0.1:``port``."""
    import prometheus_client

    from mailout import metrics
    from mailout.cli.queue import relay_states

    def statuses():
        for name, delivery, _ in found:
            path = delivery.queue.path
            yield [name], path, {
                **delivery.queue.status(),
                'relays': relay_states(settings, [name], path, time.time())}
    metrics.count_events()
    prometheus_client.REGISTRY.register(metrics.QueueCollector(statuses))
    prometheus_client.start_http_server(port, addr='127.0.0.1')
