"""The LMTP mailer against a real LMTP server process."""

from helpers import failed
from helpers import files_in
from helpers import mailer_and_queue
from mailout import config
from mailout.message import prepare
from mailout.processor import Processor

ANN, BOB, CARL = 'ann@example.org', 'bob@example.org', 'carl@example.org'


def lmtp(tmp_path, destination):
    return mailer_and_queue(tmp_path, f'''<lmtp-mailer lists>
          {destination}
          timeout 3s
        </lmtp-mailer>''')


def test_each_recipient_gets_its_own_reply(tmp_path, start_sink):
    """After the message the server answers once per recipient: a 550 for
    one fails that one only, a 452 defers that one, the rest are sent."""
    sink = start_sink('--lmtp', '--deliver-reply',
                      f'{BOB}=550 5.1.1 no such list',
                      '--deliver-reply', f'{CARL}=452 4.2.2 over quota')
    mailer, queue = lmtp(tmp_path, f'host 127.0.0.1:{sink.port}')
    data = b'Subject: to the lists\r\n\r\nbody\r\n'
    assert mailer.send('app@example.org', [ANN, BOB, CARL], data) == {
        BOB: (550, '5.1.1 no such list'), CARL: (452, '4.2.2 over quota')}
    [received] = sink.messages()
    assert received['rcpt_tos'] == [ANN] and received['data'] == data

    sink.clear()
    name = queue.write(prepare('app@example.org', [ANN, BOB, CARL],
                               data))
    queue.commit([name])
    Processor(queue, mailer).run_once()
    assert [m['rcpt_tos'] for m in sink.messages()] == [[ANN]]
    assert failed(queue, name).toaddrs == (BOB,)
    assert files_in(queue, 'deferred') == [name]


def test_unix_socket_and_connection_reuse(tmp_path, start_sink):
    """A server on a unix socket (as Mailman's may be); consecutive messages
    share one connection."""
    path = str(tmp_path / 'lmtp.sock')
    sink = start_sink('--lmtp', '--unix', path)
    mailer, _ = lmtp(tmp_path, f'path {path}')
    for i in range(3):
        assert mailer.send('app@example.org', [ANN, BOB],
                           b'Subject: %d\r\n\r\nbody\r\n' % i) == {}
    mailer.close()
    received = sink.messages()
    assert [m['rcpt_tos'] for m in received] == [[ANN, BOB]] * 3
    assert len({m['peer'] for m in received}) == 1


def test_host_or_path_required():
    """An lmtp-mailer needs exactly one of host and path."""
    import pytest
    import ZConfig
    with pytest.raises(ZConfig.ConfigurationError, match='host or path'):
        config.loads('<mailout>\n<lmtp-mailer x>\n</lmtp-mailer>\n</mailout>')


def test_silent_server_times_out(tmp_path, start_sink):
    """A server that accepts and never greets fails the send after the
    timeout instead of hanging a sender thread."""
    import time

    import pytest

    from mailout.interfaces import TransientDeliveryError
    sink = start_sink('--lmtp', '--stall-at', 'connect', '--stall', '30')
    mailer, _ = mailer_and_queue(tmp_path, f'''<lmtp-mailer lists>
          host 127.0.0.1:{sink.port}
          timeout 1s
        </lmtp-mailer>''')
    start = time.monotonic()
    with pytest.raises(TransientDeliveryError, match='timed out'):
        mailer.send('app@example.org', [ANN], b'Subject: x\r\n\r\n')
    assert time.monotonic() - start < 5
