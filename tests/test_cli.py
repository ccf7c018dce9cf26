"""The mailout command: each subcommand run against real SMTP sinks, queue
directories and zope.conf files; in this process (``mailout.cli.main``)
unless a process boundary is under test (the console script itself,
signals, the daemon, a terminal)."""
import asyncio
import contextlib
import io
import json
import logging
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest

from helpers import config_text
from helpers import enqueue
from helpers import files_in
from helpers import smtp_mailer
from helpers import write_config
from helpers import write_zope_conf
from mailout.cli import main
from mailout.queue import Queue

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'mailout')


def script(*args, **kw):
    """Run the installed ``mailout`` console script."""
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True,
                          timeout=60, **kw)


def mailout(*args, env=None, stdin=None):
    """Run ``mailout ARGS`` in this process, as the console script would
    (``env`` its environment, ``stdin`` a file descriptor or DEVNULL); what
    it printed and returned as a `subprocess.CompletedProcess`."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    # main() configures logging as in a fresh process: to its stderr.
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = []
    with contextlib.ExitStack() as stack:
        if env is not None:
            stack.enter_context(mock.patch.dict(os.environ, env, clear=True))
        if stdin is not None:
            stack.enter_context(mock.patch('sys.stdin', stack.enter_context(
                open(os.devnull if stdin == subprocess.DEVNULL else stdin,
                     closefd=stdin == subprocess.DEVNULL))))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            status = main(list(args))
        except SystemExit as e:         # argparse: --help, usage errors
            status = e.code
        finally:
            for handler in root.handlers:
                handler.close()
            root.handlers[:], root.level = handlers, level
    if isinstance(status, str):         # sys.exit('message')
        err.write(status + '\n')
        status = 1
    return subprocess.CompletedProcess(args, status or 0, out.getvalue(),
                                       err.getvalue())


def test_demo_runs_end_to_end():
    """`mailout demo` commits 3 messages, aborts one, and all 3 arrive."""
    result = script('demo')
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'the SMTP server received 3 message(s)' in out
    for i in (1, 2, 3):
        assert f'to user{i}@example.org: demo message {i}' in out
    assert 'aborted@example.org' not in out.split('received')[1]
    assert 'queue now holds: tmp 0, new 0, cur 0, deferred 0, failed 0' in out
    assert out.rstrip().endswith('demo succeeded')


def test_usage_errors_exit_2():
    """An unknown command is a usage error (exit 2)."""
    result = mailout('no-such-command')
    assert result.returncode == 2
    assert 'invalid choice' in result.stderr


# -- helpers -------------------------------------------------------------------

def mailout_json(*args, **kw):
    """Run ``mailout ARGS --json``; ``(exit status, parsed stdout)``."""
    result = mailout(*args, '--json', **kw)
    try:
        return result.returncode, json.loads(result.stdout)
    except ValueError:
        pytest.fail(f'not JSON: {result.stdout!r}\n{result.stderr}')


def queue_config(tmp_path, port, extra='', tls='none'):
    """Mailer 'relay' -> 127.0.0.1:port; queued 'default' with processor
    off (what a Zope process with an external processor has); direct
    'urgent'."""
    return write_config(tmp_path / 'mailout.conf', config_text(
        port, f'{tmp_path}/queue', mailer_lines=(extra,),
        delivery_lines=('processor off', 'poll-interval 0.2s'),
        direct=True, tls=tls))


def files(tmp_path, area):
    """`files_in` the queue of `queue_config`."""
    return files_in(tmp_path / 'queue', area)


def enqueue_to(tmp_path, *recipients, subject='Hello'):
    """Commit one message per recipient into tmp_path/queue, as a Zope
    process with ``processor off`` would; their queue names."""
    return enqueue(Queue.open(str(tmp_path / 'queue')), subject,
                   to=recipients, one_per_recipient=True,
                   fromaddr='zope@example.org',
                   headers='From: zope@example.org\r\nTo: {to}\r\n',
                   body='Hi.\r\n')


@pytest.fixture
def refusing_sink(start_sink):
    """A sink refusing bad@ permanently (550) and later@ transiently (451).
    """
    return start_sink('--refuse', 'bad@example.org=550 5.1.1 no such user',
                      '--refuse', 'later@example.org=451 4.3.0 try later')


@pytest.fixture
def settled(tmp_path, refusing_sink):
    """A queue holding one deferred and one failed message (one more was
    sent); the config path."""
    conf = queue_config(tmp_path, refusing_sink.port)
    enqueue_to(tmp_path, 'ann@example.org', 'bad@example.org',
               'later@example.org')
    assert mailout('process', '--once', '-C', conf).returncode == 1
    assert len(files(tmp_path, 'deferred')) == 1
    assert len(files(tmp_path, 'failed')) == 1
    return conf


@pytest.fixture(autouse=True)
def no_mailout_config(monkeypatch):
    """Tests say -C; an operator's $MAILOUT_CONFIG must not leak in."""
    monkeypatch.delenv('MAILOUT_CONFIG', raising=False)


# -- help, usage, configuration --------------------------------------------------

def test_help_documents_commands_and_exit_codes():
    """--help of the command and of each subcommand exits 0 and says what
    the exit codes mean."""
    result = mailout('--help')
    assert result.returncode == 0
    for command in ('process', 'queue', 'check', 'send', 'demo'):
        assert command in result.stdout
    assert 'exit status: 0 done; 1 something failed' in result.stdout
    for args in (['process'], ['queue'], ['queue', 'status'],
                 ['queue', 'list'], ['queue', 'show'], ['queue', 'retry'],
                 ['queue', 'purge'], ['check'], ['send']):
        result = mailout(*args, '--help')
        assert result.returncode == 0, args
        assert '2 usage error' in result.stdout, args


def test_no_configuration_is_a_usage_error():
    """Without -C and $MAILOUT_CONFIG every command exits 2 and says so."""
    for args in (['process', '--once'], ['queue', 'status'], ['check'],
                 ['send', '--from', 'a@example.org', '--to', 'b@example.org']):
        result = mailout(*args)
        assert result.returncode == 2, args
        assert 'give -C CONFIG or set $MAILOUT_CONFIG' in result.stderr


def test_mailout_config_environment_variable(config_file):
    """$MAILOUT_CONFIG stands in for -C."""
    result = mailout('queue', 'status',
                     env=dict(os.environ, MAILOUT_CONFIG=config_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('default  ')


def test_invalid_configuration_names_file_and_line(tmp_path):
    """A bad value fails every command with exit 1, naming file and line;
    --json says so too."""
    conf = write_config(tmp_path / 'bad.conf', '''
        <smtp-mailer relay>
          tls bogus
        </smtp-mailer>
    ''')
    result = mailout('queue', 'status', '-C', conf)
    assert result.returncode == 1
    assert 'tls must be one of' in result.stderr
    assert 'line 4' in result.stderr and conf in result.stderr
    status, data = mailout_json('check', '-C', conf)
    assert status == 1 and data['ok'] is False
    assert data['config']['ok'] is False
    assert 'line 4' in data['config']['error']


def test_missing_configuration_file(tmp_path):
    """A -C path that does not exist: exit 1, and it says so."""
    result = mailout('queue', 'status', '-C', str(tmp_path / 'nope.conf'))
    assert result.returncode == 1
    assert 'cannot read' in result.stderr
    assert 'No such file or directory' in result.stderr


# -- send ----------------------------------------------------------------------

def test_send_through_queued_delivery(config_file, sink):
    """`send` commits to the queue, runs its processor once and reports
    the message sent."""
    status, data = mailout_json(
        'send', '-C', config_file, '--from', 'ops@example.org',
        '--to', 'ann@example.org', '--to', 'bob@example.org',
        '--subject', 'relay test', '--body', 'Does it work?')
    assert status == 0, data
    assert data['ok'] and data['queued'] and data['outcome'] == 'sent'
    assert data['delivery'] == 'default'
    [event] = data['events']
    assert event['to'] == ['ann@example.org', 'bob@example.org']
    [received] = sink.messages()
    assert received['rcpt_tos'] == ['ann@example.org', 'bob@example.org']
    assert b'Subject: relay test' in received['data']
    assert b'Does it work?' in received['data']
    assert f"<{data['message_id']}>".encode() in received['data']
    queue = os.path.dirname(config_file) + '/queue'
    assert not any(files_in(queue, area)
                   for area in ('new', 'cur', 'deferred', 'failed'))


def test_send_reports_failed_and_deferred(tmp_path, refusing_sink):
    """`send` to a refused and a deferred recipient exits 1 naming both
    replies and the queue ID to inspect."""
    conf = queue_config(tmp_path, refusing_sink.port)
    result = mailout('send', '-C', conf, '--from', 'ops@example.org',
                     '--to', 'bad@example.org', '--to', 'later@example.org')
    assert result.returncode == 1
    out = result.stdout
    assert 'failed to bad@example.org: 550 5.1.1 no such user' in out
    assert 'deferred to later@example.org: 451 4.3.0 try later' in out
    [name] = files(tmp_path, 'failed')
    assert f'(mailout queue show {name})' in out
    assert files(tmp_path, 'deferred') == [name]


def test_send_through_direct_delivery(config_file, sink):
    """`send --delivery urgent` hands the message over at commit."""
    result = mailout('send', '-C', config_file, '--delivery', 'urgent',
                     '--from', 'ops@example.org', '--to', 'ann@example.org')
    assert result.returncode == 0, result.stderr
    assert 'via direct delivery urgent' in result.stdout
    assert 'sent to ann@example.org' in result.stdout
    assert len(sink.messages()) == 1


def test_send_direct_refused_exits_1(tmp_path, refusing_sink):
    """A direct delivery the relay refuses: exit 1 with the reply."""
    conf = queue_config(tmp_path, refusing_sink.port)
    status, data = mailout_json(
        'send', '-C', conf, '--delivery', 'urgent',
        '--from', 'ops@example.org', '--to', 'bad@example.org')
    assert status == 1 and data['outcome'] == 'failed'
    assert '550 5.1.1 no such user' in data['error']


def test_send_bad_arguments_exit_2(config_file, sink):
    """A malformed address or an unknown delivery is a usage error; nothing
    is queued or sent."""
    result = mailout('send', '-C', config_file, '--from', 'not an address',
                     '--to', 'ann@example.org')
    assert result.returncode == 2
    assert 'InvalidSender' in result.stderr
    result = mailout('send', '-C', config_file, '--delivery', 'nosuch',
                     '--from', 'ops@example.org', '--to', 'ann@example.org')
    assert result.returncode == 2
    assert "no delivery 'nosuch'" in result.stderr
    assert sink.messages() == []


# -- process --------------------------------------------------------------------

def test_process_once_summary(tmp_path, refusing_sink):
    """`process --once` drains a queue whose Zope runs no processor and
    counts sent, deferred and failed; exit 1 as not all were sent."""
    conf = queue_config(tmp_path, refusing_sink.port)
    enqueue_to(tmp_path, 'ann@example.org', 'bob@example.org',
               'bad@example.org', 'later@example.org')
    status, data = mailout_json('process', '--once', '-C', conf)
    assert status == 1
    [queue] = data['queues']
    assert (queue['delivery'], queue['handled'], queue['sent'],
            queue['deferred'], queue['failed']) == ('default', 4, 2, 1, 1)
    assert (data['sent'], data['deferred'], data['failed']) == (2, 1, 1)
    assert queue['now']['waiting'] == 0 and queue['now']['deferred'] == 1
    assert len(refusing_sink.messages()) == 2

    enqueue_to(tmp_path, 'carl@example.org')
    result = mailout('process', '--once', '-C', conf)
    assert result.returncode == 0
    assert result.stdout.startswith(
        f"default ({tmp_path / 'queue'}): 1 handled: 1 sent, 0 deferred, "
        '0 failed; now 0 waiting, 1 deferred, 1 failed')


class SlowSink:
    """An SMTP server in this process that takes ``delay`` seconds to
    answer the end of DATA; ``data_started`` is set when a message is in
    flight."""

    def __init__(self, delay):
        from aiosmtpd.smtp import SMTP
        self.received = []
        self.data_started = threading.Event()
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                sink.data_started.set()
                await asyncio.sleep(delay)
                sink.received.append(envelope.rcpt_tos)
                return '250 OK'

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.bind(('127.0.0.1', 0))
        sock.listen()
        self.port = sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(self.loop.create_server(
            lambda: SMTP(Handler(), hostname='slow.test'), sock=sock))
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def slow_sink():
    sink = SlowSink(delay=2)
    yield sink
    sink.stop()


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_process_stops_gracefully(tmp_path, slow_sink, signum):
    """SIGTERM/SIGINT while a message is in flight: `process` finishes it,
    leaves the rest in new/ and exits 0; nothing is lost."""
    conf = queue_config(tmp_path, slow_sink.port)
    enqueue_to(tmp_path, 'one@example.org', 'two@example.org',
               'three@example.org')
    daemon = subprocess.Popen([SCRIPT, 'process', '-C', conf],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert slow_sink.data_started.wait(20), daemon.stderr.read()
        assert files(tmp_path, 'cur')               # claimed, in flight
        daemon.send_signal(signum)
        out, err = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert daemon.returncode == 0, err
    assert slow_sink.received == [['one@example.org']]
    assert len(files(tmp_path, 'new')) == 2         # not lost, not sent
    for area in ('tmp', 'cur', 'deferred', 'failed'):
        assert files(tmp_path, area) == [], area
    assert 'stopping: finishing the messages in hand' in out
    assert 'default: 1 sent, 0 deferred, 0 failed' in out
    assert "stopped <Processor 'default'" in err    # the log, on stderr


def test_process_daemon_json_lines(tmp_path, sink):
    """`process --json` prints one JSON object a line: started, each
    message as it is sent, stopped with the counts."""
    conf = queue_config(tmp_path, sink.port)
    daemon = subprocess.Popen([SCRIPT, 'process', '--json', '-C', conf],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    watchdog = threading.Timer(30, daemon.kill)     # no hanging readline()
    watchdog.start()
    try:
        started = json.loads(daemon.stdout.readline())
        assert started['event'] == 'started'
        assert started['queues'][0]['delivery'] == 'default'
        [name] = enqueue_to(tmp_path, 'ann@example.org')   # picked up by poll
        sent = json.loads(daemon.stdout.readline())
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert daemon.returncode == 0
    assert (sent['event'], sent['id'], sent['to']) == (
        'sent', name, ['ann@example.org'])
    stopped = json.loads(out)
    assert stopped['event'] == 'stopped' and stopped['sent'] == 1
    assert len(sink.messages()) == 1


def test_process_without_queued_delivery(tmp_path, sink):
    """A configuration with only direct deliveries: nothing to process,
    exit 1."""
    conf = write_config(tmp_path / 'direct.conf',
                        config_text(sink.port, tls=None, direct=True))
    result = mailout('process', '-C', conf)
    assert result.returncode == 1
    assert 'has no queued delivery' in result.stderr


# -- queue ----------------------------------------------------------------------

def test_queue_status(tmp_path, settled):
    """`queue status` counts each area, the oldest message and the newest
    error, in JSON and for people."""
    enqueue_to(tmp_path, 'waiting@example.org')
    status, data = mailout_json('queue', 'status', '-C', settled)
    assert status == 0
    [queue] = data['queues']
    assert queue['deliveries'] == ['default']
    assert queue['path'] == str(tmp_path / 'queue')
    assert (queue['waiting'], queue['in_progress'], queue['deferred'],
            queue['failed']) == (1, 0, 1, 1)
    assert 0 <= queue['oldest_age'] < 60
    error = queue['last_error']         # one attempt, as an object
    assert (error['code'], error['text']) in (
        (451, '4.3.0 try later'), (550, '5.1.1 no such user'))
    assert error['time'].endswith('Z')
    assert queue['next_attempt'].endswith('Z')

    out = mailout('queue', 'status', '-C', settled).stdout.splitlines()
    assert out[0] == f"default  {tmp_path / 'queue'}"
    assert out[1:5] == ['  waiting      1', '  in progress  0',
                        out[3], '  failed       1']
    assert re.fullmatch(r'  deferred     1  \(next attempt in (4m \d+s|5m)\)',
                        out[3])
    assert out[6].startswith('  last error   20')


def test_queue_status_leaves_missing_queue_alone(tmp_path, config_file):
    """A queue directory never written is reported, not created."""
    status, data = mailout_json('queue', 'status', '-C', config_file)
    assert status == 0
    assert data['queues'][0]['exists'] is False
    assert not (tmp_path / 'queue').exists()


def test_queue_list(tmp_path, settled):
    """`queue list` shows every message; --failed and --deferred one area.
    """
    status, data = mailout_json('queue', 'list', '-C', settled)
    assert status == 0
    messages = data['queues'][0]['messages']
    assert sorted((m['area'], m['to'][0]) for m in messages) == [
        ('deferred', 'later@example.org'), ('failed', 'bad@example.org')]
    _, data = mailout_json('queue', 'list', '--failed', '-C', settled)
    [failed] = data['queues'][0]['messages']
    assert failed['to'] == ['bad@example.org']
    assert failed['from'] == 'zope@example.org'
    assert failed['attempts'][0]['code'] == 550
    assert failed['attempts'][0]['text'] == '5.1.1 no such user'
    assert failed['failed_at'].endswith('Z')
    _, data = mailout_json('queue', 'list', '--deferred', '-C', settled)
    [deferred] = data['queues'][0]['messages']
    assert deferred['next_attempt'] > deferred['queued_at']

    out = mailout('queue', 'list', '--deferred', '-C', settled).stdout
    assert '1 deferred message\n' in out
    assert f"  {deferred['id']}  deferred  " in out
    assert 'zope@example.org -> later@example.org  (1 attempt)' in out
    assert re.search(r'next attempt in (4m \d+s|5m); last: 20', out)


def test_queue_show(tmp_path, settled):
    """`queue show ID` (or a unique part of it) gives envelope, attempts
    and headers; an unknown ID exits 1."""
    [name] = files(tmp_path, 'failed')
    status, data = mailout_json('queue', 'show', name, '-C', settled)
    assert status == 0 and data['id'] == name
    [copy] = data['copies']
    assert copy['area'] == 'failed' and copy['to'] == ['bad@example.org']
    assert (copy['attempts'][0]['code'], copy['attempts'][0]['text']) == (
        550, '5.1.1 no such user')
    headers = dict(copy['headers'])
    assert headers['Subject'] == 'Hello'
    assert headers['To'] == 'bad@example.org'
    assert headers['Message-Id'].startswith('<')

    part = name.split('_')[1][:8]
    out = mailout('queue', 'show', part, '-C', settled).stdout
    assert out.startswith(f'id        {name}\n')
    assert '  to            bad@example.org\n' in out
    assert '    Subject: Hello\n' in out

    result = mailout('queue', 'show', 'nosuchid', '-C', settled)
    assert result.returncode == 1
    assert "no message 'nosuchid'" in result.stderr


def test_queue_retry_one_and_all_failed(tmp_path, settled, refusing_sink):
    """`retry ID` moves a deferred message to new/, `retry --all-failed`
    the failed ones; `process --once` then tries them at once."""
    [deferred] = files(tmp_path, 'deferred')
    status, data = mailout_json('queue', 'retry', deferred, '-C', settled)
    assert status == 0
    assert data['retried'] == [{'id': deferred, 'path': str(tmp_path / 'queue'),
                                'from': 'deferred', 'new_id': deferred}]
    assert files(tmp_path, 'new') == [deferred]

    result = mailout('queue', 'retry', '--all-failed', '-C', settled)
    assert result.returncode == 0
    [failed] = [n for n in files(tmp_path, 'new') if n != deferred]
    assert f'{failed}: failed/ -> new/' in result.stdout
    assert files(tmp_path, 'failed') == []

    _, data = mailout_json('process', '--once', '-C', settled)
    assert data['queues'][0]['handled'] == 2      # tried now, not in 5 min


def test_queue_retry_partial_failure_keeps_both_parts(tmp_path,
                                                      refusing_sink):
    """A message failed for one recipient and deferred for another is in
    failed/ and deferred/ under one ID: `retry ID` brings back both
    without one overwriting the other."""
    conf = queue_config(tmp_path, refusing_sink.port)
    queue = Queue.open(str(tmp_path / 'queue'))
    [name] = enqueue(queue, 'two',
                     to=('bad@example.org', 'later@example.org'),
                     fromaddr='zope@example.org', body='Hi.\r\n')
    mailout('process', '--once', '-C', conf)
    assert files(tmp_path, 'failed') == files(tmp_path, 'deferred') == [name]

    status, data = mailout_json('queue', 'retry', name, '-C', conf)
    assert status == 0
    assert len(data['retried']) == 2
    waiting = files(tmp_path, 'new')
    assert len(waiting) == 2 and name in waiting
    recipients = sorted(entry.toaddrs for entry in queue.entries('new'))
    assert recipients == [('bad@example.org',), ('later@example.org',)]


def test_queue_purge_refuses_without_yes_off_a_terminal(tmp_path, settled):
    """`purge` with no terminal and no --yes deletes nothing and exits 2."""
    [name] = files(tmp_path, 'failed')
    for args in (['--failed'], [name]):
        result = mailout('queue', 'purge', *args, '-C', settled,
                         stdin=subprocess.DEVNULL)
        assert result.returncode == 2, args
        assert 'without --yes: stdin is not a terminal' in result.stderr
    assert files(tmp_path, 'failed') == [name]


def test_queue_purge_asks_on_a_terminal(tmp_path, settled):
    """On a terminal `purge` asks; "n" keeps the message (exit 0: the
    operator's choice is no error), "y" deletes it."""
    [name] = files(tmp_path, 'failed')
    for answer, status in ((b'n\n', 0), (b'y\n', 0)):
        controller, terminal = pty.openpty()
        try:
            os.write(controller, answer)
            result = script('queue', 'purge', '--failed', '-C', settled,
                            stdin=terminal)
        finally:
            os.close(controller)
            os.close(terminal)
        assert result.returncode == status, result.stderr
        assert 'delete these 1 message(s) for good? [y/N]' in result.stderr
    assert 'nothing deleted' not in result.stderr
    assert f'deleted {name} (failed/' in result.stdout
    assert files(tmp_path, 'failed') == []


def test_queue_purge_failed_older_than(tmp_path, settled):
    """`purge --failed --older-than AGE` deletes only messages that failed
    longer ago; --dry-run shows them and deletes nothing."""
    [name] = files(tmp_path, 'failed')
    status, data = mailout_json('queue', 'purge', '--failed', '--older-than',
                                '1h', '--yes', '-C', settled)
    assert status == 0 and data['purged'] == []
    path = tmp_path / 'queue' / 'failed' / name
    two_hours_ago = time.time() - 7200
    os.utime(path, (two_hours_ago, two_hours_ago))
    result = mailout('queue', 'purge', '--failed', '--older-than', '1h',
                     '--dry-run', '-C', settled)
    assert result.returncode == 0
    assert result.stdout.startswith(f'would delete {name} (failed/')
    assert path.exists()
    status, data = mailout_json('queue', 'purge', '--failed', '--older-than',
                                '1h', '--yes', '-C', settled)
    assert status == 0
    assert [p['id'] for p in data['purged']] == [name]
    assert files(tmp_path, 'failed') == []
    assert len(files(tmp_path, 'deferred')) == 1        # left alone


def test_queue_purge_id(tmp_path, settled):
    """`purge ID --yes` deletes one message; ID with --older-than is a
    usage error."""
    [name] = files(tmp_path, 'deferred')
    result = mailout('queue', 'purge', name, '--older-than', '1d', '--yes',
                     '-C', settled)
    assert result.returncode == 2
    result = mailout('queue', 'purge', name, '--yes', '-C', settled)
    assert result.returncode == 0, result.stderr
    assert result.stdout == \
        f"deleted {name} (deferred/ of {tmp_path / 'queue'})\n"
    assert files(tmp_path, 'deferred') == []
    assert len(files(tmp_path, 'failed')) == 1


# -- check ----------------------------------------------------------------------

def test_check_reaches_relay_with_starttls_and_auth(tmp_path, start_sink,
                                                    certs):
    """`check` does EHLO, STARTTLS and AUTH against the relay, sends
    nothing, and exits 0."""
    sink = start_sink('--starttls', certs.cert, certs.key,
                      '--auth', 'zope:secret')
    conf = queue_config(tmp_path, sink.port, tls='starttls', extra=f'''
          ca-file {certs.ca}
          username zope
          password secret''')
    status, data = mailout_json('check', '-C', conf)
    assert status == 0, data
    [mailer] = data['mailers']
    [relay] = mailer['relays']
    assert relay['ok'] and relay['server'] == 'sink.test'
    assert relay['tls'].startswith('TLS') and relay['auth'] == 'zope'
    assert data['queues'][0]['ok']
    result = mailout('check', '-C', conf)
    assert result.returncode == 0
    assert f'  127.0.0.1:{sink.port}  ok: EHLO sink.test, TLS (TLSv1.' \
        in result.stdout
    assert ', AUTH as zope  (' in result.stdout
    assert result.stdout.endswith('check ok\n')
    assert sink.messages() == []


def test_check_lmtp_and_sendmail_mailers(tmp_path, start_sink):
    """`check` greets an LMTP server (LHLO) and leaves a sendmail-program
    mailer alone."""
    sink = start_sink('--lmtp')
    conf = write_config(tmp_path / 'lmtp.conf', f'''
        <lmtp-mailer lists>
          host 127.0.0.1:{sink.port}
        </lmtp-mailer>
        <sendmail-mailer local>
        </sendmail-mailer>
    ''')
    status, data = mailout_json('check', '-C', conf)
    assert status == 0, data
    lists, local = sorted(data['mailers'], key=lambda m: m['name'])
    [relay] = lists['relays']
    assert relay['ok'] and relay['port'] == sink.port
    assert local['checked'] is False


def test_check_names_a_down_relay(tmp_path, sink):
    """With one relay of a farm down, `check` says which and why, and exits
    1."""
    down = socket.socket()
    down.bind(('127.0.0.1', 0))
    down_port = down.getsockname()[1]
    down.close()                                    # nobody listens there
    conf = write_config(tmp_path / 'farm.conf',
                        smtp_mailer([sink.port, down_port]))
    result = mailout('check', '-C', conf)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f'  127.0.0.1:{sink.port}  ok: EHLO sink.test  (' in lines[2]
    assert lines[3] == (f'  127.0.0.1:{down_port}  FAILED: '
                        'ConnectionRefusedError: [Errno 111] Connection '
                        'refused')
    assert lines[-1] == 'check FAILED (1 problem)'
    status, data = mailout_json('check', '-C', conf)
    assert status == 1 and not data['ok']
    assert [r['ok'] for r in data['mailers'][0]['relays']] == [True, False]


def test_check_names_a_bad_auth(tmp_path, start_sink):
    """A wrong password: `check` says AUTH failed with the server's reply,
    and exits 1."""
    sink = start_sink('--auth', 'zope:secret')
    conf = queue_config(tmp_path, sink.port, extra='''
          username zope
          password wrong
          allow-plain-auth on''')
    status, data = mailout_json('check', '-C', conf)
    assert status == 1
    [relay] = data['mailers'][0]['relays']
    assert relay['error'].startswith('AUTH failed: 535 ')
    assert 'secret' not in json.dumps(data) and 'wrong' not in json.dumps(data)
    out = mailout('check', '-C', conf).stdout
    assert f'127.0.0.1:{sink.port}  FAILED: AUTH failed: 535 ' in out


# -- zope.conf ------------------------------------------------------------------

def zope_section(port):
    """A ``<mailout mailout>`` section for zope.conf: mailer 'relay' ->
    127.0.0.1:port, queued 'default' in the instance, processor off."""
    return '\n<mailout mailout>\n{}</mailout>\n'.format(config_text(
        port, '$INSTANCE/var/mailqueue', delivery_lines=('processor off',)))


def test_zope_conf_with_mailout_section(instance, sink):
    """-C names a zope.conf with %import mailout: Zope's own code loads it;
    check, send and queue status use its <mailout mailout> section."""
    conf = write_zope_conf(instance, zope_section(sink.port))
    status, data = mailout_json('check', '-C', conf)
    assert status == 0, data
    assert data['config']['source'] == f'{conf}, section <mailout mailout>'
    queue = os.path.realpath(instance / 'var' / 'mailqueue')
    assert data['queues'][0]['path'] == queue
    result = mailout('send', '-C', conf, '--from', 'zope@example.org',
                     '--to', 'ann@example.org')
    assert result.returncode == 0, result.stderr
    assert f'via queued delivery default ({queue})' in result.stdout
    assert len(sink.messages()) == 1
    _, data = mailout_json('queue', 'status', '-C', conf)
    assert data['queues'][0]['path'] == queue


def test_zope_conf_with_product_config(instance, config_file,
                                       sink):
    """<product-config mailout> config-file: the named file's settings."""
    conf = write_zope_conf(instance, f'''
<product-config mailout>
  config-file {config_file}
</product-config>
''', imports=False)
    status, data = mailout_json('check', '-C', conf)
    assert status == 0, data
    assert data['config']['source'].startswith(f'{config_file} (config-file')
    assert data['config']['deliveries'] == ['default', 'urgent']


def test_zope_conf_without_mailout(instance):
    """A zope.conf with no mailout configuration: exit 1, saying what to
    add."""
    conf = write_zope_conf(instance, '', imports=False)
    result = mailout('queue', 'status', '-C', conf)
    assert result.returncode == 1
    assert 'is a zope.conf without mailout configuration' in result.stderr
    assert '<product-config mailout>' in result.stderr


def test_zope_conf_without_zope(instance, sink):
    """Where Zope cannot be imported, a zope.conf fails with a message
    saying so (not a schema error)."""
    conf = write_zope_conf(instance, zope_section(sink.port))
    # The command's main() in a Python where importing Zope2 fails (a
    # None in sys.modules does that, whatever sys.path holds).
    result = subprocess.run(
        [sys.executable, '-c', 'import sys; sys.modules["Zope2"] = None; '
         'from mailout.cli import main; sys.exit(main())',
         'queue', 'status', '-C', conf],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert 'is a Zope zope.conf, but Zope cannot be imported' \
        in result.stderr


# -- hostile text in what the command prints (issue 9, items 18 and 20) --------

@pytest.mark.parametrize('option, value', [
    ('--subject', 'hi\r\nBcc: victim@example.org'),
    ('--subject', 'hi\rBcc: victim@example.org'),
    ('--from', 'ops@example.org\r\nBcc: victim@example.org'),
    ('--to', 'ann@example.org\nBcc: victim@example.org'),
])
def test_send_line_break_in_an_option_is_a_usage_error(config_file, sink,
                                                       option, value):
    """CR or LF in --subject, --from or --to: one clear line on stderr,
    exit 2, nothing sent (it was a traceback)."""
    options = {'--from': 'ops@example.org', '--to': 'ann@example.org',
               '--subject': 'hi', option: value}
    result = mailout('send', '-C', config_file,
                     *[word for pair in options.items() for word in pair])
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr
    assert result.stderr.count('\n') == 1, result.stderr
    assert f'error: {option} ' in result.stderr
    assert 'line break' in result.stderr
    assert sink.messages() == []


HOSTILE = ('\x1b', '\x07', '\x9b', '\x85', '\u202e', '\u2028', '\x7f')


def plant(tmp_path, area, envelope, message):
    """A queue file with the given envelope lines, as an older version or
    another program might have left it."""
    Queue.open(str(tmp_path / 'queue'))
    name = f'{time.time_ns()}.planted_1_1.host'
    data = ''.join(line + '\r\n' for line in envelope) + '\r\n' + message
    fd = os.open(tmp_path / 'queue' / area / name,
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data.encode())
    os.close(fd)
    return name


def test_queue_output_escapes_control_and_format_characters(tmp_path, sink):
    """Addresses, attempts and headers from a queue file are printed with
    controls, bidi overrides and separators escaped: never raw to a
    terminal, in text or JSON."""
    conf = queue_config(tmp_path, sink.port)
    name = plant(
        tmp_path, 'deferred',
        ['X-Mailout-From: a\x1b[2J@x.org',
         'X-Mailout-To: "b\x1b]0;owned\x07"@x.org',
         'X-Mailout-To: c\u202egpj.exe@x.org',
         'X-Mailout-Attempt: 2026-01-01T00:00:00Z 451 \x9b31mlater\x85'],
        'Subject: \x1b[31mred\x7f\r\nX-Line: a\u2028b\r\n\r\nbody\r\n')
    outputs = {}
    for args in (['queue', 'list'], ['queue', 'show', name],
                 ['queue', 'status']):
        result = mailout(*args, '-C', conf)
        assert result.returncode == 0, result.stderr
        outputs[' '.join(args[:2])] = result.stdout
        result = mailout(*args, '-C', conf, '--json')
        assert result.returncode == 0, result.stderr
        outputs[' '.join(args[:2]) + ' --json'] = result.stdout
    for command, output in outputs.items():
        shown = [c for c in HOSTILE if c in output]
        assert not shown, (command, shown, output)
    assert r'a\x1b[2J@x.org' in outputs['queue list']
    assert r'c\u202egpj.exe@x.org' in outputs['queue show']
    assert r'Subject: \x1b[31mred\x7f' in outputs['queue show']
    assert r'451 \x9b31mlater\x85' in outputs['queue status']
    data = json.loads(outputs['queue show --json'])
    assert data['copies'][0]['from'] == 'a\x1b[2J@x.org'   # exact for scripts


def test_send_report_escapes_the_relay_reply(tmp_path, start_sink):
    """A relay's reply is printed with its control characters escaped."""
    sink = start_sink('--refuse', 'bad@example.org=550 5.1.1 \x1b[2Jgone\x07')
    conf = queue_config(tmp_path, sink.port)
    result = mailout('send', '-C', conf, '--from', 'ops@example.org',
                     '--to', 'bad@example.org')
    assert result.returncode == 1, result.stderr
    assert r'\x1b[2Jgone' in result.stdout
    assert not [c for c in HOSTILE if c in result.stdout], result.stdout
