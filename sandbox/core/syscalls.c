/* sandbox.core._syscalls: the Linux calls Python's standard library lacks, for the launcher's
 * run path (sandbox/core/linux.py says which, and falls back to _ctypes without this module).
 *
 * Built by scripts/native-module where a C compiler and Python's headers exist; optional.
 * Two reasons it exists: importing _ctypes (with libffi) cost ~0.5 ms of every start, and
 * spawn() starts the command the way posix_spawn(3) does, a clone sharing the launcher's memory
 * (CLONE_VM | CLONE_VFORK) that execs at once, so the kernel copies none of the launcher's page
 * tables and the child takes no copy-on-write faults: ~0.9 ms less than a fork of the launcher
 * (sandbox/run/spawn.py). glibc's posix_spawn cannot place the child in a cgroup before 2.39
 * (Debian 12 has 2.36), so the clone3 call (Linux 5.3; CLONE_INTO_CGROUP 5.7) is ours: a few
 * lines of x86-64 assembly run the child on its own stack, as glibc's clone(2) wrapper does.
 * Other architectures get the other calls and no spawn().
 *
 * The child runs in the launcher's memory with the launcher suspended: it only makes system
 * calls (no allocation, no lock, no Python) on data the parent prepared, then execs or _exits.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <unistd.h>

static PyObject *py_prctl(PyObject *self, PyObject *args) {
    int option;
    unsigned long value;
    if (!PyArg_ParseTuple(args, "ik", &option, &value)) return NULL;
    int result = prctl(option, value, 0UL, 0UL, 0UL);
    if (result < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(result);
}

/* signalfd(-1, mask, flags): `mask` as the kernel's sigset bytes (linux.signalfd builds it). */
static PyObject *py_signalfd(PyObject *self, PyObject *args) {
    Py_buffer mask;
    int flags;
    if (!PyArg_ParseTuple(args, "y*i", &mask, &flags)) return NULL;
    sigset_t set;
    memset(&set, 0, sizeof set);
    memcpy(&set, mask.buf, (size_t)mask.len < sizeof set ? (size_t)mask.len : sizeof set);
    PyBuffer_Release(&mask);
    int fd = signalfd(-1, &set, flags);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

static PyObject *py_inotify_init1(PyObject *self, PyObject *args) {
    int flags;
    if (!PyArg_ParseTuple(args, "i", &flags)) return NULL;
    int fd = inotify_init1(flags);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

static PyObject *py_inotify_add_watch(PyObject *self, PyObject *args) {
    int fd;
    const char *path;
    unsigned int mask;
    if (!PyArg_ParseTuple(args, "iyI", &fd, &path, &mask)) return NULL;
    int wd = inotify_add_watch(fd, path, mask);
    if (wd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(wd);
}

#if defined(__x86_64__)
#define HAVE_SPAWN 1

/* struct clone_args of Linux 5.7 (linux/sched.h), which older headers lack. */
struct clone_args_v2 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};
#define CLONE_INTO_CGROUP_FLAG 0x200000000ULL
#define CHILD_STACK (256 * 1024) /* execvpe builds each candidate path on it */

/* What the child does, all prepared by the parent. */
struct plan {
    char *path;        /* the program found on PATH before the clone, or NULL */
    char *search;      /* PATH (or the default path) for the search if that exec fails */
    char **argv;
    char **envp;       /* NULL: the launcher's environ */
    int *join_fds;     /* written "0" each: a v1 cgroup's tasks, a v2 cgroup.procs */
    char **join_names; /* for the error line */
    Py_ssize_t joins;
    int *limits;       /* setrlimit resources */
    rlim_t *limit_values;
    Py_ssize_t nlimits;
    int nice, set_nice;
    int keep_pipe, keep_xfsz; /* the caller had SIGPIPE / SIGXFSZ ignored: they stay so */
    sigset_t mask;            /* the command's signal mask */
    int report_fd;            /* close-on-exec pipe: "setup:ERRNO:WHAT" or "exec:ERRNO:" */
    pid_t launcher;
};

static void put_number(char **at, int value) {
    char digits[12];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value > 0 && n < 11);
    while (n > 0) *(*at)++ = digits[--n];
}

static void put_text(char **at, const char *text, const char *end) {
    while (*text && *at < end) *(*at)++ = *text++;
}

__attribute__((noreturn)) static void fail(struct plan *plan, const char *kind, int err,
                                           const char *what) {
    char line[512];
    char *at = line, *end = line + sizeof line;
    put_text(&at, kind, end);
    put_text(&at, ":", end);
    if (end - at > 12) put_number(&at, err);
    put_text(&at, ":", end);
    if (what) put_text(&at, what, end);
    ssize_t ignored = write(plan->report_fd, line, (size_t)(at - line));
    (void)ignored;
    _exit(kind[0] == 's' ? 125 : 127);
}

/* Not found on PATH before the clone, or gone since: the search of spawn.py's _execvp, for the
 * same errno (EACCES somewhere beats ENOENT, as execvp(3)), without execvp's running of a
 * file that has no #! line with /bin/sh (an ENOEXEC here, as in the forking spawn). */
static int search(const char *name, const char *path, char **argv, char **envp) {
    if (name[0] == '\0') return ENOENT;
    if (strchr(name, '/')) {
        execve(name, argv, envp);
        return errno;
    }
    int first = 0, last = ENOENT;
    size_t length = strlen(name);
    for (const char *at = path;; at++) {
        const char *end = strchrnul(at, ':');
        char candidate[4096];
        size_t directory = (size_t)(end - at);
        if (directory == 0) { /* an empty entry is the working directory */
            at = ".";
            directory = 1;
        }
        if (directory + 1 + length + 1 > sizeof candidate) {
            last = ENAMETOOLONG;
        } else {
            memcpy(candidate, at, directory);
            candidate[directory] = '/';
            memcpy(candidate + directory + 1, name, length + 1);
            execve(candidate, argv, envp);
            last = errno;
        }
        if (last != ENOENT && last != ENOTDIR && first == 0) first = last;
        if (*end == '\0') break;
        at = end;
    }
    return first ? first : last;
}

static int child(void *arg) {
    struct plan *plan = arg;
    prctl(PR_SET_PDEATHSIG, (unsigned long)SIGKILL, 0UL, 0UL, 0UL);
    if (getppid() != plan->launcher) _exit(125);
    for (Py_ssize_t i = 0; i < plan->joins; i++) {
        if (write(plan->join_fds[i], "0", 1) != 1) fail(plan, "setup", errno, plan->join_names[i]);
    }
    if (plan->set_nice && setpriority(PRIO_PROCESS, 0, plan->nice) < 0)
        fail(plan, "setup", errno, "setpriority");
    for (Py_ssize_t i = 0; i < plan->nlimits; i++) {
        struct rlimit value = {plan->limit_values[i], plan->limit_values[i]};
        if (setrlimit(plan->limits[i], &value) < 0) fail(plan, "setup", errno, "setrlimit");
    }
    /* Every signal the launcher catches back to its default before any is unblocked: a
     * handler of the launcher's must never run here, in its memory. exec would reset them too.
     * SIGPIPE and SIGXFSZ, which Python ignores, as the caller had them. */
    for (int signo = 1; signo < NSIG; signo++) {
        struct sigaction now;
        if (signo == SIGKILL || signo == SIGSTOP || sigaction(signo, NULL, &now) < 0) continue;
        int want_ignored = (signo == SIGPIPE && plan->keep_pipe) ||
                           (signo == SIGXFSZ && plan->keep_xfsz);
        if (signo == SIGPIPE || signo == SIGXFSZ || now.sa_handler != SIG_IGN) {
            if (now.sa_handler == SIG_DFL && !want_ignored) continue;
            struct sigaction set;
            memset(&set, 0, sizeof set);
            set.sa_handler = want_ignored ? SIG_IGN : SIG_DFL;
            sigaction(signo, &set, NULL);
        }
    }
    sigprocmask(SIG_SETMASK, &plan->mask, NULL);
    char **envp = plan->envp ? plan->envp : environ;
    if (plan->path) execve(plan->path, plan->argv, envp);
    fail(plan, "exec", search(plan->argv[0], plan->search, plan->argv, envp), NULL);
}

/* clone3 with the child running fn(arg) on `stack` (its top 16-byte aligned). */
static long clone3_call(struct clone_args_v2 *args, int (*fn)(void *), void *arg) {
    long result;
    register long function __asm__("r12") = (long)fn;
    register long argument __asm__("r13") = (long)arg;
    __asm__ volatile(
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        /* the child, on its own stack: fn(arg), then exit with what it returned */
        "xor %%ebp, %%ebp\n\t"
        "mov %%r13, %%rdi\n\t"
        "call *%%r12\n\t"
        "mov %%eax, %%edi\n\t"
        "mov $60, %%eax\n\t" /* SYS_exit */
        "syscall\n\t"
        "hlt\n\t"
        "1:\n\t"
        : "=a"(result)
        : "0"((long)SYS_clone3), "D"(args), "S"(sizeof *args), "r"(function), "r"(argument)
        : "rcx", "r11", "memory");
    return result;
}

static int fill_strings(PyObject *list, char ***out) {
    Py_ssize_t n = PyList_GET_SIZE(list);
    *out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (*out == NULL) return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "bytes expected");
            return -1;
        }
        (*out)[i] = PyBytes_AS_STRING(item);
    }
    return 0;
}

/* spawn(path, search, argv, envp, cgroup_fd, joins, limits, nice, keep_pipe, keep_xfsz, mask,
 *       report_fd) -> pid
 * path: bytes or None; search: PATH as bytes; argv: list of bytes; envp: list of bytes or None (environ);
 * cgroup_fd: a v2 cgroup directory the child is born in, or -1; joins: list of (fd, bytes)
 * written "0" in the child; limits: list of (resource, value); nice: int or None;
 * mask: the command's signal mask as sigset bytes. OSError when the clone itself fails
 * (nothing started); the child's own failures arrive on report_fd. */
static PyObject *py_spawn(PyObject *self, PyObject *args) {
    PyObject *path, *argv, *envp, *joins, *limits, *nice;
    const char *search;
    int cgroup_fd, keep_pipe, keep_xfsz, report_fd;
    Py_buffer mask;
    if (!PyArg_ParseTuple(args, "OyO!OiO!O!Oppy*i", &path, &search, &PyList_Type, &argv, &envp,
                          &cgroup_fd, &PyList_Type, &joins, &PyList_Type, &limits, &nice,
                          &keep_pipe, &keep_xfsz, &mask, &report_fd))
        return NULL;
    struct plan plan;
    memset(&plan, 0, sizeof plan);
    plan.search = (char *)search;
    PyObject *result = NULL;
    char *stack = NULL;
    if (path != Py_None && !PyBytes_Check(path)) {
        PyErr_SetString(PyExc_TypeError, "path: bytes or None");
        goto done;
    }
    plan.path = path == Py_None ? NULL : PyBytes_AS_STRING(path);
    if (PyList_GET_SIZE(argv) < 1) {
        PyErr_SetString(PyExc_ValueError, "argv is empty");
        goto done;
    }
    if (fill_strings(argv, &plan.argv) < 0) goto done;
    if (envp != Py_None) {
        if (!PyList_Check(envp)) {
            PyErr_SetString(PyExc_TypeError, "envp: list or None");
            goto done;
        }
        if (fill_strings(envp, &plan.envp) < 0) goto done;
    }
    plan.joins = PyList_GET_SIZE(joins);
    plan.join_fds = PyMem_Calloc((size_t)plan.joins + 1, sizeof(int));
    plan.join_names = PyMem_Calloc((size_t)plan.joins + 1, sizeof(char *));
    if (plan.join_fds == NULL || plan.join_names == NULL) goto nomemory;
    for (Py_ssize_t i = 0; i < plan.joins; i++) {
        if (!PyArg_ParseTuple(PyList_GET_ITEM(joins, i), "iy", &plan.join_fds[i],
                              &plan.join_names[i]))
            goto done;
    }
    plan.nlimits = PyList_GET_SIZE(limits);
    plan.limits = PyMem_Calloc((size_t)plan.nlimits + 1, sizeof(int));
    plan.limit_values = PyMem_Calloc((size_t)plan.nlimits + 1, sizeof(rlim_t));
    if (plan.limits == NULL || plan.limit_values == NULL) goto nomemory;
    for (Py_ssize_t i = 0; i < plan.nlimits; i++) {
        unsigned long long value;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(limits, i), "iK", &plan.limits[i], &value))
            goto done;
        plan.limit_values[i] = (rlim_t)value;
    }
    if (nice != Py_None) {
        plan.nice = (int)PyLong_AsLong(nice);
        if (plan.nice == -1 && PyErr_Occurred()) goto done;
        plan.set_nice = 1;
    }
    plan.keep_pipe = keep_pipe;
    plan.keep_xfsz = keep_xfsz;
    memcpy(&plan.mask, mask.buf,
           (size_t)mask.len < sizeof plan.mask ? (size_t)mask.len : sizeof plan.mask);
    plan.report_fd = report_fd;
    plan.launcher = getpid();
    stack = PyMem_Malloc(CHILD_STACK);
    if (stack == NULL) goto nomemory;
    struct clone_args_v2 clone;
    memset(&clone, 0, sizeof clone);
    clone.flags = CLONE_VM | CLONE_VFORK | (cgroup_fd >= 0 ? CLONE_INTO_CGROUP_FLAG : 0);
    clone.exit_signal = SIGCHLD;
    clone.stack = (uint64_t)(uintptr_t)stack;
    clone.stack_size = CHILD_STACK; /* the kernel starts the child at stack + stack_size */
    if (cgroup_fd >= 0) clone.cgroup = (uint64_t)cgroup_fd;
    /* Every signal blocked across the clone: the child starts with none deliverable, and sets
     * the command's mask itself once no handler of ours is left (see child()). */
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &before);
    long pid = clone3_call(&clone, child, &plan); /* returns once the child exec'd or exited */
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    if (pid < 0) {
        errno = (int)-pid;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = PyLong_FromLong(pid);
    goto done;
nomemory:
    PyErr_NoMemory();
done:
    PyBuffer_Release(&mask);
    PyMem_Free(stack);
    PyMem_Free(plan.argv);
    PyMem_Free(plan.envp);
    PyMem_Free(plan.join_fds);
    PyMem_Free(plan.join_names);
    PyMem_Free(plan.limits);
    PyMem_Free(plan.limit_values);
    return result;
}
#endif

static PyMethodDef methods[] = {
    {"prctl", py_prctl, METH_VARARGS, "prctl(option, value) -> int"},
    {"signalfd", py_signalfd, METH_VARARGS, "signalfd(mask, flags) -> fd"},
    {"inotify_init1", py_inotify_init1, METH_VARARGS, "inotify_init1(flags) -> fd"},
    {"inotify_add_watch", py_inotify_add_watch, METH_VARARGS,
     "inotify_add_watch(fd, path, mask) -> wd"},
#ifdef HAVE_SPAWN
    {"spawn", py_spawn, METH_VARARGS, "see syscalls.c"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_syscalls", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__syscalls(void) { return PyModule_Create(&module); }
