"""A real Plone 6 site whose MailHost delivers through mailout.

A Zope instance (mkwsgiinstance) with Plone installed in the same Python,
mailout configured with the README's "Plone and MailHost" lines, a Plone
site created by ``addPloneSite`` in a ``zconsole run`` script; then scripts
and a ``runwsgi`` server driven over HTTP.

CI sets MAILOUT_TEST_PLONE=1 after installing Plone: then these tests fail
rather than skip.  Without it they are skipped where Plone is not installed.
"""
import email
import email.policy
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from helpers import Sink
from helpers import zope_script

if not os.environ.get('MAILOUT_TEST_PLONE'):
    pytest.importorskip(
        'Products.CMFPlone',
        reason='Plone is not installed (CI installs it and sets '
               'MAILOUT_TEST_PLONE=1)')

from zopeserver import Server  # noqa: E402
from zopeserver import readme_snippets  # noqa: E402
from zopeserver import wait_until  # noqa: E402
from zopeserver import zope_env  # noqa: E402

# slow: a Plone site takes ~25 s; CI (CI=true) and --slow run it.
pytestmark = [pytest.mark.filterwarnings('ignore::DeprecationWarning'),
              pytest.mark.slow]

SET_UP = '''\
import transaction
from AccessControl.SecurityManagement import newSecurityManager
from AccessControl.SpecialUsers import system
from plone import api
from plone.app.contentrules.actions.mail import MailAction
from plone.app.contentrules.rule import Rule, get_assignments
from plone.contentrules.engine.assignments import RuleAssignment
from plone.contentrules.engine.interfaces import IRuleAssignmentManager
from plone.contentrules.engine.interfaces import IRuleStorage
from Products.CMFPlone.factory import addPloneSite
from Testing.makerequest import makerequest
from zope.component import getUtility
from zope.component.hooks import setSite
from zope.lifecycleevent.interfaces import IObjectAddedEvent

newSecurityManager(None, system)
app = makerequest(app)
site = addPloneSite(app, 'Plone', setup_content=False,
                    extension_ids=('plone.app.contenttypes:default',))
setSite(site)
api.portal.set_registry_record('plone.email_from_address',
                               'plone@example.org')
api.portal.set_registry_record('plone.email_from_name', 'Plone')
# The site's own SMTP settings also point at the test server: only the
# stock MailHost uses them (the contrast in test_conflict_retry...).
api.portal.set_registry_record('plone.smtp_host', '127.0.0.1')
api.portal.set_registry_record('plone.smtp_port', {port})
api.user.create(email='ann@example.org', username='ann',
                password='a-long-secret-1')

rule = Rule()
rule.title = 'Mail on add'
rule.event = IObjectAddedEvent
action = MailAction()
action.subject = 'Added: ${{title}}'
action.source = 'plone@example.org'
action.recipients = 'editors@example.org'
action.message = 'Added ${{url}}'
rule.actions.append(action)
getUtility(IRuleStorage)['mail-on-add'] = rule
IRuleAssignmentManager(site)['mail-on-add'] = RuleAssignment('mail-on-add')
get_assignments(rule).insert('/'.join(site.getPhysicalPath()))
transaction.commit()
print('site', site.getId())
'''

# Common start of the scripts run in the site.
SCRIPT = '''\
import json, os, time, transaction
from AccessControl.SecurityManagement import newSecurityManager
from AccessControl.SpecialUsers import system
from plone import api
from Testing.makerequest import makerequest
from zope.component.hooks import setSite
newSecurityManager(None, system)
app = makerequest(app)
site = app.Plone
setSite(site)
queue = os.path.join(os.environ['INSTANCE'], 'var', 'mailqueue')

def settled():
    """Wait until mailout's queue holds nothing waiting or being sent."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
            os.listdir(os.path.join(queue, area)) for area in ('new', 'cur')):
        time.sleep(0.01)
    return {area: sorted(os.listdir(os.path.join(queue, area)))
            for area in ('tmp', 'new', 'cur', 'deferred', 'failed')}
'''


def free_port():
    """A port nothing listens on (the relay that is down)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class PloneSite:
    """The instance with the site, its sink and its zope.conf."""

    def __init__(self, instance, sink, conf):
        self.instance = instance
        self.sink = sink
        self.conf = conf

    def run(self, text):
        """Run SCRIPT + ``text`` in the site; its last stdout line as
        JSON."""
        script = self.instance / 'script.py'
        script.write_text(SCRIPT + text)
        result = subprocess.run(
            zope_script('Zope2.utilities.zconsole', 'run', self.conf, script),
            capture_output=True, text=True, timeout=180,
            env=zope_env(INSTANCE=str(self.instance)))
        assert result.returncode == 0, result.stdout + result.stderr[-5000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def relay_port(self, port):
        """Point mailout's relay (not Plone's settings) at ``port``."""
        path = self.instance / 'etc' / 'zope.conf'
        path.write_text(re.sub(r'host 127\.0\.0\.1:\d+',
                               f'host 127.0.0.1:{port}', path.read_text()))


@pytest.fixture(scope='module')
def plone(template, tmp_path_factory):
    """A Zope instance with mailout set up as the README says and a Plone
    site; created once for the module."""
    base = tmp_path_factory.mktemp('plone')
    sink = Sink(base / 'sink')
    instance = base / 'instance'
    shutil.copytree(template, instance)
    for name in ('zope.conf', 'zope.ini'):
        conf = instance / 'etc' / name
        conf.write_text(conf.read_text().replace(str(template), str(instance)))
    zope_conf, site_zcml = readme_snippets()
    conf = instance / 'etc' / 'zope.conf'
    # The README's section verbatim, but for the relay: the test server.
    conf.write_text('%import mailout\n' + conf.read_text() + '\n'
                    + re.sub(r'host \S+', f'host 127.0.0.1:{sink.port}',
                             zope_conf.replace('%import mailout\n', ''))
                    .replace('port 587\n', '').replace('tls starttls',
                                                       'tls none'))
    includes = instance / 'etc' / 'package-includes'
    includes.mkdir()
    (includes / 'mailout-configure.zcml').write_text(site_zcml)
    (includes / 'zopeapp-configure.zcml').write_text(
        '<include package="zopeapp" file="mailhost.zcml" '
        'xmlns="http://namespaces.zope.org/zope" />')
    site = PloneSite(instance, sink, str(conf))
    script = instance / 'setup.py'
    script.write_text(SET_UP.format(port=sink.port))
    result = subprocess.run(
        zope_script('Zope2.utilities.zconsole', 'run', conf, script),
        capture_output=True, text=True, timeout=300, env=zope_env())
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert 'site Plone' in result.stdout
    yield site
    sink.stop()


@pytest.fixture
def site(plone):
    plone.sink.clear()
    plone.relay_port(plone.sink.port)
    return plone


def subjects(messages):
    """The decoded Subject of each message (Plone encodes them)."""
    return [str(email.message_from_bytes(
        m['data'], policy=email.policy.default)['Subject'])
        for m in messages]


def test_send_email_committed_arrives_aborted_does_not(site):
    """plone.api.portal.send_email: committed arrives through mailout's
    queue, which ends empty; aborted sends nothing."""
    result = site.run('''
from Products.MailHost.MailHost import MailBase
api.portal.send_email(recipient='ann@example.org', subject='committed',
                      body='Hello from Plone.')
transaction.commit()
api.portal.send_email(recipient='bob@example.org', subject='aborted',
                      body='Never.')
transaction.abort()
print(json.dumps({'send': MailBase._send.__module__, 'queue': settled()}))
''')
    assert result['send'] == 'mailout.mailhost'
    assert result['queue'] == {area: [] for area in
                               ('tmp', 'new', 'cur', 'deferred', 'failed')}
    [sent] = site.sink.wait_for(1)
    assert sent['rcpt_tos'] == ['ann@example.org']
    assert subjects([sent]) == ['committed']
    time.sleep(0.5)
    assert len(site.sink.messages()) == 1


def test_conflict_retry_sends_once_stock_mailhost_twice(site):
    """immediate=True, then a ConflictError and a retry: mailout delivers
    once; the stock MailHost of the same site delivers twice."""
    result = site.run('''
from ZODB.POSException import ConflictError
import mailout.mailhost

def send_then_conflict(subject):
    tries = 0
    for attempt in transaction.manager.attempts(3):
        with attempt:
            tries += 1
            site.MailHost.send('Reminder.', mto='ann@example.org',
                               mfrom='plone@example.org', subject=subject,
                               immediate=True)
            if tries == 1:
                raise ConflictError('conflict on the first try')
    return tries

tries = [send_then_conflict('through mailout')]
settled()
mailout.mailhost.uninstall()         # the stock MailHost, same site
tries.append(send_then_conflict('stock'))
print(json.dumps({'tries': tries}))
''')
    assert result['tries'] == [2, 2]
    site.sink.wait_for(3)
    time.sleep(0.5)
    assert sorted(subjects(site.sink.messages())) \
        == ['stock', 'stock', 'through mailout']


def test_content_rule_mail_action_through_mailout(site):
    """A content rule's mail action (immediate=True) goes out with the
    commit through mailout's queue."""
    result = site.run('''
api.content.create(container=site, type='Document', id='news',
                   title='Big news')
transaction.commit()
print(json.dumps({'queue': settled()}))
''')
    assert result['queue']['failed'] == []
    [sent] = site.sink.wait_for(1)
    assert sent['rcpt_tos'] == ['editors@example.org']
    assert subjects([sent]) == ['Added: Big news']


def reset_password(server):
    """Plone's own password-reset form, as a browser posts it."""
    status, page = server.request('/Plone/@@login-help')
    assert status == 200, page
    field = re.search(r'name="([^"]*reset_password)"', page).group(1)
    button = re.search(r'name="([^"]*buttons.reset)"', page).group(1)
    return server.request('/Plone/@@login-help',
                          data={field: 'ann', button: 'Reset your password'})


def test_plone_forms_and_publisher_retry_through_mailout(site):
    """Served by runwsgi: the password-reset form's mail arrives through
    mailout; a request sending with immediate=True that hits a
    ConflictError is retried by the publisher and delivers once."""
    with Server(site.instance) as server:
        status, page = reset_password(server)
        assert status == 200
        assert 'An email has been sent with instructions' in page
        [sent] = site.sink.wait_for(1)
        assert sent['rcpt_tos'] == ['ann@example.org']
        assert b'/passwordreset/' in sent['data']

        status, body = server.request(
            '/Plone/@@mailhost-send-then-conflict', to='bob@example.org',
            subject='retried', immediate='1')
        assert (status, body) == (200, 'sent after 2 attempts')
        site.sink.wait_for(2)
        time.sleep(1)
        assert sorted(subjects(site.sink.messages()))[1:] == ['retried']
        assert len(site.sink.messages()) == 2


def test_relay_down_forms_still_answer(site):
    """With mailout's relay down the password-reset form answers as usual;
    the message waits in mailout's queue, as MailHost.queueLength says."""
    site.relay_port(free_port())
    queue = site.instance / 'var' / 'mailqueue'
    with Server(site.instance) as server:
        status, page = reset_password(server)
        assert status == 200, page
        assert 'An email has been sent with instructions' in page
        assert wait_until(lambda: os.listdir(queue / 'deferred')
                          or os.listdir(queue / 'new'))
        assert server.request('/Plone/MailHost/queueLength',
                              auth='admin:admin') == (200, '1')
        assert server.request('/Plone/MailHost/queueThreadAlive',
                              auth='admin:admin') == (200, 'True')
    assert site.sink.messages() == []
    assert 'Traceback' not in server.output, server.output
