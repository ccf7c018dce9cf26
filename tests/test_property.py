"""Property: what send() accepts reaches the relay byte for byte, but for
the documented normalisation (CRLF line endings, Message-Id and Date added
when missing, Bcc removed)."""
import email.message
import email.policy
import re

import pytest
import transaction
from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from helpers import direct_delivery
from mailout.interfaces import MessageError
from mailout.interfaces import MessageTooLarge
from mailout.message import normalise_line_endings
from mailout.message import prepare

header_names = st.from_regex(r'\A[A-Za-z][A-Za-z0-9-]{0,15}\Z') | \
    st.sampled_from(['Bcc', 'BCC', 'Message-Id', 'Date', 'Subject', 'To'])
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126),
                        max_size=60)
headers = st.lists(st.tuples(header_names, header_values), min_size=1,
                   max_size=8)
line_endings = st.sampled_from(['\n', '\r\n', '\r'])
body_lines = st.lists(st.text(st.characters(exclude_characters='\r\n',
                                            exclude_categories=('Cs',)),
                              max_size=120), max_size=10)


def expected_bytes(header_list, lines):
    kept = ''.join(f'{n}:{v}\r\n' for n, v in header_list
                   if n.lower() != 'bcc')
    return (kept + '\r\n' + ''.join(f'{line}\r\n' for line in lines)) \
        .encode('utf-8')


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header_list=headers, lines=body_lines, eol=line_endings,
       as_bytes=st.booleans())
def test_accepted_message_arrives_unchanged(_session_sink, tmp_path,
                                            header_list, lines, eol,
                                            as_bytes):
    """Any message send() accepts arrives with the same bytes."""
    sink = _session_sink
    sink.clear()
    text = ''.join(f'{n}:{v}{eol}' for n, v in header_list) + eol \
        + ''.join(line + eol for line in lines)
    try:
        direct_delivery(sink.port).send('a@example.org', ['b@example.org'],
                                        text.encode() if as_bytes else text)
    except MessageError:
        transaction.abort()
        assume(False)
    transaction.commit()
    [received] = sink.messages()
    expected = expected_bytes(header_list, lines)
    assert received['data'].endswith(expected)
    added = received['data'][:-len(expected)].decode()
    assert re.fullmatch(r'(Message-Id: <[^>]+>\r\n)?(Date: [^\r]+\r\n)?',
                        added)


line_pieces = st.lists(st.sampled_from(
    ['\r', '\n', '\r\n', 'x', ' ', 'Bcc: a@x.org', 'bcc:', 'Resent-Bcc: b',
     'Subject: s', 'Message-Id: <a@x>', 'Date: d', ':']), max_size=40)


@settings(max_examples=300, deadline=None)
@given(pieces=line_pieces)
def test_normalising_is_the_line_ending_regex(pieces):
    """Replacing whole buffers gives what the per-line-ending regex gave."""
    data = ''.join(pieces).encode()
    assert normalise_line_endings(data) == \
        re.sub(rb'\r\n|\r|\n', b'\r\n', data)


@settings(max_examples=300, deadline=None)
@given(pieces=line_pieces, as_bytes=st.booleans())
def test_sizing_before_parsing_never_refuses_what_fits(pieces, as_bytes):
    """The size checked before parsing is a lower bound of the prepared
    size: a message exactly at the limit passes, one byte over does not."""
    text = ''.join(pieces)
    message = text.encode() if as_bytes else text
    try:
        size = len(prepare('a@x.org', ['b@x.org'], message).message)
    except MessageError:
        assume(False)
    assert len(prepare('a@x.org', ['b@x.org'], message,
                       max_size=size).message) == size
    with pytest.raises(MessageTooLarge):
        prepare('a@x.org', ['b@x.org'], message, max_size=size - 1)


message_text = st.lists(st.sampled_from(
    ['\r', '\n', '\r\n', 'x', ' ', 'From here', 'ü', '.']), max_size=30) \
    .map(''.join)


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(message_text, min_size=1, max_size=3),
       policy=st.sampled_from([email.policy.compat32, email.policy.default]))
def test_message_objects_serialise_as_as_bytes_does(texts, policy):
    """Message objects are written line by line (not split into a list
    first) into the same bytes as ``as_bytes()`` with CRLF gives."""
    if policy is email.policy.compat32:
        m = email.message.Message()
        if len(texts) == 1:
            m.set_payload(texts[0])
        else:
            m.set_type('multipart/mixed')
            for text in texts:
                part = email.message.Message()
                part.set_payload(text)
                m.attach(part)
    else:
        m = email.message.EmailMessage()
        m.set_content(texts[0])
        for text in texts[1:]:
            m.add_attachment(text)
    m['Message-Id'] = '<a@example.org>'
    m['Date'] = 'Fri, 27 Nov 2026 06:00:00 -0000'
    try:
        expected = m.as_bytes(policy=policy.clone(linesep='\r\n'))
    except ValueError:      # non-ASCII text in a compat32 message
        with pytest.raises(MessageError):
            prepare('a@x.org', ['b@x.org'], m)
    else:
        assert prepare('a@x.org', ['b@x.org'], m).message == expected
