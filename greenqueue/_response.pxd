# C types for greenqueue/_response.py when setup.py compiles it (see greenqueue/_accel.py). The
# methods declared cpdef are the ones called once or more per request from compiled code.

cdef class _Response:
    cdef public object conn, req, status, declared, length
    cdef public dict environ
    cdef public int status_code
    cdef public list lines
    cdef public bint close_asked, sse, headers_sent, chunked, keep_alive, head, no_body
    cdef public Py_ssize_t sent_body
    cpdef bytes _head(self, body_len)
    cpdef write(self, data)
    cpdef _frame(self, data)
    cpdef run(self, app)
    cpdef _send_result(self, result)

cpdef str _date_line()
