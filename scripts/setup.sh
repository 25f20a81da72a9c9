#!/usr/bin/env bash
# Create .venv and install Squall into it.
#   --runtime  also the tools that run workflows on this machine: crun/bubblewrap, skopeo,
#              umoci, squashfs-tools (SIF images), the default seccomp profile, nftables and
#              iproute2 (jobs' confinement and network), and (for the demo's local images)
#              docker-registry, busybox-static and mmdebstrap (the MPI image)
#   --test     the runtime tools, PostgreSQL, openssl, siftool (SIF), what builds and boots the
#              node image (QEMU, OVMF, qemu-img, dosfstools, mtools, fdisk), and the test and
#              lint tools
# Installs what is missing from Debian when we are root.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
runtime=""
case "${1:-}" in
  --test) extras="[test]"; runtime=1 ;;
  --runtime) runtime=1 ;;
  "") ;;
  *) echo "usage: $0 [--runtime | --test]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}

need_apt() {
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing $* from Debian" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "setup: please install $* (Python 3.11 or newer with venv support)" >&2
    exit 1
  fi
}

command -v "$python" >/dev/null || need_apt python3 python3-venv
if [[ -n "$runtime" ]]; then
  # container tools, a registry and an image to build from, and the share separate local
  # nodes mount their volumes from (GlusterFS over FUSE); the tests add PostgreSQL
  missing=()
  for pair in bwrap:bubblewrap crun:crun skopeo:skopeo umoci:umoci docker-registry:docker-registry \
              busybox:busybox-static taskset:util-linux nsenter:util-linux nft:nftables \
              ip:iproute2 unsquashfs:squashfs-tools mmdebstrap:mmdebstrap \
              glusterd:glusterfs-server fusermount3:fuse3; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  # the seccomp profile Podman and CRI-O use, which job containers run under
  [[ -f /usr/share/containers/seccomp.json ]] || missing+=(golang-github-containers-common)
  if [[ -n "$extras" ]]; then
    command -v openssl >/dev/null || missing+=(openssl)
    command -v siftool >/dev/null || missing+=(siftool)  # the SIF maintainers' own reader
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    # the node image: its disk (qemu-img, mkfs.vfat, mtools, sfdisk) and its boot (QEMU, OVMF)
    for pair in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils mkfs.vfat:dosfstools \
                mcopy:mtools sfdisk:fdisk; do
      command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    [[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ]] || missing+=(ovmf)
  fi
  [[ ${#missing[@]} -eq 0 ]] || need_apt "${missing[@]}"
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "setup: Squall needs Python 3.11 or newer ($python is older)" >&2; exit 1; }
"$python" -c 'import ensurepip, venv' 2>/dev/null || need_apt python3-venv

if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
# Reinstall only when the dependencies or the extras changed.
stamp=".venv/.squall-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)$extras"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # setuptools warns, at length, that top-level folders share names with our packages:
  # they are our packages, so the warning is silenced for the install only
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".$extras"
  echo "$want" > "$stamp"
fi
