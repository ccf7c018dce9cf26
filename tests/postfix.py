"""A private Postfix instance for the tests: mailout -> Postfix -> sink.

`Postfix` runs ``postfix -c DIR/etc start`` in a temporary directory of its
own (see /work/shared/POSTFIX_NOTES.md): it listens on 127.0.0.1 only,
relays everything to a test SMTP sink (``relayhost = [127.0.0.1]:PORT``),
never looks anything up in DNS and logs to ``DIR/log/maillog``.  Its SMTP
port offers STARTTLS with the ``certs`` fixture's certificate and refuses
``rejected@example.org`` with a 550 (a ``check_recipient_access`` map).
Where Cyrus SASL's ``saslpasswd2`` is installed (Debian: sasl2-bin), a
second port takes AUTH PLAIN/LOGIN over TLS only and relays for
authenticated clients only.

The fixtures below are imported by conftest.py, for any test module.  Without
/usr/sbin/postfix they skip, unless ``MAILOUT_TEST_POSTFIX`` is set (CI sets
it after installing Debian's postfix): then they fail.

Several instances run side by side (tests/scaleout.py's relay farm): each
has its own directory, listens on a loopback address of its own
(``address``: Linux answers on all of 127.0.0.0/8) and names itself
``NAME.mailout.test`` (``name``) in its Received headers.  `halt` stops an
instance and keeps its queue, `start` starts it again.
"""
import json
import os
import re
import threading
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from helpers import Sink
from helpers import write_config

POSTFIX = '/usr/sbin/postfix'
POSTQUEUE = '/usr/sbin/postqueue'
SASLPASSWD2 = '/usr/sbin/saslpasswd2'

#: Recipient the instance refuses for good.
REJECTED = 'rejected@example.org'
REJECT_REPLY = '550 5.1.1 no such mailbox here'
#: SASL account of the AUTH port.
SASL_USER = 'zope'
SASL_PASSWORD = 'secret-Pa55'
SASL_REALM = 'mailout.test'

MISSING = 'Postfix not installed; CI installs it (MAILOUT_TEST_POSTFIX=1)'


def required():
    """True when the Postfix tests must run (CI), not skip."""
    return bool(os.environ.get('MAILOUT_TEST_POSTFIX'))


def require(path=POSTFIX, reason=MISSING):
    """Skip the calling test or fixture if ``path`` is missing; fail
    instead when MAILOUT_TEST_POSTFIX is set."""
    if os.path.exists(path):
        return
    if required():
        pytest.fail(f'{path} is missing but MAILOUT_TEST_POSTFIX is set')
    pytest.skip(reason)


def free_port(address='127.0.0.1'):
    """A TCP port free on ``address`` now."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Postfix:
    """One private Postfix instance in a temporary directory, listening on
    ``address`` (a loopback address) as ``NAME.mailout.test`` and relaying
    everything to 127.0.0.1:``relay_port``.  ``fast_retry``: Postfix tries
    deferred mail again within seconds, not minutes."""

    def __init__(self, relay_port, certs=None, sasl=None,
                 address='127.0.0.1', name='postfix', fast_retry=False):
        self.relay_port = relay_port
        self.address = address
        self.name = name
        self.hostname = f'{name}.mailout.test'
        self.fast_retry = fast_retry
        self.sasl = os.path.exists(SASLPASSWD2) if sasl is None else sasl
        # Not under pytest's basetemp: its directories are 0700, and the
        # postfix user must traverse every parent to reach its lock files.
        self.dir = tempfile.mkdtemp(prefix=f'mailout-{name}-')
        self.etc = os.path.join(self.dir, 'etc')
        self.spool = os.path.join(self.dir, 'spool')
        self.data = os.path.join(self.dir, 'data')
        self.log_dir = os.path.join(self.dir, 'log')
        self.logfile = os.path.join(self.log_dir, 'maillog')
        for path in (self.dir, self.etc, self.spool, self.data, self.log_dir):
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o755)
        shutil.chown(self.data, 'postfix', 'postfix')
        self.port = free_port(address)
        self.auth_port = free_port(address) if self.sasl else None
        self.tls = certs is not None
        if self.tls:
            # smtpd reads these as root before it drops privileges.
            self.key = os.path.join(self.etc, 'key.pem')
            self.cert = os.path.join(self.etc, 'cert.pem')
            shutil.copyfile(certs.key, self.key)
            shutil.copyfile(certs.cert, self.cert)
            os.chmod(self.key, 0o600)
        self._write_config()
        self.started = False
        self._group = None      # the master's process group while it runs

    def __repr__(self):
        return f'<Postfix {self.name} {self.address}:{self.port} in ' \
               f'{self.dir}>'

    # -- configuration --------------------------------------------------------

    def _write_config(self):
        with open(os.path.join(self.etc, 'recipient_access'), 'w') as f:
            f.write(f'{REJECTED} {REJECT_REPLY}\n')
        settings = [
            'compatibility_level = 3.6',
            f'queue_directory = {self.spool}',
            f'data_directory = {self.data}',
            f'maillog_file_prefixes = /var, /dev/stdout, {self.log_dir}',
            f'maillog_file = {self.logfile}',
            f'myhostname = {self.hostname}',
            'mydomain = mailout.test',
            'myorigin = $myhostname',
            # Not ``address``: Postfix refuses one that no interface has
            # (127.0.0.2 lies in lo's 127.0.0.0/8, but lo has 127.0.0.1);
            # master.cf names the address each service listens on.
            'inet_interfaces = loopback-only',
            'inet_protocols = ipv4',
            'mynetworks = 127.0.0.0/8',
            'mydestination =',
            'local_recipient_maps =',
            'local_transport = error:local delivery is disabled',
            'alias_maps =',
            'alias_database =',
            'relay_domains =',
            f'relayhost = [127.0.0.1]:{self.relay_port}',
            'smtpd_relay_restrictions = permit_mynetworks, reject',
            'smtpd_recipient_restrictions ='
            f' check_recipient_access texthash:{self.etc}/recipient_access',
            'smtp_dns_support_level = disabled',
            'disable_dns_lookups = yes',
            'smtpd_peername_lookup = no',
            'smtputf8_enable = yes',
            # Refused recipients must not slow the tests down.
            'smtpd_error_sleep_time = 0',
            'smtpd_soft_error_limit = 100',
            'smtpd_hard_error_limit = 200',
        ]
        if self.fast_retry:
            settings += [
                'minimal_backoff_time = 2s',
                'maximal_backoff_time = 10s',
                'queue_run_delay = 2s',
            ]
        if self.tls:
            settings += [
                f'smtpd_tls_chain_files = {self.key}, {self.cert}',
                'smtpd_tls_security_level = may',
                'smtpd_tls_loglevel = 1',
                'smtpd_tls_received_header = yes',
            ]
        if self.sasl:
            sasl_dir = os.path.join(self.etc, 'sasl')
            os.makedirs(sasl_dir, exist_ok=True)
            os.chmod(sasl_dir, 0o755)
            sasldb = os.path.join(self.etc, 'sasldb2')
            with open(os.path.join(sasl_dir, 'smtpd.conf'), 'w') as f:
                f.write(f'pwcheck_method: auxprop\n'
                        f'auxprop_plugin: sasldb\n'
                        f'sasldb_path: {sasldb}\n'
                        f'mech_list: PLAIN LOGIN\n')
            subprocess.run(
                [SASLPASSWD2, '-f', sasldb, '-c', '-p', '-u', SASL_REALM,
                 SASL_USER], input=SASL_PASSWORD.encode(), check=True,
                timeout=30)
            shutil.chown(sasldb, 'root', 'postfix')
            os.chmod(sasldb, 0o640)
            settings += [
                'smtpd_sasl_type = cyrus',
                'smtpd_sasl_path = smtpd',
                f'cyrus_sasl_config_path = {sasl_dir}',
                f'smtpd_sasl_local_domain = {SASL_REALM}',
                'smtpd_sasl_authenticated_header = yes',
                'smtpd_tls_auth_only = yes',
            ]
        with open(os.path.join(self.etc, 'main.cf'), 'w') as f:
            f.write(''.join(line + '\n' for line in settings))
        services = [f'{self.address}:{self.port} inet n - n - - smtpd']
        if self.sasl:
            services += [
                f'{self.address}:{self.auth_port} inet n - n - - smtpd',
                '  -o smtpd_tls_security_level=encrypt',
                '  -o smtpd_sasl_auth_enable=yes',
                '  -o smtpd_relay_restrictions=permit_sasl_authenticated,'
                'reject_unauth_destination',
                '  -o smtpd_recipient_restrictions=',
            ]
        # name type private unpriv chroot wakeup maxproc command
        services += [
            'pickup unix n - n 60 1 pickup',
            'cleanup unix n - n - 0 cleanup',
            'qmgr unix n - n 300 1 qmgr',
            'tlsmgr unix - - n 1000? 1 tlsmgr',
            'rewrite unix - - n - - trivial-rewrite',
            'bounce unix - - n - 0 bounce',
            'defer unix - - n - 0 bounce',
            'trace unix - - n - 0 bounce',
            'verify unix - - n - 1 verify',
            'flush unix n - n 1000? 0 flush',
            'proxymap unix - - n - - proxymap',
            'proxywrite unix - - n - 1 proxymap',
            'smtp unix - - n - - smtp',
            'relay unix - - n - - smtp',
            'showq unix n - n - - showq',
            'error unix - - n - - error',
            'retry unix - - n - - error',
            'discard unix - - n - - discard',
            'anvil unix - - n - 1 anvil',
            'scache unix - - n - 1 scache',
            'postlog unix-dgram n - n - 1 postlogd',
        ]
        with open(os.path.join(self.etc, 'master.cf'), 'w') as f:
            f.write(''.join(line + '\n' for line in services))

    # -- running --------------------------------------------------------------

    def command(self, *args, check=True, timeout=60):
        """Run ``postfix -c ETC ARGS``; return the completed process."""
        result = subprocess.run(
            [POSTFIX, '-c', self.etc, *args], capture_output=True, text=True,
            timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(
                f'postfix {" ".join(args)} exited {result.returncode}:\n'
                f'{result.stdout}{result.stderr}\n{self.log()}')
        return result

    def start(self, timeout=30):
        """Start the instance and wait (at most ``timeout`` seconds) for the
        220 greeting on every port.  Starts a `halt`ed instance again,
        with the mail left in its queue."""
        self.command('check')          # creates the queue directories
        for path in (self.spool,):
            os.chmod(path, 0o755)
        self.command('start')
        self.started = True
        self._group = self.master_pid   # master runs in a session of its own
        deadline = time.monotonic() + timeout
        for port in filter(None, (self.port, self.auth_port)):
            self._wait_for_greeting(port, deadline)

    def _wait_for_greeting(self, port, deadline):
        error = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.address, port),
                                              timeout=5) as s:
                    greeting = s.makefile('rb').readline()
                    if greeting.startswith(b'220'):
                        s.sendall(b'QUIT\r\n')
                        return greeting
                    error = f'greeting {greeting!r}'
            except OSError as e:
                error = e
            if 'fatal:' in self.log():
                break
            time.sleep(0.05)
        raise RuntimeError(f'{self}: no 220 on port {port} ({error}); '
                           f'log:\n{self.log()}')

    @property
    def master_pid(self):
        try:
            with open(os.path.join(self.spool, 'pid', 'master.pid')) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def halt(self, timeout=30, kill=False):
        """Stop the instance (``postfix stop``, bounded; ``kill``: SIGKILL
        its master instead, as a crash would) and wait until every process
        of it (its master's process group) is gone; its directory and
        queue stay, for `start`."""
        if not self.started:
            return
        pid = self.master_pid
        group = self._group or pid
        if kill and pid:
            os.kill(pid, 9)
        else:
            self.command('stop', check=False, timeout=timeout)
        deadline = time.monotonic() + timeout
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid and _alive(pid):     # our own master; make sure it goes
            os.kill(pid, 9)
        # The master's SIGTERM goes to its whole group; smtpd, cleanup and
        # smtp processes may take a moment to go.
        while group and _group_members(group) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        for member in _group_members(group) if group else ():
            try:
                os.kill(member, 9)
            except ProcessLookupError:
                pass
        self.started = False
        self._group = None

    def stop(self, timeout=30):
        """Stop the instance (bounded) and remove its directory."""
        self.halt(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- inspection -----------------------------------------------------------

    def log(self):
        """The instance's whole log so far."""
        try:
            with open(self.logfile, errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def log_offset(self):
        """Where the log ends now; pass to `log_since` or `wait_for_log`."""
        return len(self.log())

    def log_since(self, offset):
        return self.log()[offset:]

    def wait_for_log(self, pattern, since=0, timeout=10):
        """Wait for a log line matching ``pattern`` after ``since``; return
        its match (postlogd writes asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log_since(since), re.M)
            if match or time.monotonic() > deadline:
                if not match:
                    raise AssertionError(
                        f'no log line /{pattern}/ within {timeout}s:\n'
                        f'{self.log_since(since)}')
                return match
            time.sleep(0.02)

    def queue(self):
        """Postfix's queue as a list of dicts (``postqueue -j``)."""
        result = subprocess.run([POSTQUEUE, '-c', self.etc, '-j'],
                                capture_output=True, text=True, timeout=30,
                                check=True)
        return [json.loads(line) for line in result.stdout.splitlines()]

    def flush(self):
        """Try every deferred message now (``postqueue -f``)."""
        subprocess.run([POSTQUEUE, '-c', self.etc, '-f'], capture_output=True,
                       timeout=30, check=True)

    def wait_until_empty(self, timeout=10):
        """Wait until Postfix has handed everything on (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            queue = self.queue()
            if not queue:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f'Postfix queue not empty: {queue}')
            time.sleep(0.02)


def start_all(instances, timeout=60):
    """Start several instances at once (each takes a few seconds), each
    in a thread; raise the first failure."""
    errors = []

    def start(instance):
        try:
            instance.start(timeout)
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=start, args=(instance,))
               for instance in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _group_members(group):
    """The live (not zombie) processes of process group ``group``."""
    members = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[2] the process group.
        if fields[2] == str(group) and fields[0] != 'Z':
            members.append(int(entry))
    return members


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is as good as gone.
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


class RelaySink(Sink):
    """A `Sink` whose listing skips the sink's half-written ``.NNNNNN.json``
    files (helpers.Sink.messages() reads them too, and Postfix's parallel
    deliveries hit that window)."""

    def messages(self):
        result = []
        for name in sorted(os.listdir(self.directory)):
            if name.startswith('.') or not name.endswith('.json'):
                continue
            with open(os.path.join(self.directory, name)) as f:
                record = json.load(f)
            record['data'] = record['data'].encode('latin-1')
            result.append(record)
        return result


def split_received(data):
    """``data`` -> (the leading Received: headers as text, the rest)."""
    received = []
    lines = data.split(b'\r\n')
    i = 0
    while i < len(lines) and lines[i].lower().startswith(b'received:'):
        header = [lines[i]]
        i += 1
        while i < len(lines) and lines[i][:1] in (b' ', b'\t'):
            header.append(lines[i])
            i += 1
        received.append(b'\r\n'.join(header).decode('latin-1'))
    return received, b'\r\n'.join(lines[i:])


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope='session')
def postfix_installed():
    """Skip without /usr/sbin/postfix; fail if MAILOUT_TEST_POSTFIX is
    set."""
    require()


@pytest.fixture(scope='session')
def postfix_sink(postfix_installed, tmp_path_factory):
    """The SMTP sink the Postfix instance relays to (one per session)."""
    sink = RelaySink(tmp_path_factory.mktemp('postfix-sink'))
    yield sink
    sink.stop()


@pytest.fixture(scope='session')
def postfix(postfix_installed, postfix_sink, certs):
    """A private Postfix instance relaying to `postfix_sink`, for the
    session."""
    instance = Postfix(postfix_sink.port, certs=certs)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def relay_sink(postfix, postfix_sink):
    """The sink behind Postfix, emptied once Postfix's queue is empty."""
    postfix.wait_until_empty()
    postfix_sink.clear()
    return postfix_sink


@pytest.fixture
def through_postfix(tmp_path, postfix):
    """Build mailout from a config whose mailer 'postfix' talks to the
    instance; call with extra mailer lines, get the queued delivery
    'queued' (processor on)."""
    from mailout import config
    from mailout.factories import build_all

    def build(mailer='tls none', port=None, queued=''):
        path = write_config(tmp_path / 'mailout.conf', f'''
            <smtp-mailer postfix>
              host 127.0.0.1:{port or postfix.port}
              local-hostname client.mailout.test
              timeout 10s
              {mailer}
            </smtp-mailer>
            <queued-delivery queued>
              mailer postfix
              queue-path {tmp_path}/queue
              {queued}
            </queued-delivery>
        ''')
        mailers, deliveries = build_all(config.load(path))
        return deliveries['queued']
    return build
