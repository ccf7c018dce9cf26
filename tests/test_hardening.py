"""Faults made real against the queue's promises (issue 9): a full disk or
no inodes on a small tmpfs, areas removed or replaced by links under a
running process, odd files planted in the queue, a commit whose second
phase fails, the clock stepping back.

The tmpfs tests mount file systems and so need root: they are skipped
elsewhere, but fail under CI (``CI=true``), which runs as root.
"""
import errno
import logging
import os
import re
import socket
import stat
import subprocess
import threading
import time

import pytest
import transaction

from helpers import config_text
from helpers import files_in
from helpers import write_config
from mailout.factories import build_all
from mailout import config
from mailout.message import prepare
from mailout.processor import Processor
from mailout.queue import Queue
from mailout.queue import QueueError
from test_cli import mailout

FROM = 'app@example.org'


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems: ``tmpfs(size='256k', inodes=50)``
    returns the mount point; unmounted after the test."""
    mounted = []

    def mount(size='1m', inodes=1000):
        point = tmp_path / f'tmpfs{len(mounted)}'
        point.mkdir()
        result = subprocess.run(
            ['mount', '-t', 'tmpfs', '-o',
             f'size={size},nr_inodes={inodes},mode=0700', 'tmpfs',
             str(point)], capture_output=True, text=True)
        if result.returncode:
            if os.environ.get('CI'):
                pytest.fail(f'cannot mount a tmpfs in CI: {result.stderr}')
            pytest.skip(f'cannot mount a tmpfs (needs root): '
                        f'{result.stderr.strip()}')
        mounted.append(point)
        return point
    yield mount
    for point in reversed(mounted):
        subprocess.run(['umount', '-l', str(point)])


def fill(directory):
    """Use up the space of ``directory``'s file system; return the file
    that did, to be removed when the fault should clear."""
    path = os.path.join(directory, 'filler')
    with open(path, 'wb', buffering=0) as f:
        try:
            while True:
                f.write(b'x' * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return path


def use_up_inodes(directory):
    """Create empty files until no inode is left."""
    for i in range(100000):
        try:
            open(os.path.join(directory, f'inode{i}'), 'w').close()
        except OSError as e:
            assert e.errno == errno.ENOSPC
            return
    raise AssertionError('inodes never ran out')


def sections(queue_path, port, mailer_lines='', delivery_lines=''):
    """This module's configuration: SMTP mailer 'relay' talking to the sink
    at ``port`` (no TLS, 2 s timeout, no rest) and queued delivery
    'default' (processor off)."""
    return config_text(
        port, queue_path,
        mailer_lines=('timeout 2s', 'down-time 0', mailer_lines),
        delivery_lines=('processor off', delivery_lines))


def mailout_text(queue_path, port, **lines):
    """`sections` as a whole standalone configuration."""
    return f'<mailout>\n{sections(queue_path, port, **lines)}</mailout>\n'


def queue_config(tmp_path, queue_path, port=25, **lines):
    """`sections` in a standalone file for the mailout command."""
    return write_config(tmp_path / 'mailout.conf',
                        sections(queue_path, port, **lines))


def setup(queue_path, port, **lines):
    """The queued delivery of `sections`, its processor (no threads) and
    queue, all built from real configuration."""
    settings = config.loads(mailout_text(queue_path, port, **lines))
    _, deliveries = build_all(settings)
    delivery = deliveries['default']
    processor = Processor(delivery.queue, delivery.mailer,
                          poll_interval=0.05)
    return delivery, processor, delivery.queue


def text(subject, to='ann@example.org'):
    return f'From: {FROM}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHi.\r\n'


def subjects(sink):
    return sorted(m['data'].split(b'Subject: ', 1)[1].split(b'\r\n', 1)[0]
                  .decode() for m in sink.messages())


class Resource:
    """A resource manager that commits with the transaction: a stand-in for
    ZODB, whose changes stay once its tpc_finish ran.  ``vote`` and
    ``finish`` run at those phases; ``sort`` places it before ('a') or
    after ('~~') mailout's data manager."""

    def __init__(self, sort='a', vote=None, finish=None):
        self.sort, self.vote, self.finish = sort, vote, finish
        self.committed = False

    def sortKey(self):
        return self.sort

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        if self.vote:
            self.vote()

    def tpc_finish(self, txn):
        self.committed = True
        if self.finish:
            self.finish()

    def tpc_abort(self, txn):
        pass

    abort = tpc_abort


# -- 2. the second commit phase ------------------------------------------------

def test_no_inodes_after_the_vote_loses_nothing(tmp_path, tmpfs, sink):
    """Inodes run out after mailout voted: the commit marker was made at
    the vote, so the commit completes and the mail goes out."""
    queue_path = tmpfs(inodes=200) / 'queue'
    delivery, processor, queue = setup(queue_path, sink.port)
    zodb = Resource('a')
    transaction.get().join(zodb)
    transaction.get().join(Resource(
        '~~', vote=lambda: use_up_inodes(queue_path.parent)))
    delivery.send(FROM, ['ann@example.org'], text('one'))
    delivery.send(FROM, ['ann@example.org'], text('two'))
    transaction.commit()
    assert zodb.committed
    assert len(files_in(queue, 'new')) == 2 and files_in(queue, 'tmp') == []
    assert processor.run_once() == 2
    assert subjects(sink) == ['one', 'two']


@pytest.mark.parametrize('count', [1, 2])
def test_new_removed_in_the_second_phase(tmp_path, sink, caplog, count):
    """new/ disappears between the vote and tpc_finish: commit() does not
    raise, nothing is discarded, the error is logged loudly, and recovery
    recreates new/ and delivers every message once."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    new = os.path.join(queue.path, 'new')
    zodb = Resource('a')
    transaction.get().join(zodb)
    transaction.get().join(Resource('~~', vote=lambda: os.rmdir(new)))
    for i in range(count):
        delivery.send(FROM, ['ann@example.org'], text(f'm{i}'))
    with caplog.at_level(logging.CRITICAL, 'mailout'):
        transaction.commit()
    assert zodb.committed
    assert any(r.levelno == logging.CRITICAL and 'could not be moved'
               in r.getMessage() for r in caplog.records)
    assert processor.run_once() == count
    assert subjects(sink) == [f'm{i}' for i in range(count)]
    assert files_in(queue, 'tmp') == files_in(queue, 'new') == []


def test_an_earlier_resource_failing_to_finish_discards_no_mail(tmp_path,
                                                                 sink):
    """Every resource voted yes, then another one's tpc_finish failed:
    that one's changes may be in, so the mail is committed, not
    discarded."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)

    def broken():
        raise OSError('storage trouble in the second phase')
    transaction.get().join(Resource('a', finish=broken))
    delivery.send(FROM, ['ann@example.org'], text('kept'))
    with pytest.raises(OSError):
        transaction.commit()
    transaction.abort()
    assert processor.run_once() == 1
    assert subjects(sink) == ['kept']


def test_a_later_vote_refused_still_discards(tmp_path, sink):
    """Promise 1 holds: a resource voting after mailout refuses, nothing
    is sent and no file is left."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)

    def refuse():
        raise ValueError('vote refused')
    transaction.get().join(Resource('~~', vote=refuse))
    delivery.send(FROM, ['ann@example.org'], text('never'))
    delivery.send(FROM, ['ann@example.org'], text('never2'))
    with pytest.raises(ValueError):
        transaction.commit()
    transaction.abort()
    assert all(files_in(queue, a) == [] for a in ('tmp', 'new'))


# -- 3. an outcome that cannot be recorded -----------------------------------

def test_deferral_on_a_full_disk(tmp_path, tmpfs, start_sink):
    """The deferral cannot be written (disk full): the claim is released,
    no .rewrite is left, the recipient that accepted never gets a second
    copy and the other gets it once the fault clears."""
    sink = start_sink('--rcpt-reply', '451 4.3.0 later', '--faults', '1')
    delivery, processor, queue = setup(tmpfs(size='256k') / 'queue',
                                       sink.port)
    delivery.send(FROM, ['ann@example.org', 'bob@example.org'], text('x'))
    transaction.commit()
    filler = fill(os.path.dirname(queue.path))
    assert processor.run_once() == 1
    assert [m['rcpt_tos'] for m in sink.messages()] == [['bob@example.org']]
    assert files_in(queue, 'cur') == [] and files_in(queue, 'tmp') == []
    assert len(files_in(queue, 'deferred') + files_in(queue, 'new')) == 1
    os.unlink(filler)
    queue.promote_due(now=time.time() + 10 ** 6)
    assert processor.run_once() == 1
    assert sorted(r for m in sink.messages() for r in m['rcpt_tos']) == \
        ['ann@example.org', 'bob@example.org']
    assert all(files_in(queue, a) == [] for a in ('new', 'cur', 'deferred',
                                               'failed', 'tmp'))


def test_quarantine_on_a_full_disk_leaves_no_reason_file(tmp_path, tmpfs,
                                                         sink):
    """An unreadable file cannot be quarantined (no space for its reason):
    it is released, not held, and no partial .reason is left; once space
    is back it lands in failed/ with its reason."""
    delivery, processor, queue = setup(tmpfs(size='256k') / 'queue',
                                       sink.port)
    with open(os.path.join(queue.path, 'new', '1.garbage'), 'wb') as f:
        f.write(b'no envelope here')
    filler = fill(os.path.dirname(queue.path))
    processor.run_once()
    assert files_in(queue, 'cur') == [] and files_in(queue, 'failed') == []
    os.unlink(filler)
    queue.promote_due(now=time.time() + 10 ** 6)
    processor.run_once()
    assert files_in(queue, 'failed') == ['1.garbage', '1.garbage.reason']


def test_done_that_cannot_unlink_is_not_sent_again(tmp_path, tmpfs, sink):
    """Settled recipients are marked in the file itself: a message whose
    every recipient was marked is removed, not sent again."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    delivery.send(FROM, ['ann@example.org'], text('once'))
    transaction.commit()
    [name] = queue.waiting()
    claimed = queue.claim(name)
    queue.release(claimed, ('ann@example.org',), time.time() - 1)
    queue.promote_due()
    processor.run_once()
    assert sink.messages() == []
    assert all(files_in(queue, a) == [] for a in ('new', 'cur', 'deferred'))


# -- 5. the clock stepping back ------------------------------------------------

def test_clock_step_back_keeps_retries_and_recovery(tmp_path, sink,
                                                    monkeypatch):
    """The wall clock steps back an hour under a running processor: a due
    retry still goes out within a few poll intervals."""
    delivery, processor, queue = setup(
        tmp_path / 'queue', sink.port,
        delivery_lines='min-backoff 1s\nmax-backoff 60s')
    processor = Processor(queue, delivery.mailer, poll_interval=0.05,
                          retry=type(processor.retry)(1, 60, 3600))
    delivery.send(FROM, ['ann@example.org'], text('retry'))
    transaction.commit()
    [name] = queue.waiting()
    queue.defer(queue.claim(name), ('ann@example.org',), 'x 451 later',
                time.time() + 0.3)
    processor.start()
    time.sleep(0.2)                 # the processor has run maintenance
    real = time.time
    monkeypatch.setattr(time, 'time', lambda: real() - 3600)
    assert len(sink.wait_for(1, timeout=5)) == 1


# -- 6. the queue directory removed under a running process -------------------

def test_queue_removed_and_recreated_under_a_running_process(tmp_path, sink,
                                                             caplog):
    """An operator removes the queue directory and makes an empty one: the
    next commit recreates the areas (0700, logged) and its mail goes
    out."""
    import shutil
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    shutil.rmtree(queue.path)
    os.mkdir(queue.path)
    with caplog.at_level(logging.WARNING, 'mailout'):
        delivery.send(FROM, ['ann@example.org'], text('after'))
        transaction.commit()
        assert processor.run_once() == 1
    assert subjects(sink) == ['after']
    assert any('created it again' in r.getMessage() for r in caplog.records)
    for area in ('tmp', 'new', 'cur', 'deferred', 'failed'):
        mode = os.stat(os.path.join(queue.path, area)).st_mode
        assert stat.S_IMODE(mode) == 0o700


def test_check_reports_a_queue_removed_and_recreated(tmp_path, sink):
    """``mailout check`` fails and names the problem when a queue's areas
    are gone (the directory was removed and made again), linked or open to
    others."""
    import shutil
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    config_path = queue_config(tmp_path, queue.path, sink.port)
    assert mailout('check', '--config', config_path).returncode == 0
    shutil.rmtree(queue.path)
    os.mkdir(queue.path, 0o700)
    result = mailout('check', '--config', config_path)
    assert result.returncode == 1
    assert f'{queue.path}/new is missing' in result.stdout + result.stderr
    Queue(queue.path)
    os.chmod(os.path.join(queue.path, 'cur'), 0o755)
    result = mailout('check', '--config', config_path)
    assert result.returncode == 1
    assert 'cur has mode 755, not 700' in result.stdout + result.stderr


# -- 7, 8, 9. what may be found in a queue -------------------------------------

def plant(queue, area, name, data=None):
    path = os.path.join(queue.path, area, name)
    with open(path, 'wb') as f:
        f.write(data)
    return path


def run_with_deadline(function, seconds=20):
    """Run ``function`` in a thread; fail if it blocks past ``seconds``."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function()),
                              daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f'{function} blocked'
    return result[0] if result else None


def test_empty_zope_recipients_go_to_failed_with_a_reason(tmp_path, sink):
    """A zope.sendmail file with an empty X-Zope-To: is not deleted
    silently: it lands in failed/ with a reason."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    plant(queue, 'new', '1700000000.1234.5',
          b'X-Zope-From: a@example.org\nX-Zope-To: \nSubject: x\n\nbody\n')
    processor.run_once()
    assert files_in(queue, 'failed') == ['1700000000.1234.5',
                                      '1700000000.1234.5.reason']
    reason = open(os.path.join(queue.path, 'failed',
                               '1700000000.1234.5.reason')).read()
    assert 'recipients' in reason


def test_odd_entries_never_block_or_stick(tmp_path, sink):
    """A directory, a FIFO, a socket, a link and a malformed zope.sendmail
    file in new/: none blocks the processor or stays claimed; each goes
    to failed/ with a reason; good mail still goes out, and queue list
    shows them all without hanging."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    new = os.path.join(queue.path, 'new')
    os.mkdir(os.path.join(new, '1.dir'))
    os.mkfifo(os.path.join(new, '2.fifo'))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(os.path.join(new, '3.socket'))
    outside = tmp_path / 'outside.txt'
    outside.write_bytes(b'X-Mailout-From: a@example.org\r\nX-Mailout-To: '
                        b'victim@example.org\r\n\r\nSubject: secret\r\n\r\n')
    os.symlink(outside, os.path.join(new, '4.link'))
    plant(queue, 'new', '5.zope', b'X-Zope-From: a@example.org\nbroken')
    delivery.send(FROM, ['ann@example.org'], text('good'))
    transaction.commit()
    assert run_with_deadline(processor.run_once) == 6
    assert subjects(sink) == ['good']
    assert files_in(queue, 'cur') == [] and files_in(queue, 'new') == []
    failed = files_in(queue, 'failed')
    for name in ('1.dir', '2.fifo', '3.socket', '4.link', '5.zope'):
        assert name in failed and name + '.reason' in failed
    config_path = queue_config(tmp_path, queue.path, sink.port)
    result = mailout('queue', 'list', '--failed', '--config', config_path)
    assert result.returncode == 0, result.stderr
    assert 'a FIFO' in result.stdout and 'a symbolic link' in result.stdout


def test_odd_names_in_tmp_and_cur_never_stop_recovery(tmp_path, sink, caplog):
    """Files with names mailout never makes in tmp/ and cur/ are left
    alone with one log line each; recovery and delivery go on."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    odd = {'tmp': ['1.2-3-4_5_6.host', 'junk', '1.99999999999999999999-a_b_c.h',
                   'x,y.rewrite', '0-a_b.h.commit'],
           'cur': ['x,host,99999999999999999999,t', 'a,b', 'n,h,0,t',
                   'n,h,-1,t', 'plain']}
    for area, names in odd.items():
        for name in names:
            plant(queue, area, name, b'whatever')
    delivery.send(FROM, ['ann@example.org'], text('still'))
    transaction.commit()
    with caplog.at_level(logging.WARNING, 'mailout'):
        for _ in range(3):
            queue.recover()
        assert processor.run_once() == 1
    assert subjects(sink) == ['still']
    for area, names in odd.items():
        assert sorted(names) == files_in(queue, area)
        for name in names:
            assert sum(name in r.getMessage() for r in caplog.records) == 1


# -- 12. a full disk during the commit -----------------------------------------

def test_disk_full_during_the_vote_leaves_no_partial_file(tmp_path, tmpfs,
                                                          sink):
    """A message larger than the free space: the commit raises, and tmp/
    keeps nothing of it."""
    delivery, processor, queue = setup(tmpfs(size='256k') / 'queue',
                                       sink.port)
    delivery.send(FROM, ['ann@example.org'], text('small'))
    body = ('x' * 70 + '\r\n') * 5000          # ~360 KB
    delivery.send(FROM, ['ann@example.org'], text('big') + body)
    with pytest.raises(OSError) as raised:
        transaction.commit()
    assert raised.value.errno == errno.ENOSPC
    transaction.abort()
    assert files_in(queue, 'tmp') == [] and files_in(queue, 'new') == []


# -- 13. inspecting a read-only queue ------------------------------------------

def test_inspecting_a_read_only_queue(tmp_path, tmpfs, sink):
    """queue status and queue list work on a queue mounted read-only."""
    point = tmpfs()
    delivery, processor, queue = setup(point / 'queue', sink.port)
    delivery.send(FROM, ['ann@example.org'], text('waiting'))
    transaction.commit()
    subprocess.run(['mount', '-o', 'remount,ro', str(point)], check=True)
    config_path = queue_config(tmp_path, queue.path, sink.port)
    for command in ('status', 'list'):
        result = mailout('queue', command, '--config', config_path)
        assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r'waiting +1\n', mailout(
        'queue', 'status', '--config', config_path).stdout)


# -- 14. process --once ----------------------------------------------------------

def test_process_once_uses_the_connections_and_ends(tmp_path, start_sink):
    """``process --once`` delivers over the configured connections, and
    with no backoff, no rest and a relay that defers everything slowly it
    still ends, leaving the deferred messages for a later run."""
    sink = start_sink('--data-delay', '0.05')
    config_path = queue_config(tmp_path, tmp_path / 'queue', sink.port,
                               delivery_lines='connections 4')
    queue = Queue(str(tmp_path / 'queue'))
    queue.commit([queue.write(prepare(FROM, ['ann@example.org'],
                                      text(f'm{i}'))) for i in range(40)])
    result = mailout('process', '--once', '--config', config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len({m['peer'] for m in sink.messages()}) == 4

    slow = start_sink('--data-delay', '0.05', '--data-reply', '451 later')
    queue_config(tmp_path, tmp_path / 'queue', slow.port,
                 delivery_lines='connections 2\nmin-backoff 0')
    queue.commit([queue.write(prepare(FROM, ['ann@example.org'],
                                      text(f'd{i}'))) for i in range(5)])
    result = mailout('process', '--once', '--config', config_path)
    assert result.returncode == 1
    assert '5 deferred' in result.stdout


# -- 15. links and owners -------------------------------------------------------

def test_a_symlinked_failed_area_is_refused(tmp_path):
    """failed/ replaced by a link to another directory: purge and retry
    refuse, and not one file of that directory is touched."""
    queue = Queue(str(tmp_path / 'queue'))
    victim = tmp_path / 'victim'
    victim.mkdir()
    (victim / 'precious').write_text('keep me')
    failed = os.path.join(queue.path, 'failed')
    os.rmdir(failed)
    os.symlink(victim, failed)
    config_path = queue_config(tmp_path, queue.path)
    for command in (['purge', '--failed', '--yes'],
                    ['retry', '--all-failed']):
        result = mailout('queue', *command, '--config', config_path)
        assert result.returncode != 0
        assert 'symbolic link' in result.stderr, result.stderr
    assert os.listdir(victim) == ['precious']
    with pytest.raises(QueueError):
        Queue(queue.path)


def test_a_planted_reason_link_is_not_followed(tmp_path, sink):
    """A link planted at failed/NAME.reason: quarantine writes a reason of
    its own elsewhere and leaves the link's target alone."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    target = tmp_path / 'target'
    target.write_text('untouched')
    os.symlink(target, os.path.join(queue.path, 'failed', '9.bad.reason'))
    plant(queue, 'new', '9.bad', b'no envelope')
    processor.run_once()
    assert target.read_text() == 'untouched'
    assert '9.bad+2' in files_in(queue, 'failed')


def test_modes_whatever_the_umask(tmp_path, sink):
    """With umask 0 areas are 0700 and files 0600; an area left 0755 is
    set back to 0700."""
    old = os.umask(0)
    try:
        delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
        os.chmod(os.path.join(queue.path, 'failed'), 0o755)
        delivery.send(FROM, ['ann@example.org'], text('m'))
        transaction.commit()
        queue.recover()
    finally:
        os.umask(old)
    for area in ('', 'tmp', 'new', 'cur', 'deferred', 'failed'):
        assert stat.S_IMODE(os.stat(os.path.join(queue.path, area))
                            .st_mode) == 0o700
    [name] = files_in(queue, 'new')
    assert stat.S_IMODE(os.stat(os.path.join(queue.path, 'new', name))
                        .st_mode) == 0o600


def test_an_area_of_another_owner_is_refused(tmp_path):
    """An area that belongs to another user is refused for writing (the
    mailout command run as root must not act on it), but may be
    inspected."""
    if os.geteuid() != 0:
        pytest.skip('needs root to give a directory away')
    queue = Queue(str(tmp_path / 'queue'))
    os.chown(os.path.join(queue.path, 'failed'), 65534, 65534)
    with pytest.raises(QueueError, match='belongs to uid 65534'):
        Queue(queue.path)
    Queue(queue.path, writable=False).entries('failed')


# -- 11. a long-running mailout process ------------------------------------------

def test_process_daemon_memory_stays_flat():
    """What ``mailout process`` keeps about the messages it handled stays
    the same size from 10,000 to 100,000 events: counts, not a record of
    each."""
    import tracemalloc
    import zope.event
    from mailout.cli.process import Tracker
    from mailout.processor import MailDeferredEvent
    from mailout.processor import MailSentEvent

    def notify(count):
        for i in range(count):
            about = (f'{i}.x@example.org', FROM, ('ann@example.org',),
                     'default', f'{i}.queue-name')
            zope.event.notify(MailDeferredEvent(*about, (451, 'later'))
                              if i % 10 == 0 else MailSentEvent(*about))
    with Tracker() as tracker:
        tracemalloc.start()
        notify(10000)
        before = tracemalloc.get_traced_memory()[0]
        notify(90000)
        growth = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    assert tracker.counts() == {'sent': 90000, 'deferred': 10000,
                                'failed': 0}
    assert growth < 64 * 1024, f'{growth} bytes for 90,000 more events'


# -- found by an adversarial review of the above --------------------------------

def test_one_bad_entry_never_stops_recovery(tmp_path, sink):
    """A directory in tmp/ named like a dead writer's message (unlink
    fails) is skipped: recovery, retries and delivery go on."""
    from mailout.queue.names import HOST
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    os.mkdir(os.path.join(queue.path, 'tmp', '1700000000000000000.'
                          f'999999-deadbeef_b_u.{HOST}'))
    delivery.send(FROM, ['ann@example.org'], text('deferred'))
    transaction.commit()
    [name] = queue.waiting()
    queue.defer(queue.claim(name), ('ann@example.org',), 'x 451 later',
                time.time() - 10)
    delivery.send(FROM, ['ann@example.org'], text('new'))
    transaction.commit()
    assert processor.run_once() == 2
    assert subjects(sink) == ['deferred', 'new']


def test_a_transient_read_error_is_no_reason_to_fail(tmp_path, sink):
    """No file descriptor left when the message is read (EMFILE, in a
    child with a low RLIMIT_NOFILE): the message is tried again later,
    not moved to failed/."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    delivery.send(FROM, ['ann@example.org'], text('later'))
    transaction.commit()
    script = f'''
import os, resource
from mailout import queue as queue_module
from mailout.queue import files
from mailout.processor import Processor
queue = queue_module.Queue({queue.path!r})
claimed = queue.claim(queue.waiting()[0])
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
read = files.read_regular

def read_while_out_of_descriptors(path, *args):
    hog = []
    try:
        while True:
            hog.append(os.open('/dev/null', os.O_RDONLY))
    except OSError:
        pass
    try:
        return read(path, *args)
    finally:            # the pressure passes
        for fd in hog:
            os.close(fd)
files.read_regular = read_while_out_of_descriptors
Processor(queue, mailer=None).deliver(claimed)
'''
    result = subprocess.run([os.sys.executable, '-c', script],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert 'Too many open files' in result.stderr
    assert files_in(queue, 'failed') == [] and files_in(queue, 'cur') == []
    queue.promote_due(now=time.time() + 10 ** 6)
    assert processor.run_once() == 1
    assert subjects(sink) == ['later']


def test_names_with_commas(tmp_path, sink):
    """Maildir++ names (``NAME,S=61``) are claimed, deferred and recovered
    under their whole name: two never overwrite each other."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    names = ['1700000000.M1P2.host,S=60', '1700000000.M1P2.host,S=61']
    for name in names:
        plant(queue, 'new', name, b'X-Zope-From: a@example.org\n'
              b'X-Zope-To: ann@example.org\nSubject: ' + name.encode()
              + b'\n\nhi\n')
    for name in names:
        queue.defer(queue.claim(name), ('ann@example.org',), 'x 451', 0)
    assert files_in(queue, 'deferred') == names
    queue.promote_due()
    claimed = queue.claim(names[0])
    queue.forget(claimed)                   # its owner "died"
    assert queue.recover() == 1
    assert processor.run_once() == 2
    assert len(sink.messages()) == 2


def test_release_marks_every_recipient_of_a_large_envelope(tmp_path, sink):
    """Settled recipients are marked however long the envelope: after a
    release of 25,000 delivered recipients none is left to send."""
    delivery, processor, queue = setup(tmp_path / 'queue', sink.port)
    recipients = [f'user{i:06d}.{"x" * 40}@example.org' for i in range(25000)]
    queue.commit([queue.write(prepare(FROM, recipients, text('many')))])
    [name] = queue.waiting()
    queue.release(queue.claim(name), tuple(recipients), 0)
    queue.promote_due()
    assert queue.read(queue.claim(name)).toaddrs == ()


def test_direct_mail_waits_for_resources_that_commit_in_their_vote(
        tmp_path, sink):
    """A one-phase resource that commits in its vote (zope.sqlalchemy's
    sort key) and fails: a direct delivery has sent nothing."""
    from helpers import direct_delivery
    delivery = direct_delivery(sink.port)

    def refuse():
        raise ValueError('COMMIT failed')
    transaction.get().join(Resource('~sqlalchemy:1', vote=refuse))
    delivery.send(FROM, ['ann@example.org'], text('not yet'))
    with pytest.raises(ValueError):
        transaction.commit()
    transaction.abort()
    assert sink.messages() == []


def test_containers_sharing_a_host_name_keep_their_writes(tmp_path, sink):
    """Two processes in their own pid namespaces (containers with the
    host's network and name, each Zope pid 1): recovery in one never
    takes the other's voted files for a dead predecessor's."""
    queue_path = str(tmp_path / 'queue')
    Queue(queue_path)
    script = '''
import os, sys, time
from mailout.message import prepare
from mailout.queue import Queue
queue, role = Queue(sys.argv[1]), sys.argv[2]
flag = os.path.join(os.path.dirname(sys.argv[1]), 'voted')
if role == 'writer':
    names = [queue.write(prepare('a@example.org', ['ann@example.org'],
                                 'Subject: x\\r\\n\\r\\nhi\\r\\n'), 'batch')
             for _ in range(2)]
    queue.prepare(names)
    open(flag, 'w').close()
    time.sleep(1)
    queue.commit(names)
else:
    while not os.path.exists(flag):
        time.sleep(0.02)
    queue.recover()
print(os.getpid())
'''
    children = [subprocess.Popen(
        ['unshare', '--pid', '--fork', '--mount-proc', os.sys.executable,
         '-c', script, queue_path, role], stdout=subprocess.PIPE, text=True,
        stderr=subprocess.PIPE) for role in ('writer', 'recoverer')]
    outputs = [child.communicate(timeout=30) for child in children]
    if any(child.returncode for child in children):
        if not os.environ.get('CI') and 'unshare' in outputs[0][1]:
            pytest.skip(f'cannot make a pid namespace: {outputs[0][1]}')
        pytest.fail(str(outputs))
    assert [out.strip() for out, _ in outputs] == ['1', '1']
    assert len(files_in(queue_path, 'new')) == 2


def test_permission_denied_while_recording_as_a_non_root_user(start_sink):
    """A processor running as an ordinary user (a child that drops root):
    deferred/ and failed/ turn read-only while a message is on the wire.
    The outcome cannot be recorded: the claim is released (not held), the
    recipient who got it is never sent to again, and once the next
    recovery has set the modes back, the other recipient gets it."""
    if os.geteuid() != 0:
        pytest.skip('needs root to start a child as another user')
    import shutil
    import tempfile
    sink = start_sink('--rcpt-reply', '451 4.3.0 later', '--faults', '1',
                      '--data-delay', '1')
    base = tempfile.mkdtemp(dir='/tmp')
    os.chmod(base, 0o755)
    os.chown(base, 65534, 65534)
    queue_path = os.path.join(base, 'queue')
    script = f'''
import os, sys, time, transaction
from mailout import config
from mailout.factories import build_all
settings = config.loads({mailout_text(queue_path, sink.port)!r})
import encodings.idna   # loaded lazily by socket, from a path nobody
os.setgid(65534)        # cannot read: from now on, nobody
os.setuid(65534)
_, deliveries = build_all(settings)
from mailout.processor import Processor
delivery = deliveries['default']
processor = Processor(delivery.queue, delivery.mailer)
delivery.send('app@example.org', ['ann@example.org', 'bob@example.org'],
              'Subject: x\\r\\n\\r\\nHi.\\r\\n')
transaction.commit()
print('committed', flush=True)
processor.run_once()
print('first run', sorted(os.listdir({queue_path!r} + '/cur')), flush=True)
delivery.queue.promote_due(now=time.time() + 10 ** 6)
processor.run_once()
'''
    try:
        child = subprocess.Popen([os.sys.executable, '-c', script],
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        line = child.stdout.readline().strip()
        assert line == 'committed', child.communicate()[1]
        deadline = time.monotonic() + 10
        while not files_in(queue_path, 'cur'):
            assert time.monotonic() < deadline and child.poll() is None, \
                child.communicate()
            time.sleep(0.01)
        for area in ('deferred', 'failed'):
            os.chmod(os.path.join(queue_path, area), 0o500)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out.strip() == 'first run []', err
        assert 'Permission denied' in err and 'set to 700' in err
        assert sorted(r for m in sink.messages() for r in m['rcpt_tos']) \
            == ['ann@example.org', 'bob@example.org']
        for area in ('tmp', 'new', 'cur', 'deferred', 'failed'):
            assert files_in(queue_path, area) == [], area
    finally:
        shutil.rmtree(base)
