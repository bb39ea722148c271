# C types for greenqueue/_http.py when setup.py compiles it (see greenqueue/_accel.py). The methods
# declared cpdef are called per request; compiled callers reach them without a Python method lookup,
# and a Python subclass (a test's) still overrides them. Aliased cimports keep the Python names free.

from greenqueue._request cimport HTTPSettings as CSettings, _Parser as CParser, _Request as CRequest

cpdef bint _busy(object loop)

cdef class Connection:
    cdef public object sock, address, registry, _burst_end, _raw, _hub, _rio, _dio, _streamer
    cdef public object _deadline, _waiter, _wake, _timer, _out, ws, dispatcher, _on_ready_cb, _iio
    cdef public CSettings settings
    cdef public CParser parser
    cdef public bint idle, expect_continue, tcp, _nagle, _parked, _queued, _trusted
    cdef public double body_timeout, _timer_at
    cdef public str _peer_addr, _peer_port
    cdef object __weakref__
    cpdef send_raw(self, data)
    cpdef send_final(self, data)
    cpdef _flush_queued(self)
    cpdef _on_ready(self)
    cpdef serve(self, list contexts)
    cpdef bint _serve_ready(self, list contexts) except? -1
    cpdef bint _go_idle(self) except? -1
    cpdef dict _build_environ(self, CRequest req)
    cpdef bint _handle_request(self, CRequest req) except? -1
    cpdef end_stream(self)

cdef class Dispatcher:
    cdef public object ready, idle, runners, hub
    cdef public bint kick_pending
    cdef public Py_ssize_t max_idle
