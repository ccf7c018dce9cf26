"""Build mailers, deliveries and processors from settings (config.py)."""
import logging

import ZConfig

from mailout import config
from mailout.delivery import DirectDelivery
from mailout.delivery import QueuedDelivery
from mailout.mailers import LMTPMailer
from mailout.mailers import SendmailMailer
from mailout.mailers import SMTPMailer
from mailout.processor import Processor
from mailout.processor import RetryPolicy
from mailout.queue import names

log = logging.getLogger(__name__)

MAILERS = {config.SMTPMailerSettings: SMTPMailer,
           config.LMTPMailerSettings: LMTPMailer,
           config.SendmailMailerSettings: SendmailMailer}


def build_mailer(settings):
    """The mailer of ``settings``: one of mailout's, or what the settings of
    another package's mailer section type name as their ``mailer_factory``
    (README, "Writing a mailer")."""
    factory = MAILERS.get(type(settings)) or settings.mailer_factory
    return factory(settings)


def build_delivery(settings, mailer, processor=True):
    """The delivery of ``settings``; a queued one comes with its processor
    (``delivery.processor``, not started) when ``processor`` is on in the
    settings and not turned off here (``processor=False``: the mailout
    command runs processors of its own, and a commit of its ``send`` must
    start none)."""
    if settings.redirect_to:
        log.warning('delivery %r: redirect-to %s: every message goes there '
                    'instead of to its recipients', settings.name,
                    settings.redirect_to)
    if isinstance(settings, config.DirectDeliverySettings):
        return DirectDelivery(settings.name, mailer,
                              max_message_size=settings.max_message_size,
                              redirect_to=settings.redirect_to)
    set_host(settings.host_id)
    delivery = QueuedDelivery(settings.name, mailer, settings.queue_path,
                              max_message_size=settings.max_message_size,
                              redirect_to=settings.redirect_to)
    # One object per queue directory in a process: the lease is the
    # queue's (config refuses two leases for one queue).
    delivery.queue.claim_lease = settings.claim_lease
    if settings.processor and processor:
        delivery.processor = build_processor(settings, delivery.queue, mailer)
    return delivery


def set_host(host_id):
    """Fix this process's host id (the queue files' names) before a queue
    is used: ``host_id`` (the ``<mailout>`` section's ``host-id``), else
    ``$MAILOUT_HOST_ID``, else the host name (`mailout.queue.names`).
    `ZConfig.ConfigurationError` for a bad one, or one different from what
    this process uses already."""
    try:
        names.set_host(host_id)
    except ValueError as e:
        raise ZConfig.ConfigurationError(str(e)) from None


def build_processor(settings, queue, mailer):
    return Processor(queue, mailer, name=settings.name, hold=settings.hold,
                     poll_interval=settings.poll_interval,
                     connections=settings.connections,
                     rate=settings.rate,
                     retry=RetryPolicy(settings.min_backoff,
                                       settings.max_backoff,
                                       settings.max_lifetime))


def build_all(settings, processors=True):
    """``(mailers, deliveries)`` by name for a `config.MailoutSettings`;
    ``processors=False``: no delivery gets a processor."""
    mailers = {name: build_mailer(s) for name, s in settings.mailers.items()}
    deliveries = {name: build_delivery(s, mailers[s.mailer], processors)
                  for name, s in settings.deliveries.items()}
    return mailers, deliveries
