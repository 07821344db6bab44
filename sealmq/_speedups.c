/* sealmq._speedups: the record fast path's framing, compiled.
 *
 * Three functions, each the exact equivalent of a few lines of sealmq/record.py and sealmq/session.py
 * (the pure-Python code stays the reference and the fallback; tests/test_speedups.py,
 * tests/test_record_fast.py and tests/test_endpoint_compiled.py hold the two to the same bytes, the
 * same results and the same deferrals):
 *
 *   seal(aead, base, header, prefixes, suffix, piv, plaintext, tag_len) -> record bytes
 *       EpochCodec.seal after its checks: the nonce (base XOR piv), the AAD (prefix, Partial IV,
 *       suffix), aead.encrypt(nonce, plaintext, aad), and the record (header, the Partial IV's
 *       CBOR head, the ciphertext's byte-string head, the ciphertext). From 4 KiB of plaintext,
 *       the AEAD writes the ciphertext straight into the record (encrypt_into).
 *
 *   open_hot(data, topic, state, window) -> (kind, piv, plaintext) or None
 *       Session._open_hot for a record whose sequence number is above the replay window's highest:
 *       header check, route lookup, the shortest heads, the nonce and AAD,
 *       aead.decrypt(nonce, ciphertext, aad), and then ReplayWindow.mark's usual case (the new
 *       highest: shift the bits, set the lowest, keep ``size`` of them). None ("not mine") before
 *       any call and any change for anything else:
 *       a record the caller then runs through the Python path, which decides. The AEAD's own
 *       exception (InvalidTag) propagates: the caller turns it into DecryptError. A malformed
 *       state (a programming error, never the record's doing) raises TypeError, which is not
 *       one of the AEAD's failures, so it cannot pass for a failed decryption.
 *       state = (kid_part, epoch, routes, base, aead, tag_len); routes maps (topic, kind byte) to
 *       (kind, pieces, prefixes, suffix).
 *
 *   open_known(data, topic, record_topics, sessions) -> [Received] or None
 *       BackendEndpoint.handle for the same usual record, from the topic to the event:
 *       record_topics[topic] names the device (the record topics the Python path has parsed),
 *       sessions[device].session._hot.ready is its session's open_hot state (_hot is None when
 *       Session.open would not take its compiled branch), then open_hot, then the Received event with its
 *       fields set as Received.__init__ sets them. None for anything else, before any change;
 *       the AEAD's exception propagates (the endpoint then runs the Python path, which counts and
 *       rejects the record in one place).
 *
 * No key ever reaches this module: the AEAD is the `cryptography` object the session holds. No
 * I/O, no clock, no randomness: the protocol core stays sans-IO.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_PIV ((1ULL << 40) - 1)
#define MAX_NONCE 16
#define MAX_CIPHERTEXT (65535 + 16) /* limits.MAX_PLAINTEXT + limits.MAX_TAG_LENGTH */
#define VIEW_FROM 4096              /* ciphertexts this long or longer are passed as a view, not copied */

static PyObject *str_encrypt;
static PyObject *str_encrypt_into;
static PyObject *str_decrypt;
static PyObject *str_highest; /* ReplayWindow's slots */
static PyObject *str_bits;
static PyObject *str_size;
static PyObject *str_session; /* the backend endpoint's session entries, a Session's _hot, and its ready */
static PyObject *str_hot;
static PyObject *str_ready;
/* sealmq.events.Received's fields, in the order of its __init__ */
#define N_EVENT_FIELDS 5
static PyObject *event_fields[N_EVENT_FIELDS];
static PyObject *empty_tuple;

static int piv_length(unsigned long long piv) {
    int n = 1;
    while (n < 8 && (piv >> (8 * n)) != 0) {
        n++;
    }
    return n;
}

/* nonce = base XOR piv (big-endian, right-aligned); base is nonce_len bytes */
static void make_nonce(unsigned char *nonce, const char *base, Py_ssize_t nonce_len, unsigned long long piv) {
    memcpy(nonce, base, (size_t)nonce_len);
    for (int k = 0; k < 8 && k < nonce_len; k++) {
        nonce[nonce_len - 1 - k] ^= (unsigned char)(piv >> (8 * k));
    }
}

/* prefix || piv bytes || suffix */
static PyObject *make_aad(PyObject *prefix, unsigned long long piv, int piv_len, PyObject *suffix) {
    Py_ssize_t plen = PyBytes_GET_SIZE(prefix), slen = PyBytes_GET_SIZE(suffix);
    PyObject *aad = PyBytes_FromStringAndSize(NULL, plen + piv_len + slen);
    if (aad == NULL) {
        return NULL;
    }
    char *p = PyBytes_AS_STRING(aad);
    memcpy(p, PyBytes_AS_STRING(prefix), (size_t)plen);
    for (int k = 0; k < piv_len; k++) {
        p[plen + k] = (char)(piv >> (8 * (piv_len - 1 - k)));
    }
    memcpy(p + plen + piv_len, PyBytes_AS_STRING(suffix), (size_t)slen);
    return aad;
}

static int check_bytes(PyObject *o, const char *what) {
    if (!PyBytes_CheckExact(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", what);
        return -1;
    }
    return 0;
}

/* The Partial IV's CBOR head and the ciphertext's byte-string head, into ``head`` (16 bytes);
 * returns their length, or -1 for a ciphertext longer than a 4-byte length. */
static int write_heads(unsigned char *head, unsigned long long piv, Py_ssize_t ct_len) {
    int h = 0;
    int width;
    if (piv < 24) {
        head[h++] = (unsigned char)piv;
        width = 0;
    } else if (piv < 0x100) {
        head[h++] = 0x18;
        width = 1;
    } else if (piv < 0x10000) {
        head[h++] = 0x19;
        width = 2;
    } else if (piv < 0x100000000ULL) {
        head[h++] = 0x1a;
        width = 4;
    } else {
        head[h++] = 0x1b;
        width = 8;
    }
    for (int k = width - 1; k >= 0; k--) {
        head[h++] = (unsigned char)(piv >> (8 * k));
    }
    if (ct_len < 24) {
        head[h++] = (unsigned char)(0x40 | ct_len);
    } else if (ct_len < 0x100) {
        head[h++] = 0x58;
        head[h++] = (unsigned char)ct_len;
    } else if (ct_len < 0x10000) {
        head[h++] = 0x59;
        head[h++] = (unsigned char)(ct_len >> 8);
        head[h++] = (unsigned char)ct_len;
    } else if (ct_len <= 0xFFFFFFFFLL) {
        head[h++] = 0x5a;
        head[h++] = (unsigned char)(ct_len >> 24);
        head[h++] = (unsigned char)(ct_len >> 16);
        head[h++] = (unsigned char)(ct_len >> 8);
        head[h++] = (unsigned char)ct_len;
    } else {
        return -1;
    }
    return h;
}

/* A new record of ``ct_len`` bytes of ciphertext: the header and the two heads written, the
 * ciphertext's place (``*ct_at``) left for the caller to fill before anyone else sees it. */
static PyObject *new_record(PyObject *header, unsigned long long piv, Py_ssize_t ct_len, char **ct_at) {
    unsigned char head[16];
    int h = write_heads(head, piv, ct_len);
    if (h < 0) {
        PyErr_SetString(PyExc_ValueError, "ciphertext too long");
        return NULL;
    }
    Py_ssize_t hlen = PyBytes_GET_SIZE(header);
    PyObject *out = PyBytes_FromStringAndSize(NULL, hlen + h + ct_len);
    if (out == NULL) {
        return NULL;
    }
    char *o = PyBytes_AS_STRING(out);
    memcpy(o, PyBytes_AS_STRING(header), (size_t)hlen);
    memcpy(o + hlen, head, (size_t)h);
    *ct_at = o + hlen + h;
    return out;
}

/* The nonce (base XOR piv) and the AAD (the prefix for the Partial IV's length, its bytes, the
 * suffix) of one record; ``base`` already checked to be a nonce's length. 0, or -1 with an error. */
static int nonce_and_aad(PyObject *base, PyObject *prefixes, PyObject *suffix, unsigned long long piv,
                         PyObject **nonce, PyObject **aad) {
    if (!PyTuple_CheckExact(prefixes) || PyTuple_GET_SIZE(prefixes) != 6) {
        PyErr_SetString(PyExc_TypeError, "prefixes must be a tuple of 6");
        return -1;
    }
    int piv_len = piv_length(piv);
    if (piv_len >= PyTuple_GET_SIZE(prefixes)) { /* never with piv <= MAX_PIV: belt and braces for the index */
        PyErr_SetString(PyExc_TypeError, "no AAD prefix for a Partial IV this long");
        return -1;
    }
    PyObject *prefix = PyTuple_GET_ITEM(prefixes, piv_len);
    if (check_bytes(prefix, "prefix")) {
        return -1;
    }
    unsigned char nonce_buf[MAX_NONCE];
    make_nonce(nonce_buf, PyBytes_AS_STRING(base), PyBytes_GET_SIZE(base), piv);
    *nonce = PyBytes_FromStringAndSize((const char *)nonce_buf, PyBytes_GET_SIZE(base));
    if (*nonce == NULL) {
        return -1;
    }
    *aad = make_aad(prefix, piv, piv_len, suffix);
    if (*aad == NULL) {
        Py_CLEAR(*nonce);
        return -1;
    }
    return 0;
}

/* A large plaintext (a media chunk): the record's bytes are made first, and the AEAD writes the
 * ciphertext into them (encrypt_into), instead of returning it for a second copy. */
static PyObject *seal_into(PyObject *aead, PyObject *nonce, PyObject *plaintext, PyObject *aad, PyObject *header,
                           unsigned long long piv, Py_ssize_t ct_len) {
    char *ct_at;
    PyObject *out = new_record(header, piv, ct_len, &ct_at);
    if (out == NULL) {
        return NULL;
    }
    /* out is ours alone until returned: the AEAD fills it through this view, and drops the view */
    PyObject *view = PyMemoryView_FromMemory(ct_at, ct_len, PyBUF_WRITE);
    if (view == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *call[5] = {aead, nonce, plaintext, aad, view};
    PyObject *n = PyObject_VectorcallMethod(str_encrypt_into, call, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(view);
    if (n == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_ssize_t written = PyLong_AsSsize_t(n);
    Py_DECREF(n);
    if (written != ct_len) {
        Py_DECREF(out);
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "the AEAD wrote a ciphertext of another length");
        }
        return NULL;
    }
    return out;
}

static PyObject *speedups_seal(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "seal(aead, base, header, prefixes, suffix, piv, plaintext, tag_len)");
        return NULL;
    }
    PyObject *aead = args[0], *base = args[1], *header = args[2], *prefixes = args[3], *suffix = args[4];
    PyObject *plaintext = args[6];
    if (check_bytes(base, "base") || check_bytes(header, "header") || check_bytes(suffix, "suffix")) {
        return NULL;
    }
    unsigned long long piv = PyLong_AsUnsignedLongLong(args[5]);
    if (piv == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (piv > MAX_PIV) {
        PyErr_SetString(PyExc_ValueError, "sequence number outside 0..2**40-1");
        return NULL;
    }
    Py_ssize_t nonce_len = PyBytes_GET_SIZE(base);
    if (nonce_len < 8 || nonce_len > MAX_NONCE) {
        PyErr_SetString(PyExc_ValueError, "nonce base of an unexpected length");
        return NULL;
    }
    PyObject *nonce, *aad;
    if (nonce_and_aad(base, prefixes, suffix, piv, &nonce, &aad) < 0) {
        return NULL;
    }
    Py_ssize_t tag_len = PyLong_AsSsize_t(args[7]);
    if (tag_len == -1 && PyErr_Occurred()) {
        Py_DECREF(nonce);
        Py_DECREF(aad);
        return NULL;
    }
    if (PyBytes_CheckExact(plaintext) && PyBytes_GET_SIZE(plaintext) >= VIEW_FROM && tag_len > 0) {
        PyObject *out = seal_into(aead, nonce, plaintext, aad, header, piv, PyBytes_GET_SIZE(plaintext) + tag_len);
        Py_DECREF(nonce);
        Py_DECREF(aad);
        return out;
    }
    PyObject *call[4] = {aead, nonce, plaintext, aad};
    PyObject *ct = PyObject_VectorcallMethod(str_encrypt, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(nonce);
    Py_DECREF(aad);
    if (ct == NULL) {
        return NULL;
    }
    if (!PyBytes_CheckExact(ct)) {
        Py_DECREF(ct);
        PyErr_SetString(PyExc_TypeError, "the AEAD returned something other than bytes");
        return NULL;
    }
    Py_ssize_t ct_len = PyBytes_GET_SIZE(ct);
    char *ct_at;
    PyObject *out = new_record(header, piv, ct_len, &ct_at);
    if (out != NULL) {
        memcpy(ct_at, PyBytes_AS_STRING(ct), (size_t)ct_len);
    }
    Py_DECREF(ct);
    return out;
}

/* ReplayWindow.mark's usual case, without changing the window: the bits after a new highest
 * ``shift`` (> 0) above the old one: 1 if the jump passes the whole window, else
 * ((bits << shift) | 1) & ((1 << size) - 1). */
static PyObject *window_marked(PyObject *window, long long shift) {
    PyObject *size_o = PyObject_GetAttr(window, str_size);
    if (size_o == NULL) {
        return NULL;
    }
    long long size = PyLong_AsLongLong(size_o);
    if (size == -1 && PyErr_Occurred()) {
        Py_DECREF(size_o);
        return NULL;
    }
    if (shift >= size) {
        Py_DECREF(size_o);
        return PyLong_FromLong(1);
    }
    PyObject *bits = PyObject_GetAttr(window, str_bits);
    PyObject *shift_o = bits ? PyLong_FromLongLong(shift) : NULL;
    PyObject *one = shift_o ? PyLong_FromLong(1) : NULL;
    PyObject *shifted = one ? PyNumber_Lshift(bits, shift_o) : NULL;
    PyObject *set = shifted ? PyNumber_Or(shifted, one) : NULL;
    PyObject *top = set ? PyNumber_Lshift(one, size_o) : NULL;
    PyObject *mask = top ? PyNumber_Subtract(top, one) : NULL;
    PyObject *out = mask ? PyNumber_And(set, mask) : NULL;
    Py_DECREF(size_o);
    Py_XDECREF(bits);
    Py_XDECREF(shift_o);
    Py_XDECREF(one);
    Py_XDECREF(shifted);
    Py_XDECREF(set);
    Py_XDECREF(top);
    Py_XDECREF(mask);
    return out;
}

/* open_hot's work: a new reference to (kind, piv, plaintext) or to None, or NULL with an exception */
static PyObject *open_hot_impl(PyObject *data, PyObject *topic, PyObject *state, PyObject *window) {
    if (!PyBytes_CheckExact(data) || !PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 6) {
        Py_RETURN_NONE;
    }
    PyObject *kid_part = PyTuple_GET_ITEM(state, 0), *epoch_o = PyTuple_GET_ITEM(state, 1);
    PyObject *routes = PyTuple_GET_ITEM(state, 2), *base = PyTuple_GET_ITEM(state, 3);
    PyObject *aead = PyTuple_GET_ITEM(state, 4), *tag_o = PyTuple_GET_ITEM(state, 5);
    if (check_bytes(kid_part, "kid_part") || check_bytes(base, "base") || !PyDict_CheckExact(routes)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "routes must be a dict");
        }
        return NULL;
    }
    long epoch = PyLong_AsLong(epoch_o);
    long tag_len = PyLong_AsLong(tag_o);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *highest_o = PyObject_GetAttr(window, str_highest);
    if (highest_o == NULL) {
        return NULL;
    }
    long long highest = PyLong_AsLongLong(highest_o);
    Py_DECREF(highest_o);
    if (highest == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (epoch < 0 || epoch >= 24) {
        Py_RETURN_NONE;
    }
    Py_ssize_t nonce_len = PyBytes_GET_SIZE(base);
    if (nonce_len < 8 || nonce_len > MAX_NONCE) {
        PyErr_SetString(PyExc_TypeError, "nonce base of an unexpected length");
        return NULL;
    }
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    Py_ssize_t kp = PyBytes_GET_SIZE(kid_part);
    Py_ssize_t n = 2 + kp + 1; /* 0x85, the kind's byte, kid_part, the epoch's byte */
    if (len < n || d[0] != 0x85 || d[n - 1] != (unsigned char)epoch ||
        memcmp(d + 2, PyBytes_AS_STRING(kid_part), (size_t)kp) != 0) {
        Py_RETURN_NONE;
    }
    /* the route of (topic, kind byte): only pairs the Python path admitted are in the table */
    PyObject *kind_byte = PyLong_FromLong(d[1]);
    if (kind_byte == NULL) {
        return NULL;
    }
    PyObject *key = PyTuple_Pack(2, topic, kind_byte);
    Py_DECREF(kind_byte);
    if (key == NULL) {
        return NULL;
    }
    PyObject *route = PyDict_GetItemWithError(routes, key); /* borrowed */
    Py_DECREF(key);
    if (route == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (!PyTuple_CheckExact(route) || PyTuple_GET_SIZE(route) != 4) {
        PyErr_SetString(PyExc_TypeError, "a route must be (kind, pieces, prefixes, suffix)");
        return NULL;
    }
    /* the Partial IV: shortest head only (record.read_tail), within 0..MAX_PIV */
    Py_ssize_t i = n;
    unsigned long long piv;
    unsigned char b = d[i];
    Py_ssize_t width;
    unsigned long long least;
    if (b < 24) {
        piv = b;
        width = 0;
        least = 0;
    } else if (b == 0x18) {
        width = 1;
        least = 24;
    } else if (b == 0x19) {
        width = 2;
        least = 0x100;
    } else if (b == 0x1a) {
        width = 4;
        least = 0x10000;
    } else if (b == 0x1b) {
        width = 8;
        least = 0x100000000ULL;
    } else {
        Py_RETURN_NONE;
    }
    i += 1;
    if (width) {
        if (len < i + width) {
            Py_RETURN_NONE;
        }
        piv = 0;
        for (Py_ssize_t k = 0; k < width; k++) {
            piv = (piv << 8) | d[i + k];
        }
        i += width;
        if (piv < least || piv > MAX_PIV) {
            Py_RETURN_NONE;
        }
    }
    /* only a new highest sequence number: the replay window's check passes without looking */
    if ((long long)piv <= highest) {
        Py_RETURN_NONE;
    }
    /* the ciphertext: shortest head, at least a tag, ending the record */
    if (i >= len) {
        Py_RETURN_NONE;
    }
    unsigned char hb = d[i];
    Py_ssize_t ct_len;
    if (hb >= 0x40 && hb < 0x58) {
        ct_len = hb - 0x40;
        i += 1;
    } else if (hb == 0x58) {
        if (len < i + 2) {
            Py_RETURN_NONE;
        }
        ct_len = d[i + 1];
        i += 2;
        if (ct_len < 24) {
            Py_RETURN_NONE;
        }
    } else if (hb == 0x59) {
        if (len < i + 3) {
            Py_RETURN_NONE;
        }
        ct_len = ((Py_ssize_t)d[i + 1] << 8) | d[i + 2];
        i += 3;
        if (ct_len < 0x100) {
            Py_RETURN_NONE;
        }
    } else if (hb == 0x5a) {
        if (len < i + 5) {
            Py_RETURN_NONE;
        }
        ct_len = ((Py_ssize_t)d[i + 1] << 24) | ((Py_ssize_t)d[i + 2] << 16) | ((Py_ssize_t)d[i + 3] << 8) | d[i + 4];
        i += 5;
        if (ct_len < 0x10000 || ct_len > MAX_CIPHERTEXT) {
            Py_RETURN_NONE;
        }
    } else {
        Py_RETURN_NONE;
    }
    if (i + ct_len != len || ct_len < tag_len) {
        Py_RETURN_NONE;
    }
    PyObject *kind = PyTuple_GET_ITEM(route, 0), *prefixes = PyTuple_GET_ITEM(route, 2);
    PyObject *suffix = PyTuple_GET_ITEM(route, 3);
    PyObject *nonce, *aad;
    if (check_bytes(suffix, "suffix") || nonce_and_aad(base, prefixes, suffix, piv, &nonce, &aad) < 0) {
        return NULL;
    }
    /* A large ciphertext (a media chunk) is read in place: a read-only view into ``data``, which
     * the caller holds for the whole call, and the AEAD releases when it returns. A small one is
     * copied: for a few hundred bytes the copy costs less than making the view. */
    PyObject *ct = ct_len >= VIEW_FROM ? PyMemoryView_FromMemory((char *)d + i, ct_len, PyBUF_READ)
                                       : PyBytes_FromStringAndSize((const char *)d + i, ct_len);
    if (ct == NULL) {
        Py_DECREF(nonce);
        Py_DECREF(aad);
        return NULL;
    }
    PyObject *call[4] = {aead, nonce, ct, aad};
    PyObject *pt = PyObject_VectorcallMethod(str_decrypt, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(nonce);
    Py_DECREF(aad);
    Py_DECREF(ct);
    if (pt == NULL) {
        return NULL;
    }
    PyObject *piv_o = PyLong_FromUnsignedLongLong(piv);
    PyObject *bits = piv_o ? window_marked(window, (long long)piv - highest) : NULL;
    PyObject *out = bits ? PyTuple_New(3) : NULL;
    /* both slots set together, or neither (setting a slot of the right type does not fail) */
    if (out == NULL || PyObject_SetAttr(window, str_bits, bits) < 0 || PyObject_SetAttr(window, str_highest, piv_o) < 0) {
        Py_DECREF(pt);
        Py_XDECREF(piv_o);
        Py_XDECREF(bits);
        Py_XDECREF(out);
        return NULL;
    }
    Py_DECREF(bits);
    Py_INCREF(kind);
    PyTuple_SET_ITEM(out, 0, kind);
    PyTuple_SET_ITEM(out, 1, piv_o);
    PyTuple_SET_ITEM(out, 2, pt);
    return out;
}

static PyObject *speedups_open_hot(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "open_hot(data, topic, state, window)");
        return NULL;
    }
    return open_hot_impl(args[0], args[1], args[2], args[3]);
}

/* An instance of ``type`` (a class, checked by the caller, whose instances keep their attributes in a dict) with the
 * event fields set in order, its __init__ not run; NULL with an exception. */
static PyObject *new_event(PyObject *type, PyObject *const *values) {
    PyObject *obj = ((PyTypeObject *)type)->tp_new((PyTypeObject *)type, empty_tuple, NULL);
    if (obj == NULL) {
        return NULL;
    }
    for (int k = 0; k < N_EVENT_FIELDS; k++) {
        if (PyObject_GenericSetAttr(obj, event_fields[k], values[k]) < 0) {
            Py_DECREF(obj);
            return NULL;
        }
    }
    return obj;
}

static PyObject *speedups_open_known(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4 || !PyDict_CheckExact(args[2]) || !PyDict_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "open_known(data, topic, record_topics: dict, sessions: dict)");
        return NULL;
    }
    PyObject *data = args[0], *topic = args[1];
    if (!PyBytes_CheckExact(data) || !PyUnicode_CheckExact(topic)) {
        Py_RETURN_NONE;
    }
    PyObject *device_id = PyDict_GetItemWithError(args[2], topic); /* borrowed */
    PyObject *est = device_id ? PyDict_GetItemWithError(args[3], device_id) : NULL; /* borrowed */
    if (est == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    Py_INCREF(est); /* held across the attribute reads */
    PyObject *session = PyObject_GetAttr(est, str_session);
    Py_DECREF(est);
    PyObject *hot = session ? PyObject_GetAttr(session, str_hot) : NULL;
    Py_XDECREF(session);
    if (hot == NULL || hot == Py_None) {
        return hot; /* NULL: the exception; None: not ready, the Python path decides */
    }
    PyObject *ready = PyObject_GetAttr(hot, str_ready);
    Py_DECREF(hot);
    if (ready == NULL) {
        return NULL;
    }
    if (!PyTuple_CheckExact(ready) || PyTuple_GET_SIZE(ready) != 5 || !PyType_Check(PyTuple_GET_ITEM(ready, 2)) ||
        ((PyTypeObject *)PyTuple_GET_ITEM(ready, 2))->tp_new == NULL) {
        /* checked before the record is opened: nothing is marked for an event that cannot be made */
        Py_DECREF(ready);
        PyErr_SetString(PyExc_TypeError, "a session's _hot.ready must be (state, window, event class, device_id, epoch)");
        return NULL;
    }
    PyObject *opened = open_hot_impl(data, topic, PyTuple_GET_ITEM(ready, 0), PyTuple_GET_ITEM(ready, 1));
    if (opened == NULL || opened == Py_None) {
        Py_DECREF(ready);
        return opened;
    }
    /* The Received event, as Session.open builds it: its five fields set in order, as
     * Received.__init__ does (the instance's attributes written past the frozen dataclass's
     * __setattr__), without running that Python method. */
    PyObject *values[N_EVENT_FIELDS] = {PyTuple_GET_ITEM(ready, 3), PyTuple_GET_ITEM(opened, 0),
                                        PyTuple_GET_ITEM(opened, 2), PyTuple_GET_ITEM(ready, 4),
                                        PyTuple_GET_ITEM(opened, 1)};
    PyObject *event = new_event(PyTuple_GET_ITEM(ready, 2), values);
    Py_DECREF(opened);
    Py_DECREF(ready);
    if (event == NULL) {
        return NULL;
    }
    PyObject *out = PyList_New(1);
    if (out == NULL) {
        Py_DECREF(event);
        return NULL;
    }
    PyList_SET_ITEM(out, 0, event);
    return out;
}

static PyMethodDef speedups_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))speedups_seal, METH_FASTCALL,
     "seal(aead, base, header, prefixes, suffix, piv, plaintext, tag_len) -> record bytes"},
    {"open_hot", (PyCFunction)(void (*)(void))speedups_open_hot, METH_FASTCALL,
     "open_hot(data, topic, state, window) -> (kind, piv, plaintext) or None"},
    {"open_known", (PyCFunction)(void (*)(void))speedups_open_known, METH_FASTCALL,
     "open_known(data, topic, record_topics, sessions) -> [Received] or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "sealmq._speedups", "The record fast path's framing, compiled (see the C source).", -1,
    speedups_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    str_encrypt = PyUnicode_InternFromString("encrypt");
    str_encrypt_into = PyUnicode_InternFromString("encrypt_into");
    str_decrypt = PyUnicode_InternFromString("decrypt");
    str_highest = PyUnicode_InternFromString("_highest");
    str_bits = PyUnicode_InternFromString("_bits");
    str_size = PyUnicode_InternFromString("size");
    str_session = PyUnicode_InternFromString("session");
    str_hot = PyUnicode_InternFromString("_hot");
    str_ready = PyUnicode_InternFromString("ready");
    static const char *const names[N_EVENT_FIELDS] = {"device_id", "kind", "plaintext", "epoch", "seq"};
    for (int k = 0; k < N_EVENT_FIELDS; k++) {
        if ((event_fields[k] = PyUnicode_InternFromString(names[k])) == NULL) {
            return NULL;
        }
    }
    if ((empty_tuple = PyTuple_New(0)) == NULL) {
        return NULL;
    }
    if (str_encrypt == NULL || str_encrypt_into == NULL || str_decrypt == NULL || str_highest == NULL || str_bits == NULL ||
        str_size == NULL || str_session == NULL || str_hot == NULL || str_ready == NULL) {
        return NULL;
    }
    return PyModule_Create(&speedups_module);
}
