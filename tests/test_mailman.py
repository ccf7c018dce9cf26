"""mailout's LMTP mailer -> Mailman 3's own LMTP runner (the real thing).

Mailman is big and pins its own dependencies, so it lives in a virtualenv of
its own, never in mailout's::

    python3 -m venv .mailman-venv && .mailman-venv/bin/pip install mailman

The fixture uses the venv named by ``MAILOUT_TEST_MAILMAN`` (then it must
work: the tests fail rather than skip, as CI wants), else ``.mailman-venv``
at the top of the checkout, else ``/tmp/mm``; without any it skips.

It writes a mailman.cfg into a temporary var dir (SQLite, Mailman's
``NullMTA`` so it never touches an MTA, LMTP on 127.0.0.1 and a free port),
creates the list ``test@example.com`` and runs only the LMTP runner
(``runner -r lmtp``): no master, REST API or other runners, so every message
Mailman accepts stays in its ``in/`` (list posts) or ``command/`` (``-request``
addresses) queue as a ``.pck`` file.  Those hold pickled Mailman objects;
`Mailman.queued` reads them with the venv's own Python.  No network, no root
needed (as root, ``mailman`` wants ``--run-as-root``, which the fixture adds).
"""
import json
import os
import socket
import subprocess
import time

import pytest

from helpers import failed
from helpers import files_in
from mailout import config
from mailout.factories import build_all
from mailout.message import prepare
from mailout.processor import Processor

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
ENV = 'MAILOUT_TEST_MAILMAN'
CANDIDATES = (os.path.join(CHECKOUT, '.mailman-venv'), '/tmp/mm')

LIST = 'test@example.com'
REQUEST = 'test-request@example.com'
NO_LIST = 'nolist@example.com'
SENDER = 'app@example.org'
#: Mailman's reply (RCPT and after DATA) to an address that is no list's.
NO_SUCH_LIST = (550, 'Requested action not taken: mailbox unavailable')

CFG = '''\
[mailman]
layout: here
site_owner: owner@example.com

[paths.here]
var_dir: {var}

[database]
class: mailman.database.sqlite.SQLiteDatabase
url: sqlite:///$DATA_DIR/mailman.db

[mta]
incoming: mailman.mta.null.NullMTA
lmtp_host: 127.0.0.1
lmtp_port: {port}
smtp_host: 127.0.0.1
smtp_port: 9
'''

# Run by the Mailman venv's Python: the queue files of one queue as JSON.
READ_QUEUE = '''\
import glob, json, os, pickle, sys
result = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.pck'))):
    with open(path, 'rb') as f:
        msg = pickle.load(f)
        data = pickle.load(f)
    result.append({'file': os.path.basename(path),
                   'message': msg.as_bytes().decode('latin-1'),
                   'msgdata': {k: v for k, v in data.items()
                               if isinstance(v, (str, int, bool))}})
json.dump(result, sys.stdout)
'''


def find_venv():
    """The Mailman venv's directory; skip (or fail, if ``ENV`` is set)
    when there is none."""
    wanted = os.environ.get(ENV)
    for venv in [wanted] if wanted else CANDIDATES:
        if all(os.access(os.path.join(venv, 'bin', name), os.X_OK)
               for name in ('mailman', 'runner', 'python')):
            return venv
    if wanted:
        pytest.fail(f'{ENV}={wanted} has no bin/mailman, bin/runner')
    pytest.skip('Mailman not installed: python3 -m venv .mailman-venv && '
                '.mailman-venv/bin/pip install mailman (or set '
                f'{ENV} to such a venv)')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Mailman:
    """Mailman's LMTP runner in a var dir of its own."""

    def __init__(self, venv, directory):
        self.venv = venv
        self.dir = str(directory)
        self.var = os.path.join(self.dir, 'var')
        self.port = free_port()
        self.cfg = os.path.join(self.dir, 'mailman.cfg')
        with open(self.cfg, 'w') as f:
            f.write(CFG.format(var=self.var, port=self.port))
        # Nothing of mailout's venv or a site Mailman config leaks in.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV',
                                 'MAILMAN_CONFIG_FILE')}
        self.process = None

    def bin(self, name):
        return os.path.join(self.venv, 'bin', name)

    def mailman(self, *args):
        """Run ``mailman -C CFG ARGS``; its output."""
        root = ['--run-as-root'] if os.geteuid() == 0 else []
        result = subprocess.run(
            [self.bin('mailman'), '-C', self.cfg, *root, *args],
            env=self.env, capture_output=True, text=True, timeout=120)
        if result.returncode:
            raise RuntimeError(f'mailman {" ".join(args)} exited with '
                               f'{result.returncode}: {result.stdout}'
                               f'{result.stderr}')
        return result.stdout

    def start(self, timeout=60):
        self.output = open(os.path.join(self.dir, 'runner.out'), 'wb')
        self.process = subprocess.Popen(
            [self.bin('runner'), '-C', self.cfg, '-r', 'lmtp'],
            env=self.env, stdin=subprocess.DEVNULL, stdout=self.output,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f'the LMTP runner exited with '
                                   f'{self.process.returncode}:\n'
                                   f'{self.log()}')
            try:
                socket.create_connection(('127.0.0.1', self.port), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f'the LMTP runner is not listening '
                                       f'after {timeout}s:\n{self.log()}')
                time.sleep(0.05)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()            # Mailman stops on SIGTERM
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.output.close()

    def log(self):
        parts = []
        for path in (os.path.join(self.dir, 'runner.out'),
                     os.path.join(self.var, 'logs', 'mailman.log')):
            if os.path.exists(path):
                with open(path, errors='replace') as f:
                    parts.append(f.read()[-3000:])
        return '\n'.join(parts)

    def queue_dir(self, queue):
        return os.path.join(self.var, 'queue', queue)

    def queued(self, queue='in'):
        """The messages in one of Mailman's queues: dicts of ``file``,
        ``message`` (str, latin-1 for bytes) and ``msgdata``."""
        result = subprocess.run(
            [self.bin('python'), '-c', READ_QUEUE, self.queue_dir(queue)],
            env=self.env, capture_output=True, text=True, timeout=60,
            check=True)
        return json.loads(result.stdout)

    def clear(self):
        for queue in ('in', 'command'):
            directory = self.queue_dir(queue)
            for name in os.listdir(directory):
                os.unlink(os.path.join(directory, name))


@pytest.fixture(scope='session')
def _session_mailman(tmp_path_factory):
    venv = find_venv()
    mailman = Mailman(venv, tmp_path_factory.mktemp('mailman'))
    try:
        mailman.mailman('create', LIST)
        mailman.start()
        yield mailman
    finally:
        mailman.stop()


@pytest.fixture
def mailman(_session_mailman):
    """Mailman's LMTP runner with the list test@example.com, its queues
    emptied for each test."""
    _session_mailman.clear()
    return _session_mailman


def lmtp(tmp_path, mailman):
    settings = config.loads(f'''<mailout>
        <lmtp-mailer lists>
          host 127.0.0.1:{mailman.port}
          timeout 10s
        </lmtp-mailer>
        <queued-delivery default>
          mailer lists
          queue-path {tmp_path}/q
          processor off
        </queued-delivery>
    </mailout>''')
    mailers, deliveries = build_all(settings)
    return mailers['lists'], deliveries['default'].queue


def data(subject, message_id):
    return (f'From: {SENDER}\r\nTo: {LIST}\r\nSubject: {subject}\r\n'
            f'Message-ID: <{message_id}>\r\n\r\n'
            'Line one.\r\n.leading dot\r\nLast line.\r\n').encode()


def test_list_post_lands_in_mailmans_incoming_queue(tmp_path, mailman):
    """A post to the list and a mail to its -request address in one LMTP
    transaction: Mailman answers 250 for each after the dot, files the post
    in its in/ queue and the other in command/; the connection stays in step
    for the next message (every per-recipient reply was read)."""
    mailer, _ = lmtp(tmp_path, mailman)
    try:
        assert mailer.send(SENDER, [LIST, REQUEST],
                           data('first', 'mm-1@example.org')) == {}
        assert mailer.send(SENDER, [LIST],
                           data('second', 'mm-2@example.org')) == {}
    finally:
        mailer.close()
    posts = mailman.queued('in')
    assert [p['msgdata']['listid'] for p in posts] == ['test.example.com'] * 2
    assert all(p['msgdata']['to_list'] for p in posts)
    subjects = sorted(p['message'].split('Subject: ')[1].split('\n')[0]
                      for p in posts)
    assert subjects == ['first', 'second']
    for post in posts:
        headers, body = post['message'].split('\n\n', 1)
        assert body == 'Line one.\n.leading dot\nLast line.\n'
        assert f'X-MailFrom: {SENDER}' in headers.splitlines()
    [command] = mailman.queued('command')
    assert command['msgdata']['to_request'] is True
    assert 'Message-ID: <mm-1@example.org>' in command['message']


def test_queued_message_reaches_mailman(tmp_path, mailman):
    """Through mailout's queue and processor: sent, nothing left behind."""
    mailer, queue = lmtp(tmp_path, mailman)
    name = queue.write(prepare(SENDER, [LIST],
                               data('queued', 'mm-3@example.org')))
    queue.commit([name])
    Processor(queue, mailer).run_once()
    [post] = mailman.queued('in')
    assert 'Message-ID: <mm-3@example.org>' in post['message']
    assert {area: files_in(queue, area)
            for area in ('new', 'cur', 'deferred', 'failed')} == {
        'new': [], 'cur': [], 'deferred': [], 'failed': []}


def test_no_such_list_is_refused_and_failed(tmp_path, mailman):
    """Mailman refuses an address that is no list's with a 550 at RCPT: the
    mailer reports it for that recipient only, the processor fails it for
    good (no retry) and the list still gets its copy."""
    mailer, queue = lmtp(tmp_path, mailman)
    try:
        assert mailer.send(SENDER, [NO_LIST, LIST],
                           data('mixed', 'mm-4@example.org')) == {
            NO_LIST: NO_SUCH_LIST}
        # Every recipient refused: no DATA, nothing queued.
        assert mailer.send(SENDER, [NO_LIST],
                           data('nobody', 'mm-5@example.org')) == {
            NO_LIST: NO_SUCH_LIST}
    finally:
        mailer.close()
    [post] = mailman.queued('in')
    assert 'Message-ID: <mm-4@example.org>' in post['message']

    mailman.clear()
    name = queue.write(prepare(SENDER, [LIST, NO_LIST],
                               data('queued mixed', 'mm-6@example.org')))
    queue.commit([name])
    Processor(queue, mailer).run_once()
    assert failed(queue, name).toaddrs == (NO_LIST,)
    assert files_in(queue, 'deferred') == []
    [post] = mailman.queued('in')
    assert 'Message-ID: <mm-6@example.org>' in post['message']
