"""This package's Triton kernels on the CPU, in Triton's interpreter (numpy): a hook for the tests.

    with triton_interp.cpu_interpreter("conv"):     # the kernels' entry points now accept CPU tensors
        y = causal_conv1d_silu(x_cpu, w, b)

Inside `cpu_interpreter()` a module's entry points take CPU tensors and run `interpreted(globals())[name]`,
a copy of each @triton.jit function of that module bound to a private copy of the module's globals in which
every @triton.jit function is interpreted too: an interpreted kernel cannot call a compiled helper, and the
interpreter writes into the globals it runs in (the copy keeps the module's own clean). triton.language's own
@jit functions (tl.sigmoid, ...) stay compiled, so the kernels use none of them.

Triton 3.6's interpreter cannot run kernels with a loop over a runtime bound under numpy >= 2.4 (it turns the
bound into a Python int with int() of a 1-element array); triton 3.9's can. `problem()` says when it cannot.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["active", "cpu_interpreter", "interpreted", "kernels_for", "on_device", "problem", "runs_on"]

_STATE = {"on": False}
_BUILT: dict[str, dict] = {}   # module name -> {kernel name: InterpretedFunction}


def active() -> bool:
    """True inside `cpu_interpreter()`: entry points may take CPU tensors."""
    return _STATE["on"]


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels can take x's device: CUDA, or the CPU inside `cpu_interpreter()`."""
    return x.is_cuda or (x.device.type == "cpu" and active())


def kernels_for(module_globals: dict, x: torch.Tensor, names: tuple[str, ...], who: str) -> tuple:
    """The named @triton.jit kernels of a module for tensors on x's device: the compiled ones on CUDA, their
    interpreted copies on the CPU inside `cpu_interpreter()`; RuntimeError (naming `who`) for CPU tensors
    outside it."""
    if x.is_cuda:
        return tuple(module_globals[n] for n in names)
    if not active():
        raise RuntimeError(f"{who}: CPU tensors reached the kernels outside the CPU interpreter hook")
    built = interpreted(module_globals)
    return tuple(built[n] for n in names)


def on_device(x: torch.Tensor):
    """The context a launch for x runs in: x's CUDA device, or nothing on the CPU (the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def interpreted(module_globals: dict) -> dict:
    """{name: InterpretedFunction} for the @triton.jit functions in module_globals, built once per module."""
    key = module_globals["__name__"]
    if key not in _BUILT:
        from triton.runtime.interpreter import InterpretedFunction

        env = dict(module_globals)
        jitted = {k: v for k, v in env.items() if isinstance(v, triton.runtime.JITFunction)}
        for name, f in jitted.items():
            env[name] = InterpretedFunction(types.FunctionType(f.fn.__code__, env, f.fn.__name__))
        _BUILT[key] = {name: env[name] for name in jitted}
    return _BUILT[key]


if triton is not None:
    @triton.jit
    def _loop_probe_kernel(x_ptr, n):
        """The hook's self-test: x[i] = i for i < n, a loop over a runtime bound like the kernels'."""
        for i in range(n):
            tl.store(x_ptr + i, i * 1.0)


@functools.lru_cache(maxsize=None)
def problem() -> str | None:
    """None if Triton's interpreter can run the kernels here, else why not."""
    if triton is None:
        return "triton is not installed"
    x = torch.zeros(3)
    try:
        interpreted(globals())["_loop_probe_kernel"][(1,)](x, 3)
    except triton.runtime.errors.InterpreterError as e:     # reported (skip reason / RuntimeError), not hidden
        return (f"triton {triton.__version__}'s interpreter fails a loop over a runtime bound here "
                f"({type(e).__name__}: {e}); triton >= 3.9 runs it")
    if x.tolist() != [0.0, 1.0, 2.0]:
        return f"triton {triton.__version__}'s interpreter computed {x.tolist()} for [0, 1, 2]"
    return None


@contextlib.contextmanager
def cpu_interpreter(who: str = "kernels"):
    """Tests only: inside, the package's Triton entry points accept CPU tensors and run interpreted. Not
    thread-safe; a backward must run inside it too. RuntimeError (naming `who`) if the interpreter cannot run
    here (`problem()`)."""
    why = problem()
    if why is not None:
        raise RuntimeError(f"{who}: the CPU interpreter hook cannot run: {why}")
    old = _STATE["on"]
    _STATE["on"] = True
    try:
        yield
    finally:
        _STATE["on"] = old
