"""``python -m dgc.layers.native --check``: build the native library from its sources with
every warning an error (``-Wall -Wextra -Werror``), load it and check its ABI against
``dgc_native.h``; exit 1 on any failure. CI runs it; a user may run it to see why the torch
kernels run instead (``DGC_NATIVE_DIR`` chooses where the build goes, ``CC`` the compiler)."""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys
import tempfile
import time
from pathlib import Path

from dgc.layers.native import build

log = logging.getLogger("dgc.layers.native")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dgc.layers.native", description=__doc__)
    ap.add_argument("--check", action="store_true", help="strict build and ABI check")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.check:
        ap.print_help()
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            path = build.build(strict=True, directory=Path(tmp))
        except RuntimeError as err:
            log.error("native build failed: %s", err)
            return 1
        seconds = time.perf_counter() - start
        lib = build.load(path)
        if lib is None:
            mismatch = build.abi_mismatch(ctypes.CDLL(str(path)))
            log.error("native ABI mismatch: %s", mismatch)
            return 1
    names = ", ".join(build.ABI.functions)
    flags = " ".join(build.FLAGS + build.STRICT_FLAGS)
    log.info("native library built with %s in %.1f s; ABI %s: %s", flags, seconds,
             build.ABI.version, names)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
