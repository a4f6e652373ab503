# Exercise 9.16: your file to edit. Generated from solutions/ex9_16_prefix_mlp.py by make_stubs.py (body sha256 475ee0aaafe3).
"""Exercise 9.16 (suggested) -- prefix tuning with an MLP reparameterisation.

Prefix tuning learns, for every layer, ``P`` key vectors and ``P`` value vectors
that every query may attend to: a table of shape ``(L, 2, P, H, d_head)``
(``L`` layers; index 0 keys, 1 values; ``H`` heads). Li & Liang (2021, §4.3) found
that optimising this table directly is unstable, and instead produce it with a
small MLP from a learned ``(P, d_model)`` embedding::

    E (P, D) ── W1 (hidden, D), b1 ── tanh ──> (P, hidden) ── W2 (L*2*D, hidden), b2 ──> (P, L*2*D)
                                                                                          │ reshape
    table (L, 2, P, H, d_head)  <── move axis P to the middle <── (P, L, 2, H, d_head) ───┘

(``D = H * d_head``.) Row ``p`` of the MLP's output holds *every* layer's key and
value for prefix position ``p``. After training the MLP is thrown away: the table
it produces is all inference needs (``collapse``).

Your tasks: ``table`` (forward), ``backward`` (gradients of E, W1, b1, W2, b2 from
the gradient of the table) and ``collapse``. ``__init__`` is given.

Check your work:  ``python exercises/check.py 9.16``
"""
import numpy as np


class PrefixMLP:
    """The prefix table ``(L, 2, P, H, d_head)`` as the output of a two-layer tanh MLP."""

    def __init__(self, num_layers, num_heads, d_head, prefix_length=10, hidden=None, rng=None):
        """Given: the sizes and the parameters ``embedding``, ``W1``, ``b1``, ``W2``, ``b2``."""
        rng = rng if rng is not None else np.random.default_rng(0)
        D = num_heads * d_head
        hidden = hidden or D
        self.num_layers, self.num_heads, self.d_head = num_layers, num_heads, d_head
        self.prefix_length, self.d_model, self.hidden = prefix_length, D, hidden
        self.embedding = rng.standard_normal((prefix_length, D))                       # (P, D)
        self.W1 = rng.uniform(-1, 1, (hidden, D)) / np.sqrt(D)                          # (hidden, D)
        self.b1 = np.zeros(hidden)
        self.W2 = rng.uniform(-1, 1, (num_layers * 2 * D, hidden)) / np.sqrt(hidden)    # (L*2*D, hidden)
        self.b2 = np.zeros(num_layers * 2 * D)

    def num_parameters(self):
        return sum(p.size for p in (self.embedding, self.W1, self.b1, self.W2, self.b2))

    def table(self):
        """The prefix table ``(L, 2, P, H, d_head)``; cache what backward needs.

        Hint: after the MLP, ``reshape(P, L, 2, H, d_head)`` then
        ``transpose(1, 2, 0, 3, 4)``. (Reshaping straight to ``(L, 2, P, H, d_head)``
        has the right shape and the wrong layout.)
        """
        raise NotImplementedError("Exercise 9.16: E -> tanh(E W1^T + b1) -> (.) W2^T + b2 -> reshape and move P")

    def backward(self, grad_table):
        """``grad_table (L, 2, P, H, d_head)`` -> set ``embedding_grad``, ``W1_grad``,
        ``b1_grad``, ``W2_grad``, ``b2_grad`` (each the shape of its parameter).

        Undo the layout change first (the inverse of ``transpose(1, 2, 0, 3, 4)`` is
        ``transpose(2, 0, 1, 3, 4)``), then walk the MLP backwards; tanh' = 1 - tanh^2.
        """
        raise NotImplementedError("Exercise 9.16: back to (P, L*2*D), then the second layer, tanh, the first layer")

    def collapse(self):
        """After training: the table as a plain array (a copy), to keep instead of the MLP."""
        raise NotImplementedError("Exercise 9.16: evaluate the MLP once; return a contiguous copy")
