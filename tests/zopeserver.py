"""Support for test_mailhost.py and test_plone.py: a Zope instance under
``runwsgi`` (on 127.0.0.1 and a free port, spoken to over HTTP), and the
snippets of README.rst's section "Plone and MailHost"."""
import base64
import os
import re
import signal
import textwrap
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from helpers import HERE
from helpers import zope_script


def zope_env(**more):
    """os.environ with tests/ on $PYTHONPATH (for tests/zopeapp)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [HERE, os.environ.get('PYTHONPATH')])), **more)


# With ``log_processor``: mailout.processor at INFO on runwsgi's stderr
# (through the root logger's console handler) whatever level the root
# logger has.
LOG_PROCESSOR = '''
[logger_mailout]
level = INFO
handlers =
qualname = mailout.processor
propagate = 1
'''


class Server:
    """``runwsgi etc/zope.ini`` of ``instance`` with tests/ on the path;
    stderr is read all the time into ``output``.  A context manager: the
    server is killed on the way out."""

    def __init__(self, instance, timeout=120, log_processor=False):
        ini = instance / 'etc' / 'zope.ini'
        text = ini.read_text().replace('port = 8080', 'port = 0')
        if log_processor:
            text = text.replace('keys = root, ', 'keys = root, mailout, ', 1) \
                + LOG_PROCESSOR
        ini.write_text(text)
        env = zope_env()
        self.url = None
        self._lines = []
        self._serving = threading.Event()
        self.process = subprocess.Popen(
            zope_script('Zope2.Startup.serve', ini), env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.timeout = timeout

    def _read(self):
        for line in self.process.stderr:
            self._lines.append(line)
            if self.url is None and 'Serving on http://' in line:
                self.url = line.split('Serving on ')[1].strip()
                self._serving.set()
        self._serving.set()

    @property
    def output(self):
        return ''.join(self._lines)

    def __enter__(self):
        self._serving.wait(self.timeout)
        if self.url is None:
            self.stop()
            raise RuntimeError('runwsgi did not start:\n' + self.output)
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def request(self, path, data=None, auth=None, **query):
        """GET ``path?query`` (POST ``data``, a dict, if given), with basic
        ``auth`` ('user:password'): (status, body), for errors too."""
        url = self.url + path
        if query:
            url += '?' + urllib.parse.urlencode(query)
        body = urllib.parse.urlencode(data).encode() if data else None
        request = urllib.request.Request(url, data=body)
        if auth:
            request.add_header('Authorization', 'Basic ' + base64.b64encode(
                auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read().decode()

    def interrupt(self, timeout=20):
        """SIGINT, as Ctrl-C; the exit code, once all output is read."""
        self.process.send_signal(signal.SIGINT)
        returncode = self.process.wait(timeout)
        self._reader.join(5)
        return returncode

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)


def wait_until(condition, timeout=10):
    """Poll ``condition()`` until true or ``timeout``; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def readme_blocks():
    """The literal blocks of README.rst's section "Plone and MailHost"."""
    with open(os.path.join(HERE, '..', 'README.rst')) as f:
        text = f.read()
    start = text.index('Plone and MailHost\n==================\n')
    end = text.index('\n=====', start + 40)
    section = text[start:text.rindex('\n\n', start, end)]
    blocks = []
    for match in re.finditer(r'::\n\n((?:    .*\n|\n)+)', section + '\n'):
        blocks.append(textwrap.dedent(match.group(1)).strip() + '\n')
    return blocks


def readme_snippets():
    """The section's zope.conf and site ZCML, as an integrator copies them
    (test_plone.py runs a Plone site with them)."""
    zope_conf, site_zcml, _ = readme_blocks()
    return zope_conf, site_zcml
