# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""One direction of the inline bridge in C: recvmmsg, the flow table's verdicts, sendmmsg.

A Forwarder reads batches of frames from one AF_PACKET socket and writes those that pass
(or were rewritten in place) to the other, without the GIL and without a Python object
per frame. Frames whose verdict is PYTHON are copied out and handed to a callback after
the batch (the GIL is taken only then, never while the table's lock is held).
"""

from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.errno cimport errno, EAGAIN, EINTR, EBADF, ENOTSOCK
from posix.unistd cimport usleep
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.uio cimport iovec

from _fastpath._cengine cimport FlowTable, fp_table_classify, pthread_mutex_lock, pthread_mutex_unlock

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr* msgs, unsigned int vlen, int flags, timespec* timeout)
    int sendmmsg(int fd, mmsghdr* msgs, unsigned int vlen, int flags)
    int MSG_WAITFORONE
    int MSG_TRUNC
    int MSG_DONTWAIT

cdef enum:
    VNET_HDR_LEN = 10          # struct virtio_net_hdr
    VNET_F_NEEDS_CSUM = 1
    SLOT = 65536 + 256         # a GSO super-frame (IP total length <= 65535) plus headers
    V_PASS = 0
    V_REWRITE = 1
    V_DROP = 2
    V_PYTHON = 3

STAT_NAMES = ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "tx_errors", "dropped", "to_python",
              "truncated", "batches", "rx_errors", "last_errno")

cdef struct fwd_stats:
    uint64_t rx_frames
    uint64_t rx_bytes
    uint64_t tx_frames
    uint64_t tx_bytes
    uint64_t tx_errors
    uint64_t dropped
    uint64_t to_python
    uint64_t truncated
    uint64_t batches
    uint64_t rx_errors
    uint64_t last_errno


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Forwarder:
    """Frames from rx_fd to tx_fd under a FlowTable's verdicts; run() blocks until stop()."""

    cdef int rx_fd, tx_fd, batch, hdr
    cdef double spin
    cdef bint vnet
    cdef FlowTable table
    cdef object punt
    cdef volatile int stopping
    cdef fwd_stats st
    cdef uint8_t* bufs
    cdef iovec* rx_iov
    cdef iovec* tx_iov
    cdef mmsghdr* rx_msgs
    cdef mmsghdr* tx_msgs
    cdef uint8_t* verdicts

    def __cinit__(self, int rx_fd, int tx_fd, FlowTable table not None, punt=None, bint vnet=False,
                  int batch=64, double spin_us=0.0):
        if not 1 <= batch <= 1024:
            raise ValueError("batch must be 1..1024")
        if not 0 <= spin_us <= 10000:
            raise ValueError("spin_us must be 0..10000")
        self.spin = spin_us * 1e-6
        self.rx_fd, self.tx_fd, self.table, self.punt, self.vnet, self.batch = rx_fd, tx_fd, table, punt, vnet, batch
        self.hdr = VNET_HDR_LEN if vnet else 0
        self.bufs = <uint8_t*>calloc(batch, SLOT)
        self.rx_iov = <iovec*>calloc(batch, sizeof(iovec))
        self.tx_iov = <iovec*>calloc(batch, sizeof(iovec))
        self.rx_msgs = <mmsghdr*>calloc(batch, sizeof(mmsghdr))
        self.tx_msgs = <mmsghdr*>calloc(batch, sizeof(mmsghdr))
        self.verdicts = <uint8_t*>calloc(batch, 1)
        if not (self.bufs and self.rx_iov and self.tx_iov and self.rx_msgs and self.tx_msgs and self.verdicts):
            raise MemoryError()
        cdef int i
        for i in range(batch):
            self.rx_iov[i].iov_base = self.bufs + <size_t>i * SLOT
            self.rx_iov[i].iov_len = SLOT
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            self.tx_msgs[i].msg_hdr.msg_iov = &self.tx_iov[i]
            self.tx_msgs[i].msg_hdr.msg_iovlen = 1

    def __dealloc__(self):
        free(self.bufs)
        free(self.rx_iov)
        free(self.tx_iov)
        free(self.rx_msgs)
        free(self.tx_msgs)
        free(self.verdicts)

    def stop(self):
        """Ask run() to return; it notices within the socket's receive timeout."""
        self.stopping = 1

    def stats(self):
        cdef fwd_stats s = self.st
        return dict(zip(STAT_NAMES, (s.rx_frames, s.rx_bytes, s.tx_frames, s.tx_bytes, s.tx_errors, s.dropped,
                                     s.to_python, s.truncated, s.batches, s.rx_errors, s.last_errno)))

    cdef void _send(self, int m) noexcept nogil:
        """sendmmsg the m prepared messages; a frame the kernel refuses (ENOBUFS from a full
        qdisc, EMSGSIZE) is counted and skipped, the rest still go."""
        cdef int sent = 0, r, k
        while sent < m:
            r = sendmmsg(self.tx_fd, self.tx_msgs + sent, m - sent, 0)
            if r < 0:
                if errno == EINTR:
                    continue
                self.st.tx_errors += 1
                self.st.last_errno = errno
                sent += 1
                continue
            for k in range(sent, sent + r):
                self.st.tx_frames += 1
                self.st.tx_bytes += self.tx_iov[k].iov_len - self.hdr
            sent += r

    def run(self):
        """Forward until stop(); returns the stats."""
        cdef int n, i, m, punts, err
        cdef unsigned int length
        cdef uint8_t* slot
        cdef double now, busy_until = 0.0
        cdef bint partial
        while not self.stopping:
            punts = 0
            err = 0
            with nogil:
                # After traffic, poll without sleeping for up to spin seconds: a thread
                # wake-up per batch costs more latency than a short spin costs CPU.
                n = -1
                while self.spin > 0 and monotonic() < busy_until:
                    n = recvmmsg(self.rx_fd, self.rx_msgs, self.batch, MSG_DONTWAIT, NULL)
                    if n > 0 or (errno != EAGAIN and errno != EINTR):
                        break
                if n <= 0:
                    n = recvmmsg(self.rx_fd, self.rx_msgs, self.batch, MSG_WAITFORONE, NULL)
                if n > 0:
                    self.st.batches += 1
                    now = monotonic()
                    busy_until = now + self.spin
                    pthread_mutex_lock(&self.table.t.lock)
                    for i in range(n):
                        length = self.rx_msgs[i].msg_len
                        self.st.rx_frames += 1
                        self.st.rx_bytes += length
                        if self.rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC or length < <unsigned int>self.hdr:
                            self.st.truncated += 1
                            self.verdicts[i] = V_DROP
                            continue
                        slot = self.bufs + <size_t>i * SLOT
                        partial = self.vnet and (slot[0] & VNET_F_NEEDS_CSUM)
                        self.verdicts[i] = fp_table_classify(self.table.t, slot + self.hdr, length - self.hdr,
                                                             now, partial)
                    pthread_mutex_unlock(&self.table.t.lock)
                    m = 0
                    for i in range(n):
                        if self.verdicts[i] == V_PASS or self.verdicts[i] == V_REWRITE:
                            self.tx_iov[m].iov_base = self.bufs + <size_t>i * SLOT
                            self.tx_iov[m].iov_len = self.rx_msgs[i].msg_len
                            m += 1
                        elif self.verdicts[i] == V_PYTHON:
                            punts += 1
                        else:
                            self.st.dropped += 1
                    if m:
                        self._send(m)
                elif n < 0 and errno != EAGAIN and errno != EINTR:
                    err = errno
                    self.st.rx_errors += 1
                    self.st.last_errno = err
                    if err != EBADF and err != ENOTSOCK:
                        usleep(10000)  # e.g. ENETDOWN while a port is down: retry, don't spin
            if err == EBADF or err == ENOTSOCK:
                break  # the socket was closed under us
            if punts:
                self._punt(n)
        return self.stats()

    cdef void _punt(self, int n) except *:
        cdef int i
        cdef uint8_t* slot
        for i in range(n):
            if self.verdicts[i] != V_PYTHON:
                continue
            self.st.to_python += 1
            if self.punt is None:
                continue
            slot = self.bufs + <size_t>i * SLOT
            vnet_hdr = (<char*>slot)[:self.hdr] if self.hdr else b""
            frame = bytearray((<char*>slot + self.hdr)[:self.rx_msgs[i].msg_len - self.hdr])
            try:
                self.punt(frame, vnet_hdr)
            except Exception as exc:  # a control-plane bug must not stop forwarding
                import sys
                print(f"bridge: punt handler failed: {exc!r}", file=sys.stderr)
