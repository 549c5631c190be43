"""Small programs the host and VM tests run inside sandboxes (python -c CODE)."""

ALLOCATE = "b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); print('allocated')"

FORK_BOMB = """
import os, sys, time
children = []
try:
    for _ in range(10000):
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
except OSError as err:
    print(len(children), err.errno)
    sys.exit(1)
print(len(children), 0)
"""

# A tree whose every process ignores SIGTERM; it writes its pids to argv[1].
STUBBORN_TREE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pids = [os.getpid()]
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    pids.append(pid)
open(sys.argv[1] + ".tmp", "w").write(" ".join(map(str, pids)))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""

DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(120)
    os._exit(0)
time.sleep(0.5)
"""

# Exits 40 + N on signal N; prints "ready" once its handlers are in place.
FORWARD = """
import signal, sys, time
def handler(signo, frame):
    print("got", signo, flush=True)
    sys.exit(40 + signo)
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, handler)
print("ready", flush=True)
time.sleep(60)
"""
