#!/usr/bin/env python3
"""Catalog at scale, for `scripts/bench` with BENCH_CATALOG=1 (not meant to be run alone).

Builds a catalog of IMAGES x VERSIONS published versions through the HTTP API (each version: two
tiny uploads, a draft, a qcow2 artifact with an incus.tar.xz attachment, a publish whose job is
waited for), in two stages, and after each stage times the reads and writes that must not grow
worse than linearly with the catalog: rendering and serving images.json, listing images and
versions, reading a manifest, the catalog page, publishing one more version and moving an alias.
Comparing the two stages (a quarter of the catalog, then all of it) shows how each figure grows.

Usage: bench-catalog.py HOST:PORT TOKEN IMAGES VERSIONS CLIENTS
Prints one line per figure; the last block is a summary table. Uses only the standard library.
"""

import http.client
import json
import statistics
import sys
import threading
import time

ADDR, TOKEN = sys.argv[1], sys.argv[2]
IMAGES, VERSIONS, CLIENTS = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
HOST, PORT = ADDR.rsplit(":", 1)


class Client:
    """One keep-alive connection; reconnects when the server closes it."""

    def __init__(self):
        self.conn = None

    def call(self, method, path, body=None, token=TOKEN, headers=None):
        h = dict(headers or {})
        if token:
            h["Authorization"] = "Bearer " + token
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        elif body is not None:
            h["Content-Type"] = "application/octet-stream"
        for attempt in range(3):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(HOST, int(PORT), timeout=120)
                self.conn.request(method, path, body=body, headers=h)
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, data, r
            except (http.client.HTTPException, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise

    def ok(self, method, path, body=None, want=(200, 201, 202, 204)):
        status, data, _ = self.call(method, path, body)
        if status not in want:
            sys.exit(f"bench-catalog: {method} {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data) if data else None

    def upload(self, data):
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        s = self.ok("POST", "/v1/uploads", {"expected_digest": digest, "expected_size_bytes": len(data)})
        if s["state"] != "ready":
            p = self.ok("PUT", f"/v1/uploads/{s['id']}/parts/1", data)
            done = self.ok(
                "POST",
                f"/v1/uploads/{s['id']}/complete",
                {"parts": [{"number": 1, "etag": p["etag"], "size_bytes": len(data)}]},
            )
            assert done["state"] == "ready", done
        return digest

    def publish_version(self, image, version, tag):
        """Uploads, describes and publishes one version; returns seconds from POST publish
        until its job succeeded."""
        disk = f"imgsrv catalog bench disk {tag}\n".encode()
        meta = f"imgsrv catalog bench metadata {tag}\n".encode()
        d, m = self.upload(disk), self.upload(meta)
        self.ok("POST", f"/v1/images/{image}/versions", {"version": version})
        base = f"/v1/images/{image}/versions/{version}"
        a = self.ok(
            "POST",
            f"{base}/artifacts",
            {
                "operating_system": "debian",
                "architecture": "x86_64",
                "format": "qcow2",
                "primary_blob_digest": d,
                "primary_blob_size_bytes": len(disk),
                "primary_media_type": "application/x-qemu-disk",
            },
        )
        self.ok(
            "POST",
            f"{base}/artifacts/{a['id']}/attachments",
            {"name": "incus.tar.xz", "media_type": "application/x-xz", "blob_digest": m, "blob_size_bytes": len(meta)},
        )
        t0 = time.perf_counter()
        job = self.ok("POST", f"{base}/publish")
        while job["state"] not in ("succeeded", "failed"):
            time.sleep(0.002)
            job = self.ok("GET", f"/v1/publish-jobs/{job['id']}")
        if job["state"] != "succeeded":
            sys.exit(f"bench-catalog: publish {image} {version} failed: {job}")
        return time.perf_counter() - t0


def image_name(i):
    return f"img{i:03d}"


def build(first, last):
    """Publishes versions first..last-1 of every image, CLIENTS images at a time."""
    errors = []

    def worker(k):
        c = Client()
        try:
            for i in range(k, IMAGES, CLIENTS):
                if first == 0:
                    c.ok("POST", "/v1/images", {"name": image_name(i)})
                for j in range(first, last):
                    c.publish_version(image_name(i), f"1.{j}", f"{i}/{j}")
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def timed(c, method, path, n, body=None, headers=None, want=200):
    """Runs a request n times; returns (median ms, max ms, body bytes of the last)."""
    out = []
    size = 0
    for _ in range(n):
        t0 = time.perf_counter()
        status, data, _ = c.call(method, path, body, headers=headers)
        out.append((time.perf_counter() - t0) * 1000)
        if status != want:
            sys.exit(f"bench-catalog: {method} {path}: HTTP {status}: {data[:300]!r}")
        size = len(data)
    return statistics.median(out), max(out), size


def measure(total, extra):
    c = Client()
    r = {}
    img = image_name(0)
    # Incus's Go client asks for gzip (Accept-Encoding: gzip); plain is what curl gets.
    gz = {"Accept-Encoding": "gzip"}

    def renders(change, path="/streams/v1/images.json"):
        # The first GET of a document after a change renders it; later ones are served from
        # the cache. A render takes long enough for the machine's noise to matter: five of them.
        out = []
        for k in range(5):
            change(k)
            out.append(timed(c, "GET", path, 1, headers=gz))
        return statistics.median(t[0] for t in out), max(t[1] for t in out), out[-1][2]

    r["render images.json (first GET after a publish)"] = renders(
        lambda k: c.publish_version(img, f"9.{extra}.{k}", f"extra/{extra}/{k}")
    )
    r["images.json cached, gzip (as Incus asks)"] = timed(c, "GET", "/streams/v1/images.json", 30, headers=gz)
    r["images.json cached, plain"] = timed(c, "GET", "/streams/v1/images.json", 10)
    _, _, resp = c.call("GET", "/streams/v1/images.json", headers=gz)
    etag = resp.getheader("ETag")
    r["images.json revalidated (304)"] = timed(
        c, "GET", "/streams/v1/images.json", 30, headers={"If-None-Match": etag, **gz}, want=304
    )
    r["index.json cached, gzip"] = timed(c, "GET", "/streams/v1/index.json", 30, headers=gz)
    r["list images"] = timed(c, "GET", "/v1/images", 10)
    r["list versions of one image"] = timed(c, "GET", f"/v1/images/{img}/versions", 20)
    r["read a manifest"] = timed(c, "GET", f"/v1/images/{img}/versions/1.0", 20)
    # Browsers ask for gzip too; curl without --compressed gets the page plain.
    r["render catalog page / (first GET after a publish)"] = renders(
        lambda k: c.publish_version(img, f"7.{extra}.{k}", f"page/{extra}/{k}"), "/"
    )
    r["catalog page / cached, gzip (as browsers ask)"] = timed(c, "GET", "/", 10, headers=gz)
    r["catalog page / cached, plain"] = timed(c, "GET", "/", 5)
    pubs = []
    for k in range(3):
        t0 = time.perf_counter()
        c.publish_version(img, f"8.{extra}.{k}", f"more/{extra}/{k}")
        pubs.append((time.perf_counter() - t0) * 1000)
    r["publish one more version (2 uploads, draft, publish, job)"] = (statistics.median(pubs), max(pubs), 0)
    moves = []
    for k in range(10):
        t0 = time.perf_counter()
        c.ok("PUT", f"/v1/images/{img}/aliases/latest", {"version": f"1.{k % 2}"})
        moves.append((time.perf_counter() - t0) * 1000)
    r["move an alias"] = (statistics.median(moves), max(moves), 0)
    r["render images.json after an alias move"] = renders(
        lambda k: c.ok("PUT", f"/v1/images/{img}/aliases/latest", {"version": f"1.{k % 2}"})
    )
    print(f"-- catalog of {total} published versions ({IMAGES} images)", flush=True)
    for k, (med, mx, size) in r.items():
        extra_size = f", {size / 1e6:.2f} MB" if size > 100000 else ""
        print(f"   {k:58} median {med:9.2f} ms, max {mx:9.2f} ms{extra_size}", flush=True)
    return r


def main():
    quarter = max(1, VERSIONS // 4)
    secs = build(0, quarter)
    n1 = IMAGES * quarter
    print(f"built {n1} versions in {secs:.1f} s ({n1 / secs:.1f} versions/s)", flush=True)
    r1 = measure(n1, 1)
    secs = build(quarter, VERSIONS)
    n2 = IMAGES * (VERSIONS - quarter)
    print(f"built {n2} more versions in {secs:.1f} s ({n2 / secs:.1f} versions/s)", flush=True)
    total = IMAGES * VERSIONS
    r2 = measure(total, 2)
    growth = total / n1
    print()
    print(f"== catalog scale: {n1} -> {total} versions ({growth:.1f}x); medians in ms; 'growth' is the")
    print("   ratio of the two medians (linear would be about the catalog growth, constant about 1)")
    for k in r1:
        a, b = r1[k][0], r2[k][0]
        print(f"   {k:58} {a:9.2f} -> {b:9.2f}   growth {b / a if a else float('nan'):5.2f}")
    cached = r2["images.json cached, gzip (as Incus asks)"][0]
    verdict = "ok" if cached < 5 else "MISS"
    print(f"   cached images.json (gzip) at {total} versions: {cached:.2f} ms (target < 5 ms)  {verdict}")


main()
