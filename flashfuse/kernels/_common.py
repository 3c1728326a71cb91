"""``@triton.jit`` helpers shared by the kernel families (flash_fwd, flash_fwd_sm90, flash_bwd, flash_decode).

``tanh`` (soft-capping, ``s = cap * tanh(s / cap)``): float32-accurate, and the same code compiled and under
``TRITON_INTERPRET=1``.

NOTE: why not one formula. ``1 - 2 / (exp(2x) + 1)`` cancels for small ``|x|``: its absolute error is about
``ulp(1) = 1.2e-7`` whatever ``x`` is, so its relative error grows as ``1 / |x|``. Gemma 2 caps at 50, which
makes every argument ``|s| / 50`` small (< 0.2), and that error alone made the kernels' outputs and gradients
3x less accurate than eager float32 at the op level (out 1.8e-6 vs 5.9e-7, dK 2.1e-6 vs 6.4e-7) and ~8x
through Gemma 2 training. ``libdevice.tanh`` would be accurate on the GPU, but under the interpreter
(Triton 3.9) it is an unimplemented stub that returns ``None``, and the tests run there; one formula for both
keeps what the tests check equal to what the GPU runs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """``tanh`` of a float32 tensor: relative error <= 9e-8 (1.1 ulp) on [-20, 20] under the interpreter.

    ``|x| < 0.9``: ``x + x³ P(x²)``, P of degree 6, a least-squares fit of ``(tanh(x) - x) / x³`` weighted for
    relative error on [0, 0.9]; 0.15 ulp off tanh in exact arithmetic, the rest is float32 rounding.
    Otherwise ``sign(x) * (1 - 2 / (exp(2|x|) + 1))``: ``2 / (e + 1) <= 0.29`` there, so the subtraction no
    longer cancels (the switch at 0.9 rather than musl's log(3)/2 = 0.55 halves how much the exp's and the
    division's rounding, approximate on the GPU, show in the result: 0.9e-7 vs 1.8e-7 worst case); ``exp``
    overflowing to inf gives exactly ±1, so no NaN for any finite ``x``. NaN propagates. Both branches are
    evaluated (``tl.where``); the polynomial is 7 FMAs, cheap next to the exp and the division.
    """
    ax = tl.abs(x)
    x2 = x * x
    p = -0.000452485
    p = p * x2 + 0.0025741642
    p = p * x2 - 0.00825499
    p = p * x2 + 0.021658221
    p = p * x2 - 0.053927787
    p = p * x2 + 0.13332959
    p = p * x2 - 0.33333322
    small = x + x * (x2 * p)
    big = 1.0 - 2.0 / (tl.exp2(ax * (2.0 * 1.4426950408889634)) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.9, small, big)
