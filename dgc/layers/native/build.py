"""Building and loading the native kernel library, against the ABI its header declares.

The C sources ship with the package and are compiled once per machine with the system C
compiler (``$CC``, else ``cc``; ``FLAGS``, else ``PORTABLE_FLAGS``) into ``$DGC_NATIVE_DIR``
(default ``~/.cache/dgc-search``), then loaded with ctypes. The library's name carries a hash of
the sources, the flags and the CPU's feature flags, so an edited source or a different CPU (a
shared home directory across a cluster) gets its own build; it is written to a temporary name
and renamed into place, so concurrent Ray workers never load a half-written file. Compiler
warnings are logged.

``dgc_native.h`` is the ABI's one declaration: the ctypes signatures of its functions and the
layout of its structs are read from it (``parse_header``), and a loaded library must report the
header's ``DGC_ABI_VERSION`` and the struct sizes ctypes computes, or it is rebuilt once (else
the torch kernels run, with one warning).

Nothing depends on the library: where there is no compiler, the build fails or ``DGC_NATIVE=0``
is set, ``library()`` returns None (the reason is logged once) and the layers keep their torch
kernels. OpenMP comes from the ``libgomp.so.1`` that PyTorch has already loaded (same soname),
so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
HEADER = HERE / "dgc_native.h"
#: the library's sources, by concern (docs/internals.md)
SOURCES = tuple(
    HERE / name
    for name in (
        "common.c", "gather.c", "forward.c", "wgrad.c", "igrad.c", "fused_eval.c", "bn.c",
        "pool.c",
    )
)  # fmt: skip
HEADERS = (HEADER, HERE / "common.h", HERE / "tile.h")
COMMON_FLAGS = ("-pthread", "-shared", "-fPIC", "-std=gnu99", "-fvisibility=hidden", "-Wall")
FLAGS = ("-O3", "-march=native", "-funroll-loops", "-fopenmp", *COMMON_FLAGS)
# Where those fail (a compiler without OpenMP or -march=native, e.g. Apple clang): one thread,
# generic vector code. The pragmas are then ignored (and so are the warnings that says).
PORTABLE_FLAGS = (
    "-O3", "-funroll-loops", *COMMON_FLAGS, "-Wno-unknown-pragmas", "-Wno-unused-parameter",
    "-Wno-psabi",
)  # fmt: skip
#: what CI adds to both flag sets: the sources must compile without a warning
STRICT_FLAGS = ("-Wextra", "-Werror")
BUILD_TIMEOUT_S = 300
_log = logging.getLogger(__name__)

_SCALARS = {
    "int": ctypes.c_int,
    "int32_t": ctypes.c_int32,
    "int64_t": ctypes.c_int64,
    "float": ctypes.c_float,
    "size_t": ctypes.c_size_t,
}


@dataclass(frozen=True)
class Abi:
    """What ``dgc_native.h`` declares: its version, its structs (ctypes classes) and each
    function's (restype, argtypes)."""

    version: int
    structs: dict[str, type[ctypes.Structure]]
    functions: dict[str, tuple[object, list[object]]]


def parse_header(text: str) -> Abi:
    """The ABI of a header written in ``dgc_native.h``'s forms (see its opening comment)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)  # comments
    version = int(_find(r"#define\s+DGC_ABI_VERSION\s+(\d+)", text, "DGC_ABI_VERSION"))
    text = re.sub(r"^\s*#.*$", "", text, flags=re.M)  # preprocessor lines
    structs: dict[str, type[ctypes.Structure]] = {}
    for body, name in re.findall(r"typedef\s+struct\s*\{(.*?)\}\s*(\w+)\s*;", text, re.S):
        fields = [_field(decl) for decl in body.split(";") if decl.strip()]
        structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
    functions = {}
    for ret, name, params in re.findall(r"DGC_API\s+([\w\s]+?\**)\s*(\w+)\s*\(([^)]*)\)\s*;", text):
        args = [] if params.strip() in ("", "void") else params.split(",")
        functions[name] = (_ctype(ret, structs), [_ctype(_param_type(a), structs) for a in args])
    return Abi(version, structs, functions)


def _field(decl: str) -> tuple[str, object]:
    decl = " ".join(decl.split())
    name = _find(r"(\w+)$", decl, "a field name")
    return name, _ctype(decl[: -len(name)], {})


def _find(pattern: str, text: str, what: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise ValueError(f"dgc_native.h: no {what} found")
    return found.group(1)


def _param_type(param: str) -> str:
    """A parameter's type: the declaration without its trailing name."""
    return re.sub(r"\w+\s*$", "", " ".join(param.split()))


def _ctype(decl: str, structs: dict[str, type[ctypes.Structure]]) -> object:
    """The ctypes type of a C type: a scalar, void (None), a pointer to one of ``structs``, or
    any other pointer (``c_void_p``: the callers pass addresses)."""
    words = decl.replace("*", " * ").split()
    stars = words.count("*")
    base = [w for w in words if w not in ("*", "const")]
    if len(base) != 1:
        raise ValueError(f"dgc_native.h: cannot read the C type {decl!r}")
    if stars == 0:
        if base[0] == "void":
            return None
        if base[0] not in _SCALARS:
            raise ValueError(f"dgc_native.h: no ctypes type for {decl!r}")
        return _SCALARS[base[0]]
    if stars == 1 and base[0] in structs:
        return ctypes.POINTER(structs[base[0]])
    return ctypes.c_void_p


ABI = parse_header(HEADER.read_text())


def cache_dir() -> Path:
    return Path(os.environ.get("DGC_NATIVE_DIR") or Path.home() / ".cache" / "dgc-search")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be had (reason logged once)."""
    if os.environ.get("DGC_NATIVE", "1") == "0":
        return None
    try:
        path = build()
        lib = load(path)
        if lib is None:  # a stale or foreign file under the build's name: build it again
            path.unlink(missing_ok=True)
            lib = load(build())
        if lib is None:
            raise RuntimeError(f"{path} does not match dgc_native.h ({abi_mismatch_hint()})")
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        _log.warning("dgc: native kernels unavailable, torch kernels only: %s", e)
        return None
    return lib


def load(path: Path) -> ctypes.CDLL | None:
    """The library at ``path`` with the header's signatures set, or None where its ABI version,
    struct sizes or functions are not the header's."""
    lib = ctypes.CDLL(str(path))
    if abi_mismatch(lib):
        _unload(lib)  # so that a rebuilt file under the same name is loaded afresh
        return None
    for name, (restype, argtypes) in ABI.functions.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _unload(lib: ctypes.CDLL) -> None:
    """Close ``lib``'s handle: the dynamic loader would otherwise hand the same (stale) library
    back for its path, whatever file is there now."""
    try:
        import _ctypes

        _ctypes.dlclose(lib._handle)  # type: ignore[attr-defined, unused-ignore]  # POSIX only
    except (ImportError, AttributeError, OSError):  # no dlclose here: a new process loads it
        pass


def abi_mismatch(lib: ctypes.CDLL) -> str | None:
    """What differs between the loaded library and the header, or None."""
    missing = [name for name in ABI.functions if not hasattr(lib, name)]
    if missing:
        return f"missing functions {missing}"
    lib.dgc_abi_version.restype = lib.dgc_sizeof_fused_plan.restype = ctypes.c_int64
    if lib.dgc_abi_version() != ABI.version:
        return f"ABI version {lib.dgc_abi_version()} != the header's {ABI.version}"
    size = ctypes.sizeof(ABI.structs["FusedPlan"])
    if lib.dgc_sizeof_fused_plan() != size:
        return f"sizeof(FusedPlan) {lib.dgc_sizeof_fused_plan()} != ctypes' {size}"
    return None


def abi_mismatch_hint() -> str:
    return "rebuild: delete the library under $DGC_NATIVE_DIR (default ~/.cache/dgc-search)"


def build(strict: bool = False, directory: Path | None = None) -> Path:
    """Compile (or find the cached build of) the library with the first flag set that works.
    ``strict``: warnings are errors (CI), and only the native flags are tried."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not on PATH)")
    errors = []
    sets = [FLAGS + STRICT_FLAGS] if strict else [FLAGS, PORTABLE_FLAGS]
    for flags in sets:
        try:
            return _build_with(compiler, flags, directory or cache_dir())
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))


def _build_with(compiler: str, flags: tuple[str, ...], directory: Path) -> Path:
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    digest.update(" ".join((compiler, *flags, _cpu_flags())).encode())
    target = directory / f"dgc_native-{platform.machine()}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, *map(str, SOURCES), "-o", tmp, "-lm"]  # libs after the sources
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:2000]}")
        if done.stderr.strip():
            _log.warning("dgc: compiler warnings building %s:\n%s", target.name, done.stderr)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")
