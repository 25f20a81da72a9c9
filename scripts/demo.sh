#!/usr/bin/env bash
# Set up Squall and run real workflows on this machine (the local site): agents as child
# processes, jobs in crun containers. This machine may not reach Docker Hub, so the images
# (busybox:1.36 from Debian's busybox-static, squall/mpi:trixie from Debian's MPI packages)
# are built here and served by a registry on 127.0.0.1 for the length of the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --runtime

registry_dir=$(mktemp -d)
trap '.venv/bin/python scripts/local_registry.py stop "$registry_dir"; rm -rf "$registry_dir"' EXIT
# --mpi: also Debian's Open MPI and MPICH as squall/mpi:trixie (built once, then cached)
registry=$(.venv/bin/python scripts/local_registry.py start "$registry_dir" --mpi)
export SQUALL_SEARCH_REGISTRIES=$registry SQUALL_INSECURE_REGISTRIES=$registry

set -x
.venv/bin/squall workflow validate examples/*.yaml
.venv/bin/squall run examples/hello.yaml
.venv/bin/squall run examples/array.yaml --oversubscribe 4   # 200 tasks, 4 a core at once
.venv/bin/squall run examples/mpi.yaml --nodes 4   # MPI across 4 nodes (network namespaces)
.venv/bin/squall workflow list
