"""The C kernels' cache: the build announces itself, a build's users are recorded, unused builds are found."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from lmserve.engine.modeling import kernel_cache, kernel_loader
from lmserve.progress import PROGRESS_LOGGER


def test_a_build_writes_one_progress_line_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    target = tmp_path / "kernels" / "lmserve-kernels-test.so"
    target.parent.mkdir()
    with pytest.raises(subprocess.CalledProcessError):  # a "compiler" that fails at once: the line comes first
        kernel_loader._build(kernel_cache.sources(kernel_cache.SOURCE_DIR)[0], target, "false")
    (line,) = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert line.startswith(f"building the C kernels with false into {target.parent} (once per machine")
    assert not target.exists()


def test_builds_are_used_while_a_checkout_with_their_sources_exists(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for source in (*kernel_cache.sources(kernel_cache.SOURCE_DIR)[0], *kernel_cache.sources(kernel_cache.SOURCE_DIR)[1]):
        (checkout / source.name).write_bytes(source.read_bytes() + (b"\n/* edited */\n" if source.suffix == ".c" else b""))
    cache = tmp_path / "cache"
    key = kernel_cache.kernel_key(checkout)
    assert key != kernel_cache.kernel_key(kernel_cache.SOURCE_DIR)  # sources differ, so does the key
    library = kernel_cache.library_path(cache, key)
    library.parent.mkdir(parents=True)
    library.write_bytes(b"\x7fELF")
    kernel_cache.remember_user(library, checkout)
    kernel_cache.remember_user(library, checkout)  # recorded once
    assert kernel_cache.read_users(library) == [str(checkout)]
    (build,) = kernel_cache.kernel_builds(cache)
    assert (build.key, build.is_used, build.size_bytes) == (key, True, 4)
    (checkout / sorted(p.name for p in checkout.glob("*.c"))[0]).write_text("/* changed again */")
    assert [b.is_used for b in kernel_cache.kernel_builds(cache)] == [False]


def test_every_variant_of_this_checkout_is_used_and_old_names_are_listed(tmp_path: Path) -> None:
    """Every variant's build (a sanitized one too) counts as used; builds under the library's old names
    (paged_attention-{key}.so, lmserve-kernels-{key}.so) are listed, unused, so that `lmserve cache prune`
    removes them."""
    folder = tmp_path / kernel_cache.KERNELS_DIR
    folder.mkdir()
    variants = ("avx2", "avx512-bf16-asan", "native")
    current = {v: kernel_cache.library_path(tmp_path, kernel_cache.kernel_key(kernel_cache.SOURCE_DIR, v), v) for v in variants}
    legacy = (folder / "paged_attention-0123456789abcdef.so", folder / "lmserve-kernels-fedcba9876543210.so")
    for library in (*current.values(), *legacy):
        library.write_bytes(b"\x7fELF")
    assert current["avx2"].name.startswith("lmserve-kernels-avx2-")
    builds = {b.path.name: (b.key, b.is_used) for b in kernel_cache.kernel_builds(tmp_path)}
    assert builds == {
        **{p.name: (kernel_cache.kernel_key(kernel_cache.SOURCE_DIR, v), True) for v, p in current.items()},
        legacy[0].name: ("0123456789abcdef", False),
        legacy[1].name: ("fedcba9876543210", False),
    }
