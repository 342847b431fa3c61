"""``optimize(model)``: :func:`convert`, then a ``torch.fx`` rewrite that fuses ReLU and
the residual add into batch norm and, in eval mode, folds batch norm into the
convolution before it."""

import copy
import operator
import warnings

import torch

import fastbn

from .modules import _FastBatchNorm, convert

__all__ = ["optimize"]

_RELUS_FN = (torch.relu, torch.nn.functional.relu, torch.relu_)
_ADDS_FN = (operator.add, operator.iadd, torch.add)


class _Tracer(torch.fx.Tracer):
    """fx's default tracer, with fastbn's batch norm layers kept as single calls."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _FastBatchNorm) or super().is_leaf_module(m, qualname)


def optimize(model, *, fold=None):
    """Convert ``model``'s batch norm layers and fuse what follows them.

    1. :func:`convert` swaps every PyTorch ``BatchNorm*d`` for fastbn's (in place).
    2. ``torch.fx`` traces the model; ``bn -> relu`` and ``bn -> add -> relu``
       (ResNet's BasicBlock and Bottleneck) become one fastbn call each, with the
       shortcut as the residual and ReLU as the activation.
    3. In eval mode (or with ``fold=True``), batch norm that directly follows a
       convolution without other users is folded into that convolution's weight and
       bias (:func:`fastbn.fold_batch_norm`); the result is then for inference only.
       A ``conv -> add -> relu`` left behind (the end of a ResNet block, once folded)
       then adds and clips in place, in the convolution's fresh output: ``torch.fx``
       traces ``out += identity`` as an out-of-place add, which costs a fresh tensor
       (and its page faults) that the eager model and ``torch.jit.freeze`` do not pay.

    A model that does not trace is returned converted, unfused, with a warning.

    Parameters
    ----------
    model : torch.nn.Module
    fold : bool, optional
        Fold batch norm into convolutions; default: when ``model`` is in eval mode.

    Returns
    -------
    torch.nn.Module
        A ``torch.fx.GraphModule`` sharing ``model``'s parameters (folded convolutions
        are new modules; ``model``'s own are left untouched), or the converted
        ``model`` when it does not trace.
    """
    model = convert(model)
    if fold is None:
        fold = not model.training
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # control flow on values, unsupported Python, ...
        warnings.warn(f"fastbn.torch.optimize: {type(model).__name__} does not trace with "
                      f"torch.fx ({type(exc).__name__}: {exc}); batch norm is converted but "
                      "not fused", stacklevel=2)
        return model
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    if fold:
        _fold_conv_bn(gm)
        _fuse_conv_add_relu(gm)
    _fuse_epilogues(gm)
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    return gm


# --- pattern matching ---------------------------------------------------------------

def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(gm, node):
    if node.op == "call_function" and node.target in _RELUS_FN:
        return len(node.args) == 1  # inplace=True or not: it acts on bn's own output
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return len(node.args) == 1
    return isinstance(_module(gm, node), torch.nn.ReLU)


def _is_add(node):
    if node.op == "call_function" and node.target in _ADDS_FN:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and (
        len(node.args) == 2 and not node.kwargs)


def _plain_bn(gm, node):
    """A fastbn batch norm call with just its input, not yet fused."""
    return (isinstance(_module(gm, node), _FastBatchNorm) and len(node.args) == 1
            and not node.kwargs)


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse_epilogues(gm):
    graph = gm.graph
    for bn in list(graph.nodes):
        if not _plain_bn(gm, bn):
            continue
        nxt = _only_user(bn)
        if nxt is None:
            continue
        residual, last = None, nxt
        if _is_add(nxt):
            other = [a for a in nxt.args if a is not bn]
            if len(other) != 1 or not isinstance(other[0], torch.fx.Node):
                continue
            if nxt.target in (operator.iadd, "add_") and nxt.args[0] is not bn:
                continue  # writes into the shortcut; keep PyTorch's semantics
            residual, last = other[0], _only_user(nxt)
            if last is None:
                continue
        if not _is_relu(gm, last):
            continue
        with graph.inserting_before(last):
            fused = graph.call_module(bn.target, (bn.args[0], residual),
                                      {"activation": "relu"})
        last.replace_all_uses_with(fused)
        for dead in (last, nxt, bn) if residual is not None else (last, bn):
            graph.erase_node(dead)


_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def add_relu_(out, other):
    """``relu(out + other)``, written into ``out``: a convolution's output that nothing else
    reads (what :func:`optimize` puts after a folded convolution).  Out of place where
    ``other`` would broadcast ``out`` or promote its dtype.

    Two in-place passes, not ``aten::_add_relu_``'s one: that kernel's scalar tail turns
    NaN into 0 (PyTorch 2.13), and ReLU keeps NaN.
    """
    if out.shape != other.shape or out.dtype != other.dtype:
        return torch.relu(out + other)
    return out.add_(other).relu_()


def _fresh_conv_output(gm, node):
    """Whether ``node`` is the output of one of PyTorch's own convolution modules (a new
    tensor) read by one node only."""
    return (isinstance(node, torch.fx.Node) and type(_module(gm, node)) in _CONVS
            and len(node.users) == 1)


def _fuse_conv_add_relu(gm):
    graph = gm.graph
    for add in list(graph.nodes):
        if not _is_add(add) or add.target in (operator.iadd, "add_"):
            continue  # an in-place add already writes into its first operand
        out, other = add.args
        if not _fresh_conv_output(gm, out):
            out, other = other, out
            if not _fresh_conv_output(gm, out):
                continue
        relu = _only_user(add)
        if relu is None or not _is_relu(gm, relu) or not isinstance(other, torch.fx.Node):
            continue
        with graph.inserting_before(relu):
            fused = graph.call_function(add_relu_, (out, other))
        relu.replace_all_uses_with(fused)
        graph.erase_node(relu)
        graph.erase_node(add)


def _fold_conv_bn(gm):
    graph = gm.graph
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for bn in list(graph.nodes):
        module = _module(gm, bn)
        if not (_plain_bn(gm, bn) and module.track_running_stats
                and module.running_mean is not None):
            continue
        conv_node = bn.args[0]
        if not isinstance(conv_node, torch.fx.Node) or len(conv_node.users) != 1:
            continue
        conv = _module(gm, conv_node)
        if not isinstance(conv, _CONVS):
            continue
        if calls[conv_node.target] > 1:  # a convolution applied elsewhere too keeps its weights
            continue
        _set_submodule(gm, conv_node.target, _folded(conv, module))
        bn.replace_all_uses_with(conv_node)
        graph.erase_node(bn)
    gm.delete_all_unused_submodules()


def _folded(conv, bn):
    """A copy of ``conv`` computing ``bn(conv(x))`` with ``bn``'s running statistics."""
    new = copy.deepcopy(conv)
    as_np = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
    w, b = fastbn.fold_batch_norm(as_np(conv.weight), as_np(conv.bias),
                                  as_np(bn.running_mean), as_np(bn.running_var),
                                  as_np(bn.weight), as_np(bn.bias), eps=bn.eps, axis=0)
    like = conv.weight  # empty_like keeps its device, dtype and memory format
    new.weight = torch.nn.Parameter(torch.empty_like(like).copy_(torch.from_numpy(w)),
                                    requires_grad=like.requires_grad)
    new.bias = torch.nn.Parameter(
        torch.empty(w.shape[0], dtype=like.dtype, device=like.device).copy_(
            torch.from_numpy(b)), requires_grad=like.requires_grad)
    return new


def _set_submodule(gm, target, module):
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
