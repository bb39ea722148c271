# C types for greenqueue/_request.py when setup.py compiles it (see greenqueue/_accel.py). The .py
# stays the source of truth and runs as is without a build; these lines only make attribute reads
# struct loads. HTTPSettings keeps a __dict__: servers and tests hang their own settings on it.

cdef class HTTPSettings:
    cdef public object app, forwarded_allow, header_timeout, keepalive_timeout, retire_grace, budget
    cdef public Py_ssize_t max_request_line, max_header_size, max_headers
    cdef public str server_name, server_port
    cdef public bint access_log_enabled, shutting_down
    cdef public dict base_environ
    cdef dict __dict__

cdef class _Request:
    cdef public bytes url, method
    cdef public list headers, body
    cdef public Py_ssize_t header_bytes, body_len
    cdef public bint headers_done, complete, keep_alive, upgrade
    cdef public str version

cdef class _Parser:
    cdef public HTTPSettings settings
    cdef public object queue, current, parser, error
    cpdef feed(self, data)

cdef class Input:
    cdef public object _conn, _req, _buf
    cdef public bint _continue_sent, cut
