"""Fixtures: real SMTP server processes, certificates, configs, clean-up,
a Zope instance, a private Postfix (from tests/postfix.py); the ``slow``
marker."""
import os
import shutil
import subprocess

import pytest
import transaction
import zope.component.testing

from helpers import Sink
from helpers import config_text
from helpers import write_config
from helpers import zope_script
from mailout import processor
# The private Postfix instance (tests/postfix.py), for any test module:
from postfix import postfix              # noqa: F401 (fixtures)
from postfix import postfix_installed    # noqa: F401
from postfix import postfix_sink         # noqa: F401
from postfix import relay_sink           # noqa: F401
from postfix import through_postfix      # noqa: F401


def pytest_addoption(parser):
    parser.addoption('--slow', action='store_true',
                     help='also run the tests marked slow (CI=true does)')


def pytest_collection_modifyitems(config, items):
    """Leave out the slow tests (the crash loop, the 20,000-message shared
    queue, the 30 s relay outage, the Plone site) unless ``--slow`` is
    given or CI is set: CI runs everything."""
    if config.getoption('--slow') or os.environ.get('CI'):
        return
    slow = [item for item in items if 'slow' in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if 'slow' not in item.keywords]


@pytest.fixture
def start_sink(tmp_path_factory):
    """Start SMTP sink processes with the given options; stopped after."""
    sinks = []

    def start(*options):
        sink = Sink(tmp_path_factory.mktemp('sink'), *options)
        sinks.append(sink)
        return sink
    yield start
    for sink in sinks:
        sink.stop()


@pytest.fixture(scope='session')
def _session_sink(tmp_path_factory):
    sink = Sink(tmp_path_factory.mktemp('sink'))
    yield sink
    sink.stop()


@pytest.fixture
def sink(_session_sink):
    """A plain SMTP sink, emptied for each test."""
    _session_sink.clear()
    return _session_sink


@pytest.fixture(scope='session')
def certs(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1 and localhost, as files:
    ``certs.ca``, ``certs.cert``, ``certs.key``."""
    import trustme
    directory = tmp_path_factory.mktemp('certs')
    ca = trustme.CA()
    server = ca.issue_cert('127.0.0.1', 'localhost')

    class Certs:
        ca = str(directory / 'ca.pem')
        cert = str(directory / 'cert.pem')
        key = str(directory / 'key.pem')
    ca.cert_pem.write_to_path(Certs.ca)
    server.cert_chain_pems[0].write_to_path(Certs.cert)
    server.private_key_pem.write_to_path(Certs.key)
    return Certs


@pytest.fixture
def config_file(tmp_path, sink):
    """A standalone config: mailer 'relay' -> the sink; queued delivery
    'default' and direct delivery 'urgent'."""
    return write_config(tmp_path / 'mailout.conf', config_text(
        sink.port, f'{tmp_path}/queue', direct=True))


@pytest.fixture(autouse=True)
def clean_up(monkeypatch):
    """Abort the transaction, empty the component registry and stop every
    processor a test started.  In this process relays take their turns
    from the first one (the farm tests count on it); other processes start
    at random."""
    from mailout.mailers import relays
    monkeypatch.setattr(relays, 'start_of_turn', lambda weight: 0.0)
    zope.component.testing.setUp()
    yield
    transaction.abort()
    processor.stop_all()
    processor.forget_registered()
    zope.component.testing.tearDown()


@pytest.fixture(scope='module')
def template(tmp_path_factory):
    """An instance made by Zope's mkwsgiinstance, copied by `instance`."""
    path = tmp_path_factory.mktemp('zope') / 'template'
    subprocess.run(zope_script('Zope2.utilities.mkwsgiinstance',
                               '-d', path, '-u', 'admin:admin'),
                   check=True, capture_output=True)
    return path


@pytest.fixture
def instance(template, tmp_path):
    """A fresh Zope instance directory with an SMTP password file (write
    its zope.conf with `helpers.write_zope_conf`)."""
    path = tmp_path / 'instance'
    shutil.copytree(template, path)
    for name in ('zope.conf', 'zope.ini'):
        conf = path / 'etc' / name
        conf.write_text(conf.read_text().replace(str(template), str(path)))
    (path / 'etc' / 'smtp-password').write_text('secret\n')
    (path / 'etc' / 'smtp-password').chmod(0o600)   # as the README says
    return path


@pytest.fixture
def zope_state(monkeypatch):
    """Put back what loading zope.conf changes (`helpers.configure_zope`):
    App.config's configuration, the homes and environment variables,
    HTTPRequest's retry count."""
    import App.config
    from App import FindHomes

    # App.config's module global is read and put back as it is: Zope has
    # no public way to read "not configured" (getConfiguration() would
    # install a default configuration).
    def reset():
        monkeypatch.setattr(App.config, '_config', config)
        for name in ('INSTANCE_HOME', 'CLIENT_HOME', 'CHAMELEON_CACHE',
                     'MAILOUT_CONFIG'):
            monkeypatch.delenv(name, raising=False)
    config = App.config._config
    monkeypatch.setattr(FindHomes, 'INSTANCE_HOME', FindHomes.INSTANCE_HOME)
    monkeypatch.setattr(FindHomes, 'CLIENT_HOME', FindHomes.CLIENT_HOME)
    reset()
    # The first import of ZPublisher.HTTPRequest installs a
    # DefaultConfiguration and sets $INSTANCE_HOME and $CLIENT_HOME.
    from ZPublisher.HTTPRequest import HTTPRequest
    monkeypatch.setattr(HTTPRequest, 'retry_max_count',
                        HTTPRequest.retry_max_count)
    reset()
