"""Views sending through ``context.MailHost``, as through-the-web code and
Plone do, inside the request's transaction."""
from ZODB.POSException import ConflictError

ATTEMPTS = {}   # subject -> how many times the view ran


class MailHostSend:
    """@@mailhost-send?to=ADDRESS&subject=S[&immediate=1]: 'sent'."""

    def __init__(self, context, request):
        self.context = context
        self.request = request

    def send(self):
        form = self.request.form
        subject = form.get('subject', 'from a MailHost')
        ATTEMPTS[subject] = ATTEMPTS.get(subject, 0) + 1
        self.context.MailHost.send(
            'Sent through context.MailHost.\n', mto=form['to'],
            mfrom='zope@example.org', subject=subject,
            immediate=bool(form.get('immediate')))
        return subject

    def __call__(self):
        self.send()
        return 'sent'


class MailHostSendThenFail(MailHostSend):
    """Send, then raise: the publisher aborts the transaction."""

    def __call__(self):
        self.send()
        raise RuntimeError('failing after MailHost.send')


class MailHostSendThenConflict(MailHostSend):
    """Send, then raise ConflictError on the first attempt only: the
    publisher retries the request; 'sent after N attempts'."""

    def __call__(self):
        subject = self.send()
        if ATTEMPTS[subject] == 1:
            raise ConflictError('a conflict on the first attempt')
        return f'sent after {ATTEMPTS[subject]} attempts'
