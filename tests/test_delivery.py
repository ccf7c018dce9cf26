"""Commit semantics of the deliveries, against a real SMTP server process."""
import os
import stat
import time

import pytest
import transaction
from zope.interface.verify import verifyObject

from helpers import areas
from helpers import direct_delivery
from helpers import message
from mailout import config
from mailout.delivery import MailDataManager
from mailout.factories import build_all
from mailout.interfaces import IDirectMailDelivery
from mailout.interfaces import IQueuedMailDelivery
from mailout.interfaces import TransientDeliveryError


@pytest.fixture
def deliveries(config_file):
    mailers, deliveries = build_all(config.load(config_file))
    return deliveries


def drain(delivery):
    """Wait until the queue holds nothing waiting or claimed."""
    delivery.processor.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        files = areas(delivery)
        if not files['new'] and not files['cur']:
            return
        time.sleep(0.005)
    raise AssertionError(f'queue not drained: {files}')


class FailingVote:
    """A resource manager whose vote says no, sorted before mailout's."""

    def sortKey(self):
        return 'aaa-failing'

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_abort = tpc_finish = abort

    def tpc_vote(self, txn):
        raise RuntimeError('vote failed')


def test_interfaces(deliveries):
    """The deliveries provide zope.sendmail's interfaces."""
    assert verifyObject(IQueuedMailDelivery, deliveries['default'])
    assert verifyObject(IDirectMailDelivery, deliveries['urgent'])


def test_data_manager_and_savepoint_interfaces(deliveries):
    """The data manager a send() joins, and its savepoints, provide
    transaction's interfaces."""
    from transaction.interfaces import IDataManagerSavepoint
    from transaction.interfaces import ISavepointDataManager
    delivery = deliveries['default']
    delivery.send('a@example.org', ['b@example.org'],
                  'Subject: x\r\n\r\nbody\r\n')
    data_manager = transaction.get().data(delivery)
    assert verifyObject(ISavepointDataManager, data_manager)
    assert verifyObject(IDataManagerSavepoint, data_manager.savepoint())
    transaction.abort()


def test_commit_delivers_envelope_and_bytes(deliveries, sink):
    """A committed message arrives with its envelope and bytes unchanged."""
    data = message(headers='Message-Id: <one@example.org>\n'
                           'Date: Wed, 25 Nov 2026 09:00:00 +0000\n')
    message_id = deliveries['default'].send(
        'sender@example.org', ['ann@example.org', 'bob@example.org'], data)
    assert message_id == 'one@example.org'
    transaction.commit()
    drain(deliveries['default'])
    [received] = sink.messages()
    assert received['mail_from'] == 'sender@example.org'
    assert received['rcpt_tos'] == ['ann@example.org', 'bob@example.org']
    assert received['data'] == data
    assert areas(deliveries['default'])['new'] == []


def test_direct_delivery_sends_at_commit(deliveries, sink):
    """A direct delivery sends during commit, nothing before."""
    deliveries['urgent'].send('sender@example.org', ['ann@example.org'],
                              message())
    assert sink.messages() == []
    transaction.commit()
    [received] = sink.messages()
    assert received['rcpt_tos'] == ['ann@example.org']


@pytest.mark.parametrize('name', ['default', 'urgent'])
def test_abort_sends_nothing_and_leaves_no_file(deliveries, sink, name):
    """Abort: nothing sent, no file anywhere in the queue."""
    deliveries[name].send('sender@example.org', ['ann@example.org'],
                          message())
    transaction.abort()
    transaction.commit()            # an empty transaction afterwards
    queue = deliveries['default']
    drain(queue)
    assert sink.messages() == []
    assert all(files == [] for files in areas(queue).values())


@pytest.mark.parametrize('name', ['default', 'urgent'])
def test_savepoint_rollback_drops_only_later_messages(deliveries, sink, name):
    """Rolling back to a savepoint taken before send() drops that message
    only."""
    delivery = deliveries[name]
    delivery.send('sender@example.org', ['ann@example.org'],
                  message('kept'))
    savepoint = transaction.savepoint()
    delivery.send('sender@example.org', ['ann@example.org'],
                  message('dropped'))
    savepoint.rollback()
    transaction.commit()
    drain(deliveries['default'])
    [received] = sink.messages()
    assert b'Subject: kept' in received['data']


def test_savepoint_before_first_send(deliveries, sink):
    """A savepoint taken before the first send() of the transaction rolls
    that send back, and a later send() in the same transaction still goes."""
    delivery = deliveries['default']
    savepoint = transaction.savepoint()
    delivery.send('sender@example.org', ['ann@example.org'],
                  message('dropped'))
    savepoint.rollback()
    delivery.send('sender@example.org', ['ann@example.org'],
                  message('kept'))
    transaction.commit()
    drain(delivery)
    assert [b'Subject: kept' in m['data'] for m in sink.messages()] == [True]


@pytest.mark.parametrize('name', ['default', 'urgent'])
def test_failed_vote_of_another_resource_sends_nothing(deliveries, sink,
                                                       name):
    """Another resource manager's failing vote: nothing sent, no file."""
    deliveries[name].send('sender@example.org', ['ann@example.org'],
                          message())
    transaction.get().join(FailingVote())
    with pytest.raises(RuntimeError, match='vote failed'):
        transaction.commit()
    transaction.abort()
    queue = deliveries['default']
    drain(queue)
    assert sink.messages() == []
    assert all(files == [] for files in areas(queue).values())


def test_direct_delivery_failure_aborts_commit(tmp_path):
    """A direct delivery whose relay is down makes commit fail."""
    direct_delivery(1, 'timeout 2s').send(
        'sender@example.org', ['ann@example.org'], message())
    with pytest.raises(TransientDeliveryError, match='127.0.0.1:1'):
        transaction.commit()


def test_queue_files_are_private(deliveries):
    """Queue directories are 0700 and message files 0600."""
    delivery = deliveries['default']
    delivery.processor = None       # keep the message in the queue
    delivery.send('sender@example.org', ['ann@example.org'], message())
    transaction.commit()
    path = delivery.queuePath
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for area in ('tmp', 'new', 'cur', 'deferred', 'failed'):
        assert stat.S_IMODE(os.stat(os.path.join(path, area)).st_mode) \
            == 0o700
    [name] = os.listdir(os.path.join(path, 'new'))
    assert stat.S_IMODE(os.stat(os.path.join(path, 'new', name)).st_mode) \
        == 0o600


def test_commit_returns_with_message_in_new(deliveries):
    """After commit the message is in new/, nothing lingers in tmp/."""
    delivery = deliveries['default']
    delivery.processor = None       # keep the messages in the queue
    for i in range(3):
        delivery.send('sender@example.org', ['ann@example.org'], message())
    transaction.commit()
    files = areas(delivery)
    assert len(files['new']) == 3 and files['tmp'] == []


def test_processor_wakes_on_commit(deliveries, sink):
    """A running processor delivers a commit at once, not after a poll."""
    delivery = deliveries['default']
    delivery.processor.poll_interval = 60
    delivery.processor.start()
    time.sleep(0.1)                 # let it settle into its wait
    latencies = []
    for i in range(5):
        delivery.send('sender@example.org', ['ann@example.org'], message())
        start = time.monotonic()
        transaction.commit()
        sink.wait_for(i + 1, timeout=5)
        latencies.append(time.monotonic() - start)
    assert len(sink.messages()) == 5
    assert max(latencies) < 0.5, latencies


def test_commit_starts_processor_lazily(deliveries, sink):
    """Without ProcessStarting, the first commit starts the processor."""
    delivery = deliveries['default']
    assert not delivery.processor.running
    delivery.send('sender@example.org', ['ann@example.org'], message())
    transaction.commit()
    assert delivery.processor.running
    assert len(sink.wait_for(1)) == 1


def test_data_manager_repr_and_sort_key(deliveries):
    delivery = deliveries['default']
    data_manager = MailDataManager(delivery, transaction.manager)
    assert data_manager.sortKey().startswith('~mailout:default:')
    assert 'default' in repr(data_manager)


def test_direct_delivery_partial_refusal_sends_nothing(tmp_path, start_sink):
    """A direct delivery whose relay refuses one recipient sends to none of
    them, and commit fails naming the refusal."""
    from mailout.interfaces import DeliveryError
    sink = start_sink('--refuse', 'bad@example.org=550 5.1.1 no such user')
    direct_delivery(sink.port).send('sender@example.org',
                                    ['good@example.org', 'bad@example.org'],
                                    message())
    with pytest.raises(DeliveryError, match='bad@example.org: 550'):
        transaction.commit()
    assert sink.messages() == []
