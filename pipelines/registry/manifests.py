"""Manifests, tags and referrers: validation on push, resolution and negotiation on pull.

Manifest bytes live in S3 at `manifests/<alg>/<hex>`; a repository holds a revision link
(`repositories/<name>/_manifests/revisions/<alg>/<hex>`, JSON with the media type and the
referrer descriptor) and tag links (`.../_manifests/tags/<tag>`, the digest).

A manifest PUT relies on the blobs and manifests it names only after its revision is in
S3 (garbage collection marks from revisions) and no notice says GC is deleting them
(pipelines.store.deletion); the tag is written last.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import IndexIncomplete, RegistryError, unknown
from pipelines.formats.digests import Digest, digest_key
from pipelines.store.blobs import NOTICE_WAIT_SECONDS, BlobStore, blob_key
from pipelines.store.index import Index
from pipelines.store.storage import ObjectStore, sizes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}
INDEX_TYPES = {OCI_INDEX, DOCKER_LIST}
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
NON_DISTRIBUTABLE = (
    "application/vnd.oci.image.layer.nondistributable",
    "application/vnd.docker.image.rootfs.foreign",
)
TAG_PATTERN = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
CLAIM_ATTEMPTS = 3  # writes of a revision that GC deleted before it saw them
_MEDIA_TYPE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)


@dataclass
class ParsedManifest:
    media_type: str
    digest: str
    content: bytes
    blobs: list[str] = field(default_factory=list)  # config and layers to check
    layers: list[str] = field(default_factory=list)  # layers to ingest
    children: list[str] = field(default_factory=list)  # manifests an index names
    subject: str | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def referrer_descriptor(self) -> dict[str, Any]:
        descriptor: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.content),
        }
        if self.artifact_type:
            descriptor["artifactType"] = self.artifact_type
        if self.annotations:
            descriptor["annotations"] = self.annotations
        return descriptor


@dataclass
class StoredManifest:
    digest: str
    media_type: str
    content: bytes

    def layer_digests(self) -> list[str]:
        if self.media_type not in IMAGE_TYPES:
            return []
        return [str(layer["digest"]) for layer in json.loads(self.content).get("layers", [])]

    def platforms(self) -> list[tuple[str, str]]:
        """For an index: each manifest it names and its platform ("os/arch[/variant]")."""
        if self.media_type not in INDEX_TYPES:
            return []
        children = []
        for child in json.loads(self.content).get("manifests", []):
            platform = child.get("platform") or {}
            parts = [platform.get("os", ""), platform.get("architecture", "")]
            parts += [platform["variant"]] if platform.get("variant") else []
            children.append((str(child["digest"]), "/".join(parts)))
        return children


def _invalid(message: str, detail: Any = None) -> RegistryError:
    return RegistryError("MANIFEST_INVALID", message, detail)


def _descriptor(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{where} is not a descriptor")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not _MEDIA_TYPE.match(media_type):
        raise _invalid(f"{where} has an invalid mediaType")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where} has an invalid size")
    if not isinstance(digest, str):
        raise _invalid(f"{where} has no digest")
    try:
        Digest.parse(digest)
    except RegistryError as error:
        raise _invalid(f"{where} has an invalid digest", {"digest": digest}) from error
    return value


def parse_manifest(
    content: bytes, content_type: str | None, reference_digest: str | None
) -> ParsedManifest:
    """Validate a pushed manifest; the digest is of the exact bytes received."""
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError) as error:
        raise _invalid("manifest is not valid JSON") from error
    if not isinstance(body, dict) or body.get("schemaVersion") != 2:
        raise _invalid("unsupported manifest: schemaVersion must be 2")
    declared = body.get("mediaType")
    content_type = (content_type or "").split(";")[0].strip() or None
    if declared is not None and content_type is not None and declared != content_type:
        raise _invalid("mediaType does not match Content-Type", {"mediaType": declared})
    media_type = declared or content_type
    if media_type not in IMAGE_TYPES | INDEX_TYPES:
        raise _invalid("unsupported manifest media type", {"mediaType": media_type})
    algorithm = Digest.parse(reference_digest).algorithm if reference_digest else "sha256"
    digest = str(Digest.of_bytes(content, algorithm))
    if reference_digest is not None and reference_digest != digest:
        raise RegistryError(
            "DIGEST_INVALID",
            "manifest digest does not match its content",
            {"expected": reference_digest, "actual": digest},
        )
    parsed = ParsedManifest(media_type, digest, content)
    if media_type in IMAGE_TYPES:
        _parse_image(body, parsed)
    else:
        _parse_index(body, parsed)
    if "subject" in body:
        parsed.subject = _descriptor(body["subject"], "subject")["digest"]
    annotations = body.get("annotations")
    if annotations is not None and not isinstance(annotations, dict):
        raise _invalid("annotations must be an object")
    parsed.annotations = annotations
    return parsed


def _parse_image(body: dict[str, Any], parsed: ParsedManifest) -> None:
    config = _descriptor(body.get("config"), "config")
    layers = body.get("layers")
    if not isinstance(layers, list):
        raise _invalid("layers must be a list")
    parsed.blobs.append(config["digest"])
    for position, value in enumerate(layers):
        layer = _descriptor(value, f"layers[{position}]")
        if layer["mediaType"].startswith(NON_DISTRIBUTABLE) and layer.get("urls"):
            continue
        parsed.blobs.append(layer["digest"])
        parsed.layers.append(layer["digest"])
    artifact_type = body.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType must be a string")
    parsed.artifact_type = artifact_type or (
        config["mediaType"] if config["mediaType"] != EMPTY_CONFIG else None
    )
    if artifact_type is None and config["mediaType"] == EMPTY_CONFIG:
        raise _invalid("artifactType is required when config is the empty descriptor")


def _parse_index(body: dict[str, Any], parsed: ParsedManifest) -> None:
    manifests = body.get("manifests")
    if not isinstance(manifests, list):
        raise _invalid("manifests must be a list")
    for position, value in enumerate(manifests):
        parsed.children.append(_descriptor(value, f"manifests[{position}]")["digest"])
    artifact_type = body.get("artifactType")
    parsed.artifact_type = artifact_type if isinstance(artifact_type, str) else None


def manifest_key(digest: str) -> str:
    return digest_key("manifests", digest)


def revision_key(repo: str, digest: str) -> str:
    return digest_key(f"repositories/{repo}/_manifests/revisions", digest)


def tag_key(repo: str, tag: str) -> str:
    return f"repositories/{repo}/_manifests/tags/{tag}"


def check_tag(tag: str) -> None:
    if not TAG_PATTERN.match(tag):
        raise RegistryError("TAG_INVALID", "invalid tag", {"tag": tag})


def is_digest_reference(reference: str) -> bool:
    return ":" in reference


class ManifestStore:
    def __init__(self, store: ObjectStore, index: Index, blobs: BlobStore) -> None:
        self.store = store
        self.index = index
        self.blobs = blobs

    def put(
        self, repo: str, reference: str, content: bytes, content_type: str | None
    ) -> ParsedManifest:
        by_digest = is_digest_reference(reference)
        if not by_digest:
            check_tag(reference)
        parsed = parse_manifest(content, content_type, reference if by_digest else None)
        self._check_references(repo, parsed)
        revision: dict[str, Any] = {
            "mediaType": parsed.media_type,
            "size": len(content),
            "subject": parsed.subject,
            "referrer": parsed.referrer_descriptor(),
        }
        for _attempt in range(CLAIM_ATTEMPTS):
            self._store_bytes(parsed)
            self.store.put_bytes(revision_key(repo, parsed.digest), json.dumps(revision).encode())
            if self._may_rely(repo, parsed):
                break
        else:
            raise RegistryError("UNAVAILABLE", "garbage collection keeps deleting the manifest")
        self.index.put_revision(repo, parsed.digest, revision)
        if parsed.subject:
            self.index.add_referrer(repo, parsed.subject, parsed.digest, revision["referrer"])
        if not by_digest:
            self.store.put_bytes(tag_key(repo, reference), parsed.digest.encode())
            self.index.set_tag(repo, reference, parsed.digest)
        return parsed

    def _store_bytes(self, parsed: ParsedManifest) -> None:
        key = manifest_key(parsed.digest)
        if self.index.manifest_bytes(parsed.digest) is None and self.store.size(key) is None:
            self.store.put_bytes(key, parsed.content)
            self.index.add_bytes(logical=len(parsed.content), stored=len(parsed.content))
        self.index.cache_manifest_bytes(parsed.digest, parsed.content)

    def _may_rely(self, repo: str, parsed: ParsedManifest) -> bool:
        """After the revision is written (what GC marks from): wait while a GC run deletes
        something it names, then check S3 still holds all of it. A blob or child gone:
        the revision is taken back and the PUT refused. Its own bytes or revision gone
        (GC took them as unnamed or untagged before it saw the revision): False, to write
        them again and check again."""
        own = [manifest_key(parsed.digest), revision_key(repo, parsed.digest)]
        named = {blob_key(digest): digest for digest in parsed.blobs}
        named |= {revision_key(repo, digest): digest for digest in parsed.children}
        condemned = self.blobs.notices.wait_until_clear(
            NOTICE_WAIT_SECONDS, parsed.blobs, [*parsed.children, parsed.digest]
        )
        found = sizes(self.store, [*own, *named]) if not condemned else {}
        missing = [digest for key, digest in named.items() if found.get(key) is None]
        if condemned or missing:
            self.store.delete([revision_key(repo, parsed.digest)])
        if condemned:
            raise RegistryError("UNAVAILABLE", f"the manifest names objects {condemned.describe()}")
        if missing:
            raise RegistryError(
                "MANIFEST_BLOB_UNKNOWN", "blob unknown to registry", {"digest": missing[0]}
            )
        return all(found.get(key) is not None for key in own)

    def _check_references(self, repo: str, parsed: ParsedManifest) -> None:
        for digest in parsed.blobs:
            if not self.index.is_layer_linked(repo, digest) or self.blobs.info(digest) is None:
                raise RegistryError(
                    "MANIFEST_BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest}
                )
        for digest in parsed.children:
            if self.index.revision(repo, digest) is None:
                raise RegistryError(
                    "MANIFEST_BLOB_UNKNOWN", "manifest unknown to registry", {"digest": digest}
                )

    def resolve(self, repo: str, reference: str) -> str:
        if is_digest_reference(reference):
            Digest.parse(reference)
            digest: str | None = reference
        else:  # a reference that could not be a tag names no manifest: 404, as for any other
            digest = self.index.tag(repo, reference) if TAG_PATTERN.match(reference) else None
        if digest is None or self.index.revision(repo, digest) is None:
            message, detail = "manifest unknown to registry", {"reference": reference}
            raise unknown("MANIFEST_UNKNOWN", message, detail, self.index.is_ready())
        return digest

    def get(self, repo: str, reference: str, accept: list[str]) -> StoredManifest:
        digest = self.resolve(repo, reference)
        revision = self.index.revision(repo, digest) or {}
        media_type = str(revision["mediaType"])
        if accept and not _accepts(accept, media_type):
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                f"manifest is {media_type}, which the Accept header excludes",
                {"reference": reference},
            )
        content = self.index.manifest_bytes(digest)
        if content is None:
            content = self.store.get_bytes(manifest_key(digest))
            self.index.cache_manifest_bytes(digest, content)
        return StoredManifest(digest, media_type, content)

    def platforms_of(self, repo: str, reference: str) -> list[str]:
        """The platforms an image offers ("os/arch[/variant]"): an index's children's,
        or a single image's own, from its config (none when the config does not say)."""
        manifest = self.get(repo, reference, [])
        children = manifest.platforms()
        if manifest.media_type not in IMAGE_TYPES:
            return [platform for _digest, platform in children]
        config = json.loads(manifest.content).get("config") or {}
        return [platform] if (platform := self._config_platform(str(config.get("digest")))) else []

    def _config_platform(self, digest: str) -> str:
        info = self.blobs.info(digest)
        if info is None or info.deduplicated or info.size > 1 << 20:
            return ""
        try:
            config = json.loads(b"".join(self.blobs.read(info)))
        except ValueError:
            return ""
        if not isinstance(config, dict) or not config.get("os"):
            return ""
        parts = [str(config["os"]), str(config.get("architecture", ""))]
        return "/".join(parts + ([str(config["variant"])] if config.get("variant") else []))

    def check_platforms(self, repo: str, reference: str, wanted: list[str]) -> None:
        """Refuse platforms the image does not offer, naming those it does."""
        offered = self.platforms_of(repo, reference)
        missing = [platform for platform in wanted if platform not in offered]
        if wanted and missing:
            has = ", ".join(offered) or "none named"
            raise RegistryError(
                "PLATFORM_UNKNOWN",
                f"{repo}:{reference} has no platform {', '.join(missing)}; it has: {has}",
                {"missing": missing, "platforms": offered},
                status=404,
            )

    def forget_revision(self, repo: str, digest: str) -> None:
        """The index entries of a revision that garbage collection deleted (untagged)."""
        revision = self.index.revision(repo, digest) or {}
        if revision.get("subject"):
            self.index.drop_referrer(repo, revision["subject"], digest)
        self.index.drop_revision(repo, digest)

    def delete(self, repo: str, reference: str) -> None:
        if not is_digest_reference(reference):
            self.resolve(repo, reference)
            self.store.delete([tag_key(repo, reference)])
            self.index.drop_tag(repo, reference)
            return
        digest = self.resolve(repo, reference)
        revision = self.index.revision(repo, digest) or {}
        stale_tags = [tag for tag, target in self.index.tags(repo).items() if target == digest]
        self.store.delete([tag_key(repo, tag) for tag in stale_tags] + [revision_key(repo, digest)])
        for tag in stale_tags:
            self.index.drop_tag(repo, tag)
        if revision.get("subject"):
            self.index.drop_referrer(repo, revision["subject"], digest)
        self.index.drop_revision(repo, digest)

    def delete_repository(self, repo: str) -> int:
        """Drop every tag, manifest and blob link of a repository (the bytes are freed by
        garbage collection); how many objects were dropped."""
        if not self.index.repository_exists(repo):
            raise RegistryError(
                "NAME_UNKNOWN", "repository name not known to registry", {"name": repo}
            )
        keys = [key for key, _size in self.store.list(f"repositories/{repo}/_")]
        self.store.delete(keys)
        self.index.drop_repository(repo)
        return len(keys)

    def tag_times(self, repo: str) -> dict[str, float]:
        """Each tag of a repository and when it was last pushed (its object's time)."""
        prefix = f"repositories/{repo}/_manifests/tags/"
        return {
            listed.key.removeprefix(prefix): listed.modified
            for listed in self.store.listing(prefix)
        }

    def tags(self, repo: str) -> list[str]:
        if not self.index.is_ready():  # a partial index would give a partial list
            raise IndexIncomplete({"name": repo})
        if not self.index.repository_exists(repo):
            message, detail = "repository name not known to registry", {"name": repo}
            raise unknown("NAME_UNKNOWN", message, detail, self.index.is_ready())
        return sorted(self.index.tags(repo))

    def referrers(self, repo: str, subject: str, artifact_type: str | None) -> list[dict[str, Any]]:
        Digest.parse(subject)
        found = self.index.referrers(repo, subject)
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
        return sorted(found, key=lambda descriptor: str(descriptor["digest"]))


def _accepts(accept: list[str], media_type: str) -> bool:
    for item in accept:
        value = item.split(";")[0].strip()
        if value in ("*/*", media_type, "application/*", "application/json"):
            return True
    return False
