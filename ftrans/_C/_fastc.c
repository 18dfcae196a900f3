/* The torch-function fast path's hit case in C (optional; ftrans/_C/fastpath.py explains it).
 *
 * ``tf_entry`` is BatchedTensor.__torch_function__ when this extension is built.  It handles
 * exactly one case itself: a call the Python fast path has already learned as ONE functional
 * pointwise aten op (``fastpath._CACHE`` holds ``(prepared op, True, physical callable)`` for its
 * signature), with every batched argument wrapped by the same levels (one vmap, or nested
 * vmaps), each along dim 0, over a plain tensor free of the neg bit, no argument autograd would
 * record on, no autocast, no forward-AD level, and no dispatch mode but vmap's own.  Then the
 * result is the physical op on the innermost values, wrapped once per level: the very call
 * ``fastpath._fast_call`` (one level) or ``dispatch.direct_pointwise`` (nested) makes in that
 * case, minus the interpreter.  A learned signature of an op with a batching rule goes to the
 * rule through ``fastpath.run_rule``, the signature not looked up twice.
 *
 * Anything else, including any exception on the way, goes to the Python entry
 * (``torch_function.batched_torch_function``) with the arguments untouched, which decides and
 * raises as it always did.  The extension holds no state of its own: the cache, the types and
 * the torch functions it calls are handed over by ``fastpath.py`` through ``init``.
 *
 * Only the CPython C API is used (no torch headers): torch is reached through the same Python
 * callables the pure-Python path calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *g_fallback;       /* batched_torch_function(cls, func, types, args, kwargs) */
static PyObject *g_cache;          /* fastpath._CACHE: func -> {signature: hit} or False */
static PyObject *g_overrides;      /* torch_function.OVERRIDES */
static PyObject *g_tf_rules;       /* tfrules.RULES */
static PyObject *g_autodiff_depth; /* levels.AUTODIFF_DEPTH (a one-item list) */
static PyObject *g_fwad;           /* torch.autograd.forward_ad (module; _current_level) */
static PyObject *g_autocast;       /* torch._C._is_any_autocast_enabled */
static PyObject *g_grad_enabled;   /* torch.is_grad_enabled */
static PyObject *g_stack_len;      /* torch._C._len_torch_dispatch_stack */
static PyObject *g_stack_at;       /* torch._C._get_dispatch_stack_at */
static PyObject *g_is_excluded;    /* torch._C._dispatch_tls_is_dispatch_key_excluded */
static PyObject *g_set_excluded;   /* torch._C._dispatch_tls_set_dispatch_key_excluded */
static PyObject *g_python_key;     /* torch._C.DispatchKey.Python */
static PyObject *g_snapshot_key;   /* torch._C.DispatchKey.PythonTLSSnapshot */
static PyObject *g_run_rule;       /* fastpath.run_rule(op, level, args) */
static PyObject *g_matmul;         /* torch.matmul */
static PyObject *g_matmuls;        /* the torch functions that are torch.matmul (a tuple) */
static PyTypeObject *g_parameter;  /* torch.nn.Parameter */
static PyObject *g_miss;           /* fastpath.MISS */
static PyObject *g_disable_tf;     /* torch._C.DisableTorchFunctionSubclass (type) */
static PyObject *g_make_wrapper;   /* torch.Tensor._make_wrapper_subclass */
static PyObject *g_strided;        /* torch.strided */
static PyObject *g_make_batched;   /* batched.make_batched(value, bdim, level) */
static PyTypeObject *g_bt;         /* BatchedTensor */
static PyTypeObject *g_tensor;     /* torch.Tensor */
static PyTypeObject *g_vmap_mode;  /* dispatch.VmapMode */
static int g_enabled;              /* the fast path is on (FTRANS_NO_FASTPATH unset) */
static int g_positional;           /* _make_wrapper_subclass takes its arguments positionally */
static long g_hits;                /* calls served here (tests check the extension is used) */
static long g_matmul_hits;         /* of which matmuls */
static PyObject *g_zero;           /* the int 0 */

static PyObject *s_value, *s_bdim, *s_level, *s_id, *s_alive, *s_requires_grad, *s_dtype,
    *s_dim, *s_is_cuda, *s_is_neg, *s_shape, *s_is_contiguous, *s_device, *s_current_level,
    *s_enter, *s_exit, *s_layout, *s_is_complex;

#define MAX_ARGS 8
#define MAX_DEPTH 4

static PyObject *fallback(PyObject *cls, PyObject *func, PyObject *types, PyObject *args,
                          PyObject *kwargs)
{
    PyObject *call[5] = {cls, func, types, args, kwargs ? kwargs : Py_None};
    return PyObject_Vectorcall(g_fallback, call, 5, NULL);
}

/* The truth of a new reference (stolen): 1 true, 0 false, -1 error. */
static int truth(PyObject *r)
{
    if (!r)
        return -1;
    int b = PyObject_IsTrue(r);
    Py_DECREF(r);
    return b;
}

#define call_bool(f) truth(PyObject_CallNoArgs(f))
#define method_bool(o, name) truth(PyObject_CallMethodNoArgs(o, name))
#define attr_bool(o, name) truth(PyObject_GetAttr(o, name))

static int is_scalar_type(PyTypeObject *t)
{
    return t == &PyLong_Type || t == &PyFloat_Type || t == &PyBool_Type ||
           t == &PyComplex_Type || t == Py_TYPE(Py_None);
}

/* (type, dtype, dim, is_cuda) of a tensor: the Python fast path's signature entry. */
static PyObject *tensor_key(PyObject *a)
{
    PyObject *dtype = PyObject_GetAttr(a, s_dtype);
    if (!dtype)
        return NULL;
    PyObject *dim = PyObject_CallMethodNoArgs(a, s_dim);
    if (!dim) {
        Py_DECREF(dtype);
        return NULL;
    }
    PyObject *cuda = PyObject_GetAttr(a, s_is_cuda);
    if (!cuda) {
        Py_DECREF(dtype);
        Py_DECREF(dim);
        return NULL;
    }
    PyObject *k = PyTuple_Pack(4, (PyObject *)Py_TYPE(a), dtype, dim, cuda);
    Py_DECREF(dtype);
    Py_DECREF(dim);
    Py_DECREF(cuda);
    return k;
}

/* Include again the keys ``exclude_keys`` excluded; -1 on an error. */
static int include_keys(int done[2])
{
    PyObject *keys[2] = {g_python_key, g_snapshot_key};
    int ok = 0;
    for (int k = 1; k >= 0; k--) {
        if (!done[k])
            continue;
        PyObject *sargs[2] = {keys[k], Py_False};
        PyObject *r = PyObject_Vectorcall(g_set_excluded, sargs, 2, NULL);
        if (r) {
            Py_DECREF(r);
            done[k] = 0;
        } else {
            ok = -1;
        }
    }
    return ok;
}

/* Exclude the Python and PythonTLSSnapshot dispatch keys from this thread's dispatch, noting
 * in ``done`` which of them this call excluded (a key already excluded stays so).  -1 on an
 * error, with every key this call excluded included again. */
static int exclude_keys(int done[2])
{
    PyObject *keys[2] = {g_python_key, g_snapshot_key};
    for (int k = 0; k < 2; k++) {
        int was = truth(PyObject_CallOneArg(g_is_excluded, keys[k]));
        PyObject *r = NULL;
        if (was == 0) {
            PyObject *sargs[2] = {keys[k], Py_True};
            r = PyObject_Vectorcall(g_set_excluded, sargs, 2, NULL);
            if (r) {
                Py_DECREF(r);
                done[k] = 1;
                continue;
            }
        }
        if (was < 0 || (was == 0 && !r)) {
            PyObject *exc_type, *exc_value, *exc_tb;
            PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
            include_keys(done);
            PyErr_Restore(exc_type, exc_value, exc_tb);
            return -1;
        }
    }
    return 0;
}

/* make_batched(value, 0, level): the wrapper's sizes are the value's minus the first (a value
 * that is not contiguous, or a torch without positional wrapper arguments: the Python
 * constructor, which decides the strides). */
static PyObject *wrap0(PyObject *value, PyObject *level)
{
    PyObject *w = NULL;
    PyTypeObject *t = Py_TYPE(value);
    if (g_positional && (t == g_tensor || t == g_bt) && method_bool(value, s_is_contiguous) == 1) {
        PyObject *shape = PyObject_GetAttr(value, s_shape);
        PyObject *dtype = shape ? PyObject_GetAttr(value, s_dtype) : NULL;
        PyObject *device = dtype ? PyObject_GetAttr(value, s_device) : NULL;
        PyObject *sizes = device ? PySequence_GetSlice(shape, 1, PY_SSIZE_T_MAX) : NULL;
        if (sizes) {
            PyObject *margs[8] = {(PyObject *)g_bt, sizes, Py_None, Py_None, Py_None,
                                  dtype, g_strided, device};
            w = PyObject_Vectorcall(g_make_wrapper, margs, 8, NULL);
        }
        Py_XDECREF(shape);
        Py_XDECREF(dtype);
        Py_XDECREF(device);
        Py_XDECREF(sizes);
        if (w && (PyObject_SetAttr(w, s_value, value) < 0 ||
                  PyObject_SetAttr(w, s_bdim, g_zero) < 0 ||
                  PyObject_SetAttr(w, s_level, level) < 0))
            Py_CLEAR(w);
        return w;
    }
    PyObject *margs[3] = {value, g_zero, level};
    return PyObject_Vectorcall(g_make_batched, margs, 3, NULL);
}

/* The hit case.  Returns a new reference to the result, NULL with NO error set when the call
 * is not ours (the caller falls back), NULL with an error set on an error (the caller clears it
 * and falls back too: the Python path raises what eager raises), or HIT_RAISE when the error set
 * is to be raised as it is (a learned rule call's own error, or the Python dispatch keys could
 * not be included again). */
#define HIT_RAISE ((PyObject *)-1)

/* ``call(*vals)`` when no dispatch mode but vmap's own is pushed, run below it: with the Python
 * and PythonTLSSnapshot dispatch keys excluded, as ``_DisableTorchDispatch`` does for the
 * Python fast path (the values are plain tensors; no other Python dispatch is skipped, and the
 * snapshot key's boxed fallback is not paid).  NULL when another mode is pushed or the call
 * raised (the caller falls back), HIT_RAISE when the keys could not be included again. */
static PyObject *physical_call(PyObject *call, PyObject *const *vals, Py_ssize_t n)
{
    int excluded[2] = {0, 0}; /* Python, PythonTLSSnapshot: excluded here, to be restored */
    PyObject *len = PyObject_CallNoArgs(g_stack_len);
    if (!len)
        return NULL;
    long modes = PyLong_AsLong(len);
    Py_DECREF(len);
    if (modes < 0 || modes > 1)
        return NULL;
    if (modes == 1) {
        PyObject *top = PyObject_CallOneArg(g_stack_at, g_zero);
        if (!top)
            return NULL;
        int ours = Py_TYPE(top) == g_vmap_mode;
        Py_DECREF(top);
        if (!ours || exclude_keys(excluded) < 0)
            return NULL;
    }
    PyObject *out = PyObject_Vectorcall(call, vals, n, NULL);
    if (excluded[0] || excluded[1]) {
        PyObject *exc_type, *exc_value, *exc_tb;
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        if (include_keys(excluded) < 0) {
            Py_XDECREF(exc_type);
            Py_XDECREF(exc_value);
            Py_XDECREF(exc_tb);
            Py_XDECREF(out);
            return HIT_RAISE;
        }
        PyErr_Restore(exc_type, exc_value, exc_tb);
    }
    return out;
}

/* Whether a physical call may stand for the logical one: no autocast, no forward-AD level.
 * ``*grad``: grad mode (-1 on an error, with 0 returned). */
static int plain_state(int *grad)
{
    *grad = -1;
    if (call_bool(g_autocast))
        return 0;
    PyObject *fl = PyObject_GetAttr(g_fwad, s_current_level);
    if (!fl)
        return 0;
    long fwd = PyLong_AsLong(fl);
    Py_DECREF(fl);
    if (fwd != -1)
        return 0;
    *grad = call_bool(g_grad_enabled);
    return *grad >= 0;
}

static PyObject *try_hit(PyObject *func, PyObject *args)
{
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n == 0 || n > MAX_ARGS)
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(g_cache, func); /* borrowed, looked up again */
    if (!entry || !PyDict_CheckExact(entry))                   /* where it is used */
        return NULL;

    /* First the shape of the call, from the wrappers' slots alone: every batched argument
     * wrapped by the same levels (one, or nested vmaps), each along dim 0, over a plain tensor
     * (anything else: Python).  chain[0] is the highest level, the outermost wrapper's. */
    PyObject *vals[MAX_ARGS];
    PyObject *chain[MAX_DEPTH]; /* borrowed: the arguments hold them */
    int depth = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(args, i);
        vals[i] = a;
        if (Py_TYPE(a) != g_bt)
            continue;
        PyObject *cur = a;
        int d = 0;
        while (Py_TYPE(cur) == g_bt) {
            if (d == MAX_DEPTH)
                return NULL;
            PyObject *lv = PyObject_GetAttr(cur, s_level);
            if (!lv)
                return NULL;
            Py_DECREF(lv);
            if (depth == 0)
                chain[d] = lv;
            else if (d >= depth || chain[d] != lv)
                return NULL;
            PyObject *bd = PyObject_GetAttr(cur, s_bdim);
            if (!bd)
                return NULL;
            Py_DECREF(bd);
            if (bd != g_zero && !(PyLong_CheckExact(bd) && PyLong_AsLong(bd) == 0))
                return NULL;
            PyObject *v = PyObject_GetAttr(cur, s_value);
            if (!v)
                return NULL;
            Py_DECREF(v); /* the wrapper holds it */
            cur = v;
            d++;
        }
        if (depth == 0)
            depth = d;
        else if (d != depth)
            return NULL;
        if (Py_TYPE(cur) != g_tensor)
            return NULL;
        vals[i] = cur;
    }
    if (depth == 0)
        return NULL;
    int grad;
    if (!plain_state(&grad))
        return NULL;

    /* The Python fast path's signature: per argument its type, and for tensors (type, dtype,
     * rank, is_cuda); an argument autograd would record on is not ours. */
    PyObject *key = PyTuple_New(n);
    if (!key)
        return NULL;
    PyObject *result = NULL;
    PyObject *call = NULL; /* owned once found */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(args, i);
        PyTypeObject *t = Py_TYPE(a);
        if (t == g_bt || PyObject_TypeCheck(a, g_tensor)) {
            if (grad && attr_bool(a, s_requires_grad) != 0)
                goto done;
            if (grad && depth > 1 && t == g_bt) { /* the lower levels' wrappers too */
                PyObject *cur = a;
                for (int d = 1; d < depth; d++) {
                    PyObject *v = PyObject_GetAttr(cur, s_value);
                    if (!v)
                        goto done;
                    Py_DECREF(v);
                    cur = v;
                    if (attr_bool(cur, s_requires_grad) != 0)
                        goto done;
                }
            }
            if (vals[i] == a && method_bool(a, s_is_neg) != 0)
                goto done; /* a plain tensor with the neg bit */
            PyObject *k = tensor_key(a);
            if (!k)
                goto done;
            PyTuple_SET_ITEM(key, i, k);
        } else if (is_scalar_type(t)) {
            Py_INCREF(t);
            PyTuple_SET_ITEM(key, i, (PyObject *)t);
        } else {
            goto done;
        }
    }
    /* Another thread may clear the cache (a new rule) while this one runs torch calls: hold
     * the callable itself. */
    entry = PyDict_GetItemWithError(g_cache, func);
    if (!entry || !PyDict_CheckExact(entry))
        goto done;
    PyObject *hit = PyDict_GetItemWithError(entry, key); /* borrowed, used at once */
    if (!hit || !PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) < 3)
        goto done;
    int pointwise = PyTuple_GET_ITEM(hit, 1) == Py_True;
    /* the physical callable, or for a rule's signature the prepared op */
    call = PyTuple_GET_ITEM(hit, pointwise ? 2 : 0);
    Py_INCREF(call);
    for (int d = 0; d < depth; d++)
        if (attr_bool(chain[d], s_alive) != 1)
            goto done;
    if (!pointwise) {
        /* The learned call through the op's handler, in Python (``fastpath.run_rule``): the
         * signature found here is not looked up again. */
        PyObject *rargs[3] = {call, chain[0], args};
        PyObject *r = PyObject_Vectorcall(g_run_rule, rargs, 3, NULL);
        if (r == g_miss) {
            Py_DECREF(r);
            r = NULL;
        } else if (r) {
            g_hits++;
        } else { /* the rule's error (eager's, explained): raised as the Python path raises */
            Py_DECREF(call);
            Py_DECREF(key);
            return HIT_RAISE;
        }
        result = r;
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(args, i);
        if (vals[i] != a && method_bool(vals[i], s_is_neg) != 0)
            goto done;
    }

    PyObject *out = physical_call(call, vals, n);
    if (out == HIT_RAISE) {
        Py_DECREF(call);
        Py_DECREF(key);
        return HIT_RAISE;
    }
    if (!out)
        goto done;

    /* Wrap at dim 0, lowest level first. */
    PyObject *w = out; /* owned */
    for (int d = depth - 1; d >= 0 && w; d--) {
        PyObject *value = w;
        w = wrap0(value, chain[d]);
        Py_DECREF(value);
    }
    result = w;
    if (result)
        g_hits++;
done:
    Py_XDECREF(call);
    Py_DECREF(key);
    return result;
}

/* ``a @ b`` for a per-example ``a`` (one level, batched along dim 0 over a plain tensor) and a
 * plain matrix or vector ``b``: ``torch.matmul`` of the value and ``b`` broadcasts the batch
 * dim itself (``tfrules.matmul``'s case ``ba and rb <= 2``, the one a per-example vector times
 * a weight takes).  NULL (no error) for anything else: the Python rule decides. */
static PyObject *try_matmul(PyObject *args)
{
    if (PyTuple_GET_SIZE(args) != 2)
        return NULL;
    PyObject *a = PyTuple_GET_ITEM(args, 0), *b = PyTuple_GET_ITEM(args, 1);
    if (Py_TYPE(a) != g_bt || !(Py_TYPE(b) == g_tensor || Py_TYPE(b) == g_parameter))
        return NULL;
    PyObject *level = PyObject_GetAttr(a, s_level);
    if (!level)
        return NULL;
    Py_DECREF(level); /* the argument holds it */
    PyObject *v = PyObject_GetAttr(a, s_value);
    if (!v)
        return NULL;
    Py_DECREF(v); /* the wrapper holds it */
    PyObject *bd = PyObject_GetAttr(a, s_bdim);
    if (!bd)
        return NULL;
    Py_DECREF(bd);
    if (Py_TYPE(v) != g_tensor || !(bd == g_zero || (PyLong_CheckExact(bd) &&
                                                     PyLong_AsLong(bd) == 0)))
        return NULL;
    int grad;
    if (!plain_state(&grad) || (grad && (attr_bool(a, s_requires_grad) != 0 ||
                              attr_bool(b, s_requires_grad) != 0)))
        return NULL;
    if (attr_bool(level, s_alive) != 1)
        return NULL;
    PyObject *operands[2] = {v, b};
    for (int k = 0; k < 2; k++) {
        PyObject *layout = PyObject_GetAttr(operands[k], s_layout);
        if (!layout)
            return NULL;
        int strided = layout == g_strided;
        Py_DECREF(layout);
        if (!strided || method_bool(operands[k], s_is_complex) != 0 ||
            method_bool(operands[k], s_is_neg) != 0)
            return NULL;
    }
    PyObject *r = PyObject_CallMethodNoArgs(a, s_dim);
    long ra = r ? PyLong_AsLong(r) : -1;
    Py_XDECREF(r);
    r = PyObject_CallMethodNoArgs(b, s_dim);
    long rb = r ? PyLong_AsLong(r) : -1;
    Py_XDECREF(r);
    if (ra < 1 || rb < 1 || rb > 2)
        return NULL;
    PyObject *out = physical_call(g_matmul, operands, 2);
    if (out == HIT_RAISE)
        return HIT_RAISE;
    if (!out)
        return NULL; /* (the error is cleared by the caller; the Python path raises eager's) */
    PyObject *w = wrap0(out, level);
    Py_DECREF(out);
    if (w) {
        g_hits++;
        g_matmul_hits++;
    }
    return w;
}

static PyObject *tf_entry(PyObject *self, PyObject *const *argv, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    PyObject *cls, *func, *types, *args = NULL, *kwargs = NULL;
    int is_matmul = 0;
    if (kwnames && PyTuple_GET_SIZE(kwnames)) {
        /* torch passes everything positionally; anything else is not ours */
        PyObject *d = PyDict_New();
        if (!d)
            return NULL;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++)
            if (PyDict_SetItem(d, PyTuple_GET_ITEM(kwnames, i), argv[nargs + i]) < 0) {
                Py_DECREF(d);
                return NULL;
            }
        PyObject *r = NULL;
        PyObject *full = PyTuple_New(nargs);
        if (full) {
            for (Py_ssize_t i = 0; i < nargs; i++) {
                Py_INCREF(argv[i]);
                PyTuple_SET_ITEM(full, i, argv[i]);
            }
            r = PyObject_Call(g_fallback, full, d);
            Py_DECREF(full);
        }
        Py_DECREF(d);
        return r;
    }
    if (nargs < 3 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "__torch_function__ takes (cls, func, types, args, kwargs)");
        return NULL;
    }
    cls = argv[0];
    func = argv[1];
    types = argv[2];
    if (nargs > 3)
        args = argv[3];
    if (nargs > 4 && argv[4] != Py_None)
        kwargs = argv[4];
    if (!g_enabled || !args || !PyTuple_CheckExact(args))
        goto slow;
    if (kwargs && (!PyDict_Check(kwargs) || PyDict_GET_SIZE(kwargs)))
        goto slow;
    {
        PyObject *d = PyList_GET_ITEM(g_autodiff_depth, 0);
        if (d != NULL && PyObject_IsTrue(d) != 0)
            goto slow_clear; /* (a grad level is open: autograd records; or an error) */
        int c = PyDict_Contains(g_overrides, func);
        if (c != 0)
            goto slow_clear;
        is_matmul = PySequence_Contains(g_matmuls, func);
        if (is_matmul < 0)
            goto slow_clear;
        if (!is_matmul) {
            c = PyDict_Contains(g_tf_rules, func);
            if (c != 0)
                goto slow_clear;
        }
    }
    {
        /* Subclass __torch_function__ off while reading the arguments' metadata, as in the
         * Python fast path. */
        PyObject *guard = PyObject_CallNoArgs(g_disable_tf);
        if (!guard)
            goto slow_clear;
        PyObject *r = PyObject_CallMethodNoArgs(guard, s_enter);
        if (!r) {
            Py_DECREF(guard);
            goto slow_clear;
        }
        Py_DECREF(r);
        PyObject *out = is_matmul ? try_matmul(args) : try_hit(func, args);
        PyObject *exc_type, *exc_value, *exc_tb;
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        r = PyObject_CallMethodObjArgs(guard, s_exit, Py_None, Py_None, Py_None, NULL);
        Py_DECREF(guard);
        if (out == HIT_RAISE) { /* an error to raise as it is */
            Py_XDECREF(r);
            PyErr_Restore(exc_type, exc_value, exc_tb);
            return NULL;
        }
        Py_XDECREF(exc_type); /* any other error: the Python path decides and raises */
        Py_XDECREF(exc_value);
        Py_XDECREF(exc_tb);
        if (!r) { /* the torch-function state could not be restored: raise that */
            Py_XDECREF(out);
            return NULL;
        }
        Py_DECREF(r);
        if (out)
            return out;
        goto slow;
    }
slow_clear:
    PyErr_Clear();
slow:
    return fallback(cls, func, types, args ? args : Py_None, kwargs);
}

static PyObject *init(PyObject *self, PyObject *cfg)
{
    if (!PyDict_Check(cfg)) {
        PyErr_SetString(PyExc_TypeError, "init takes a dict");
        return NULL;
    }
#define TAKE(var, name)                                                                        \
    do {                                                                                       \
        PyObject *o = PyDict_GetItemString(cfg, name);                                         \
        if (!o) {                                                                              \
            PyErr_Format(PyExc_KeyError, "ftrans._fastc.init: missing %s", name);              \
            return NULL;                                                                       \
        }                                                                                      \
        Py_INCREF(o);                                                                          \
        Py_XSETREF(var, o);                                                                    \
    } while (0)
    TAKE(g_fallback, "fallback");
    TAKE(g_cache, "cache");
    TAKE(g_overrides, "overrides");
    TAKE(g_tf_rules, "tf_rules");
    TAKE(g_autodiff_depth, "autodiff_depth");
    TAKE(g_fwad, "fwad");
    TAKE(g_autocast, "autocast");
    TAKE(g_grad_enabled, "grad_enabled");
    TAKE(g_stack_len, "stack_len");
    TAKE(g_stack_at, "stack_at");
    TAKE(g_is_excluded, "is_excluded");
    TAKE(g_set_excluded, "set_excluded");
    TAKE(g_python_key, "python_key");
    TAKE(g_snapshot_key, "snapshot_key");
    TAKE(g_run_rule, "run_rule");
    TAKE(g_matmul, "matmul");
    TAKE(g_matmuls, "matmuls");
    TAKE(g_miss, "miss");
    TAKE(g_disable_tf, "disable_tf");
    TAKE(g_make_wrapper, "make_wrapper");
    TAKE(g_strided, "strided");
    TAKE(g_make_batched, "make_batched");
    PyObject *bt = NULL, *tensor = NULL, *vm = NULL, *param = NULL;
    TAKE(param, "parameter");
    TAKE(bt, "batched_tensor");
    TAKE(tensor, "tensor");
    TAKE(vm, "vmap_mode");
#undef TAKE
    if (!PyType_Check(bt) || !PyType_Check(tensor) || !PyType_Check(vm) || !PyType_Check(param) ||
        !PyDict_Check(g_cache) || !PyDict_Check(g_overrides) || !PyDict_Check(g_tf_rules) ||
        !PyList_Check(g_autodiff_depth) || PyList_GET_SIZE(g_autodiff_depth) < 1) {
        PyErr_SetString(PyExc_TypeError, "ftrans._fastc.init: bad configuration");
        return NULL;
    }
    Py_XSETREF(g_bt, (PyTypeObject *)bt);
    Py_XSETREF(g_tensor, (PyTypeObject *)tensor);
    Py_XSETREF(g_vmap_mode, (PyTypeObject *)vm);
    Py_XSETREF(g_parameter, (PyTypeObject *)param);
    PyObject *en = PyDict_GetItemString(cfg, "enabled");
    PyObject *pos = PyDict_GetItemString(cfg, "positional");
    g_enabled = en ? PyObject_IsTrue(en) : 0;
    g_positional = pos ? PyObject_IsTrue(pos) : 0;
    Py_RETURN_NONE;
}

static PyObject *hits(PyObject *self, PyObject *noargs)
{
    return PyLong_FromLong(g_hits);
}

static PyObject *matmul_hits(PyObject *self, PyObject *noargs)
{
    return PyLong_FromLong(g_matmul_hits);
}

static PyMethodDef methods[] = {
    {"tf_entry", (PyCFunction)(void (*)(void))tf_entry, METH_FASTCALL | METH_KEYWORDS,
     "BatchedTensor.__torch_function__ with the fast path's hit case in C."},
    {"init", init, METH_O, "Hand over the Python objects the entry uses."},
    {"hits", hits, METH_NOARGS, "How many calls the C entry served itself."},
    {"matmul_hits", matmul_hits, METH_NOARGS, "How many of them were matmuls."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastc", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastc(void)
{
#define STR(var, text)                                                                         \
    if (!(var = PyUnicode_InternFromString(text)))                                             \
        return NULL;
    STR(s_value, "value");
    STR(s_bdim, "bdim");
    STR(s_level, "level");
    STR(s_id, "id");
    STR(s_alive, "alive");
    STR(s_requires_grad, "requires_grad");
    STR(s_dtype, "dtype");
    STR(s_dim, "dim");
    STR(s_is_cuda, "is_cuda");
    STR(s_is_neg, "is_neg");
    STR(s_shape, "shape");
    STR(s_is_contiguous, "is_contiguous");
    STR(s_device, "device");
    STR(s_current_level, "_current_level");
    STR(s_enter, "__enter__");
    STR(s_exit, "__exit__");
    STR(s_layout, "layout");
    STR(s_is_complex, "is_complex");
#undef STR
    if (!(g_zero = PyLong_FromLong(0)))
        return NULL;
    return PyModule_Create(&module);
}
