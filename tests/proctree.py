"""Stop a server and every process it started (BentoML's workers leave its group)."""

import psutil


def kill_tree(pid: int, sig_timeout: float = 20.0) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [*parent.children(recursive=True), parent]  # enumerate before anything dies
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=sig_timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
