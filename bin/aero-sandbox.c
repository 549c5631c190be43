/* aero-sandbox's native entry: keeps a caller's ignored SIGPIPE and SIGXFSZ for the command.
 *
 * CPython sets SIGPIPE and SIGXFSZ to SIG_IGN during its own start-up, before any Python code
 * runs, so the launcher cannot tell whether its caller had them ignored (`trap '' PIPE`, nohup
 * wrappers, a Python parent without restore_signals). This reads the dispositions it inherited,
 * names the ignored ones in AERO_SANDBOX_CALLER_IGNORES (the launcher's child removes it before
 * the exec; the worst a forged value can do is leave a command with SIGPIPE ignored) and execs
 * the venv's Python with -S on the Python entry script (bin/aero-sandbox says why -S).
 *
 * It lives in bin/ beside the script it fronts: it is the entry layer, built by scripts/install
 * (scripts/native-entry), not part of the `sandbox` package, which stays pure Python.
 * Built with PYTHON and SCRIPT defined as C strings. Any POSIX libc; no kernel requirement.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if !defined(PYTHON) || !defined(SCRIPT)
#error "build with -DPYTHON='\"/venv/bin/python\"' -DSCRIPT='\"/venv/bin/aero-sandbox.py\"'"
#endif

#define VARIABLE "AERO_SANDBOX_CALLER_IGNORES"

static int ignored(int signo) {
    struct sigaction now;
    return sigaction(signo, NULL, &now) == 0 && now.sa_handler == SIG_IGN;
}

int main(int argc, char **argv) {
    const char *value = ignored(SIGPIPE) ? (ignored(SIGXFSZ) ? "PIPE,XFSZ" : "PIPE")
                                         : (ignored(SIGXFSZ) ? "XFSZ" : NULL);
    /* Set or removed: a value inherited from an outer launcher's caller must not carry over. */
    if (value ? setenv(VARIABLE, value, 1) : unsetenv(VARIABLE)) {
        perror("aero-sandbox: " VARIABLE);
        return 125;
    }
    char **args = malloc(((size_t)argc + 3) * sizeof *args);
    if (args == NULL) {
        perror("aero-sandbox");
        return 125;
    }
    args[0] = PYTHON;
    args[1] = "-S";
    args[2] = SCRIPT;
    memcpy(args + 3, argv + 1, (size_t)argc * sizeof *args); /* argv[1..argc], NULL included */
    execv(PYTHON, args);
    fprintf(stderr, "aero-sandbox: cannot run %s: %s (run scripts/install again)\n", PYTHON,
            strerror(errno));
    return 125;
}
