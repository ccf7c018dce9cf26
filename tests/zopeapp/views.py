"""Views sending mail inside the request's transaction."""
import mailout

MESSAGE = ('From: zope@example.org\r\nTo: {to}\r\n'
           'Subject: from a Zope view\r\n\r\nSent by {view}.\r\n')


class SendMail:
    """@@send-mail?to=ADDRESS: queue a message to ADDRESS; 'sent'."""

    def __init__(self, context, request):
        self.context = context
        self.request = request

    def send(self, view):
        to = self.request.form['to']
        mailout.send('zope@example.org', [to],
                     MESSAGE.format(to=to, view=view))

    def __call__(self):
        self.send('send-mail')
        return 'sent'


class SendMailThenFail(SendMail):
    """@@send-mail-then-fail?to=ADDRESS: queue a message, then raise, so
    that the publisher aborts the transaction."""

    def __call__(self):
        self.send('send-mail-then-fail')
        raise RuntimeError('failing after send')
