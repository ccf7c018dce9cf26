"""Replay the ``mailout`` session of README.rst's section "Operate" for
real, and (``--write``) put its outputs into the README.

    .venv/bin/python tests/readme_session.py           # print the session
    .venv/bin/python tests/readme_session.py --write   # rewrite README.rst

The session runs in a temporary directory ROOT laid out as the README
says: ``ROOT/srv/zope/client1`` is the working directory, with
``MAILOUT_CONFIG=ROOT/srv/zope/client1/etc/mailout.conf``, and
``ROOT/srv/zope/client2`` is a Zope instance (Zope's mkwsgiinstance) with a
``<mailout mailout>`` section in its ``zope.conf``.  Everything is real:
the ``mailout`` console script beside ``sys.executable`` run as a
subprocess for each command, SMTP sink processes (tests/smtpsink.py) as
relays, messages committed by other Python processes.  client1's relay
requires AUTH as ``zope``, refuses ``nobody@example.org`` (550) and
greylists ``bob@example.net`` (451); its queued delivery ``default`` has
``processor off`` and its direct delivery is ``urgent``.
``etc/broken.conf`` names one mailer with two relays: client1's with a
wrong password, and a port where nothing listens.  client2's relay is a
second sink, without AUTH.

The commands run in the order of events (`replay`), which is not the
README's order of presentation.  Each one's output is stdout and stderr
merged into one pipe, as on a terminal (unbuffered, so in the order
written), with ROOT written as ``/tmp``: the README's paths read
``/tmp/srv/zope/client1/...``.  tests/test_readme_session.py compares
every README output with a fresh run of this session.
"""
import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from helpers import Sink             # noqa: E402
from helpers import config_text      # noqa: E402
from helpers import write_config     # noqa: E402
from helpers import write_zope_conf  # noqa: E402
from helpers import zope_script      # noqa: E402

README = os.path.join(HERE, '..', 'README.rst')
SCRIPT = os.path.join(os.path.dirname(sys.executable), 'mailout')
#: The part of README.rst that shows the session.
SECTION_START = '\nOperate\n=======\n'
SECTION_END = '\nLogging\n=======\n'
#: What ROOT becomes in the outputs and command lines shown.
SHOWN_ROOT = '/tmp'
#: Generous: a loaded CI machine may be slow, and waits end on conditions.
TIMEOUT = 120

REFUSED = ('nobody@example.org=550 5.1.1 <nobody@example.org>: Recipient '
           'address rejected: User unknown')
GREYLISTED = ('bob@example.net=451 4.7.1 <bob@example.net>: Recipient '
              'address rejected: greylisted, try again later')

#: The exit status of each command of the session (README, "Operate").
STATUS = {
    'mailout check': 0,
    'mailout check -C etc/broken.conf': 1,
    'mailout check -C /tmp/srv/zope/client2/etc/zope.conf': 0,
    'mailout send --from ops@example.org --to ann@example.org': 0,
    "mailout send --from ops@example.org --to nobody@example.org "
    "--to bob@example.net --subject 'Your order'": 1,
    'mailout send --from ops@example.org --to ann@example.org '
    '--delivery urgent': 0,
    'mailout queue status': 0,
    'mailout queue status --json': 0,
    'mailout queue list': 0,
    'mailout queue show FRAGMENT': 0,
    'mailout process': 0,
    'mailout queue retry --all-failed': 0,
    'mailout process --once': 1,
    'mailout queue status --warn-age 15m --crit-age 2h --max-failed 0': 2,
    'mailout queue purge --failed': 2,
    'mailout queue purge --failed --older-than 30d': 0,
    'mailout queue hold --from newsletter@example.org': 0,
    'mailout queue purge --from newsletter@example.org --dry-run': 0,
    'mailout queue release --all': 0,
}


@dataclasses.dataclass
class Run:
    """One command of the session as the README shows it: ``command``
    (``mailout ...``), ``output`` (lines, no line ends) and ``status``."""
    command: str
    output: list
    status: int


def show_fragment(command):
    """``command`` with the ID part of ``mailout queue show ID`` written
    FRAGMENT: the one command line whose text varies from run to run."""
    return re.sub(r'^(mailout queue show )\S+$', r'\1FRAGMENT', command)


# -- the setting -------------------------------------------------------------

def secret(path, text):
    path.write_text(text + '\n')
    path.chmod(0o600)
    return path


class Setting:
    """The two instances under ``root``, their relays, and a port where
    nothing listens: a context manager that stops the relays on the way
    out."""

    def __init__(self, root):
        self.root = Path(root)
        self.client1 = self.root / 'srv' / 'zope' / 'client1'
        self.client2 = self.root / 'srv' / 'zope' / 'client2'
        self.sinks = []
        self.dead = None

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info):
        for sink in self.sinks:
            sink.stop()
        if self.dead is not None:
            self.dead.close()

    def _build(self):
        relays = self.root / 'relays'
        relay1 = Sink(relays / 'client1', '--auth', 'zope:secret',
                      '--auth-required', '--refuse', REFUSED,
                      '--refuse', GREYLISTED)
        self.sinks.append(relay1)
        relay2 = Sink(relays / 'client2')
        self.sinks.append(relay2)
        # Bound, never listening: a connection is refused, and no other
        # program can take the port while the session runs.
        self.dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.dead.bind(('127.0.0.1', 0))
        dead_port = self.dead.getsockname()[1]

        etc = self.client1 / 'etc'
        etc.mkdir(parents=True)
        (self.client1 / 'var').mkdir()
        password = secret(etc / 'smtp-password', 'secret')
        wrong = secret(etc / 'old-smtp-password', 'not the secret')
        queue_path = self.client1 / 'var' / 'mailqueue'
        auth = ('allow-plain-auth on', 'username zope')
        self.config = write_config(etc / 'mailout.conf', config_text(
            relay1.port, queue_path,
            mailer_lines=(*auth, f'password-file {password}'),
            delivery_lines=('processor off',), direct=True))
        write_config(etc / 'broken.conf', config_text(
            [relay1.port, dead_port], queue_path,
            mailer_lines=(*auth, f'password-file {wrong}'),
            delivery_lines=('processor off',)))

        self.client2.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(zope_script('Zope2.utilities.mkwsgiinstance',
                                   '-d', self.client2, '-u', 'admin:admin'),
                       check=True, capture_output=True, timeout=TIMEOUT)
        self.zope_conf = write_zope_conf(
            self.client2, '\n<mailout mailout>\n' + config_text(
                relay2.port, '$INSTANCE/var/mailqueue') + '</mailout>\n')

    def env(self):
        return dict(os.environ, MAILOUT_CONFIG=str(self.config),
                    PYTHONUNBUFFERED='1')


#: A Zope process with ``processor off``, in short: it commits messages
#: through the queued delivery ``default`` of the configuration
#: $MAILOUT_CONFIG and exits.  argv: FROM SUBJECT TO...
COMMIT = '''\
import os, sys, transaction
from mailout import config
from mailout.factories import build_all
settings, source = config.load_any(os.environ['MAILOUT_CONFIG'])
mailers, deliveries = build_all(settings, processors=False)
fromaddr, subject, *recipients = sys.argv[1:]
for to in recipients:
    deliveries['default'].send(fromaddr, [to], (
        f'From: {fromaddr}\\r\\nTo: {to}\\r\\nSubject: {subject}\\r\\n'
        '\\r\\nHello.\\r\\n'))
transaction.commit()
'''


# -- the session ---------------------------------------------------------------

class Session:
    """The commands run so far in ``setting`` (`Run` s, in order)."""

    def __init__(self, setting):
        self.setting = setting
        self.runs = []

    def shown(self, text):
        """``text`` with the setting's root written as the README has it.
        """
        root = str(self.setting.root)
        for path in {os.path.realpath(root), root}:
            text = text.replace(path, SHOWN_ROOT)
        return text

    def record(self, command, output, status):
        lines = [line.rstrip() for line in
                 self.shown(output).rstrip('\n').split('\n')]
        run = Run(self.shown(command), lines if lines != [''] else [],
                  status)
        self.runs.append(run)
        return run

    def run(self, command):
        """Run ``command`` (``mailout ...`` as a shell would split it) in
        client1, without a terminal; its `Run`."""
        args = shlex.split(command)
        assert args[0] == 'mailout', command
        result = subprocess.run(
            [SCRIPT, *args[1:]], cwd=self.setting.client1,
            env=self.setting.env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=TIMEOUT)
        return self.record(command, result.stdout, result.returncode)

    def commit(self, fromaddr, subject, *recipients):
        """Another process commits one message a recipient into client1's
        queue (processor off: they wait)."""
        subprocess.run([sys.executable, '-c', COMMIT, fromaddr, subject,
                        *recipients], env=self.setting.env(), check=True,
                       timeout=TIMEOUT)

    def daemon(self, command, fromaddr, subject, to):
        """Start ``command`` (``mailout process``), wait until it is up,
        have another process commit a message to ``to``, wait until the
        daemon logs it sent, stop it with SIGTERM; its `Run`."""
        process = subprocess.Popen(
            [SCRIPT, *shlex.split(command)[1:]], cwd=self.setting.client1,
            env=self.setting.env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        changed = threading.Condition()

        def read():
            for line in process.stdout:
                with changed:
                    lines.append(line)
                    changed.notify_all()
            with changed:
                lines.append(None)      # end of output
                changed.notify_all()

        def wait_for(pattern):
            with changed:
                if not changed.wait_for(lambda: None in lines or any(
                        re.search(pattern, line) for line in lines
                        if line is not None), TIMEOUT):
                    raise TimeoutError(f'{command}: no {pattern!r} in:\n'
                                       + ''.join(filter(None, lines)))
                if None in lines:
                    raise RuntimeError(f'{command} exited early:\n'
                                       + ''.join(filter(None, lines)))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_for(r'^stop with SIGTERM')
            self.commit(fromaddr, subject, to)
            wait_for(rf': sent <.* to {re.escape(to)}$')
            process.send_signal(signal.SIGTERM)
            status = process.wait(TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(TIMEOUT)
        return self.record(command, ''.join(filter(None, lines)), status)


def replay(root):
    """Play the session in ``root`` (an empty directory); its `Run` s in
    the order they ran."""
    with Setting(root) as setting:
        session = Session(setting)
        run = session.run
        run('mailout check')
        run('mailout check -C etc/broken.conf')
        run(f'mailout check -C {setting.zope_conf}')
        run('mailout send --from ops@example.org --to ann@example.org')
        sent = run('mailout send --from ops@example.org '
                   '--to nobody@example.org --to bob@example.net '
                   "--subject 'Your order'")
        run('mailout send --from ops@example.org --to ann@example.org '
            '--delivery urgent')
        run('mailout queue status')
        run('mailout queue status --json')
        run('mailout queue list')
        [queue_id] = {m.group(1) for m in re.finditer(
            r'\(mailout queue show (\S+)\)', '\n'.join(sent.output))}
        # An unique part of the queue id, as a person would pick it: eight
        # digits of its random part.
        run(f'mailout queue show {queue_id.split("_")[-1][:8]}')
        session.daemon('mailout process', 'ops@example.org', 'Welcome',
                       'ann@example.org')
        run('mailout queue retry --all-failed')
        run('mailout process --once')
        run('mailout queue status --warn-age 15m --crit-age 2h '
            '--max-failed 0')
        run('mailout queue purge --failed')
        run('mailout queue purge --failed --older-than 30d')
        session.commit('newsletter@example.org', 'News of the week',
                       'ann@example.org', 'bob@example.net')
        run('mailout queue hold --from newsletter@example.org')
        run('mailout queue purge --from newsletter@example.org --dry-run')
        run('mailout queue release --all')
    return session.runs


def unexpected_statuses(runs):
    """``['$ COMMAND: exit N, not M', ...]`` for each of ``runs`` that did
    not exit as `STATUS` says."""
    return [f'$ {run.command}: exit {run.status}, not '
            f'{STATUS.get(show_fragment(run.command))}'
            for run in runs
            if run.status != STATUS.get(show_fragment(run.command))]


# -- README.rst ------------------------------------------------------------------

def readme_commands(text):
    """The ``$ mailout`` commands shown in the section "Operate" of the
    README ``text``: ``[(command, output lines, (start, end))]``, where
    lines ``start:end`` of ``text`` (0-based) hold the output: the lines
    after the command up to the next command or the end of its literal
    block, blank lines at the end left out."""
    lines = text.split('\n')
    first = text[:text.index(SECTION_START)].count('\n')
    last = text[:text.index(SECTION_END)].count('\n')
    found = []
    number = first
    while number < last:
        line = lines[number]
        if not line.startswith('    $ '):
            number += 1
            continue
        end = number + 1
        while end < last and not lines[end].startswith('    $ ') and (
                lines[end].startswith('    ') or not lines[end].strip()):
            end += 1
        stop = end
        while stop > number + 1 and not lines[stop - 1].strip():
            stop -= 1
        output = [each[4:] for each in lines[number + 1:stop]]
        found.append((line[6:], output, (number + 1, end)))
        number = end
    return found


def write(runs, path=README):
    """Put the outputs of ``runs`` under their commands in ``path``, and
    the session's ID into the command ``mailout queue show ID``."""
    with open(path) as f:
        text = f.read()
    lines = text.split('\n')
    by_command = {show_fragment(run.command): run for run in runs}
    # From the end, so that the line numbers of the others stay.
    for command, _, (start, end) in reversed(readme_commands(text)):
        run = by_command.get(show_fragment(command))
        if run is None:
            raise LookupError(f'README.rst line {start}: the session does '
                              f'not run "{command}"')
        followed = end < len(lines) and lines[end].startswith('    $ ')
        lines[start - 1] = '    $ ' + run.command
        lines[start:end] = [('    ' + line).rstrip() for line in run.output] \
            + ([''] if followed and run.output else []) \
            + ([] if followed else [''])
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ['--write']):
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix='mailout-readme-') as root:
        started = time.monotonic()
        runs = replay(root)
        took = time.monotonic() - started
    if not argv:
        for run in runs:
            print('$ ' + run.command)
            print('\n'.join(run.output))
            print(f'[exit {run.status}]\n')
        print(f'({took:.1f}s)')
        return 0
    wrong = unexpected_statuses(runs)
    if wrong:
        print('README.rst left as it is:', *wrong, sep='\n',
              file=sys.stderr)
        return 1
    write(runs)
    print(f'README.rst: {len(runs)} outputs written ({took:.1f}s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
