"""``mailout queue status|list|show|retry|purge``: inspect and repair the
queues of the queued deliveries.  Everything about queue files is the
queue's (`mailout.queue.Queue`); this module asks it and prints."""
import argparse
import email.parser
import email.policy
import os
import sys
import time
from typing import Optional

from mailout.cli.base import FAILED
from mailout.cli.base import OK
from mailout.cli.base import USAGE
from mailout.cli.base import Command
from mailout.cli.base import CommandError
from mailout.cli.base import Group
from mailout.cli.base import Result
from mailout.cli.base import age
from mailout.cli.base import attempt_text
from mailout.cli.base import config_data
from mailout.cli.base import status_data
from mailout.cli.base import load_settings
from mailout.cli.base import n
from mailout.cli.base import queued
from mailout.cli.base import relative
from mailout.cli.base import stamp
from mailout.cli.base import when
from mailout.mailers.relays import address
from mailout.message import printable
from mailout.queue.fileformat import parse_attempt

AREA_NAMES = {'new': 'waiting', 'cur': 'in progress',
              'deferred': 'deferred', 'failed': 'failed'}


class QueueCommand(Command):
    group: Optional[str] = 'queue'
    writable = False    # inspection only reads; retry and purge do not

    def add_arguments(self, parser):
        parser.add_argument('-d', '--delivery', metavar='NAME',
                            help='only the queue of this queued delivery')

    def queues(self, args, settings=None):
        """``(source, [(names, path, queue)])``; ``queue`` is None where
        nothing was ever queued."""
        settings, source = settings or load_settings(args)
        return source, [(names, path, _open_queue(path, self.writable))
                        for names, path in queued(settings, args.delivery)]

    def statuses(self, args, now):
        """``(source, [status])``: `mailout.queue.Queue.status` of each
        queue, with its deliveries, path, whether it exists yet, and the
        deliveries that hold or redirect their mail."""
        settings, source = load_settings(args)
        source, queues = self.queues(args, (settings, source))
        result = []
        for names, path, queue in queues:
            status = queue.status(now) if queue is not None else {
                'waiting': 0, 'in_progress': 0, 'deferred': 0, 'failed': 0,
                'held': 0, 'oldest_age': None, 'oldest_waiting_age': None,
                'oldest_deferred_age': None, 'next_attempt': None,
                'last_error': None}
            deliveries = [settings.deliveries[name] for name in names]
            result.append({
                'deliveries': names, 'path': path,
                'exists': queue is not None, **status_data(status),
                'hold': [d.name for d in deliveries if d.hold],
                'redirect_to': {d.name: d.redirect_to for d in deliveries
                                if d.redirect_to},
                'relays': relay_states(settings, names, path, now)})
        return source, result


def relay_states(settings, names: list[str], path: str,
                 now: float) -> list[dict]:
    """The state of each relay of the mailers of the deliveries ``names``
    as the processes working the queue at ``path`` recorded it
    (`mailout.queue.RelayStates`): ``{'relay': 'host:port', 'mailers',
    'state', 'since', 'until', 'why'}``; after a relay whose name has
    several addresses, each address that has a record of its own
    (``host[address]:port``).  ``state`` is "up" (no rest
    recorded, or one ended: then ``since`` and ``why`` say when and how),
    "resting" (no connection is tried before ``until``, but the
    processors probe it) or "down" (its rest is over; the next connection
    tries it)."""
    from mailout.mailers.relays import rest_of
    from mailout.queue import RelayStates
    records = RelayStates(path).load()
    relays: dict = {}
    for name in names:
        mailer = settings.deliveries[name].mailer
        for host, port in getattr(settings.mailers.get(mailer), 'relays',
                                  ()):
            mailers = relays.setdefault(address((host, port)), [])
            if mailer not in mailers:
                mailers.append(mailer)
            for key in sorted(records):
                if key.startswith(f'{host}[') and key.endswith(f']:{port}'):
                    relays.setdefault(key, mailers)
    result = []
    for relay, mailers in relays.items():
        record = records.get(relay)
        state = {'relay': relay, 'mailers': mailers, 'state': 'up',
                 'since': None, 'until': None, 'why': None}
        if record is not None:
            state.update(since=when(record['since']), why=record['why'])
            if record['state'] == 'resting':
                resting = rest_of(record, now) is not None
                state.update(state='resting' if resting else 'down',
                             until=when(record['until']))
        result.append(state)
    return result


def relay_line(state, now):
    """One relay's state for text: ``up``, ``up since TIME (rest ended by
    HOW)``, ``resting until TIME (in 25s), down since TIME: WHY`` or
    ``down since TIME, rest over (the next connection tries it): WHY``."""
    why = printable(state['why'] or '')
    if state['state'] == 'up':
        return 'up' if state['since'] is None else \
            f"up since {stamp(state['since'])} (back: {why})"
    if state['state'] == 'resting':
        return (f"resting until {stamp(state['until'])} "
                f"({relative(state['until'], now)}), down since "
                f"{stamp(state['since'])}: {why}")
    return (f"down since {stamp(state['since'])}, rest over (the next "
            f"connection tries it): {why}")


def _open_queue(path, writable):
    """The Queue at ``path``, or None if it does not exist yet (nothing was
    ever queued there; not created here, so that an operator running as
    another user leaves no directory behind)."""
    from mailout.queue import Queue
    if not os.path.isdir(os.path.join(path, 'new')):
        return None
    return Queue(path, writable=writable)


def _find(queues, wanted):
    """``(names, queue, name)`` of the one message whose queue id is
    ``wanted`` or contains it, or whose Message-Id is ``wanted`` (with or
    without angle brackets)."""
    matches = []
    for names, path, queue in queues:
        if queue is None:
            continue
        found = queue.message_names()
        if wanted in found:
            return names, queue, wanted
        matches += [(names, queue, name) for name in sorted(found)
                    if wanted in name]
    if not matches and '@' in wanted:
        matches = [(names, queue, name) for names, _, queue in queues
                   if queue is not None
                   for name in sorted(queue.names_of_message_id(wanted))]
    if not matches:
        raise CommandError(FAILED, f'no message {wanted!r} in '
                           + ', '.join(path for _, path, _ in queues))
    if len(matches) > 1:
        shown = printable(', '.join(m[2] for m in matches[:5]))
        raise CommandError(USAGE, f'{wanted!r} matches {len(matches)} '
                           f'messages: {shown}'
                           + (', ...' if len(matches) > 5 else ''))
    return matches[0]


def _entry(entry, now):
    """What the result of a command says about one `mailout.queue.Entry`.
    """
    data = {
        'id': entry.name, 'area': entry.area, 'file': entry.filename,
        'queued_at': when(entry.queued_at),
        'age': None if entry.queued_at is None
        else round(now - entry.queued_at, 3),
        'size': entry.size, 'from': entry.fromaddr,
        'to': list(entry.toaddrs),
        'attempts': [parse_attempt(a) for a in entry.attempts],
        'error': entry.error, 'message_id': entry.message_id,
        'subject': entry.subject,
    }
    if entry.area == 'deferred':
        data['next_attempt'] = when(entry.mtime)
    elif entry.area == 'failed':
        data['failed_at'] = when(entry.mtime)
    elif entry.area == 'cur':
        if entry.claimed_by:
            host, pid = entry.claimed_by
            data['claimed_by'] = {'host': host, 'pid': pid}
    return data


class Status(QueueCommand):
    name = 'status'
    help = 'counts, oldest message, last error'
    description = (
        'Per queue: messages waiting (new/), in progress (cur/), deferred, '
        'failed; the age of the oldest message not yet settled; the next '
        'retry; the newest attempt line of a deferred or failed message; '
        'and each relay: up, or resting until when and why.  With --warn-age, --crit-age or --max-failed it is a '
        'Nagios/Icinga check: one summary line, exit 0 (OK), 1 (WARNING) '
        'or 2 (CRITICAL).')

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument('--warn-age', type=_age_argument, metavar='AGE',
                            help='WARNING when a message waiting or deferred '
                                 'was queued longer ago than AGE (5m, 1h)')
        parser.add_argument('--crit-age', type=_age_argument, metavar='AGE',
                            help='CRITICAL likewise')
        parser.add_argument('--max-failed', type=int, metavar='N',
                            help='CRITICAL when more than N messages failed')

    def run(self, args):
        now = time.time()
        source, result = self.statuses(args, now)
        data = {'ok': True, 'config': config_data(args, source),
                'queues': result}
        if (args.warn_age, args.crit_age, args.max_failed) == (None,) * 3:
            return Result(data, now=now)
        data['check'] = _check(result, args)
        return Result(data, status=data['check']['status'], now=now)

    def text(self, result):
        check = result.data.get('check')
        if check:
            print(check['summary'])
            return
        for q in result.data['queues']:
            print(f"{', '.join(q['deliveries'])}  {q['path']}"
                  + ('' if q['exists'] else '  (not created yet)'))
            print(f"  waiting      {q['waiting']}")
            print(f"  in progress  {q['in_progress']}")
            print(f"  deferred     {q['deferred']}" + (
                f"  (next attempt {relative(q['next_attempt'], result.now)})"
                if q['next_attempt'] else ''))
            print(f"  failed       {q['failed']}")
            oldest = q['oldest_age']
            print('  oldest       '
                  + (age(oldest) if oldest is not None else '-'))
            print('  last error   ' + (printable(attempt_text(
                q['last_error'])) if q['last_error'] else '-'))
            print(f"  held         {q['held']}"
                  + ('  (hold on: ' + ', '.join(q['hold']) + ')'
                     if q['hold'] else ''))
            for name, target in q['redirect_to'].items():
                print(f'  redirect     {name}: every message to '
                      f'{printable(target)}')
            for relay in q['relays']:
                print(f"  relay        {relay['relay']}  "
                      f"{relay_line(relay, result.now)}")


class List(QueueCommand):
    name = 'list'
    help = 'list queued messages'

    def add_arguments(self, parser):
        super().add_arguments(parser)
        areas = parser.add_mutually_exclusive_group()
        areas.add_argument('--failed', action='store_const', dest='area',
                           const='failed', help='only failed messages')
        areas.add_argument('--deferred', action='store_const', dest='area',
                           const='deferred', help='only deferred messages')

    def run(self, args):
        source, queues = self.queues(args)
        now = time.time()
        areas = (args.area,) if args.area else ('new', 'cur', 'deferred',
                                                'failed')
        result = []
        for names, path, queue in queues:
            entries = [e for area in areas for e in queue.entries(area)] \
                if queue is not None else []
            result.append({'deliveries': names, 'path': path,
                           'messages': [_entry(e, now) for e in entries]})
        return Result({'ok': True, 'config': config_data(args, source),
                       'queues': result, 'area': args.area}, now=now)

    def text(self, result):
        what = (result.data['area'] or 'queued') + ' message'
        for q in result.data['queues']:
            print(f"{', '.join(q['deliveries'])}  {q['path']}: "
                  f"{n(len(q['messages']), what)}")
            for data in q['messages']:
                print(_line(data, result.now))


def _line(data, now):
    """The lines of one message in ``mailout queue list``."""
    queued_for = '' if data['queued_at'] is None \
        else f"  {age(now - data['queued_at'])}"
    head = f"  {printable(data['id'])}  {AREA_NAMES[data['area']]}{queued_for}"
    if data['from'] is None:
        return f"{head}\n      unreadable: {printable(data['error'])}"
    line = (f"{head}  {printable(data['from'])} -> "
            f"{printable(', '.join(data['to']))}"
            f"  ({n(len(data['attempts']), 'attempt')})")
    line += (f"\n      <{printable(data['message_id'] or '?')}>  "
             f"{printable(data['subject'] or '(no subject)')}")
    details = []
    if data['area'] == 'deferred':
        details.append(f"next attempt {relative(data['next_attempt'], now)}")
    if data['attempts']:
        details.append(
            f"last: {printable(attempt_text(data['attempts'][-1]))}")
    return line + (f"\n      {'; '.join(details)}" if details else '')


class Show(QueueCommand):
    name = 'show'
    help = 'envelope, attempts and headers of one message'
    description = ('Envelope, attempts and headers of the message ID (its '
                   'queue id, a unique part of it, or its Message-Id); '
                   'with --body the whole message too.')

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument('id', metavar='ID')
        parser.add_argument('--body', action='store_true',
                            help='print the whole message')

    def run(self, args):
        _, queues = self.queues(args)
        names, queue, name = _find(queues, args.id)
        now = time.time()
        copies = []
        for entry in queue.locate(name):
            data = _entry(entry, now)
            data['headers'] = _headers(entry.message) \
                if entry.message is not None else None
            if args.body and entry.message is not None:
                data['message'] = entry.message.decode('utf-8', 'replace')
            copies.append(data)
        if not copies:
            raise CommandError(FAILED, f'{name} left the queue meanwhile')
        return Result({'ok': True, 'deliveries': names, 'path': queue.path,
                       'id': name, 'copies': copies}, now=now)

    def text(self, result):
        shown = result.data
        print(f"id        {printable(shown['id'])}")
        print(f"queue     {', '.join(shown['deliveries'])}  {shown['path']}")
        first = shown['copies'][0]
        if first['queued_at']:
            print(f"queued    {stamp(first['queued_at'])} "
                  f"({age(first['age'])} ago)")
        for data in shown['copies']:
            print(f"\n{AREA_NAMES[data['area']]}  ({printable(data['file'])}"
                  f", {data['size']} bytes)")
            if data.get('next_attempt'):
                print(f"  next attempt  {stamp(data['next_attempt'])}")
            if data.get('failed_at'):
                print(f"  failed at     {stamp(data['failed_at'])}")
            if data.get('claimed_by'):
                c = data['claimed_by']
                print(f"  claimed by    pid {c['pid']} on "
                      f"{printable(c['host'])}")
            if data['error']:
                print(f"  error         {printable(data['error'])}")
            if data['from'] is not None:
                print(f"  from          {printable(data['from'])}")
                for i, to in enumerate(data['to']):
                    print(f"  {'to' if not i else '':14}{printable(to)}")
            for i, attempt in enumerate(data['attempts']):
                print(f"  {'attempts' if not i else '':14}"
                      f"{printable(attempt_text(attempt))}")
            if data['headers']:
                print('  headers')
                for key, value in data['headers']:
                    print(f'    {printable(key)}: {printable(value)}')
            if data.get('message') is not None:
                print('  message')
                for line in data['message'].split('\r\n'):
                    print(f'    {printable(line)}')


def _headers(message):
    head = message.split(b'\r\n\r\n', 1)[0] + b'\r\n\r\n'
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32) \
        .parsebytes(head)
    return [[key, ' '.join(str(value).split())]
            for key, value in parsed.items()]


class Retry(QueueCommand):
    name = 'retry'
    help = 'try failed or deferred messages again now'
    description = (
        'Move messages from failed/ or deferred/ back to new/; a running '
        'processor takes them within its poll-interval ("mailout process '
        '--once" delivers them at once).  Any rest of a relay recorded in '
        'the queue ends, so the messages are tried, not deferred again '
        'untried.  A failed message that failed for its age (max-lifetime) '
        'fails again at its next transient error.')
    writable = True

    def add_arguments(self, parser):
        super().add_arguments(parser)
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument('id', metavar='ID', nargs='?')
        which.add_argument('--all-failed', action='store_true',
                           help='every failed message')
        which.add_argument('--all-deferred', action='store_true',
                           help='every deferred message')

    def run(self, args):
        from mailout.queue import QueueError
        _, queues = self.queues(args)
        if args.id:
            names, queue, name = _find(queues, args.id)
            areas = [e.area for e in queue.locate(name)]
            todo = [(queue, name, area) for area in ('deferred', 'failed')
                    if area in areas]
            if not todo:
                raise CommandError(FAILED, f'{name} is not failed or '
                                           f'deferred (it is in '
                                           f'{", ".join(areas)}/)')
            resting = [queue]
        else:
            area = 'failed' if args.all_failed else 'deferred'
            todo = [(queue, e.name, area) for names, _, queue in queues
                    if queue is not None for e in queue.entries(area)]
            resting = [queue for _, _, queue in queues if queue is not None]
        done, errors, rests = [], [], []
        # Rests end first: a processor that takes a retried message must
        # try it, not defer it again untried.
        for queue in resting:
            try:
                ended = queue.relay_states.end_rests('mailout queue retry')
            except OSError as e:
                errors.append({'id': None, 'path': queue.path,
                               'error': f'cannot end the relays\' rests: '
                                        f'{e}'})
            else:
                rests += [{'relay': relay, 'path': queue.path}
                          for relay in ended]
        for queue, name, area in todo:
            try:
                area, new_name = queue.retry(name, area)
            except QueueError as e:
                errors.append({'id': name, 'path': queue.path,
                               'error': str(e)})
            else:
                done.append({'id': name, 'path': queue.path, 'from': area,
                             'new_id': new_name})
        return Result({'ok': not errors, 'retried': done, 'errors': errors,
                       'rests_ended': rests}, FAILED if errors else OK)

    def text(self, result):
        done, errors = result.data['retried'], result.data['errors']
        for rest in result.data['rests_ended']:
            print(f"relay {rest['relay']}: rest ended, tried at the next "
                  'connection')
        for d in done:
            print(f"{printable(d['id'])}: {d['from']}/ -> new/"
                  + (f" as {printable(d['new_id'])}"
                     if d['new_id'] != d['id'] else ''))
        for e in errors:
            print(f"{printable(e['id'] or e['path'])}: not retried: "
                  f"{printable(e['error'])}", file=sys.stderr)
        if not done and not errors:
            print('nothing to retry')
        elif done:
            print(f'{len(done)} message(s) back in new/: a running processor '
                  'takes them within its poll-interval; "mailout process '
                  '--once" delivers them now')


class Purge(QueueCommand):
    name = 'purge'
    help = 'delete messages for good'
    description = (
        'Delete one message (from new/, deferred/, failed/ or held/; not '
        'while it is being delivered), or with --failed the failed '
        'messages, or with --all, --from or --to every message (not being '
        'delivered) or those of a sender or recipient; --older-than keeps '
        'those that failed (--failed) or were queued less than AGE ago.  '
        'Asks on a terminal unless --yes; without a terminal and without '
        '--yes it refuses (exit 2).')
    writable = True

    def add_arguments(self, parser):
        super().add_arguments(parser)
        _add_selection(parser)
        parser.add_argument('--failed', action='store_true',
                            help='failed messages (all of them, or with ID: '
                                 'only its failed copy)')
        parser.add_argument('--older-than', type=_age_argument, metavar='AGE',
                            help='only those failed (--failed) or queued '
                                 'longer ago than AGE (30s, 12h, 7d, 1d 12h)')
        parser.add_argument('-y', '--yes', action='store_true',
                            help='do not ask')
        parser.add_argument('-n', '--dry-run', action='store_true',
                            help='show what would be deleted')

    def run(self, args):
        if args.id and args.older_than is not None:
            raise CommandError(USAGE, 'give ID or --failed --older-than AGE, '
                                      'not both')
        if not args.id and not (args.failed or _chooses_many(args)):
            raise CommandError(USAGE, 'give ID, --failed, --all, --from '
                                      'ADDRESS or --to ADDRESS (with '
                                      '--older-than AGE)')
        _, queues = self.queues(args)
        todo = self._todo(args, queues)
        listed = [{'id': e.name, 'area': e.area, 'path': queue.path,
                   'from': e.fromaddr, 'to': list(e.toaddrs),
                   'last': parse_attempt(e.attempts[-1]) if e.attempts
                   else None, 'error': e.error}
                  for queue, e in todo]
        if not todo or args.dry_run:
            return Result({'ok': True, 'dry_run': args.dry_run,
                           'purged': [], 'would_purge': listed})
        if not args.yes and not _confirm(listed):
            return Result({'ok': True, 'dry_run': False, 'purged': [],
                           'declined': listed})
        return self._purge(todo, listed)

    def _todo(self, args, queues):
        """``[(queue, entry)]``: what to delete."""
        if not args.id:
            now, older = time.time(), args.older_than or 0
            areas = ('failed',) if args.failed else \
                ('new', 'deferred', 'failed', 'held')
            return [(queue, e) for queue, e in _selected(args, queues, areas)
                    if now - (e.mtime if e.area == 'failed'
                              else e.queued_at or e.mtime) > older]
        names, queue, name = _find(queues, args.id)
        entries = queue.locate(name)
        if args.failed:
            entries = [e for e in entries if e.area == 'failed']
        busy = [e for e in entries if e.area == 'cur']
        if busy:
            raise CommandError(FAILED, f'{name} is being delivered (claimed '
                                       f'as {busy[0].filename}); try again '
                                       'when it has settled')
        if not entries:
            raise CommandError(FAILED, f'{name} has no failed copy')
        return [(queue, e) for e in entries]

    def _purge(self, todo, listed):
        from mailout.queue import QueueError
        purged, errors = [], []
        for (queue, entry), item in zip(todo, listed):
            try:
                queue.purge(entry.area, entry.name)
            except QueueError as e:
                errors.append({**item, 'error': str(e)})
            else:
                purged.append(item)
        return Result({'ok': not errors, 'purged': purged, 'errors': errors},
                      FAILED if errors else OK)

    def text(self, result):
        data = result.data
        if 'declined' in data:
            print('nothing deleted')
            return
        if 'would_purge' in data:
            if not data['would_purge']:
                print('nothing to purge')
            for item in data['would_purge']:
                last = attempt_text(item['last']) if item['last'] \
                    else item['error']
                print(f'would delete {_where(item)}'
                      + (f': {printable(last)}' if last else ''))
            return
        for item in data['purged']:
            print(f'deleted {_where(item)}')
        for item in data['errors']:
            print(f"{printable(item['id'])}: not deleted: "
                  f"{printable(item['error'])}", file=sys.stderr)


def _add_selection(parser):
    parser.add_argument('id', metavar='ID', nargs='?',
                        help='queue id (or a unique part of it) or '
                             'Message-Id')
    parser.add_argument('--all', action='store_true',
                        help='every message')
    parser.add_argument('--from', dest='sender', metavar='ADDRESS',
                        help='the messages from ADDRESS')
    parser.add_argument('--to', dest='recipient', metavar='ADDRESS',
                        help='the messages to ADDRESS')


def _chooses_many(args):
    return args.all or args.sender or args.recipient


def _selected(args, queues, areas):
    """``[(queue, entry)]``: the messages in ``areas`` that ``args`` choose:
    ID, or --all, --from ADDRESS, --to ADDRESS (--from and --to may be
    combined)."""
    if args.id:
        names, queue, name = _find(queues, args.id)
        return [(queue, e) for e in queue.locate(name) if e.area in areas]
    return [(queue, e) for _, _, queue in queues if queue is not None
            for area in areas for e in queue.entries(area)
            if args.sender in (None, e.fromaddr)
            and (args.recipient is None or args.recipient in e.toaddrs)]


class _Move(QueueCommand):
    """A command that moves the messages ID, --all, --from or --to choose
    out of ``areas``: `move` each, say ``done`` and ``how``."""
    writable = True
    areas: tuple = ()
    done = how = ''

    def add_arguments(self, parser):
        super().add_arguments(parser)
        _add_selection(parser)

    def move(self, queue, entry):
        """Move ``entry``; False if it moved on meanwhile."""
        raise NotImplementedError

    def run(self, args):
        if not args.id and not _chooses_many(args):
            raise CommandError(USAGE, 'give ID, --all, --from ADDRESS or '
                                      '--to ADDRESS')
        _, queues = self.queues(args)
        moved = [{'id': e.name, 'from_area': e.area, 'path': queue.path,
                  'message_id': e.message_id}
                 for queue, e in _selected(args, queues, self.areas)
                 if self.move(queue, e)]
        return Result({'ok': True, self.done: moved})

    def text(self, result):
        moved = result.data[self.done]
        for item in moved:
            print(f"{printable(item['id'])}: "
                  + self.how.format(area=item['from_area']))
        print(f'{n(len(moved), "message")} {self.done}' if moved
              else f'nothing {self.done}')


class Hold(_Move):
    name = 'hold'
    help = 'hold messages back: never sent until released'
    description = ('Move waiting or deferred messages to held/, where no '
                   'processor takes them, until "mailout queue release".')
    areas = ('new', 'deferred')
    done, how = 'held', '{area}/ -> held/'

    def move(self, queue, entry):
        return queue.hold(entry.name, entry.area)


class Release(_Move):
    name = 'release'
    help = 'send held messages'
    description = ('Move held messages back to new/, to be sent at once '
                   '(unless their delivery has "hold on").')
    areas = ('held',)
    done, how = 'released', 'held/ -> new/'

    def move(self, queue, entry):
        return queue.release_held(entry.name)


def _where(item):
    return f"{printable(item['id'])} ({item['area']}/ of {item['path']})"


def _confirm(listed):
    """Ask on the terminal whether to delete ``listed``."""
    if not sys.stdin.isatty():
        raise CommandError(USAGE, f'refusing to delete {len(listed)} '
                                  'message(s) without --yes: stdin is '
                                  'not a terminal')
    for item in listed:
        print(f'  {_where(item)}', file=sys.stderr)
    sys.stderr.write(f'delete these {len(listed)} message(s) for good? '
                     '[y/N] ')
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ('y', 'yes')


#: Nagios/Icinga plugin exit statuses.
CHECK_STATES = ('OK', 'WARNING', 'CRITICAL')


def _check(queues, args):
    """The one-line verdict of ``queue status --warn-age/--crit-age/
    --max-failed`` over all ``queues``: ``{'status', 'state', 'summary'}``.
    """
    oldest = max((q['oldest_age'] for q in queues
                  if q['oldest_age'] is not None), default=None)
    failed = sum(q['failed'] for q in queues)
    problems = []
    if args.crit_age is not None and oldest is not None \
            and oldest > args.crit_age:
        problems.append((2, f'oldest {age(oldest)} > {age(args.crit_age)}'))
    elif args.warn_age is not None and oldest is not None \
            and oldest > args.warn_age:
        problems.append((1, f'oldest {age(oldest)} > {age(args.warn_age)}'))
    if args.max_failed is not None and failed > args.max_failed:
        problems.append((2, f'{failed} failed > {args.max_failed}'))
    status = max((level for level, _ in problems), default=0)
    counts = (f"{sum(q['waiting'] for q in queues)} waiting, "
              f"{sum(q['deferred'] for q in queues)} deferred, "
              f'{failed} failed, oldest '
              + (age(oldest) if oldest is not None else '-'))
    summary = f'MAILOUT {CHECK_STATES[status]} - ' + '; '.join(
        [text for _, text in problems] + [counts])
    return {'status': status, 'state': CHECK_STATES[status],
            'summary': summary}


def _age_argument(value):
    from mailout.config import duration
    try:
        return duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class QueueGroup(Group):
    name = 'queue'
    help = 'inspect and repair queues'
    description = ('Inspect and repair the queues of the queued deliveries '
                   'in CONFIG.  A message ID is its file name in the queue '
                   '(any unique part of it will do).')
    commands = (Status(), List(), Show(), Retry(), Purge(), Hold(),
                Release())
