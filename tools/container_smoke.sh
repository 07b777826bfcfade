#!/usr/bin/env bash
# Builds the project's Dockerfile with podman and checks the image end to end: /readyz, a caption over
# HTTP (its X-Request-ID echoed and its JSON access line in the container log), exit status 0 on SIGTERM.
# `make docker-smoke` runs it; .ci/run too, when it is root.
#
# Usage (root, Debian bookworm): tools/container_smoke.sh [CONTEXT_DIR=.] [JPEG]
# Env: IMAGE (tag, default localhost/captioner:ci), PORT (18080), WORK (scratch dir), KEEP=1 keeps the
#      image, NEED_GB (free disk the build needs, default 25; exit 3 below it, or exit 0 with a warning
#      when LOW_DISK=skip), PODMAN_RUNTIME (OCI runtime; default runc where /sys/fs/cgroup is not pure
#      cgroup v2).
#
# Adapted from ../shared/tools/container_smoke.sh (see ../shared/ENVIRONMENT.md). What differs from a
# real Docker build, and why:
# - no Docker engine and no Docker Hub here: the base image is a stand-in for python:3.11-slim-bookworm
#   made with debootstrap from the machine's Debian mirror (Debian's Python 3.11.2), passed as
#   --build-arg PYTHON_IMAGE, and built once per machine;
# - torch comes from the machine's PyPI index (--build-arg TORCH_INDEX_URL), which serves only the CUDA
#   build of torch 2.14.1, so this image is ~6 GB where a CPU-wheel build is far smaller;
# - the host's CA bundle is mounted during the build only (the package mirror uses a private CA);
# - podman cannot raise rlimits here, so its default ulimits are kept under the hard caps;
# - crun 1.8 (podman's runtime in /etc/containers/libpod.conf) refuses a hybrid cgroup v1/v2 hierarchy
#   ("cgroups in hybrid mode not supported"): runc is installed and used there instead;
# - --no-cache: this buildah cannot bind-mount a cached stage (RUN --mount=from=...) once the image
#   built on it is removed, so a cached rebuild fails with '*.whl is not a valid wheel'.
set -euo pipefail
CTX=$(cd "${1:-.}" && pwd); JPEG=${2:-}; WORK=${WORK:-$(mktemp -d)}; PORT=${PORT:-18080}
IMAGE=${IMAGE:-localhost/captioner:ci}; BASE=localhost/python:3.11-slim-bookworm
[ "$(id -u)" = 0 ] || { echo "container_smoke.sh: run as root (it installs podman and builds a base image)"; exit 2; }
if [ -z "${PODMAN_RUNTIME:-}" ]; then
  if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then PODMAN_RUNTIME=crun; else PODMAN_RUNTIME=runc; fi
fi
command -v podman >/dev/null && command -v debootstrap >/dev/null && command -v "$PODMAN_RUNTIME" >/dev/null || \
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman debootstrap "$PODMAN_RUNTIME" >/dev/null; }
RUNTIME=$(command -v "$PODMAN_RUNTIME")
pm() { podman --runtime "$RUNTIME" "$@"; }
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(grep -hoP '^(URIs:\s*|deb\s+)\K\S+' /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null | head -1 || true)}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || python3 -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')}
printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n[engine]\nruntime = "%s"\n' \
  "$(ulimit -Hn)" "$(ulimit -Hn)" "$PODMAN_RUNTIME" > "$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf
if ! podman image exists "$BASE"; then
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log"
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar --numeric-owner -C "$WORK/rootfs" -c . | podman import --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["python3"]' - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
fi
# Leftovers of an earlier run that failed mid-build (dangling stages, GBs) go first. Then the build
# needs NEED_GB free where podman keeps its images and temporary files: measured 22.3 GB at the peak
# for the 6.2 GB image with the index's CUDA torch, because committing the venv's step holds the
# container's copy, its diff as a tar in /var/tmp, a second temporary copy and the stored layer at
# once. Below that it says so (exit 3; LOW_DISK=skip: a warning and exit 0) instead of failing
# halfway with 'no space left on device'.
podman image prune -f >/dev/null 2>&1 || true
GRAPHROOT=$(podman info --format '{{.Store.GraphRoot}}'); mkdir -p "$GRAPHROOT"
free_gb=$(df --output=avail -k "$GRAPHROOT" /var/tmp | tail -n +2 | sort -n | head -1); free_gb=$(( free_gb / 1048576 ))
if [ "$free_gb" -lt "${NEED_GB:=25}" ]; then
  echo "container_smoke.sh: $free_gb GB free under $GRAPHROOT or /var/tmp; the build needs $NEED_GB GB (NEED_GB)"
  [ "${LOW_DISK:-fail}" = skip ] && { echo "warning: container smoke test skipped (LOW_DISK=skip)"; exit 0; }
  exit 3
fi
CID=
cleanup() {
  [ -z "$CID" ] || pm rm -f "$CID" >/dev/null 2>&1 || true
  # The multi-stage build leaves its intermediate stages as dangling images: pruned unless KEEP=1.
  [ "${KEEP:-0}" = 1 ] || { podman rmi -f "$IMAGE"; podman image prune -f; } >/dev/null 2>&1 || true
}
trap cleanup EXIT
start=$(date +%s)
pm build -q --no-cache --runtime "$RUNTIME" --format docker \
  -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
  --build-arg PYTHON_IMAGE="$BASE" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" -t "$IMAGE" "$CTX" >"$WORK/build.log" 2>&1 \
  || { tail -20 "$WORK/build.log"; echo "podman build failed"; exit 1; }
echo "build: $(( $(date +%s) - start )) s, image size: $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes"
if [ -z "$JPEG" ]; then JPEG=$WORK/smoke.jpg; pm run --rm "$IMAGE" python -c "import io,sys; from PIL import Image; \
b=io.BytesIO(); Image.new('RGB',(224,224),(90,140,200)).save(b,'JPEG'); sys.stdout.buffer.write(b.getvalue())" >"$JPEG"; fi
CID=$(pm run -d -p "127.0.0.1:$PORT:8000" "$IMAGE")
for _ in $(seq 180); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null || { pm logs "$CID" | tail -20; echo "container never became ready"; exit 1; }
RID=smoke-$$-$(date +%s)
curl -sf -D "$WORK/headers.txt" -H "X-Request-ID: $RID" -F "image=@$JPEG;type=image/jpeg" \
  "http://127.0.0.1:$PORT/v1/captions?attention=none" -o "$WORK/caption.json" || { echo "caption request failed"; exit 1; }
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["caption"].strip(), d; print("caption:", d["caption"])' "$WORK/caption.json"
grep -qi "^x-request-id: $RID" "$WORK/headers.txt" || { echo "X-Request-ID not echoed"; exit 1; }
sleep 1
pm logs "$CID" >"$WORK/container.log" 2>&1
python3 - "$WORK/container.log" "$RID" <<'EOF' || exit 1
import json, sys
lines = open(sys.argv[1]).read().splitlines()
access = [json.loads(l) for l in lines if l.startswith("{") and f'"request_id": "{sys.argv[2]}"' in l]
assert len(access) == 1 and access[0]["path"] == "/v1/captions" and access[0]["status"] == 200, access or lines[-5:]
print("access log:", json.dumps({k: access[0][k] for k in ("request_id", "status", "duration_ms", "model", "batch_size")}))
noisy = [l for l in lines if not l.startswith("{") or json.loads(l)["level"] not in ("info", "debug")]
print("\n".join(["warnings/errors in the container log:"] + noisy) if noisy else "container log: no warnings")
EOF
pm stop -t 40 "$CID" >/dev/null
code=$(podman inspect "$CID" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] && echo "container smoke test passed: ready, captioned, clean exit on SIGTERM" || { echo "exit code $code after SIGTERM"; exit 1; }
