"""The native library's build and its ABI: the header is the one declaration, the loader
derives its signatures from it, and a library that does not match it is never called."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from dgc.layers.native import build
from tests.dgc.helpers import needs_library
from tests.helpers import python

HEADER = """
/* a comment with DGC_API int not_a_function(int x); inside */
#define DGC_ABI_VERSION 7
#define DGC_API __attribute__((visibility("default")))
typedef struct {
    const float *a;
    int64_t n;
    int32_t flag;
} Plan;
DGC_API int64_t f_version(void);
DGC_API int f_call(const Plan *p, const float *x, float *y, int64_t n, float eps,
                   int threads);
DGC_API void f_none(const int64_t *index, size_t bytes);
"""


def test_the_header_parser_reads_functions_and_struct_layouts():
    abi = build.parse_header(HEADER)
    assert abi.version == 7
    plan = abi.structs["Plan"]
    assert [name for name, _ in plan._fields_] == ["a", "n", "flag"]
    assert ctypes.sizeof(plan) == 24  # pointer, int64, int32 + padding, as a C compiler lays it
    assert set(abi.functions) == {"f_version", "f_call", "f_none"}  # not the comment's
    assert abi.functions["f_version"] == (ctypes.c_int64, [])
    restype, argtypes = abi.functions["f_call"]
    assert restype is ctypes.c_int
    assert argtypes[0] == ctypes.POINTER(plan)
    assert argtypes[1:] == [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                            ctypes.c_int]  # fmt: skip
    assert abi.functions["f_none"] == (None, [ctypes.c_void_p, ctypes.c_size_t])


def test_an_unreadable_type_in_the_header_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="double"):
        build.parse_header("#define DGC_ABI_VERSION 1\nDGC_API int f(double x);")


@needs_library
def test_the_library_exports_exactly_the_functions_the_header_declares():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm here to list the library's symbols")
    path = build.build()
    out = subprocess.run([nm, "-D", "--defined-only", str(path)], capture_output=True, text=True)
    exported = {line.split()[-1] for line in out.stdout.splitlines() if " T " in line}
    assert exported == set(build.ABI.functions)  # everything else is hidden
    assert build.abi_mismatch(ctypes.CDLL(str(path))) is None


@needs_library
def test_a_stale_library_under_the_builds_name_is_rebuilt(tmp_path):
    # A library that answers another ABI version (an old build, a copied cache) is never
    # called: the loader deletes it, builds again and loads the new one.
    stale = tmp_path / "stale.c"
    stale.write_text("long dgc_abi_version(void) { return -1; }\n")
    code = (
        "import logging, subprocess, sys\n"
        "from dgc.layers.native import build\n"
        "logging.basicConfig()\n"
        "target = build.build()\n"  # the real build's name...
        f"subprocess.run(['cc', '-shared', '-fPIC', {str(stale)!r}, '-o', str(target)],"
        " check=True)\n"  # ...now holding a stale library
        "lib = build.library()\n"
        "assert lib is not None and lib.dgc_abi_version() == build.ABI.version\n"
    )
    env = {**os.environ, "DGC_NATIVE_DIR": str(tmp_path / "cache")}
    done = python(code, env)
    assert done.returncode == 0, done.stderr
    assert "unavailable" not in done.stderr


@needs_library
def test_a_library_that_cannot_match_the_header_leaves_the_torch_kernels_with_one_warning():
    code = (
        "import dataclasses, logging\n"
        "from dgc.layers.native import build\n"
        "logging.basicConfig()\n"
        "build.ABI = dataclasses.replace(build.ABI, version=build.ABI.version + 1000)\n"
        "assert build.library() is None and build.library() is None\n"
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("native kernels unavailable") == 1
    assert "ABI version" in done.stderr or "does not match dgc_native.h" in done.stderr
