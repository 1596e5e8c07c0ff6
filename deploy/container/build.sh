#!/usr/bin/env bash
# Builds mesh-proxy's image with podman, runs it, and checks it: `/ready` answers 200 on the
# admin port, the image's HEALTHCHECK passes, SIGTERM stops it with status 0, and the image
# is under 20 MB.
#
#   deploy/container/build.sh [TAG]     (default: localhost/mesh-proxy:dev)
#
# Needs cargo, podman and runc (installed from Debian's packages when missing and apt-get is
# there). This kind of machine runs containers as root without the privilege to raise
# rlimits, so the container's limits are set to what the host allows (podman's defaults ask
# for more and the runtime refuses), and runc is the runtime (crun refuses a hybrid cgroup
# setup). Nothing is pulled from a registry: the image is FROM scratch.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag="${1:-localhost/mesh-proxy:dev}"
max_bytes=$((20 * 1000 * 1000))

if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  command -v apt-get >/dev/null || { echo "build.sh: podman and runc are needed" >&2; exit 1; }
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends podman runc uidmap >/dev/null
fi

cargo build --release --locked -p mesh-proxy
bin=target/release/mesh-proxy
ctx=target/image
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/mesh" "$ctx/rootfs/tmp"
cp deploy/container/Containerfile "$ctx/"
strip -o "$ctx/rootfs/usr/local/bin/mesh-proxy" "$bin"
# The shared libraries the binary needs, at the paths the loader looks for them.
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
chmod 1777 "$ctx/rootfs/tmp"

podman build --format docker --runtime runc -t "$tag" "$ctx"
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "image $tag: $size bytes"
[ "$size" -lt "$max_bytes" ] || { echo "build.sh: the image is over 20 MB" >&2; exit 1; }

limits=(--ulimit "nofile=$(ulimit -n):$(ulimit -Hn)" --ulimit "nproc=1024:1024")
name="mesh-proxy-check-$$"
admin_port=$((20000 + RANDOM % 20000))
cleanup() { podman rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
# The image's own command (listeners on 0.0.0.0 in the container's network namespace), with
# the admin port published on the host's loopback. The "systemd connection" errors podman
# logs are its health-check timer, which needs systemd; `podman healthcheck run` below runs
# the image's HEALTHCHECK directly.
podman --runtime runc run -d --name "$name" "${limits[@]}" -p "127.0.0.1:$admin_port:15000" "$tag" >/dev/null
for _ in $(seq 1 50); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$admin_port/ready"; then break; fi
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$admin_port/ready" >/dev/null
echo "/ready: 200"
podman --runtime runc healthcheck run "$name"
echo "the image's HEALTHCHECK: healthy"
user=$(podman inspect --format '{{.Config.User}}' "$name")
[ "$user" = "65532:65532" ] || { echo "build.sh: the image runs as '$user', not 65532" >&2; exit 1; }
start=$(date +%s%N)
podman --runtime runc stop -t 10 "$name" >/dev/null
status=$(podman inspect --format '{{.State.ExitCode}}' "$name")
took=$(( ($(date +%s%N) - start) / 1000000 ))
echo "SIGTERM: exit status $status after $took ms"
[ "$status" = 0 ] || { echo "build.sh: the proxy did not exit 0 on SIGTERM" >&2; exit 1; }
[ "$took" -lt 9000 ] || { echo "build.sh: SIGTERM did not stop the proxy (podman killed it)" >&2; exit 1; }
echo "build.sh: image $tag ok"
