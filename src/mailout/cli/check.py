"""``mailout check``: load the configuration, reach every relay, check the
queue directories; send nothing."""
from mailout.cli.base import FAILED
from mailout.cli.base import OK
from mailout.cli.base import Command
from mailout.cli.base import Result
from mailout.cli.base import config_error
from mailout.cli.base import n
from mailout.cli.base import queued
from mailout.cli.base import require_config
from mailout.cli.base import seconds_argument
from mailout.cli.base import stamp
from mailout.mailers.relays import address
from mailout.message import printable


class Check(Command):
    name = 'check'
    help = 'validate the configuration and reach every relay'
    description = (
        'Load CONFIG, then connect to each relay of each SMTP mailer (EHLO, '
        'STARTTLS, AUTH as configured) without sending anything, and check '
        'that queue directories are writable; a relay that the processes '
        'of a queue let rest is shown with until when and why.  Exit 1 if '
        'anything failed.')

    def add_arguments(self, parser):
        parser.add_argument('--timeout', type=seconds_argument,
                            metavar='SECONDS',
                            help="per relay (default: the mailer's timeout)")

    def run(self, args):
        import ZConfig

        from mailout import config
        from mailout.queue import area_problems
        path = require_config(args)
        result = {'ok': True, 'config': {'path': path, 'source': None},
                  'mailers': [],
                  'queues': []}
        try:
            settings, source = config.load_any(path)
        except (ZConfig.ConfigurationError, ImportError) as e:
            result['ok'] = False
            result['config'].update(ok=False, error=config_error(path, e))
            return Result(result, FAILED)
        result['config'].update(
            ok=True, source=source, mailers=sorted(settings.mailers),
            deliveries=sorted(settings.deliveries))
        recorded = _recorded_states(settings)
        for name, mailer_settings in settings.mailers.items():
            checked = _mailer(name, mailer_settings, args.timeout)
            for relay in checked['relays']:
                relay.update(recorded.get(address((relay['host'],
                                                   relay['port'])),
                                          {'state': 'up', 'rest': None}))
            result['mailers'].append(checked)
            if not all(relay['ok'] for relay in checked['relays']):
                result['ok'] = False
        for names, queue_path in queued(settings, required=False):
            problem = '; '.join(area_problems(queue_path)) or None
            result['queues'].append({'deliveries': names, 'path': queue_path,
                                     'ok': problem is None, 'error': problem})
            if problem:
                result['ok'] = False
        return Result(result, OK if result['ok'] else FAILED)

    def text(self, result):
        data = result.data
        cfg = data['config']
        if not cfg['ok']:
            print(f"configuration FAILED: {printable(cfg['error'])}")
            print('check FAILED')
            return
        print(f"configuration {cfg['source']}: ok "
              f"({n(len(cfg['mailers']), 'mailer')}, "
              f"{n(len(cfg['deliveries']), 'delivery', 'deliveries')})")
        for mailer in data['mailers']:
            print(f"mailer {mailer['name']}")
            if not mailer.get('checked', True):
                print('  not an SMTP mailer: not checked')
            for relay in mailer['relays']:
                print(f"  {relay['host']}:{relay['port']}  {_relay(relay)}")
                if relay.get('rest'):
                    print(f"    {_rest(relay)}")
        for queue in data['queues']:
            print(f"queue {', '.join(queue['deliveries'])}  {queue['path']}  "
                  + ('ok' if queue['ok'] else f"FAILED: {queue['error']}"))
        failed = sum(not r['ok'] for m in data['mailers']
                     for r in m['relays']) + sum(not q['ok']
                                                 for q in data['queues'])
        print('check ' + ('ok' if data['ok']
                          else f"FAILED ({n(failed, 'problem')})"))


def _relay(relay):
    """``ok: EHLO name, TLS (TLSv1.3), AUTH as user  (12 ms)`` or
    ``FAILED: why``."""
    if not relay['ok']:
        return f"FAILED: {printable(relay['error'])}"
    done = [f"EHLO {relay['server']}" if relay['server'] else 'EHLO']
    if relay['tls']:
        done.append(f"TLS ({relay['tls']})")
    if relay['auth']:
        done.append(f"AUTH as {relay['auth']}")
    return f"ok: {', '.join(done)}  ({relay['seconds'] * 1000:.0f} ms)"


def _recorded_states(settings):
    """``{host:port: {'state', 'rest'}}``: each relay that rests, or whose
    rest is over but untried, as the processes working a queue recorded it
    (``state`` "resting" or "down"; ``rest``: the queue's path, since,
    until and why); the relays not named are up."""
    import time

    from mailout.cli.queue import relay_states
    now, found = time.time(), {}
    for names, path in queued(settings, required=False):
        for state in relay_states(settings, names, path, now):
            if state['state'] == 'up':
                continue
            known = found.get(state['relay'])
            if known is None or state['since'] > known['rest']['since']:
                found[state['relay']] = {'state': state['state'], 'rest': {
                    'path': path, 'since': state['since'],
                    'until': state['until'], 'why': state['why']}}
    return found


def _rest(relay):
    """``resting until TIME, down since TIME: WHY (queue PATH)``."""
    rest = relay['rest']
    how = f"resting until {stamp(rest['until'])}" \
        if relay['state'] == 'resting' else 'rest over'
    return (f"{how}, down since {stamp(rest['since'])}: "
            f"{printable(rest['why'])} (recorded in queue {rest['path']})")


def _mailer(name, settings, timeout):
    """What probing the destinations of one mailer found (its `probe`,
    `mailout.interfaces.IMailoutMailer`)."""
    from mailout import factories
    relays = factories.build_mailer(settings).probe(timeout)
    checked = {'name': name, 'relays': relays}
    if not relays:
        checked['checked'] = False      # nothing to check without sending
    return checked
