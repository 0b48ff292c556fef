"""numpy >= 2.4 compatibility for Triton 3.6's CPU interpreter (tests only).

The interpreter keeps scalar kernel arguments as 1-element arrays and turns them into loop
bounds with ``int(array)``, which numpy 2.4 rejects for arrays of ndim > 0. ``range(n)`` over a
runtime ``n`` therefore fails in every kernel. This wraps the interpreter's tensor patching so
``__index__`` reads the element with ``.item()``; it is applied only when numpy needs it.
"""

import numpy as np


def _numpy_rejects_int_of_1d() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def install() -> bool:
    if not _numpy_rejects_int_of_1d():
        return False
    from triton.runtime import interpreter

    if getattr(interpreter, "_adaspa_index_shim", False):
        return True
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    interpreter._adaspa_index_shim = True
    return True
