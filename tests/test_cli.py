"""The mailout command."""
import os
import subprocess
import sys


def mailout(*args):
    """Run the installed ``mailout`` console script."""
    script = os.path.join(os.path.dirname(sys.executable), 'mailout')
    return subprocess.run([script, *args], capture_output=True, text=True,
                          timeout=60)


def test_demo_runs_end_to_end():
    """`mailout demo` commits 3 messages, aborts one, and all 3 arrive."""
    result = mailout('demo')
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'the SMTP server received 3 message(s)' in out
    for i in (1, 2, 3):
        assert f'to user{i}@example.org: demo message {i}' in out
    assert 'aborted@example.org' not in out.split('received')[1]
    assert 'queue now holds: tmp 0, new 0, cur 0, deferred 0, failed 0' in out
    assert out.rstrip().endswith('demo succeeded')


def test_usage_errors_exit_2():
    result = mailout('no-such-command')
    assert result.returncode == 2
    assert 'invalid choice' in result.stderr
