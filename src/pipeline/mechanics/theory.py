"""Predictions of the conservation laws of Kunin et al. (ICLR 2021), exact and continuous.

Notation: eta = lr, lam = weight decay, beta = momentum, d = dampening, eta' = eta (1 - d).
Arrays are ``[steps, neurons]``; ``E0 [neurons]`` is the quantity at step 0. All predictions are
returned at every step n = 0..S (S = number of updates logged), from the per-step trace, by
linear recursive filters (:func:`scipy.signal.lfilter`), which run along steps in compiled code
for all neurons at once. Every filter is a decaying (or at worst marginal) recursion of
accumulated terms, so nothing overflows and no term is dropped, unlike exponentially *growing*
integral buffers.

A quantity Q = <theta, J theta> with <g, J theta> = 0 (the symmetry), J diagonal (+1 on the
"plus" slices, -1 on the "minus" ones):

- exact discrete, plain SGD: Q_{n+1} = (1 - eta lam)^2 Q_n + eta^2 <g_n, J g_n>;
- exact discrete, heavy ball (torch's SGD: v_1 = g_0 + lam theta_0, then
  v_{k+1} = beta v_k + (1-d)(g_k + lam theta_k), theta_{k+1} = theta_k - eta v_{k+1}): with
  P_k = <theta_k, J v_k>, R_k = beta P_k + c_k lam Q_k (c_0 = 1, c_k = 1-d),
  Q_{k+1} = Q_k - 2 eta R_k + eta^2 V_{k+1},  P_{k+1} = R_k - eta V_{k+1},  V = <v, J v>;
- continuous, SGD: Q(t) = e^{-2 lam t} Q_0 + eta^2 sum_{k<n} e^{-2 lam eta (n-k)} U_k, t = eta n,
  U = <u, J u> of the update u = g + lam theta;
- continuous, momentum: with dampening d, torch's velocity v is (1-d) times the undamped
  heavy-ball velocity w (w_{k+1} = beta w_k + u_k, theta_{k+1} = theta_k - eta' w_{k+1}), so a
  dampened run is heavy ball at lr eta' = eta (1-d). Its modified equation
  (eta'(1+beta)/2) theta'' + (1-beta) theta' = -(g + lam theta) gives
  Q'' + 2 gamma Q' + omega^2 Q = 2|theta'|^2, gamma = (1-beta)/(eta'(1+beta)),
  omega^2 = 4 lam/(eta'(1+beta)), so Q = h(t) Q_0 + 2 eta' sum_k G(t - tau_k) W_k with the
  Green's function G of the damped oscillator and W = <w, J w> = <v, J v> / (1-d)^2 the
  undamped velocity's, t = eta' n (:func:`time_step`).

Translation (column sums x of the logit layer, sum_c g = 0 under softmax-CE):
exact SGD x_n = (1 - eta lam)^n x_0; exact momentum: the 2-state recursion of (x, sum_c v);
continuous SGD e^{-lam t} x_0; continuous momentum h(t) x_0 with omega^2 = 2 lam/(eta'(1+beta)).
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter, ss2tf


def first_order(r: float, inputs: np.ndarray, x0: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """x_n for n = 0..S of x_{n+1} = r x_n + gain * inputs_n (``inputs [S, M]``)."""
    steps = inputs.shape[0]
    padded = np.concatenate([inputs, np.zeros((1, *inputs.shape[1:]))])
    forced = lfilter([0.0, gain], [1.0, -r], padded, axis=0)
    free = r ** np.arange(steps + 1, dtype=np.float64)
    return forced + free.reshape(-1, *([1] * (inputs.ndim - 1))) * x0


def state_space(A: np.ndarray, B: np.ndarray, x0: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """States ``[S+1, d, M]`` of x_{n+1} = A x_n + B w_n, for x0 ``[d, M]`` and w ``[S, M]``."""
    d = A.shape[0]
    steps = inputs.shape[0]
    padded = np.concatenate([inputs, np.zeros((1, *inputs.shape[1:]))])
    impulse = np.zeros(steps + 1)
    impulse[0] = 1.0
    eye = np.eye(d)
    out = np.empty((steps + 1, d, *inputs.shape[1:]))
    for i in range(d):
        num, den = ss2tf(A, B.reshape(d, 1), eye[i : i + 1], np.zeros((1, 1)))
        state = lfilter(num[0], den, padded, axis=0)
        for j in range(d):
            num_j, _ = ss2tf(A, (A @ eye[:, j]).reshape(d, 1), eye[i : i + 1], np.zeros((1, 1)))
            response = lfilter(num_j[0], den, impulse)  # [n] = (A^n)_{ij} for n >= 1
            response[0] = eye[i, j]
            state = state + response.reshape(-1, *([1] * (inputs.ndim - 1))) * x0[j]
        out[:, i] = state
    return out


# -- exact discrete predictions -----------------------------------------------------------------
def discrete_sgd(q0, jg, lr, wd):
    """Q_n of plain SGD; ``jg[k] = <g_k, J g_k>`` (raw gradient, no weight decay)."""
    return first_order((1 - lr * wd) ** 2, jg, q0, lr**2)


def discrete_momentum(q0, jv, lr, wd, momentum, dampening):
    """Q_n of heavy-ball SGD; ``jv[k] = <v_{k+1}, J v_{k+1}>`` (velocity after update k)."""
    steps = jv.shape[0]
    out = np.empty((steps + 1, *q0.shape))
    out[0] = q0
    if steps == 0:
        return out
    # step 0: v_0 = 0 and torch sets v_1 = g_0 + lam theta_0 (no dampening)
    r0 = wd * q0
    q1 = q0 - 2 * lr * r0 + lr**2 * jv[0]
    p1 = r0 - lr * jv[0]
    c = 1 - dampening
    A = np.array([[1 - 2 * lr * c * wd, -2 * lr * momentum], [c * wd, momentum]])
    B = np.array([lr**2, -lr])
    out[1:] = state_space(A, B, np.stack([q1, p1]), jv[1:])[:, 0]
    return out


def discrete_translation(x0, steps, lr, wd, momentum=0.0, dampening=0.0):
    """Column sums x_n, n = 0..steps, under SGD (heavy ball if momentum > 0), sum_c g = 0."""
    if momentum == 0:
        return first_order(1 - lr * wd, np.zeros((steps, *x0.shape)), x0)
    out = np.empty((steps + 1, *x0.shape))
    out[0] = x0
    if steps == 0:
        return out
    m1 = wd * x0  # v_1 = g_0 + lam theta_0, summed over classes
    x1 = x0 - lr * m1
    c = 1 - dampening
    A = np.array([[1 - lr * c * wd, -lr * momentum], [c * wd, momentum]])
    zero = np.zeros((steps - 1, *x0.shape))
    out[1:] = state_space(A, np.zeros(2), np.stack([x1, m1]), zero)[:, 0]
    return out


# -- continuous predictions (the paper's) -------------------------------------------------------
def time_step(lr: float, momentum: float = 0.0, dampening: float = 0.0) -> float:
    """Physical time per update of the continuous theory: eta for plain SGD, eta' = eta (1-d)
    under momentum (torch ignores dampening without momentum)."""
    return lr * (1 - dampening) if momentum > 0 else lr


def continuous_sgd(q0, ju, lr, wd):
    """Q(t_n) = e^{-2 lam t} Q_0 + eta^2 sum_{k<n} e^{-2 lam eta (n-k)} U_k."""
    r = np.exp(-2 * wd * lr)
    steps = ju.shape[0]
    padded = np.concatenate([ju, np.zeros((1, *ju.shape[1:]))])
    acc = lfilter([0.0, r], [1.0, -r], padded, axis=0)
    decay = np.exp(-2 * wd * lr * np.arange(steps + 1)).reshape(-1, *([1] * (ju.ndim - 1)))
    return decay * q0 + lr**2 * acc


class Oscillator:
    """x'' + 2 gamma x' + omega^2 x = f: homogeneous solution h(t) (x(0)=1, x'(0)=0) and the
    Green's function sum over forcing samples, in time units of eta' per step."""

    def __init__(self, lr, momentum, dampening, omega2):
        self.dt = lr * (1 - dampening)
        self.gamma = (1 - momentum) / (self.dt * (1 + momentum))
        self.omega2 = omega2
        disc = self.gamma**2 - omega2
        scale = max(self.gamma**2, omega2, 1e-300)
        self.regime = (
            "critical"
            if abs(disc) <= 1e-12 * scale
            else "underdamped"
            if disc < 0
            else "overdamped"
        )
        self.root = np.sqrt(abs(disc))

    def homogeneous(self, steps: int) -> np.ndarray:
        t, g, w = self.dt * np.arange(steps + 1), self.gamma, self.root
        if self.regime == "underdamped":
            return np.exp(-g * t) * (np.cos(w * t) + g / w * np.sin(w * t))
        if self.regime == "critical":
            return np.exp(-g * t) * (1 + g * t)
        ap, am = -g + w, -g - w
        return (ap * np.exp(am * t) - am * np.exp(ap * t)) / (ap - am)

    def forced(self, inputs: np.ndarray) -> np.ndarray:
        """sum_{k<n} G(t_n - tau_k) inputs_k for n = 0..S (G(0) = 0)."""
        padded = np.concatenate([inputs, np.zeros((1, *inputs.shape[1:]))])
        g, w, dt = self.gamma, self.root, self.dt
        if self.regime == "underdamped":
            z = np.exp((-g + 1j * w) * dt)
            return lfilter([0.0, z], [1.0, -z], padded.astype(complex), axis=0).imag / w
        if self.regime == "critical":
            r = np.exp(-g * dt)
            return lfilter([0.0, dt * r], [1.0, -2 * r, r * r], padded, axis=0)
        ap, am = -g + w, -g - w
        rp, rm = np.exp(ap * dt), np.exp(am * dt)
        plus = lfilter([0.0, rp], [1.0, -rp], padded, axis=0)
        minus = lfilter([0.0, rm], [1.0, -rm], padded, axis=0)
        return (plus - minus) / (ap - am)


def continuous_momentum(q0, jv, lr, wd, momentum, dampening):
    """Q = h(t) Q_0 + 2 eta' sum_k G(t - tau_k) W_k, omega^2 = 4 lam / (eta'(1+beta)), from
    ``jv[k] = <v_{k+1}, J v_{k+1}>`` of torch's (dampened) velocity: W = jv / (1-d)^2."""
    osc = Oscillator(lr, momentum, dampening, 4 * wd / (lr * (1 - dampening) * (1 + momentum)))
    h = osc.homogeneous(jv.shape[0]).reshape(-1, *([1] * (jv.ndim - 1)))
    return h * q0 + 2 * osc.dt * osc.forced(jv / (1 - dampening) ** 2)


def continuous_translation(x0, steps, lr, wd, momentum=0.0, dampening=0.0):
    """e^{-lam t} x_0 (SGD) or h(t) x_0 with omega^2 = 2 lam / (eta'(1+beta)) (momentum)."""
    shape = (-1, *([1] * np.ndim(x0)))
    if momentum == 0:
        return np.exp(-wd * lr * np.arange(steps + 1)).reshape(shape) * x0
    osc = Oscillator(lr, momentum, dampening, 2 * wd / (lr * (1 - dampening) * (1 + momentum)))
    return osc.homogeneous(steps).reshape(shape) * x0
