"""Whole processes: per-process configuration and fork safety."""
import subprocess
import sys
import textwrap

from helpers import config_text
from helpers import write_config

SCRIPT_HEAD = '''
import os, sys, threading, time
import transaction
from zope.component import getUtility
from zope.configuration import xmlconfig
from mailout.interfaces import IMailDelivery

xmlconfig.string("""
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:mail="http://namespaces.zope.org/mailout">
  <include package="mailout" file="meta.zcml" />
  <include package="mailout" />
  <mail:deliveries />
</configure>""")
delivery = getUtility(IMailDelivery, 'default')

def send_and_wait(subject):
    delivery.send('app@example.org', ['ann@example.org'],
                  f'Subject: {subject}\\r\\n\\r\\nbody\\r\\n')
    transaction.commit()
    new = os.path.join(delivery.queuePath, 'new')
    cur = os.path.join(delivery.queuePath, 'cur')
    deadline = time.monotonic() + 10
    while os.listdir(new) or os.listdir(cur):
        assert time.monotonic() < deadline, 'not delivered'
        time.sleep(0.01)
'''


def run(script, config):
    """Run ``script`` in a new Python process with $MAILOUT_CONFIG."""
    return subprocess.run(
        [sys.executable, '-c', SCRIPT_HEAD + textwrap.dedent(script)],
        env={'MAILOUT_CONFIG': config, 'PATH': '/usr/bin:/bin'},
        capture_output=True, text=True, timeout=60)


def process_config(tmp_path, name, port):
    return write_config(tmp_path / f'{name}.conf',
                        config_text(port, f'{tmp_path}/{name}-queue'))


def test_two_processes_two_configs_two_relays(tmp_path, start_sink):
    """Two processes with their own configs deliver to their own relays,
    like two ZEO clients with their own zope.conf."""
    sinks = [start_sink(), start_sink()]
    processes = [
        subprocess.Popen(
            [sys.executable, '-c',
             SCRIPT_HEAD + f'send_and_wait("from client{i}")'],
            env={'MAILOUT_CONFIG': process_config(tmp_path, f'client{i}',
                                                  sink.port),
                 'PATH': '/usr/bin:/bin'},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, sink in enumerate(sinks)]
    for p in processes:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
    for i, sink in enumerate(sinks):
        [received] = sink.messages()
        assert f'Subject: from client{i}'.encode() in received['data']


def test_zcml_starts_no_thread_and_forked_child_delivers(tmp_path, sink):
    """Importing mailout and loading ZCML start no thread; a child forked
    after that starts its own processor on its first commit."""
    result = run('''
        assert threading.active_count() == 1, threading.enumerate()
        pid = os.fork()
        if pid == 0:
            try:
                assert threading.active_count() == 1
                send_and_wait('from the child')
                assert delivery.processor.running
            except BaseException as e:
                print('child failed:', repr(e), flush=True)
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert threading.active_count() == 1     # still none in the parent
        print('ok')
    ''', process_config(tmp_path, 'forking', sink.port))
    assert result.stdout.strip().endswith('ok'), result.stdout + result.stderr
    [received] = sink.messages()
    assert b'Subject: from the child' in received['data']


def test_preload_fork_restarts_processor_in_child(tmp_path, sink):
    """gunicorn --preload: the parent's processor does not survive the fork;
    the child starts its own on first use and delivers."""
    result = run('''
        from zope.event import notify
        from zope.processlifetime import ProcessStarting
        notify(ProcessStarting())
        assert delivery.processor.running
        pid = os.fork()
        if pid == 0:
            try:
                assert not delivery.processor.running
                send_and_wait('after preload')
                assert delivery.processor.running
            except BaseException as e:
                print('child failed:', repr(e), flush=True)
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert delivery.processor.running
        print('ok')
    ''', process_config(tmp_path, 'preload', sink.port))
    assert result.stdout.strip().endswith('ok'), result.stdout + result.stderr
    assert len(sink.messages()) == 1


def test_exit_right_after_commit_loses_nothing(tmp_path, sink):
    """Exiting right after commit neither hangs nor loses a message: what
    the processor did not send stays queued, and is sent later once."""
    config = process_config(tmp_path, 'exiting', sink.port)
    result = run('''
        for i in range(20):
            delivery.send('app@example.org', ['ann@example.org'],
                          f'Subject: {i}\\r\\n\\r\\nbody\\r\\n')
            transaction.commit()
        print('exiting', flush=True)
    ''', config)
    assert result.returncode == 0, result.stderr
    result = run('''
        assert os.listdir(os.path.join(delivery.queuePath, 'cur')) == []
        print(len(os.listdir(os.path.join(delivery.queuePath, 'new'))))
        delivery.processor.run_once()
    ''', config)
    assert result.returncode == 0, result.stderr
    subjects = sorted(int(m['data'].split(b'Subject: ')[1].split(b'\r')[0])
                      for m in sink.wait_for(20))
    assert subjects == list(range(20))
