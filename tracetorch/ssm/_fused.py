"""``torch.compile`` in the torch layers: the S6/Mamba scan's time block, and ``TTcompile()``'s step.

Both compile ``ssm_core``'s own functions, nothing written twice: the scan
compiles :func:`ssm_core.selective_block` (C++/OpenMP through inductor on
CPUs, Triton on CUDA GPUs), ``TTcompile()`` the layer's whole step (on CPUs
as one graph called without dynamo, :func:`_graph_step`). When to
compile, the first call's check against eager, and the eager fallback, is
:mod:`ssm_core.fused`'s policy; what counts as a compiler's failure, and how
a compiled block takes part in autograd, is torch's and lives here.

Each key (shapes, dtype, device) gets a function with a code object of its
own: dynamo keeps compiled graphs per code object, at most
``torch._dynamo.config.recompile_limit`` of them, and would silently run
eagerly past that in a model of many layer sizes.
"""

from __future__ import annotations

import inspect
import sys
import types

import array_api_compat.torch as xp_torch
import torch
import torch.utils._pytree as pytree

import ssm_core
from ssm_core import fused
from ssm_core.fused import BlockCompiler, compile_mode
from ssm_core.plan import Plan
from ssm_core.selective import BlockInputs

from .. import _compat

__all__ = ["forms", "functorch_active", "step_function", "block_compiler", "step_compiler"]


def _own_code(fn):
    """``fn`` with a code object of its own, so dynamo's cache for it is its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# ----------------------------------------------------------------------------- what is torch's, not the compiler's


class GraphCompileError(RuntimeError):
    """Tracing a step to a graph, or compiling that graph, failed (see :func:`_graph_step`)."""


def _is_compiler_failure(error: BaseException) -> bool:
    """Whether ``error``, raised by a compiled function's call, is torch.compile's own failure.

    Dynamo raises what fails while it traces and compiles as its own
    exception types (``BackendCompilerFailed``, ``InductorError``,
    ``Unsupported``, ...), and inductor's C++ toolchain errors are inductor's
    types. Anything else is the caller's, or torch's own control flow
    (``torch.utils.checkpoint`` ends a recomputation early with an exception),
    and is not ours to catch.
    """
    failures = [GraphCompileError]
    dynamo_exc = sys.modules.get("torch._dynamo.exc")  # loaded by any compile: nothing to import here
    if dynamo_exc is not None:
        failures.append(dynamo_exc.TorchDynamoException)
    inductor_exc = sys.modules.get("torch._inductor.exc")
    if inductor_exc is not None:
        failures += [
            value for value in vars(inductor_exc).values()
            if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == inductor_exc.__name__
        ]
    return isinstance(error, tuple(failures))


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, jvp, vmap, ...) is running: it transforms the eager code."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


# ----------------------------------------------------------------------------- the forms of torch's operations

# Inductor's C++ lowers expm1 to exp(z) - 1, inaccurate near 0, and fuses a multiply
# and a sum into the chain before them; its Triton keeps expm1 as it is.
_TRACED_CPU = Plan(expm1="exp", readout="sum")
_TRACED_GPU = Plan(expm1="expm1", readout="sum")
# Eager on CPUs, torch's expm1 is not vectorised (at [32, 256, 16]: float32 5x exp and
# 2x tanh, float64 14x exp and 6x tanh, on AVX-512 and AVX2 alike), while the tanh
# form is two vectorised kernels. It pays on large input-sized arrays (S6, Mamba) only:
# on S4/S5's parameter-sized ones, and on selective states up to _SMALL_DISCRETIZATION
# elements, the two more kernels cost more than they save (S6's eager step with expm1
# took 0.81-0.98x its time with the tanh form at 1,024-4,096 state elements, float32 and
# float64, under AVX-512, AVX2 and the default build alike; from 8,192 on it varied).
# Under autograd its backward costs more than it saves.
# The readout: a batched product takes 8 dispatches (views, bmm), vecdot 3, and the
# product's faster loop pays for its dispatches from about this many state elements on.
_SMALL_STATE = 1 << 14
_SMALL_DISCRETIZATION = 1 << 12
# Without autograd, an eager call overwrites its own temporaries (Plan.inplace): under a
# torch.func transform it does not, as vmap cannot write a batched value into an unbatched array.
_EAGER = {
    (expm1, readout, inplace): Plan(expm1=expm1, readout=readout, inplace=inplace)
    for expm1 in ("expm1", "tanh") for readout in ("matmul", "vecdot") for inplace in (False, True)
}


def forms(x: torch.Tensor, grad: bool, time_invariant: bool = False, state_elements: int = 0) -> Plan:
    """The plan of torch's forms of expm1 and the readout for work on ``x`` (``grad``: autograd records it;
    ``time_invariant``: the discretization is of parameter-sized arrays; ``state_elements``: one step's state)."""
    if torch.compiler.is_compiling():
        return _TRACED_GPU if x.is_cuda else _TRACED_CPU
    small = state_elements <= _SMALL_DISCRETIZATION
    expm1 = "expm1" if grad or time_invariant or small or x.is_cuda else "tanh"
    readout = "vecdot" if state_elements <= _SMALL_STATE else "matmul"
    return _EAGER[expm1, readout, not (grad or functorch_active())]


# ----------------------------------------------------------------------------- the scan's block


def _flat_block(u, dt, B, C, h, A, inv_A, D, discretization="zoh"):
    # The fields of BlockInputs. One batch axis: a compiled block then serves every batch shape of the
    # same size. The rule is a constant of the compiled graph, which dynamo guards: a graph runs the
    # rule it was traced with.
    L, N, d = u.shape[0], u.shape[-1], h.shape[-1]
    flat = BlockInputs(
        u.reshape(L, -1, N), dt.reshape(L, -1, N), B.reshape(L, -1, d), C.reshape(L, -1, d), h.reshape(-1, N, d),
        A, inv_A, D, discretization,
    )
    ys, h_L = ssm_core.selective_block(flat, xp_torch, forms(u, torch.is_grad_enabled()))  # [L, batch, N], [batch, N, d]
    return ys.reshape(u.shape), h_L.reshape(h.shape)  # [L, ..., N], [..., N, d]


class _CompiledBlock(torch.autograd.Function):
    """A compiled block in autograd's graph, differentiable to any order.

    The forward runs the compiled block with autograd on detached copies of
    its inputs and keeps that graph; the backward differentiates it (the
    compiled backward), once, and lets it go. A backward that builds a graph
    itself (``create_graph=True``: gradient penalties, Hessian-vector
    products) differentiates the eager block instead, which autograd can
    differentiate again: the compiled backward cannot be.

    Under saved-tensor hooks (a checkpoint's forward pass, ``save_on_cpu``)
    the forward keeps only the block's inputs, and the backward runs the
    block again to make that graph: the tensors a graph made in the forward
    saved would be the checkpoint's placeholders, and a backward pass of our
    own over them would recompute the checkpoint's whole region, for each
    block. (``torch.func.vjp`` compiled as the backward would be one fused
    pass, but it cannot be traced under saved-tensor hooks at all.)
    """

    @staticmethod
    def forward(ctx, compiled, *arrays):  # compiled: one rule's _CompiledPair
        ctx.compiled = compiled
        ctx.save_for_backward(*arrays)
        if _saved_tensor_hooks_active():
            ctx.graph = None
            return tuple(compiled.forward(*arrays))
        ctx.graph = compiled.graph(arrays)
        return tuple(out.detach() for out in ctx.graph[1])

    @staticmethod
    def backward(ctx, *grads):
        arrays = ctx.saved_tensors
        graph, ctx.graph = ctx.graph, None  # used once; a second backward (retain_graph=True) makes it again
        needed = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # create_graph=True: a graph of these gradients is being built
            return (None, *_eager_gradients(ctx.compiled.rule, arrays, grads, needed, create_graph=True))
        return (None, *ctx.compiled.gradients(arrays, grads, needed, graph))


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in force (True where this torch cannot say: the path safe under them)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _eager_gradients(rule, arrays, grads, needed, create_graph=False):
    """The gradients of :func:`_flat_block`'s ``arrays`` (by ``rule``) for ``grads`` of its outputs (None where not ``needed``).

    With ``create_graph`` the arrays are the graph's own, and a graph of the
    gradients is built; else detached copies. Either way the graph
    differentiated here is this block's alone.
    """
    with torch.enable_grad():
        if create_graph:
            # Aliases in the graph: a gradient taken at an input itself would also
            # count the paths from one input to another (inv_A is made of A).
            arrays = [a.view_as(a) for a in arrays]
        else:
            arrays = [a.detach().requires_grad_(need) for a, need in zip(arrays, needed)]
        wanted = [a for a, need in zip(arrays, needed) if need]
        found = iter(torch.autograd.grad(
            _flat_block(*arrays, rule), wanted, grads, create_graph=create_graph, allow_unused=True
        ))
    return [next(found) if need else None for need in needed]




class _CompiledPair:
    """One key's compiled block for one discretization ``rule``, its gradients, and the first backward's check.

    The first forward call is checked by the :class:`~ssm_core.fused.BlockCompiler`,
    the first backward here.
    """

    def __init__(self, key, rule):
        self.key = key
        self.rule = rule
        # One code object, two graphs: without autograd and with it.
        compiled = torch.compile(
            _own_code(_flat_block), fullgraph=True, dynamic=False, options=_compat.inductor_options()
        )
        self.forward = lambda *arrays: compiled(*arrays, rule)
        self.checked = False

    def graph(self, arrays):
        """``(inputs, outputs)``: the block on detached copies of ``arrays``, with autograd's graph."""
        with torch.enable_grad():
            inputs = [a.detach().requires_grad_() for a in arrays]  # all requiring grad: one graph per key
            return inputs, tuple(self.forward(*inputs))

    def _compiled_gradients(self, arrays, grads, needed, graph):
        inputs, outputs = graph if graph is not None else self.graph(arrays)
        wanted = [x for x, need in zip(inputs, needed) if need]
        found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
        return [next(found) if need else None for need in needed]

    def gradients(self, arrays, grads, needed, graph=None):
        """The gradients of ``arrays`` (None where not ``needed``), through ``graph`` when the forward kept one."""
        compiler = block_compiler  # looked up now: the policy in force
        if self.key in compiler.failed_keys:
            return _eager_gradients(self.rule, arrays, grads, needed)
        try:
            found = self._compiled_gradients(arrays, grads, needed, graph)
        except Exception as error:
            if not _is_compiler_failure(error):
                raise
            compiler.fail(self.key, error)
            return _eager_gradients(self.rule, arrays, grads, needed)
        if not self.checked:
            expected = _eager_gradients(self.rule, arrays, grads, needed)
            problem = fused.disagreement(found, expected, [f"gradient of {name}" for name in BlockInputs._fields])
            if problem is not None:
                compiler.fail(self.key, f"its first gradients differ from the eager block's, {problem}")
                return expected
            self.checked = True
        return found


def _compile_block(key):
    pairs = {}  # rule -> its compiled pair: one, as the key names the rule (a stray rule gets its own)

    def block(inputs):
        rule = inputs.discretization
        compiled = pairs.get(rule) or pairs.setdefault(rule, _CompiledPair(key, rule))
        # Dynamo specialises a graph on its inputs' strides: contiguous inputs
        # make one graph without autograd and one with it per key.
        arrays = tuple(a.contiguous() for a in inputs[:-1])  # the arrays, shapes unchanged
        if torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
            return _CompiledBlock.apply(compiled, *arrays)
        return compiled.forward(*arrays)

    return block


block_compiler = BlockCompiler(
    "the S6/Mamba scan block", "torch.compile", _compile_block, is_failure=_is_compiler_failure,
    check=lambda compiled, eager, args: _check_first_call(compiled, eager, args),
)


# ----------------------------------------------------------------------------- the first call's check


def _check_first_call(compiled, eager, args, autograd=True):
    """None where ``compiled(*args)`` agrees with ``eager(*args)``, else why not (:func:`ssm_core.fused.disagreement`).

    Outputs and states, through the compiled graph the call itself will run
    (with autograd where it records and no saved-tensor hooks are in force,
    see :class:`_CompiledBlock`; without, for ``autograd=False``), on
    detached copies, with the eager reference under the autocast state the
    compiled graph was traced in (its key's) and the bound of the autocast
    dtype there: it leaves no trace. The gradients are checked at the first
    backward (:class:`_CompiledPair`).
    """
    leaves, spec = pytree.tree_flatten(args)
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    grad = autograd and torch.is_grad_enabled() and any(leaves[i].requires_grad for i in tensors)
    grad = grad and not _saved_tensor_hooks_active()  # under hooks, saving anything would count in them
    copies = list(leaves)
    for i in tensors:
        copies[i] = leaves[i].detach().requires_grad_(grad and leaves[i].requires_grad)
    inputs = pytree.tree_unflatten(copies, spec)
    with torch.set_grad_enabled(grad):
        got = [o.detach() for o in pytree.tree_leaves(compiled(*inputs)) if o is not None]
    with torch.no_grad():
        expected = [o for o in pytree.tree_leaves(eager(*inputs)) if o is not None]
    labels = ["outputs", *(["final state"] if len(got) == 2 else [f"final state {i}" for i in range(1, len(got))])]
    return fused.disagreement(got, expected, labels, precision=_compat.autocast_dtype(copies[tensors[0]].device.type))


# ----------------------------------------------------------------------------- TTcompile's step


def _step_of(spec, config):
    def step(x, state, params, decay):
        plan = forms(x, torch.is_grad_enabled())
        return spec.step(x, state, params, xp=xp_torch, prepared=decay, plan=plan, config=config)

    return step


def _graph_compiler():
    """``torch._inductor.standalone_compile`` where this torch has it (from 2.8 on), else None."""
    import torch._inductor

    standalone = getattr(torch._inductor, "standalone_compile", None)
    if standalone is None or "dynamic_shapes" not in inspect.signature(standalone).parameters:
        return None
    return standalone


def _flat(groups) -> tuple:
    """``(arrays, absent)``: the arrays of ``groups`` (records of arrays or None) in order, and where None stood."""
    arrays, absent = [], []
    for group in groups:
        for value in group:
            absent.append(value is None)
            if value is not None:
                arrays.append(value)
    return arrays, tuple(absent)


def _unflat(templates, absent, arrays) -> list:
    """The records of ``templates``' types with ``arrays`` put back where ``absent`` has no None."""
    values, position, records = iter(arrays), 0, []
    for template in templates:
        fields = [None if absent[position + i] else next(values) for i in range(len(template))]
        position += len(template)
        records.append(type(template)(*fields) if hasattr(template, "_fields") else tuple(fields))
    return records


def _graph_step(spec, config, eager, standalone):
    """``step(x, state, params, decay)`` as one graph compiled by inductor, called without dynamo.

    Dynamo's call of a compiled function (its frame hooks, config and guards)
    took about 50 µs of S6's 160 µs TTcompile'd step at batch 32, 256 features:
    the graph of the same step, traced with ``make_fx`` and compiled by
    ``standalone_compile``, took 110 µs. So the step is traced at its first call,
    and the graph specialises on that call: its inputs' shapes, strides, dtype
    and device, the autocast state (the caller's key) and which fields are
    None. What dynamo's guards checked, this checks: a call that differs runs
    the eager step. Tracing with fake tensors refuses a branch on the data, as
    dynamo's ``fullgraph`` does.

    Inductor's own assertion of every input's size and stride is off: its
    thirteen calls took a sixth of Mamba's TTcompile'd step at batch 1, 64
    features. The arrays are made contiguous, and their shapes checked here
    instead: the states' at every call, the weights' once (see ``fixed``).
    """
    traced = None  # (absent, the inputs' (shape, dtype), compiled graph, the new state's template): the first call's
    fixed = None  # (params, decay, their arrays, where None stood, whether they fit the traced graph)

    def trace(x, groups, arrays, absent):
        new_states = []  # the new state record of the traced call: where its outputs go back

        def flat_step(x, *arrays):
            state, params, decay = _unflat(groups, absent, arrays)
            y, new_state = spec.step(x, state, params, xp=xp_torch, prepared=decay, plan=_TRACED_CPU, config=config)
            new_states.append(new_state)
            return (y, *(s for s in new_state if s is not None))

        try:
            from torch.fx.experimental.proxy_tensor import make_fx

            with torch.no_grad():
                graph = make_fx(flat_step, tracing_mode="fake")(x, *arrays)
                with torch._inductor.config.patch({**_compat.inductor_options(), "size_asserts": False}):
                    compiled = standalone(graph, [x, *arrays], dynamic_shapes="from_example_inputs")
        except Exception as error:  # making the graph is compiling: whatever fails there is the compiler's
            raise GraphCompileError(f"{type(error).__name__}: {error}") from error
        new_state = new_states[-1]
        inputs = tuple((a.shape, a.dtype) for a in (x, *arrays))
        return absent, inputs, compiled, (new_state, tuple(s is None for s in new_state))

    def fits(arrays, inputs) -> bool:
        """Whether contiguous ``arrays`` are on the CPU with the traced ``inputs``' shapes and dtypes."""
        return len(arrays) == len(inputs) and all(a.is_cpu and (a.shape, a.dtype) == i for a, i in zip(arrays, inputs))

    def step(x, state, params, decay):
        nonlocal traced, fixed
        moving, moving_found = _flat((state,))
        moving = [x.contiguous(), *(a.contiguous() for a in moving)]  # the graph's strides: its first call's
        if fixed is None or fixed[0] is not params or fixed[1] is not decay:
            # The weights a TTcompile'd layer keeps are the same records at every step: flattened and checked once.
            weights, weights_found = _flat((params, decay))
            fixed = [params, decay, [a.contiguous() for a in weights], weights_found, None]
        weights, weights_found = fixed[2], fixed[3]
        if traced is None:
            traced = trace(moving[0], (state, params, decay), moving[1:] + weights, moving_found + weights_found)
        absent, inputs, compiled, (new_state, new_absent) = traced
        if moving_found + weights_found != absent:
            return eager(x, state, params, decay)
        if fixed[4] is None:
            fixed[4] = fits(weights, inputs[len(moving):])
        if not (fixed[4] and fits(moving, inputs[: len(moving)])):
            return eager(x, state, params, decay)
        y, *new_arrays = compiled(*moving, *weights)
        if True in new_absent:
            return y, _unflat((new_state,), new_absent, new_arrays)[0]
        return y, type(new_state)(*new_arrays)  # every field an array: the record at once

    return step


def _compile_step(key):
    spec, config, device = ssm_core.LAYERS[key[0]], key[1], key[4]  # the key's config: its options are the step's
    eager = _step_of(spec, config)
    standalone = _graph_compiler() if device.type == "cpu" else None
    # On CUDA GPUs the step stays dynamo's: the graph form was measured and tested on CPUs only.
    compiled = (
        _graph_step(spec, config, eager, standalone) if standalone is not None
        else torch.compile(_own_code(eager), fullgraph=True, dynamic=False, options=_compat.inductor_options())
    )

    def step(x, state, params, decay):
        # TTcompile freezes the weights (buffers, no gradient) for inference.
        # Where autograd records through the input or the states anyway, the
        # eager step runs: differentiable to any order, and no backward graph to compile.
        if torch.is_grad_enabled() and (x.requires_grad or any(s is not None and s.requires_grad for s in state)):
            return eager(x, state, params, decay)
        return compiled(x, state, params, decay)

    return step


step_compiler = BlockCompiler(
    "the TTcompile()d step", "inductor", _compile_step, is_failure=_is_compiler_failure,
    check=lambda compiled, eager, args: _check_first_call(compiled, eager, args, autograd=False),
)


def step_function(spec, config, x: torch.Tensor):
    """``step(x, state, params, decay)`` for ``TTcompile()``: compiled, unless ``SSM_COMPILE=0`` or compiling failed.

    One per layer kind, config, input shape, dtype and device; layers of one
    kind and size share it (the weights are arguments, not constants). Under
    a ``torch.func`` transform a step runs eagerly.
    """
    eager = _step_of(spec, config)
    if torch.compiler.is_compiling():
        return eager
    key = (spec.name, config, tuple(x.shape), x.dtype, x.device, _compat.autocast_dtype(x.device.type))
    compiled = step_compiler.select(key, 0, compile_mode() != "eager", eager)
    if compiled is None:
        return eager

    def step(x, state, params, decay):
        # Traced by someone's torch.compile (a step function made before it), the eager step is what
        # their compile fuses: dynamo does not trace into a compiled graph of ours.
        eager_here = functorch_active() or torch.compiler.is_compiling()
        return (eager if eager_here else compiled)(x, state, params, decay)

    return step
