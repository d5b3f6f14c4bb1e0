"""Where a call runs: the Triton kernel (on CUDA, or in Triton's interpreter) or the reference."""

from __future__ import annotations

import torch
import triton

# Read once, at import, because triton.jit decides at decoration time whether a kernel is
# interpreted; the kernels of this package are decorated when their modules are imported.
INTERPRET = bool(triton.knobs.runtime.interpret)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the kernel can run: in the interpreter, or with every tensor given on CUDA."""
    return INTERPRET or all(t.is_cuda for t in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def run_compiled(kernel, grid, stream, args) -> None:
    """Launch a kernel Triton compiled for arguments of this kind, without Triton's binding of
    them (tens of microseconds of host time per call): the caller keeps the compiled kernel, under
    a key holding everything Triton specialized it on."""
    hook = triton.knobs.runtime.launch_enter_hook
    metadata = kernel.launch_metadata(grid, stream, *args) if launch_hooked() else None
    kernel.run(grid[0], grid[1], 1, stream, kernel.function, kernel.packed_metadata, metadata, hook,
               triton.knobs.runtime.launch_exit_hook, *args)


def launch_hooked() -> bool:
    """Whether a launch hook (a profiler's) is registered: Triton 3.6 keeps an empty chain of them,
    never None, and building the metadata a hook reads costs host time on every launch."""
    hook = triton.knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def _fix_interpreter_loop_bounds() -> None:
    """Let the interpreter take tensors as `range` bounds under numpy >= 2.4.

    Triton 3.6's interpreter turns a scalar into an int with int() of a 1-element array, which
    numpy 2.4 refuses (triton-lang/triton#9171); every loop with a runtime bound then fails.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "fixes_loop_bounds", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.fixes_loop_bounds = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _fix_interpreter_loop_bounds()
