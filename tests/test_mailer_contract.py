"""Every mailer keeps the contract of `IMailoutMailer`; ``probe()`` reports
what a session set-up with each relay achieved, sending nothing."""
import socket

import pytest
from zope.interface.verify import verifyClass
from zope.interface.verify import verifyObject
from zope.sendmail.interfaces import IMailer

from helpers import load_config
from helpers import smtp_mailer
from mailout.interfaces import IMailoutMailer
from mailout.interfaces import TransientDeliveryError
from mailout.mailers import LMTPMailer
from mailout.mailers import RelayRotation
from mailout.mailers import SendmailMailer
from mailout.mailers import SMTPMailer
from mailout.testing import MemoryMailer


def mailer(section):
    """The mailer of one configuration section."""
    from mailout.factories import build_mailer
    [settings] = load_config(section).mailers.values()
    return build_mailer(settings)


SECTIONS = {
    SMTPMailer: '<smtp-mailer relay>\n host 127.0.0.1:2525\n</smtp-mailer>',
    LMTPMailer: '<lmtp-mailer lists>\n host 127.0.0.1\n</lmtp-mailer>',
    SendmailMailer: '<sendmail-mailer local>\n</sendmail-mailer>',
}


@pytest.mark.parametrize('cls', [SMTPMailer, LMTPMailer, SendmailMailer])
def test_configured_mailers_provide_the_interface(cls):
    """SMTP, LMTP and sendmail mailers provide IMailoutMailer (and so
    zope.sendmail's IMailer)."""
    made = mailer(SECTIONS[cls])
    assert type(made) is cls
    assert verifyClass(IMailoutMailer, cls)
    assert verifyObject(IMailoutMailer, made)
    assert IMailer.providedBy(made)
    assert made.name in ('relay', 'lists', 'local')


def test_memory_mailer_provides_the_interface():
    """testing.MemoryMailer provides IMailoutMailer; it has nothing to
    probe."""
    made = MemoryMailer()
    assert verifyObject(IMailoutMailer, made)
    assert made.name == 'memory' and made.probe() == []


def test_sendmail_mailer_has_nothing_to_probe():
    """A sendmail-program mailer's probe is empty: it cannot check without
    sending."""
    assert mailer(SECTIONS[SendmailMailer]).probe() == []


KEYS = {'host', 'port', 'ok', 'server', 'tls', 'auth', 'error', 'seconds'}


def test_probe_reports_tls_and_auth(start_sink, certs):
    """probe() does EHLO, STARTTLS and AUTH and says what each achieved;
    the relay gets no message."""
    sink = start_sink('--starttls', certs.cert, certs.key,
                      '--auth', 'zope:secret')
    made = mailer(smtp_mailer(sink.port, f'ca-file {certs.ca}',
                              'username zope', 'password secret',
                              tls='starttls'))
    [result] = made.probe()
    assert set(result) == KEYS
    assert result['ok'] is True and result['error'] is None
    assert (result['host'], result['port']) == ('127.0.0.1', sink.port)
    assert result['server'] == 'sink.test' and result['auth'] == 'zope'
    assert result['tls'].startswith('TLSv1.')
    assert 0 <= result['seconds'] < 3
    assert sink.messages() == []


def test_probe_names_each_relay_of_a_farm(sink):
    """With a relay down, probe() reports both in configured order, the down
    one with its error; rotation state is left alone."""
    down = socket.socket()
    down.bind(('127.0.0.1', 0))
    down_port = down.getsockname()[1]
    down.close()
    made = mailer(smtp_mailer([sink.port, down_port]))
    up, failed = made.probe(timeout=2)
    assert up['ok'] and up['server'] == 'sink.test'
    assert up['tls'] is None and up['auth'] is None
    assert failed == {'host': '127.0.0.1', 'port': down_port, 'ok': False,
                      'server': None, 'tls': None, 'auth': None,
                      'error': 'ConnectionRefusedError: [Errno 111] '
                               'Connection refused',
                      'seconds': failed['seconds']}
    # Not rested: both relays are in turn for the next message.
    assert len(made.rotation.in_turn()) == 2


def test_probe_names_a_bad_password(start_sink):
    """A refused AUTH is a failed probe with the server's reply and no
    secret."""
    sink = start_sink('--auth', 'zope:secret')
    made = mailer(smtp_mailer(sink.port, 'username zope', 'password wrong',
                              'allow-plain-auth on'))
    [result] = made.probe()
    assert not result['ok'] and result['error'].startswith('AUTH failed: 535')
    assert 'wrong' not in repr(result)


def test_probe_greets_an_lmtp_server(start_sink):
    """An LMTP mailer's probe says LHLO to its server."""
    sink = start_sink('--lmtp')
    made = mailer(f'''<lmtp-mailer lists>
          host 127.0.0.1:{sink.port}
        </lmtp-mailer>''')
    [result] = made.probe()
    assert result['ok'] and result['port'] == sink.port
    assert set(result) == KEYS


# -- relay rotation, as any transport uses it -----------------------------------

A, B, C = ('a.test', 25), ('b.test', 25), ('c.test', 25)


def test_rotation_takes_relays_in_turn():
    """Each new connection starts with the next relay."""
    rotation = RelayRotation([A, B, C], down_time=60, owner='mailer')
    firsts = [rotation.connect(lambda relay: relay)[1] for _ in range(4)]
    assert firsts == [A, B, C, A]


def test_rotation_rests_a_relay_that_fails(caplog):
    """A relay whose open raises TransientDeliveryError rests for
    down-time while the others take its share; the log names it."""
    rotation = RelayRotation([A, B], down_time=60, owner='mailer')

    def open(relay):
        if relay == A:
            raise TransientDeliveryError((None, 'refused'))
        return relay
    assert rotation.connect(open) == (B, B)
    assert rotation.in_turn() == [B]
    assert "'mailer': relay a.test:25 marked down for 60s: refused" \
        in caplog.text


def test_rotation_says_why_no_relay_is_up():
    """When every relay fails, the error names each one's failure; while
    they rest, why they were marked down."""
    rotation = RelayRotation([A, B], down_time=60, owner='mailer')

    def open(relay):
        raise TransientDeliveryError((None, 'refused'))
    with pytest.raises(TransientDeliveryError) as error:
        rotation.connect(open)
    assert str(error.value) == 'a.test:25: refused; b.test:25: refused'
    with pytest.raises(TransientDeliveryError) as error:
        rotation.connect(open)
    assert str(error.value) == ('a.test:25: marked down after: refused; '
                                'b.test:25: marked down after: refused')


def test_rotation_without_down_time_never_rests():
    """down-time 0: a failed relay is tried again at once."""
    rotation = RelayRotation([A], down_time=0, owner='mailer')
    rotation.mark_down(A, 'refused')
    assert rotation.in_turn() == [A]
