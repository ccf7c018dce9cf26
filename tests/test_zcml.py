"""ZCML directives: utilities from the process's configuration."""
import os

import pytest
import transaction
import zope.sendmail.interfaces
from zope.component import getUtility
from zope.component import queryUtility
from zope.configuration import xmlconfig
from zope.configuration.config import ConfigurationConflictError
from zope.configuration.exceptions import ConfigurationError

from helpers import message
from helpers import write_config
from mailout import processor
from mailout.delivery import DirectDelivery
from mailout.delivery import QueuedDelivery
from mailout.interfaces import IMailDelivery
from mailout.interfaces import IMailer
from mailout.mailers import SMTPMailer

HEAD = '''<configure xmlns="http://namespaces.zope.org/zope"
                     xmlns:mail="http://namespaces.zope.org/mailout">
  <include package="mailout" file="meta.zcml" />
  <include package="mailout" />
'''


def load(body):
    return xmlconfig.string(HEAD + body + '</configure>')


def test_deliveries_registers_every_mailer_and_delivery(config_file):
    """<mail:deliveries/> registers each configured mailer and delivery."""
    load(f'<mail:deliveries config="{config_file}" />')
    default = getUtility(IMailDelivery, 'default')
    urgent = getUtility(IMailDelivery, 'urgent')
    relay = getUtility(IMailer, 'relay')
    assert isinstance(default, QueuedDelivery)
    assert isinstance(urgent, DirectDelivery)
    assert isinstance(relay, SMTPMailer)
    assert default.mailer is relay and urgent.mailer is relay
    assert default.queuePath.endswith('queue')


def test_delivery_registers_one_delivery_and_its_mailer(config_file):
    """<mail:delivery name=.../> registers that delivery and its mailer."""
    load(f'<mail:delivery name="urgent" config="{config_file}" />')
    assert isinstance(getUtility(IMailDelivery, 'urgent'), DirectDelivery)
    assert getUtility(IMailer, 'relay') is not None
    assert queryUtility(IMailDelivery, 'default') is None


def test_two_deliveries_share_their_mailer(config_file):
    """Two <mail:delivery/> using one mailer register it once, no conflict.
    """
    load(f'<mail:delivery name="urgent" config="{config_file}" />'
         f'<mail:delivery name="default" config="{config_file}" />')
    assert getUtility(IMailDelivery, 'urgent').mailer \
        is getUtility(IMailDelivery, 'default').mailer \
        is getUtility(IMailer, 'relay')


def test_config_from_environment(config_file, monkeypatch):
    """Without config=, $MAILOUT_CONFIG names the file."""
    monkeypatch.setenv('MAILOUT_CONFIG', config_file)
    load('<mail:deliveries />')
    assert getUtility(IMailDelivery, 'default') is not None


def test_same_name_twice_conflicts(config_file):
    """The same delivery twice in one file is a ZCML conflict."""
    with pytest.raises(ConfigurationConflictError):
        load(f'<mail:delivery name="default" config="{config_file}" />'
             f'<mail:delivery name="default" config="{config_file}" />')


def test_conflicts_with_zope_sendmail_utility(config_file):
    """A zope.sendmail <utility> of the same name conflicts with ours."""
    with pytest.raises(ConfigurationConflictError):
        load(f'<mail:deliveries config="{config_file}" />'
             '<utility provides="zope.sendmail.interfaces.IMailDelivery"'
             '  component="zope.sendmail.delivery.QueuedMailDelivery"'
             '  name="default" />')


def test_unknown_name_names_it_and_the_source(config_file):
    """A delivery missing from the config names itself and the file."""
    with pytest.raises(ConfigurationError) as info:
        load(f'<mail:delivery name="nosuch" config="{config_file}" />')
    text = str(info.value)
    assert "no delivery 'nosuch'" in text
    assert config_file in text
    assert 'default' in text and 'urgent' in text


def test_no_configuration_at_all(monkeypatch):
    """No config=, no $MAILOUT_CONFIG, no zope.conf: a clear error."""
    monkeypatch.delenv('MAILOUT_CONFIG', raising=False)
    with pytest.raises(ConfigurationError, match='no mailout configuration'):
        load('<mail:deliveries />')


def test_bad_config_file_fails_with_file_and_line(tmp_path):
    """A bad value fails at start-up with ZConfig's message, file and line.
    """
    path = write_config(tmp_path / 'bad.conf', '''
        <smtp-mailer relay>
          tls sometimes
        </smtp-mailer>
    ''')
    with pytest.raises(ConfigurationError) as info:
        load(f'<mail:deliveries config="{path}" />')
    text = str(info.value)
    assert "tls must be one of" in text and "'sometimes'" in text
    assert 'line 4' in text and 'bad.conf' in text


def test_unknown_mailer_names_both(tmp_path):
    """A delivery naming an unknown mailer fails naming both."""
    path = write_config(tmp_path / 'bad.conf', f'''
        <smtp-mailer relay>
        </smtp-mailer>
        <direct-delivery urgent>
          mailer nosuch
        </direct-delivery>
    ''')
    with pytest.raises(ConfigurationError) as info:
        load(f'<mail:deliveries config="{path}" />')
    assert "delivery 'urgent' names unknown mailer 'nosuch'" \
        in str(info.value)


def test_loading_zcml_starts_no_thread(config_file):
    """ZCML only records processors; ProcessStarting starts them."""
    import threading
    from zope.event import notify
    from zope.processlifetime import ProcessStarting
    before = set(threading.enumerate())
    load(f'<mail:deliveries config="{config_file}" />')
    assert set(threading.enumerate()) == before
    default = getUtility(IMailDelivery, 'default')
    assert processor.registered() == [default.processor]
    notify(ProcessStarting())
    assert default.processor.running


def test_zope_sendmail_code_works_unchanged(config_file, sink):
    """Code written for zope.sendmail's API sends through mailout."""
    load(f'<mail:deliveries config="{config_file}" />')
    # What a zope.sendmail user writes, verbatim:
    mailer = getUtility(zope.sendmail.interfaces.IMailDelivery, 'default')
    message_id = mailer.send('sender@example.org', ['ann@example.org'],
                             message().decode())
    transaction.commit()
    [received] = sink.wait_for(1)
    assert f'<{message_id}>'.encode() in received['data']
    assert zope.sendmail.interfaces.IQueuedMailDelivery.providedBy(mailer)
    assert os.path.isdir(mailer.queuePath)
    # ... and with the direct delivery and its IMailer:
    urgent = getUtility(zope.sendmail.interfaces.IMailDelivery, 'urgent')
    assert zope.sendmail.interfaces.IDirectMailDelivery.providedBy(urgent)
    assert zope.sendmail.interfaces.IMailer.providedBy(urgent.mailer)
    urgent.send('sender@example.org', ['bob@example.org'], message())
    transaction.commit()
    assert len(sink.wait_for(2)) == 2
