"""README "Writing a mailer": the example transport (tests/mailout_httpapi),
included in the README verbatim, works through mailout's configuration,
factories and deliveries against a real HTTP server process on loopback."""
import base64
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import transaction
from zope.interface.verify import verifyObject

from helpers import write_zope_conf
from mailout import config
from mailout.factories import build_all
from mailout.interfaces import DeliveryError
from mailout.interfaces import IMailoutMailer
from mailout.interfaces import PermanentDeliveryError
from mailout.interfaces import TransientDeliveryError

HERE = os.path.dirname(__file__)
EXAMPLE = os.path.join(HERE, 'mailout_httpapi')
README = os.path.join(HERE, os.pardir, 'README.rst')
FROM, ANN, BOB = 'app@example.org', 'ann@example.org', 'bob@example.org'
MESSAGE = b'Subject: hi\r\n\r\nhi \xc3\xa9\r\n'


def readme_blocks():
    """The text of every literal block of README's "Writing a mailer"."""
    with open(README, encoding='utf-8') as f:
        readme = f.read()
    section = readme.split('\nWriting a mailer\n================\n')[1]
    section = re.split(r'\n\S[^\n]*\n=+\n', section)[0]
    blocks = re.findall(r'::\n\n((?:(?:    [^\n]*)?\n)+)', section)
    return [textwrap.dedent(block).strip('\n') + '\n' for block in blocks]


@pytest.mark.parametrize('name', ['__init__.py', 'component.xml'])
def test_readme_shows_the_example_verbatim(name):
    """README's "Writing a mailer" shows the example's module and component
    as they are tested here."""
    with open(os.path.join(EXAMPLE, name), encoding='utf-8') as f:
        assert f.read() in readme_blocks()


@pytest.fixture
def start_api(tmp_path):
    """Start tests/httpapisink.py; returns (port, messages())."""
    started = []

    def start(*options):
        record = tmp_path / f'api{len(started)}.jsonl'
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, 'httpapisink.py'),
             str(record), *options], stdout=subprocess.PIPE, text=True)
        started.append(process)
        port = int(process.stdout.readline())

        def messages():
            if not record.exists():
                return []
            with open(record) as f:
                return [json.loads(line) for line in f]
        return port, messages
    yield start
    for process in started:
        process.kill()
        process.wait()


def configured(*ports, extra=''):
    """Mailers and deliveries of a standalone configuration that imports
    the example's component."""
    hosts = '\n'.join(f'    host 127.0.0.1:{port}' for port in ports)
    return build_all(config.loads(f'''%import mailout_httpapi
<mailout>
  <http-api-mailer api>
{hosts}
    timeout 5s
{extra}
  </http-api-mailer>
  <direct-delivery default>
    mailer api
  </direct-delivery>
</mailout>
'''))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_committed_message_reaches_the_api(start_api):
    """The configured http-api-mailer provides IMailoutMailer; a direct
    delivery's commit POSTs the message, non-ASCII bytes intact."""
    port, messages = start_api()
    mailers, deliveries = configured(port)
    assert verifyObject(IMailoutMailer, mailers['api'])
    deliveries['default'].send(FROM, [ANN], MESSAGE)
    transaction.commit()
    [posted] = messages()
    assert posted['path'] == '/messages' and posted['from'] == FROM
    assert posted['to'] == [ANN] and posted['all_or_none'] is True
    assert base64.b64decode(posted['message']).endswith(
        b'\r\n\r\nhi \xc3\xa9\r\n')


def test_refused_recipients_and_refusals(start_api):
    """send() returns the recipients the API refused; a 4xx status is a
    permanent error, a 5xx a transient one."""
    port, _ = start_api('--refuse', f'{BOB}=550 5.1.1 no such user')
    mailer = configured(port)[0]['api']
    assert mailer.send(FROM, [ANN, BOB], MESSAGE) == {
        BOB: (550, '5.1.1 no such user')}
    for status, error in (403, PermanentDeliveryError), \
            (503, TransientDeliveryError):
        port, _ = start_api('--status', str(status))
        mailer = configured(port)[0]['api']
        with pytest.raises(error, match=f'HTTP {status}: '):
            mailer.send(FROM, [ANN], MESSAGE)


def test_a_down_host_rests_and_probe_says_so(start_api):
    """With one host down, messages go to the other (the down one rests,
    mailout's RelayRotation); probe() reports both."""
    port, messages = start_api()
    down = free_port()
    mailer = configured(down, port)[0]['api']
    for _ in range(3):
        assert mailer.send(FROM, [ANN], MESSAGE) == {}
    assert len(messages()) == 3
    assert mailer.rotation.in_turn() == [('127.0.0.1', port)]
    up, failed = sorted(mailer.probe(), key=lambda r: r['port'] != port)
    assert up['ok'] and up['server'].startswith('mailapi/1.0')
    assert not failed['ok'] and 'ConnectionRefusedError' in failed['error']
    with pytest.raises(DeliveryError):
        configured(down)[0]['api'].send(FROM, [ANN], MESSAGE)


def test_zope_conf_imports_the_example(start_api, instance):
    """In zope.conf, %import of the example's package is enough for its
    section type inside <mailout mailout>."""
    port, messages = start_api()
    conf = write_zope_conf(instance, f'''
%import mailout_httpapi
<mailout mailout>
  <http-api-mailer api>
    host 127.0.0.1:{port}
  </http-api-mailer>
  <direct-delivery default>
    mailer api
  </direct-delivery>
</mailout>
''')
    settings, source = config.load_any(conf)
    assert source == f'{conf}, section <mailout mailout>'
    mailers, _ = build_all(settings)
    assert mailers['api'].send(FROM, [ANN], MESSAGE) == {}
    assert len(messages()) == 1
