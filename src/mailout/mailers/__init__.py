"""Mailers: hand one message to the next hop (`IMailoutMailer`).

``send(fromaddr, toaddrs, message)`` returns the recipients the server
refused, ``{address: (code, text)}``, and raises `TransientDeliveryError` or
`PermanentDeliveryError` when the message as a whole was not taken;
``send_each(envelopes)`` does that for a stream of messages, yielding each
outcome as it is known (the SMTP and LMTP mailers pipeline them, RFC 2920).
Each thread keeps its own connection open across messages; ``close()`` ends
the calling thread's connection; ``probe()`` tries each relay without
sending.

Every reply must arrive in full within the mailer's ``timeout`` of its
command having been sent (the greeting: of the connection being made) and
be at most `MAX_REPLY_SIZE` bytes; a relay that stalls, trickles or does
not stop replying is rested like one that timed out.

The SMTP mailer is cut into parts other transports reuse:

- `relays`: which relay a new connection goes to (by weight, each address
  of a host name), which rest and how many connections each has open (in
  memory, or in a store the processes working one queue share);
- `connection`: smtplib's connections with bounded replies;
- `session`: connect, greet, STARTTLS, AUTH, and what they achieved;
- `transaction`: MAIL, RCPT, DATA and what the replies mean;
- `smtp`: `SMTPMailer`, those parts and one kept-open connection a thread;
- `lmtp`, `sendmail`: the other mailers; `base`: what every mailer shares.
"""
from mailout.mailers.base import Mailer  #: base class of mailers
from mailout.mailers.base import send_each  #: send() for each message
from mailout.mailers.connection import MAX_CHALLENGES  #: AUTH round trips
from mailout.mailers.connection import MAX_REPLY_SIZE  #: bytes of a reply
from mailout.mailers.connection import RelayStalled  #: a stalled relay
from mailout.mailers.lmtp import LMTPMailer  #: LMTP, e.g. to Mailman
from mailout.mailers.relays import RelayRotation  #: relays in turn, rests
from mailout.mailers.relays import RelaysBusy  #: none tried: all full
from mailout.mailers.relays import RelaysResting  #: none tried: all rest
from mailout.mailers.sendmail import SendmailMailer  #: the sendmail program
from mailout.mailers.smtp import SMTPMailer  #: SMTP relays

__all__ = ['LMTPMailer', 'MAX_CHALLENGES', 'MAX_REPLY_SIZE', 'Mailer',
           'RelayRotation', 'RelayStalled', 'RelaysBusy', 'RelaysResting',
           'SMTPMailer', 'SendmailMailer', 'send_each']
