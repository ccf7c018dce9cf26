"""Staging sites and runaway mailings: ``hold on`` and ``redirect-to``
per delivery; ``queue hold|release`` and ``queue purge`` by queue id,
Message-Id, --all, --from, --to; against real queues and SMTP sinks."""
import logging
import os
import subprocess
import sys

import transaction

from helpers import areas
from helpers import config_text
from helpers import write_config
from mailout import config
from mailout.factories import build_all

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'mailout')
FROM = 'app@example.org'


def mailout(*args, **kw):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True,
                          timeout=60, **kw)


def configure(tmp_path, port, delivery_line=''):
    return write_config(tmp_path / 'mailout.conf', config_text(
        port, tmp_path / 'queue',
        delivery_lines=['processor off', delivery_line]))


def send(path, *messages):
    """Commit ``(from, to, subject)`` messages; the delivery."""
    _, deliveries = build_all(config.load(path), processors=False)
    delivery = deliveries['default']
    ids = [delivery.send(fromaddr, list(to), f'Subject: {subject}\r\n\r\nx')
           for fromaddr, to, subject in messages]
    transaction.commit()
    return delivery, ids


def test_hold_on_queues_and_never_sends(tmp_path, sink, caplog):
    """A delivery with ``hold on``: its processor moves the mail to held/
    and sends nothing; ``queue status`` says so; once hold is off,
    ``queue release`` sends what was held."""
    path = configure(tmp_path, sink.port, 'hold on')
    delivery, _ = send(path, (FROM, ['ann@example.org'], 'one'),
                       (FROM, ['bob@example.org'], 'two'))
    with caplog.at_level(logging.INFO, 'mailout'):
        result = mailout('process', '--once', '-C', path)
    assert result.returncode == 0, result.stderr
    assert sink.messages() == []
    assert len(areas(delivery.queue)['held']) == 2
    status = mailout('queue', 'status', '-C', path).stdout
    assert '  held         2  (hold on: default)' in status
    configure(tmp_path, sink.port)                  # hold off again
    result = mailout('queue', 'release', '--to', 'ann@example.org',
                     '-C', path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith('held/ -> new/\n1 message released\n')
    mailout('process', '--once', '-C', path)
    assert [m['rcpt_tos'] for m in sink.messages()] == [['ann@example.org']]
    assert len(areas(delivery.queue)['held']) == 1


def test_hold_on_is_logged_when_the_processor_starts(tmp_path, sink, caplog):
    """Holding is said in the log when a processor starts."""
    path = configure(tmp_path, sink.port, 'hold on')
    settings = config.load(path)
    from mailout.factories import build_processor
    _, deliveries = build_all(settings, processors=False)
    processor = build_processor(settings.deliveries['default'],
                                deliveries['default'].queue,
                                deliveries['default'].mailer)
    with caplog.at_level(logging.WARNING, 'mailout'):
        processor.start()
        processor.stop()
    assert any('hold on: mail is queued and held, never sent'
               in r.getMessage() for r in caplog.records)


def test_redirect_to_sends_everything_to_one_address(tmp_path, sink,
                                                     caplog):
    """``redirect-to``: every message goes to that address alone; its
    recipients are kept in X-Mailout-Original-To; status and the log say
    so."""
    with caplog.at_level(logging.WARNING, 'mailout'):
        path = configure(tmp_path, sink.port,
                         'redirect-to staging@example.org')
        delivery, _ = send(path, (FROM, ['ann@example.org',
                                         'bob@example.org'], 'hi'))
    assert any('redirect-to staging@example.org' in r.getMessage()
               for r in caplog.records)
    assert 'redirect     default: every message to staging@example.org' \
        in mailout('queue', 'status', '-C', path).stdout
    mailout('process', '--once', '-C', path)
    [received] = sink.messages()
    assert received['rcpt_tos'] == ['staging@example.org']
    assert received['data'].startswith(
        b'X-Mailout-Original-To: ann@example.org, bob@example.org\r\n')


def test_hold_release_and_purge_choose_messages(tmp_path, sink):
    """``hold`` by Message-Id and by --from; ``release --all``; ``purge
    --to`` with --dry-run first."""
    path = configure(tmp_path, sink.port)
    delivery, ids = send(path, (FROM, ['ann@example.org'], 'one'),
                         ('news@example.org', ['bob@example.org'], 'two'),
                         ('news@example.org', ['carl@example.org'], 'three'))
    assert mailout('queue', 'hold', f'<{ids[0]}>', '-C', path).returncode == 0
    assert len(areas(delivery.queue)['held']) == 1
    result = mailout('queue', 'hold', '--from', 'news@example.org', '-C',
                     path)
    assert result.stdout.endswith('2 messages held\n')
    assert areas(delivery.queue)['new'] == []
    assert mailout('queue', 'hold', '-C', path).returncode == 2
    result = mailout('queue', 'release', '--all', '-C', path)
    assert result.stdout.endswith('3 messages released\n')
    dry = mailout('queue', 'purge', '--to', 'carl@example.org', '--dry-run',
                  '-C', path)
    assert dry.stdout.startswith('would delete ') and dry.stdout.count(
        '\n') == 1
    result = mailout('queue', 'purge', '--to', 'carl@example.org', '--yes',
                     '-C', path)
    assert result.returncode == 0, result.stderr
    assert len(areas(delivery.queue)['new']) == 2
