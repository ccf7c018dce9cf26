"""Prometheus metrics: the state of the queues (``mailout metrics``, also
for node_exporter's textfile collector) and counters of what the
processors of a process did (for processes that expose metrics).

Built on prometheus_client, whose text format and atomic textfile writing
they use.
"""
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

import zope.event
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from mailout.interfaces import IMailDeferredEvent
from mailout.interfaces import IMailFailedEvent
from mailout.interfaces import IMailSentEvent

#: Messages the processors of this process handled, by delivery, outcome
#: (sent, deferred, failed) and reply class (2xx, 4xx, 5xx, or none when
#: no server answered: no connection, a timeout).
MESSAGES = Counter('mailout_messages', 'Messages handled by the processors '
                   'of this process, by outcome and reply class.',
                   ['delivery', 'outcome', 'reply_class'])

_OUTCOMES = (('sent', IMailSentEvent), ('deferred', IMailDeferredEvent),
             ('failed', IMailFailedEvent))


class QueueCollector:
    """The state of queues when scraped: ``statuses()`` yields
    ``(deliveries, path, status)`` with a `mailout.queue.Queue.status`
    dict (None for a queue not created yet)."""

    def __init__(self, statuses):
        self.statuses = statuses

    def collect(self) -> Iterator[Metric]:
        labels = ['queue', 'deliveries', 'state']
        messages = GaugeMetricFamily(
            'mailout_queue_messages', 'Messages in a queue, by state: '
            'waiting, in_progress, deferred, failed, held.', labels=labels)
        oldest = GaugeMetricFamily(
            'mailout_queue_oldest_age_seconds', 'Time since the oldest '
            'waiting, or deferred, message was queued (0 if none).',
            labels=labels)
        relays = GaugeMetricFamily(
            'mailout_relay_up', 'Whether a relay is up (1) or resting after '
            'a failure (0), as the processes of a queue recorded it.',
            labels=['queue', 'relay'])
        for deliveries, path, status in self.statuses():
            status = status or {}
            names = ','.join(deliveries)
            for relay in status.get('relays', ()):
                relays.add_metric([path, relay['relay']],
                                  relay['state'] == 'up')
            for state in ('waiting', 'in_progress', 'deferred', 'failed',
                          'held'):
                messages.add_metric([path, names, state],
                                    status.get(state, 0))
            for state in ('waiting', 'deferred'):
                oldest.add_metric([path, names, state],
                                  status.get(f'oldest_{state}_age') or 0)
        yield messages
        yield oldest
        yield relays


def queue_registry(statuses: Iterable[tuple[list[str], str, Any]]
                   ) -> CollectorRegistry:
    """A registry holding the state of the given queue statuses."""
    statuses = list(statuses)
    registry = CollectorRegistry()
    registry.register(QueueCollector(lambda: statuses))
    return registry


def count_event(event: Any) -> None:
    """A zope.event subscriber counting mailout's events in `MESSAGES`."""
    for outcome, interface in _OUTCOMES:
        if interface.providedBy(event):
            reply = getattr(event, 'reply', None)
            MESSAGES.labels(event.delivery, outcome,
                            _reply_class(outcome, reply)).inc()
            return


def count_events() -> None:
    """Count the events of this process's processors from now on (once
    however often it is called); expose them with prometheus_client, e.g.
    ``prometheus_client.start_http_server``."""
    if count_event not in zope.event.subscribers:
        zope.event.subscribers.append(count_event)


def _reply_class(outcome, reply):
    if outcome == 'sent':
        return '2xx'
    code = reply[0] if reply else None
    return f'{code // 100}xx' if code else 'none'
