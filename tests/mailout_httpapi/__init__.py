"""A mailer that hands each message to an HTTP API: mailout's example of a
new transport (README, "Writing a mailer")."""
import base64
import dataclasses
import http.client
import json
import time

from mailout.interfaces import TransientDeliveryError
from mailout.mailers import Mailer
from mailout.mailers import RelayRotation
from mailout.replies import delivery_error


class HTTPAPIMailer(Mailer):
    """POST each message as JSON to PATH on one of the API's hosts, in
    turn: ``{"from", "to": [...], "all_or_none", "message": base64}``.
    The API answers 200 and ``{"refused": {address: [code, text]}}``;
    another status refuses the whole message (4xx for good, 5xx for now).
    `Mailer` gives ``vote``, ``abort`` and ``close``, which have nothing to
    do: there is one connection a message.
    """

    smtputf8 = True                 # JSON carries any address

    def __init__(self, settings):
        self.settings = settings
        self.name = settings.name
        self.rotation = RelayRotation(settings.hosts, settings.down_time,
                                      self)

    def __repr__(self):
        return f'<HTTPAPIMailer {self.name!r}>'

    def send(self, fromaddr, toaddrs, message, all_or_none=False):
        body = json.dumps({'from': fromaddr, 'to': list(toaddrs),
                           'all_or_none': all_or_none,
                           'message': base64.b64encode(message).decode()})
        connection, host = self.rotation.connect(self._connect)
        try:
            connection.request('POST', self.settings.path, body,
                               {'Content-Type': 'application/json'})
            response = connection.getresponse()
            status, reply = response.status, response.read()
        except OSError as e:
            # Lost after the request: the API may have the message, and a
            # retry may send it twice (as SMTP's RFC 1047 window).
            self.rotation.mark_down(host, describe(e))
            raise TransientDeliveryError((None, describe(e))) from None
        finally:
            connection.close()
        if status != 200:
            # Client errors other than timeouts and rate limits are final.
            final = 400 <= status < 500 and status not in (408, 429)
            code = 554 if final else 451
            text = reply.decode('utf-8', 'replace')[:200]
            raise delivery_error(code, f'HTTP {status}: {text}')
        refused = json.loads(reply)['refused']
        return {address: tuple(r) for address, r in refused.items()}

    def _connect(self, host):
        connection = http.client.HTTPConnection(
            *host, timeout=self.settings.timeout)
        try:
            connection.connect()
        except OSError as e:
            raise TransientDeliveryError((None, describe(e))) from None
        return connection

    def probe(self, timeout=None):
        results = []
        for host, port in self.settings.hosts:
            started = time.monotonic()
            result = dict(host=host, port=port, ok=False, server=None,
                          tls=None, auth=None, error=None)
            try:
                connection = http.client.HTTPConnection(
                    host, port, timeout=timeout or self.settings.timeout)
                connection.request('HEAD', self.settings.path)
                response = connection.getresponse()
                connection.close()
                result['server'] = response.getheader('Server')
                if response.status < 500:
                    result['ok'] = True
                else:
                    result['error'] = f'HTTP {response.status}'
            except OSError as e:
                result['error'] = describe(e)
            result['seconds'] = round(time.monotonic() - started, 3)
            results.append(result)
        return results


@dataclasses.dataclass(frozen=True)
class HTTPAPIMailerSettings:
    name: str
    hosts: tuple
    path: str
    timeout: float
    down_time: float

    #: What mailout builds from these settings.
    mailer_factory = HTTPAPIMailer


def http_api_mailer(section):
    """The datatype of <http-api-mailer>: settings only, no I/O."""
    return HTTPAPIMailerSettings(section.getSectionName(),
                                 tuple(section.hosts), section.path,
                                 section.timeout, section.down_time)


def describe(error):
    return f'{type(error).__name__}: {error}'
