"""Secrets: non-ASCII credentials go out as UTF-8 (RFC 4954), and no part
of a password is ever in an error, a log line, a repr, a queue file, an
event or the mailout command's output -- also when it has a '$' that
ZConfig takes for a substitution.  Against real SMTP server processes
(tests/smtpsink.py), real configuration files and the installed script."""
import json
import logging
import os
import subprocess
import sys
import traceback

import pytest
import zope.event
import ZConfig

from helpers import mailer_and_queue
from helpers import message
from helpers import smtp_mailer
from helpers import write_config
from helpers import write_zope_conf
from mailout import config
from mailout import mailers
from mailout.message import prepare
from mailout.processor import Processor

USER = 'zöpe'
PASSWORD = 'Grüße-€-Zq7xWv'
WRONG_PASSWORD = 'Fälsch-¥-Kj4pRt'
SCRIPT = os.path.join(os.path.dirname(sys.executable), 'mailout')


def fragments(secret, length=3):
    """Every piece of ``secret`` this long."""
    return {secret[i:i + length] for i in range(len(secret) - length + 1)}


def assert_no_part_of(secret, *texts):
    for text in texts:
        leaked = [f for f in fragments(secret) if f in text]
        assert not leaked, (leaked, text)


def smtp_section(port, password, *keys):
    return smtp_mailer(port, 'allow-plain-auth on', 'timeout 3s',
                       f'username {USER}', f'password {password}', *keys)


def test_non_ascii_credentials_sent_as_utf8(tmp_path, start_sink):
    """A non-ASCII user name and password authenticate (AUTH PLAIN, UTF-8
    as RFC 4954 says); smtplib raised UnicodeEncodeError."""
    sink = start_sink('--auth', f'{USER}:{PASSWORD}')
    mailer, _ = mailer_and_queue(tmp_path, smtp_section(sink.port, PASSWORD))
    assert mailer.send('a@example.org', ['b@example.org'], message()) == {}
    [record] = sink.wait_for(1)
    assert record['auth'] is True
    mailer.close()


def test_non_ascii_credentials_with_auth_login(tmp_path, start_sink):
    """AUTH LOGIN sends them as UTF-8 too."""
    sink = start_sink('--auth', f'{USER}:{PASSWORD}')
    mailer, _ = mailer_and_queue(tmp_path, smtp_mailer(sink.port))
    connection = mailer.connect('127.0.0.1', sink.port)
    connection.user, connection.password = USER, PASSWORD
    code, _ = connection.auth('LOGIN', connection.auth_login)
    assert code == 235
    connection.quit()


def test_wrong_non_ascii_password_stays_secret(tmp_path, start_sink,
                                               caplog):
    """A refused non-ASCII password defers the message; no part of it is in
    the error, the log, the queue files or the events."""
    caplog.set_level(logging.DEBUG)
    sink = start_sink('--auth', f'{USER}:{PASSWORD}')
    mailer, queue = mailer_and_queue(
        tmp_path, smtp_section(sink.port, WRONG_PASSWORD, 'down-time 0'))
    envelope = prepare('a@example.org', ['b@example.org'],
                       'Subject: hi\r\n\r\nhi\r\n')
    queue.commit([queue.write(envelope)])
    events = []
    zope.event.subscribers.append(events.append)
    try:
        Processor(queue, mailer).run_once()
    finally:
        zope.event.subscribers.remove(events.append)
    [event] = events
    assert type(event).__name__ == 'MailDeferredEvent'
    assert 'AUTH failed: 535' in event.reply[1]
    files = []
    for directory, _, names in os.walk(queue.path):
        for name in names:
            with open(os.path.join(directory, name), 'rb') as f:
                files.append(f.read().decode('utf-8', 'replace'))
    assert files
    with pytest.raises(Exception) as error:
        mailer.send('a@example.org', ['b@example.org'], message())
    assert_no_part_of(
        WRONG_PASSWORD, *files, repr(event), str(event.reply), caplog.text,
        *(r.getMessage() + (r.exc_text or '') for r in caplog.records),
        ''.join(traceback.format_exception(error.value)),
        repr(mailer), repr(mailer.settings))
    assert sink.messages() == []


@pytest.mark.parametrize('password, ok', [(PASSWORD, True),
                                          (WRONG_PASSWORD, False)])
def test_check_with_non_ascii_password(tmp_path, start_sink, password, ok):
    """`mailout check` authenticates with a non-ASCII password, or says
    AUTH failed without a word of it; it crashed."""
    sink = start_sink('--auth', f'{USER}:{PASSWORD}')
    conf = write_config(tmp_path / 'mailout.conf',
                        smtp_section(sink.port, password))
    result = subprocess.run([SCRIPT, 'check', '-C', conf], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == (0 if ok else 1), result.stderr
    assert ('check ok' if ok else 'FAILED: AUTH failed: 535') \
        in result.stdout
    assert 'Traceback' not in result.stderr
    assert_no_part_of(password, result.stdout, result.stderr)


DOLLAR_PASSWORDS = ['k9$Qz7Wv', 'k9${Qz7Wv', 'k9$(Qz7Wv', 'k9$', 'k9$Qz7Wv$$']


@pytest.mark.parametrize('password', DOLLAR_PASSWORDS)
def test_dollar_in_password_is_not_echoed(tmp_path, password):
    """ZConfig takes '$' in a value for a substitution and its error quoted
    the rest of the password ("no replacement for 'qz7wv'"); the error now
    names the file, the line if known, and '$$'."""
    path = write_config(tmp_path / 'mailout.conf', f'''
        <smtp-mailer relay>
          username zope
          password {password}
        </smtp-mailer>''')
    with pytest.raises(ZConfig.ConfigurationError) as error:
        config.load(path)
    text = str(error.value)
    assert path in text and "'$$'" in text
    assert_no_part_of(password, text, repr(error.value),
                      ''.join(traceback.format_exception(error.value)))


def test_dollar_in_password_through_check(tmp_path):
    """`mailout check` reports such a file without the password."""
    conf = write_config(tmp_path / 'mailout.conf', '''
        <smtp-mailer relay>
          username zope
          password k9$Qz7Wv
        </smtp-mailer>''')
    result = subprocess.run([SCRIPT, 'check', '--json', '-C', conf],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    error = json.loads(result.stdout)['config']['error']
    assert 'line 5' in error and "'$$'" in error
    assert_no_part_of('k9$Qz7Wv', result.stdout, result.stderr)


def test_dollar_in_password_in_zope_conf(instance):
    """The same for a password in a zope.conf that `mailout check` reads
    with Zope's schema."""
    conf = write_zope_conf(instance, '''
<mailout mailout>
  <smtp-mailer relay>
    username zope
    password k9${Qz7Wv
  </smtp-mailer>
</mailout>
''')
    result = subprocess.run([SCRIPT, 'check', '-C', conf],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f'configuration FAILED: {conf}: ' in result.stdout
    assert "'$$'" in result.stdout
    assert_no_part_of('k9${Qz7Wv', result.stdout, result.stderr)


def test_dollar_elsewhere_names_the_line(tmp_path):
    """Any key: whether a value is secret cannot be told from the error, so
    none is shown; the file and line are."""
    path = write_config(tmp_path / 'mailout.conf', '''
        <smtp-mailer relay>
          local-hostname $NOSUCHNAME
        </smtp-mailer>''')
    with pytest.raises(ZConfig.ConfigurationError) as error:
        config.load(path)
    assert f'{path}, line 4: ' in str(error.value)
    assert 'NOSUCHNAME' not in str(error.value)


def test_double_dollar_is_a_literal_dollar():
    settings = config.loads('<mailout>\n<smtp-mailer relay>\nusername u\n'
                            'password k9$$Qz7Wv\n</smtp-mailer>\n</mailout>')
    assert settings.mailers['relay'].read_password() == 'k9$Qz7Wv'


def password_file_mailer(tmp_path, content, mode=0o600):
    path = tmp_path / 'smtp-password'
    path.write_bytes(content)
    path.chmod(mode)
    settings = config.loads(f'<mailout>\n<smtp-mailer relay>\nusername u\n'
                            f'password-file {path}\n</smtp-mailer>\n'
                            '</mailout>').mailers['relay']
    return settings, path


def test_password_file_is_taken_as_it_is(tmp_path):
    """password-file: its first line, UTF-8, no '$' substitution."""
    settings, _ = password_file_mailer(
        tmp_path, 'k9$Qz7Wv-Grüße\nsecond line\n'.encode())
    assert settings.read_password() == 'k9$Qz7Wv-Grüße'


def test_password_file_not_utf8(tmp_path):
    """A password file that is not UTF-8 is an error that quotes none of
    its bytes."""
    settings, path = password_file_mailer(tmp_path, b'Gr\xfc\xdfe-Zq7xWv\n')
    with pytest.raises(ValueError) as error:
        settings.read_password()
    assert str(error.value) == f'password-file {path} is not UTF-8 text'


@pytest.mark.parametrize('mode, warned', [(0o600, False), (0o400, False),
                                          (0o640, True), (0o604, True)])
def test_password_file_readable_by_others_warns(tmp_path, caplog, mode,
                                                warned):
    """Building the mailer warns, once, when group or others can read the
    password file."""
    caplog.set_level(logging.WARNING)
    settings, path = password_file_mailer(tmp_path, b'Zq7xWv\n', mode)
    mailer = mailers.SMTPMailer(settings)
    mailer.close()
    expected = [f'password-file {path} is open to group or others (mode '
                f'0{mode:o}): chmod 600 it'] if warned else []
    assert [r.getMessage() for r in caplog.records] == expected
