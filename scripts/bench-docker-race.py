#!/usr/bin/env python3
"""Measure the bind-source race of regobox's Docker socket: a job's bind source swapped for a
symbolic link while regobox forwards the job's start.

The application (this script) creates, through the socket in DOCKER_HOST, one container whose
bind source is DIR (under the files volume), then starts it ATTEMPTS times while a thread swaps
DIR between a real directory and a symbolic link to SCRATCH (a directory outside the bind roots
holding a marker file) as fast as it can. Each start ends one of three ways: refused by regobox
(it saw the link), the job saw DIR (no marker), or the job saw SCRATCH (the marker: an escape).
Prints the counts as JSON. SCRATCH is made by this script and holds nothing but the marker.

    DOCKER_HOST=unix:///run/regobox/docker.sock scripts/bench-docker-race.py \\
        --image IMAGE --dir /volumes/files/race --host-dir /srv/regobox/files/race [--attempts 1000]

IMAGE must be the instance's (imported or built through the socket) and hold `sh` and `ls`.
--host-dir is DIR as the engine's host sees it (the same path when regobox runs on the host).
"""
import argparse
import json
import os
import shutil
import tempfile
import threading
import time

import docker


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--host-dir", required=True)
    p.add_argument("--attempts", type=int, default=1000)
    args = p.parse_args()

    scratch = tempfile.mkdtemp(prefix="regobox-race-scratch-")
    with open(os.path.join(scratch, "MARKER-OUTSIDE"), "w") as f:
        f.write("outside\n")
    os.makedirs(args.host_dir, exist_ok=True)
    os.makedirs(args.dir, exist_ok=True)
    client = docker.from_env(timeout=60)
    c = client.containers.create(args.image, ["ls", "/mnt"], volumes={args.dir: {"bind": "/mnt", "mode": "ro"}})
    stop = threading.Event()
    swaps = [0]
    tmp_link = args.host_dir + ".link"

    def swapper():
        # Atomic swaps on the host side: a directory and a link take turns at host_dir.
        real = args.host_dir + ".real"
        while not stop.is_set():
            try:
                os.symlink(scratch, tmp_link)
                os.rename(args.host_dir, real)
                os.rename(tmp_link, args.host_dir)   # DIR is now a link to SCRATCH
                os.unlink(args.host_dir)
                os.rename(real, args.host_dir)       # DIR is a directory again
                swaps[0] += 1
            except OSError:
                pass

    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    counts = {"refused": 0, "inside": 0, "escaped": 0, "other": 0}
    started = time.monotonic()
    seen = 0
    try:
        for _ in range(args.attempts):
            try:
                c.start()
            except docker.errors.APIError as e:
                counts["refused" if e.status_code == 403 else "other"] += 1
                continue
            c.wait()
            out = c.logs(stdout=True, stderr=False).decode()
            new, seen = out[seen:], len(out)
            counts["escaped" if "MARKER-OUTSIDE" in new else "inside"] += 1
    finally:
        stop.set()
        t.join()
        c.remove(force=True)
        shutil.rmtree(scratch, ignore_errors=True)
    counts["attempts"] = args.attempts
    counts["swaps"] = swaps[0]
    counts["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
