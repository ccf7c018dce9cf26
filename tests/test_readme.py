"""README.rst is executable: each of its configuration, ZCML and Python
snippets is run here as a user would paste it (zope.conf ones in a real
Zope instance, standalone ones through mailout's schema), and a snippet of
a kind no test runs fails `test_every_snippet_is_run`.

Snippets run elsewhere: "Plone and MailHost" (test_mailhost.py,
test_plone.py), "Writing a mailer" (test_writing_a_mailer.py), the two
commands of "Try it" (.ci/run), the ``$ mailout`` commands of "Operate"
and their outputs (test_readme_session.py).
"""
import os
import re
import textwrap

import pytest
import transaction
from zope.component import getUtility
from zope.configuration import xmlconfig
from zope.sendmail.interfaces import IMailDelivery

from helpers import HERE
from helpers import write_zope_conf
from mailout import config
from zopeserver import Server

README = os.path.join(HERE, '..', 'README.rst')


def snippets():
    """``[(section, first line number, text)]`` of every literal block."""
    with open(README) as f:
        lines = f.read().split('\n')
    found, section = [], None
    for number, line in enumerate(lines):
        if number + 1 < len(lines) and line.strip() \
                and re.fullmatch(r'[=\-~^]{3,}', lines[number + 1]):
            section = line
        if not line.rstrip().endswith('::'):
            continue
        start = number + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        end = start
        while end < len(lines) and (lines[end].startswith('    ')
                                    or not lines[end].strip()):
            end += 1
        block = textwrap.dedent('\n'.join(lines[start:end])).strip('\n')
        if block and lines[start].startswith('    '):
            found.append((section, start + 1, block + '\n'))
    return found


def kind(section, text):
    """What a snippet is, hence how it is run."""
    if section in ('Plone and MailHost', 'Writing a mailer', 'Try it'):
        return 'elsewhere'
    if section == 'Scaling out' and text.startswith('host a'):
        return 'picture'
    if text.startswith('%import mailout') or \
            text.startswith('<product-config mailout>'):
        return 'zope.conf'
    if text.startswith('<mailout>'):
        return 'standalone'
    if text.startswith('<queued-delivery') or \
            text.startswith('<direct-delivery'):
        return 'section'
    if text.startswith('<configure'):
        return 'zcml'
    if text.startswith(('$ ', '* * * * *', '[Service]', '.venv/bin/')) \
            or text.startswith('mailout benchmark'):
        return 'command'
    if re.match(r'(from|import|def|pytest_plugins|getUtility)\b', text):
        return 'python'
    return 'unknown'


def of_kind(wanted):
    return [(s, n, t) for s, n, t in snippets() if kind(s, t) == wanted]


def test_every_snippet_is_run():
    """Each snippet is of a kind this module (or the one named in its
    docstring) runs; a new kind needs a test first."""
    unknown = [(s, n) for s, n, t in snippets() if kind(s, t) == 'unknown']
    assert unknown == []
    kinds = {kind(s, t) for s, n, t in snippets()}
    assert {'zope.conf', 'standalone', 'section', 'zcml',
            'python'} <= kinds


def test_zope_conf_snippets_start_zope(instance):
    """The "Configure" zope.conf block, pasted as printed, starts a real
    Zope instance (runwsgi) whose ZCML registers its deliveries."""
    [(_, _, block)] = [s for s in of_kind('zope.conf')
                       if s[0] == 'Configure'
                       and s[2].startswith('%import mailout')]
    conf = write_zope_conf(instance, '\n' + block, imports=False)
    settings, source = config.load_any(conf)
    assert sorted(settings.deliveries) == ['default', 'urgent']
    assert settings.deliveries['default'].queue_path == \
        str(instance / 'var' / 'mailqueue')
    with Server(instance):
        pass


def test_scaling_out_snippet_loads(instance):
    """The "Scaling out" zope.conf block loads with Zope's schema (its
    shared queue path made this test's) and says what the text says."""
    [(_, _, block)] = [s for s in of_kind('zope.conf')
                       if s[0] == 'Scaling out']
    conf = write_zope_conf(instance, '\n' + block.replace(
        '/srv/shared/mailqueue', str(instance / 'shared')), imports=False)
    settings, _ = config.load_any(conf)
    relay = settings.mailers['relay']
    assert [host for host, _ in relay.hosts] == [
        'mx1.example.org', 'mx2.example.org', 'mx3.example.org']
    assert relay.weights == (2, 1, 1)
    assert relay.max_connections_per_relay == 20
    default = settings.deliveries['default']
    assert (default.host_id, default.claim_lease, default.connections) \
        == ('app2', 300, 4)


def test_product_config_snippet_names_the_standalone_file(instance):
    """``<product-config mailout>`` with ``config-file`` in zope.conf reads
    the README's standalone file."""
    [(_, _, pointer)] = [s for s in of_kind('zope.conf')
                         if s[2].startswith('<product-config')]
    [(_, _, standalone)] = of_kind('standalone')
    (instance / 'etc' / 'mailout.conf').write_text(
        standalone.replace('/srv/zope', str(instance)))
    conf = write_zope_conf(instance, '\n' + pointer, imports=False)
    settings, source = config.load_any(conf)
    assert sorted(settings.deliveries) == ['default']
    assert 'config-file of <product-config mailout>' in source


def test_standalone_and_section_snippets_load(instance):
    """The standalone block loads through mailout's schema (its paths made
    this test's), and so does every delivery section shown alone, inside
    one."""
    [(_, _, standalone)] = of_kind('standalone')
    standalone = standalone.replace('/srv/zope', str(instance))
    settings = config.loads(standalone)
    assert settings.mailers['relay'].relays == (
        ('smtp.internal.example', 587),)
    for _, _, section in of_kind('section'):
        text = standalone.replace(
            standalone[standalone.index('  <queued-delivery'):
                       standalone.index('</mailout>')],
            textwrap.indent(section.replace('$INSTANCE', str(instance)),
                            '  '))
        assert config.loads(text).deliveries


@pytest.fixture
def site(tmp_path, sink, monkeypatch):
    """The README's site ZCML, loaded with a standalone configuration
    whose relay is the test sink."""
    from helpers import config_text
    path = tmp_path / 'mailout.conf'
    path.write_text('<mailout>\n' + config_text(sink.port, tmp_path / 'queue')
                    + '''
        <direct-delivery urgent>
          mailer relay
        </direct-delivery>
    </mailout>\n''')
    monkeypatch.setenv('MAILOUT_CONFIG', str(path))
    [(_, _, zcml)] = of_kind('zcml')
    xmlconfig.string(zcml)
    return sink


def test_site_zcml_registers_the_deliveries(site):
    """The site ZCML, pasted as printed, registers every delivery."""
    assert getUtility(IMailDelivery, 'default')
    assert getUtility(IMailDelivery, 'urgent')


def python_snippet(section, starting):
    [(_, _, text)] = [s for s in of_kind('python')
                      if s[0] == section and s[2].startswith(starting)]
    return text


def test_send_snippets_send(site):
    """The Python snippets of "Send" (and the one at the top) run as
    printed, given ``message``, ``msg`` and the intro's ``fromaddr`` and
    ``toaddrs``; what they send arrives, Bcc stripped."""
    import email.message
    msg = email.message.EmailMessage()
    msg['From'] = 'shop@example.org'
    msg['To'] = 'ann@example.org'
    msg['Bcc'] = 'audit@example.org'
    msg['Subject'] = 'Your order'
    msg.set_content('Thanks.')
    # The one line at the top stands for application code that has
    # imported getUtility and IMailDelivery.
    names = {'message': 'Subject: Hello\r\n\r\nHi.\r\n', 'msg': msg,
             'fromaddr': 'noreply@example.org',
             'toaddrs': ['bob@example.org'], 'getUtility': getUtility,
             'IMailDelivery': IMailDelivery}
    ran = 0
    for section, _, text in of_kind('python'):
        if section in ('mailout', 'Send'):
            exec(compile(text, f'README.rst ({section})', 'exec'), names)
            ran += 1
    assert ran == 3
    transaction.commit()
    received = site.wait_for(6)     # 1 + 1 + 4, one of them direct
    assert len(received) == 6
    assert all(b'audit@example.org' not in m['data'] for m in received)
    assert isinstance(names['message_id'], str)


def test_event_subscriber_snippet(site):
    """The "How it works" subscriber, registered as the README says, is
    called for a failed message."""
    from zope.component import provideHandler
    from mailout.processor import MailFailedEvent
    import zope.event
    import zope.component.event  # noqa: F401 (dispatches to handlers)
    flagged = []
    names = {'mark_address_bouncing': lambda *args: flagged.append(args)}
    exec(python_snippet('How it works', 'from zope.component import '
                                        'adapter'), names)
    provideHandler(names['flag_bounce'])
    zope.event.notify(MailFailedEvent(
        'id@example.org', 'app@example.org', ('bad@example.org',),
        'default', 'queue-id', (550, '5.1.1 no such user')))
    assert flagged == [('bad@example.org', (550, '5.1.1 no such user'))]


def test_testing_snippets_run_under_pytest(tmp_path):
    """The "Test your application" snippets, in a project's conftest.py and
    test module (beside the application's ``signup``), pass under
    pytest."""
    import subprocess
    import sys
    conftest = python_snippet('Test your application', 'pytest_plugins')
    test = python_snippet('Test your application', 'def test_')
    (tmp_path / 'conftest.py').write_text(conftest)
    (tmp_path / 'test_app.py').write_text(
        'import transaction\n'
        'import mailout\n\n\n'
        'def signup(address):   # the application\n'
        "    mailout.send('noreply@example.org', [address],\n"
        "                 'Subject: Welcome\\r\\n\\r\\nHello.\\r\\n')\n"
        '\n\n' + test)
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q',
                             '-p', 'no:cacheprovider', str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '1 passed' in result.stdout
