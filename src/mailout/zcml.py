"""The ``mailout`` ZCML directives.

They read this process's settings (``config=``, ``$MAILOUT_CONFIG`` or
zope.conf) while ZCML is parsed and register global IMailer and
IMailDelivery utilities under the section names.  Processors are only
recorded here; they start when the process is ready (processor.start_all).
``<mail:mailhost/>`` makes Products.MailHost objects send through one of
those deliveries (mailout.mailhost).
"""
import importlib

from zope.component.zcml import utility
from zope.configuration.config import GroupingContextDecorator
from zope.configuration.exceptions import ConfigurationError
from zope.configuration.fields import Path
from zope.interface import Interface
from zope.schema import TextLine

from mailout import config as _config
from mailout import processor
from mailout.factories import build_delivery
from mailout.factories import build_mailer
from mailout.interfaces import IMailDelivery
from mailout.interfaces import IMailer


class IDeliveriesDirective(Interface):
    """Register every configured mailer and delivery."""

    config = Path(
        title='Configuration file',
        description='A standalone mailout file; default: $MAILOUT_CONFIG, '
                    "then the <mailout> section of the process's zope.conf.",
        required=False)


class IDeliveryDirective(IDeliveriesDirective):
    """Register one configured delivery and its mailer."""

    name = TextLine(title='Delivery name', required=True)


class IMailHostDirective(Interface):
    """Make every Products.MailHost object deliver through mailout."""

    delivery = TextLine(
        title='Delivery name',
        description='The IMailDelivery utility every MailHost sends through.',
        required=True)

    immediate = TextLine(
        title='Delivery for immediate=True',
        description='The delivery for send(..., immediate=True); default: '
                    'the same delivery, so those sends become transactional.',
        required=False)


def mailhost(_context, delivery, immediate=None):
    # Products.MailHost is an extra: fail here, with this file and line.
    try:
        importlib.import_module('Products.MailHost.MailHost')
    except ImportError as e:
        raise ConfigurationError(
            '<mail:mailhost/> needs Products.MailHost, which cannot be '
            f"imported ({e}); install it with pip install 'mailout[mailhost]'"
        ) from e
    from mailout import mailhost as _mailhost
    # One discriminator: a second <mail:mailhost/> is a conflict.  Order 1:
    # after the utilities it checks for are registered.
    _context.action(discriminator=('mailout.mailhost',),
                    callable=_mailhost.install,
                    args=(delivery, immediate), order=1)


def deliveries(_context, config=None):
    state = _state(_context, config)
    for name in state.settings.deliveries:
        _register(_context, state, name)


def delivery(_context, name, config=None):
    state = _state(_context, config)
    if name not in state.settings.deliveries:
        raise ConfigurationError(
            f'no delivery {name!r} in {state.source} (it has: '
            f"{', '.join(sorted(state.settings.deliveries)) or 'none'})")
    _register(_context, state, name)


class _State:
    """What one configuration run built from one source of settings."""

    def __init__(self, settings, source):
        self.settings = settings
        self.source = source
        self.mailers = {}

    def mailer(self, name):
        """``(mailer, new)``: the mailer object, built once per run."""
        if name in self.mailers:
            return self.mailers[name], False
        mailer = self.mailers[name] = build_mailer(self.settings.mailers[name])
        return mailer, True


def _state(_context, config):
    # Settings and mailers are shared by every directive of one run, so that
    # two deliveries using one mailer register it once.
    machine = _context
    while isinstance(machine, GroupingContextDecorator):
        machine = machine.context
    states = machine.__dict__.setdefault('_mailout_states', {})
    if config not in states:
        states[config] = _State(*_config.find(config))
    return states[config]


def _register(_context, state, name):
    settings = state.settings.deliveries[name]
    mailer, new = state.mailer(settings.mailer)
    if new:
        utility(_context, provides=IMailer, component=mailer,
                name=settings.mailer)
    delivery = build_delivery(settings, mailer)
    utility(_context, provides=IMailDelivery, component=delivery, name=name)
    if getattr(delivery, 'processor', None) is not None:
        _context.action(discriminator=('mailout.processor', name),
                        callable=processor.register,
                        args=(delivery.processor,))
