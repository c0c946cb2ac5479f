"""Start a campaign in a subprocess and SIGKILL it once it has written two parts."""

import os
import signal
import subprocess
import time


def kill_after_two_parts(args, parts, env=None) -> int:
    """Run `args`, kill it with SIGKILL after its second part file appears in `parts`, and
    return how many part files it left."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the campaign finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(list(parts.glob("part-*.parquet")))
