# cython: language_level=3
"""A thread that writes and fdatasyncs byte ranges of one file without ever taking the GIL.

The commit log's durable step (``store/commit_log.py``). A Python thread doing the same write and fsync
must win the GIL back from the event loop before and after each system call, and on a busy 2-core machine
that wait was most of a write's latency (p50 380-490 µs per commit at 16 clients, against ~150 µs for the
fsync itself). This thread needs the GIL only to start: the loop hands it bytes under a mutex, it writes
and syncs them, and it says so through an eventfd the loop watches (``loop.add_reader``).

Writes are done in the order they were submitted, each range starting where the previous one ended
(or, once everything before is durable, anywhere: the log's restart at offset 0). Ranges submitted
while a sync runs are written together by the next one: the log's own group commit.

Example: submit(A, 0) → 1; the thread writes A and syncs; submit(B, len(A)) → 2 and submit(C, len(A+B))
→ 3 arrive meanwhile; the thread wakes the loop (durable 1), then writes B+C in one pwrite and one
fdatasync and wakes it again (durable 3).
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from posix.types cimport off_t
from posix.unistd cimport close, fdatasync, pwrite, read, write


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *, void *)
    int pthread_mutex_destroy(pthread_mutex_t *)
    int pthread_mutex_lock(pthread_mutex_t *)
    int pthread_mutex_unlock(pthread_mutex_t *)
    int pthread_cond_init(pthread_cond_t *, void *)
    int pthread_cond_destroy(pthread_cond_t *)
    int pthread_cond_wait(pthread_cond_t *, pthread_mutex_t *)
    int pthread_cond_signal(pthread_cond_t *)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC


cdef class LogWriter:
    """Writes to ``fd`` (owned by the caller, who keeps it open until ``stop`` returned).

    ``submit`` never blocks on the disk; ``fileno`` becomes readable whenever ``durable`` or ``error``
    moved; ``collect`` clears that and returns ``(durable, error)``: every submission numbered up to
    ``durable`` is on disk, and a non-zero ``error`` (an errno) means the range after ``durable`` may or
    may not be, and that nothing more will be written.
    """

    cdef pthread_mutex_t _mu
    cdef pthread_cond_t _wake
    cdef int _fd
    cdef int _efd
    # Submitted, not yet taken by the thread: bytes for [_pend_off, _pend_off + _pend_len).
    cdef char *_pend
    cdef size_t _pend_len
    cdef size_t _pend_cap
    cdef off_t _pend_off
    cdef uint64_t _pend_seq
    # Taken by the thread: written from this buffer while the loop fills the other one.
    cdef char *_work
    cdef size_t _work_cap
    cdef uint64_t _submitted
    cdef uint64_t _durable
    cdef int _error
    cdef bint _stopping
    cdef bint _started

    def __cinit__(self, int fd):
        self._fd = fd
        self._efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self._efd < 0:
            raise OSError(errno, "eventfd failed")
        pthread_mutex_init(&self._mu, NULL)
        pthread_cond_init(&self._wake, NULL)

    def __dealloc__(self):
        free(self._pend)
        free(self._work)
        if self._efd >= 0:
            close(self._efd)
        pthread_cond_destroy(&self._wake)
        pthread_mutex_destroy(&self._mu)

    def fileno(self) -> int:
        return self._efd

    def submit(self, const unsigned char[:] data, int64_t offset) -> int:
        """Queue ``data`` for the file at ``offset``; returns its number (1, 2, …)."""
        cdef size_t n = data.shape[0]
        cdef size_t cap
        cdef char *grown
        cdef uint64_t seq
        pthread_mutex_lock(&self._mu)
        try:
            if self._error:
                raise OSError(self._error, "the log writer failed earlier")
            if self._stopping:
                raise RuntimeError("the log writer is stopped")
            if self._pend_len == 0:
                self._pend_off = offset
            elif offset != self._pend_off + <off_t>self._pend_len:
                raise ValueError(f"offset {offset} does not follow the pending range")
            if self._pend_len + n > self._pend_cap:
                cap = max(self._pend_cap * 2, self._pend_len + n, <size_t>65536)
                grown = <char *>realloc(self._pend, cap)
                if grown == NULL:
                    raise MemoryError()
                self._pend = grown
                self._pend_cap = cap
            if n:
                memcpy(self._pend + self._pend_len, &data[0], n)
            self._pend_len += n
            self._submitted += 1
            seq = self._pend_seq = self._submitted
        finally:
            pthread_mutex_unlock(&self._mu)
        # After unlocking, so that the thread, woken, does not at once block on the mutex held here.
        pthread_cond_signal(&self._wake)
        return seq

    def collect(self) -> tuple:
        cdef uint64_t count
        read(self._efd, &count, 8)  # clears the eventfd; EAGAIN when nothing was signalled is fine
        pthread_mutex_lock(&self._mu)
        out = (self._durable, self._error)
        pthread_mutex_unlock(&self._mu)
        return out

    def serve(self) -> None:
        """The thread's body: run with ``threading.Thread(target=writer.serve)``; returns after ``stop``."""
        with nogil:
            self._serve()

    def stop(self) -> None:
        """Let what is submitted be written, then make ``serve`` return (join its thread afterwards)."""
        pthread_mutex_lock(&self._mu)
        self._stopping = True
        pthread_cond_signal(&self._wake)
        pthread_mutex_unlock(&self._mu)

    cdef void _serve(self) noexcept nogil:
        cdef char *buf
        cdef size_t n, done, cap
        cdef off_t off
        cdef uint64_t seq
        cdef uint64_t one = 1
        cdef ssize_t r
        cdef int err
        while True:
            pthread_mutex_lock(&self._mu)
            while self._pend_len == 0 and not self._stopping:
                pthread_cond_wait(&self._wake, &self._mu)
            if self._pend_len == 0 or self._error:
                pthread_mutex_unlock(&self._mu)
                return
            # Swap buffers: the loop fills the empty one while this thread writes the full one.
            buf = self._pend
            cap = self._pend_cap
            self._pend = self._work
            self._pend_cap = self._work_cap
            self._work = buf
            self._work_cap = cap
            n = self._pend_len
            off = self._pend_off
            seq = self._pend_seq
            self._pend_len = 0
            pthread_mutex_unlock(&self._mu)

            err = 0
            done = 0
            while done < n:
                r = pwrite(self._fd, buf + done, n - done, off + <off_t>done)
                if r < 0:
                    if errno == EINTR:
                        continue
                    err = errno
                    break
                done += <size_t>r
            if err == 0:
                while fdatasync(self._fd) != 0:
                    if errno != EINTR:
                        err = errno
                        break

            pthread_mutex_lock(&self._mu)
            if err:
                self._error = err
            else:
                self._durable = seq
            pthread_mutex_unlock(&self._mu)
            write(self._efd, &one, 8)
            if err:
                return
