"""The mailout command's habits: bare ``mailout``, ``--version``, ``-C``
before the command, a quiet ``process --once`` for cron."""
import os
import subprocess
import sys

from helpers import config_text
from helpers import write_config

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'mailout')


def mailout(*args, **kw):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True,
                          timeout=60, **kw)


def queue_config(tmp_path, port):
    return write_config(tmp_path / 'mailout.conf', config_text(
        port, tmp_path / 'queue', delivery_lines=['processor off']))


def test_bare_mailout_prints_the_help():
    """``mailout`` alone prints the help (with every command) and exits 2."""
    result = mailout()
    assert result.returncode == 2
    assert result.stdout.startswith('usage: mailout')
    for command in ('process', 'queue', 'check', 'send', 'metrics', 'demo'):
        assert command in result.stdout


def test_version():
    """``mailout --version`` names the installed version."""
    from importlib.metadata import version
    result = mailout('--version')
    assert (result.returncode, result.stdout) == (
        0, f"mailout {version('mailout')}\n")


def test_config_before_or_after_the_command(tmp_path, sink):
    """-C works before the command as after it; after it, it wins over one
    given before, and either wins over $MAILOUT_CONFIG."""
    good = queue_config(tmp_path, sink.port)
    env = {**os.environ, 'MAILOUT_CONFIG': str(tmp_path / 'missing.conf')}
    for args in (['-C', good, 'queue', 'status'],
                 ['queue', 'status', '-C', good],
                 ['-C', str(tmp_path / 'other.conf'), 'queue', 'status',
                  '-C', good]):
        result = mailout(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
        assert str(tmp_path / 'queue') in result.stdout


def test_process_once_is_quiet_with_nothing_to_do(tmp_path, sink):
    """Run from cron with nothing waiting, ``process --once`` prints
    nothing (cron mails any output), and exits 0."""
    result = mailout('process', '--once', '-C',
                     queue_config(tmp_path, sink.port))
    assert (result.returncode, result.stdout, result.stderr) == (0, '', '')


def test_a_mistyped_key_names_file_line_and_section(tmp_path, instance):
    """A key the section does not know ('hots' for 'host') is reported with
    its file, line and section: in a standalone file and in zope.conf."""
    from helpers import write_zope_conf
    standalone = write_config(tmp_path / 'mailout.conf', '''
        <smtp-mailer relay>
          hots 127.0.0.1:25
        </smtp-mailer>''')
    result = mailout('check', '-C', standalone)
    assert result.returncode == 1
    line = open(standalone).read().splitlines().index(
        '  hots 127.0.0.1:25') + 1
    assert (f"{standalone}, line {line}, in <smtp-mailer relay>: 'hots' is "
            'not a key of this section') in result.stdout
    conf = write_zope_conf(instance, '''
<mailout mailout>
  <smtp-mailer relay>
    host 127.0.0.1:25
  </smtp-mailer>
  <queued-delivery default>
    mailer relay
    queue-pth /tmp/q
  </queued-delivery>
</mailout>
''')
    result = mailout('queue', 'status', '-C', conf)
    assert result.returncode == 1
    line = open(conf).read().splitlines().index('    queue-pth /tmp/q') + 1
    assert (f"{conf}, line {line}, in <queued-delivery default>: 'queue-pth' "
            'is not a key of this section') in result.stderr


def test_send_timeout(tmp_path, start_sink):
    """``send --timeout 1`` against a relay that never answers MAIL gives
    up after about a second (the mailer's own timeout is 30 s)."""
    import time
    stalled = start_sink('--stall', '60', '--stall-at', 'mail')
    conf = queue_config(tmp_path, stalled.port)
    started = time.monotonic()
    result = mailout('send', '-C', conf, '--from', 'app@example.org',
                     '--to', 'ann@example.org', '--timeout', '1')
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert 'deferred' in result.stdout


def test_process_once_shows_progress_on_a_long_drain(tmp_path, start_sink):
    """A drain that takes a while shows its counts on stderr: on a
    terminal one line updated in place; stdout keeps the summary alone."""
    import os
    import pty
    from mailout.message import prepare
    from mailout.queue import Queue
    sink = start_sink('--data-delay', '0.08')
    conf = queue_config(tmp_path, sink.port)
    queue = Queue(str(tmp_path / 'queue'))
    queue.commit([queue.write(prepare('app@example.org', ['ann@example.org'],
                                      f'Subject: {i}\r\n\r\nx'))
                  for i in range(50)])
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([SCRIPT, 'process', '--once', '-C', conf],
                                stdout=subprocess.PIPE, stderr=terminal,
                                text=True, timeout=120)
        os.close(terminal)
        shown = b''
        while True:
            try:
                more = os.read(controller, 65536)
            except OSError:
                break
            if not more:
                break
            shown += more
    finally:
        os.close(controller)
    assert result.returncode == 0
    assert result.stdout.startswith('default (')
    assert b'\rmailout process --once: ' in shown
    assert b' handled in ' in shown and b' sent, 0 deferred, 0 failed' in shown


def test_one_json_shape_per_concept(tmp_path, sink):
    """``config`` is the same object in every command's JSON (path and
    source); attempts are objects with time, code and text."""
    import json
    conf = queue_config(tmp_path, sink.port)
    shapes = []
    for args in (['queue', 'status'], ['queue', 'list'], ['metrics'],
                 ['process', '--once'], ['check'],
                 ['send', '--from', 'a@example.org', '--to',
                  'b@example.org']):
        data = json.loads(mailout(*args, '-C', conf, '--json').stdout)
        shapes.append((args[0], data['config']['path'],
                       'source' in data['config']))
    assert {(path, has) for _, path, has in shapes} == {(conf, True)}
    from mailout.queue.fileformat import attempt_line
    from mailout.queue.fileformat import parse_attempt
    line = attempt_line((451, '4.7.1  greylisted\r\n try later'), 0)
    assert parse_attempt(line) == {'time': '1970-01-01T00:00:00Z',
                                   'code': 451,
                                   'text': '4.7.1 greylisted try later'}
    assert parse_attempt(attempt_line((None, 'timed out'), 0))['code'] \
        is None
