"""The on-disk queue: states, claims, recovery, zope.sendmail's files."""
import os
import subprocess
import sys
import time

import pytest
import transaction

from helpers import config_text
from helpers import enqueue
from helpers import files_in
from helpers import load_config
from mailout import queue as queue_module
from mailout.message import prepare
from mailout.queue import Queue
from mailout.queue import names

A, B = 'a@example.org', 'b@example.org'


@pytest.fixture
def queue(tmp_path):
    return Queue(str(tmp_path / 'q'))


def test_write_commit_claim_done(queue):
    """A message goes tmp/ -> new/ -> cur/ -> gone, one rename each."""
    name = queue.write(prepare('a@example.org', ['b@example.org'],
                               'Subject: x\r\n\r\nbody\r\n'))
    assert files_in(queue, 'tmp') == [name] and files_in(queue, 'new') == []
    queue.commit([name])
    assert files_in(queue, 'tmp') == [] and queue.waiting() == [name]
    claimed = queue.claim(name)
    assert queue.claim(name) is None            # only one claim wins
    message = queue.read(claimed)
    assert (message.fromaddr, message.toaddrs) == ('a@example.org',
                                                   ('b@example.org',))
    assert message.message.endswith(b'Subject: x\r\n\r\nbody\r\n')
    queue.done(claimed)
    assert all(files_in(queue, area) == [] for area in queue_module.AREAS)


def test_defer_keeps_history_and_waits(queue):
    """Deferring rewrites recipients and history; promote_due honours the
    time."""
    [name] = enqueue(queue, '0', fromaddr=A, to=(B, 'c@example.org'))
    claimed = queue.claim(name)
    until = time.time() + 100
    queue.defer(claimed, ('c@example.org',), '2026 451 later', until)
    assert (files_in(queue, 'deferred') == [name]
            and files_in(queue, 'cur') == [])
    assert queue.promote_due(now=until - 1) == 0
    assert queue.promote_due(now=until) == 1
    message = queue.read(queue.claim(name))
    assert message.toaddrs == ('c@example.org',)
    assert message.attempts == ('2026 451 later',)


def test_fail_keeps_message_intact(queue):
    """A failed message keeps its bytes, recipients and the reply."""
    [name] = enqueue(queue, '0', fromaddr=A, to=(B,))
    claimed = queue.claim(name)
    original = queue.read(claimed).message
    queue.fail(claimed, ('b@example.org',), '2026 550 no such user')
    assert files_in(queue, 'failed') == [name]
    with open(os.path.join(queue.path, 'failed', name), 'rb') as f:
        data = f.read()
    assert data.endswith(original)
    assert b'X-Mailout-Attempt: 2026 550 no such user\r\n' in data


def test_quarantine_unreadable(queue):
    """An unreadable file moves to failed/ as it is, with the reason."""
    path = os.path.join(queue.path, 'new', '1.1_x.host')
    with open(path, 'wb') as f:
        f.write(b'garbage without envelope')
    claimed = queue.claim('1.1_x.host')
    with pytest.raises(queue_module.QueueError):
        queue.read(claimed)
    queue.quarantine(claimed, 'no envelope')
    assert files_in(queue, 'failed') == ['1.1_x.host', '1.1_x.host.reason']


def test_recover_claim_of_dead_process(queue):
    """A claim whose process died goes back to new/."""
    [name] = enqueue(queue, '0', fromaddr=A, to=(B,))
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    claim = str(names.Claim(name, names.HOST, int(dead), 'deadbeef'))
    os.rename(os.path.join(queue.path, 'new', name),
              os.path.join(queue.path, 'cur', claim))
    assert queue.recover() == 1
    assert queue.waiting() == [name]


def test_recover_leaves_live_claims(queue):
    """Claims of this process (held now) and of live processes stay."""
    [name] = enqueue(queue, '0', fromaddr=A, to=(B,))
    claimed = queue.claim(name)
    assert queue.recover() == 0
    assert files_in(queue, 'cur') == [claimed]


def test_recover_stale_claim_of_own_pid(queue):
    """A claim with this pid but not held by this process (pid reused after
    a restart, as pid 1 in containers) goes back to new/."""
    [name] = enqueue(queue, '0', fromaddr=A, to=(B,))
    claim = str(names.Claim(name, names.HOST, os.getpid(), '0ldt0ken'))
    os.rename(os.path.join(queue.path, 'new', name),
              os.path.join(queue.path, 'cur', claim))
    assert queue.recover() == 1


def test_recover_other_host_after_lease(queue):
    """Another host's claim comes back only once its lease expired."""
    [name] = enqueue(queue, '0', fromaddr=A, to=(B,))
    claim = str(names.Claim(name, 'otherhost', 123, 'abcd'))
    os.rename(os.path.join(queue.path, 'new', name),
              os.path.join(queue.path, 'cur', claim))
    assert queue.recover() == 0
    later = time.time() + queue_module.CLAIM_LEASE + 1
    assert queue.recover(now=later) == 1


def test_recover_removes_unfinished_writes_of_dead_processes(queue):
    """tmp/ files of dead writers go; our own in-progress writes stay."""
    ours = queue.write(prepare('a@example.org', ['b@example.org'],
                               'Subject: x\r\n\r\n'))
    dead = str(names.TmpMessage(str(time.time_ns()),
                                names.Writer(999999999, '0ld'), 'abc', 'def',
                                names.HOST))
    open(os.path.join(queue.path, 'tmp', dead), 'w').close()
    queue.recover()
    assert files_in(queue, 'tmp') == [ours]


def test_zope_sendmail_queue_is_drained(tmp_path, sink):
    """A queue written by zope.sendmail's QueuedMailDelivery is delivered
    by mailout without loss."""
    from zope.sendmail.delivery import QueuedMailDelivery

    from mailout.factories import build_all
    path = str(tmp_path / 'q')
    legacy = QueuedMailDelivery(path)
    for i in range(3):
        legacy.send('old@example.org', ['ann@example.org', 'bob@example.org'],
                    f'From: old@example.org\nSubject: legacy {i}\n\nbody\n'
                    .encode())
    transaction.commit()
    assert len(os.listdir(os.path.join(path, 'new'))) == 3
    settings = load_config(config_text(sink.port, path))
    _, deliveries = build_all(settings)
    assert deliveries['default'].processor.run_once() == 3
    received = sink.messages()
    assert len(received) == 3
    for m in received:
        assert m['mail_from'] == 'old@example.org'
        assert m['rcpt_tos'] == ['ann@example.org', 'bob@example.org']
        assert b'\r\nSubject: legacy ' in m['data']
        assert b'X-Zope' not in m['data']
    assert sorted(m['data'].split(b'Subject: ')[1][:8] for m in received) \
        == [b'legacy 0', b'legacy 1', b'legacy 2']
    assert os.listdir(os.path.join(path, 'new')) == []


def test_commit_interrupted_among_renames_is_finished(tmp_path, queue):
    """A process killed among the renames of a multi-message commit: its
    marker makes recovery move the rest of the transaction to new/; the
    writes of an uncommitted transaction of the same process go."""
    envelope = prepare('a@example.org', ['b@example.org'],
                       'Subject: x\r\n\r\nbody\r\n')
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    committed = [queue.write(envelope, 'batch1') for _ in range(3)]
    uncommitted = queue.write(envelope, 'batch2')
    # As the dead process would have named them:
    renamed = {}
    for name in committed + [uncommitted]:
        theirs = name.replace(f'.{os.getpid()}-', f'.{dead}-')
        os.rename(os.path.join(queue.path, 'tmp', name),
                  os.path.join(queue.path, 'tmp', theirs))
        renamed[name] = theirs
    first = renamed[committed[0]]
    marker = str(names.TmpMessage.parse(first).marker(committed=True))
    open(os.path.join(queue.path, 'tmp', marker), 'w').close()
    os.rename(os.path.join(queue.path, 'tmp', first),
              os.path.join(queue.path, 'new', first))
    queue.recover()
    assert files_in(queue, 'new') == sorted(renamed[n] for n in committed)
    assert files_in(queue, 'tmp') == []


def test_predecessor_with_our_pid(queue):
    """A restarted process that got its predecessor's pid (pid 1 in a
    container) finishes the predecessor's committed batch and removes its
    uncommitted writes: the token tells them apart."""
    envelope = prepare('a@example.org', ['b@example.org'],
                       'Subject: x\r\n\r\nbody\r\n')
    committed = [queue.write(envelope, 'batch1') for _ in range(2)]
    uncommitted = queue.write(envelope, 'batch2')
    marker = str(names.TmpMessage.parse(committed[0]).marker(committed=True))
    open(os.path.join(queue.path, 'tmp', marker), 'w').close()
    os.rename(os.path.join(queue.path, 'tmp', committed[0]),
              os.path.join(queue.path, 'new', committed[0]))
    queue.token = 'restarted'           # as a new process with our pid
    queue.recover()
    assert files_in(queue, 'new') == sorted(committed)
    assert files_in(queue, 'tmp') == []
    assert uncommitted not in files_in(queue, 'new')


def test_zope_sendmail_dot_files_are_not_messages(queue):
    """zope.sendmail's .sending-/.rejected- files in new/ are ignored."""
    [name] = enqueue(queue, '0', fromaddr=A, to=(B,))
    for dot in ('.sending-', '.rejected-'):
        os.link(os.path.join(queue.path, 'new', name),
                os.path.join(queue.path, 'new', dot + name))
    assert queue.waiting() == [name]
    assert queue.status()['waiting'] == 1


def test_queued_at_only_for_our_names():
    """Our names carry nanoseconds; zope.sendmail's seconds are not read as
    such (a 1970 date would fail the message at once)."""
    ours = queue_module.QueuedMessage('1795601321903732885.1-t_b_u.h', 'a',
                                      ('b',), b'')
    theirs = queue_module.QueuedMessage('1795601321.1234.5678', 'a', ('b',),
                                        b'')
    assert abs(ours.queued_at - 1795601321.9) < 1
    assert theirs.queued_at is None


def test_relay_state_leftovers_are_removed(tmp_path):
    """A dot-file of a relays.json write whose process died before the
    rename is removed by recovery an hour later; a fresh one (a write in
    progress, maybe on another host) stays."""
    queue = Queue(str(tmp_path / 'q'))
    old = os.path.join(queue.path, '.relays.json.0123abcd.tmp')
    fresh = os.path.join(queue.path, '.relays.json.4567cdef.tmp')
    for path in (old, fresh):
        with open(path, 'w') as f:
            f.write('{')
    os.utime(old, (time.time() - 3700,) * 2)
    queue.recover()
    assert not os.path.exists(old) and os.path.exists(fresh)
