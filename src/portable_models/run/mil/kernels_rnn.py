"""numpy kernels: lstm, gru and rnn, as the MIL op definitions specify them.

Layouts (MIL, not torch): ``x`` is ``[seq, batch, input]``; LSTM gate blocks are
ordered ``[input, forget, output, cell]`` and GRU blocks ``[reset, output, update]``.
A ``reverse`` layer walks the sequence backwards and writes its outputs in the order it
produced them; a ``bidirectional`` LSTM writes the backward half aligned with the
input time steps. The LSTM ``clip`` bounds the cell state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from portable_models.run.mil.kernels_infer import no_kernel_error

__all__ = ["RNN_KERNELS", "activation"]

Args = Mapping[str, Any]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "scaled_tanh": np.tanh,  # default alpha = beta = 1
    "relu": lambda x: np.maximum(x, 0.0),
    "linear": lambda x: x,
    "hard_sigmoid": lambda x: np.clip(0.2 * x + 0.5, 0.0, 1.0),
    "sigmoid_hard": lambda x: np.clip(0.2 * x + 0.5, 0.0, 1.0),
}


def activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    try:
        return _ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown recurrent activation '{name}'") from None


def _f64(v: Any) -> np.ndarray:
    return np.asarray(v, np.float64)


def _bias(args: Args, key: str, rows: int) -> np.ndarray:
    b = args.get(key)
    return np.zeros(rows) if b is None else _f64(b).reshape(-1)


# -- LSTM --------------------------------------------------------------------------
def _lstm_direction(x: np.ndarray, h: np.ndarray, c: np.ndarray, params: dict[str, Any],
                    acts: tuple[Any, Any, Any], clip: float | None,
                    reverse: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w_ih, w_hh, b, p = params["w_ih"], params["w_hh"], params["b"], params["p"]
    rec, cell, out_act = acts
    p_i, p_f, p_o = np.split(p, 3)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs = []
    for t in steps:
        gates = x[t] @ w_ih.T + h @ w_hh.T + b
        gi, gf, go, gz = np.split(gates, 4, axis=-1)
        i = rec(gi + c * p_i)
        f = rec(gf + c * p_f)
        z = cell(gz)
        c = f * c + i * z
        if clip is not None:
            c = np.clip(c, -clip, clip)
        o = rec(go + c * p_o)
        h = o * out_act(c)
        outputs.append(h)
    return np.stack(outputs), h, c


def _lstm_params(args: Args, suffix: str, hidden: int) -> dict[str, Any]:
    p = args.get("peephole" + suffix)
    return {
        "w_ih": _f64(args["weight_ih" + suffix]),
        "w_hh": _f64(args["weight_hh" + suffix]),
        "b": _bias(args, "bias" + suffix, 4 * hidden),
        "p": np.zeros(3 * hidden) if p is None else _f64(p).reshape(-1),
    }


def lstm(op: Any, args: Args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _f64(args["x"])
    h0, c0 = _f64(args["initial_h"]), _f64(args["initial_c"])
    direction = str(args.get("direction", "forward"))
    hidden = _f64(args["weight_hh"]).shape[1]
    acts = (activation(str(args.get("recurrent_activation", "sigmoid"))),
            activation(str(args.get("cell_activation", "tanh"))),
            activation(str(args.get("activation", "tanh"))))
    clip = None if args.get("clip") is None else float(args["clip"])
    seq_out = bool(args.get("output_sequence", False))
    if direction != "bidirectional":
        ys, h, c = _lstm_direction(x, h0, c0, _lstm_params(args, "", hidden), acts, clip,
                                   direction == "reverse")
        return (ys if seq_out else ys[-1:]), h, c
    yf, hf, cf = _lstm_direction(x, h0[:, :hidden], c0[:, :hidden], _lstm_params(args, "", hidden),
                                 acts, clip, False)
    yb, hb, cb = _lstm_direction(x, h0[:, hidden:], c0[:, hidden:],
                                 _lstm_params(args, "_back", hidden), acts, clip, True)
    yb = yb[::-1]  # back to input time order
    ys = np.concatenate([yf, yb], axis=-1) if seq_out else np.concatenate([yf[-1:], yb[:1]], axis=-1)
    return ys, np.concatenate([hf, hb], axis=-1), np.concatenate([cf, cb], axis=-1)


# -- GRU / RNN ----------------------------------------------------------------------
def gru(op: Any, args: Args) -> tuple[np.ndarray, np.ndarray]:
    """o = act(W_o x + b_o + R_o (r * h)); the iOS18 ``input_bias`` adds to the input
    projections. iOS18 ``reset_after=True`` is refused: coremltools' own parity test of
    it against torch is marked as failing, so its device semantics are not pinned."""
    if bool(args.get("reset_after", False)):
        raise no_kernel_error("gru", "reset_after=True has no pinned semantics")
    x, h = _f64(args["x"]), _f64(args["initial_h"])
    w_ih, w_hh = _f64(args["weight_ih"]), _f64(args["weight_hh"])
    hidden = w_hh.shape[1]
    b = _bias(args, "bias", 3 * hidden)
    b_in = _bias(args, "input_bias", 3 * hidden)
    rec = activation(str(args.get("recurrent_activation", "sigmoid")))
    act = activation(str(args.get("activation", "tanh")))
    wr, wo, wz = np.split(w_ih, 3)
    rr, ro, rz = np.split(w_hh, 3)
    br, bo, bz = np.split(b, 3)
    ir, io, iz = np.split(b_in, 3)
    reverse = str(args.get("direction", "forward")) == "reverse"
    outputs = []
    for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
        xt = x[t]
        r = rec(xt @ wr.T + ir + h @ rr.T + br)
        z = rec(xt @ wz.T + iz + h @ rz.T + bz)
        o = act(xt @ wo.T + io + bo + (r * h) @ ro.T)
        h = (1.0 - z) * o + z * h
        outputs.append(h)
    ys = np.stack(outputs)
    return (ys if bool(args.get("output_sequence", False)) else ys[-1:]), h


def rnn(op: Any, args: Args) -> tuple[np.ndarray, np.ndarray]:
    x, h = _f64(args["x"]), _f64(args["initial_h"])
    w_ih, w_hh = _f64(args["weight_ih"]), _f64(args["weight_hh"])
    b = _bias(args, "bias", w_hh.shape[0])
    act = activation(str(args.get("activation", "tanh")))
    reverse = str(args.get("direction", "forward")) == "reverse"
    outputs = []
    for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
        h = act(x[t] @ w_ih.T + h @ w_hh.T + b)
        outputs.append(h)
    ys = np.stack(outputs)
    return (ys if bool(args.get("output_sequence", False)) else ys[-1:]), h


RNN_KERNELS = {"lstm": lstm, "gru": gru, "rnn": rnn}
