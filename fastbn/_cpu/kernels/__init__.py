"""Numba kernels for the CPU backend, one module per concern.

Every kernel works on C-contiguous arrays of one float dtype (float32 or float64)
in a canonical layout and knows nothing about axes (``fastbn._layout`` and the
backend make the views):

``numerics``      two-sum, invstd, Chan's merge (docs/contract.md section 5)
``codegen``       LLVM IR for whole-line vector loads and (streaming) stores, fences, flags
``plans``         plan constants (``PLAN_THREADS``, ``MIN_RUN``, ...) and task sizing
``tiles``         register tiles of the column path, software prefetch
``pipes``         IR for the pipelined and strided loops
``channel``       channel path (outer, C, inner): statistics, fused forward, affine pass
``channel_grad``  channel path backward: gradient sums and ``dx``
``column``        column path (rows, W): statistics, forward, backward
``pipeline``      pipelined channel path: reduce channel c + 1 while writing c
``features``      NaN-aware and weighted feature statistics (scalers, ``standardize``)
``minmax``        min-max scaling about both ends of the range
``ops``           whole ops choosing a path: what the backend and the C entry points call

The package's namespace is the union of its modules' (checked: no name is bound to
two objects), so that ``fastbn._jit.serial_module`` can build the serial twins of
all kernels at once, each twin calling the other twins.  The benchmark floors live
apart, in ``fastbn._cpu.floors``.  Compiled code is cached under a directory named by
a digest of all these sources (``fastbn._cache``): Numba itself watches only the
file that defines a function, not the helpers it calls from the others.
"""

from . import (channel, channel_grad, codegen, column, features, minmax, numerics, ops, pipeline,
               pipes, plans, tiles)

MODULES = (numerics, codegen, plans, tiles, pipes, channel, channel_grad, column, pipeline,
           features, minmax, ops)


def _merge_namespaces():
    namespace = globals()
    for module in MODULES:
        for name, value in vars(module).items():
            if name.startswith("__"):
                continue
            if name in namespace and namespace[name] is not value:
                raise ImportError(f"fastbn._cpu.kernels: {name!r} means two things "
                                  f"({module.__name__} and another module)")
            namespace.setdefault(name, value)


_merge_namespaces()
