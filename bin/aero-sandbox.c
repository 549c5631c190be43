/* aero-sandbox's native entry: keeps a caller's ignored SIGPIPE and SIGXFSZ for the command.
 *
 * CPython sets SIGPIPE and SIGXFSZ to SIG_IGN during its own start-up, before any Python code
 * runs, so the launcher cannot tell whether its caller had them ignored (`trap '' PIPE`, nohup
 * wrappers, a Python parent without restore_signals). This reads the dispositions it inherited,
 * names the ignored ones in AERO_SANDBOX_CALLER_IGNORES (the launcher's child removes it before
 * the exec; the worst a forged value can do is leave a command with SIGPIPE ignored) and execs
 * the venv's Python with -S on the Python entry script (bin/aero-sandbox says why -S).
 *
 * Started as "aero-sandbox-guardian" (argv[0]), it is the launcher's guardian instead: the
 * launcher spawns it (posix_spawn, no fork of its own large process: sandbox/run/guardian.py says
 * why) with the read end of a pipe as stdin, and writes into the pipe what to clean up, then `d`
 * once it cleaned up itself. The guardian sleeps until the launcher exits (the kernel closes the
 * write end however it exits, SIGKILL included); without the `d`, it execs the Python entry with
 * what it read in AERO_SANDBOX_GUARDIAN_NOTES, which cleans up.
 *
 * It lives in bin/ beside the script it fronts: it is the entry layer, built by scripts/install
 * (scripts/native-entry), not part of the `sandbox` package (whose one C file,
 * sandbox/core/syscalls.c, is an optional module of system calls).
 * Built with PYTHON, SCRIPT and ENTRY (its own path) defined as C strings. Any POSIX libc; no
 * kernel requirement.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if !defined(PYTHON) || !defined(SCRIPT) || !defined(ENTRY)
#error "build with -DPYTHON='\"/venv/bin/python\"' -DSCRIPT='\"/venv/bin/aero-sandbox.py\"' -DENTRY='\"/venv/bin/aero-sandbox\"'"
#endif

#define VARIABLE "AERO_SANDBOX_CALLER_IGNORES"
#define NATIVE "AERO_SANDBOX_NATIVE_ENTRY" /* where the launcher finds us to spawn a guardian */
#define GUARDIAN "aero-sandbox-guardian"
#define NOTES "AERO_SANDBOX_GUARDIAN_NOTES"
#define NOTES_MAX (64 * 1024) /* a pipe's capacity: the launcher's writes never wait on us */

/* The guardian: stdin is the pipe. Polling for no event still returns on POLLHUP (every write
 * end closed), and the launcher's writes do not wake us. */
static int guardian(void) {
    static char notes[NOTES_MAX + 1];
    struct pollfd hangup = {.fd = 0, .events = 0, .revents = 0};
    while (poll(&hangup, 1, -1) < 0 && errno == EINTR) {
    }
    size_t used = 0;
    ssize_t got;
    while (used < NOTES_MAX && ((got = read(0, notes + used, NOTES_MAX - used)) > 0 ||
                                (got < 0 && errno == EINTR))) {
        used += got > 0 ? (size_t)got : 0;
    }
    notes[used] = '\0';
    size_t length = strlen(notes); /* the notes end with a NUL, then `d` if it cleaned up */
    if (length == used) {
        return 0; /* no end of notes: the launcher made nothing under us */
    }
    if (used == length + 2 && notes[length + 1] == 'd') {
        return 0;
    }
    if (setenv(NOTES, notes, 1)) {
        return 1;
    }
    char *args[] = {PYTHON, "-S", SCRIPT, NULL};
    execv(PYTHON, args);
    return 1;
}

static int ignored(int signo) {
    struct sigaction now;
    return sigaction(signo, NULL, &now) == 0 && now.sa_handler == SIG_IGN;
}

int main(int argc, char **argv) {
    const char *name = argc > 0 ? strrchr(argv[0], '/') : NULL;
    if (argc > 0 && strcmp(name ? name + 1 : argv[0], GUARDIAN) == 0) {
        return guardian();
    }
    const char *value = ignored(SIGPIPE) ? (ignored(SIGXFSZ) ? "PIPE,XFSZ" : "PIPE")
                                         : (ignored(SIGXFSZ) ? "XFSZ" : NULL);
    /* Set or removed: a value inherited from an outer launcher's caller must not carry over. */
    if (value ? setenv(VARIABLE, value, 1) : unsetenv(VARIABLE)) {
        perror("aero-sandbox: " VARIABLE);
        return 125;
    }
    if (setenv(NATIVE, ENTRY, 1)) {
        perror("aero-sandbox: " NATIVE);
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
