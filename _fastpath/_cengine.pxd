# The C core of the packet engine, for modules that cimport it (the inline bridge's
# recvmmsg/sendmmsg loop calls fp_table_classify on each frame without the GIL).
# Sequence numbers, acks and timestamps are uint32_t end to end: never pass them
# through a signed int (it flips sign above 2**31).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* m, const void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)

cdef struct fp_view:
    int error
    int link
    int vlan
    uint16_t ethertype
    uint8_t ip_version
    uint8_t ip_proto
    uint8_t ttl
    uint8_t flags
    uint8_t opts
    uint8_t migrate_preload
    uint8_t migrate_reqno
    uint32_t l3_off
    uint32_t ip_end
    uint32_t l4_off
    uint32_t payload_off
    uint32_t payload_len
    uint32_t tcp_hdr_len
    uint32_t pseudo_dst_off  # destination for the L4 pseudo-header (RFC 8200 8.1 final destination)
    uint16_t sport
    uint16_t dport
    uint16_t window
    uint16_t checksum
    uint16_t urgent
    uint16_t mss
    uint32_t seq
    uint32_t ack
    uint32_t tsval
    uint32_t tsecr
    int wscale
    int ts_off
    int sack_off
    int sack_count
    int mp_curve
    int unknown_options
    uint64_t migrate_token
    uint64_t migrate_request

cdef struct fp_key:
    uint8_t src[16]
    uint8_t dst[16]
    uint16_t sport
    uint16_t dport
    uint32_t family          # 4 or 6; keeps the struct 40 bytes with no padding

cdef struct fp_entry:
    fp_key key
    uint32_t hash
    uint8_t used
    uint8_t verdict
    uint8_t punt_flags
    uint8_t flags_seen
    uint8_t has_new_src
    uint8_t has_new_dst
    uint8_t seq_seen
    uint8_t ts_seen
    int32_t new_sport        # -1: unchanged
    int32_t new_dport
    uint8_t new_src[16]
    uint8_t new_dst[16]
    uint64_t frames
    uint64_t bytes
    double last_seen
    uint32_t seq_next
    uint32_t ack
    uint32_t window
    uint32_t tsval
    uint32_t tsecr

cdef struct fp_table:
    fp_entry* slots
    size_t mask              # capacity - 1 (capacity is a power of two)
    size_t count
    int link
    uint8_t default_verdict
    uint8_t default_punt
    uint8_t nontcp_verdict
    uint8_t malformed_verdict
    uint64_t stats[10]       # STAT_NAMES order
    uint64_t errors[10]      # by Err
    pthread_mutex_t lock     # held around every access: forwarding threads share the table

cdef int fp_parse(const uint8_t* f, size_t n, int link, fp_view* v) noexcept nogil
cdef int fp_table_classify(fp_table* t, uint8_t* f, size_t n, double now, bint partial) noexcept nogil

cdef class FlowTable:
    cdef fp_table* t
    cdef void _grow(self) except *
    cdef void _set_locked(self, fp_key* kp, uint32_t h, int verdict, object ns, object new_sport, object nd,
                          object new_dport, int punt_flags) except *
    cdef object _snapshot(self, const fp_entry* e)
