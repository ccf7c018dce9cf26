"""Recovery: finishing what dead processes left, for `Queue`."""
import errno
import logging
import os
import time

from mailout.message import printable
from mailout.queue import files
from mailout.queue import names

log = logging.getLogger('mailout.queue')

#: Claims by another host whose file was not touched (renewed) for this
#: long are taken back: that host's processor is presumed dead.  The
#: default of ``claim-lease``, a queue's ``claim_lease``.
CLAIM_LEASE = 300
#: Unfinished writes by another host are removed after this long (Maildir's
#: customary 36 hours).
TMP_LIFETIME = 36 * 3600


class Recovery:
    """`Queue.recover` and how it tells dead writers and owners (a part of
    `Queue`: it uses the queue's areas, claims and token)."""

    def recover(self, now=None):
        """Create missing areas, finish committed batches, give claims of
        dead owners back to ``new/`` and remove their unfinished writes
        from ``tmp/``; return how many claims came back.  A name that is
        not mailout's is left alone, and an entry that cannot be handled
        is skipped; each is logged once."""
        now = time.time() if now is None else now
        if self.writable:
            self._check_areas()
            self.relay_states.remove_leftovers(now)
        self._finish_unfinished()
        self._release_kept()
        self._clean_tmp(now)
        recovered = 0
        for filename in self._listdir('cur'):
            claim = names.Claim.parse(filename)
            if claim is None:
                self._report_once(filename, "cur/{} is not a claim of "
                                  "mailout's: left alone")
                continue
            with self._entry_errors(filename):
                if self._owner_is_dead(claim, now):
                    try:
                        os.rename(self._area('cur', filename),
                                  self._area('new', claim.name))
                        recovered += 1
                    except FileNotFoundError:
                        continue
                    if claim.host != names.HOST:
                        log.warning(
                            '%r: took over %s from host %s (pid %d): its '
                            'claim was not renewed for the claim-lease of '
                            '%gs', self, printable(claim.name),
                            printable(claim.host), claim.pid,
                            self.claim_lease)
        return recovered

    def _clean_tmp(self, now):
        # A commit marker means its transaction committed: finish moving
        # that batch to new/, whoever wrote it.  Writes of a dead writer
        # without one never committed: remove them.  Which local writers
        # are dead is decided before tmp/ is listed: a writer known dead
        # changes nothing any more, so the listing shows its final state.
        # (A listing taken while it lived could lack the marker it made
        # just before dying.)
        dead = {entry.writer for entry in map(names.in_tmp,
                                              self._listdir('tmp'))
                if isinstance(entry, (names.TmpMessage, names.Marker))
                and entry.host == names.HOST
                and self._local_writer_is_dead(entry.writer)}
        listing = [(name, names.in_tmp(name)) for name in self._listdir('tmp')]
        committed = {}                  # (writer, batch) -> its marker
        for name, entry in listing:
            if isinstance(entry, names.Marker) and entry.committed:
                committed[entry.writer, entry.batch] = name
        unfinished = set()              # batches with a file left behind
        for name, entry in listing:
            path = self._area('tmp', name)
            if entry is None:
                self._report_once(name, "tmp/{} is not mailout's: left alone")
            elif isinstance(entry, names.Rewrite):
                if self._owner_is_dead(entry.claim, now, path):
                    with self._entry_errors(name):
                        files.unlink(path)
            elif isinstance(entry, names.Marker) and entry.committed:
                pass
            elif (entry.writer, entry.batch) in committed:
                with self._entry_errors(name):
                    try:
                        os.rename(path, self._area('new', name))
                    except FileNotFoundError:
                        pass            # another process moved it
                if os.path.lexists(path):
                    unfinished.add((entry.writer, entry.batch))
            elif self._writer_is_dead(entry, path, now, dead):
                with self._entry_errors(name):
                    files.unlink(path)
        if committed:
            files.fsync_directory(self._area('new'))
            for batch, marker in committed.items():
                if batch not in unfinished:
                    files.unlink(self._area('tmp', marker))

    def _local_writer_is_dead(self, writer):
        if writer.pid == os.getpid():   # this pid, or a predecessor's
            return writer.token != self.token
        return not _pid_alive(writer.pid)

    @staticmethod
    def _writer_is_dead(entry, path, now, dead):
        if entry.host != names.HOST:
            return now - files.mtime(path, now) > TMP_LIFETIME
        return entry.writer in dead

    def _owner_is_dead(self, claim, now, rewrite=None):
        if claim.host != names.HOST:
            # The rename that claimed (or rewrote) it set the file's ctime,
            # and its owner renews it (`renew_claims`).  A rewrite whose
            # claim is gone counts from its own.
            touched = files.ctime(self._area('cur', str(claim)), None)
            if touched is None and rewrite is not None:
                touched = files.ctime(rewrite, None)
            return now - (now if touched is None else touched) \
                > self.claim_lease
        if claim.pid == os.getpid():
            with self._claims_lock:
                return claim.token != self.token \
                    or str(claim) not in self._claims
        return not _pid_alive(claim.pid)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True
