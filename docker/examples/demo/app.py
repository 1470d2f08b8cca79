#!/usr/bin/env python3
"""The regobox demo application: what an app such as Regovar does inside the image.

- PostgreSQL through DATABASE_URL (notes kept in a table);
- a WebSocket (/ws: echo);
- a pipeline job run as a sibling container on the host's engine, through the policy-enforcing
  socket regobox gives it (DOCKER_HOST): the job image is imported once through that socket, the
  job mounts a directory under REGOBOX_FILES_DIR (regobox translates it to the host path) and
  writes its result there, which the app then reads.

Standard library and psycopg2 only. Listens on 127.0.0.1:8500, behind regobox's proxy.
"""
import base64
import hashlib
import http.client
import io
import json
import os
import socket
import tarfile
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import psycopg2

FILES = os.environ.get("REGOBOX_FILES_DIR", "/volumes/files")
JOB_IMAGE = "regobox-demo/job:1"


def db():
    return psycopg2.connect(os.environ["DATABASE_URL"])


def init_db():
    with db() as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text NOT NULL,"
            " created timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id text PRIMARY KEY, input text NOT NULL,"
            " exit_code int, result text, finished timestamptz)"
        )


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("docker", timeout=120)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(120)
        sock.connect(self.unix_path)
        self.sock = sock


def docker(method, path, body=None, content_type="application/json"):
    host = os.environ.get("DOCKER_HOST", "")
    if not host.startswith("unix://"):
        raise RuntimeError("no Docker bridge: DOCKER_HOST is %r" % host)
    conn = UnixConnection(host[len("unix://"):])
    headers = {"Content-Type": content_type} if body is not None else {}
    conn.request(method, "/v1.41" + path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status >= 300:
        raise RuntimeError("%s %s: %d %s" % (method, path, response.status, data[:500].decode(errors="replace")))
    return data


def ensure_job_image():
    try:
        docker("GET", "/images/%s/json" % JOB_IMAGE)
        return
    except RuntimeError:
        pass
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "cat", "tr", "echo", "sha256sum"):
            info = tarfile.TarInfo("bin/" + applet)
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        info = tarfile.TarInfo("job")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    docker("POST", "/images/create?fromSrc=-&repo=regobox-demo/job&tag=1", buf.getvalue(), "application/x-tar")


def run_job(text):
    """Upper-case `text` in a job container; returns (id, exit code, result)."""
    ensure_job_image()
    job_id = uuid.uuid4().hex[:12]
    workdir = os.path.join(FILES, "jobs", job_id)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "input.txt"), "w") as f:
        f.write(text)
    spec = {
        "Image": JOB_IMAGE,
        "Cmd": ["sh", "-c", "tr a-z A-Z < /job/input.txt > /job/result.txt"],
        "HostConfig": {"Binds": ["%s:/job" % workdir]},
        "Labels": {"regobox-demo.job": job_id},
    }
    created = json.loads(docker("POST", "/containers/create?name=demo-job-" + job_id, json.dumps(spec)))
    cid = created["Id"]
    try:
        docker("POST", "/containers/%s/start" % cid, b"")
        waited = json.loads(docker("POST", "/containers/%s/wait" % cid, b""))
    finally:
        docker("DELETE", "/containers/%s?force=1" % cid)
    with open(os.path.join(workdir, "result.txt")) as f:
        result = f.read()
    with db() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO jobs (id, input, exit_code, result, finished) VALUES (%s, %s, %s, %s, now())",
            (job_id, text, waited["StatusCode"], result),
        )
    return job_id, waited["StatusCode"], result


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body, ctype="application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()

    def do_GET(self):
        path = urlparse(self.path).path
        if path == "/healthz":
            with db() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
            return self.reply(200, b"ok\n", "text/plain")
        if path == "/notes":
            with db() as conn, conn.cursor() as cur:
                cur.execute("SELECT id, body FROM notes ORDER BY id")
                return self.reply(200, [{"id": i, "body": b} for i, b in cur.fetchall()])
        if path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if path == "/":
            with db() as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM notes")
                (notes,) = cur.fetchone()
            page = (
                "<!doctype html><title>regobox demo</title><h1>regobox demo</h1>"
                "<p>%d notes in PostgreSQL. Seen from %s (%s).</p>"
                % (notes, self.headers.get("X-Forwarded-For", "?"), self.headers.get("X-Forwarded-Proto", "?"))
            )
            return self.reply(200, page.encode(), "text/html; charset=utf-8")
        return self.reply(404, {"error": "not found"})

    def do_POST(self):
        path = urlparse(self.path).path
        if path == "/notes":
            text = self.body()
            with db() as conn, conn.cursor() as cur:
                cur.execute("INSERT INTO notes (body) VALUES (%s) RETURNING id", (text,))
                (note_id,) = cur.fetchone()
            return self.reply(201, {"id": note_id})
        if path == "/jobs":
            try:
                job_id, code, result = run_job(self.body())
            except Exception as e:  # the reason goes back to the caller
                return self.reply(502, {"error": str(e)})
            return self.reply(200, {"id": job_id, "exit": code, "result": result})
        return self.reply(404, {"error": "not found"})

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(self.rfile.read(2), "big")
            elif length == 127:
                length = int.from_bytes(self.rfile.read(8), "big")
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            if opcode == 1:
                data = b"echo: " + data
            frame = bytes([0x80 | opcode])
            if len(data) < 126:
                frame += bytes([len(data)])
            elif len(data) < 65536:
                frame += bytes([126]) + len(data).to_bytes(2, "big")
            else:
                frame += bytes([127]) + len(data).to_bytes(8, "big")
            self.wfile.write(frame + data)
            self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    for attempt in range(30):
        try:
            init_db()
            break
        except psycopg2.OperationalError:
            time.sleep(1)
    Server(("127.0.0.1", 8500), Handler).serve_forever()
