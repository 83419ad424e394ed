"""Running the Triton kernels under the interpreter (TRITON_INTERPRET=1, the CPU test path)."""

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fix_interpreter_loop_bounds() -> None:
    """Lets ``range(0, n)`` with a runtime ``n`` run under the Triton 3.6 interpreter with numpy >= 2.3.

    The interpreter holds a scalar as a 1-element array and converts it with ``int(array)``, which newer numpy
    rejects ("only 0-dimensional arrays can be converted to Python scalars"). The patch replaces that one
    conversion; it is applied only under TRITON_INTERPRET=1 and once per process, so compiled kernels are
    untouched.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - layout of a future triton
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mcdist_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mcdist_fixed = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    fix_interpreter_loop_bounds()
