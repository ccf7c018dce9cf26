"""mailout -> a real Postfix (private instance on loopback) -> SMTP sink.

Skipped where /usr/sbin/postfix is missing, mandatory when
MAILOUT_TEST_POSTFIX is set (.ci/run installs Debian's postfix and sets it).
"""
import os
import re
import time

import pytest
import transaction

import postfix as pf
from helpers import areas
from helpers import message
from postfix import split_received

SENDER = 'sender@example.org'


def dated(subject, message_id, **kw):
    """A message with its own Message-Id and Date, so that neither mailout
    nor Postfix adds any header but Received."""
    return message(subject, headers=f'Message-Id: <{message_id}>\n'
                   'Date: Wed, 25 Nov 2026 09:00:00 +0000\n', **kw)


def wait_for_area(delivery, area, count=1, timeout=10):
    """Wait until ``area`` of the queue holds ``count`` files and nothing is
    waiting or claimed; return the files' contents."""
    deadline = time.monotonic() + timeout
    while True:
        files = areas(delivery)
        if len(files[area]) >= count and not files['new'] \
                and not files['cur']:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f'queue: {files}')
        time.sleep(0.01)
    contents = []
    for name in files[area]:
        with open(os.path.join(delivery.queuePath, area, name), 'rb') as f:
            contents.append(f.read())
    return contents


def wait_until_drained(delivery):
    """Wait until nothing in the queue is waiting or claimed."""
    wait_for_area(delivery, 'failed', count=0)


def test_message_arrives_with_envelope_and_body(through_postfix, relay_sink):
    """A queued message reaches the sink through Postfix, envelope and bytes
    intact below Postfix's Received header."""
    delivery = through_postfix()
    data = dated('via postfix', 'pf-one@example.org',
                 body='Line one.\n\n.leading dot\nLast line.\n')
    delivery.send(SENDER, ['ann@example.org', 'bob@example.org'], data)
    transaction.commit()
    [received] = relay_sink.wait_for(1)
    assert received['mail_from'] == SENDER
    assert sorted(received['rcpt_tos']) == ['ann@example.org',
                                            'bob@example.org']
    headers, rest = split_received(received['data'])
    assert rest == data
    [header] = headers
    assert 'by postfix.mailout.test (Postfix) with ESMTP id' in header
    assert 'client.mailout.test' in header        # mailout's EHLO name
    wait_until_drained(delivery)
    assert areas(delivery) == dict.fromkeys(areas(delivery), [])


def test_several_messages_over_one_connection(through_postfix, relay_sink,
                                              postfix):
    """Five messages queued together go to Postfix over one connection."""
    delivery = through_postfix()
    since = postfix.log_offset()
    sent = {}
    for i in range(5):
        data = dated(f'batch {i}', f'pf-batch-{i}@example.org')
        delivery.send(SENDER, [f'rcpt{i}@example.org'], data)
        sent[f'rcpt{i}@example.org'] = data
    transaction.commit()
    received = relay_sink.wait_for(5)
    assert len(received) == 5
    assert {m['rcpt_tos'][0]: split_received(m['data'])[1]
            for m in received} == sent
    delivery.processor.stop()           # QUIT: Postfix logs the totals
    match = postfix.wait_for_log(
        r'disconnect from \S+\[127\.0\.0\.1\] (.*)$', since)
    assert 'mail=5 rcpt=5 data=5 quit=1' in match.group(1)
    assert len(re.findall(r'\bconnect from ', postfix.log_since(since))) \
        == 1


def test_pipelined_stream_with_refusals(through_postfix, relay_sink,
                                        postfix):
    """Postfix offers PIPELINING: a stream of messages, some with a
    refused recipient, one with nothing but a refused one (Postfix answers
    its pipelined DATA with 554), goes over one connection; each outcome as
    without pipelining, and Postfix logs no improper pipelining."""
    delivery = through_postfix()
    since = postfix.log_offset()
    recipients = [['ann@example.org'], [pf.REJECTED],
                  ['ann@example.org', pf.REJECTED, 'bob@example.org'],
                  ['bob@example.org'], ['ann@example.org']]
    for i, to in enumerate(recipients):
        delivery.send(SENDER, to, dated(f'stream {i}',
                                        f'pf-stream-{i}@example.org'))
    transaction.commit()
    received = relay_sink.wait_for(4)
    assert sorted((split_received(m['data'])[1].split(b'Subject: ')[1]
                   .split(b'\r\n')[0].decode(), sorted(m['rcpt_tos']))
                  for m in received) == [
        ('stream 0', ['ann@example.org']),
        ('stream 2', ['ann@example.org', 'bob@example.org']),
        ('stream 3', ['bob@example.org']),
        ('stream 4', ['ann@example.org'])]
    failed = wait_for_area(delivery, 'failed', count=2)
    assert all(f'X-Mailout-To: {pf.REJECTED}'.encode() in f
               and b' 550 5.1.1 ' in f for f in failed)
    delivery.processor.stop()           # QUIT: Postfix logs the totals
    match = postfix.wait_for_log(
        r'disconnect from \S+\[127\.0\.0\.1\] (.*)$', since)
    assert 'mail=5 ' in match.group(1)
    log = postfix.log_since(since)
    assert len(re.findall(r'\bconnect from ', log)) == 1
    assert 'improper command pipelining' not in log


def test_starttls_upgrades_and_verifies(through_postfix, relay_sink,
                                        postfix, certs):
    """With "tls starttls" and the CA file, mailout upgrades to TLS 1.3 and
    Postfix records it."""
    delivery = through_postfix(f'tls starttls\nca-file {certs.ca}')
    since = postfix.log_offset()
    data = dated('over tls', 'pf-tls@example.org')
    delivery.send(SENDER, ['ann@example.org'], data)
    transaction.commit()
    [received] = relay_sink.wait_for(1)
    [header] = split_received(received['data'])[0]
    assert '(using TLSv1.3 with cipher' in header
    assert 'with ESMTPS id' in header
    assert split_received(received['data'])[1] == data
    postfix.wait_for_log(
        r'TLS connection established from \S+\[127\.0\.0\.1\]: TLSv1\.3',
        since)


def test_unverifiable_certificate_defers(through_postfix, relay_sink,
                                         postfix):
    """Without the test CA, "tls starttls" refuses Postfix's certificate:
    the message is deferred, nothing is sent."""
    delivery = through_postfix('tls starttls')
    delivery.send(SENDER, ['ann@example.org'],
                  dated('unverified', 'pf-unverified@example.org'))
    transaction.commit()
    [queued] = wait_for_area(delivery, 'deferred')
    assert b'CERTIFICATE_VERIFY_FAILED' in queued
    assert relay_sink.messages() == []


def test_permanent_refusal_moves_message_to_failed(through_postfix,
                                                   relay_sink):
    """A recipient Postfix refuses with 550 sends the message to the queue's
    failed/ area with Postfix's reply."""
    delivery = through_postfix()
    delivery.send(SENDER, [pf.REJECTED],
                  dated('refused', 'pf-refused@example.org'))
    transaction.commit()
    [failed] = wait_for_area(delivery, 'failed')
    envelope = failed.split(b'\r\n\r\n', 1)[0].decode()
    assert f'X-Mailout-To: {pf.REJECTED}' in envelope
    assert re.search(r'X-Mailout-Attempt: \S+ 550 5\.1\.1 '
                     r'<rejected@example\.org>: Recipient address '
                     r'rejected: no such mailbox here', envelope), envelope
    assert areas(delivery)['deferred'] == []
    time.sleep(0.2)
    assert relay_sink.messages() == []


def test_refused_recipient_among_accepted_ones(through_postfix, relay_sink):
    """One refused recipient goes to failed/; the others get the message,
    once."""
    delivery = through_postfix()
    data = dated('mixed', 'pf-mixed@example.org')
    delivery.send(SENDER, ['ann@example.org', pf.REJECTED, 'bob@example.org'],
                  data)
    transaction.commit()
    [failed] = wait_for_area(delivery, 'failed')
    envelope = failed.split(b'\r\n\r\n', 1)[0].decode()
    assert re.findall(r'X-Mailout-To: (\S+)', envelope) == [pf.REJECTED]
    assert ' 550 5.1.1 ' in envelope
    [received] = relay_sink.wait_for(1)
    assert sorted(received['rcpt_tos']) == ['ann@example.org',
                                            'bob@example.org']
    assert split_received(received['data'])[1] == data
    assert areas(delivery)['deferred'] == []


def test_one_message_for_twenty_recipients(through_postfix, relay_sink):
    """A message for 20 recipients reaches each of them exactly once."""
    delivery = through_postfix()
    recipients = [f'member{i:02d}@example.org' for i in range(20)]
    data = dated('to many', 'pf-twenty@example.org')
    delivery.send(SENDER, recipients, data)
    transaction.commit()
    deadline = time.monotonic() + 10
    while True:
        received = relay_sink.messages()
        got = [r for m in received for r in m['rcpt_tos']]
        if len(got) >= 20 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert sorted(got) == recipients
    assert all(split_received(m['data'])[1] == data for m in received)
    assert len(received) == 1           # Postfix relays it as one message
    wait_until_drained(delivery)


@pytest.fixture
def sasl_postfix(postfix):
    """The instance's AUTH port (Cyrus SASL, sasldb): skip without
    saslpasswd2, fail if MAILOUT_TEST_POSTFIX is set."""
    pf.require(pf.SASLPASSWD2, 'Cyrus SASL (sasl2-bin) not installed; '
                               'CI installs it (MAILOUT_TEST_POSTFIX=1)')
    assert postfix.auth_port, 'instance started without SASL'
    return postfix


def test_sasl_auth_over_starttls(through_postfix, relay_sink, sasl_postfix,
                                 certs):
    """On the port that relays for authenticated clients only, mailout
    logs in over STARTTLS and the message goes through."""
    delivery = through_postfix(
        f'tls starttls\nca-file {certs.ca}\n'
        f'username {pf.SASL_USER}\npassword {pf.SASL_PASSWORD}',
        port=sasl_postfix.auth_port)
    since = sasl_postfix.log_offset()
    data = dated('authenticated', 'pf-auth@example.org')
    delivery.send(SENDER, ['ann@example.org'], data)
    transaction.commit()
    [received] = relay_sink.wait_for(1)
    [header] = split_received(received['data'])[0]
    assert f'(Authenticated sender: {pf.SASL_USER}@{pf.SASL_REALM})' \
        in header
    assert 'with ESMTPSA id' in header
    assert split_received(received['data'])[1] == data
    sasl_postfix.wait_for_log(
        rf'client=\S+\[127\.0\.0\.1\], sasl_method=(PLAIN|LOGIN), '
        rf'sasl_username={pf.SASL_USER}@{pf.SASL_REALM}', since)


def test_sasl_wrong_password_defers(through_postfix, relay_sink,
                                    sasl_postfix, certs):
    """A wrong password: Postfix answers 535, the message is deferred and
    the password appears nowhere in the queue file."""
    delivery = through_postfix(
        f'tls starttls\nca-file {certs.ca}\n'
        f'username {pf.SASL_USER}\npassword wrong-Pa55word',
        port=sasl_postfix.auth_port)
    delivery.send(SENDER, ['ann@example.org'],
                  dated('bad password', 'pf-badauth@example.org'))
    transaction.commit()
    [queued] = wait_for_area(delivery, 'deferred')
    assert b'AUTH failed: 535 5.7.8' in queued
    assert b'wrong-Pa55word' not in queued
    assert relay_sink.messages() == []


def test_auth_port_refuses_unauthenticated_relaying(through_postfix,
                                                    relay_sink, sasl_postfix,
                                                    certs):
    """Without credentials the AUTH port refuses to relay (554, permanent):
    the message goes to failed/."""
    delivery = through_postfix(f'tls starttls\nca-file {certs.ca}',
                               port=sasl_postfix.auth_port)
    delivery.send(SENDER, ['ann@example.org'],
                  dated('no auth', 'pf-noauth@example.org'))
    transaction.commit()
    [failed] = wait_for_area(delivery, 'failed')
    assert b' 554 5.7.1 ' in failed and b'Relay access denied' in failed
    assert relay_sink.messages() == []
