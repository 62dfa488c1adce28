/* qdistill._qdcall: the per-call entry of a prepared packed Linear (issue #15 item 4).
 *
 * A packed layer's fixed arguments live in a C struct made once per layer (kernels.A8Plan /
 * WOPlan); a call passes the struct's address, the input and output pointers, the row count
 * and the dispatch level to qd_a8_run / qd_wo_run (csrc/qkernels.c). Through ctypes that call
 * costs ~1.5 us of argument conversion, more than the C work of a 384x384 layer at one row;
 * this module's run() is a METH_FASTCALL function that reads the six integers directly
 * (~0.1 us). It knows nothing of torch or of the kernels: Python hands it the entry's address
 * (from ctypes, kernels._call_entry), so it links against neither and stays optional (without
 * Python headers at build time, kernels.py makes the same call through ctypes).
 *
 * run(fn, plan, x, y, rows, level) -> int: calls
 *     int64_t fn(const void *plan, const float *x, float *y, int64_t rows, int level)
 * with the GIL released (as ctypes does), and returns its status.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int64_t (*qd_plan_entry)(const void *plan, const float *x, float *y, int64_t rows,
                                 int level);

static PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "run(fn, plan, x, y, rows, level): 6 arguments, got %zd",
                     nargs);
        return NULL;
    }
    qd_plan_entry fn = (qd_plan_entry)PyLong_AsVoidPtr(args[0]);
    void *plan = PyLong_AsVoidPtr(args[1]);
    void *x = PyLong_AsVoidPtr(args[2]);
    void *y = PyLong_AsVoidPtr(args[3]);
    long long rows = PyLong_AsLongLong(args[4]);
    long level = PyLong_AsLong(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (!fn || !plan || !x || !y) {
        PyErr_SetString(PyExc_ValueError, "run(): a NULL function, plan or data pointer");
        return NULL;
    }
    int64_t status;
    Py_BEGIN_ALLOW_THREADS
    status = fn(plan, (const float *)x, (float *)y, (int64_t)rows, (int)level);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)status);
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL,
     "run(fn, plan, x, y, rows, level): call the plan entry at address fn (GIL released)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "qdistill._qdcall",
    "The per-call entry of prepared packed layers (see csrc/qdcall.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__qdcall(void) { return PyModule_Create(&module); }
