"""What every command shares: exit codes and errors, the command classes
that `mailout.cli.main` registers, results and their two renderers,
loading the configuration, and the formats of times and counts.

A command computes a `Result`, then `Command.show` prints it: as JSON
(``--json``, the result's data as they are) or as text (the command's
`Command.text`, which reads nothing but that result), so that the two
cannot say different things.
"""
import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Optional

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


# -- results ------------------------------------------------------------------

class When(float):
    """A point in time (seconds since the epoch) in a result: JSON shows
    it as a UTC time stamp, text as a time stamp or relative to now."""


def when(seconds):
    """``seconds`` as a `When`; None stays None."""
    return None if seconds is None else When(seconds)


@dataclasses.dataclass
class Result:
    """What a command found or did.  ``data`` is what ``--json`` prints;
    ``now`` the time it was computed at (for text saying "in 5m");
    ``lines``: JSON on one line, as each line of a stream."""
    data: dict
    status: int = OK
    now: Optional[float] = None
    lines: bool = False


def print_json(data, lines=False):
    # ASCII only: every other character \u-escaped, so that no control, bidi
    # override or separator from a queue file or a relay reaches a terminal
    # raw; a JSON reader gets the exact text back.
    print(json.dumps(_plain(data), indent=None if lines else 2), flush=True)


def _plain(data):
    if isinstance(data, When):
        return stamp(data)
    if isinstance(data, dict):
        return {key: _plain(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(value) for value in data]
    return data


# -- commands -----------------------------------------------------------------

class Command:
    """One ``mailout`` command.  A subclass names itself, adds its
    arguments and computes a `Result` in `run`; `text` prints that result
    for people."""

    name: Optional[str] = None
    help: Optional[str] = None
    description: Optional[str] = None      # default: help
    group: Optional[str] = None     # 'queue' for 'mailout queue NAME'
    common_options = True   # -C, --json, -v, -q

    def register(self, commands, common):
        """Add this command's parser to ``commands`` (argparse
        subparsers); ``common`` is the parser of the common options."""
        parser = commands.add_parser(
            self.name, help=self.help,
            description=self.description or self.help, epilog=EPILOG,
            parents=[common] if self.common_options else [],
            formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(handler=self)
        self.add_arguments(parser)
        return parser

    @property
    def title(self):
        """``queue status``: the command as a user types it."""
        return ' '.join(filter(None, (self.group, self.name)))

    def add_arguments(self, parser):
        pass

    def log_level(self, args):
        """The logging level of the command (None: leave logging alone)."""
        return logging.WARNING

    def run(self, args):
        raise NotImplementedError

    def text(self, result):
        raise NotImplementedError

    def show(self, args, result):
        """Print ``result``: JSON with ``--json``, text otherwise."""
        if getattr(args, 'json', False):
            print_json(result.data, result.lines)
        else:
            self.text(result)

    def fail(self, args, status, message):
        if getattr(args, 'json', False):
            print_json({'ok': False, 'error': message})
        print(f'mailout {self.title}: error: {printable(message)}',
              file=sys.stderr)
        return status


class Group:
    """Commands under one name (``mailout queue status``)."""

    name: Optional[str] = None
    help: Optional[str] = None
    description: Optional[str] = None
    commands: tuple[Command, ...] = ()

    def register(self, commands, common):
        parser = commands.add_parser(
            self.name, help=self.help, description=self.description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        subcommands = parser.add_subparsers(
            dest=f'{self.name}_command', required=True,
            metavar=f'{self.name.upper()}_COMMAND')
        for command in self.commands:
            command.register(subcommands, common)
        return parser


def seconds_argument(value):
    seconds = float(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f'not a positive number: {value}')
    return seconds


# -- configuration ------------------------------------------------------------

def require_config(args):
    if not args.config:
        raise CommandError(USAGE, 'no configuration: give -C CONFIG or set '
                                  '$MAILOUT_CONFIG')
    return args.config


def load_settings(args):
    """``(settings, source)`` from -C / $MAILOUT_CONFIG; a configuration
    that does not load is a `CommandError`."""
    import ZConfig

    from mailout import config
    path = require_config(args)
    try:
        return config.load_any(path)
    except (ZConfig.ConfigurationError, ImportError) as e:
        raise CommandError(FAILED, config_error(path, e)) from None


def config_data(args, source):
    """What every command's JSON says of its configuration: the path given
    (-C or $MAILOUT_CONFIG) and where the settings came from."""
    return {'path': args.config, 'source': source}


def status_data(status):
    """A `mailout.queue.Queue.status` as the commands' results give it:
    times as `When`, the last error as an attempt object."""
    from mailout.queue.fileformat import parse_attempt
    return {**status, 'next_attempt': when(status['next_attempt']),
            'last_error': parse_attempt(status['last_error'])
            if status['last_error'] else None}


def attempt_text(attempt):
    """An attempt (`mailout.queue.fileformat.parse_attempt`) on one line,
    as the queue file has it."""
    return ' '.join(str(part) for part in (
        attempt['time'], attempt['code'], attempt['text']) if part)


def config_error(path, error):
    message = str(error)
    return message if message.startswith(path) \
        else f'configuration {path}: {message}'


def queued(settings, only=None, required=True):
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


def processors(settings):
    """``[(name, delivery, processor)]`` of every queued delivery, with a
    processor whether or not the configuration turns it on.  The
    deliveries have none of their own: a commit here starts nothing."""
    from mailout import factories
    from mailout.delivery import QueuedDelivery
    _, deliveries = factories.build_all(settings, processors=False)
    return [(name, delivery, factories.build_processor(
                settings.deliveries[name], delivery.queue, delivery.mailer))
            for name, delivery in deliveries.items()
            if isinstance(delivery, QueuedDelivery)]


# -- formats ------------------------------------------------------------------

def n(count, word, plural=None):
    """``1 mailer``, ``2 mailers``."""
    return f"{count} {word if count == 1 else plural or word + 's'}"


def stamp(seconds):
    if seconds is None:
        return None
    from mailout.queue.fileformat import stamp as utc_stamp
    return utc_stamp(seconds)


def age(seconds):
    """``3d 4h``, ``5m 10s``, ``12s``: the two largest units."""
    seconds = int(round(seconds))
    parts = []
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60), ('s', 1)):
        if seconds >= size or (unit == 's' and not parts):
            parts.append(f'{seconds // size}{unit}')
            seconds %= size
    return ' '.join(parts[:2])


def relative(when, now):
    if when is None:
        return ''
    delta = when - now
    return f'in {age(delta)}' if delta > 0 else f'due since {age(-delta)}'
