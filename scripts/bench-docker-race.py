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
        --image IMAGE --dir /volumes/files/race --host-dir /srv/regobox/files/race \\
        [--attempts 1000] [--swapper-uid 65534]

IMAGE must be the instance's (imported or built through the socket) and hold `ls`.
--host-dir is DIR as the engine's host sees it (the same path when regobox runs on the host).
The swapper runs as --swapper-uid (the application is not root), which is given DIR's parent
and DIR, as the application owns its files; 0 runs it as root, which no freeze can stop.
"""
import argparse
import json
import os
import shutil
import tempfile
import signal
import subprocess
import sys
import time

import docker


# DIR and a link to SCRATCH take turns at DIR; prints the swap count.
SWAPPER = r"""
import os, random, signal, sys, time
d, scratch, hold, link_hold = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
real, link = d + ".real", d + ".link"
n = 0
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))

def settle():
    # Back to DIR a directory, from wherever a refused rename left it.
    try:
        if os.path.islink(d):
            os.unlink(d)
        if os.path.isdir(real):
            if os.path.isdir(d) and not os.path.islink(d):
                os.rmdir(d)  # made meanwhile (empty): the real one goes back
            os.rename(real, d)
    except OSError:
        pass

while not stop:
    if hold:
        time.sleep(random.uniform(0, hold / 1000))
    try:
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(scratch, link)
        os.rename(d, real)
    except OSError:
        settle()
        continue
    try:
        os.rename(link, d)
        if link_hold:
            time.sleep(random.uniform(0, link_hold / 1000))
        os.unlink(d)
    except OSError:
        pass
    try:
        os.rename(real, d)
        n += 1
    except OSError:
        settle()
print(n)
"""


# The swapper is not root: an interpreter it may run (a user's own may be under /root).
SWAPPER_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def count_refusal(counts, reasons, e):
    """A 403 is regobox's refusal; anything else the engine's. The first few reasons are kept."""
    counts["refused" if e.status_code == 403 else "other"] += 1
    why = str(e.explanation)
    if why not in reasons and len(reasons) < 5:
        reasons.append(why)


def settle(d):
    """DIR a directory again, whatever state a stopped swapper left."""
    for leftover in (d + ".link",):
        if os.path.islink(leftover):
            os.unlink(leftover)
    if os.path.islink(d):
        os.unlink(d)
    if os.path.isdir(d + ".real"):
        if os.path.isdir(d):
            os.rmdir(d + ".real")
        else:
            os.rename(d + ".real", d)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--host-dir", required=True)
    p.add_argument("--attempts", type=int, default=1000)
    p.add_argument("--swapper-uid", type=int, default=65534)
    p.add_argument(
        "--hold-ms",
        type=float,
        default=2.0,
        help="the swapper leaves DIR a directory for a random time up to this, then a link for "
        "one up to --link-hold-ms: most checks pass, and swaps fall anywhere, the mount included "
        "(0 and 0: swap flat out)",
    )
    p.add_argument("--link-hold-ms", type=float, default=0.5)
    p.add_argument(
        "--every-start",
        type=int,
        default=1,
        help="1: every attempt starts the job; N: one in N does, the others copy DIR out of the "
        "stopped job (GET archive: the engine mounts its binds for that too), which is faster",
    )
    args = p.parse_args()

    scratch = tempfile.mkdtemp(prefix="regobox-race-scratch-")
    with open(os.path.join(scratch, "MARKER-OUTSIDE"), "w") as f:
        f.write("outside\n")
    settle(args.host_dir)
    os.makedirs(args.host_dir, exist_ok=True)
    os.makedirs(args.dir, exist_ok=True)
    client = docker.from_env(timeout=60)
    c = client.containers.create(args.image, ["ls", "/mnt"], volumes={args.dir: {"bind": "/mnt", "mode": "ro"}})
    parent = os.path.dirname(args.host_dir.rstrip("/"))
    for path in (parent, args.host_dir):
        os.chown(path, args.swapper_uid, args.swapper_uid)
    swapper = subprocess.Popen(
        [SWAPPER_PYTHON, "-c", SWAPPER, args.host_dir, scratch, str(args.hold_ms), str(args.link_hold_ms)],
        preexec_fn=lambda: (os.setgid(args.swapper_uid), os.setuid(args.swapper_uid)),
        stdout=subprocess.PIPE,
    )
    counts = {"refused": 0, "inside": 0, "escaped": 0, "other": 0}
    started = time.monotonic()
    seen = 0
    reasons = []
    try:
        for attempt in range(args.attempts):
            if attempt % args.every_start:
                try:
                    stream, _ = c.get_archive("/mnt/")
                    listing = b"".join(stream)
                except docker.errors.APIError as e:
                    count_refusal(counts, reasons, e)
                    continue
                counts["escaped" if b"MARKER-OUTSIDE" in listing else "inside"] += 1
                continue
            try:
                c.start()
            except docker.errors.APIError as e:
                count_refusal(counts, reasons, e)
                continue
            c.wait()
            out = c.logs(stdout=True, stderr=False).decode()
            new, seen = out[seen:], len(out)
            counts["escaped" if "MARKER-OUTSIDE" in new else "inside"] += 1
    finally:
        swapper.send_signal(signal.SIGTERM)
        out, _ = swapper.communicate()
        c.remove(force=True)
        settle(args.host_dir)
        shutil.rmtree(scratch, ignore_errors=True)
    counts["attempts"] = args.attempts
    counts["swaps"] = int(out.decode().strip() or 0)
    counts["seconds"] = round(time.monotonic() - started, 1)
    counts["reasons"] = reasons
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
