"""Build ``libfastbn.so`` with cffi's embedding API from ``native/fastbn.h`` and ``shim.c``."""

import os
import re
import shutil
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "fastbn.h")  # a link to native/fastbn.h in a source checkout
SHIM = os.path.join(HERE, "shim.c")
MODULE = "_fastbn_capi"

# Declarations the init code uses (functions of shim.c), on top of the public ABI.
INTERNAL_CDEF = """
static void fastbn__register_entry(int index, void *address);
static void fastbn__set_threads(int64_t n, int serialize);
static void fastbn__set_small_calls(int64_t max_bytes, void *mask_set, void *mask_get);
static void fastbn__serial_lock(void);
static void fastbn__serial_unlock(void);
"""

INIT_CODE = f"""
import os
from fastbn import _notice
# C programs own their stderr: the compile notice only when asked for
_notice.set_enabled(os.environ.get("FASTBN_COMPILE_NOTICE") == "1")
from {MODULE} import ffi, lib
from fastbn.capi import _entries
_entries.register(ffi, lib)
"""


def header_declarations(path=HEADER):
    """The ABI as cffi's ``cdef`` reads it: the header's CDEF block without the export macro."""
    with open(path) as f:
        text = f.read()
    match = re.search(r"/\* FASTBN_CDEF_BEGIN \*/(.*?)/\* FASTBN_CDEF_END \*/", text, re.S)
    if match is None:
        raise RuntimeError(f"{path} has no FASTBN_CDEF_BEGIN/END block")
    return match.group(1).replace("FASTBN_API ", "")


def header_version_string(path=HEADER):
    """``"MAJOR.MINOR.PATCH"`` from the header's ``FASTBN_VERSION_*`` macros."""
    decls = header_declarations(path)
    parts = [re.search(rf"#define FASTBN_VERSION_{part} (\d+)", decls) for part in
             ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise RuntimeError(f"{path} lacks a FASTBN_VERSION_MAJOR/MINOR/PATCH macro")
    return ".".join(m.group(1) for m in parts)


def _python_library_dir():
    return sysconfig.get_config_var("LIBDIR") or os.path.join(sys.base_prefix, "lib")


def build(outdir, python=None, verbose=False):
    """Build ``outdir/libfastbn.so`` and copy ``fastbn.h`` next to it; returns the library path.

    ``python`` is the interpreter the library starts (default: this one, so
    the library uses the environment fastbn is installed in).
    """
    import cffi

    from .. import __version__

    header_version = header_version_string()
    if header_version != __version__:
        raise RuntimeError(f"fastbn.h says version {header_version} (FASTBN_VERSION_*), the "
                           f"package {__version__}: update the header's macros")
    python = os.path.abspath(python or sys.executable)
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    with open(SHIM) as f:
        shim = f.read()
    libdir = _python_library_dir()
    ffibuilder = cffi.FFI()
    ffibuilder.cdef(header_declarations() + INTERNAL_CDEF)
    ffibuilder.embedding_init_code(INIT_CODE)
    ffibuilder.set_source(
        MODULE, shim,
        include_dirs=[HERE],
        define_macros=[("FASTBN_PYTHON_EXECUTABLE", _c_string(python)),
                       ("FASTBN_VERSION_STRING", _c_string(__version__))],
        extra_compile_args=["-O2", "-pthread"],
        extra_link_args=["-pthread", f"-Wl,-rpath,{libdir}"],
    )
    with tempfile.TemporaryDirectory(prefix="fastbn-capi-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, target="libfastbn.so", verbose=verbose)
        target = os.path.join(outdir, "libfastbn.so")
        shutil.copyfile(built, target + ".tmp")
        os.replace(target + ".tmp", target)  # a program running the old library keeps it
    shutil.copyfile(HEADER, os.path.join(outdir, "fastbn.h"))
    return target


def _c_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def compile_line(outdir, program="prog.c"):
    outdir = os.path.abspath(outdir)
    return f"cc {program} -I{outdir} -L{outdir} -lfastbn -Wl,-rpath,{outdir}"
