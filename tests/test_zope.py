"""mailout inside a real Zope 6 instance: zope.conf sections, ZCML, startup.

Each test makes zope.conf from the one `mkwsgiinstance` wrote, and loads it
with Zope's own code (the steps of Zope2.Startup.run.make_wsgi_app).
"""
import os
import subprocess
import textwrap
import time

import App.config
import pytest
import ZConfig
from zope.component import getUtility
from zope.configuration import xmlconfig

import mailout.config
from helpers import configure_zope
from helpers import write_config
from helpers import write_zope_conf
from helpers import zope_script
from mailout.delivery import DirectDelivery
from mailout.delivery import QueuedDelivery
from mailout.interfaces import IMailDelivery
from mailout.interfaces import IMailer
from mailout.mailers import SMTPMailer
from zopeserver import Server

#: Loading zope.conf changes process-wide state; put it back after each test.
pytestmark = pytest.mark.usefixtures('zope_state')


ZCML = '''<configure xmlns="http://namespaces.zope.org/zope"
                     xmlns:mail="http://namespaces.zope.org/mailout">
  <include package="mailout" file="meta.zcml" />
  {}
</configure>'''

SECTION = '''
<mailout mailout>
  <smtp-mailer relay>
    host smtp.internal.example
    port 587
    tls starttls
    username zope
    password-file $INSTANCE/etc/smtp-password
  </smtp-mailer>
  <queued-delivery default>
    mailer relay
    queue-path $INSTANCE/var/mailqueue
  </queued-delivery>
  <direct-delivery urgent>
    mailer relay
  </direct-delivery>
</mailout>
'''


def line_of(path, text):
    with open(path) as f:
        return next(n for n, line in enumerate(f, 1) if text in line)


def test_zope_conf_section_registers_utilities(instance):
    """A named <mailout> section in zope.conf feeds <mail:deliveries/>."""
    cfg = configure_zope(write_zope_conf(instance, SECTION))
    assert isinstance(cfg.product_config['mailout'],
                      mailout.config.MailoutSettings)

    xmlconfig.string(ZCML.format('<mail:deliveries />'))

    default = getUtility(IMailDelivery, 'default')
    relay = getUtility(IMailer, 'relay')
    assert isinstance(default, QueuedDelivery)
    assert default.queuePath == os.path.realpath(
        instance / 'var' / 'mailqueue')
    assert isinstance(getUtility(IMailDelivery, 'urgent'), DirectDelivery)
    assert isinstance(relay, SMTPMailer)
    assert default.mailer is relay
    assert relay.settings.relays == (('smtp.internal.example', 587),)
    assert relay.settings.tls == 'starttls'
    assert relay.settings.read_password() == 'secret'
    _, source = mailout.config.find()
    assert source == 'zope.conf, section <mailout mailout>'


def test_zope_conf_section_feeds_one_delivery(instance):
    """<mail:delivery name=.../> finds its delivery in zope.conf too."""
    configure_zope(write_zope_conf(instance, SECTION))
    xmlconfig.string(ZCML.format('<mail:delivery name="urgent" />'))
    assert isinstance(getUtility(IMailDelivery, 'urgent'), DirectDelivery)
    assert isinstance(getUtility(IMailer, 'relay'), SMTPMailer)


def test_product_config_names_a_config_file(instance, tmp_path):
    """<product-config mailout> config-file ... needs no %import."""
    standalone = write_config(tmp_path / 'mailout.conf', f'''
        <smtp-mailer relay>
          host relay.example
        </smtp-mailer>
        <queued-delivery default>
          mailer relay
          queue-path {tmp_path}/queue
        </queued-delivery>
    ''')
    cfg = configure_zope(write_zope_conf(instance, textwrap.dedent(f'''
        <product-config mailout>
          config-file {standalone}
        </product-config>
    '''), imports=False))
    assert cfg.product_config['mailout'] == {'config-file': standalone}

    xmlconfig.string(ZCML.format('<mail:deliveries />'))

    default = getUtility(IMailDelivery, 'default')
    assert default.queuePath == os.path.realpath(tmp_path / 'queue')
    assert default.mailer is getUtility(IMailer, 'relay')
    assert mailout.config.find()[1].startswith(standalone)


def test_unnamed_section_is_rejected_by_zope(instance):
    """Zope refuses <mailout> without a name, with the file and line."""
    path = write_zope_conf(instance, SECTION.replace('<mailout mailout>',
                                                     '<mailout>'))
    with pytest.raises(ZConfig.ConfigurationSyntaxError) as info:
        configure_zope(path)
    message = str(info.value)
    assert "None is not an allowed name for 'zope.product.base'" in message
    assert f'line {line_of(path, "<mailout>")}' in message
    assert path in message


def test_bad_value_names_file_and_line(instance):
    """A bad key value fails at load, naming the zope.conf file and line."""
    path = write_zope_conf(instance, SECTION.replace('tls starttls',
                                                     'tls bogus'))
    with pytest.raises(ZConfig.DataConversionError) as info:
        configure_zope(path)
    message = str(info.value)
    assert "tls must be one of" in message and "'bogus'" in message
    assert f'line {line_of(path, "tls bogus")}' in message
    assert path in message


def test_unknown_mailer_names_delivery_and_mailer(instance):
    """A delivery naming an unknown mailer fails at load, naming both."""
    path = write_zope_conf(instance, SECTION.replace(
        '<direct-delivery urgent>\n    mailer relay',
        '<direct-delivery urgent>\n    mailer nosuch'))
    with pytest.raises(ZConfig.ConfigurationError,
                       match="delivery 'urgent' names unknown mailer "
                             "'nosuch'"):
        configure_zope(path)


def test_imported_but_unconfigured_zope_is_left_alone(monkeypatch):
    """find() with Zope imported but not configured installs nothing."""
    monkeypatch.setattr(App.config, '_config', None)
    with pytest.raises(ZConfig.ConfigurationError,
                       match='no mailout configuration'):
        mailout.config.find()
    assert App.config._config is None
    assert 'INSTANCE_HOME' not in os.environ


SCRIPT = '''\
import os, time, transaction
from zope.component import getUtility
from mailout.interfaces import IMailDelivery
default = getUtility(IMailDelivery, 'default')
print('delivery', type(default).__name__, default.queuePath)
print('running', default.processor.running)
default.send('zope@example.org', ['ann@example.org'],
             b'Subject: from Zope\\r\\n\\r\\nHi.\\r\\n')
transaction.commit()
deadline = time.monotonic() + 10
while time.monotonic() < deadline and not any(
        n.endswith('.json') for n in os.listdir(os.environ['SINK_DIR'])):
    time.sleep(0.01)
'''


def set_up_site(instance, sink):
    """zope.conf relaying to ``sink``, and ZCML in etc/package-includes as a
    site adds it; the zope.conf path."""
    path = write_zope_conf(instance, SECTION.replace(
        'host smtp.internal.example\n    port 587\n    tls starttls\n'
        '    username zope\n    password-file $INSTANCE/etc/smtp-password',
        f'host 127.0.0.1:{sink.port}\n    tls none'))
    includes = instance / 'etc' / 'package-includes'
    includes.mkdir()
    (includes / 'mailout-meta.zcml').write_text(
        '<include package="mailout" file="meta.zcml" '
        'xmlns="http://namespaces.zope.org/zope" />')
    (includes / 'mailout-configure.zcml').write_text(
        ZCML.format('<include package="mailout" /> <mail:deliveries />'))
    return path


def test_zope_startup_delivers_mail(instance, sink):
    """Zope's own startup (zconsole) registers utilities that deliver."""
    path = set_up_site(instance, sink)
    script = instance / 'script.py'
    script.write_text(SCRIPT)

    result = subprocess.run(
        zope_script('Zope2.utilities.zconsole', 'run', path, script),
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, SINK_DIR=sink.directory))

    assert result.returncode == 0, result.stderr
    queue = os.path.realpath(instance / 'var' / 'mailqueue')
    assert result.stdout.splitlines() == [
        f'delivery QueuedDelivery {queue}', 'running True']
    [sent] = sink.messages()
    assert b'Subject: from Zope' in sent['data']


def test_runwsgi_serves_and_runs_the_processor(instance, sink):
    """runwsgi serves HTTP with the processor started; SIGINT stops it."""
    set_up_site(instance, sink)
    with Server(instance, log_processor=True) as server:
        assert server.request('/')[0] == 200
        assert server.interrupt() == 0, server.output
    assert "started <Processor 'default'" in server.output
    assert "stopped <Processor 'default'" in server.output


def test_views_send_mail_in_the_request_transaction(instance, sink):
    """A view's mail goes out after commit; a failing view's never does."""
    set_up_site(instance, sink)
    (instance / 'etc' / 'package-includes' / 'zopeapp-configure.zcml') \
        .write_text('<include package="zopeapp" '
                    'xmlns="http://namespaces.zope.org/zope" />')
    queue = instance / 'var' / 'mailqueue'

    with Server(instance, log_processor=True) as server:
        # Started by ProcessStarting, before any request commits mail.
        assert "started <Processor 'default'" in server.output, \
            server.output

        assert server.request('/@@send-mail', to='ann@example.org') \
            == (200, 'sent')
        [sent] = sink.wait_for(1)
        assert sent['rcpt_tos'] == ['ann@example.org']
        assert b'Sent by send-mail.' in sent['data']

        status, _ = server.request('/@@send-mail-then-fail',
                               to='bob@example.org')
        assert status == 500
        time.sleep(1)       # a committed message would have gone by now
        assert len(sink.messages()) == 1
        for area in ('tmp', 'new', 'cur', 'deferred', 'failed'):
            assert os.listdir(queue / area) == [], area

        assert server.interrupt() == 0, server.output
    output = server.output
    assert output.index("started <Processor 'default'") \
        < output.index('Serving on http://')
    assert 'RuntimeError: failing after send' in output
    assert "stopped <Processor 'default'" in output
