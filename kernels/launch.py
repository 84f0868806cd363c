"""Kernel launches as values, and the key under which Triton compiles each one.

Why this exists. Triton compiles a kernel once per distinct *key*: its constexprs, its launch
options (warps, stages) and a specialisation of every other argument: an int equal to 1 or
divisible by 16, a pointer 16-byte aligned or not, each gets its own binary. Decode steps
replay CUDA graphs captured at start-up, but prefill steps run eagerly, and their LoRA ints
change from step to step (how many adapters, the rank, how many row blocks) as do the
offsets of the step-table views. Left specialised, every new combination compiled a new
variant in the middle of serving: seconds during which no request moved.

So the kernels declare those arguments unspecialised (`jit_options`), the engine compiles
the finite set of variants left before it serves (`kernels/lora.py: warmup_calls`), and
tests/test_kernel_variants.py checks with Triton's own binder (`cache_key`, no GPU needed)
that random steps never need a key outside that set.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import triton

_JIT_PARAMS = inspect.signature(triton.jit).parameters


# Launch-time arithmetic on host ints. triton.cdiv and triton.next_power_of_2 are constexpr
# functions: called from Python they unwrap every argument first, 5-10 us a call on the CI
# machine, and an eager step makes hundreds of such calls (every LoRA point, norm, RoPE, ...)
# on a path that is host-bound. Same results (tests/test_kernel_variants.py checks).
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def int32_aligned(n: int) -> int:
    """n int32 elements rounded up to whole 16-byte units. Tables packed end to end into one
    tensor (one copy or broadcast per step) start each part at such a boundary, so that a
    part's view is specialised as aligned like a fresh tensor, whatever the sizes before it."""
    return cdiv(n, 4) * 4


def jit_options(*names: str) -> dict:
    """triton.jit keyword arguments that leave `names` unspecialised: ints not special-cased
    for 1 or for divisibility by 16, pointers not for 16-byte alignment."""
    options = {"do_not_specialize": list(names)}
    if "do_not_specialize_on_alignment" in _JIT_PARAMS:  # divisibility: Triton >= 3.3
        options["do_not_specialize_on_alignment"] = list(names)
    return options


# Module ids of each group table (kernels/lora.py: _group_table), packed 3 bits per slot, by
# the table's id: tables are built once and kept, so the kernels can take a group's module ids
# as a constexpr (MODS) instead of loading them (LoraBatch.rows_are_adapters).
_GROUP_MODS: dict[int, int] = {}


def register_group(table, module_ids) -> None:
    assert all(0 <= m < 8 for m in module_ids)
    _GROUP_MODS[id(table)] = sum(m << (3 * i) for i, m in enumerate(module_ids))


def group_mods(table) -> int:
    """The packed module ids of a group table built by kernels/lora.py: _group_table."""
    return _GROUP_MODS[id(table)]


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    import torch
    from triton.backends.nvidia.compiler import CUDAOptions

    return ("launch_pdl" in CUDAOptions.__dataclass_fields__
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


def pdl_supported(device) -> bool:
    """Programmatic dependent launch (a kernel starting before the one it depends on has
    finished, synchronised in the kernel by gdc_wait): Hopper or newer, and a Triton with the
    `launch_pdl` option. Never under the interpreter, whose semantics lack the wait."""
    if device.type != "cuda":
        return False
    return _pdl_supported(device.index if device.index is not None else 0)


@dataclass
class KernelCall:
    """One launch: `kernel[grid](*args, **kwargs)`."""

    kernel: Any  # a @triton.jit function (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def run(self):
        """Launch; returns Triton's compiled kernel (n_regs, n_spills: kernel_bench.py --regs)."""
        return self.kernel[self.grid](*self.args, **self.kwargs)


_binders: dict = {}


def cache_key(call: KernelCall, arch: int = 90) -> tuple:
    """The key a CUDA device of compute capability `arch` would compile `call` under:
    (kernel name, argument specialisations and constexprs, launch options).

    Computed by Triton's own argument binder for that target, so it needs no GPU and works
    under TRITON_INTERPRET=1 too (it rebuilds the compiled-mode function from the source).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = call.kernel
    found = _binders.get((id(kernel), arch))
    if found is None:
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
        # One function may be compiled in two forms (lora_expand.py): name them apart.
        name = jit.fn.__qualname__ + ("/unspecialised" if jit.do_not_specialize else "")
        backend = make_backend(GPUTarget("cuda", arch, 32))
        found = _binders[(id(kernel), arch)] = (name, create_function_from_signature(jit.signature, jit.params,
                                                                                       backend))
    name, binder = found
    _, specialization, options = binder(*call.args, **call.kwargs)
    return name, tuple(str(s) for s in specialization), tuple(sorted(options.items()))


@functools.cache
def _kernel_modules() -> tuple[str, ...]:
    import pkgutil

    import kernels

    return tuple(f"kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__))


def compiled_variants() -> int:
    """Kernel binaries compiled (or loaded from Triton's disk cache) by this process so far,
    over every Triton kernel of this package: the engine reports the ones added while serving.
    Cheap enough for the metrics thread: it looks only at this package's loaded modules."""
    import sys

    from triton.runtime.jit import JITFunction

    count = 0
    for name in _kernel_modules():
        module = sys.modules.get(name)
        if module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, JITFunction):
                # device_caches: device -> (kernel cache, ...); the first item is the cache in 3.x
                count += sum(len(entry[0]) for entry in list(value.device_caches.values()))
    return count
