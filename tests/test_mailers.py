"""The SMTP mailer against real SMTP server processes (tests/smtpsink.py)."""
import logging
import time
import traceback

import pytest

from helpers import message
from mailout import config
from mailout import mailers
from mailout.interfaces import PermanentDeliveryError
from mailout.interfaces import TransientDeliveryError

FROM = 'sender@example.org'
TO = ['ann@example.org']
USER = 'zope'
PASSWORD = 'S3cret-Pa55w0rd'
WRONG_PASSWORD = 'Wr0ng-Pa55w0rd'


@pytest.fixture
def make_mailer():
    """Build an SMTPMailer from smtp-mailer keys; closed after the test."""
    made = []

    def make(body):
        settings = config.loads(
            f'<mailout>\n<smtp-mailer relay>\n  timeout 3s\n{body}\n'
            '</smtp-mailer>\n</mailout>\n').mailers['relay']
        mailer = mailers.SMTPMailer(settings)
        made.append(mailer)
        return mailer
    yield make
    for mailer in made:
        mailer.close()


def only_message(sink):
    messages = sink.wait_for(1)
    assert len(messages) == 1, messages
    return messages[0]


def test_plain_send(make_mailer, sink):
    """Over "tls none" send() returns {} and the relay gets envelope and bytes."""
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls none')
    data = message()
    assert mailer.send(FROM, ['ann@example.org', 'bob@example.org'],
                       data) == {}
    record = only_message(sink)
    assert record['mail_from'] == FROM
    assert record['rcpt_tos'] == ['ann@example.org', 'bob@example.org']
    assert record['data'] == data
    assert record['tls'] is False
    assert record['auth'] is False


def test_starttls(make_mailer, start_sink, certs):
    """"tls starttls" with the relay's CA upgrades before MAIL FROM."""
    sink = start_sink('--starttls', certs.cert, certs.key)
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls starttls\n'
                         f'ca-file {certs.ca}')
    assert mailer.send(FROM, TO, message()) == {}
    assert only_message(sink)['tls'] is True


def test_opportunistic_upgrades_when_offered(make_mailer, start_sink, certs):
    """"tls opportunistic" uses STARTTLS when the relay offers it."""
    sink = start_sink('--starttls', certs.cert, certs.key)
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls opportunistic\n'
                         f'ca-file {certs.ca}')
    assert mailer.send(FROM, TO, message()) == {}
    assert only_message(sink)['tls'] is True


def test_opportunistic_plain_when_not_offered(make_mailer, sink, certs):
    """"tls opportunistic" sends in the clear when STARTTLS is not offered."""
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls opportunistic\n'
                         f'ca-file {certs.ca}')
    assert mailer.send(FROM, TO, message()) == {}
    assert only_message(sink)['tls'] is False


def test_implicit_tls(make_mailer, start_sink, certs):
    """"tls ssl" speaks SMTPS (TLS from the first byte) to the relay."""
    sink = start_sink('--ssl', certs.cert, certs.key)
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls ssl\n'
                         f'ca-file {certs.ca}')
    assert mailer.send(FROM, TO, message()) == {}
    assert only_message(sink)['tls'] is True


@pytest.mark.parametrize('tls, option', [('starttls', '--starttls'),
                                         ('opportunistic', '--starttls'),
                                         ('ssl', '--ssl')])
def test_certificate_verified_by_default(make_mailer, start_sink, certs,
                                         tls, option):
    """Without ca-file an untrusted relay certificate fails transiently
    (opportunistic TLS does not fall back to plain); nothing is sent."""
    sink = start_sink(option, certs.cert, certs.key)
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls {tls}')
    with pytest.raises(TransientDeliveryError) as e:
        mailer.send(FROM, TO, message())
    assert 'certificate verify failed' in str(e.value)
    assert f'127.0.0.1:{sink.port}' in str(e.value)
    assert sink.messages() == []


@pytest.mark.parametrize('tls, option', [('starttls', '--starttls'),
                                         ('ssl', '--ssl')])
def test_verify_certificates_off(make_mailer, start_sink, certs, tls, option):
    """"verify-certificates off" accepts a relay certificate nobody trusts."""
    sink = start_sink(option, certs.cert, certs.key)
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls {tls}\n'
                         'verify-certificates off')
    assert mailer.send(FROM, TO, message()) == {}
    assert only_message(sink)['tls'] is True


def test_starttls_required_but_not_offered(make_mailer, sink, certs):
    """"tls starttls" against a relay without STARTTLS fails transiently and
    sends nothing."""
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls starttls\n'
                         f'ca-file {certs.ca}')
    with pytest.raises(TransientDeliveryError, match='STARTTLS'):
        mailer.send(FROM, TO, message())
    assert sink.messages() == []


@pytest.mark.parametrize('secret', ['password', 'password-file'])
def test_auth(make_mailer, start_sink, certs, tmp_path, secret):
    """AUTH with the right password (inline or from a file) over STARTTLS."""
    sink = start_sink('--starttls', certs.cert, certs.key,
                      '--auth', f'{USER}:{PASSWORD}')
    if secret == 'password':
        key = f'password {PASSWORD}'
    else:
        (tmp_path / 'secret').write_text(PASSWORD + '\n')
        key = f'password-file {tmp_path / "secret"}'
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls starttls\n'
                         f'ca-file {certs.ca}\nusername {USER}\n{key}')
    assert mailer.send(FROM, TO, message()) == {}
    record = only_message(sink)
    assert record['auth'] is True
    assert record['tls'] is True


def test_auth_failure_keeps_the_password_secret(make_mailer, start_sink,
                                                certs, caplog):
    """A wrong password fails transiently naming AUTH; the password is in no
    exception, repr or log record."""
    caplog.set_level(logging.DEBUG)
    sink = start_sink('--starttls', certs.cert, certs.key,
                      '--auth', f'{USER}:{PASSWORD}')
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls starttls\n'
                         f'ca-file {certs.ca}\nusername {USER}\n'
                         f'password {WRONG_PASSWORD}')
    with pytest.raises(TransientDeliveryError) as e:
        mailer.send(FROM, TO, message())
    assert 'AUTH' in str(e.value)
    assert sink.messages() == []
    texts = [str(e.value), repr(e.value),
             ''.join(traceback.format_exception(e.value)),
             repr(mailer), str(mailer), repr(mailer.settings)]
    texts += [r.getMessage() for r in caplog.records]
    texts += [r.exc_text or '' for r in caplog.records]
    texts.append(caplog.text)
    for text in texts:
        assert WRONG_PASSWORD not in text


@pytest.mark.parametrize('tls', ['none', 'opportunistic'])
def test_no_auth_in_the_clear(make_mailer, start_sink, tls):
    """AUTH over an unencrypted connection is refused before the password
    is sent."""
    sink = start_sink('--auth', f'{USER}:{PASSWORD}')
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls {tls}\n'
                         f'username {USER}\npassword {PASSWORD}')
    with pytest.raises(TransientDeliveryError, match='allow-plain-auth'):
        mailer.send(FROM, TO, message())
    assert sink.messages() == []


def test_allow_plain_auth(make_mailer, start_sink):
    """"allow-plain-auth on" permits AUTH over an unencrypted connection."""
    sink = start_sink('--auth', f'{USER}:{PASSWORD}')
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls none\n'
                         f'username {USER}\npassword {PASSWORD}\n'
                         'allow-plain-auth on')
    assert mailer.send(FROM, TO, message()) == {}
    record = only_message(sink)
    assert record['auth'] is True
    assert record['tls'] is False


def test_partial_refusal(make_mailer, start_sink):
    """Refused recipients are returned with their reply; the others get it."""
    sink = start_sink('--refuse', 'bob@example.org=550 5.1.1 no such user')
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls none')
    refused = mailer.send(
        FROM, ['ann@example.org', 'bob@example.org', 'cat@example.org'],
        message())
    assert refused == {'bob@example.org': (550, '5.1.1 no such user')}
    assert only_message(sink)['rcpt_tos'] == ['ann@example.org',
                                              'cat@example.org']


def test_all_refused(make_mailer, start_sink):
    """When every recipient is refused, all are returned and nothing is
    delivered; the connection stays usable."""
    sink = start_sink('--refuse', 'bob@example.org=550 5.1.1 no such user',
                      '--refuse', 'cat@example.org=450 4.2.1 try later')
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls none')
    refused = mailer.send(FROM, ['bob@example.org', 'cat@example.org'],
                          message())
    assert refused == {'bob@example.org': (550, '5.1.1 no such user'),
                       'cat@example.org': (450, '4.2.1 try later')}
    assert sink.messages() == []
    assert mailer.send(FROM, TO, message()) == {}
    assert only_message(sink)['rcpt_tos'] == TO


def test_connection_reused(make_mailer, sink):
    """Messages in a row share one connection; close() ends it."""
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls none')
    for i in range(3):
        assert mailer.send(FROM, TO, message(f'Message {i}')) == {}
    peers = [record['peer'] for record in sink.wait_for(3)]
    assert len(peers) == 3 and len(set(peers)) == 1
    mailer.close()
    assert mailer.send(FROM, TO, message('After close')) == {}
    assert sink.wait_for(4)[3]['peer'] != peers[0]


IDLE_REPLIES = [None, '421 4.4.2 sink.test Error: timeout exceeded']


@pytest.mark.parametrize('reply', IDLE_REPLIES)
def test_reconnect_after_idle_close(make_mailer, start_sink, reply):
    """A connection the relay closed while idle (silently, or saying 421 as
    Postfix does) is replaced transparently by a new one."""
    options = ['--idle-timeout', '0.2']
    if reply:
        options += ['--idle-reply', reply]
    sink = start_sink(*options)
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls none')
    assert mailer.send(FROM, TO, message('First')) == {}
    time.sleep(0.5)
    assert mailer.send(FROM, TO, message('Second')) == {}
    first, second = sink.wait_for(2)
    assert first['peer'] != second['peer']


@pytest.mark.parametrize('reply', IDLE_REPLIES)
def test_reconnect_after_idle_close_tls(make_mailer, start_sink, certs,
                                        reply):
    """A STARTTLS connection the relay closed while idle is replaced too."""
    options = ['--starttls', certs.cert, certs.key, '--idle-timeout', '0.2']
    if reply:
        options += ['--idle-reply', reply]
    sink = start_sink(*options)
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls starttls\n'
                         f'ca-file {certs.ca}')
    assert mailer.send(FROM, TO, message('First')) == {}
    time.sleep(0.5)
    assert mailer.send(FROM, TO, message('Second')) == {}
    first, second = sink.wait_for(2)
    assert first['peer'] != second['peer']
    assert second['tls'] is True


@pytest.mark.parametrize('reply, error', [
    ('421 4.3.2 shutting down', TransientDeliveryError),
    ('451 4.3.0 try again', TransientDeliveryError),
    ('550 5.7.1 sender rejected', PermanentDeliveryError)])
def test_sender_refused(make_mailer, start_sink, reply, error):
    """A refused MAIL FROM on a new connection raises the relay's reply:
    4xx (421 included) transient, 5xx permanent; nothing is sent."""
    sink = start_sink('--mail-reply', reply)
    mailer = make_mailer(f'host 127.0.0.1:{sink.port}\ntls none')
    code, text = reply.split(' ', 1)
    with pytest.raises(error) as e:
        mailer.send(FROM, TO, message())
    assert type(e.value) is error
    assert e.value.reply == (int(code), text)
    assert sink.messages() == []


def test_relay_down(make_mailer):
    """A relay that refuses connections fails transiently, naming host:port."""
    mailer = make_mailer('host 127.0.0.1:1\ntls none')
    with pytest.raises(TransientDeliveryError, match='127.0.0.1:1') as e:
        mailer.send(FROM, TO, message())
    assert e.value.reply[0] is None


def test_failover_to_second_relay(make_mailer, sink):
    """With the first relay down, the message goes to the second."""
    mailer = make_mailer(f'host 127.0.0.1:1\nhost 127.0.0.1:{sink.port}\n'
                         'tls none')
    assert mailer.send(FROM, TO, message()) == {}
    assert only_message(sink)['rcpt_tos'] == TO
