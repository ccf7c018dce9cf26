"""Products.MailHost objects deliver through mailout (``<mail:mailhost/>``).

Every ``MailHost`` object, Plone's included, sends through
``MailBase._send(mfrom, mto, messageText, immediate=False)``, which builds
zope.sendmail objects from the object's own settings; no utility or adapter
is looked up on the way.  So the hook is that method: `install` replaces it
on the class (nothing is written to the ZODB; without the ZCML line the next
start is stock MailHost again), and with it the status methods the ZMI
shows, so that they report mailout's queue and processor.

Products.MailHost is optional: it is imported when `install` runs, never at
the import of this module.
"""
import email.header
import logging
from collections.abc import Iterable
from typing import Any
from typing import Optional
from typing import Union

from zope.component import getUtility
from zope.component import queryUtility
from zope.configuration.exceptions import ConfigurationError

from mailout.interfaces import IMailDelivery
from mailout.interfaces import MessageError

log = logging.getLogger(__name__)

#: The methods of ``MailBase`` that `install` replaces.
REPLACED = ('_send', 'queueLength', 'queueThreadAlive',
            'queueNonDeliveryMode', 'manage_restartQueueThread')


class _Route:
    """What `install` did: the deliveries and the methods it replaced."""

    def __init__(self, delivery: str, immediate: str,
                 replaced: dict[str, Any]):
        self.delivery = delivery
        self.immediate = immediate
        self.replaced = replaced
        self.announced: set[str] = set()


_route: Optional[_Route] = None


def install(delivery: str, immediate: Optional[str] = None) -> None:
    """Make every MailHost deliver through the ``IMailDelivery`` utility
    ``delivery`` (``immediate``, default the same, for
    ``send(..., immediate=True)``); the ``<mail:mailhost/>`` ZCML action."""
    global _route
    from Products.MailHost.MailHost import MailBase
    immediate = immediate or delivery
    for name in dict.fromkeys((delivery, immediate)):
        if queryUtility(IMailDelivery, name) is None:
            raise ConfigurationError(
                f'<mail:mailhost/> names delivery {name!r}, which is not '
                'registered (add <mail:deliveries/> or '
                f'<mail:delivery name="{name}"/>)')
    if _route is not None:
        uninstall()
    replaced = {name: MailBase.__dict__[name] for name in REPLACED}
    original = getattr(replaced['_send'], '__module__', '')
    if original != 'Products.MailHost.MailHost':
        log.warning(
            'Products.MailHost.MailHost.MailBase._send was already replaced '
            'by %s.%s (Products.PrintingMailHost or a similar package); '
            'mailout replaces it in turn, so that replacement is not used',
            original, getattr(replaced['_send'], '__qualname__', '?'))
    for name in REPLACED:
        setattr(MailBase, name, _METHODS[name])
    _route = _Route(delivery, immediate, replaced)
    log.info('MailHost objects deliver through mailout: delivery %r, '
             'immediate=True through %r', delivery, immediate)


def uninstall() -> None:
    """Put back the methods `install` replaced (tests; zope.testing's
    clean-up calls it)."""
    global _route
    if _route is None:
        return
    from Products.MailHost.MailHost import MailBase
    for name, method in _route.replaced.items():
        setattr(MailBase, name, method)
    _route = None


try:
    from zope.testing.cleanup import addCleanUp
except ImportError:     # pragma: no cover (zope.testing comes with Zope)
    pass
else:
    addCleanUp(uninstall)


def installed() -> Optional[tuple[str, str]]:
    """``(delivery, immediate)`` while MailHost objects deliver through
    mailout, else None."""
    return None if _route is None else (_route.delivery, _route.immediate)


def _text(value: Union[str, email.header.Header]) -> str:
    # MailHost hands on Header objects for non-ASCII names.
    return value if isinstance(value, str) else str(value)


def recipients(mto: Union[str, email.header.Header,
                          Iterable[Union[str, email.header.Header]]]
               ) -> list[str]:
    """MailHost's ``mto`` as mailout's list of addresses: a bare string
    (MailHost passes one on) is one address, not its characters."""
    if isinstance(mto, (str, email.header.Header)):
        return [_text(mto)]
    return [_text(address) for address in mto]


def _delivery(immediate: bool = False) -> Any:
    assert _route is not None
    return getUtility(IMailDelivery,
                      _route.immediate if immediate else _route.delivery)


def _announce(mailhost: Any) -> None:
    # Once per MailHost object and process: its settings are ignored.
    assert _route is not None
    try:
        where = '/'.join(mailhost.getPhysicalPath())
    except Exception:
        where = repr(mailhost)
    if where in _route.announced:
        return
    _route.announced.add(where)
    log.info(
        'MailHost %s sends through mailout delivery %r; its own SMTP '
        'settings (%s:%s) and queue settings (queue %s, %s) are not used',
        where, _route.delivery, getattr(mailhost, 'smtp_host', None),
        getattr(mailhost, 'smtp_port', None),
        'on' if getattr(mailhost, 'smtp_queue', False) else 'off',
        getattr(mailhost, 'smtp_queue_directory', None))


def _send(self: Any, mfrom: Union[str, email.header.Header], mto: Any,
          messageText: Union[str, bytes], immediate: bool = False) -> None:
    """Send the message through mailout (replaces MailBase._send)."""
    from Products.MailHost.MailHost import MailHostError
    _announce(self)
    try:
        _delivery(immediate).send(_text(mfrom), recipients(mto), messageText)
    except MessageError as e:
        # What Plone's callers catch.
        raise MailHostError(str(e)) from e


def _processor() -> Any:
    return getattr(_delivery(), 'processor', None)


def queueLength(self: Any) -> int:
    """The number of messages in mailout's queue not yet delivered:
    waiting, being sent, deferred (replaces MailBase.queueLength)."""
    queue = getattr(_delivery(), 'queue', None)
    if queue is None:
        return 0
    # Counts only: the ZMI shows this on every page of the object.
    return sum(queue.count(area) for area in ('new', 'cur', 'deferred'))


def queueThreadAlive(self: Any) -> bool:
    """Whether mailout's processor runs in this process (replaces
    MailBase.queueThreadAlive)."""
    processor = _processor()
    return processor is not None and processor.running


def queueNonDeliveryMode(self: Any) -> bool:
    """Whether this process only queues (mailout's ``processor off``;
    replaces MailBase.queueNonDeliveryMode)."""
    delivery = _delivery()
    return getattr(delivery, 'queue', None) is not None \
        and getattr(delivery, 'processor', None) is None


def manage_restartQueueThread(self: Any, action: str = 'start',
                              REQUEST: Any = None) -> Any:
    """Start or stop mailout's processor in this process (replaces
    MailBase.manage_restartQueueThread).  A stopped processor starts again
    at the next commit that queues mail, as mailout's processors do."""
    if action not in ('start', 'stop'):
        raise ValueError('Unsupported action %s' % action)
    processor = _processor()
    if processor is not None:
        if action == 'stop':
            processor.stop()
        else:
            processor.start()
    if REQUEST is not None:
        msg = 'Queue processor thread %s' % (
            'stopped (mailout starts it again at the next queued message)'
            if action == 'stop' else 'started')
        if processor is None:
            msg = 'mailout delivery %r has no processor in this process' \
                % _route.delivery if _route else 'not installed'
        return self.manage_main(self, REQUEST, manage_tabs_message=msg)
    return None


_METHODS = {
    '_send': _send,
    'queueLength': queueLength,
    'queueThreadAlive': queueThreadAlive,
    'queueNonDeliveryMode': queueNonDeliveryMode,
    'manage_restartQueueThread': manage_restartQueueThread,
}
