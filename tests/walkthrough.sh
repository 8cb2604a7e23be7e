#!/usr/bin/env bash
# The README's walk-through as a script: publish an image with curl and jq, then read it back
# as an anonymous consumer and check that every download is byte-identical.
#
#   IMGSRV=http://127.0.0.1:8080 TOKEN=imgsrv_at_... tests/walkthrough.sh disk.qcow2 incus.tar.xz
#
# TOKEN needs the content-writer role. IMAGE and VERSION may be set to publish something other
# than debian-bookworm 12.5.0. The test suite runs this against a real server
# (tests/walkthrough.rs).
set -euo pipefail

: "${IMGSRV:?set IMGSRV to the server URL, e.g. http://127.0.0.1:8080}"
: "${TOKEN:?set TOKEN to a content-writer API token}"
DISK_FILE=${1:?usage: walkthrough.sh DISK.qcow2 INCUS.tar.xz}
META_FILE=${2:?usage: walkthrough.sh DISK.qcow2 INCUS.tar.xz}
IMAGE=${IMAGE:-debian-bookworm}
VERSION=${VERSION:-12.5.0}
AUTH="Authorization: Bearer $TOKEN"

# api CURL-ARGS...: one API call; an HTTP error prints the server's problem document (status
# and detail) and fails, which stops the script (set -e).
api() {
  local out
  out=$(curl -sS --fail-with-body "$@") || { echo "imgsrv: $out" >&2; return 1; }
  printf '%s\n' "$out"
}

# upload FILE: begin a session, send the file as part 1, complete; prints the blob digest.
# A blob the server already has is not sent again (begin answers state "ready").
# Large files may be sent as up to 10000 parts of at most 5 GiB each, in any order.
upload() {
  local file=$1 digest size session id etag
  digest="sha256:$(sha256sum "$file" | cut -d' ' -f1)"
  size=$(stat -c %s "$file")
  session=$(api -H "$AUTH" \
              -d "{\"expected_digest\":\"$digest\",\"expected_size_bytes\":$size}" \
              "$IMGSRV/v1/uploads")
  if [ "$(jq -r .state <<<"$session")" != ready ]; then
    id=$(jq -r .id <<<"$session")
    etag=$(api -H "$AUTH" -X PUT --data-binary @"$file" \
             "$IMGSRV/v1/uploads/$id/parts/1" | jq .etag)
    api -H "$AUTH" \
      -d "{\"parts\":[{\"number\":1,\"etag\":$etag,\"size_bytes\":$size}]}" \
      "$IMGSRV/v1/uploads/$id/complete" | jq -e '.state == "ready"' >/dev/null
  fi
  echo "$digest"
}

echo "== Publish =="

echo "-- upload the disk and the Incus metadata"
DISK=$(upload "$DISK_FILE")
META=$(upload "$META_FILE")
echo "disk $DISK"
echo "metadata $META"

echo "-- create the image and a draft version"
api -H "$AUTH" -d "{\"name\":\"$IMAGE\",\"display_name\":\"Debian 12\"}" \
  "$IMGSRV/v1/images" | jq -c '{id, name}'
api -H "$AUTH" -d "{\"version\":\"$VERSION\"}" \
  "$IMGSRV/v1/images/$IMAGE/versions" | jq -c '{id, version, state}'
V=$IMGSRV/v1/images/$IMAGE/versions/$VERSION

echo "-- add the disk as a qcow2 artifact"
A=$(api -H "$AUTH" \
      -d "{\"operating_system\":\"debian\",\"architecture\":\"x86_64\",\"format\":\"qcow2\",
           \"primary_blob_digest\":\"$DISK\",\"primary_blob_size_bytes\":$(stat -c %s "$DISK_FILE"),
           \"primary_media_type\":\"application/x-qemu-disk\"}" \
      "$V/artifacts" | jq -r .id)
echo "artifact $A"

echo "-- attach incus.tar.xz to it"
T=$(api -H "$AUTH" \
      -d "{\"name\":\"incus.tar.xz\",\"media_type\":\"application/x-xz\",
           \"blob_digest\":\"$META\",\"blob_size_bytes\":$(stat -c %s "$META_FILE")}" \
      "$V/artifacts/$A/attachments" | jq -r .id)
echo "attachment $T"

echo "-- publish, and wait for the publish job"
JOB=$(api -H "$AUTH" -X POST "$V/publish" | jq -r .id)
for _ in $(seq 1 120); do
  STATE=$(api -H "$AUTH" "$IMGSRV/v1/publish-jobs/$JOB" | jq -r .state)
  echo "job $JOB: $STATE"
  case $STATE in
    succeeded) break ;;
    failed) api -H "$AUTH" "$IMGSRV/v1/publish-jobs/$JOB" | jq . >&2; exit 1 ;;
  esac
  sleep 1
done
[ "$STATE" = succeeded ]

echo "-- point the alias latest at it"
api -H "$AUTH" -X PUT -d "{\"version\":\"$VERSION\"}" \
  "$IMGSRV/v1/images/$IMAGE/aliases/latest" | jq -c '{alias, version}'

echo "== Consume (anonymous) =="
WORK=$(mktemp -d)   # scratch directory for the downloads
trap 'rm -rf "$WORK"' EXIT

echo "-- list images and published versions"
api "$IMGSRV/v1/images" | jq -e --arg i "$IMAGE" 'any(.images[]; .name == $i)' >/dev/null
api "$IMGSRV/v1/images/$IMAGE/versions" | jq -r '.versions[].version'

echo "-- read the manifest; its artifacts carry a stable artifact_id"
api "$V" > "$WORK/manifest.json"
jq '.artifacts[] | {artifact_id: .artifact.id, format: .artifact.format,
                    digest: .artifact.primary_blob_digest,
                    attachments: [.attachments[].name]}' "$WORK/manifest.json"
ARTIFACT_ID=$(jq -r '.artifacts[0].artifact.id' "$WORK/manifest.json")
ATTACHMENT_ID=$(jq -r '.artifacts[0].attachments[0].id' "$WORK/manifest.json")
[ "$(jq -r '.version.state' "$WORK/manifest.json")" = published ]
[ "$(jq -r '.artifacts[0].artifact.primary_blob_digest' "$WORK/manifest.json")" = "$DISK" ]

echo "-- download the disk by artifact id, and by its file-name route"
curl -sS --fail-with-body -o "$WORK/by-id.qcow2" "$V/artifacts/$ARTIFACT_ID/download"
curl -sS --fail-with-body -o "$WORK/disk.qcow2" "$V/artifacts/$ARTIFACT_ID/download/disk.qcow2"
sha256sum "$WORK/by-id.qcow2"
[ "sha256:$(sha256sum "$WORK/by-id.qcow2" | cut -d' ' -f1)" = "$DISK" ]
cmp "$DISK_FILE" "$WORK/by-id.qcow2"
cmp "$DISK_FILE" "$WORK/disk.qcow2"

echo "-- download incus.tar.xz by its file-name route"
curl -sS --fail-with-body -o "$WORK/incus.tar.xz" \
  "$V/artifacts/$ARTIFACT_ID/attachments/$ATTACHMENT_ID/download/incus.tar.xz"
cmp "$META_FILE" "$WORK/incus.tar.xz"

echo "-- resolve the alias latest, and download through refs/latest"
LATEST=$(api "$IMGSRV/v1/images/$IMAGE/aliases/latest" | jq -r .version)
echo "latest -> $LATEST"
[ "$LATEST" = "$VERSION" ]
api "$IMGSRV/v1/images/$IMAGE/refs/latest" > "$WORK/latest.json"
REF_VERSION=$(jq -r '.version.version' "$WORK/latest.json")
REF_ARTIFACT=$(jq -r '.artifacts[0].artifact.id' "$WORK/latest.json")
curl -sS --fail-with-body -o "$WORK/latest.qcow2" \
  "$IMGSRV/v1/images/$IMAGE/versions/$REF_VERSION/artifacts/$REF_ARTIFACT/download/disk.qcow2"
cmp "$DISK_FILE" "$WORK/latest.qcow2"

echo "-- fetch the API contract"
curl -sS --fail-with-body -o "$WORK/v1.yaml" "$IMGSRV/openapi/v1.yaml"
grep -q '^openapi: ' "$WORK/v1.yaml"

echo "walk-through OK: every download is byte-identical"
