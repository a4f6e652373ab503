"""The gradient checker itself: it must pass right code and *fail* wrong code, loudly.

A checker that never fails proves nothing, so each classic backward mistake is
planted in a ``Linear`` subclass and the checker must raise ``GradientMismatch``
naming the broken gradient.
"""
import numpy as np
import pytest

from gradcheck import (GradientMismatch, check_model_loss, check_module, compare,
                       numerical_gradient, rel_error)
from nn import Linear


class ForgotTranspose(Linear):
    """Weight gradient ``x.T @ dout`` instead of ``dout.T @ x`` (square layer: same shape)."""

    def backward(self, dout):
        x2, d2 = self.x.reshape(-1, self.in_features), dout.reshape(-1, self.out_features)
        self._accumulate("weight", x2.T @ d2)
        self._accumulate("bias", d2.sum(0))
        return dout @ self.weight


class DroppedBiasGrad(Linear):
    def backward(self, dout):
        x2, d2 = self.x.reshape(-1, self.in_features), dout.reshape(-1, self.out_features)
        self._accumulate("weight", d2.T @ x2)
        return dout @ self.weight


class WrongInputGrad(Linear):
    """``dout @ W.T`` instead of ``dout @ W`` (square layer: same shape, wrong values)."""

    def backward(self, dout):
        super().backward(dout)
        return dout @ self.weight.T


def layer(cls, seed=0):
    rng = np.random.default_rng(seed)
    lin = cls(4, 4, rng=rng, dtype=np.float64)
    lin.bias = rng.standard_normal(4) * 0.5
    return lin, rng.standard_normal((3, 4))


def test_correct_linear_passes_with_tiny_error():
    lin, x = layer(Linear)
    errors = check_module(lin, x, tol=1e-7)
    assert max(errors.values()) < 1e-9


@pytest.mark.parametrize("cls, name", [(ForgotTranspose, "weight"), (DroppedBiasGrad, "bias"),
                                       (WrongInputGrad, "input")])
def test_checker_catches_a_wrong_backward(cls, name):
    lin, x = layer(cls)
    with pytest.raises(GradientMismatch) as info:
        check_module(lin, x, tol=1e-7)
    message = str(info.value)
    assert message.startswith(f"{name}:")
    assert "worst index" in message and "analytic" in message and "numerical" in message


def test_missing_gradient_is_reported_not_crashed():
    lin, x = layer(Linear)
    lin.requires_grad_(False, ["bias"])
    with pytest.raises(GradientMismatch, match="bias: backward produced no gradient"):
        check_module(lin, x, params=["weight", "bias"])


def test_compare_reports_worst_index_and_both_values():
    a = np.zeros((2, 3))
    b = np.zeros((2, 3))
    b[1, 2] = 0.5
    with pytest.raises(GradientMismatch, match=r"worst index \(1, 2\): analytic 0, numerical 0.5"):
        compare("w", a, b, 1e-7)
    with pytest.raises(GradientMismatch, match=r"shape \(2, 3\), expected \(3, 2\)"):
        compare("w", a, b.T, 1e-7)


def test_gradient_mismatch_is_an_assertion_error():
    assert issubclass(GradientMismatch, AssertionError)   # pytest shows it as a failure


def test_rel_error_definition():
    assert rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert rel_error([0.0], [0.0]) == 0.0
    assert rel_error([1.0, 0.0], [3.0, 0.0]) == pytest.approx(2.0 / 4.0)
    assert rel_error([1e-12], [-1e-12]) == pytest.approx(1.0)  # scale-free: tiny wrong is wrong


def test_numerical_gradient_of_a_known_function():
    rng = np.random.default_rng(1)
    x, A = rng.standard_normal(5), rng.standard_normal((5, 5))
    num = numerical_gradient(lambda: float(np.sin(x) @ A @ x), x)
    exact = np.cos(x) * (A @ x) + A.T @ np.sin(x)
    assert rel_error(num, exact) < 1e-9
    assert np.all(np.isfinite(x))                          # x restored, not left perturbed


def test_check_model_loss_sampled_entries_catch_a_bug():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((30, 30))
    loss = lambda: float(np.sum(np.tanh(w) ** 2))          # noqa: E731
    right = lambda: {"w": 2 * np.tanh(w) * (1 - np.tanh(w) ** 2)}  # noqa: E731
    wrong = lambda: {"w": 2 * np.tanh(w)}                  # noqa: E731
    assert check_model_loss(right, loss, {"w": w}, max_entries=20)["w"] < 1e-8
    with pytest.raises(GradientMismatch, match="^w:"):
        check_model_loss(wrong, loss, {"w": w}, max_entries=20)
