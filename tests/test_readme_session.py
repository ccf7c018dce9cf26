"""The captured output of every ``$ mailout`` command in README.rst's
section "Operate" is what a fresh replay of the session prints
(tests/readme_session.py), once the parts that differ from run to run are
written alike on both sides (`RULES`).  A stale output fails with a diff
naming its command; ``.venv/bin/python tests/readme_session.py --write``
puts fresh outputs into the README.
"""
import difflib
import re

import pytest

import readme_session
from readme_session import show_fragment

QUEUE_ID = (r'\b\d+\.\d+-[0-9a-f]+_[0-9a-f]+_[0-9a-f]+'   # TIME.PID-TOKEN_..
            r'\.[^\s,()~:/]+?(?:~[0-9a-f]+)?'            # .HOST~INCARNATION
            r'(?=\.r[0-9a-f]+\b|[\s,():]|$)')

#: What differs from run to run, and how both sides write it:
#: ``(pattern, replacement)``, applied in this order to each output line.
RULES = [
    # ISO 8601 times of queue files, attempts, next attempts.
    (r'\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\b', 'TIME'),
    # Time stamps of log lines.
    (r'\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\b', 'LOGTIME'),
    # RFC 2822 Date headers.
    (r'^(\s*Date: )\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$',
     r'\1DATE'),
    # Message-Ids mailout makes: <TIME.PID.RANDOM@HOST> (the addresses in
    # relay replies, <nobody@example.org>, stay).
    (r'<\d{14}\.\d+\.[0-9a-f]+@[^\s<>]+>', '<MESSAGE-ID>'),
    # Queue ids (a retried part's .rHEX suffix is kept, as .rHEX).
    (QUEUE_ID, 'QUEUEID'),
    (r'\bQUEUEID\.r[0-9a-f]+\b', 'QUEUEID.rHEX'),
    # Ports of the relays (the sinks' and the dead one).
    (r'\b127\.0\.0\.1:\d+\b', '127.0.0.1:PORT'),
    # The daemon's pid.
    (r'^mailout process \d+:', 'mailout process PID:'),
    # How long a check took.
    (r'\(\d+ ms\)', '(N ms)'),
    # Ages and durations: 3s, 4m 57s, 2h 5m, 1d 3h.
    (r'\b\d+[dhms](?: \d+[dhms])?\b', 'AGE'),
    # Sizes of queue files.
    (r'\b\d+ bytes\b', 'N bytes'),
    # Ages in JSON, in (fractional) seconds.
    (r'("\w*age": )\d+(?:\.\d+)?(?:e-?\d+)?', r'\1AGE'),
    # Columns padded to the width of what varies.
    (r'(?<=\S) {2,}', '  '),
]


def normalise(lines):
    result = []
    for line in lines:
        for pattern, replacement in RULES:
            line = re.sub(pattern, replacement, line)
        result.append(line)
    return result


def readme():
    with open(readme_session.README) as f:
        return f.read()


@pytest.fixture(scope='module')
def fresh(tmp_path_factory):
    """The session, replayed once for this module: `Run` s by command
    (the ``queue show`` ID written FRAGMENT)."""
    runs = readme_session.replay(tmp_path_factory.mktemp('readme'))
    return {show_fragment(run.command): run for run in runs}


def test_every_readme_command_is_replayed(fresh):
    """Each ``$ mailout`` command in the README is one of the session's,
    shown once, in the section "Operate"; each of the session's is shown.
    """
    text = readme()
    shown = [show_fragment(command) for command, _, _ in
             readme_session.readme_commands(text)]
    assert len(re.findall(r'^\s*\$ mailout\b', text, re.M)) == len(shown), \
        'a "$ mailout" command outside the section "Operate"'
    assert len(set(shown)) == len(shown), 'a command shown twice'
    assert [c for c in shown if c not in fresh] == [], \
        'README commands that tests/readme_session.py does not replay'
    assert [c for c in fresh if c not in shown] == [], \
        'commands of tests/readme_session.py that the README does not show'


def test_exit_statuses(fresh):
    """Each command exits as the README's prose says (`STATUS`)."""
    assert readme_session.unexpected_statuses(fresh.values()) == []


def test_readme_outputs_are_fresh(fresh):
    """Each README output is what the command prints now, normalised."""
    stale = []
    for command, output, (start, _) in readme_session.readme_commands(
            readme()):
        run = fresh.get(show_fragment(command))
        if run is None:
            continue        # test_every_readme_command_is_replayed says so
        old, new = normalise(output), normalise(run.output)
        if old != new:
            stale.append(f'$ {command}  (README.rst line {start}):\n'
                         + '\n'.join(difflib.unified_diff(
                             old, new, 'README.rst', 'fresh run',
                             lineterm='')))
    assert not stale, (
        'stale outputs in README.rst (after normalising; '
        '".venv/bin/python tests/readme_session.py --write" puts fresh '
        'ones in):\n\n' + '\n\n'.join(stale))


def test_show_fragment_is_part_of_the_id_shown():
    """The README's ``queue show ID`` names the message it shows."""
    [(command, output)] = [
        (command, output) for command, output, _ in
        readme_session.readme_commands(readme())
        if command.startswith('mailout queue show ')]
    fragment = command.split()[-1]
    assert output[0].startswith('id ') and fragment in output[0]


def test_write_puts_each_output_under_its_command(fresh, tmp_path):
    """`readme_session.write` replaces the outputs and nothing else: read
    back, the outputs are the session's exactly; outside the section
    "Operate" the text is the same; a second write changes nothing."""
    path = tmp_path / 'README.rst'
    text = readme()
    path.write_text(text)
    readme_session.write(fresh.values(), path)
    written = path.read_text()
    for command, output, _ in readme_session.readme_commands(written):
        assert output == fresh[show_fragment(command)].output, command
        assert command == fresh[show_fragment(command)].command
    start = readme_session.SECTION_START
    end = readme_session.SECTION_END
    assert written[:written.index(start)] == text[:text.index(start)]
    assert written[written.index(end):] == text[text.index(end):]
    readme_session.write(fresh.values(), path)
    assert path.read_text() == written
