"""fastbn's C ABI: ``libfastbn.so`` and ``fastbn.h`` (docs/contract.md section 4).

``python -m fastbn.capi build --outdir DIR`` builds the library with cffi's
embedding API; a C program then includes ``fastbn.h`` and links ``-lfastbn``.
The library starts the Python environment fastbn is installed in on its first
call, registers compiled Numba entry points, and from then on every call goes
from C straight into compiled code.  See README.md, "Using fastbn from C".
"""

from ._build import build, compile_line, header_declarations

__all__ = ["build", "compile_line", "header_declarations"]
