"""The ``mailout`` command: run queue processors, inspect and repair
queues, check relays, send a test message; and ``mailout demo``.

Every command but ``demo`` reads ``-C CONFIG`` (default ``$MAILOUT_CONFIG``):
a standalone mailout file or a Zope instance's ``zope.conf``.  Output is
for people unless ``--json`` is given; errors go to stderr.

One module a command group; each defines `base.Command` classes (a name,
arguments, ``run`` computing a `base.Result`, ``text`` printing it), and
`COMMANDS` below registers them.  A new command is a class in a module and
a line here.
"""
import argparse
import logging
import os
import sys

from mailout.cli.base import FAILED
from mailout.cli.base import OK
from mailout.cli.base import USAGE
from mailout.cli.base import EPILOG
from mailout.cli.base import CommandError
from mailout.cli.check import Check
from mailout.cli.demo import Demo
from mailout.cli.metrics import Metrics
from mailout.cli.process import Process
from mailout.cli.queue import QueueGroup
from mailout.cli.send import Send

__all__ = ['main', 'parser', 'COMMANDS', 'CommandError',
           'OK', 'FAILED', 'USAGE']

#: The commands of ``mailout``, in the order ``--help`` lists them.
COMMANDS = (Process(), QueueGroup(), Check(), Send(), Metrics(), Demo())


def main(argv=None):
    main_parser = parser()
    args = main_parser.parse_args(argv)
    if args.command is None:        # bare "mailout"
        main_parser.print_help()
        return USAGE
    command = args.handler
    _log(command, args)
    try:
        result = command.run(args)
        command.show(args, result)
        return result.status
    except CommandError as e:
        return command.fail(args, e.status, str(e))
    except ValueError as e:
        from mailout.queue import QueueError
        if not isinstance(e, QueueError):   # e.g. a queue refused as unsafe
            raise
        return command.fail(args, FAILED, str(e))
    except PermissionError as e:
        return command.fail(args, FAILED, f'{e.strerror}: {e.filename} (run '
                                          'mailout as the user that owns the '
                                          'queue)')
    except OSError as e:
        return command.fail(args, FAILED, f'{type(e).__name__}: {e}')
    except KeyboardInterrupt:
        return command.fail(args, FAILED, 'interrupted')


def parser():
    """The argument parser of ``mailout`` and of every command."""
    main_parser = argparse.ArgumentParser(
        prog='mailout', epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Transactional, queued mail-out for Zope: run queue '
                    'processors, inspect and repair queues, check relays, '
                    'send a test message.')
    main_parser.add_argument('--version', action='version',
                             version=f'mailout {_version()}')
    # -C before the command or after it; after it, only when given, so as
    # not to undo one given before.
    main_parser.add_argument(
        '-C', '--config', metavar='CONFIG',
        default=os.environ.get('MAILOUT_CONFIG'),
        help='mailout file or zope.conf (default $MAILOUT_CONFIG)')
    commands = main_parser.add_subparsers(dest='command', metavar='COMMAND')
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        '-C', '--config', metavar='CONFIG', default=argparse.SUPPRESS,
        help='mailout file or zope.conf (default $MAILOUT_CONFIG)')
    common.add_argument('--json', action='store_true',
                        help='print JSON for scripts')
    common.add_argument('-v', '--verbose', action='store_true',
                        help='log what happens (INFO) to stderr')
    common.add_argument('-q', '--quiet', action='store_true',
                        help='log errors only')
    for command in COMMANDS:
        command.register(commands, common)
    return main_parser


def _version():
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version
    try:
        return version('mailout')
    except PackageNotFoundError:    # run from a source tree
        return 'unknown'


def _log(command, args):
    level = command.log_level(args)
    if level is None:
        return
    if args.verbose:
        level = logging.INFO
    elif args.quiet:
        level = max(level, logging.ERROR)
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format='%(asctime)s %(levelname)s %(name)s %(message)s')
