"""ZConfig settings from a standalone file (zope.conf: test_zope.py)."""
import os
import stat

import pytest
import ZConfig

from mailout import config


def loads(body):
    return config.loads(f'<mailout>\n{body}\n</mailout>')


def test_defaults(tmp_path):
    """Defaults: localhost:25, opportunistic TLS, verification on."""
    settings = loads(f'''
        <smtp-mailer relay>
        </smtp-mailer>
        <queued-delivery default>
          mailer relay
          queue-path {tmp_path}/q
        </queued-delivery>''')
    relay = settings.mailers['relay']
    assert relay.relays == (('localhost', 25),)
    assert relay.tls == 'opportunistic'
    assert relay.verify_certificates and not relay.allow_plain_auth
    assert relay.timeout == 30
    default = settings.deliveries['default']
    assert default.processor and default.poll_interval == 1
    assert (default.min_backoff, default.max_backoff, default.max_lifetime) \
        == (300, 4000, 5 * 86400)
    assert default.max_message_size == 10 * 1024 * 1024


def test_credentials_default_to_starttls_and_stay_secret(tmp_path):
    """With a username, TLS defaults to required STARTTLS; the password is
    in no repr."""
    settings = loads('''
        <smtp-mailer relay>
          host smtp.example.org
          username zope
          password s3cret-pw
        </smtp-mailer>''')
    relay = settings.mailers['relay']
    assert relay.tls == 'starttls'
    assert relay.read_password() == 's3cret-pw'
    assert 's3cret-pw' not in repr(relay) + repr(settings)


def test_ssl_port_and_several_hosts():
    settings = loads('''
        <smtp-mailer relay>
          host a.example.org
          host b.example.org:2465
          host [::1]
          tls ssl
        </smtp-mailer>''')
    assert settings.mailers['relay'].relays == (
        ('a.example.org', 465), ('b.example.org', 2465), ('::1', 465))


def test_password_file(tmp_path):
    path = tmp_path / 'pw'
    path.write_text('from-file\n')
    settings = loads(f'''
        <smtp-mailer relay>
          username zope
          password-file {path}
        </smtp-mailer>''')
    assert settings.mailers['relay'].read_password() == 'from-file'


def test_queue_path_created_private(tmp_path):
    """The queue directory is created 0700 when the delivery is built."""
    from mailout.factories import build_all
    settings = loads(f'''
        <smtp-mailer relay>
        </smtp-mailer>
        <queued-delivery default>
          mailer relay
          queue-path {tmp_path}/new-queue
        </queued-delivery>''')
    build_all(settings)
    mode = os.stat(tmp_path / 'new-queue').st_mode
    assert stat.S_IMODE(mode) == 0o700


@pytest.mark.parametrize('body, message', [
    ('<smtp-mailer relay>\n tls maybe\n</smtp-mailer>',
     "tls must be one of none, opportunistic, starttls, ssl, not 'maybe'"),
    ('<smtp-mailer relay>\n port 99999\n</smtp-mailer>', 'upper bound'),
    ('<smtp-mailer relay>\n host a b\n</smtp-mailer>', 'not a host name'),
    ('<smtp-mailer relay>\n password x\n</smtp-mailer>',
     'a password needs a username'),
    ('<smtp-mailer relay>\n username u\n password x\n password-file /etc/hostname'
     '\n</smtp-mailer>', 'not both'),
    ('<direct-delivery urgent>\n mailer nosuch\n</direct-delivery>',
     "delivery 'urgent' names unknown mailer 'nosuch'"),
    ('<queued-delivery q>\n mailer m\n queue-path /no/such/parent/q\n'
     '</queued-delivery>', 'does not exist'),
    ('<smtp-mailer relay>\n</smtp-mailer>\n<smtp-mailer relay>\n'
     '</smtp-mailer>', "re-used within the same container:'relay'"),
    ('<smtp-mailer>\n</smtp-mailer>', 'name'),
    ('<smtp-mailer relay>\n hostname x\n</smtp-mailer>', 'hostname'),
])
def test_errors(body, message):
    """Bad configuration fails with a message that says what is wrong."""
    with pytest.raises(ZConfig.ConfigurationError) as info:
        loads(body)
    assert message in str(info.value)


def test_key_errors_carry_file_and_line(tmp_path):
    path = tmp_path / 'mailout.conf'
    path.write_text('<mailout>\n<smtp-mailer relay>\n timeout soon\n'
                    '</smtp-mailer>\n</mailout>\n')
    with pytest.raises(ZConfig.DataConversionError) as info:
        config.load(str(path))
    assert 'line 3' in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize('text, seconds', [
    ('30', 30), ('0.5s', 0.5), ('5m', 300), ('1h 30m', 5400), ('5d', 432000)])
def test_durations(text, seconds):
    """Time keys take seconds or suffixed parts, fractions included."""
    assert config.duration(text) == seconds


@pytest.mark.parametrize('text', ['-1s', 'nan', 'inf', 'soon'])
def test_bad_durations(text):
    with pytest.raises(ValueError, match='not a duration'):
        config.duration(text)


@pytest.mark.parametrize('text, relay', [
    ('::1', ('::1', None)), ('fe80::1', ('fe80::1', None)),
    ('[::1]:2525', ('::1', 2525)), ('mail.example.org:587',
                                    ('mail.example.org', 587))])
def test_relay_hosts(text, relay):
    """host lines: names, IPv4, bare or bracketed IPv6, with a port."""
    assert config.relay_host(text) == relay


def test_deliveries_sharing_a_queue_share_a_mailer(tmp_path):
    """Two deliveries on one queue with different mailers is an error."""
    with pytest.raises(ZConfig.ConfigurationError, match='share the queue'):
        loads(f'''<smtp-mailer a>\n</smtp-mailer>
            <smtp-mailer b>\n</smtp-mailer>
            <queued-delivery one>\n mailer a\n queue-path {tmp_path}/q
            </queued-delivery>
            <queued-delivery two>\n mailer b\n queue-path {tmp_path}/q
            </queued-delivery>''')


def test_negative_rate():
    with pytest.raises(ZConfig.DataConversionError, match='at least 0'):
        loads('<smtp-mailer r>\n</smtp-mailer>\n<queued-delivery q>\n'
              ' mailer r\n queue-path /tmp/q\n rate -1\n</queued-delivery>')


def test_bad_duration():
    with pytest.raises(ZConfig.DataConversionError, match='not a duration'):
        loads('<smtp-mailer relay>\n timeout soonish\n</smtp-mailer>')


@pytest.mark.parametrize('body', [
    '<smtp-mailer r>\n messages-per-connection 0\n</smtp-mailer>',
    '<smtp-mailer r>\n</smtp-mailer>\n<queued-delivery q>\n mailer r\n'
    ' queue-path /tmp/q\n connections 0\n</queued-delivery>'])
def test_counts_must_be_positive(body):
    with pytest.raises(ZConfig.DataConversionError, match='at least 1'):
        loads(body)
