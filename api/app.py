"""The HTTP face of DupHunter: OCI Distribution v1.1 plus a small jobs and stats API.

Handlers translate HTTP to calls on `pipelines.registry.facade.Registry` and back; the domain
decides, the handlers only carry bytes and headers. Served by gunicorn (`api.app:app`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode

from werkzeug.exceptions import ClientDisconnected
from werkzeug.wrappers import Request, Response

from api.auth import AuthGate, client_identity
from api.exposition import metrics_exposition
from api.presentation import presentable
from pipelines import metrics
from pipelines.errors import IndexIncomplete, RegistryError, is_transient
from pipelines.ingest.ingestor import check_is_layer
from pipelines.registry import usage
from pipelines.registry.facade import Registry, paginate, parse_count
from pipelines.registry.manifests import OCI_INDEX
from pipelines.registry.names import check_name
from pipelines.store.blobs import BlobInfo
from workers import jobs

Handler = Callable[..., Response]
SOURCE_HEADER = "X-DupHunter-Source"  # what served a blob GET (pipelines.serve.serving.SOURCES)
API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
RETRY_AFTER_SECONDS = "5"  # with a 503: a backend unreachable, the index being rebuilt


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, pattern: str, **handlers: Handler) -> None:
        self.routes.append((re.compile(pattern), handlers))

    def match(self, path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
        for pattern, handlers in self.routes:
            found = pattern.fullmatch(path)
            if found:
                return handlers, found.groupdict()
        return None


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def _error_response(error: RegistryError) -> Response:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if error.status == 503 else None
    return _json(error.body(), error.status, headers)


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("Content-Length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise RegistryError("SIZE_INVALID", "invalid Content-Length", {"Content-Length": raw})
    return int(raw)


def _drain(request: Request, limit: int = 16 << 20) -> None:
    """Read an unread body so the client sees the error response rather than a reset."""
    try:
        while limit > 0 and (chunk := request.stream.read(min(limit, 1 << 20))):
            limit -= len(chunk)
    except (ClientDisconnected, OSError):
        pass


def _upload_headers(name: str, upload_id: str, offset: int) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
        "Range": f"0-{max(offset - 1, 0)}",
        "Docker-Upload-UUID": upload_id,
        "Content-Length": "0",
    }


def _blob_created(name: str, info: BlobInfo) -> Response:
    return Response(
        status=201,
        headers={
            "Location": f"/v2/{name}/blobs/{info.digest}",
            "Docker-Content-Digest": info.digest,
            "Content-Length": "0",
        },
    )


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (start, end-inclusive) of a single `bytes=` range; RANGE_INVALID if unsatisfiable."""
    if not header:
        return None
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise RegistryError(
            "RANGE_INVALID", "requested range not satisfiable", {"Content-Range": f"bytes */{size}"}
        )
    return start, end


def _next_page_link(path: str, count: int | None, page: list[str], more: bool) -> dict[str, str]:
    """The `Link` header to the next page of a paginated list, when there is one."""
    if not (more and page):
        return {}
    query = urlencode({"n": count, "last": page[-1]})
    return {"Link": f'<{path}?{query}>; rel="next"'}


def _content_range_start(header: str | None) -> int | None:
    if header is None:
        return None
    match = re.fullmatch(r"(?:bytes[ =])?(\d+)-(\d+)(?:/\d+|/\*)?", header.strip())
    if not match:
        raise RegistryError("BLOB_UPLOAD_INVALID", "invalid Content-Range", status=416)
    return int(match.group(1))


def _json_body(request: Request, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        payload = json.loads(request.get_data(cache=False) or b"{}")
        if not isinstance(payload, dict) or any(key not in payload for key in required):
            raise ValueError
    except ValueError as error:
        names = " and ".join(required)
        raise RegistryError("UNSUPPORTED", f"body must be JSON with {names}", status=400) from error
    return payload


class RegistryApp:
    def __init__(self, registry: Registry, gate: AuthGate | None = None) -> None:
        self.registry = registry
        self.gate = gate or AuthGate.from_env(registry.index.redis)
        self.readiness = jobs.CachedReadiness(registry)
        self.router = Router()
        name = r"(?P<name>.+?)"
        r = self.router
        r.add(r"/v2/?", GET=self.base, HEAD=self.base)
        r.add(r"/v2/_catalog", GET=self.catalog)
        r.add(rf"/v2/{name}/blobs/uploads/?", POST=self.start_upload)
        r.add(
            rf"/v2/{name}/blobs/uploads/(?P<upload_id>[^/]+)",
            GET=self.upload_status,
            PATCH=self.upload_chunk,
            PUT=self.finish_upload,
            DELETE=self.cancel_upload,
        )
        r.add(
            rf"/v2/{name}/blobs/(?P<digest>[^/]+)",
            GET=self.get_blob,
            HEAD=self.get_blob,
            DELETE=self.delete_blob,
        )
        r.add(
            rf"/v2/{name}/manifests/(?P<reference>[^/]+)",
            GET=self.get_manifest,
            HEAD=self.get_manifest,
            PUT=self.put_manifest,
            DELETE=self.delete_manifest,
        )
        r.add(rf"/v2/{name}/tags/list", GET=self.list_tags)
        r.add(rf"/v2/{name}/referrers/(?P<digest>[^/]+)", GET=self.list_referrers)
        r.add(r"/api/v1/stats", GET=self.stats)
        r.add(r"/api/v1/jobs/ingest", POST=self.submit_ingest)
        r.add(r"/api/v1/jobs/preconstruct", POST=self.submit_preconstruct)
        r.add(r"/api/v1/jobs/reindex", POST=self.submit_reindex)
        r.add(r"/api/v1/jobs/gc", POST=self.submit_gc)
        r.add(r"/api/v1/jobs/retention", POST=self.submit_retention)
        r.add(r"/api/v1/jobs/verify", POST=self.submit_verify)
        r.add(r"/api/v1/encoders/verify", POST=self.verify_encoders)
        r.add(rf"/api/v1/repositories/{name}", DELETE=self.delete_repository)
        r.add(r"/api/v1/jobs/(?P<job_id>[^/]+)", GET=self.job_status)
        r.add(r"/api/v1/health", GET=self.health)
        r.add(r"/api/v1/ready", GET=self.ready)
        r.add(r"/metrics", GET=self.metrics)
        r.add(r"/auth/token", GET=self.gate.token, POST=self.gate.token)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        started = time.perf_counter()
        route, response = self.dispatch(request)
        response.headers.setdefault(*API_VERSION_HEADER)
        method = metrics.method_label(request.method)
        metrics.HTTP_LATENCY.labels(route, method).observe(time.perf_counter() - started)
        metrics.HTTP_REQUESTS.labels(route, method, str(response.status_code)).inc()
        return response(environ, start_response)

    def dispatch(self, request: Request) -> tuple[str, Response]:
        """The route's name (for metrics) and the response."""
        found = self.router.match(request.path)
        if found is None:
            return "unknown", _json(
                {"errors": [{"code": "UNSUPPORTED", "message": "not found"}]}, 404
            )
        handlers, params = found
        route = next(iter(handlers.values())).__name__
        return route, self._handle(request, handlers, params)

    def _handle(
        self, request: Request, handlers: dict[str, Handler], params: dict[str, str]
    ) -> Response:
        handler = handlers.get(request.method)
        if handler is None:
            return _json(
                {"errors": [{"code": "UNSUPPORTED", "message": "method not allowed"}]},
                405,
                {"Allow": ", ".join(handlers)},
            )
        refused = self.gate.refuse(request, handler.__name__, params)
        if refused is not None:
            _drain(request)
            return refused
        try:
            if "name" in params:
                check_name(params["name"])
            return self._run(handler, request, params)
        except RegistryError as error:
            _drain(request)
            return _error_response(error)
        except ClientDisconnected:
            return _json({"errors": [{"code": "SIZE_INVALID", "message": "body truncated"}]}, 400)
        except Exception as error:
            if not is_transient(error):
                raise
            unavailable = RegistryError("UNAVAILABLE", f"a backend is unreachable: {error}")
            return _error_response(unavailable)

    def _run(self, handler: Handler, request: Request, params: dict[str, str]) -> Response:
        """The handler's answer; a lookup that found the index incomplete also asks for
        it to be rebuilt."""
        try:
            return handler(request, **params)
        except IndexIncomplete:
            jobs.request_index_rebuild(self.registry)
            raise

    # base, catalog
    def base(self, request: Request) -> Response:
        return _json({})

    def health(self, request: Request) -> Response:
        """Liveness: this process answers. Cheap, and touches no backend."""
        return _json({"ok": True})

    def ready(self, request: Request) -> Response:
        """Readiness: Redis, S3, a consumer on every queue, the encoders; what is wrong.
        `?scope=backends`: all but the consumers (the API pods' probe). At most a few
        seconds old (jobs.CachedReadiness): the endpoint is open, a check is not free; a
        check that hangs turns it 503 ("readiness check stale"). docs/operations.md."""
        checks = self.readiness.get(request.args.get("scope", "all"))
        ok = all(check["ok"] for check in checks.values())
        return _json({"ok": ok, "checks": checks}, 200 if ok else 503)

    def metrics(self, request: Request) -> Response:
        body, content_type = metrics_exposition(self.registry)
        return Response(body, status=200, content_type=content_type)

    def catalog(self, request: Request) -> Response:
        count = parse_count(request.args.get("n"))
        names, more = self.gate.catalog_page(
            self.registry, request, count, request.args.get("last")
        )
        headers = _next_page_link("/v2/_catalog", count, names, more)
        return _json({"repositories": names}, headers=headers)

    # uploads
    def start_upload(self, request: Request, name: str) -> Response:
        blobs = self.registry.blobs
        mount, source = (
            request.args.get("mount"),
            self.gate.readable(request.args.get("from"), request),
        )
        if mount and source and self.registry.mount(name, mount, source):
            return _blob_created(name, blobs.linked_info(name, mount))
        if "digest" in request.args:
            digest = request.args["digest"]
            info = blobs.put_monolithic(name, digest, request.stream, _content_length(request))
            return _blob_created(name, info)
        state = blobs.start_upload(name)
        return Response(status=202, headers=_upload_headers(name, state.upload_id, 0))

    def upload_status(self, request: Request, name: str, upload_id: str) -> Response:
        state = self.registry.blobs.upload(name, upload_id)
        return Response(status=204, headers=_upload_headers(name, upload_id, state.offset))

    def upload_chunk(self, request: Request, name: str, upload_id: str) -> Response:
        start = _content_range_start(request.headers.get("Content-Range"))
        state = self.registry.blobs.append(
            name, upload_id, request.stream, _content_length(request), start
        )
        return Response(status=202, headers=_upload_headers(name, upload_id, state.offset))

    def finish_upload(self, request: Request, name: str, upload_id: str) -> Response:
        digest = request.args.get("digest")
        if not digest:
            raise RegistryError("DIGEST_INVALID", "digest parameter is required")
        start = _content_range_start(request.headers.get("Content-Range"))
        info = self.registry.blobs.commit(
            name, upload_id, digest, request.stream, _content_length(request), start
        )
        return _blob_created(name, info)

    def cancel_upload(self, request: Request, name: str, upload_id: str) -> Response:
        self.registry.blobs.cancel(name, upload_id)
        return Response(status=204)

    # blobs
    def get_blob(self, request: Request, name: str, digest: str) -> Response:
        blobs = self.registry.blobs
        info = blobs.linked_info(name, digest)
        headers = {
            "Docker-Content-Digest": digest,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        try:
            byte_range = _parse_range(request.headers.get("Range"), info.size)
        except RegistryError as error:
            return _json(error.body(), 416, {"Content-Range": f"bytes */{info.size}"})
        status, start, length = 200, 0, info.size
        if byte_range is not None:
            status, start, length = 206, byte_range[0], byte_range[1] - byte_range[0] + 1
            headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1]}/{info.size}"
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status=status, headers=headers)
        jobs.enqueue_blob_event(self._client(request), name, digest)
        redirect = self.registry.redirect_url(info) if byte_range is None else None
        if redirect is not None:
            moved = {"Location": redirect, "Content-Length": "0", SOURCE_HEADER: "intact"}
            return Response(status=307, headers={**headers, **moved})
        read = self.registry.read_blob(info, start, length)
        headers[SOURCE_HEADER] = read.source
        metrics.BLOB_GETS.labels(read.source).inc()
        return Response(read.chunks, status=status, headers=headers, direct_passthrough=True)

    def _client(self, request: Request) -> str:
        return client_identity(
            request.remote_addr or "",
            request.headers.get("X-Forwarded-For", ""),
            self.registry.settings.trusted_proxies,
        )

    def delete_blob(self, request: Request, name: str, digest: str) -> Response:
        self.registry.blobs.unlink(name, digest)
        return Response(status=202, headers={"Content-Length": "0"})

    # manifests
    def get_manifest(self, request: Request, name: str, reference: str) -> Response:
        accept = [
            item.strip()
            for value in request.headers.getlist("Accept")
            for item in value.split(",")
            if item.strip()
        ]
        manifest = self.registry.manifests.get(name, reference, accept)
        headers = {
            "Docker-Content-Digest": manifest.digest,
            "Content-Type": manifest.media_type,
            "Content-Length": str(len(manifest.content)),
        }
        if request.method == "HEAD":
            return Response(status=200, headers=headers)
        jobs.enqueue_manifest_event(self._client(request), name, manifest.digest, reference)
        return Response(manifest.content, status=200, headers=headers)

    def put_manifest(self, request: Request, name: str, reference: str) -> Response:
        limit = self.registry.settings.max_manifest_bytes
        length = _content_length(request)
        if length is not None and length > limit:
            raise RegistryError("SIZE_INVALID", "manifest exceeds the size limit", status=413)
        content = request.stream.read(limit + 1)
        if len(content) > limit:
            raise RegistryError("SIZE_INVALID", "manifest exceeds the size limit", status=413)
        parsed = self.registry.manifests.put(
            name, reference, content, request.headers.get("Content-Type")
        )
        for layer in parsed.layers:
            jobs.enqueue_ingest(self.registry, name, layer)
        jobs.enqueue_manifest_put(name, reference, parsed.digest)
        headers = {
            "Location": f"/v2/{name}/manifests/{parsed.digest}",
            "Docker-Content-Digest": parsed.digest,
            "Content-Length": "0",
        }
        if parsed.subject:
            headers["OCI-Subject"] = parsed.subject
        return Response(status=201, headers=headers)

    def delete_manifest(self, request: Request, name: str, reference: str) -> Response:
        self.registry.manifests.delete(name, reference)
        return Response(status=202, headers={"Content-Length": "0"})

    def list_tags(self, request: Request, name: str) -> Response:
        count = parse_count(request.args.get("n"))
        tags, more = paginate(self.registry.manifests.tags(name), count, request.args.get("last"))
        headers = _next_page_link(f"/v2/{name}/tags/list", count, tags, more)
        return _json({"name": name, "tags": tags}, headers=headers)

    def list_referrers(self, request: Request, name: str, digest: str) -> Response:
        artifact_type = request.args.get("artifactType")
        found = self.registry.manifests.referrers(name, digest, artifact_type)
        headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return Response(json.dumps(body), status=200, headers=headers, content_type=OCI_INDEX)

    # jobs and stats
    def stats(self, request: Request) -> Response:
        """The registry's figures; `storage` also holds what the bucket really holds
        (pipelines.registry.usage), measured at most a minute ago or, with `?fresh=1`, now."""
        body = self.registry.stats()
        body["queues"] = jobs.queue_depths(self.registry)
        registry, fresh = self.registry, request.args.get("fresh") in ("1", "true")
        measured = usage.bucket_usage(registry.store, registry.index.redis, fresh)
        body["storage"].update(
            usage.storage_report(
                measured, registry.index.counters(), body["logical_bytes"], body["stored_bytes"]
            )
        )
        return _json(presentable(body))

    def submit_ingest(self, request: Request) -> Response:
        payload = _json_body(request, ("repository", "digest"))
        repository, digest = str(payload["repository"]), str(payload["digest"])
        check_name(repository)
        self.registry.blobs.linked_info(repository, digest)
        if not self.registry.deduplicates():
            message = "mode intact: this registry deduplicates no layer"
            raise RegistryError("UNSUPPORTED", message, status=409)
        check_is_layer(self.registry.index, digest)
        job_id = jobs.enqueue_ingest(self.registry, repository, digest, force=True)
        return _json({"id": job_id, "state": "queued"}, 202, {"Location": f"/api/v1/jobs/{job_id}"})

    def submit_preconstruct(self, request: Request) -> Response:
        """Rebuild an image's deduplicated layers ahead of a rollout: {"repository": r,
        "reference": tag or digest, "platforms": ["linux/amd64", ...] (of an index, all if
        absent), "layers": [digests] (instead of the image's own, optional)}."""
        payload = _json_body(request, ("repository", "reference"))
        repository, reference = str(payload["repository"]), str(payload["reference"])
        check_name(repository)
        platforms = [str(p) for p in payload.get("platforms") or []]
        self.registry.manifests.check_platforms(repository, reference, platforms)
        layers = self.registry.warm(repository, reference, platforms)
        if payload.get("layers"):
            wanted = {str(layer) for layer in payload["layers"]}
            layers = [layer for layer in layers if layer in wanted]
        job_id = jobs.enqueue_warm(self.registry, repository, reference, layers)
        body = {"id": job_id, "state": "queued", "layers": layers}
        return _json(body, 202, {"Location": f"/api/v1/jobs/{job_id}"})

    def submit_gc(self, request: Request) -> Response:
        """Garbage collection now: {"dry_run": true} reports what it would free."""
        payload = _json_body(request, ())
        job_id = jobs.enqueue_gc(self.registry, bool(payload.get("dry_run")))
        return _json({"id": job_id, "state": "queued"}, 202, {"Location": f"/api/v1/jobs/{job_id}"})

    def submit_retention(self, request: Request) -> Response:
        """Apply the retention policy now: {"dry_run": true} lists what it would delete."""
        payload = _json_body(request, ())
        job_id = jobs.enqueue_retention(self.registry, bool(payload.get("dry_run")))
        return _json({"id": job_id, "state": "queued"}, 202, {"Location": f"/api/v1/jobs/{job_id}"})

    def submit_verify(self, request: Request) -> Response:
        """Prove blobs from their packs or data objects, never from a cache: the
        deduplicated layers, or {"all": true} every stored blob; {"sample": n} at most n
        (of the deduplicated layers, those verified longest ago)."""
        payload = _json_body(request, ())
        sample = payload.get("sample")
        job_id = jobs.enqueue_verify(
            self.registry, int(sample) if sample is not None else None, bool(payload.get("all"))
        )
        return _json({"id": job_id, "state": "queued"}, 202, {"Location": f"/api/v1/jobs/{job_id}"})

    def verify_encoders(self, request: Request) -> Response:
        """Run every encoder's canary in this process (the build this API runs) and record
        the results: a failed or missing one turns readiness red and keeps intact copies.
        {"ok", "checked", "failed": {encoder id: reason}}; a few seconds, no job."""
        _drain(request)
        return _json(jobs.verify_encoders(self.registry))

    def delete_repository(self, request: Request, name: str) -> Response:
        """Every tag, manifest and blob link of a repository; GC frees the bytes."""
        dropped = self.registry.manifests.delete_repository(name)
        return _json({"repository": name, "objects_dropped": dropped}, 202)

    def submit_reindex(self, request: Request) -> Response:
        job_id = jobs.enqueue_reindex(self.registry)
        return _json({"id": job_id, "state": "queued"}, 202, {"Location": f"/api/v1/jobs/{job_id}"})

    def job_status(self, request: Request, job_id: str) -> Response:
        status = jobs.status(self.registry, job_id)
        if status is None:
            return _json({"errors": [{"code": "NOT_FOUND", "message": "unknown job"}]}, 404)
        return _json(presentable(status))


def create_app() -> RegistryApp:
    registry = Registry.connect()
    registry.prepare_to_serve()
    registry.buffer.enforce_bound()  # DUPHUNTER_BUFFER_BYTES may have been lowered
    return RegistryApp(registry)


_app: RegistryApp | None = None


def prepare() -> RegistryApp:
    """This process's application, created at once (gunicorn's post_worker_init calls it,
    so that the first request does not wait for it)."""
    global _app
    if _app is None:
        _app = create_app()
    return _app


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The WSGI entry point; a server without the hook prepares on the first request."""
    return prepare()(environ, start_response)
