"""mailout.testing: the outbox fixture and layer for applications' tests."""
import os
import subprocess
import sys
import textwrap

import pytest
import transaction
from zope.component import getUtility

import mailout
from mailout.interfaces import IMailDelivery
from mailout.testing import MemoryMailer
from mailout.testing import mail_outbox  # noqa: F401 (the fixture)


def test_memory_delivery_provides_imaildelivery(mail_outbox):
    """The outbox's delivery is a complete IMailDelivery."""
    from zope.interface.verify import verifyObject
    assert verifyObject(IMailDelivery, getUtility(IMailDelivery, 'default'))


def test_committed_messages_are_recorded(mail_outbox):
    """A commit records its messages; an abort records nothing."""
    mailout.send('a@example.org', ['b@example.org'],
                 'Subject: kept\r\n\r\nbody\r\n')
    transaction.commit()
    getUtility(IMailDelivery, 'default').send(
        'a@example.org', ['c@example.org'], 'Subject: aborted\r\n\r\n')
    transaction.abort()
    [sent] = mail_outbox
    assert sent.delivery == 'default'
    assert sent.toaddrs == ('b@example.org',)
    assert sent.email['Subject'] == 'kept'
    assert sent.message_id in sent.email['Message-Id']


def test_validation_is_the_real_one(mail_outbox):
    """Bad input raises the same errors as with the real deliveries."""
    with pytest.raises(mailout.InvalidRecipient):
        mailout.send('a@example.org', ['not an address'], 'Subject: x\r\n\r\n')


def test_replaces_configured_deliveries_and_restores_them(config_file):
    """install() swaps every registered delivery; uninstall() puts them
    back."""
    from zope.configuration import xmlconfig

    from mailout.testing import Outbox
    xmlconfig.string(f'''
      <configure xmlns:mail="http://namespaces.zope.org/mailout">
        <include package="mailout" file="meta.zcml" />
        <mail:deliveries config="{config_file}" />
      </configure>''')
    originals = {n: getUtility(IMailDelivery, n) for n in ('default',
                                                           'urgent')}
    outbox = Outbox().install()
    mailout.send('a@example.org', ['b@example.org'], 'Subject: x\r\n\r\n',
                 delivery='urgent')
    transaction.commit()
    assert [m.delivery for m in outbox] == ['urgent']
    outbox.uninstall()
    assert {n: getUtility(IMailDelivery, n) for n in originals} == originals


def test_memory_mailer():
    mailer = MemoryMailer()
    assert mailer.send('a@x.org', ['b@x.org'], b'data') == {}
    assert mailer.sent == [('a@x.org', ('b@x.org',), b'data')]


def test_zope_testrunner_layer(tmp_path):
    """MailoutLayer works under zope.testrunner."""
    (tmp_path / 'tests.py').write_text(textwrap.dedent('''
        import unittest
        import transaction
        import mailout
        from mailout.testing import MailoutLayer

        class AppTest(unittest.TestCase):
            layer = MailoutLayer

            def test_sends(self):
                mailout.send('a@example.org', ['b@example.org'],
                             'Subject: hi\\r\\n\\r\\n')
                transaction.commit()
                self.assertEqual(len(MailoutLayer.outbox), 1)

            def test_outbox_empty_again(self):
                self.assertEqual(len(MailoutLayer.outbox), 0)
    '''))
    result = subprocess.run(
        [sys.executable, '-m', 'zope.testrunner', '--test-path',
         str(tmp_path)], capture_output=True, text=True, timeout=60,
        env={**os.environ, 'PYTHONPATH': str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'Ran 2 tests' in result.stdout
