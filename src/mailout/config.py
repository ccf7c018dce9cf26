"""ZConfig datatypes for component.xml, and finding this process's settings.

The datatypes turn sections into plain immutable settings objects; nothing
here opens a connection or registers anything.
"""
import contextlib
import dataclasses
import io
import os
import re
import sys
from typing import Optional

import ZConfig

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), 'schema.xml')
TLS_MODES = ('none', 'opportunistic', 'starttls', 'ssl')


def tls_mode(value):
    """Datatype of the ``tls`` key."""
    value = value.lower()
    if value not in TLS_MODES:
        raise ValueError(
            f"tls must be one of {', '.join(TLS_MODES)}, not {value!r}")
    return value


def duration(value):
    """Datatype of time keys: seconds, or parts like ``1d 2h 3m 4.5s``;
    returns seconds as a float."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = ZConfig.datatypes.timedelta(value).total_seconds()
        except (TypeError, ValueError):
            seconds = -1
    if not 0 <= seconds < float('inf'):
        raise ValueError(f'not a duration: {value!r} (examples: 30s, '
                         '0.5s, 5m, 1h 30m, 5d)')
    return seconds


def non_negative_float(value):
    """Datatype of ``rate``."""
    number = float(value)
    if not 0 <= number < float('inf'):
        raise ValueError(f'must be a number of at least 0, not {value!r}')
    return number


def positive_integer(value):
    """Datatype of counts that must be at least 1."""
    number = int(value)
    if number < 1:
        raise ValueError(f'must be at least 1, not {number}')
    return number


def relay_host(value):
    """Datatype of a ``host`` line: ``host`` or ``host:port`` ->
    ``(host, port or None)``."""
    host, sep, port = value.rpartition(':')
    if not sep or ']' in port or (':' in host and not host.endswith(']')):
        host, port = value, None        # no port, or an IPv6 address
    else:
        port = ZConfig.datatypes.stock_datatypes['port-number'](port)
    host = host.strip('[]')
    if not host or any(c.isspace() for c in host):
        raise ValueError(f'not a host name or address: {value!r}')
    return host, port


def host_id(value):
    """Datatype of ``host-id``: this process's host in queue file names."""
    from mailout.queue.names import check_host_id
    return check_host_id(value)


def relay_line(value):
    """Datatype of an smtp-mailer's ``host`` line: ``host[:port]``, then
    ``weight=N`` if given -> ``(host, port or None, weight)``."""
    host, *options = value.split()
    weight = None
    for option in options:
        name, sep, number = option.partition('=')
        if not sep:
            raise ValueError(f'not a host name or address: {value!r} (only '
                             'weight=N may follow it)')
        if name != 'weight':
            raise ValueError(f'after the host only weight=N may follow, not '
                             f'{option!r}')
        if weight is not None:
            raise ValueError('weight=N given twice')
        weight = int(number) if number.isdigit() else 0
        if weight < 1:
            raise ValueError(f'weight must be a whole number of at least 1, '
                             f'not {number!r}')
    return (*relay_host(host), weight or 1)


def non_negative_integer(value):
    """Datatype of counts where 0 means none or no limit."""
    number = int(value)
    if number < 0:
        raise ValueError(f'must be 0 or more, not {number}')
    return number


def address(value):
    """An e-mail address (``redirect-to``), checked as send() checks one."""
    from mailout.interfaces import InvalidAddress
    from mailout.message import check_address
    try:
        return check_address(value, InvalidAddress, 'address')
    except InvalidAddress as e:     # ZConfig reports a ValueError's text
        raise ValueError(str(e)) from None


def _settings(cls, section, **computed):
    """An instance of the settings dataclass ``cls`` for a ZConfig section:
    ``name`` is the section's, each other field the key of the same name
    unless ``computed`` gives it."""
    values = {'name': section.getSectionName(), **computed}
    for field in dataclasses.fields(cls):
        if field.name not in values and hasattr(section, field.name):
            values[field.name] = getattr(section, field.name)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class SMTPMailerSettings:
    name: str
    hosts: tuple
    port: Optional[int]
    tls: str
    username: Optional[str]
    password: Optional[str] = dataclasses.field(repr=False)
    password_file: Optional[str]
    timeout: float
    local_hostname: Optional[str]
    ca_file: Optional[str]
    verify_certificates: bool
    allow_plain_auth: bool
    down_time: float
    messages_per_connection: int
    pipelining: bool
    smtputf8: bool
    weights: tuple = ()     # one a host, as its weight=N says (default 1)
    max_connections_per_relay: int = 0

    @classmethod
    def from_section(cls, section):
        name = section.getSectionName()
        if section.password and section.password_file:
            raise ZConfig.ConfigurationError(
                f'smtp-mailer {name!r}: set password or password-file, '
                'not both')
        if (section.password or section.password_file) \
                and not section.username:
            raise ZConfig.ConfigurationError(
                f'smtp-mailer {name!r}: a password needs a username')
        lines = section.hosts or [('localhost', None, 1)]
        return _settings(
            cls, section,
            hosts=tuple((host, port) for host, port, _ in lines),
            weights=tuple(weight for _, _, weight in lines),
            tls=section.tls or ('starttls' if section.username
                                else 'opportunistic'))

    @property
    def relays(self):
        """``(host, port)`` of every relay, default ports filled in."""
        default = self.port or (465 if self.tls == 'ssl' else 25)
        return tuple((host, port or default) for host, port in self.hosts)

    def read_password(self):
        """The password: ``password``, or the first line of
        ``password-file`` taken as it is (UTF-8, no ``$`` substitution)."""
        if not self.password_file:
            return self.password
        with open(self.password_file, 'rb') as f:
            line = f.readline().rstrip(b'\r\n')
        try:
            return line.decode('utf-8')
        except UnicodeDecodeError:
            # Not its text: that quotes a byte of the secret.
            raise ValueError(f'password-file {self.password_file} is not '
                             'UTF-8 text') from None


@dataclasses.dataclass(frozen=True)
class LMTPMailerSettings:
    name: str
    destination: str        # "host:port" or a unix socket path
    relays: tuple           # ((host or path, port or None),)
    timeout: float
    local_hostname: Optional[str]
    messages_per_connection: int
    pipelining: bool
    smtputf8: bool
    down_time: float = 0    # one server: never rest

    @classmethod
    def from_section(cls, section):
        name = section.getSectionName()
        if bool(section.host) == bool(section.path):
            raise ZConfig.ConfigurationError(
                f'lmtp-mailer {name!r}: give host or path (not both)')
        if section.path:
            relay, destination = (section.path, None), section.path
        else:
            host, port = section.host
            relay = (host, port or section.port)
            destination = '%s:%s' % relay
        return _settings(cls, section, destination=destination,
                         relays=(relay,))


@dataclasses.dataclass(frozen=True)
class SendmailMailerSettings:
    name: str
    path: str
    arguments: tuple
    timeout: float

    @classmethod
    def from_section(cls, section):
        return _settings(cls, section, arguments=tuple(section.arguments))


@dataclasses.dataclass(frozen=True)
class QueuedDeliverySettings:
    name: str
    mailer: str
    queue_path: str
    processor: bool
    connections: int
    rate: float
    poll_interval: float
    max_message_size: int
    min_backoff: float
    max_backoff: float
    max_lifetime: float
    hold: bool = False
    redirect_to: Optional[str] = None
    claim_lease: float = 300.0
    host_id: Optional[str] = None   # the <mailout> section's

    @classmethod
    def from_section(cls, section):
        if section.min_backoff > section.max_backoff:
            raise ZConfig.ConfigurationError(
                f'queued-delivery {section.getSectionName()!r}: min-backoff '
                'is longer than max-backoff')
        if section.claim_lease < 1:
            raise ZConfig.ConfigurationError(
                f'queued-delivery {section.getSectionName()!r}: claim-lease '
                'must be 1s at least (default 5m)')
        return _settings(cls, section,
                         queue_path=os.path.abspath(section.queue_path))


@dataclasses.dataclass(frozen=True)
class DirectDeliverySettings:
    name: str
    mailer: str
    max_message_size: int
    redirect_to: Optional[str] = None

    @classmethod
    def from_section(cls, section):
        return _settings(cls, section)


@dataclasses.dataclass(frozen=True)
class MailoutSettings:
    """Every mailer and delivery of one process, by name."""
    name: Optional[str]
    mailers: dict
    deliveries: dict
    host_id: Optional[str] = None

    @classmethod
    def from_section(cls, section):
        # ZConfig already refuses two sections of one name.
        mailers = {s.name: s for s in section.mailers}
        # A queued delivery names its files with the process's host id.
        deliveries = {s.name: dataclasses.replace(s, host_id=section.host_id)
                      if isinstance(s, QueuedDeliverySettings) else s
                      for s in section.deliveries}
        queues = {}
        for delivery in deliveries.values():
            path = getattr(delivery, 'queue_path', None)
            other = queues.setdefault(path, delivery) if path else delivery
            if other.mailer != delivery.mailer:
                # Each queue's processors would send the other's mail.
                raise ZConfig.ConfigurationError(
                    f'deliveries {other.name!r} and {delivery.name!r} share '
                    f'the queue {path} but not a mailer')
            if getattr(other, 'claim_lease', None) \
                    != getattr(delivery, 'claim_lease', None):
                # One queue, one lease: on every host working it, too.
                raise ZConfig.ConfigurationError(
                    f'deliveries {other.name!r} and {delivery.name!r} share '
                    f'the queue {path} but not a claim-lease')
            if delivery.mailer not in mailers:
                # Raised as ConfigurationError: ZConfig would turn a
                # ValueError here into a DataConversionError without a line.
                raise ZConfig.ConfigurationError(
                    f'delivery {delivery.name!r} names unknown mailer '
                    f'{delivery.mailer!r} (mailers: '
                    f"{', '.join(sorted(mailers)) or 'none'})")
        return cls(section.getSectionName(), mailers, deliveries,
                   section.host_id)

    # Zope stores product sections by getSectionName(); zope.app.appsetup
    # stores .mapping, which is this object so that find() recognises it.
    def getSectionName(self):
        return self.name

    @property
    def mapping(self):
        return self


# Section datatypes named in component.xml.
smtp_mailer = SMTPMailerSettings.from_section
lmtp_mailer = LMTPMailerSettings.from_section
sendmail_mailer = SendmailMailerSettings.from_section
queued_delivery = QueuedDeliverySettings.from_section
direct_delivery = DirectDeliverySettings.from_section
mailout_section = MailoutSettings.from_section


_schema = None


def schema():
    global _schema
    if _schema is None:
        _schema = ZConfig.loadSchema(SCHEMA_PATH)
    return _schema


def load(path):
    """Load a standalone mailout file; return its `MailoutSettings`."""
    with _substitution_errors_hidden(path), _unknown_keys_located(path):
        config, _ = ZConfig.loadConfig(schema(), path)
    return config.mailout


def loads(text):
    """Load standalone mailout configuration from a string."""
    with _substitution_errors_hidden('configuration text'), \
            _unknown_keys_located('configuration text', text):
        config, _ = ZConfig.loadConfigFile(schema(), io.StringIO(text))
    return config.mailout


@contextlib.contextmanager
def _unknown_keys_located(source, text=None):
    """ZConfig says only "'hots' is not a known key name" (it keeps the
    line, but does not say it): add the file, the line and the section."""
    try:
        yield
    except ZConfig.ConfigurationError as e:
        match = _UNKNOWN_KEY.match(str(e))
        lineno = getattr(e, 'lineno', None)
        if not match or not lineno:
            raise
        source = (getattr(e, 'url', None) or source).removeprefix('file://')
        if text is None:
            try:
                with open(source, encoding='utf-8', errors='replace') as f:
                    text = f.read()
            except OSError:
                text = ''
        section = _section_at(text, lineno)
        raise ZConfig.ConfigurationError(
            f'{source}, line {lineno}' + (f', in {section}' if section else '')
            + f': {match.group(1)!r} is not a key of this section (a typo?)'
        ) from None


_UNKNOWN_KEY = re.compile(r"'(.+)' is not a known key name\Z")


def _section_at(text, lineno):
    """The innermost ``<section NAME>`` open at line ``lineno`` of ``text``,
    or None."""
    sections = []
    for line in text.splitlines()[:lineno - 1]:
        line = line.strip()
        if line.startswith('</'):
            sections = sections[:-1]
        elif line.startswith('<'):
            sections.append(line)
    return sections[-1] if sections else None


@contextlib.contextmanager
def _substitution_errors_hidden(source):
    """ZConfig substitutes ``$NAME``, ``${NAME}`` and ``$(ENV)`` in every
    value, a password's too, and its errors quote what follows the ``$``: a
    piece of the secret.  Say where and how to write a ``$`` instead."""
    try:
        yield
    except (ZConfig.SubstitutionReplacementError,
            ZConfig.SubstitutionSyntaxError) as e:
        where = (getattr(e, 'url', None) or source).removeprefix('file://')
        if getattr(e, 'lineno', None):
            where += f', line {e.lineno}'
        raise ZConfig.ConfigurationError(
            f"{where}: a '$' that is no substitution ZConfig can make; write "
            "'$$' for a '$' (in a password too; the value is not shown, as "
            'it may be secret)') from None


def find(config=None):
    """This process's settings and a description of where they came from.

    In order: the ``config`` path, ``$MAILOUT_CONFIG``, Zope's
    ``product_config``, zope.app.appsetup's product configuration.
    """
    path = config or os.environ.get('MAILOUT_CONFIG')
    if path:
        return load(path), path
    for source, sections in _product_configs():
        found = _from_product_config(source, sections)
        if found:
            return found
    raise ZConfig.ConfigurationError(
        'no mailout configuration: give the ZCML directive config="...", '
        'set $MAILOUT_CONFIG, or add a <mailout> section to zope.conf')


def _from_product_config(source, sections):
    """``(settings, source)`` from the product sections of ``source``: one
    ``<mailout NAME>`` section or one ``<product-config mailout>`` with a
    ``config-file``; None if neither is there."""
    found = [s for s in sections if isinstance(s, MailoutSettings)]
    files = [s['config-file'] for s in sections
             if isinstance(s, dict) and 'config-file' in s]
    if len(found) + len(files) > 1:
        names = [f'<mailout {s.name}>' for s in found] + files
        raise ZConfig.ConfigurationError(
            f'{source} has more than one mailout configuration: '
            f"{', '.join(names)}")
    if found:
        return found[0], f'{source}, section <mailout {found[0].name}>'
    if files:
        return load(files[0]), \
            f'{files[0]} (config-file of <product-config mailout> in {source})'
    return None


def _product_configs():
    # Only look where a runtime already configured itself.  Not through
    # App.config.getConfiguration(): in a process that merely imported Zope
    # it installs a DefaultConfiguration and sets $INSTANCE_HOME and
    # $CLIENT_HOME.  _config stays None until Zope calls setConfiguration().
    if 'App.config' in sys.modules:
        cfg = getattr(sys.modules['App.config'], '_config', None)
        product_config = getattr(cfg, 'product_config', None) or {}
        yield 'zope.conf', _sections(product_config)
    if 'zope.app.appsetup.product' in sys.modules:
        product = sys.modules['zope.app.appsetup.product']
        yield 'product configuration', _sections(product.saveConfiguration())


def _sections(product_config):
    # <product-config mailout> arrives as a plain dict (Zope) or a mapping.
    return [v if isinstance(v, MailoutSettings) else dict(v)
            for k, v in product_config.items()
            if isinstance(v, MailoutSettings) or k == 'mailout']


# -- any file an operator names (the mailout command's -C) ---------------------

_ZOPE_CONF_MARKERS = ('%import mailout', '<product-config mailout',
                      'instancehome ', '<zodb_db ')


def load_any(path):
    """Settings and their source from ``path``: a standalone mailout file,
    or a Zope instance's zope.conf (loaded with Zope's own schema, so Zope
    must be importable) with a ``<mailout NAME>`` section or a
    ``<product-config mailout>`` naming a ``config-file``."""
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            text = f.read()
    except OSError as e:
        raise ZConfig.ConfigurationError(
            f'cannot read {path}: {e.strerror or e}') from None
    lines = [' '.join(line.split()).lower() + ' ' for line in text.splitlines()]
    if any(line.startswith(marker) for line in lines
           for marker in _ZOPE_CONF_MARKERS):
        return _load_zope_conf(path)
    try:
        return load(path), path
    except ZConfig.ConfigurationError as error:
        # Perhaps a zope.conf after all; if Zope cannot read it either,
        # mailout's own complaint is the one that helps.
        try:
            return _load_zope_conf(path)
        except ZConfig.ConfigurationError:
            raise error from None


def _load_zope_conf(path):
    try:
        from Zope2.Startup.options import ZopeWSGIOptions
    except ImportError as e:
        raise ZConfig.ConfigurationError(
            f'{path} is a Zope zope.conf, but Zope cannot be imported in '
            f'this Python ({sys.executable}: {e}); use the mailout command '
            "of the instance's environment, or name a standalone mailout "
            'file') from None
    # Parsing only: no handleWSGIConfig, nothing installed in App.config.
    with _substitution_errors_hidden(path), _unknown_keys_located(path):
        root = ZopeWSGIOptions(configfile=path)().configroot
    sections = _sections(getattr(root, 'product_config', None) or {})
    found = _from_product_config(path, sections)
    if found:
        return found
    if any(isinstance(s, dict) for s in sections):
        raise ZConfig.ConfigurationError(
            f'{path}: <product-config mailout> has no config-file key')
    raise ZConfig.ConfigurationError(
        f'{path} is a zope.conf without mailout configuration: add '
        '"%import mailout" and a <mailout mailout> section, or '
        '<product-config mailout> with config-file')
