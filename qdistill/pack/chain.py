"""One C call for a run of packed Linears inside an ``nn.Sequential`` (issue #15, items 1 and 4).

At batch 1 a packed model's kernels read their weights near the memory bound, but the Python
module path between them (``nn.Module.__call__``, input checks, ``torch.empty``, a ReLU as a
torch op) costs ~300 us of a ~1.3 ms W4A8 forward of the 151 MB linear-heavy model once a
larger model has evicted that code and data from the caches
(``benchmarks/results/kernels-gemv.md``, section 6). :class:`PackedSequential` is an
``nn.Sequential`` with the same children, names, state dict and printing whose forward runs
each *run* of consecutive packed Linears (at least two, with only ``nn.ReLU``, ``nn.Identity``
and eval-mode ``nn.Dropout`` between or after them) as one call of ``qd_chain_run``
(csrc/qkernels.c): the layers' own prepared C entries (``qd_a8_run`` / ``qd_wo_run``) layer
after layer into scratch memory, the ReLUs applied in C exactly as ``torch.relu`` does (``x <
0 -> +0``; NaN, -0.0 and Inf kept bit for bit). Every product is the one the unfused layer
computes, so the output is bit-identical (tests/test_kernel_chain.py).

A run takes the fused call only when the unfused path would make exactly these C calls, and
otherwise runs its modules one by one as ``nn.Sequential.forward`` does: the input is a plain
contiguous float32 CPU tensor of 2 or 3 dimensions, ``[..., in_features]``, with rows, that
needs no gradient; every packed layer's plan is bound (the first forward binds them, so it runs
unfused) and still the one of that layer, with its bias the tensor bound, at the address bound
(``kernels.prepared_linear``'s tests); W8A8 does not hand this row count to ``torch._int_mm``;
no forward / backward hooks on the run's modules or global module hooks; no Dropout of the run
in training mode; not under ``torch.jit`` tracing or ``torch.compile`` (they see the plain
Sequential). The children are compared with the ones the runs were found in on every call
(``seq[0] = ...`` makes it look again). Any failure of the C call (out of memory, NaN / Inf
reaching a per-token int8 layer) re-runs the modules one by one, which raises that layer's own
error.

:func:`fuse_sequentials` swaps the class of every plain ``nn.Sequential`` holding such a run
(``qd.load`` and ``qd.freeze`` call it unless ``fuse=False``); :func:`unfuse_sequentials`
swaps it back. The C struct of a run holds raw pointers: it is built on the first fused call,
never pickled or copied (``copy.deepcopy`` / ``torch.save`` drop it; a copy rebuilds its own).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from qdistill.pack import kernels
from qdistill.pack.modules import PackedLinear

ENTRY = "qd_chain_run"
_F32 = torch.float32
_UNSET = object()
_NO_ACT, _RELU = 0, 1
# torch.compiler.is_compiling is torch >= 2.3; on 2.2 dynamo traces the fused path and breaks
# its graph at the C call, which then runs eagerly
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


class CChainLayer(ctypes.Structure):
    """C's ``qd_chain_layer``: one layer's plan struct, its entry (0: ``qd_a8_run``, 1:
    ``qd_wo_run``), the activation after it (0: none, 1: ReLU) and its output width."""

    _fields_ = [
        ("plan", ctypes.c_void_p),
        ("entry", ctypes.c_int64),
        ("act", ctypes.c_int64),
        ("O", ctypes.c_int64),
    ]


class CChain(ctypes.Structure):
    """C's ``qd_chain``: ``n`` layers at ``layers``."""

    _fields_ = [("n", ctypes.c_int64), ("layers", ctypes.c_void_p)]


def _act(m: Any) -> int | None:
    """The activation code of an elementwise layer C computes like torch, else None."""
    t = type(m)
    if t is nn.ReLU:
        return _RELU
    if t is nn.Identity or t is nn.Dropout:  # Dropout: fused only in eval mode (checked per call)
        return _NO_ACT
    return None


def _is_packed(m: Any) -> bool:
    return type(m) is PackedLinear


class _Bound:
    """A run's C struct for the plans bound now: what a fused call passes and checks."""

    def __init__(self, items: tuple[tuple[Any, Any, tuple[Any, ...]], ...], acts: list[int]):
        self.items = items  # (layer, its KernelPlan, the plan's _call tuple), per layer
        calls = [c for _, _, c in items]
        entries = [0 if kp.kind in kernels._A8_KINDS else 1 for _, kp, _ in items]
        # _call = (run, fn, plan address, struct, bias, bias address, in_f, out_f, int_mm)
        self.array = (CChainLayer * len(items))(
            *(CChainLayer(c[2], e, a, c[7]) for c, e, a in zip(calls, entries, acts, strict=True))
        )
        self.chain = CChain(len(items), ctypes.addressof(self.array))
        self.addr = ctypes.addressof(self.chain)
        self.run, self.fn = kernels._call_entry(ENTRY)
        self.in_f, self.out_f = calls[0][6], calls[-1][7]
        self.int_mm = any(c[8] for c in calls)


class Run:
    """Consecutive modules of a Sequential: >= 2 packed Linears with only elementwise layers
    C computes like torch between and after them. ``__call__`` is the fused call (None where
    it does not apply); :meth:`unfused` runs the modules one by one."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = tuple(modules)
        self.layers = tuple(m for m in modules if _is_packed(m))
        acts: list[int] = []
        for m in modules:
            if _is_packed(m):
                acts.append(_NO_ACT)
            elif _act(m) == _RELU:
                acts[-1] = _RELU  # ReLU is idempotent: several in a row are one
        self.acts = acts
        self.dropouts = tuple(m for m in modules if type(m) is nn.Dropout)
        self.hooks = tuple(
            d
            for m in modules
            for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                      m._backward_pre_hooks)
        )  # fmt: skip
        self.dicts = tuple(m.__dict__ for m in modules)  # a forward assigned to an instance
        self.bound: _Bound | None = None

    def _bind(self) -> _Bound | None:
        """The C struct for the layers' plans as bound now, or None where one is not bound yet
        (the unfused call binds it), a layer has no kernel, or widths do not chain."""
        items = []
        for layer in self.layers:
            kp = layer._kernel
            if not kp or kp._call is None:
                return None
            items.append((layer, kp, kp._call))
        for (_, _, a), (_, _, b) in zip(items, items[1:], strict=False):
            if a[7] != b[6]:
                return None  # the unfused call raises its InputError
        self.bound = _Bound(tuple(items), self.acts)
        return self.bound

    def __call__(self, x: Any) -> torch.Tensor | None:
        if (
            type(x) is not torch.Tensor
            or x.dtype is not _F32
            or not x.is_cpu
            or (x.requires_grad and torch.is_grad_enabled())
        ):
            return None
        for d in self.hooks:
            if d:
                return None
        for d in self.dicts:
            if "forward" in d:
                return None
        for m in self.dropouts:
            if m.training:
                return None
        b = self.bound
        if b is None and (b := self._bind()) is None:
            return None
        for layer, kp, call in b.items:
            if layer._kernel is not kp or kp._call is not call:  # rebound (a new bias): rebuild
                if (b := self._bind()) is None:
                    return None
                break
        for layer, _, call in b.items:
            bias = call[4]
            if layer._buffers.get("bias", _UNSET) is not bias or (
                bias is not None and bias.data_ptr() != call[5]
            ):
                return None  # replaced since bound: the unfused call rebinds
        shape = x.shape
        if len(shape) == 2:
            rows, width = shape
            lead = None
        elif len(shape) == 3:
            lead, seq, width = shape
            rows = lead * seq
        else:
            return None
        if (
            width != b.in_f
            or not rows
            or (b.int_mm and rows >= kernels.INT_MM_MIN_ROWS)
            or not x.is_contiguous()
        ):
            return None
        y = torch.empty(rows, b.out_f) if lead is None else torch.empty(lead, seq, b.out_f)
        if y.dtype is not _F32:
            return None
        if b.run(b.fn, b.addr, x.data_ptr(), y.data_ptr(), rows, 0):
            return None  # out of memory or NaN / Inf: the unfused call raises the layer's error
        return y

    def unfused(self, x: Any) -> Any:
        for m in self.modules:
            x = m(x)
        return x


def _steps(modules: list[Any]) -> list[Any]:
    """The Sequential's modules with each fusable run replaced by one :class:`Run`."""
    steps: list[Any] = []
    i, n = 0, len(modules)
    while i < n:
        if not _is_packed(modules[i]):
            steps.append(modules[i])
            i += 1
            continue
        k = i
        while k < n and (_is_packed(modules[k]) or _act(modules[k]) is not None):
            k += 1
        part = modules[i:k]
        if sum(map(_is_packed, part)) >= 2:
            steps.append(Run(part))
        else:
            steps.extend(part)
        i = k
    return steps


class _State:
    """What a PackedSequential found in its children (rebuilt when they change)."""

    def __init__(self, seq: nn.Sequential) -> None:
        self.children = tuple(seq._modules.values())
        steps = _steps(list(self.children)) if kernels.has_entry(ENTRY) else []
        self.fused = any(type(s) is Run for s in steps)
        self.steps = tuple(steps)


def _hooked() -> bool:
    """Global module hooks (``register_module_forward_hook`` & co.) would miss fused layers."""
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


class PackedSequential(nn.Sequential):
    """``nn.Sequential`` whose runs of packed Linears take one C call each (see the module
    docstring); the same children, names, state dict and printing as the plain class."""

    def _get_name(self) -> str:
        return "Sequential"  # prints as the Sequential it was

    def __getstate__(self) -> dict[str, Any]:
        """Without the runs' C structs (raw pointers): a copy finds its own runs."""
        state = super().__getstate__()
        state.pop("_qd_chain", None)
        return state

    def forward(self, input: Any) -> Any:
        if torch.jit.is_tracing() or _is_compiling() or _hooked():
            return super().forward(input)
        st = self.__dict__.get("_qd_chain")
        if st is None or tuple(self._modules.values()) != st.children:
            st = self.__dict__["_qd_chain"] = _State(self)
        if not st.fused:
            return super().forward(input)
        x = input
        for step in st.steps:
            if type(step) is Run:
                y = step(x)
                x = step.unfused(x) if y is None else y
            else:
                x = step(x)
        return x


def fusable(seq: nn.Module) -> bool:
    """Whether ``seq`` is a plain ``nn.Sequential`` (not a subclass) holding a fusable run."""
    return type(seq) is nn.Sequential and any(
        type(s) is Run for s in _steps(list(seq._modules.values()))
    )


def fuse_sequentials(model: nn.Module) -> nn.Module:
    """Make every plain ``nn.Sequential`` of ``model`` (itself included) that holds a run of
    >= 2 packed Linears a :class:`PackedSequential`, in place (nothing else changes: same
    object, children, state dict). A no-op where the kernels or ``qd_chain_run`` are missing."""
    if not kernels.has_entry(ENTRY):
        return model
    for m in model.modules():
        if fusable(m):
            m.__class__ = PackedSequential
    return model


def unfuse_sequentials(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_sequentials`: every :class:`PackedSequential` becomes ``nn.Sequential``."""
    for m in model.modules():
        if type(m) is PackedSequential:
            m.__dict__.pop("_qd_chain", None)
            m.__class__ = nn.Sequential
    return model
