"""A small multilayer perceptron in NumPy, the demo's networks: linear layers, ReLU,
softmax cross-entropy and plain SGD; batch normalization is ``fastbn.BatchNorm`` (with
its fused ReLU).  Every layer has ``forward``, ``backward`` and ``params`` (pairs of a
parameter and its gradient, updated in place by ``sgd_step``)."""

import numpy as np

from ..module import BatchNorm


class Linear:
    """``y = x @ weight + bias`` (``weight`` (n_in, n_out)), He-initialized (normal with
    standard deviation ``sqrt(2 / n_in)``) unless ``init_std`` is given."""

    def __init__(self, n_in, n_out, rng, bias=True, dtype=np.float32, init_std=None):
        std = np.sqrt(2.0 / n_in) if init_std is None else init_std
        self.weight = (rng.standard_normal((n_in, n_out)) * std).astype(dtype)
        self.bias = np.zeros(n_out, dtype) if bias else None
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else np.zeros_like(self.bias)

    def forward(self, x):
        self._x = x
        y = x @ self.weight
        return y if self.bias is None else y + self.bias

    def backward(self, dy):
        self.grad_weight[...] = self._x.T @ dy
        if self.bias is not None:
            self.grad_bias[...] = dy.sum(axis=0)
        return dy @ self.weight.T

    def params(self):
        pairs = [(self.weight, self.grad_weight)]
        if self.bias is not None:
            pairs.append((self.bias, self.grad_bias))
        return pairs


class ReLU:
    def forward(self, x):
        self._mask = x > 0
        return np.where(self._mask, x, 0).astype(x.dtype, copy=False)

    def backward(self, dy):
        return np.where(self._mask, dy, 0).astype(dy.dtype, copy=False)

    def params(self):
        return []


class BatchNormReLU:
    """``fastbn.BatchNorm`` over the features of (batch, features) data, with ReLU fused into
    its pass (``activation="relu"``) or without an activation."""

    def __init__(self, n, relu=True, dtype=np.float32):
        self.bn = BatchNorm(n, axis=1, dtype=dtype, activation="relu" if relu else None)

    def forward(self, x):
        return self.bn(x)

    def pre_activation(self, x):
        """Batch norm's output before its ReLU, with the batch's statistics (NumPy: for the
        record only, the fused pass does not keep it)."""
        x64 = x.astype(np.float64)
        z = (x64 - x64.mean(axis=0)) / np.sqrt(x64.var(axis=0) + self.bn.eps)
        return z * self.bn.weight + self.bn.bias

    def backward(self, dy):
        return self.bn.backward(dy)

    def params(self):
        return [(self.bn.weight, self.bn.grad_weight), (self.bn.bias, self.bn.grad_bias)]


class MLP:
    """``sizes[0]`` inputs, hidden layers ``sizes[1:-1]``, ``sizes[-1]`` logits.  Each hidden
    layer is linear then ReLU, or with ``batch_norm`` linear (no bias: batch norm's
    shift replaces it) then batch norm with the ReLU fused.  ``init_std``: the hidden
    layers' initial weights' standard deviation (default He's)."""

    def __init__(self, sizes, rng, batch_norm=False, dtype=np.float32, init_std=None):
        self.layers = []
        for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
            linear = Linear(n_in, n_out, rng, bias=not batch_norm, dtype=dtype,
                            init_std=init_std)
            self.layers.append(linear)
            self.layers.append(BatchNormReLU(n_out, dtype=dtype) if batch_norm else ReLU())
        self.layers.append(Linear(sizes[-2], sizes[-1], rng, dtype=dtype))
        self.linears = [layer for layer in self.layers if isinstance(layer, Linear)]
        self.dtype = np.dtype(dtype)

    def forward(self, x, taps=None):
        """Logits of ``x``; ``taps`` (a list), if given, receives each hidden layer's
        pre-activation: what enters its ReLU (after batch norm, when there is one)."""
        x = np.asarray(x, dtype=self.dtype)
        for layer in self.layers:
            if taps is not None and isinstance(layer, BatchNormReLU):
                taps.append(layer.pre_activation(x))
            elif taps is not None and isinstance(layer, ReLU):
                taps.append(x)
            x = layer.forward(x)
        return x

    def backward(self, dlogits):
        g = dlogits
        for layer in reversed(self.layers):
            g = layer.backward(g)
        return g

    def params(self):
        return [pair for layer in self.layers for pair in layer.params()]

    def train(self, mode=True):
        for layer in self.layers:
            if isinstance(layer, BatchNormReLU):
                layer.bn.train(mode)
        return self

    def eval(self):
        return self.train(False)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of integer ``labels`` under softmax(``logits``), and its gradient
    with respect to the logits (float64 arithmetic, the logits' dtype back)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -logp[np.arange(n), labels].mean()
    grad = np.exp(logp)
    grad[np.arange(n), labels] -= 1.0
    return loss, (grad / n).astype(logits.dtype)


def sgd_step(params, lr):
    """Plain SGD: ``p -= lr * grad`` for every (parameter, gradient) pair, in place."""
    for p, g in params:
        p -= np.asarray(lr * g, dtype=p.dtype)
