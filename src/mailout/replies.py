"""What a server's reply means for a message: the one place that says
which replies are permanent (RFC 5321 section 4.2.1: 5yz) and which are
worth another try (4yz, and failures with no reply at all)."""
from typing import Optional
from typing import Union

from mailout.interfaces import DeliveryError
from mailout.interfaces import PermanentDeliveryError
from mailout.interfaces import Reply
from mailout.interfaces import TransientDeliveryError


def is_permanent(reply: Reply) -> bool:
    """True for a ``(code, text)`` reply that retrying cannot change."""
    code = reply[0]
    return code is not None and 500 <= code < 600


def delivery_error(code: Optional[int],
                   text: Union[str, bytes]) -> DeliveryError:
    """The exception for a server reply: 5xx permanent, else transient."""
    if isinstance(text, bytes):
        text = text.decode('utf-8', 'replace')
    cls = PermanentDeliveryError if is_permanent((code, text)) \
        else TransientDeliveryError
    return cls((code, text))
