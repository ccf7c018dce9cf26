"""<mail:mailhost/>: Products.MailHost objects deliver through mailout.

First the directive in this process (xmlconfig, a MailHost object not in a
ZODB), then a real Zope instance served by runwsgi with a MailHost object in
its ZODB, driven over HTTP.
"""
import email.header
import logging
import os
import subprocess
import sys
import time

import Products.MailHost.MailHost as MailHostModule
import pytest
import transaction
import zope.testing.cleanup
from zope.configuration import xmlconfig
from zope.configuration.config import ConfigurationConflictError
from zope.configuration.exceptions import ConfigurationError

from helpers import write_zope_conf
from helpers import zope_script
from mailout import mailhost
from zopeserver import readme_blocks

STOCK_SEND = MailHostModule.MailBase.__dict__['_send']

ZCML = '''<configure xmlns="http://namespaces.zope.org/zope"
                     xmlns:mail="http://namespaces.zope.org/mailout">
  <include package="mailout" file="meta.zcml" />
  <mail:deliveries config="{config}" />
  {more}
</configure>'''


def load(config_file, more='<mail:mailhost delivery="default" />'):
    xmlconfig.string(ZCML.format(config=config_file, more=more))


def a_mailhost(**settings):
    """A MailHost object as in a ZODB, not in one (stock defaults)."""
    return MailHostModule.MailHost('MailHost', **settings)


def queued(config_file):
    """The names of the messages waiting in delivery 'default''s queue."""
    queue = os.path.join(os.path.dirname(config_file), 'queue')
    return sorted(os.listdir(os.path.join(queue, 'new')))


def test_readme_section_snippets(config_file, sink):
    """The section has three snippets: zope.conf and the site ZCML (a Plone
    site runs on them in test_plone.py) and the immediate= line, which
    loads and routes immediate sends to the direct delivery."""
    zope_conf, site_zcml, immediate = readme_blocks()
    assert zope_conf.startswith('%import mailout\n<mailout mailout>')
    assert '<mail:mailhost delivery="default" />' in site_zcml
    assert immediate == '<mail:mailhost delivery="default" ' \
                        'immediate="urgent" />\n'
    load(config_file, immediate)
    assert mailhost.installed() == ('default', 'urgent')
    # The site ZCML itself, with a standalone file instead of zope.conf.
    zope.testing.cleanup.cleanUp()
    xmlconfig.string(site_zcml.replace(
        '<mail:deliveries />', f'<mail:deliveries config="{config_file}" />'))
    assert mailhost.installed() == ('default', 'default')


def test_send_goes_through_the_queue_after_commit(config_file, sink):
    """MailHost.send queues in mailout; the commit makes it go out."""
    load(config_file)
    host = a_mailhost(smtp_host='nowhere.invalid', smtp_port=1)
    host.send('Hi.\n', mto='Ann <ann@example.org>',
              mfrom='zope@example.org', subject='through mailout')
    assert sink.messages() == []
    transaction.commit()
    [sent] = sink.wait_for(1)
    assert sent['rcpt_tos'] == ['ann@example.org']
    assert sent['mail_from'] == 'zope@example.org'
    assert b'Subject: through mailout' in sent['data']


def test_abort_sends_nothing(config_file, sink):
    """An aborted transaction leaves nothing queued, nothing sent."""
    load(config_file)
    a_mailhost().send('Hi.\n', mto='ann@example.org',
                      mfrom='zope@example.org', subject='never')
    transaction.abort()
    time.sleep(0.3)
    assert sink.messages() == [] and queued(config_file) == []


def test_immediate_is_transactional_by_default(config_file, sink):
    """immediate=True goes through the same delivery: nothing before the
    commit, nothing after an abort."""
    load(config_file)
    host = a_mailhost()
    host.send('Hi.\n', mto='ann@example.org', mfrom='zope@example.org',
              subject='immediate', immediate=True)
    time.sleep(0.3)
    assert sink.messages() == []
    transaction.abort()
    host.send('Hi.\n', mto='ann@example.org', mfrom='zope@example.org',
              subject='immediate 2', immediate=True)
    transaction.commit()
    [sent] = sink.wait_for(1)
    assert b'Subject: immediate 2' in sent['data']


def test_immediate_names_its_own_delivery(config_file, sink):
    """immediate="urgent": those sends go through the direct delivery."""
    load(config_file, '<mail:mailhost delivery="default" '
                      'immediate="urgent" />')
    assert mailhost.installed() == ('default', 'urgent')
    a_mailhost().send('Hi.\n', mto='ann@example.org',
                      mfrom='zope@example.org', subject='urgent',
                      immediate=True)
    transaction.commit()       # a direct delivery sends in the vote
    [sent] = sink.messages()
    assert b'Subject: urgent' in sent['data']
    assert queued(config_file) == []


def test_arguments_are_converted(config_file, sink):
    """_send as MailHost's callers use it: a bare str recipient, a Header
    sender, str text."""
    load(config_file)
    host = a_mailhost()
    host._send(email.header.Header('zope@example.org'), 'ann@example.org',
               'Subject: converted\r\n\r\nHi.\r\n')
    host._send('zope@example.org',
               ('ann@example.org', email.header.Header('bob@example.org')),
               b'Subject: converted 2\r\n\r\nHi.\r\n')
    transaction.commit()
    first, second = sorted(sink.wait_for(2), key=lambda m: len(m['rcpt_tos']))
    assert first['rcpt_tos'] == ['ann@example.org']
    assert first['mail_from'] == 'zope@example.org'
    assert second['rcpt_tos'] == ['ann@example.org', 'bob@example.org']


def test_message_error_becomes_mailhost_error(config_file):
    """mailout's MessageError reaches callers as MailHostError, chained."""
    import mailout
    load(config_file)
    with pytest.raises(MailHostModule.MailHostError) as info:
        a_mailhost()._send('zope@example.org', ['ann@exa mple.org'],
                           b'Subject: x\r\n\r\nHi.\r\n')
    assert isinstance(info.value.__cause__, mailout.InvalidRecipient)
    assert 'ann@exa mple.org' in str(info.value)


def test_settings_not_used_is_logged_once(config_file, caplog):
    """One line per MailHost object says its own settings are ignored."""
    load(config_file)
    host = a_mailhost(smtp_host='smtp.example.org', smtp_port=2525)
    with caplog.at_level(logging.INFO, logger='mailout.mailhost'):
        for _ in range(3):
            host.send('Hi.\n', mto='ann@example.org',
                      mfrom='zope@example.org', subject='x')
    lines = [r.getMessage() for r in caplog.records
             if 'are not used' in r.getMessage()]
    assert len(lines) == 1, lines
    assert 'smtp.example.org:2525' in lines[0]
    assert "delivery 'default'" in lines[0]


def test_declared_twice_is_a_conflict(config_file):
    """Two <mail:mailhost/> in one configuration conflict."""
    with pytest.raises(ConfigurationConflictError):
        load(config_file, '<mail:mailhost delivery="default" />\n'
                          '<mail:mailhost delivery="urgent" />')
    assert mailhost.installed() is None


def test_unknown_delivery_is_an_error(config_file):
    """A delivery that is not registered fails at start, naming it."""
    with pytest.raises(ConfigurationError, match="delivery 'nosuch'"):
        load(config_file, '<mail:mailhost delivery="default" '
                          'immediate="nosuch" />')
    assert MailHostModule.MailBase.__dict__['_send'] is STOCK_SEND


def test_replaced_by_another_package_warns(config_file, caplog,
                                           monkeypatch):
    """A _send already replaced (Products.PrintingMailHost does that) is
    named in a warning, and comes back with the clean-up."""
    def printing_send(self, mfrom, mto, messageText, immediate=False):
        print(messageText)
    printing_send.__module__ = 'Products.PrintingMailHost.Patch'
    monkeypatch.setattr(MailHostModule.MailBase, '_send', printing_send)
    with caplog.at_level(logging.WARNING, logger='mailout.mailhost'):
        load(config_file)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 'Products.PrintingMailHost.Patch.' in warning.getMessage()
    assert MailHostModule.MailBase._send is mailhost._send
    mailhost.uninstall()
    assert MailHostModule.MailBase.__dict__['_send'] is printing_send


def test_clean_up_restores_stock(config_file):
    """Without the directive (zope.testing's clean-up) MailBase is stock."""
    load(config_file)
    assert MailHostModule.MailBase._send is mailhost._send
    zope.testing.cleanup.cleanUp()
    for name in mailhost.REPLACED:
        assert getattr(MailHostModule.MailBase, name).__module__ \
            == 'Products.MailHost.MailHost', name
    assert mailhost.installed() is None


def test_without_products_mailhost_the_directive_says_so(config_file):
    """Where Products.MailHost cannot be imported: a clear
    ConfigurationError naming the extra, with the ZCML file and line."""
    zcml = ZCML.format(config=config_file,
                       more='<mail:mailhost delivery="default" />')
    script = (
        'import sys; sys.modules["Products.MailHost"] = None\n'
        'from zope.configuration import xmlconfig\n'
        'try:\n'
        f'    xmlconfig.string({zcml!r})\n'
        'except Exception as e:\n'
        '    print(type(e).__name__); print(e)\n')
    result = subprocess.run([sys.executable, '-c', script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('ConfigurationError\n'), result.stdout
    assert 'needs Products.MailHost' in result.stdout
    assert "pip install 'mailout[mailhost]'" in result.stdout
    assert 'line 5.2' in result.stdout      # the <mail:mailhost/> line


def test_status_methods_report_mailouts_queue(config_file, sink,
                                              monkeypatch):
    """queueLength counts mailout's queue, queueThreadAlive and
    manage_restartQueueThread are its processor's."""
    from zope.component import getUtility
    from mailout.interfaces import IMailDelivery
    load(config_file)
    host = a_mailhost()
    processor = getUtility(IMailDelivery, 'default').processor
    assert host.queueThreadAlive() is False
    assert host.queueNonDeliveryMode() is False
    assert host.queueLength() == 0
    host.manage_restartQueueThread('start')
    assert host.queueThreadAlive() is True and processor.running
    host.manage_restartQueueThread('stop')
    assert host.queueThreadAlive() is False
    host.send('Hi.\n', mto='ann@example.org', mfrom='zope@example.org',
              subject='x')
    host.send('Hi.\n', mto='bob@example.org', mfrom='zope@example.org',
              subject='y')
    with monkeypatch.context() as patch:     # the commit would start it
        patch.setattr(processor, 'start', lambda: None)
        transaction.commit()
    assert host.queueLength() == 2
    host.manage_restartQueueThread('start')
    sink.wait_for(2)
    deadline = time.monotonic() + 5
    while host.queueLength() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.queueLength() == 0
    with pytest.raises(ValueError):
        host.manage_restartQueueThread('bogus')


# -- a real Zope instance with a MailHost object in its ZODB ------------------

SECTION = '''
<mailout mailout>
  <smtp-mailer relay>
    host 127.0.0.1:{port}
    tls none
  </smtp-mailer>
  <queued-delivery default>
    mailer relay
    queue-path $INSTANCE/var/mailqueue
  </queued-delivery>
</mailout>
'''

SITE_ZCML = '''<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:mail="http://namespaces.zope.org/mailout">
  <include package="mailout" />
  <mail:deliveries />
  {mailhost}
</configure>'''

ADD_MAILHOST = '''\
import transaction
from Products.MailHost.MailHost import manage_addMailHost
manage_addMailHost(app, 'MailHost', smtp_host='127.0.0.1',
                   smtp_port={port})
app.MailHost.smtp_queue = True      # the ZMI shows the queue status then
transaction.commit()
print(app._p_jar.db().lastTransaction().hex())
'''

STOCK_SCRIPT = '''\
from Products.MailHost.MailHost import MailBase
print(app._p_jar.db().lastTransaction().hex())
print(MailBase._send.__module__, MailBase.queueLength.__module__)
app.MailHost.smtp_host          # not a ghost: _p_serial is its last write
print(app.MailHost._p_serial.hex())
'''


def zconsole(instance, conf, text):
    """Run ``text`` with ``app`` in the instance (zconsole run); stdout."""
    from zopeserver import zope_env
    script = instance / 'script.py'
    script.write_text(text)
    result = subprocess.run(
        zope_script('Zope2.utilities.zconsole', 'run', conf, script),
        capture_output=True, text=True, timeout=120, env=zope_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


MAILHOST = '<mail:mailhost delivery="default" />'


def set_up_zope(instance, port, mailhost=MAILHOST):
    """zope.conf relaying to ``port``, ZCML with ``mailhost``, the test views;
    the zope.conf path."""
    conf = str(instance / 'etc' / 'zope.conf')
    if 'mailout' not in (instance / 'etc' / 'zope.conf').read_text():
        conf = write_zope_conf(instance, SECTION.format(port=port))
    includes = instance / 'etc' / 'package-includes'
    includes.mkdir(exist_ok=True)
    (includes / 'mailout-meta.zcml').write_text(
        '<include package="mailout" file="meta.zcml" '
        'xmlns="http://namespaces.zope.org/zope" />')
    (includes / 'mailout-configure.zcml').write_text(
        SITE_ZCML.format(mailhost=mailhost))
    (includes / 'zopeapp-configure.zcml').write_text(
        '<include package="zopeapp" file="mailhost.zcml" '
        'xmlns="http://namespaces.zope.org/zope" />')
    return conf


def test_zope_instance_mailhost_sends_through_mailout(instance, sink):
    """A MailHost object in a real Zope instance: a request's send arrives
    through mailout's queue, a failing request's never; the ZMI's status
    methods are mailout's; without the directive the object is stock and
    the ZODB was never written."""
    from zopeserver import Server
    from zopeserver import wait_until
    conf = set_up_zope(instance, sink.port)
    # The object's own settings point at the sink too: only the queue
    # counts below show which route a message took.
    created = zconsole(instance, conf, ADD_MAILHOST.format(port=sink.port))
    last_transaction = created.split()[-1]
    queue = instance / 'var' / 'mailqueue'

    with Server(instance) as server:
        assert server.request('/MailHost/queueThreadAlive') == (200, 'True')
        assert server.request('/@@mailhost-send', to='ann@example.org') \
            == (200, 'sent')
        [sent] = sink.wait_for(1)
        assert sent['rcpt_tos'] == ['ann@example.org']
        assert b'Sent through context.MailHost.' in sent['data']
        assert b'Message-Id: <' in sent['data']       # added by mailout

        status, _ = server.request('/@@mailhost-send-then-fail',
                                   to='bob@example.org')
        assert status == 500
        time.sleep(1)       # a committed message would have gone by now
        assert len(sink.messages()) == 1
        for area in ('tmp', 'new', 'cur', 'deferred', 'failed'):
            assert os.listdir(queue / area) == [], area

        # The ZMI's "Stop queue processor" stops mailout's processor.
        status, page = server.request(
            '/MailHost/manage_restartQueueThread', data={'action': 'stop'},
            auth='admin:admin')
        assert status == 200 and 'Queue processor thread stopped' in page
        # ZPublisher answers a false result with 204 and no body.
        assert server.request('/MailHost/queueThreadAlive') == (204, '')
        status, page = server.request('/MailHost/manage_main',
                                      auth='admin:admin')
        assert status == 200 and 'Start queue processor' in page
        status, page = server.request(
            '/MailHost/manage_restartQueueThread', data={'action': 'start'},
            auth='admin:admin')
        assert status == 200 and 'Queue processor thread started' in page
        assert server.request('/@@mailhost-send', to='carl@example.org') \
            == (200, 'sent')
        assert len(sink.wait_for(2)) == 2
        assert wait_until(lambda: server.request('/MailHost/queueLength')
                          == (204, ''))
        assert server.request('/MailHost/queueThreadAlive') == (200, 'True')
    assert 'RuntimeError: failing after MailHost.send' in server.output
    assert "sends through mailout delivery 'default'; its own SMTP " \
        f"settings (127.0.0.1:{sink.port})" in server.output

    # The directive's line removed: stock MailHost methods, and the object
    # never written to the ZODB by any of the above.
    conf = set_up_zope(instance, sink.port, mailhost='')
    out = zconsole(instance, conf, STOCK_SCRIPT).split('\n')
    # (Zope's own start-up writes a transaction of its own; the MailHost
    # object was last written when it was created.)
    assert out[1:3] == [
        'Products.MailHost.MailHost Products.MailHost.MailHost',
        last_transaction]
    assert len(sink.messages()) == 2
    assert os.listdir(queue / 'new') == []
