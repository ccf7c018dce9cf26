"""The ``mailout`` command: run queue processors, inspect and repair
queues, check relays, send a test message; and ``mailout demo``.

Every command but ``demo`` reads ``-C CONFIG`` (default ``$MAILOUT_CONFIG``):
a standalone mailout file or a Zope instance's ``zope.conf``.  Output is
for people unless ``--json`` is given; errors go to stderr.
"""
import argparse
import asyncio
import collections
import dataclasses
import email.message
import email.parser
import email.policy
import json
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time

from mailout.message import printable

#: Exit codes.
OK, FAILED, USAGE = 0, 1, 2

EPILOG = '''\
exit status: 0 done; 1 something failed (a relay, a delivery, the
configuration, a message not found); 2 usage error (bad arguments, no
configuration given, purge without --yes and without a terminal).

CONFIG is -C or $MAILOUT_CONFIG: a standalone mailout file, or a Zope
instance's zope.conf (%import mailout with a <mailout NAME> section, or
<product-config mailout> with config-file); the latter needs Zope in the
Python that runs mailout.  Run the command as the user the Zope processes
run as: queue files are that user's, mode 0600.
'''


class CommandError(Exception):
    """Ends a command with a message and an exit status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != 'demo':
        # The daemon's log is its account of each message; send and
        # process --once report each outcome themselves.
        if args.command == 'process' and not args.once:
            level = logging.INFO
        elif args.command in ('process', 'send'):
            level = logging.CRITICAL
        else:
            level = logging.WARNING
        if args.verbose:
            level = logging.INFO
        elif args.quiet:
            level = max(level, logging.ERROR)
        logging.basicConfig(
            level=level, stream=sys.stderr,
            format='%(asctime)s %(levelname)s %(name)s %(message)s')
    try:
        return args.run(args)
    except CommandError as e:
        return _fail(args, e.status, str(e))
    except ValueError as e:
        from mailout.queue import QueueError
        if not isinstance(e, QueueError):   # e.g. a queue refused as unsafe
            raise
        return _fail(args, FAILED, str(e))
    except PermissionError as e:
        return _fail(args, FAILED, f'{e.strerror}: {e.filename} (run mailout '
                                   'as the user that owns the queue)')
    except OSError as e:
        return _fail(args, FAILED, f'{type(e).__name__}: {e}')
    except KeyboardInterrupt:
        return _fail(args, FAILED, 'interrupted')


def _fail(args, status, message):
    if getattr(args, 'json', False):
        _print_json({'ok': False, 'error': message})
    command = ' '.join(filter(None, (args.command,
                                     getattr(args, 'queue_command', None))))
    print(f'mailout {command}: error: {printable(message)}', file=sys.stderr)
    return status


def _parser():
    parser = argparse.ArgumentParser(
        prog='mailout', epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Transactional, queued mail-out for Zope: run queue '
                    'processors, inspect and repair queues, check relays, '
                    'send a test message.')
    commands = parser.add_subparsers(dest='command', required=True,
                                     metavar='COMMAND')

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        '-C', '--config', metavar='CONFIG',
        default=os.environ.get('MAILOUT_CONFIG'),
        help='mailout file or zope.conf (default $MAILOUT_CONFIG)')
    common.add_argument('--json', action='store_true',
                        help='print JSON for scripts')
    common.add_argument('-v', '--verbose', action='store_true',
                        help='log what happens (INFO) to stderr')
    common.add_argument('-q', '--quiet', action='store_true',
                        help='log errors only')

    def command(parent, name, run, help, description=None, parents=True):
        sub = parent.add_parser(
            name, help=help, description=description or help, epilog=EPILOG,
            parents=[common] if parents else [],
            formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run)
        return sub

    process = command(
        commands, 'process', run_process,
        'run the queue processors of every queued delivery',
        'Deliver the mail of every queued delivery in CONFIG (also those '
        'with "processor off", which is what this command is for) until '
        'SIGTERM or SIGINT; then finish the messages in hand and exit 0.  '
        'A second signal exits at once; claimed messages go back to the '
        'queue when a processor recovers them.  With --once, deliver what '
        'is due now and print what happened (exit 1 if a message was '
        'deferred or failed).  With --json the daemon prints one JSON '
        'object a line: started, each sent/deferred/failed, stopped.')
    process.add_argument('--once', action='store_true',
                         help='deliver what is due, print a summary, exit')
    process.add_argument('--grace', type=_seconds, default=60.0,
                         metavar='SECONDS',
                         help='how long to wait for messages in hand at a '
                              'stop (default 60)')

    queue = commands.add_parser(
        'queue', help='inspect and repair queues', epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Inspect and repair the queues of the queued deliveries '
                    'in CONFIG.  A message ID is its file name in the queue '
                    '(any unique part of it will do).')
    queue_commands = queue.add_subparsers(dest='queue_command', required=True,
                                          metavar='QUEUE_COMMAND')

    def queue_command(name, run, help, description=None):
        sub = command(queue_commands, name, run, help, description)
        sub.add_argument('-d', '--delivery', metavar='NAME',
                         help='only the queue of this queued delivery')
        return sub

    queue_command(
        'status', run_queue_status, 'counts, oldest message, last error',
        'Per queue: messages waiting (new/), in progress (cur/), deferred, '
        'failed; the age of the oldest message not yet settled; the next '
        'retry; and the newest attempt line of a deferred or failed '
        'message.')
    listing = queue_command('list', run_queue_list, 'list queued messages')
    areas = listing.add_mutually_exclusive_group()
    areas.add_argument('--failed', action='store_const', dest='area',
                       const='failed', help='only failed messages')
    areas.add_argument('--deferred', action='store_const', dest='area',
                       const='deferred', help='only deferred messages')
    show = queue_command('show', run_queue_show,
                         'envelope, attempts and headers of one message')
    show.add_argument('id', metavar='ID')
    retry = queue_command(
        'retry', run_queue_retry, 'try failed or deferred messages again now',
        'Move messages from failed/ or deferred/ back to new/; a running '
        'processor takes them within its poll-interval ("mailout process '
        '--once" delivers them at once).  A failed message that failed for '
        'its age (max-lifetime) fails again at its next transient error.')
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument('id', metavar='ID', nargs='?')
    which.add_argument('--all-failed', action='store_true',
                       help='every failed message')
    which.add_argument('--all-deferred', action='store_true',
                       help='every deferred message')
    purge = queue_command(
        'purge', run_queue_purge, 'delete messages for good',
        'Delete one message (from new/, deferred/ or failed/; not while it '
        'is being delivered), or with --failed the failed messages, those '
        'that failed more than --older-than ago.  Asks on a terminal unless '
        '--yes; without a terminal and without --yes it refuses (exit 2).')
    purge.add_argument('id', metavar='ID', nargs='?')
    purge.add_argument('--failed', action='store_true',
                       help='failed messages (all of them, or with ID: only '
                            'its failed copy)')
    purge.add_argument('--older-than', type=_age_argument, metavar='AGE',
                       help='with --failed: those failed longer ago than '
                            'AGE (30s, 12h, 7d, 1d 12h)')
    purge.add_argument('-y', '--yes', action='store_true',
                       help='do not ask')
    purge.add_argument('-n', '--dry-run', action='store_true',
                       help='show what would be deleted')

    check = command(
        commands, 'check', run_check,
        'validate the configuration and reach every relay',
        'Load CONFIG, then connect to each relay of each SMTP mailer (EHLO, '
        'STARTTLS, AUTH as configured) without sending anything, and check '
        'that queue directories are writable.  Exit 1 if anything failed.')
    check.add_argument('--timeout', type=_seconds, metavar='SECONDS',
                       help="per relay (default: the mailer's timeout)")

    send = command(
        commands, 'send', run_send, 'send a test message',
        'Send a test message through a configured delivery.  Queued: commit '
        "it, then run that queue's processor once and report what happened "
        'to it (other messages due in that queue go too).  Direct: commit '
        '(the relay takes it or the commit fails).  Exit 1 unless sent.')
    send.add_argument('--from', dest='fromaddr', required=True,
                      metavar='ADDRESS', help='envelope sender and From')
    send.add_argument('--to', dest='toaddrs', required=True, action='append',
                      metavar='ADDRESS', help='recipient (repeatable)')
    send.add_argument('--subject', default='mailout test message')
    send.add_argument('--body', default=None,
                      help='text (default: a line naming host and delivery)')
    send.add_argument('--delivery', metavar='NAME',
                      help="delivery to use (default 'default', or the only "
                           'one)')

    demo = command(
        commands, 'demo', run_demo,
        'send mail through a queued delivery to an embedded SMTP server, '
        'end to end', parents=False)
    demo.add_argument('--messages', type=int, default=3, metavar='N',
                      help='how many messages to commit (default 3)')
    return parser


def _seconds(value):
    seconds = float(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f'not a positive number: {value}')
    return seconds


def _age_argument(value):
    from mailout.config import duration
    try:
        return duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- shared ---------------------------------------------------------------------

def _settings(args):
    """``(settings, source)`` from -C / $MAILOUT_CONFIG."""
    import ZConfig

    from mailout import config
    if not args.config:
        raise CommandError(USAGE, 'no configuration: give -C CONFIG or set '
                                  '$MAILOUT_CONFIG')
    try:
        return config.load_any(args.config)
    except (ZConfig.ConfigurationError, ImportError) as e:
        raise CommandError(FAILED, _config_error(args.config, e)) from None


def _config_error(path, error):
    message = str(error)
    return message if message.startswith(path) \
        else f'configuration {path}: {message}'


def _n(count, word, plural=None):
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _queued(settings, only=None, required=True):
    """``[(names, path)]``: the queued deliveries, one entry per queue
    directory, or those of delivery ``only``."""
    from mailout.config import QueuedDeliverySettings
    if only is not None:
        delivery = settings.deliveries.get(only)
        if delivery is None:
            raise CommandError(USAGE, f'no delivery {only!r} (deliveries: '
                                      f'{", ".join(settings.deliveries)})')
        if not isinstance(delivery, QueuedDeliverySettings):
            raise CommandError(USAGE, f'delivery {only!r} is not queued')
    queues = {}
    for name, delivery in settings.deliveries.items():
        if isinstance(delivery, QueuedDeliverySettings) \
                and only in (None, name):
            path = os.path.realpath(delivery.queue_path)
            queues.setdefault(path, []).append(name)
    if not queues and required:
        raise CommandError(FAILED, 'the configuration has no queued delivery')
    return [(names, path) for path, names in queues.items()]


def _open_queue(path, writable=False):
    """The Queue at ``path``, or None if it does not exist yet (nothing was
    ever queued there; not created here, so that an operator running as
    another user leaves no directory behind).  Inspection only reads:
    ``writable`` for the commands that move or delete."""
    from mailout.queue import Queue
    if not os.path.isdir(os.path.join(path, 'new')):
        return None
    return Queue(path, writable=writable)


def _print_json(data):
    # ASCII only: every other character \u-escaped, so that no control, bidi
    # override or separator from a queue file or a relay reaches a terminal
    # raw; a JSON reader gets the exact text back.
    print(json.dumps(data, indent=2), flush=True)


def _stamp(seconds):
    if seconds is None:
        return None
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(seconds))


def _age(seconds):
    """``3d 4h``, ``5m 10s``, ``12s``: the two largest units."""
    seconds = int(round(seconds))
    parts = []
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60), ('s', 1)):
        if seconds >= size or (unit == 's' and not parts):
            parts.append(f'{seconds // size}{unit}')
            seconds %= size
    return ' '.join(parts[:2])


def _relative(when, now):
    if when is None:
        return ''
    delta = when - now
    return f'in {_age(delta)}' if delta > 0 else f'due since {_age(-delta)}'


# -- process ----------------------------------------------------------------------

class _Tracker:
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


def _processors(settings):
    """``[(name, delivery, processor)]`` of every queued delivery, with a
    processor whether or not the configuration turns it on."""
    from mailout import factories
    from mailout.delivery import QueuedDelivery
    _, deliveries = factories.build_all(settings)
    result = []
    for name, delivery in deliveries.items():
        if isinstance(delivery, QueuedDelivery):
            processor = delivery.processor or factories.build_processor(
                settings.deliveries[name], delivery.queue, delivery.mailer)
            delivery.processor = None   # no lazy start at a commit here
            result.append((name, delivery, processor))
    return result


def run_process(args):
    settings, source = _settings(args)
    processors = _processors(settings)
    if not processors:
        raise CommandError(FAILED, f'{source} has no queued delivery: '
                                   'nothing to process')
    if args.once:
        return _process_once(args, source, processors)
    return _process_daemon(args, source, processors)


def _process_once(args, source, processors):
    results = []
    with _Tracker(keep=('deferred', 'failed')) as tracker:
        for name, delivery, processor in processors:
            handled = processor.run_once()
            status = delivery.queue.status()
            status['next_attempt'] = _stamp(status['next_attempt'])
            results.append({'delivery': name, 'path': delivery.queue.path,
                            'handled': handled, **tracker.counts(name),
                            'now': status})
    totals = tracker.counts()
    ok = not totals['deferred'] and not totals['failed']
    if args.json:
        _print_json({'ok': ok, 'config': source, 'queues': results,
                     **totals})
    else:
        for r in results:
            now = r['now']
            print(f"{r['delivery']} ({r['path']}): {r['handled']} handled: "
                  f"{r['sent']} sent, {r['deferred']} deferred, "
                  f"{r['failed']} failed; now {now['waiting']} waiting, "
                  f"{now['deferred']} deferred, {now['failed']} failed")
        for record in tracker.records:
            if record['event'] != 'sent':
                print(f"  {record['event']}: {printable(record['id'])} to "
                      f"{printable(', '.join(record['to']))}: "
                      f"{printable(record['reply'])}")
    return OK if ok else FAILED


def _process_daemon(args, source, processors):
    lock = threading.Lock()

    def emit(data):
        with lock:
            print(json.dumps(data), flush=True)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            print(f'mailout process: {signal.Signals(signum).name} again: '
                  'leaving now; claimed messages return to the queue when '
                  'a processor recovers them', file=sys.stderr, flush=True)
            os._exit(FAILED)
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    started = time.time()
    with _Tracker(on_event=emit if args.json else None) as tracker:
        for name, delivery, processor in processors:
            processor.start()
        queues = [{'delivery': name, 'path': delivery.queue.path,
                   'connections': processor.connections}
                  for name, delivery, processor in processors]
        if args.json:
            emit({'event': 'started', 'config': source, 'pid': os.getpid(),
                  'queues': queues})
        else:
            print(f'mailout process {os.getpid()}: {source}', flush=True)
            for q in queues:
                print(f"  processing {q['delivery']} ({q['path']}) with "
                      f"{q['connections']} connection(s)", flush=True)
            print('stop with SIGTERM or SIGINT', flush=True)
        while not stop.wait(1):
            pass
        if not args.json:
            print('stopping: finishing the messages in hand', flush=True)
        # Stop all at once: each finishes its message in hand, meanwhile no
        # other one starts a new message.
        stoppers = [threading.Thread(target=processor.stop,
                                     args=(args.grace,))
                    for _, _, processor in processors]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
    counts = {name: tracker.counts(name) for name, _, _ in processors}
    uptime = time.time() - started
    if args.json:
        emit({'event': 'stopped', 'uptime': round(uptime, 3),
              'queues': [{'delivery': name, **c}
                         for name, c in counts.items()],
              **tracker.counts()})
    else:
        for name, c in counts.items():
            print(f"  {name}: {c['sent']} sent, {c['deferred']} deferred, "
                  f"{c['failed']} failed", flush=True)
        print(f'stopped after {_age(uptime)}', flush=True)
    return OK


# -- queue ------------------------------------------------------------------------

def _queues_of(args, writable=False):
    settings, source = _settings(args)
    return source, [(names, path, _open_queue(path, writable))
                    for names, path in _queued(settings, args.delivery)]


def run_queue_status(args):
    source, queues = _queues_of(args)
    now = time.time()
    result = []
    for names, path, queue in queues:
        status = queue.status(now) if queue is not None else {
            'waiting': 0, 'in_progress': 0, 'deferred': 0, 'failed': 0,
            'oldest_age': None, 'next_attempt': None, 'last_error': None}
        result.append({'deliveries': names, 'path': path,
                       'exists': queue is not None, **status,
                       'next_attempt': _stamp(status['next_attempt'])})
        if not args.json:
            print(f"{', '.join(names)}  {path}"
                  + ('' if queue else '  (not created yet)'))
            print(f"  waiting      {status['waiting']}")
            print(f"  in progress  {status['in_progress']}")
            print(f"  deferred     {status['deferred']}" + (
                f"  (next attempt {_relative(status['next_attempt'], now)})"
                if status['next_attempt'] else ''))
            print(f"  failed       {status['failed']}")
            oldest = status['oldest_age']
            print(f"  oldest       {_age(oldest) if oldest is not None else '-'}")
            print(f"  last error   {printable(status['last_error'] or '-')}")
    if args.json:
        _print_json({'ok': True, 'config': source, 'queues': result})
    return OK


def _entry_data(entry, now):
    data = {
        'id': entry.name, 'area': entry.area, 'file': entry.filename,
        'queued_at': _stamp(entry.queued_at),
        'age': None if entry.queued_at is None
        else round(now - entry.queued_at, 3),
        'size': entry.size, 'from': entry.fromaddr,
        'to': list(entry.toaddrs), 'attempts': list(entry.attempts),
        'error': entry.error,
    }
    if entry.area == 'deferred':
        data['next_attempt'] = _stamp(entry.mtime)
    elif entry.area == 'failed':
        data['failed_at'] = _stamp(entry.mtime)
    elif entry.area == 'cur':
        if entry.claimed_by:
            host, pid = entry.claimed_by
            data['claimed_by'] = {'host': host, 'pid': pid}
    return data


AREA_NAMES = {'new': 'waiting', 'cur': 'in progress',
              'deferred': 'deferred', 'failed': 'failed'}


def _entry_line(entry, now):
    age = '' if entry.queued_at is None else f'  {_age(now - entry.queued_at)}'
    head = f'  {printable(entry.name)}  {AREA_NAMES[entry.area]}{age}'
    if entry.fromaddr is None:
        return f'{head}\n      unreadable: {printable(entry.error)}'
    line = (f"{head}  {printable(entry.fromaddr)} -> "
            f"{printable(', '.join(entry.toaddrs))}"
            f"  ({_n(len(entry.attempts), 'attempt')})")
    details = []
    if entry.area == 'deferred':
        details.append(f'next attempt {_relative(entry.mtime, now)}')
    if entry.attempts:
        details.append(f'last: {printable(entry.attempts[-1])}')
    return line + (f"\n      {'; '.join(details)}" if details else '')


def run_queue_list(args):
    source, queues = _queues_of(args)
    now = time.time()
    areas = (args.area,) if args.area else ('new', 'cur', 'deferred',
                                            'failed')
    result = []
    for names, path, queue in queues:
        entries = [e for area in areas for e in queue.entries(area)] \
            if queue is not None else []
        result.append({'deliveries': names, 'path': path,
                       'messages': [_entry_data(e, now) for e in entries]})
        if not args.json:
            print(f"{', '.join(names)}  {path}: "
                  f"{_n(len(entries), (args.area or 'queued') + ' message')}")
            for entry in entries:
                print(_entry_line(entry, now))
    if args.json:
        _print_json({'ok': True, 'config': source, 'queues': result})
    return OK


def _find(queues, wanted):
    """``(names, queue, name)`` of the one message whose name is ``wanted``
    or contains it."""
    matches = []
    for names, path, queue in queues:
        if queue is None:
            continue
        found = queue.message_names()
        if wanted in found:
            return names, queue, wanted
        matches += [(names, queue, n) for n in sorted(found) if wanted in n]
    if not matches:
        raise CommandError(FAILED, f'no message {wanted!r} in '
                           + ', '.join(path for _, path, _ in queues))
    if len(matches) > 1:
        shown = printable(', '.join(m[2] for m in matches[:5]))
        raise CommandError(USAGE, f'{wanted!r} matches {len(matches)} '
                           f'messages: {shown}'
                           + (', ...' if len(matches) > 5 else ''))
    return matches[0]


def run_queue_show(args):
    _, queues = _queues_of(args)
    names, queue, name = _find(queues, args.id)
    now = time.time()
    copies = []
    for entry in queue.locate(name):
        data = _entry_data(entry, now)
        data['headers'] = _headers(entry.message) \
            if entry.message is not None else None
        copies.append(data)
    if not copies:
        raise CommandError(FAILED, f'{name} left the queue meanwhile')
    if args.json:
        _print_json({'ok': True, 'deliveries': names, 'path': queue.path,
                     'id': name, 'copies': copies})
        return OK
    print(f'id        {printable(name)}')
    print(f"queue     {', '.join(names)}  {queue.path}")
    first = copies[0]
    if first['queued_at']:
        print(f"queued    {first['queued_at']} ({_age(first['age'])} ago)")
    for data in copies:
        print(f"\n{AREA_NAMES[data['area']]}  ({printable(data['file'])}, "
              f"{data['size']} bytes)")
        if data.get('next_attempt'):
            print(f"  next attempt  {data['next_attempt']}")
        if data.get('failed_at'):
            print(f"  failed at     {data['failed_at']}")
        if data.get('claimed_by'):
            c = data['claimed_by']
            print(f"  claimed by    pid {c['pid']} on {printable(c['host'])}")
        if data['error']:
            print(f"  error         {printable(data['error'])}")
        if data['from'] is not None:
            print(f"  from          {printable(data['from'])}")
            for i, to in enumerate(data['to']):
                print(f"  {'to' if not i else '':14}{printable(to)}")
        for i, attempt in enumerate(data['attempts']):
            print(f"  {'attempts' if not i else '':14}{printable(attempt)}")
        if data['headers']:
            print('  headers')
            for key, value in data['headers']:
                print(f'    {printable(key)}: {printable(value)}')
    return OK


def _headers(message):
    head = message.split(b'\r\n\r\n', 1)[0] + b'\r\n\r\n'
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32) \
        .parsebytes(head)
    return [[key, ' '.join(str(value).split())]
            for key, value in parsed.items()]


def run_queue_retry(args):
    from mailout.queue import QueueError
    _, queues = _queues_of(args, writable=True)
    if args.id:
        names, queue, name = _find(queues, args.id)
        areas = [e.area for e in queue.locate(name)]
        todo = [(queue, name, area) for area in ('deferred', 'failed')
                if area in areas]
        if not todo:
            raise CommandError(FAILED, f'{name} is not failed or deferred '
                                       f'(it is in {", ".join(areas)}/)')
    else:
        area = 'failed' if args.all_failed else 'deferred'
        todo = [(queue, e.name, area) for names, _, queue in queues
                if queue is not None for e in queue.entries(area)]
    done, errors = [], []
    for queue, name, area in todo:
        try:
            area, new_name = queue.retry(name, area)
        except QueueError as e:
            errors.append({'id': name, 'path': queue.path, 'error': str(e)})
        else:
            done.append({'id': name, 'path': queue.path, 'from': area,
                         'new_id': new_name})
    if args.json:
        _print_json({'ok': not errors, 'retried': done, 'errors': errors})
    else:
        for d in done:
            print(f"{printable(d['id'])}: {d['from']}/ -> new/"
                  + (f" as {printable(d['new_id'])}" if d['new_id'] != d['id'] else ''))
        for e in errors:
            print(f"{printable(e['id'])}: not retried: "
                  f"{printable(e['error'])}", file=sys.stderr)
        if not todo:
            print('nothing to retry')
        elif done:
            print(f'{len(done)} message(s) back in new/: a running processor '
                  'takes them within its poll-interval; "mailout process '
                  '--once" delivers them now')
    return FAILED if errors else OK


def run_queue_purge(args):
    from mailout.queue import QueueError
    if args.id and args.older_than is not None:
        raise CommandError(USAGE, 'give ID or --failed --older-than AGE, '
                                  'not both')
    if not args.id and not args.failed:
        raise CommandError(USAGE, 'give ID, or --failed (with --older-than '
                                  'AGE)')
    _, queues = _queues_of(args, writable=True)
    now = time.time()
    if args.id:
        names, queue, name = _find(queues, args.id)
        entries = queue.locate(name)
        if args.failed:
            entries = [e for e in entries if e.area == 'failed']
        busy = [e for e in entries if e.area == 'cur']
        if busy:
            raise CommandError(FAILED, f'{name} is being delivered (claimed '
                                       f'as {busy[0].filename}); try again '
                                       'when it has settled')
        todo = [(queue, e) for e in entries]
        if not todo:
            raise CommandError(FAILED, f'{name} has no failed copy')
    else:
        age = args.older_than or 0
        todo = [(queue, e) for _, _, queue in queues if queue is not None
                for e in queue.entries('failed') if now - e.mtime > age]
    listed = [{'id': e.name, 'area': e.area, 'path': queue.path,
               'from': e.fromaddr, 'to': list(e.toaddrs),
               'last': e.attempts[-1] if e.attempts else e.error}
              for queue, e in todo]

    def show(prefix):
        for item in listed:
            print(f"{prefix}{printable(item['id'])} ({item['area']}/ of "
                  f"{item['path']})"
                  + (f": {printable(item['last'])}" if item['last'] else ''))
    if not todo or args.dry_run:
        if args.json:
            _print_json({'ok': True, 'dry_run': args.dry_run,
                         'purged': [], 'would_purge': listed})
        elif not todo:
            print('nothing to purge')
        else:
            show('would delete ')
        return OK
    if not args.yes:
        if not sys.stdin.isatty():
            raise CommandError(USAGE, f'refusing to delete {len(todo)} '
                                      'message(s) without --yes: stdin is '
                                      'not a terminal')
        for item in listed:
            print(f"  {printable(item['id'])} ({item['area']}/ of "
                  f"{item['path']})",
                  file=sys.stderr)
        sys.stderr.write(f'delete these {len(todo)} message(s) for good? '
                         '[y/N] ')
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ('y', 'yes'):
            raise CommandError(FAILED, 'nothing deleted')
    purged, errors = [], []
    for (queue, entry), item in zip(todo, listed):
        try:
            queue.purge(entry.area, entry.name)
        except QueueError as e:
            errors.append({**item, 'error': str(e)})
        else:
            purged.append(item)
    if args.json:
        _print_json({'ok': not errors, 'purged': purged, 'errors': errors})
    else:
        for item in purged:
            print(f"deleted {printable(item['id'])} ({item['area']}/ of "
                  f"{item['path']})")
        for item in errors:
            print(f"{printable(item['id'])}: not deleted: "
                  f"{printable(item['error'])}",
                  file=sys.stderr)
    return FAILED if errors else OK


# -- check ------------------------------------------------------------------------

def run_check(args):
    import ZConfig

    from mailout import config
    from mailout import factories
    from mailout.interfaces import DeliveryError
    from mailout.queue import area_problems
    if not args.config:
        raise CommandError(USAGE, 'no configuration: give -C CONFIG or set '
                                  '$MAILOUT_CONFIG')
    result = {'ok': True, 'config': {'path': args.config}, 'mailers': [],
              'queues': []}
    try:
        settings, source = config.load_any(args.config)
    except (ZConfig.ConfigurationError, ImportError) as e:
        result['ok'] = False
        result['config'].update(ok=False, error=_config_error(args.config, e))
        _check_report(args, result)
        return FAILED
    result['config'].update(
        ok=True, source=source, mailers=sorted(settings.mailers),
        deliveries=sorted(settings.deliveries))

    for name, mailer_settings in settings.mailers.items():
        mailer_result = {'name': name, 'relays': []}
        result['mailers'].append(mailer_result)
        relays = getattr(mailer_settings, 'relays', None)
        if relays is None:
            mailer_result['checked'] = False
            continue
        checked = mailer_settings if not args.timeout else \
            dataclasses.replace(mailer_settings, timeout=args.timeout)
        mailer = factories.build_mailer(checked)
        for host, port in relays:
            relay = {'host': host, 'port': port}
            started = time.monotonic()
            try:
                connection = mailer.connect(host, port)
            except DeliveryError as e:
                text = e.reply[1]
                prefix = f'{host}:{port}: '
                relay.update(ok=False, error=text[len(prefix):]
                             if text.startswith(prefix) else text)
                result['ok'] = False
            else:
                relay.update(ok=True, **_session(connection, checked))
                try:
                    connection.quit()
                except Exception:
                    connection.close()
            relay['seconds'] = round(time.monotonic() - started, 3)
            mailer_result['relays'].append(relay)

    for names, path in _queued(settings, required=False):
        problem = '; '.join(area_problems(path)) or None
        result['queues'].append({'deliveries': names, 'path': path,
                                 'ok': problem is None, 'error': problem})
        if problem:
            result['ok'] = False
    _check_report(args, result)
    return OK if result['ok'] else FAILED


def _session(connection, settings):
    """What a successful connection negotiated."""
    greeting = (connection.ehlo_resp or b'').decode('utf-8', 'replace')
    sock = connection.sock
    return {
        'server': greeting.split('\n', 1)[0].split(' ', 1)[0] or None,
        'tls': sock.version() if isinstance(sock, ssl.SSLSocket) else None,
        'auth': getattr(settings, 'username', None),
    }


def _check_report(args, result):
    if args.json:
        _print_json(result)
        return
    cfg = result['config']
    if not cfg['ok']:
        print(f"configuration FAILED: {printable(cfg['error'])}")
        print('check FAILED')
        return
    print(f"configuration {cfg['source']}: ok "
          f"({_n(len(cfg['mailers']), 'mailer')}, "
          f"{_n(len(cfg['deliveries']), 'delivery', 'deliveries')})")
    for mailer in result['mailers']:
        print(f"mailer {mailer['name']}")
        if not mailer.get('checked', True):
            print('  not an SMTP mailer: not checked')
        for relay in mailer['relays']:
            where = f"{relay['host']}:{relay['port']}"
            if relay['ok']:
                done = [f"EHLO {relay['server']}" if relay['server']
                        else 'EHLO']
                if relay['tls']:
                    done.append(f"TLS ({relay['tls']})")
                if relay['auth']:
                    done.append(f"AUTH as {relay['auth']}")
                print(f"  {where}  ok: {', '.join(done)}  "
                      f"({relay['seconds'] * 1000:.0f} ms)")
            else:
                print(f"  {where}  FAILED: {printable(relay['error'])}")
    for queue in result['queues']:
        print(f"queue {', '.join(queue['deliveries'])}  {queue['path']}  "
              + ('ok' if queue['ok'] else f"FAILED: {queue['error']}"))
    failed = sum(not r['ok'] for m in result['mailers']
                 for r in m['relays']) + sum(not q['ok']
                                             for q in result['queues'])
    print('check ' + ('ok' if result['ok']
                      else f"FAILED ({_n(failed, 'problem')})"))


# -- send -------------------------------------------------------------------------

def run_send(args):
    import transaction

    from mailout.config import QueuedDeliverySettings
    from mailout.interfaces import MailoutError
    settings, source = _settings(args)
    name = args.delivery
    if name is None:
        if 'default' in settings.deliveries:
            name = 'default'
        elif len(settings.deliveries) == 1:
            [name] = settings.deliveries
        else:
            raise CommandError(USAGE, 'which delivery? give --delivery '
                                      f'({", ".join(settings.deliveries)})')
    if name not in settings.deliveries:
        raise CommandError(USAGE, f'no delivery {name!r} (deliveries: '
                                  f'{", ".join(settings.deliveries)})')
    queued = isinstance(settings.deliveries[name], QueuedDeliverySettings)
    if queued:
        [(_, delivery, processor)] = [p for p in _processors(settings)
                                      if p[0] == name]
    else:
        from mailout import factories
        delivery = factories.build_all(settings)[1][name]

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
    result = {'delivery': name, 'queued': queued, 'config': source}
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
        return _send_report(args, result)
    if not queued:
        result.update(ok=True, outcome='sent', to=list(args.toaddrs))
        return _send_report(args, result)

    result['path'] = delivery.queue.path
    with _Tracker(keep=_Tracker.KINDS) as tracker:
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
    return _send_report(args, result)


def _send_report(args, result):
    if args.json:
        _print_json(result)
        return OK if result['ok'] else FAILED
    print(f"message <{printable(result.get('message_id'))}> via "
          + ('queued' if result['queued'] else 'direct')
          + f" delivery {result['delivery']}"
          + (f" ({result['path']})" if result.get('path') else ''))
    if 'error' in result:
        print(f"  not sent: {printable(result['error'])}")
    elif not result['queued']:
        print(f"  sent to {printable(', '.join(result['to']))}")
    elif result['outcome'] == 'queued':
        print('  queued; another processor took it (it was not seen here)')
    for record in result.get('events', ()):
        line = f"  {record['event']} to {printable(', '.join(record['to']))}"
        if record['reply']:
            line += f": {printable(record['reply'])}"
        if record['event'] != 'sent':
            line += f"  (mailout queue show {printable(record['id'])})"
        print(line)
    if result.get('others'):
        print(f"  ({result['others']} other message(s) of the queue "
              'went too)')
    return OK if result['ok'] else FAILED


# -- demo -------------------------------------------------------------------------

def run_demo(args):
    """Start an SMTP server on 127.0.0.1, configure a queued delivery through
    ZConfig and ZCML, commit some messages, abort one, show what arrived."""
    import transaction
    from zope.component import getUtility
    from zope.configuration import xmlconfig
    from zope.event import notify
    from zope.processlifetime import ProcessStarting

    from mailout.interfaces import IMailDelivery

    received = []
    port = _start_demo_server(received)
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
    print(f'\nthe SMTP server received {len(received)} message(s):')
    for mail_from, rcpt_tos, subject in received:
        print(f'  from {mail_from} to {", ".join(rcpt_tos)}: {subject}')
    waiting = {area: len(os.listdir(os.path.join(delivery.queuePath, area)))
               for area in ('tmp', 'new', 'cur', 'deferred', 'failed')}
    print('queue now holds: ' + ', '.join(f'{area} {count}'
                                           for area, count in waiting.items()))
    ok = (len(received) == args.messages and not any(waiting.values())
          and all('aborted' not in r[2] for r in received))
    print('demo ' + ('succeeded' if ok else 'FAILED'))
    return OK if ok else FAILED


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


def _start_demo_server(received):
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


if __name__ == '__main__':
    sys.exit(main())
