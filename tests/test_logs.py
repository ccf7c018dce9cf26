"""Log lines lead to the queue: each names its message by Message-Id and
by queue id, keeps the reply code, and gives a retry as an ISO date-time.
"""
import logging
import re

import transaction

from helpers import config_text
from helpers import write_config
from mailout import config
from mailout.factories import build_all
from mailout.processor import Processor


def test_each_outcome_names_message_id_queue_id_and_reply_code(
        tmp_path, start_sink, caplog):
    """Sent, failed (550) and deferred (451) lines of one message."""
    sink = start_sink('--refuse', 'bad@example.org=550 5.1.1 no such user',
                      '--refuse', 'later@example.org=451 4.7.1 greylisted')
    path = write_config(tmp_path / 'mailout.conf', config_text(
        sink.port, tmp_path / 'queue', delivery_lines=['processor off']))
    _, deliveries = build_all(config.load(path))
    delivery = deliveries['default']
    message_id = delivery.send(
        'app@example.org',
        ['ann@example.org', 'bad@example.org', 'later@example.org'],
        'Subject: x\r\n\r\nHi.\r\n')
    transaction.commit()
    [queue_id] = delivery.queue.waiting()
    processor = Processor(delivery.queue, delivery.mailer)
    with caplog.at_level(logging.INFO, 'mailout.processor'):
        processor.run_once()
    lines = [r.getMessage() for r in caplog.records
             if r.name == 'mailout.processor']
    about = f'<{message_id}> (queue id {queue_id})'
    sent, failed, deferred = (
        [line for line in lines if word in line and about in line]
        for word in (': sent ', ' failed for ', ' deferred for '))
    assert len(sent) == 1 and sent[0].endswith('to ann@example.org')
    assert len(failed) == 1
    assert failed[0].endswith('bad@example.org: 550 5.1.1 no such user')
    assert len(deferred) == 1
    assert re.search(r'deferred for later@example\.org until '
                     r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: 451 4\.7\.1 '
                     r'greylisted$', deferred[0]), deferred[0]


def test_the_queue_commands_take_a_message_id(tmp_path, start_sink):
    """What a log line names, the queue commands find: ``queue show`` and
    ``queue purge`` take a Message-Id with or without angle brackets;
    ``queue list`` shows each message's Message-Id and Subject; ``show
    --body`` prints the message."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(sys.executable), 'mailout')

    def mailout(*args):
        return subprocess.run([script, *args], capture_output=True,
                              text=True, timeout=60)
    path = write_config(tmp_path / 'mailout.conf', config_text(
        start_sink().port, tmp_path / 'queue', delivery_lines=['processor off']))
    _, deliveries = build_all(config.load(path))
    message_id = deliveries['default'].send(
        'app@example.org', ['ann@example.org'],
        'Subject: =?utf-8?q?R=C3=A9union?= at noon\r\n\r\nSee you.\r\n')
    transaction.commit()
    [queue_id] = deliveries['default'].queue.waiting()
    listed = mailout('queue', 'list', '-C', path).stdout
    assert f'      <{message_id}>  Réunion at noon\n' in listed
    for wanted in (message_id, f'<{message_id}>'):
        shown = mailout('queue', 'show', wanted, '-C', path)
        assert shown.returncode == 0, shown.stderr
        assert f'id        {queue_id}\n' in shown.stdout
    body = mailout('queue', 'show', message_id, '--body', '-C', path).stdout
    assert '  message\n' in body and '    See you.\n' in body
    missing = mailout('queue', 'show', '<nobody@example.org>', '-C', path)
    assert missing.returncode == 1
    purged = mailout('queue', 'purge', f'<{message_id}>', '--yes', '-C',
                     path)
    assert purged.returncode == 0, purged.stderr
    assert deliveries['default'].queue.waiting() == []
