"""Validation and normalisation at send() (mailout.message)."""
import email.message
import email.policy
import tracemalloc

import pytest

import mailout
from mailout.message import Envelope
from mailout.message import prepare
from mailout.message import printable


def msg(text):
    return text.replace('\n', '\r\n').encode()


GOOD = msg('From: a@example.org\nSubject: hi\n\nbody\n')


def test_adds_message_id_and_date_keeps_the_rest():
    """Missing Message-Id and Date are added in front; the rest is kept."""
    envelope = prepare('a@example.org', ['b@example.org'], GOOD)
    assert envelope.message.endswith(GOOD)
    assert envelope.message.startswith(
        f'Message-Id: <{envelope.message_id}>\r\nDate: '.encode())


def test_given_message_id_is_returned_without_brackets():
    data = msg('Message-Id: <x.1@example.org>\nDate: today\n\nbody\n')
    envelope = prepare('a@example.org', ['b@example.org'], data)
    assert envelope.message_id == 'x.1@example.org'
    assert envelope.message == data


def test_line_endings_are_normalised_to_crlf():
    """Bare LF and CR are turned into CRLF, not rejected."""
    envelope = prepare('a@example.org', ['b@example.org'],
                       'Subject: x\n\nline one\rline two\r\nthree\n')
    assert envelope.message.endswith(
        b'Subject: x\r\n\r\nline one\r\nline two\r\nthree\r\n')


def test_bcc_is_removed():
    """Bcc never leaves in the headers, folded lines included."""
    data = msg('Subject: x\nBcc: secret@example.org,\n more@example.org\n'
               'To: b@example.org\n\nbody\n')
    envelope = prepare('a@example.org', ['b@example.org'], data)
    assert b'secret' not in envelope.message
    assert b'more@' not in envelope.message
    assert b'To: b@example.org' in envelope.message


def test_email_message_objects():
    """email.message.Message and EmailMessage are serialised with CRLF."""
    m = email.message.EmailMessage()
    m['Subject'] = 'Grüße'
    m.set_content('é\n' * 3)
    envelope = prepare('a@example.org', ['b@example.org'], m)
    assert b'\r\n\r\n' in envelope.message
    assert b'\n' not in envelope.message.replace(b'\r\n', b'')


def test_recipients_deduplicated_in_order():
    envelope = prepare('a@example.org', ['c@x.org', 'b@x.org', 'c@x.org'],
                       GOOD)
    assert envelope.toaddrs == ('c@x.org', 'b@x.org')


def test_display_name_form_is_accepted():
    """'Name <addr>' as smtplib accepts it becomes the bare address."""
    envelope = prepare('Ann <a@example.org>', ['b@example.org'], GOOD)
    assert envelope.fromaddr == 'a@example.org'


@pytest.mark.parametrize('fromaddr, toaddrs, message, error, text', [
    ('', ['b@x.org'], GOOD, mailout.InvalidSender, 'empty'),
    (None, ['b@x.org'], GOOD, mailout.InvalidSender, 'must be a string'),
    ('no-at-sign', ['b@x.org'], GOOD, mailout.InvalidSender, 'not a valid'),
    ('a@x.org\r\nRCPT TO:<evil@x.org>', ['b@x.org'], GOOD,
     mailout.InvalidSender, 'line break'),
    ('a@x.org', [], GOOD, mailout.NoRecipients, 'no recipients'),
    ('a@x.org', 'b@x.org', GOOD, mailout.InvalidRecipient, 'not a string'),
    ('a@x.org', ['b@x.org\n'], GOOD, mailout.InvalidRecipient, 'line break'),
    ('a@x.org', ['b@x.org\0'], GOOD, mailout.InvalidRecipient, 'NUL'),
    ('a@x.org', ['b c@x.org'], GOOD, mailout.InvalidRecipient, 'not a valid'),
    ('a@x.org', ['b@-x.org'], GOOD, mailout.InvalidRecipient, 'not a valid'),
    ('a@x.org', ['ü@x.org'], GOOD, mailout.NonASCIIAddress, 'not ASCII'),
    ('a@x.org', ['b@x.org'], b'just a body\r\n', mailout.InvalidHeader,
     'malformed first line'),
    ('a@x.org', ['b@x.org'], b'\r\nbody\r\n', mailout.InvalidHeader,
     'malformed'),
    ('a@x.org', ['b@x.org'], b'', mailout.InvalidHeader, 'malformed'),
    ('a@x.org', ['b@x.org'], msg('Subject: x\nnot a header\n\nbody'),
     mailout.InvalidHeader, 'header block'),
    ('a@x.org', ['b@x.org'], msg('Message-Id: nobrackets@x\n\nbody'),
     mailout.InvalidMessageId, 'malformed Message-Id'),
    ('a@x.org', ['b@x.org'], msg('Message-Id: <a@x>\nMessage-ID: <b@x>\n\n'),
     mailout.InvalidMessageId, 'more than one'),
    ('a@x.org', ['b@x.org'], 42, mailout.MessageError, 'not int'),
    ('a@x.org', ['b@x.org'], ['Subject: x'], mailout.MessageError,
     'not list'),
    ('a@x.org', ['b@x.org'], 'Subject: \ud800\r\n\r\n', mailout.MessageError,
     'cannot be encoded as UTF-8'),
    ('a@x.org', ['b\udc80@x.org'], GOOD, mailout.InvalidRecipient,
     'not valid Unicode'),
    ('a@x.org', None, GOOD, mailout.InvalidRecipient, 'not NoneType'),
    ('a@x.org', [42], GOOD, mailout.InvalidRecipient, 'must be a string'),
    ('a@x.org, b@x.org', ['c@x.org'], GOOD, mailout.InvalidSender,
     'not a valid'),
    ('<>', ['c@x.org'], GOOD, mailout.InvalidSender, 'not an address'),
    ('a@x.org.', ['c@x.org'], GOOD, mailout.InvalidSender, 'not a valid'),
    ('a..b@x.org', ['c@x.org'], GOOD, mailout.InvalidSender, 'not a valid'),
    ('a@x.org', ['@x.org'], GOOD, mailout.InvalidRecipient, 'not a valid'),
    ('a@x.org', ['b@'], GOOD, mailout.InvalidRecipient, 'not a valid'),
    ('a@x.org', ['x' * 65 + '@x.org'], GOOD, mailout.InvalidRecipient,
     'not a valid'),
    ('a@x.org', ['b@' + 'x' * 60 + '.' + 'y' * 60 + '.' + 'z' * 60 + '.'
                 + 'w' * 60 + '.' + 'v' * 60 + '.org'], GOOD, mailout.InvalidRecipient,
     'not a valid'),
    ('ü@x.org', ['b@x.org'], GOOD, mailout.NonASCIIAddress, 'smtputf8'),
    ('a@x.org', ['b@x.org'], msg(' folded first\nSubject: x\n\n'),
     mailout.InvalidHeader, 'first line'),
    ('a@x.org', ['b@x.org'], msg('Subject : x\n\nbody'),
     mailout.InvalidHeader, 'malformed'),
    ('a@x.org', ['b@x.org'], msg('Subject: a\0b\n\nbody'),
     mailout.InvalidHeader, 'NUL'),
    ('a@x.org', ['b@x.org'], msg('Subject: x\n\n' + 'y' * 999 + '\n'),
     mailout.LineTooLong, '999 bytes'),
    ('a@x.org', ['b@x.org'], msg('Message-Id: <a b@x>\n\nbody'),
     mailout.InvalidMessageId, 'malformed'),
    ('a@x.org', ['b@x.org'], msg('Message-Id: <>\n\nbody'),
     mailout.InvalidMessageId, 'malformed'),
])
def test_bad_input(fromaddr, toaddrs, message, error, text):
    """Each kind of bad input raises its specific MailoutError subclass."""
    with pytest.raises(error, match=text):
        prepare(fromaddr, toaddrs, message)


def injected(header, value):
    m = email.message.Message()     # compat32 lets the value in unchecked
    m[header] = value
    m.set_payload('body')
    return m


@pytest.mark.parametrize('header, value', [
    ('Subject', 'hi\r\nBcc: victim@example.org'),
    ('To', '"Evil\r\nBcc: victim@example.org" <a@example.org>'),
    ('From', 'Name\nX-Injected: yes <a@example.org>'),
    ('Subject', 'hi\rBcc: victim@example.org'),
])
def test_header_injection(header, value):
    """A header value that would start a new header is refused."""
    with pytest.raises(mailout.InvalidHeader, match='header injection'):
        prepare('a@example.org', ['b@example.org'], injected(header, value))


def test_folded_header_value_is_fine():
    m = injected('Subject', 'a long\r\n folded subject')
    assert b'folded subject' in prepare('a@x.org', ['b@x.org'], m).message


@pytest.mark.parametrize('address', [
    '"john doe"@example.org', 'a+tag@example.org', 'a@[127.0.0.1]',
    'user@localhost', b'bytes@example.org', '<angle@example.org>',
    "o'brien@example.org"])
def test_unusual_but_valid_addresses(address):
    """Valid addr-specs of less common shapes are accepted."""
    envelope = prepare('a@example.org', [address], GOOD)
    assert envelope.toaddrs[0].strip('<>') == (
        address.decode() if isinstance(address, bytes) else address
    ).strip('<>')


def test_non_ascii_addresses_with_smtputf8():
    """With the mailer's smtputf8 on, internationalised addresses pass."""
    envelope = prepare('josé@exämple.org', ['用户@例子.广告'], GOOD,
                       smtputf8=True)
    assert envelope.toaddrs == ('用户@例子.广告',)


def test_too_large():
    with pytest.raises(mailout.MessageTooLarge, match='max-message-size'):
        prepare('a@x.org', ['b@x.org'], GOOD + b'xx\r\n' * 250,
                max_size=1000)


def test_envelope_from_headers(sink, config_file):
    """send_message() takes the envelope from Sender/From and To/Cc/Bcc."""
    from zope.configuration import xmlconfig
    import transaction
    xmlconfig.string(f'''
      <configure xmlns:mail="http://namespaces.zope.org/mailout">
        <include package="mailout" file="meta.zcml" />
        <mail:deliveries config="{config_file}" />
      </configure>''')
    m = email.message.EmailMessage()
    m['From'] = 'Ann <ann@example.org>'
    m['To'] = 'Bob <bob@example.org>, carl@example.org'
    m['Cc'] = 'dora@example.org'
    m['Bcc'] = 'eve@example.org'
    m['Subject'] = 'hello'
    m.set_content('hi')
    mailout.send_message(m, delivery='urgent')
    mailout.send_message(m, fromaddr='bounce@example.org',
                         toaddrs=['zed@example.org'], delivery='urgent')
    transaction.commit()
    first, second = sink.messages()
    assert first['mail_from'] == 'ann@example.org'
    assert first['rcpt_tos'] == ['bob@example.org', 'carl@example.org',
                                 'dora@example.org', 'eve@example.org']
    assert b'eve@' not in first['data'] and b'Bcc' not in first['data']
    assert second['mail_from'] == 'bounce@example.org'
    assert second['rcpt_tos'] == ['zed@example.org']
    assert m['Bcc'] == 'eve@example.org'    # the caller's object is intact


def test_send_message_needs_a_sender():
    m = email.message.EmailMessage()
    m['To'] = 'b@x.org'
    with pytest.raises(mailout.InvalidSender, match='pass fromaddr'):
        mailout.send_message(m)


# -- printable (issue 9, item 18) ---------------------------------------------

@pytest.mark.parametrize('text, shown', [
    ('ann@example.org', 'ann@example.org'),
    ('josé@exämple.org 用户', 'josé@exämple.org 用户'),
    ('"a\x1b[2Jb"@x.org', r'"a\x1b[2Jb"@x.org'),
    ('a\x7f\x08\tb\r\n', r'a\x7f\x08\tb\r\n'),
    ('a\x85\x9bb', r'a\x85\x9bb'),
    ('a\u2028\u2029b', r'a\u2028\u2029b'),
    ('evil\u202egpj.exe', r'evil\u202egpj.exe'),
    ('zero\u200bwidth\ufeff', r'zero\u200bwidth\ufeff'),
    ('no\xa0break', r'no\xa0break'),
    ('lone \udc80', r'lone \udc80'),
])
def test_printable_escapes_what_a_terminal_would_act_on(text, shown):
    """Controls (C0, C1, DEL), format characters, separators and lone
    surrogates are escaped as repr escapes them; the rest is kept."""
    assert printable(text) == shown


# -- size before parsing (issue 9, item 16) -----------------------------------

DEFAULT_MAX_SIZE = 10 * 1024 * 1024     # component.xml: max-message-size 10MB


def big_text(size, shape):
    """A message of about ``size`` bytes with LF line endings: ordinary
    lines, or the shapes that cost most per byte (a line break per byte, a
    header field per 5 bytes)."""
    head = 'From: a@example.org\nSubject: big\n'
    if shape == 'text lines':
        return head + '\n' + ('x' * 76 + '\n') * (size // 77)
    if shape == 'empty lines':
        return head + '\n' * (size - len(head))
    if shape == 'header lines':
        return head + 'X: y\n' * (size // 5) + '\nbody\n'
    raise ValueError(shape)


def in_form(text, form):
    if form == 'str':
        return text
    if form == 'bytes':
        return text.encode()
    header, body = text.split('\n\n', 1)
    m = email.message.EmailMessage()
    for line in header.splitlines():
        m[line.split(':')[0]] = line.split(':', 1)[1].strip()
    m.set_content(body, cte='7bit')
    return m


def peak_memory(function, *args, **kw):
    """``(result or exception, bytes allocated at the peak)`` of a call."""
    tracemalloc.start()
    try:
        result = function(*args, **kw)
    except Exception as e:
        result = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, peak


@pytest.mark.parametrize('form, shape', [
    ('str', 'text lines'), ('str', 'empty lines'), ('str', 'header lines'),
    ('bytes', 'text lines'), ('bytes', 'empty lines'),
    ('bytes', 'header lines'),
    ('EmailMessage', 'text lines'), ('EmailMessage', 'empty lines')])
def test_oversized_message_is_refused_before_parsing(form, shape):
    """9 MB against a 1 MB limit: MessageTooLarge without copying, splitting
    or serialising the message (it cost 676 MB)."""
    message = in_form(big_text(9_000_000, shape), form)
    error, peak = peak_memory(prepare, 'a@example.org', ['b@example.org'],
                              message, max_size=1_000_000)
    assert isinstance(error, mailout.MessageTooLarge), error
    assert 'max-message-size of 1000000 bytes' in str(error)
    assert peak < 1_000_000, f'{peak / 1e6:.1f} MB to refuse 9 MB'


@pytest.mark.parametrize('form, shape', [
    ('str', 'text lines'), ('str', 'empty lines'), ('str', 'header lines'),
    ('bytes', 'text lines'), ('bytes', 'empty lines'),
    ('bytes', 'header lines'), ('EmailMessage', 'text lines'),
    ('EmailMessage', 'empty lines')])
def test_message_at_the_default_limit_in_bounded_memory(form, shape):
    """A message just under the default limit is validated using a few
    times its own size, whatever its shape."""
    text = big_text(DEFAULT_MAX_SIZE // 2, shape)
    # Normalising doubles a line break per byte: size it after that.
    text = big_text(DEFAULT_MAX_SIZE * len(text)
                    // len(prepare('a@x.org', ['b@x.org'], text).message)
                    - 1000, shape)
    envelope, peak = peak_memory(prepare, 'a@example.org', ['b@example.org'],
                                 in_form(text, form),
                                 max_size=DEFAULT_MAX_SIZE)
    assert isinstance(envelope, Envelope), envelope
    size = len(envelope.message)
    assert DEFAULT_MAX_SIZE * 0.95 < size <= DEFAULT_MAX_SIZE
    assert peak < 3 * size, f'{peak / size:.1f} times the message size'


def test_size_that_counts_is_the_normalised_one_without_bcc():
    """Line endings count as CRLF, Bcc does not count, added Message-Id and
    Date do; the limit itself is allowed."""
    text = 'Subject: x\n\n' + 'y\n' * 100
    final = len(prepare('a@x.org', ['b@x.org'], text).message)
    assert len(prepare('a@x.org', ['b@x.org'], text, max_size=final)
               .message) == final
    with pytest.raises(mailout.MessageTooLarge, match=f'is {final} bytes'):
        prepare('a@x.org', ['b@x.org'], text, max_size=final - 1)
    bcc = 'Bcc: ' + ', '.join(['someone@example.org'] * 50) + '\n'
    assert len(bcc + text) > final
    for form in (bcc + text, (bcc + text).encode(),
                 (bcc + text).replace('\n', '\r\n')):
        assert len(prepare('a@x.org', ['b@x.org'], form, max_size=final)
                   .message) == final


# -- control and format characters in addresses (issue 9, item 18) ------------

@pytest.mark.parametrize('address', [
    '"a\x1b[2Jb"@x.org', '"a\x7fb"@x.org', '"a\tb"@x.org', '"a\x08b"@x.org',
    '"a\\\x1b"@x.org', 'a@[1.2.3\x1b]', '"a\x85b"@x.org', 'a\x1b@x.org'])
def test_control_characters_in_addresses_are_refused(address):
    """SMTP allows no control character in an address, quoted or not."""
    with pytest.raises(mailout.InvalidRecipient, match='control'):
        prepare('a@x.org', [address], GOOD)
    with pytest.raises(mailout.InvalidSender, match='control'):
        prepare(address, ['b@x.org'], GOOD, smtputf8=True)


@pytest.mark.parametrize('address', [
    'a\u2028b@x.org', 'a\u2029b@x.org', 'a\x85b@x.org', 'a\x9bb@x.org',
    'a\u202eb@x.org', 'a\u200bb@x.org', 'a\ufeffb@x.org', 'a@x\u202e.org',
    'a\xa0b@x.org', '"a\u2028b"@x.org', 'a\ufffdb@x.org',
    'a@x.org\u2028', '\u202ea@x.org', 'Ann\x1b <a@x.org>'])
def test_invisible_characters_in_utf8_addresses_are_refused(address):
    """With smtputf8, letters of any script pass but separators, C1
    controls, format characters (bidi overrides, zero width), non-ASCII
    spaces and U+FFFD (what undecodable bytes became) do not."""
    with pytest.raises(mailout.InvalidRecipient,
                       match='control|format|replacement'):
        prepare('a@x.org', [address], GOOD, smtputf8=True)


@pytest.mark.parametrize('message_id', ['<a\x1bb@x>', '<a@x\x7f>'])
def test_control_characters_in_message_id_are_refused(message_id):
    with pytest.raises(mailout.InvalidMessageId, match='malformed'):
        prepare('a@x.org', ['b@x.org'],
                f'Message-Id: {message_id}\r\n\r\nbody\r\n')


# -- headers of message objects (issue 9, item 19) ----------------------------

def multipart(value, policy='compat32'):
    """A two-part message whose second part has an X-Note: value."""
    if policy == 'compat32':
        outer = email.message.Message()
        outer['Subject'] = 'x'
        outer.set_type('multipart/mixed')
        part = email.message.Message()
        part.set_payload('attached')
        outer.attach(part)
    else:
        outer = email.message.EmailMessage()
        outer['Subject'] = 'x'
        outer.set_content('text')
        outer.add_attachment('attached')
        part = outer.get_payload()[1]
    part.set_raw('X-Note', value)   # unchecked, as a parser or app may
    return outer


@pytest.mark.parametrize('policy', ['compat32', 'default'])
@pytest.mark.parametrize('value', [
    'hi\rBcc: victim@example.org', 'hi\nnot a header',
    'hi\r\n\r\nbody injected', 'hi\r\nBcc: victim@example.org'])
def test_line_breaks_in_headers_of_sub_parts_are_refused(value, policy):
    with pytest.raises(mailout.InvalidHeader, match='header injection'):
        prepare('a@x.org', ['b@x.org'], multipart(value, policy))


@pytest.mark.parametrize('policy', ['compat32', 'default'])
def test_nul_in_headers_of_sub_parts_is_refused(policy):
    with pytest.raises(mailout.InvalidHeader, match='NUL'):
        prepare('a@x.org', ['b@x.org'], multipart('a\0b', policy))


@pytest.mark.parametrize('name', [
    'X-A: b\r\nBcc', 'X-A\nBcc', 'X A', 'X-A:', '', 'Ümlaut', 'X\x1b', 42])
def test_malformed_header_names_are_refused(name):
    """A header name is printable ASCII without colon or space (RFC 5322
    ftext): a line break in it would start another header."""
    m = email.message.Message()
    m[name] = 'victim@example.org'
    m.set_payload('body')
    with pytest.raises(mailout.InvalidHeader, match='header name'):
        prepare('a@x.org', ['b@x.org'], m)
    outer = multipart('x')
    outer.attach(m)
    with pytest.raises(mailout.InvalidHeader, match='header name'):
        prepare('a@x.org', ['b@x.org'], outer)


@pytest.mark.parametrize('value', [42, b'bytes', None, ['a@x.org']])
def test_header_values_that_are_not_text_are_refused(value):
    """int or bytes values made AttributeError deep in the email package."""
    m = email.message.Message()
    m['X-Value'] = value
    m.set_payload('body')
    with pytest.raises(mailout.InvalidHeader, match='X-Value.*not text'):
        prepare('a@x.org', ['b@x.org'], m)
    outer = multipart('x')
    outer.attach(m)
    with pytest.raises(mailout.InvalidHeader, match='X-Value.*not text'):
        prepare('a@x.org', ['b@x.org'], outer)


def test_encoded_header_objects_are_fine():
    """email.header.Header values (compat32) are text."""
    import email.header
    m = email.message.Message()
    m['Subject'] = email.header.Header('Grüße', 'utf-8')
    m.set_payload('body')
    assert b'Subject: =?utf-8?' in prepare('a@x.org', ['b@x.org'], m).message


@pytest.mark.parametrize('form', ['bytes', 'compat32', 'default'])
def test_resent_bcc_is_removed_like_bcc(form):
    text = ('Subject: x\r\nResent-Bcc: secret@example.org,\r\n'
            ' more@example.org\r\nRESENT-BCC: third@example.org\r\n'
            'Resent-To: b@example.org\r\n\r\nbody\r\n')
    if form == 'bytes':
        message = text.encode()
    else:
        message = email.message_from_string(
            text, policy=getattr(email.policy, form))
    data = prepare('a@x.org', ['b@x.org'], message).message
    assert b'secret' not in data and b'more@' not in data
    assert b'third' not in data
    assert b'Resent-To: b@example.org' in data


def test_sizing_takes_str_and_bytes_subclasses():
    """zope.i18nmessageid.Message is a str subclass."""
    class Text(str):
        pass

    class Data(bytes):
        pass

    for message in (Text('Subject: x\n\nbody\n'), Data(b'Subject: x\n\n')):
        assert prepare('a@x.org', ['b@x.org'], message, max_size=1000)
