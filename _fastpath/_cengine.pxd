# The C core of the packet engine, for modules that cimport it (the inline bridge's
# recvmmsg/sendmmsg loop calls fp_table_classify or fp_table_classify_dir on each frame
# without the GIL).
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
    uint8_t ack_seen         # an ack was taken (flags_seen & ACK may come from a refused one)
    uint8_t sack_count
    uint8_t role             # conntrack: 0 client->server, 1 server->client (with conn)
    uint8_t awaiting_ack     # conntrack, client flow: the SYN/ACK was seen, the client's ACK not yet
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
    uint32_t sack[8]         # (left, right) pairs of the latest SACK option taken
    uint32_t conn            # conntrack: index + 1 of the fp_conn this flow is one direction of, 0: none
    uint64_t ignored         # frames that changed no tracked field: bad checksum, ack beyond sent

cdef struct fp_conn:        # one tracked connection (conntrack mode); links are index + 1, 0: none
    fp_key key               # client -> server
    uint64_t token
    uint64_t serial          # creation order
    double created
    double established_at
    double closed_at
    double active            # idle is measured from max(active, both flows' last_seen)
    uint32_t prev            # the state's list (half-open / established / closed); next: free list too
    uint32_t next
    uint32_t aprev           # every connection, in creation order
    uint32_t anext
    uint32_t tok_next        # token hash chain
    uint32_t client_isn
    uint32_t server_isn
    uint32_t client_tsval
    uint32_t server_tsval
    uint16_t client_mss
    uint16_t server_mss
    uint8_t client_wscale
    uint8_t server_wscale
    uint8_t client_opts      # SO_* bits
    uint8_t server_opts
    uint8_t state
    uint8_t flags            # CF_* bits
    uint8_t closed_by
    uint8_t lst              # which list it is in
    uint8_t client_mac[6]
    uint8_t router_mac[6]

cdef struct fp_event:
    fp_conn conn             # a copy, as it was when the event happened
    uint8_t kind
    uint8_t reason

cdef struct fp_ct:           # the connection-tracking state of a table (NULL when off)
    fp_conn* conns
    uint32_t conn_cap
    uint32_t count
    uint32_t free_head
    uint32_t* tok_buckets
    uint32_t tok_mask
    uint32_t head[4]         # lists: [unused, half-open, established, closed]
    uint32_t tail[4]
    uint32_t length[4]
    uint32_t cursor          # where the idle sweep resumes in the established list
    uint32_t all_head
    uint32_t all_tail
    uint32_t n_state[3]
    uint32_t n_pinned
    uint32_t n_tokens
    uint32_t max_connections
    uint32_t max_half_open
    double half_open_timeout
    double idle_timeout
    double closed_linger
    uint8_t tag_syns
    uint64_t serial
    fp_event* events         # a ring
    uint32_t ev_cap
    uint32_t ev_head
    uint32_t ev_len
    size_t min_slots         # the table never shrinks below its initial capacity
    uint64_t stats[22]       # CT_STAT_NAMES order

cdef struct fp_table:
    fp_entry* slots
    size_t mask              # capacity - 1 (capacity is a power of two)
    size_t count
    int link
    uint8_t default_verdict
    uint8_t default_punt
    uint8_t nontcp_verdict
    uint8_t malformed_verdict
    uint64_t stats[12]       # STAT_NAMES order
    uint64_t errors[10]      # by Err
    pthread_mutex_t lock     # held around every access: forwarding threads share the table
    fp_ct* ct                # connection tracking, or NULL

cdef int fp_parse(const uint8_t* f, size_t n, int link, fp_view* v) noexcept nogil
cdef int fp_table_classify(fp_table* t, uint8_t* f, size_t n, double now, bint partial) noexcept nogil
# With the frame's direction (0 OUT: client side -> network, 1 IN, -1 unknown: as fp_table_classify).
# cap: the bytes the frame's buffer holds (a tagged client SYN grows up to it); *new_len: its length after.
cdef int fp_table_classify_dir(fp_table* t, uint8_t* f, size_t n, size_t cap, double now, bint partial,
                               int direction, size_t* new_len) noexcept nogil

cdef class FlowTable:
    cdef fp_table* t
    cdef object _ct_config       # check_conntrack_config()'s tuple
    cdef void _grow(self) except *
    cdef void _set_locked(self, fp_key* kp, uint32_t h, int verdict, object ns, object new_sport, object nd,
                          object new_dport, int punt_flags) except *
    cdef object _snapshot(self, const fp_entry* e)
