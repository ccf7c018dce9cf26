"""The IMailDelivery utilities and the transaction data manager they share.

``send()`` validates at once and joins the current transaction; the data
manager does the work at commit:

* queued: ``tpc_vote`` writes and fsyncs each message into the queue's
  ``tmp/`` with the batch's commit marker; ``tpc_finish`` only renames them
  into ``new/`` (plus one directory fsync) and wakes the processor, because
  nothing that can fail may happen after the vote.  Once every resource has
  voted, the mail is committed: if a rename still fails, or another
  resource's ``tpc_finish`` fails, the batch stays in ``tmp/`` for recovery
  to finish, never discarded while the other resources keep their changes.
* direct: ``tpc_vote`` hands the messages to the mailer.  The data manager
  sorts last, so every other resource has voted yes before mail leaves; a
  refusal makes the vote, and so the commit, fail.
"""
import logging
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Optional

import transaction
from transaction.interfaces import IDataManagerSavepoint
from transaction.interfaces import ISavepointDataManager
from zope.interface import implementer

from mailout import message as _message
from mailout.interfaces import DeliveryError
from mailout.interfaces import IDirectMailDelivery
from mailout.interfaces import IMailoutMailer
from mailout.interfaces import IQueuedMailDelivery
from mailout.interfaces import MessageInput
from mailout.queue import Queue

if TYPE_CHECKING:
    from mailout.processor import Processor

log = logging.getLogger(__name__)


class _Delivery:

    # Where the data manager sorts among a transaction's resources: after
    # the usual keys (ZODB's storages), before resources that commit in
    # their vote (zope.sqlalchemy's '~sqlalchemy:'), so that when theirs
    # fails, queued mail is discarded with the rest.
    sort_key = '~mailout'

    def __init__(self, name: str, mailer: IMailoutMailer,
                 max_message_size: Optional[int] = None,
                 transaction_manager: Optional[
                     transaction.interfaces.ITransactionManager] = None,
                 redirect_to: Optional[str] = None):
        self.name = name
        self.mailer = mailer
        self.max_message_size = max_message_size
        self.redirect_to = redirect_to
        self.transaction_manager = transaction_manager or transaction.manager

    def __repr__(self):
        return f'<{type(self).__name__} {self.name!r} via {self.mailer!r}>'

    def send(self, fromaddr: str, toaddrs: Iterable[str],
             message: MessageInput) -> str:
        """Send ``message`` if the current transaction commits; return its
        Message-Id (without angle brackets)."""
        envelope = _message.prepare(
            fromaddr, toaddrs, message, self.max_message_size,
            smtputf8=getattr(self.mailer, 'smtputf8', False))
        if self.redirect_to:
            envelope = _message.redirected(envelope, self.redirect_to)
        self._data_manager().envelopes.append(envelope)
        return envelope.message_id

    def _data_manager(self):
        txn = self.transaction_manager.get()
        try:
            data_manager = txn.data(self)
        except KeyError:
            data_manager = None
        if data_manager is None:
            data_manager = MailDataManager(self, self.transaction_manager)
            txn.join(data_manager)
            txn.set_data(self, data_manager)
        return data_manager

    # What the data manager calls, with the envelopes of one transaction.
    def _vote(self, envelopes):
        raise NotImplementedError

    def _finish(self, state):
        pass

    def _abort(self, state):
        pass


@implementer(IQueuedMailDelivery)
class QueuedDelivery(_Delivery):
    """Commit puts messages durably into a queue directory; a `Processor`
    delivers them."""

    def __init__(self, name: str, mailer: IMailoutMailer, queue_path: str,
                 processor: Optional['Processor'] = None, **kw):
        super().__init__(name, mailer, **kw)
        self.queue = Queue.open(queue_path)
        self.processor = processor

    @property
    def queuePath(self) -> str:
        return self.queue.path

    def _vote(self, envelopes):
        names = []
        batch = uuid.uuid4().hex[:12]
        try:
            for envelope in envelopes:
                names.append(self.queue.write(envelope, batch))
            self.queue.prepare(names)
        except BaseException:
            self.queue.discard(names)
            raise
        return names

    def _finish(self, names):
        self.queue.commit(names)
        if self.processor is not None:
            try:
                self.processor.start()      # lazily, in processes that
            except Exception:               # never said ProcessStarting
                log.exception('could not start the processor of %r', self)

    def _abort(self, names):
        if names:
            self.queue.discard(names)


@implementer(IDirectMailDelivery)
class DirectDelivery(_Delivery):
    """Messages go to the mailer while the transaction votes.

    A message goes to all its recipients or, if the relay refuses one, to
    none, and the commit fails.  Of several messages in one transaction,
    those before a refused one have gone.
    """

    # After every other resource, those that commit in their vote too:
    # mail that left cannot be called back.
    sort_key = '~~~mailout'

    def _vote(self, envelopes):
        try:
            for envelope in envelopes:
                refused = self.mailer.send(envelope.fromaddr,
                                           envelope.toaddrs, envelope.message,
                                           all_or_none=True)
                if refused:
                    raise DeliveryError((None, 'recipients refused: ' + '; '
                                         .join(f'{address}: {code} {text}'
                                               for address, (code, text)
                                               in refused.items())))
        finally:
            self.mailer.close()


@implementer(ISavepointDataManager)
class MailDataManager:
    """Joins a transaction for one delivery and collects its messages."""

    def __init__(self, delivery, transaction_manager):
        self.delivery = delivery
        self.transaction_manager = transaction_manager
        self.envelopes = []
        self._state = None
        self._voted = self._finishing = False

    def __repr__(self):
        return f'<MailDataManager for {self.delivery!r}: ' \
               f'{len(self.envelopes)} message(s)>'

    def sortKey(self):
        return f'{self.delivery.sort_key}:{self.delivery.name}:{id(self)}'

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        self._state = self.delivery._vote(self.envelopes)
        self._voted = True

    def tpc_finish(self, txn):
        self._forget(txn)
        self._finishing = True
        self.delivery._finish(self._state)

    def tpc_abort(self, txn):
        self._forget(txn)
        if self._finishing:
            pass        # a later resource's tpc_finish failed: ours is done
        elif self._voted and _all_voted(txn):
            # Every resource voted yes, so the transaction committed, but an
            # earlier one's tpc_finish failed: the others keep their
            # changes, so the mail goes out too.
            log.error('%r: the commit failed in its second phase after every '
                      'resource voted; sending the mail all the same', self)
            self.delivery._finish(self._state)
        else:
            self.delivery._abort(self._state)
        self._state = None

    def abort(self, txn):
        # Called when the transaction aborts before the vote, and when a
        # savepoint taken before this data manager joined is rolled back.
        self._forget(txn)
        self.envelopes.clear()

    def _forget(self, txn):
        if txn.data(self.delivery) is self:
            txn.set_data(self.delivery, None)

    def savepoint(self):
        return _Savepoint(self, len(self.envelopes))


def _all_voted(txn):
    # transaction calls tpc_abort after a refused vote and after a failed
    # tpc_finish alike; only its record of the votes (private, but stable
    # since transaction 1.x) tells the two apart.
    voted, resources = getattr(txn, '_voted', None), \
        getattr(txn, '_resources', None)
    return voted is not None and resources is not None \
        and all(id(r) in voted for r in resources)


@implementer(IDataManagerSavepoint)
class _Savepoint:

    def __init__(self, data_manager, length):
        self.data_manager = data_manager
        self.length = length

    def rollback(self):
        del self.data_manager.envelopes[self.length:]
