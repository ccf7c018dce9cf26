"""The sendmail-program mailer: hand each message to the local MTA's
``sendmail`` command, no shell, the exit status saying what happened."""
import subprocess
from collections.abc import Sequence

from mailout.interfaces import PermanentDeliveryError
from mailout.interfaces import Refused
from mailout.interfaces import TransientDeliveryError
from mailout.mailers.base import Mailer


class SendmailMailer(Mailer):
    """Run the local sendmail program: ``sendmail -i -f FROM -- TO...``,
    with no shell, the message on its standard input."""

    # sysexits.h: what the program's exit status says about retrying.
    PERMANENT_EXITS = {64: 'EX_USAGE', 65: 'EX_DATAERR', 67: 'EX_NOUSER',
                       68: 'EX_NOHOST', 69: 'EX_UNAVAILABLE',
                       77: 'EX_NOPERM'}

    def __init__(self, settings):
        self.settings = settings
        self.name = settings.name

    def __repr__(self):
        return f'<SendmailMailer {self.name!r} {self.settings.path}>'

    def send(self, fromaddr: str, toaddrs: Sequence[str], message: bytes,
             all_or_none: bool = False) -> Refused:
        # sendmail takes every recipient or none.
        command = [self.settings.path, *self.settings.arguments,
                   '-i', '-f', fromaddr, '--', *toaddrs]
        # A local program takes the local line ending.
        message = message.replace(b'\r\n', b'\n')
        try:
            result = subprocess.run(command, input=message,
                                    capture_output=True,
                                    timeout=self.settings.timeout)
        except subprocess.TimeoutExpired:
            raise TransientDeliveryError(
                (None, f'{self.settings.path} did not finish within '
                       f'{self.settings.timeout:g}s')) from None
        except OSError as e:
            raise TransientDeliveryError(
                (None, f'cannot run {self.settings.path}: {e}')) from None
        if result.returncode == 0:
            return {}
        status = result.returncode
        output = ' '.join(result.stderr.decode('utf-8', 'replace').split())
        text = f'{self.settings.path} exited with status {status}' \
            + (f' ({self.PERMANENT_EXITS[status]})'
               if status in self.PERMANENT_EXITS else '') \
            + (f': {output}' if output else '')
        if status in self.PERMANENT_EXITS:
            raise PermanentDeliveryError((550, text))
        raise TransientDeliveryError((451, text))
