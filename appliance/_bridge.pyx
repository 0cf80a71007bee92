# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""One direction of the inline bridge in C: recvmmsg, the flow table's verdicts, sendmmsg.

A Forwarder reads batches of frames from one AF_PACKET socket and writes those that pass
(or were rewritten in place) to the other, without the GIL and without a Python object
per frame. Frames whose verdict is PYTHON are copied into a queue (bounded in bytes; what
does not fit is counted in punt_drops) that a thread of run()'s own hands to the callback:
the forwarding loop never waits for the GIL, so a control plane busy elsewhere (a status
snapshot, a journal write, a burst of migrations) never makes the kernel drop frames.

With a direction (fp.OUT: the client side's port, fp.IN: the network's), frames are
classified with it (fp_table_classify_dir): a conntrack table then tracks connections, and
a client SYN may grow in its slot (Migrate-Permitted added) before it is sent.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy
from libc.errno cimport errno, EAGAIN, EINTR, EBADF, ENOTSOCK
from posix.unistd cimport usleep
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC, CLOCK_REALTIME
from posix.uio cimport iovec

from _fastpath._cengine cimport (
    FlowTable, fp_table_classify, fp_table_classify_dir, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_mutex_t, pthread_mutex_init, pthread_mutex_destroy,
)
from _fastpath._common import check_direction

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_cond_t:
        pass
    int pthread_cond_init(pthread_cond_t* c, const void* attr)
    int pthread_cond_destroy(pthread_cond_t* c)
    int pthread_cond_signal(pthread_cond_t* c)
    int pthread_cond_timedwait(pthread_cond_t* c, pthread_mutex_t* m, const timespec* t)

cdef extern from "<malloc.h>" nogil:
    int malloc_trim(size_t pad)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/sockios.h>" nogil:
    unsigned long SIOCINQ

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

cdef size_t PUNT_QUEUE_MAX = 64 << 20  # bytes of frames waiting for the control plane (more: punt_drops)
# a burst freed in the punt thread leaves glibc's arenas holding its pages (malloc in one
# thread, free in another, fragmented by frames that were still queued): after this many
# bytes have been freed and the queue is empty, hand the free pages back to the kernel
cdef size_t TRIM_AFTER = 4 << 20

STAT_NAMES = ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "tx_errors", "dropped", "to_python",
              "truncated", "batches", "rx_errors", "last_errno", "punt_drops", "punt_queue_peak")

cdef struct punt_rec:  # a frame for the control plane; its bytes (vnet header, frame) follow
    punt_rec* next
    double t  # it arrived in the socket after this time (the socket was last seen empty then)
    uint32_t length

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
    uint64_t punt_drops
    uint64_t punt_queue_peak


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Forwarder:
    """Frames from rx_fd to tx_fd under a FlowTable's verdicts; run() blocks until stop()."""

    cdef int rx_fd, tx_fd, batch, hdr, direction
    cdef double spin
    cdef bint vnet
    cdef FlowTable table
    cdef object punt
    cdef volatile int stopping
    cdef volatile int idle          # blocked (or about to block) in a receive, nothing pending
    cdef volatile double drained_at  # every frame that arrived before this time has been taken from the socket
    cdef fwd_stats st
    cdef uint8_t* bufs
    cdef iovec* rx_iov
    cdef iovec* tx_iov
    cdef mmsghdr* rx_msgs
    cdef mmsghdr* tx_msgs
    cdef uint8_t* verdicts
    # the punt queue: qlock guards qhead/qtail/qbytes and busy_oldest
    cdef pthread_mutex_t qlock
    cdef pthread_cond_t qcond
    cdef punt_rec* qhead
    cdef punt_rec* qtail
    cdef size_t qbytes, qframes
    cdef double busy_oldest  # the t of the batch the punt thread is handling (-1: none)
    cdef bint has_punt

    def __cinit__(self, int rx_fd, int tx_fd, FlowTable table not None, punt=None, bint vnet=False,
                  int batch=64, double spin_us=0.0, direction=None):
        self.direction = check_direction(direction)  # -1: unknown (fp_table_classify, as without one)
        if not 1 <= batch <= 1024:
            raise ValueError("batch must be 1..1024")
        if not 0 <= spin_us <= 10000:
            raise ValueError("spin_us must be 0..10000")
        self.spin = spin_us * 1e-6
        self.rx_fd, self.tx_fd, self.table, self.punt, self.vnet, self.batch = rx_fd, tx_fd, table, punt, vnet, batch
        self.hdr = VNET_HDR_LEN if vnet else 0
        self.has_punt = punt is not None
        self.busy_oldest = -1.0
        pthread_mutex_init(&self.qlock, NULL)
        pthread_cond_init(&self.qcond, NULL)
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
        self._free_queue(self.qhead)
        self.qhead = self.qtail = NULL
        pthread_cond_destroy(&self.qcond)
        pthread_mutex_destroy(&self.qlock)
        free(self.bufs)
        free(self.rx_iov)
        free(self.tx_iov)
        free(self.rx_msgs)
        free(self.tx_msgs)
        free(self.verdicts)

    def stop(self):
        """Ask run() to return; it notices within the socket's receive timeout."""
        self.stopping = 1
        pthread_mutex_lock(&self.qlock)
        pthread_cond_signal(&self.qcond)
        pthread_mutex_unlock(&self.qlock)

    def caught_up(self, double t):
        """Has every frame that reached the receive socket before monotonic time t been
        classified and, if punted, handled by punt? (A decision that waits for an answer
        must not time out while the answer sits unread in the socket or in the queue.)"""
        cdef int pending = 0
        cdef bint queued
        pthread_mutex_lock(&self.qlock)
        queued = (self.qhead != NULL and self.qhead.t < t) or (self.busy_oldest >= 0 and self.busy_oldest < t)
        pthread_mutex_unlock(&self.qlock)
        if queued:
            return False
        if self.drained_at >= t:
            return True
        if self.idle and ioctl(self.rx_fd, SIOCINQ, &pending) == 0 and pending == 0:
            return True
        return False

    def received(self):
        """Frames taken from the receive socket so far (each handled before the next batch)."""
        return self.st.rx_frames

    def stats(self):
        cdef fwd_stats s = self.st
        return dict(zip(STAT_NAMES, (s.rx_frames, s.rx_bytes, s.tx_frames, s.tx_bytes, s.tx_errors, s.dropped,
                                     s.to_python, s.truncated, s.batches, s.rx_errors, s.last_errno,
                                     s.punt_drops, s.punt_queue_peak)))

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
        """Forward until stop(); returns the stats. The loop never takes the GIL: punted
        frames are queued for a thread that run() starts and joins (a Python thread busy
        elsewhere, the journal or a status snapshot, must not stall forwarding)."""
        consumer = None
        if self.has_punt:
            import threading
            consumer = threading.Thread(target=self._drain, name="bridge-punt", daemon=True)
            consumer.start()
        try:
            return self._forward()
        finally:
            self.stop()
            if consumer is not None:
                consumer.join()
            pthread_mutex_lock(&self.qlock)
            self._free_queue(self.qhead)
            self.qhead = self.qtail = NULL
            self.qbytes = self.qframes = 0
            pthread_mutex_unlock(&self.qlock)

    cdef dict _forward(self):
        cdef int n, i, m, punts, err
        cdef unsigned int length
        cdef size_t new_len
        cdef uint8_t* slot
        cdef double now, busy_until = 0.0
        cdef bint partial
        with nogil:
            while not self.stopping:
                punts = 0
                err = 0
                # After traffic, poll without sleeping for up to spin seconds: a thread
                # wake-up per batch costs more latency than a short spin costs CPU.
                n = -1
                while self.spin > 0 and monotonic() < busy_until:
                    now = monotonic()
                    n = recvmmsg(self.rx_fd, self.rx_msgs, self.batch, MSG_DONTWAIT, NULL)
                    if n > 0 or (errno != EAGAIN and errno != EINTR):
                        break
                    if errno == EAGAIN:
                        self.drained_at = now
                if n <= 0:
                    self.idle = 1
                    now = monotonic()
                    n = recvmmsg(self.rx_fd, self.rx_msgs, self.batch, MSG_WAITFORONE, NULL)
                    self.idle = 0
                    if n < 0 and errno == EAGAIN:  # the receive timeout: nothing came
                        self.drained_at = now
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
                        if self.direction < 0:
                            self.verdicts[i] = fp_table_classify(self.table.t, slot + self.hdr, length - self.hdr,
                                                                 now, partial)
                        else:  # the frame may grow in its slot (a tagged SYN): send its new length
                            self.verdicts[i] = fp_table_classify_dir(self.table.t, slot + self.hdr,
                                                                     length - self.hdr, SLOT - self.hdr, now,
                                                                     partial, self.direction, &new_len)
                            self.rx_msgs[i].msg_len = <unsigned int>(new_len + self.hdr)
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
                if punts:  # each stamped with when the socket was last seen empty: it arrived after that
                    self._enqueue(n, self.drained_at)
                if 0 < n < self.batch:  # the socket was empty when this batch was taken: all taken
                    self.drained_at = now
        return self.stats()

    cdef void _enqueue(self, int n, double since) noexcept nogil:
        """Copy the batch's PYTHON frames into the punt queue (or count them, if it is full);
        `since`: a time before which none of them arrived."""
        cdef int i
        cdef uint32_t length
        cdef punt_rec* r
        cdef punt_rec* first = NULL
        cdef punt_rec* last = NULL
        cdef size_t added = 0, count = 0
        for i in range(n):
            if self.verdicts[i] != V_PYTHON:
                continue
            self.st.to_python += 1
            if not self.has_punt:
                continue
            length = self.rx_msgs[i].msg_len
            r = <punt_rec*>malloc(sizeof(punt_rec) + length)
            if r == NULL:
                self.st.punt_drops += 1
                continue
            r.next, r.t, r.length = NULL, since, length
            memcpy(<uint8_t*>r + sizeof(punt_rec), self.bufs + <size_t>i * SLOT, length)
            if last == NULL:
                first = r
            else:
                last.next = r
            last = r
            added += length
            count += 1
        if first == NULL:
            return
        pthread_mutex_lock(&self.qlock)
        if self.qbytes + added > PUNT_QUEUE_MAX:
            self.st.punt_drops += count
            pthread_mutex_unlock(&self.qlock)
            self._free_queue(first)
            return
        if self.qtail == NULL:
            self.qhead = first
        else:
            self.qtail.next = first
        self.qtail = last
        self.qbytes += added
        self.qframes += count
        if self.qframes > self.st.punt_queue_peak:
            self.st.punt_queue_peak = self.qframes
        pthread_cond_signal(&self.qcond)
        pthread_mutex_unlock(&self.qlock)

    cdef void _free_queue(self, punt_rec* r) noexcept nogil:
        cdef punt_rec* nxt
        while r != NULL:
            nxt = r.next
            free(r)
            r = nxt

    def _drain(self):
        """The punt thread: hands queued frames to punt, in order, until stop()."""
        cdef punt_rec* r
        cdef punt_rec* nxt
        cdef timespec ts
        cdef uint8_t* data
        cdef size_t freed = 0
        cdef bint empty
        while True:
            with nogil:
                pthread_mutex_lock(&self.qlock)
                while self.qhead == NULL and not self.stopping:
                    clock_gettime(CLOCK_REALTIME, &ts)
                    ts.tv_nsec += 100000000
                    if ts.tv_nsec >= 1000000000:
                        ts.tv_sec += 1
                        ts.tv_nsec -= 1000000000
                    pthread_cond_timedwait(&self.qcond, &self.qlock, &ts)
                r = self.qhead
                self.qhead = self.qtail = NULL
                self.qbytes = self.qframes = 0
                self.busy_oldest = r.t if r != NULL else -1.0
                pthread_mutex_unlock(&self.qlock)
            if r == NULL:
                return  # stopping, nothing left
            while r != NULL:
                data = <uint8_t*>r + sizeof(punt_rec)
                vnet_hdr = (<char*>data)[:self.hdr] if self.hdr else b""
                frame = bytearray((<char*>data + self.hdr)[:r.length - self.hdr])
                try:
                    self.punt(frame, vnet_hdr)
                except Exception as exc:  # a control-plane bug must not stop forwarding
                    import sys
                    print(f"bridge: punt handler failed: {exc!r}", file=sys.stderr)
                nxt = r.next
                freed += r.length
                free(r)
                r = nxt
            pthread_mutex_lock(&self.qlock)  # the batch's first stamp stood for all of it (they only grow)
            self.busy_oldest = -1.0
            empty = self.qhead == NULL
            pthread_mutex_unlock(&self.qlock)
            if empty and freed >= TRIM_AFTER:
                freed = 0
                with nogil:
                    malloc_trim(0)
