"""The sendmail-program mailer: a stand-in program, and Postfix's own."""
import json
import os
import stat
import sys

import pytest
import transaction

from mailout import config
from mailout.factories import build_all
from mailout.interfaces import PermanentDeliveryError
from mailout.interfaces import TransientDeliveryError
from postfix import split_received

FAKE = '''#!{python}
import json, os, sys
data = sys.stdin.buffer.read()
with open(os.path.join({directory!r}, 'call.json'), 'w') as f:
    json.dump({{'argv': sys.argv[1:], 'stdin': data.decode('latin-1')}}, f)
sys.stderr.write('fake sendmail says hello\\n')
sys.exit(int(open(os.path.join({directory!r}, 'status')).read()))
'''


@pytest.fixture
def fake_sendmail(tmp_path):
    """A program standing in for sendmail: records its arguments and input,
    exits with the status written to ``tmp_path/status``."""
    path = tmp_path / 'sendmail'
    path.write_text(FAKE.format(python=sys.executable,
                                directory=str(tmp_path)))
    path.chmod(stat.S_IRWXU)
    (tmp_path / 'status').write_text('0')
    return path


def mailer(path, *arguments):
    lines = '\n'.join(f'argument {a}' for a in arguments)
    settings = config.loads(f'''<mailout>
        <sendmail-mailer local>
          path {path}
          {lines}
          timeout 20s
        </sendmail-mailer>
        <direct-delivery urgent>
          mailer local
        </direct-delivery>
    </mailout>''')
    mailers, deliveries = build_all(settings)
    return mailers['local'], deliveries['urgent']


def call(tmp_path):
    with open(tmp_path / 'call.json') as f:
        return json.load(f)


def test_arguments_without_a_shell(tmp_path, fake_sendmail):
    """sendmail -i -f FROM -- TO...: an address full of shell syntax is one
    argument and runs nothing; line endings become local ones."""
    local, _ = mailer(fake_sendmail, '-oi')
    evil = '"$(touch pwned); `touch pwned`"@example.org'
    assert local.send('app@example.org', ['-oQ@example.org', evil],
                      b'Subject: x\r\n\r\nbody\r\n') == {}
    recorded = call(tmp_path)
    assert recorded['argv'] == ['-oi', '-i', '-f', 'app@example.org', '--',
                                '-oQ@example.org', evil]
    assert recorded['stdin'] == 'Subject: x\n\nbody\n'
    assert not os.path.exists('pwned') and not (tmp_path / 'pwned').exists()


@pytest.mark.parametrize('status, error, word', [
    (75, TransientDeliveryError, 'status 75'),
    (71, TransientDeliveryError, 'status 71'),
    (67, PermanentDeliveryError, 'EX_NOUSER'),
    (65, PermanentDeliveryError, 'EX_DATAERR'),
])
def test_exit_status_decides(tmp_path, fake_sendmail, status, error, word):
    """EX_TEMPFAIL and the like defer; EX_NOUSER and the like fail; the
    program's own words are kept."""
    (tmp_path / 'status').write_text(str(status))
    local, _ = mailer(fake_sendmail)
    with pytest.raises(error) as info:
        local.send('app@example.org', ['b@example.org'], b'Subject: x\r\n\r\n')
    assert word in str(info.value)
    assert 'fake sendmail says hello' in str(info.value)


def test_missing_program_is_transient(tmp_path):
    """A program that is not there defers (the configuration is wrong, not
    the message)."""
    local, _ = mailer(tmp_path / 'nosuch')
    with pytest.raises(TransientDeliveryError, match='cannot run'):
        local.send('app@example.org', ['b@example.org'], b'Subject: x\r\n\r\n')


def test_through_postfix_sendmail(postfix, relay_sink):
    """Postfix's own sendmail takes the message (committed through a direct
    delivery) and its private instance relays it to the sink."""
    _, urgent = mailer('/usr/sbin/sendmail', '-C', postfix.etc)
    data = (b'Message-Id: <sendmail-1@example.org>\r\nDate: Wed, 25 Nov 2026 '
            b'09:00:00 +0000\r\nFrom: app@example.org\r\nSubject: via '
            b'sendmail\r\n\r\nbody\r\n')
    urgent.send('app@example.org', ['ann@example.org'], data)
    transaction.commit()
    [received] = relay_sink.wait_for(1, timeout=30)
    assert received['mail_from'] == 'app@example.org'
    assert received['rcpt_tos'] == ['ann@example.org']
    _, rest = split_received(received['data'])
    assert b'Subject: via sendmail\r\n' in rest and rest.endswith(b'body\r\n')
