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

# Exits 40 + N on signal N; prints "ready" once it is ready for them. It blocks them and waits
# with sigtimedwait: a Python handler runs between bytecodes, so a signal landing just before a
# time.sleep() began would wait for the sleep to end (a lost forward, as a test sees it).
FORWARD = """
import signal, sys
wanted = {signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
print("ready", flush=True)
info = signal.sigtimedwait(wanted, 60)
if info is None:
    sys.exit(1)
print("got", info.si_signo, flush=True)
sys.exit(40 + info.si_signo)
"""

# A command that makes orphans which exit at once (they are reparented to the nearest subreaper
# or to PID 1 and stay zombies unless it reaps them), then counts the zombies of its parent.
ORPHANS = """
import os, sys, time
for _ in range(5):
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(0.05)
            os._exit(0)
        os._exit(0)
    os.wait()
parent = os.getppid()
time.sleep(0.3)  # the orphans exit 0.05 s after being reparented
deadline = time.monotonic() + 5
while True:
    zombies = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            zombies.append(pid)
    if not zombies or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print("parent", parent, "zombies", len(zombies))
sys.exit(7)
"""

# Three children that each grow to 300 MB in 25 MB steps, 0.1 s apart; argv[1]: a directory
# for the markers steps<N> (the last step reached) and finished<N>.
GROWING_CHILDREN = """
import os, sys, time
out = sys.argv[1]
for n in range(3):
    if os.fork() == 0:
        chunks = []
        for step in range(1, 13):
            chunk = bytearray(25 << 20)
            chunk[::4096] = b"x" * len(chunk[::4096])
            chunks.append(chunk)
            # Published by rename: a kill between open() and write() would leave an empty file.
            open(f"{out}/.steps{n}", "w").write(str(step))
            os.rename(f"{out}/.steps{n}", f"{out}/steps{n}")
            time.sleep(0.1)
        open(f"{out}/finished{n}", "w").close()
        os._exit(0)
for n in range(3):
    os.wait()
"""
