"""Write a regobox archive of many members, fast (raw ustar headers through zstd), for
scripts/bench-verify.sh.

Usage: make-archive.py KIND N OUT
  files       N small files in directories of 1 000, with a manifest that matches: what a real
              backup of many files looks like to a reader (no database dump: `verify` reads it
              whole, then says so);
  short-names N directories of one to six characters and no manifest: a crafted archive that
              makes a reader hold as many names as it can for its size;
  long-names  N directories of 4 000-character names (GNU long names) and no manifest.
"""
import hashlib
import json
import subprocess
import sys

kind, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# The crafted ones with a long window (a reader then holds 128 MiB of it), for their size.
window = [] if kind == "files" else ["--long=27"]
z = subprocess.Popen(["zstd", "-q", "-3", *window, "-T2", "-o", out, "-f"],
                     stdin=subprocess.PIPE, bufsize=1 << 20)
w = z.stdin
members = []


def header(name, typ, size=0, mode=0o644):
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:124] = b"0000000\0" * 2
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % 1700000000
    h[148:156] = b" " * 8
    h[156:157] = typ
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def padded(data):
    return data + b"\0" * (-len(data) % 512)


def add(name, typ, data=b"", mode=0o644):
    raw = name.encode()
    if len(raw) > 100:
        long = raw + b"\0"
        w.write(header(b"././@LongLink", b"L", len(long)) + padded(long))
        raw = raw[:100]
    w.write(header(raw, typ, len(data), mode) + padded(data))
    m = {"path": name, "kind": "file" if typ == b"0" else "dir", "size": len(data), "mode": mode}
    if typ == b"0":
        m["sha256"] = hashlib.sha256(data).hexdigest()
    if kind == "files":
        members.append(m)


add("regobox.json", b"0", json.dumps({"format": 1, "postgres": None}).encode())
add("volumes/files", b"5", mode=0o755)
for k in range(n):
    if kind == "files":
        if k % 1000 == 0:
            run = "volumes/files/run-%05d" % (k // 1000)
            add(run, b"5", mode=0o755)
        add("%s/sample-%07d.vcf" % (run, k), b"0", b"chr1\t%d\tA\tG\n" % k)
    elif kind == "short-names":
        add("volumes/files/%x" % k, b"5", mode=0o755)
    else:
        add("volumes/files/%s%08d" % ("a" * 4000, k), b"5", mode=0o755)
if kind == "files":
    manifest = json.dumps({"format": 1, "regobox_version": "bench", "created_at": "2026-12-04T00:00:00Z",
                           "postgres": None, "secrets_included": False, "config_included": False,
                           "members": members}, indent=2).encode()
    w.write(header(b"manifest.json", b"0", len(manifest)) + padded(manifest))
w.write(b"\0" * 1024)
w.close()
sys.exit(z.wait())
