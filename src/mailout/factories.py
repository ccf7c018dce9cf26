"""Build mailers, deliveries and processors from settings (config.py)."""
from mailout import config
from mailout.delivery import DirectDelivery
from mailout.delivery import QueuedDelivery
from mailout.mailers import LMTPMailer
from mailout.mailers import SendmailMailer
from mailout.mailers import SMTPMailer
from mailout.processor import Processor
from mailout.processor import RetryPolicy

MAILERS = {config.SMTPMailerSettings: SMTPMailer,
           config.LMTPMailerSettings: LMTPMailer,
           config.SendmailMailerSettings: SendmailMailer}


def build_mailer(settings):
    return MAILERS[type(settings)](settings)


def build_delivery(settings, mailer):
    """The delivery of ``settings``; a queued one comes with its processor
    (``delivery.processor``, not started) when ``processor`` is on."""
    if isinstance(settings, config.DirectDeliverySettings):
        return DirectDelivery(settings.name, mailer,
                              max_message_size=settings.max_message_size)
    delivery = QueuedDelivery(settings.name, mailer, settings.queue_path,
                              max_message_size=settings.max_message_size)
    if settings.processor:
        delivery.processor = build_processor(settings, delivery.queue, mailer)
    return delivery


def build_processor(settings, queue, mailer):
    return Processor(queue, mailer, name=settings.name,
                     poll_interval=settings.poll_interval,
                     connections=settings.connections,
                     rate=settings.rate,
                     retry=RetryPolicy(settings.min_backoff,
                                       settings.max_backoff,
                                       settings.max_lifetime))


def build_all(settings):
    """``(mailers, deliveries)`` by name for a `config.MailoutSettings`."""
    mailers = {name: build_mailer(s) for name, s in settings.mailers.items()}
    deliveries = {name: build_delivery(s, mailers[s.mailer])
                  for name, s in settings.deliveries.items()}
    return mailers, deliveries
