"""Exercise 9.22 (ours) -- LoRA+: a larger learning rate for B.

LoRA starts with ``A`` random and ``B = 0``. Hayou et al. (2024) show that for
wide layers one learning rate for both factors is inefficient: ``B`` should
learn faster than ``A`` (they suggest a ratio of about 16). In practice that is
just two optimizer parameter groups::

    group 0: every trainable parameter except the B's   lr
    group 1: every LoRA B                               lr * loraplus_lr_ratio

Part 1, ``loraplus_param_groups``: build the groups from parameter names, as
``peft_model.create_loraplus_optimizer`` does for the library's optimizers.

Part 2, ``train_lora_regression``: plain SGD on a regression problem with one
LoRA layer, so you can watch the effect. Loss and gradients (exercise 9.6)::

    y    = X @ W0.T + scaling * (X @ A.T) @ B.T        X (N, in), Y (N, out)
    loss = 0.5 * sum((y - Y)**2) / N                    dL/dy = (y - Y) / N
    A   -= lr * grad_A ;   B -= lr * ratio * grad_B

Try it: with ``lr = 0.01``, ratio 16 reaches a far lower loss than ratio 1 in
100 steps, while raising *both* rates 16x diverges (the checker prints the numbers).

Check your work:  ``python exercises/check.py 9.22``
"""
import numpy as np


def loraplus_param_groups(trainable_names, lr, loraplus_lr_ratio=16.0):
    """``[{"names": [...], "lr": lr}, {"names": [...], "lr": lr * ratio}]``.

    A LoRA ``B`` is a name ending in ``"lora.B"``. Keep the names in the order
    given; leave out a group that would be empty. ``ValueError`` unless
    ``loraplus_lr_ratio > 0``.
    """
    # BEGIN SOLUTION validate; split the names on the "lora.B" suffix; drop empty groups
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {loraplus_lr_ratio!r}")
    b_names = [n for n in trainable_names if n.endswith("lora.B")]
    others = [n for n in trainable_names if not n.endswith("lora.B")]
    groups = [{"names": others, "lr": lr}, {"names": b_names, "lr": lr * loraplus_lr_ratio}]
    return [g for g in groups if g["names"]]
    # END SOLUTION


def train_lora_regression(X, Y, W0, A, B, scaling, lr, loraplus_lr_ratio=1.0, steps=100):
    """SGD on the regression above. Returns ``(losses, A, B)``: the loss *before*
    each step (``steps`` floats) and the final factors. Do not modify the
    arguments: start from copies of ``A`` and ``B``."""
    # BEGIN SOLUTION copy the factors; each step: forward, loss, the 9.6 backward, two updates
    A, B = A.copy(), B.copy()
    N = X.shape[0]
    frozen = X @ W0.T                                       # (N, out), never changes
    losses = []
    for _ in range(steps):
        h = X @ A.T                                         # (N, r)
        y = frozen + scaling * h @ B.T                      # (N, out)
        losses.append(0.5 * float(np.sum((y - Y) ** 2)) / N)
        dy = (y - Y) / N                                    # (N, out)
        grad_B = scaling * dy.T @ h                         # (out, r)
        grad_A = (scaling * dy @ B).T @ X                   # (r, in)
        A -= lr * grad_A
        B -= lr * loraplus_lr_ratio * grad_B
    return losses, A, B
    # END SOLUTION
