"""Helpers shared by the tests."""
import json
import os
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class Sink:
    """An SMTP server process (tests/smtpsink.py) and what it received."""

    def __init__(self, directory, *options):
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, 'smtpsink.py'),
             '--dir', self.directory, *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f'SMTP sink did not start: {options}')
        self.port = int(line)

    def messages(self):
        names = sorted(n for n in os.listdir(self.directory)
                       if n.endswith('.json') and not n.startswith('.'))
        result = []
        for name in names:
            with open(os.path.join(self.directory, name)) as f:
                record = json.load(f)
            record['data'] = record['data'].encode('latin-1')
            result.append(record)
        return result

    def wait_for(self, count, timeout=10):
        """Wait until ``count`` messages arrived; return them."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages()
            if len(messages) >= count or time.monotonic() > deadline:
                return messages
            time.sleep(0.005)

    def clear(self):
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))

    def stop(self):
        stop_process(self.process)


def stop_process(process):
    """Stop a server process started with a stdin pipe: close its stdin,
    which it takes as the sign to stop; kill it if it does not."""
    if process.poll() is None:
        process.stdin.close()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def smtp_mailer(port, *lines, tls='none', name='relay'):
    """An ``<smtp-mailer NAME>`` section for 127.0.0.1:``port`` (or each of
    a list of ports, in order), with ``tls`` (left out if None) and
    ``lines`` (more keys)."""
    ports = port if isinstance(port, (list, tuple)) else [port]
    keys = [f'host 127.0.0.1:{each}' for each in ports]
    if tls is not None:
        keys.append(f'tls {tls}')
    keys.extend(lines)
    return f'<smtp-mailer {name}>\n{{}}\n</smtp-mailer>'.format(
        '\n'.join(f'  {key}' for key in keys if key))


def config_text(port, queue_path=None, mailer_lines=(), delivery_lines=(),
                direct=False, tls='none'):
    """The sections of a standalone config (for `write_config` or
    `load_config`): mailer 'relay' (`smtp_mailer`) -> 127.0.0.1:``port``;
    queued delivery 'default' in ``queue_path`` with ``delivery_lines``
    if a path is given; direct delivery 'urgent' if ``direct``."""
    sections = [smtp_mailer(port, *mailer_lines, tls=tls)]
    if queue_path is not None:
        keys = ['mailer relay', f'queue-path {queue_path}', *delivery_lines]
        sections.append('<queued-delivery default>\n{}\n'
                        '</queued-delivery>'.format(
                            '\n'.join(f'  {key}' for key in keys if key)))
    if direct:
        sections.append('<direct-delivery urgent>\n  mailer relay\n'
                        '</direct-delivery>')
    return '\n'.join(sections) + '\n'


def load_config(body):
    """The settings of ``<mailout>`` around ``body`` (`config.loads`)."""
    from mailout import config
    return config.loads('<mailout>\n' + textwrap.dedent(body)
                        + '\n</mailout>\n')


def write_config(path, body):
    """Write a standalone mailout file: ``<mailout>`` around ``body``."""
    with open(path, 'w') as f:
        f.write('<mailout>\n' + textwrap.dedent(body) + '\n</mailout>\n')
    return str(path)


def message(subject='Hello', body='Hi there.\n', headers=''):
    """A small message as bytes with CRLF line endings."""
    text = (f'From: sender@example.org\nTo: ann@example.org\n'
            f'Subject: {subject}\n{headers}\n{body}')
    return text.replace('\n', '\r\n').encode()


def mailer_and_queue(tmp_path, mailer_section):
    """The mailer of ``mailer_section`` (a whole ``<...-mailer NAME>``
    section) and a queue in ``tmp_path/q``, built from real configuration.
    """
    from mailout import config
    from mailout.factories import build_all
    settings = config.loads(f'''<mailout>
        {mailer_section}
        <queued-delivery default>
          mailer {mailer_section.split('>', 1)[0].split()[-1]}
          queue-path {tmp_path}/q
          processor off
        </queued-delivery>
    </mailout>''')
    mailers, deliveries = build_all(settings)
    [mailer] = mailers.values()
    return mailer, deliveries['default'].queue


def direct_delivery(port, *mailer_lines):
    """A direct delivery whose SMTP mailer talks plain SMTP to
    127.0.0.1:``port``, built from real configuration."""
    from mailout.factories import build_all
    _, deliveries = build_all(load_config(
        config_text(port, mailer_lines=mailer_lines, direct=True)))
    return deliveries['urgent']


def enqueue(queue, *subjects, to=('ann@example.org',),
            fromaddr='app@example.org', body='body\r\n', headers='',
            one_per_recipient=False, smtputf8=False, separately=False,
            message_ids=False):
    """Commit one message a subject into ``queue`` (a `Queue`), in that
    order, as a Zope process with ``processor off`` would: all in one
    transaction, or each in its own (``separately``).  The message is
    ``headers`` (``{to}`` becomes its recipients), ``Subject:`` and
    ``body``; with ``one_per_recipient``, a message a subject and
    recipient.  Their queue names, or their Message-Ids (``message_ids``).
    """
    from mailout.message import prepare
    envelopes = [
        prepare(fromaddr, list(recipients),
                headers.format(to=', '.join(recipients))
                + f'Subject: {subject}\r\n\r\n{body}', smtputf8=smtputf8)
        for subject in subjects
        for recipients in ([(one,) for one in to] if one_per_recipient
                           else [tuple(to)])]
    if separately:
        names = []
        for envelope in envelopes:
            names.append(queue.write(envelope))
            queue.commit(names[-1:])
    else:
        names = [queue.write(envelope) for envelope in envelopes]
        queue.commit(names)
    if message_ids:
        return [envelope.message_id for envelope in envelopes]
    return names


def queue_path(queue):
    """The directory of ``queue``: a `Queue`, a queued delivery or a path.
    """
    return str(getattr(queue, 'path', None)
               or getattr(queue, 'queuePath', None) or queue)


def files_in(queue, area):
    """The file names in ``area`` (tmp, new, cur, deferred, failed) of
    ``queue`` (see `queue_path`), sorted."""
    return sorted(os.listdir(os.path.join(queue_path(queue), area)))


def areas(queue):
    """``{area: files_in(queue, area)}`` for every area of ``queue``."""
    from mailout.queue.names import AREAS
    return {area: files_in(queue, area) for area in AREAS}


def failed(queue, name):
    """What ``failed/NAME`` holds, as an `Entry` (toaddrs, attempts)."""
    [entry] = [e for e in queue.locate(name) if e.area == 'failed']
    return entry


def zope_script(module, *args):
    """The command running Zope's console script ``module`` with ``args``
    under sys.executable; its bin/NAME is not beside it in a buildout."""
    argv = [str(arg) for arg in args]
    return [sys.executable, '-c', f'import sys; sys.argv[1:] = {argv!r}; '
                                  f'from {module} import main; '
                                  'sys.exit(main())']


def write_zope_conf(instance, text, imports=True):
    """etc/zope.conf of ``instance`` with ``text`` appended (and
    ``%import mailout`` first); its path."""
    conf = instance / 'etc' / 'zope.conf'
    base = conf.read_text()
    conf.write_text(('%import mailout\n' if imports else '') + base + text)
    return str(conf)


def configure_zope(path):
    """Load zope.conf as Zope2.Startup.run.make_wsgi_app does; use with
    the ``zope_state`` fixture, which puts back what this changes."""
    import App.config
    from Zope2.Startup.handlers import handleWSGIConfig
    from Zope2.Startup.options import ZopeWSGIOptions
    opts = ZopeWSGIOptions(configfile=path)()
    handleWSGIConfig(opts.configroot, opts.confighandlers)
    App.config.setConfiguration(opts.configroot)
    return opts.configroot


def stopped(pid, timeout=10):
    """Wait until every thread of process ``pid`` is stopped (a SIGSTOP
    took effect); whether it was within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        try:
            for task in os.listdir(f'/proc/{pid}/task'):
                with open(f'/proc/{pid}/task/{task}/stat') as f:
                    states.append(f.read().rsplit(')', 1)[1].split()[0])
        except FileNotFoundError:
            pass
        if all(state in 'TtZX' for state in states):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
