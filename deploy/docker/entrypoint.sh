#!/bin/sh
# The images' entry point: `entrypoint.sh serve [flags]` runs `python -m lmserve serve [flags]`.
#
# The root filesystem may be read-only, so LMSERVE_CACHE_DIR is a volume (emptyDir or PVC), which starts
# empty. The C kernels baked into the image (BAKED_CACHE_DIR/kernels/*.so) are linked into it first:
# the server finds them there under the same names and builds nothing. Only the libraries are linked;
# the server writes its lock files and any other cache entry into the volume itself.
set -eu

baked_kernels="${BAKED_CACHE_DIR:-/opt/lmserve/cache}/kernels"
cache_dir="${LMSERVE_CACHE_DIR:?LMSERVE_CACHE_DIR must name the writable cache volume}"

if [ -d "$baked_kernels" ] && [ "$baked_kernels" != "$cache_dir/kernels" ]; then
    mkdir -p "$cache_dir/kernels"
    for lib in "$baked_kernels"/*.so; do
        [ -e "$lib" ] || continue
        target="$cache_dir/kernels/$(basename "$lib")"
        [ -e "$target" ] || ln -s "$lib" "$target"
    done
fi

exec python -m lmserve "$@"
