"""The durable on-disk queue: a Maildir with claim, defer and fail areas.

Layout of a queue directory (all 0700, files 0600)::

    tmp/        messages of transactions that have voted, not yet committed
                (TIME.PID-TOKEN_BATCH_UNIQUE.HOST), and the commit markers
                of their batches (PID-TOKEN_BATCH.HOST.prepared at the
                vote, renamed to .commit at the commit)
    new/        committed messages waiting for delivery
    cur/        messages claimed by a sender thread: NAME,HOST,PID,TOKEN-N
    deferred/   messages waiting for a retry; the file's mtime is when
                the retry is due
    failed/     messages that failed for good, with their attempt history
    held/       messages held back (a delivery with "hold on", or
                "mailout queue hold"), never sent until released
    relays.json which relays rest, until when and why, shared by the
                processes working the queue (`relaystate`)

Every move between areas is one ``rename``, so a crash at any point leaves
each message in exactly one place; claims and unfinished writes of dead
processes are recovered.  Queue files are opened without following links
or blocking, and only regular files are read; anything else is quarantined
in ``failed/`` with a reason.  Files written by zope.sendmail's queued
delivery are read too; its dot-files are ignored, as Maildir readers do.

Modules: `names` (every queue file name), `fileformat` (what a file
holds), `files` (safe file operations), `core` (`Queue`, the state
machine), `recovery` and `inspection` (parts of `Queue`), `relaystate`
(the relays' rests).
"""
from mailout.queue.core import Queue                #: one queue directory
from mailout.queue.fileformat import QueuedMessage  #: a message read back
from mailout.queue.files import QueueError          #: unreadable, malformed
from mailout.queue.inspection import Entry          #: one file, inspected
from mailout.queue.inspection import area_problems  #: for `mailout check`
from mailout.queue.names import AREAS               #: tmp, new, cur, ...
from mailout.queue.recovery import CLAIM_LEASE      #: other hosts' claims
from mailout.queue.recovery import TMP_LIFETIME     #: other hosts' writes
from mailout.queue.relaystate import RelayStates    #: relays.json

__all__ = ['AREAS', 'CLAIM_LEASE', 'Entry', 'Queue', 'QueueError',
           'QueuedMessage', 'RelayStates', 'TMP_LIFETIME', 'area_problems']
