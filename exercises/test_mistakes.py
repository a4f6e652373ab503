"""The checkers catch classic mistakes, and say so in words a learner can use.

Each case edits one line of a reference solution into a known mistake, runs the
checker on the edited copy and expects a failure whose message contains a phrase.
"""
from __future__ import annotations

import pytest

from checking import run_check
from registry import find

# (exercise, text in the solution, replacement, phrase expected in the message)
MISTAKES = [
    ("9.5", "self.scaling = alpha / rank", "self.scaling = rank / alpha", "you computed rank / alpha"),
    ("9.5", "self.B = np.zeros((out_features, rank))", "self.B = rng.standard_normal((out_features, rank))",
     "B must start at zero"),
    ("9.5", "self.A = rng.uniform(-bound, bound, (rank, in_features))",
     "self.A = rng.uniform(-bound, bound, (in_features, rank))", "A reads the input"),
    ("9.5", "return frozen + self.scaling * (h @ self.B.T)", "return frozen + (h @ self.B.T)",
     "missing the scaling alpha / r"),
    ("9.5", "return frozen + self.scaling * (h @ self.B.T)", "return self.scaling * (h @ self.B.T)",
     "frozen path x @ W.T is missing"),
    ("9.5", "return W + self.scaling * (self.B @ self.A)", "W += self.scaling * (self.B @ self.A); return W",
     "modified W (the pretrained weight)"),
    ("9.6", "grad_B = scaling * dy.T @ h.reshape(-1, r)", "grad_B = dy.T @ h.reshape(-1, r)",
     "forget the scaling alpha / r"),
    ("9.6", "grad_A = dh.reshape(-1, r).T @ x.reshape(-1, d_in)",
     "grad_A = x.reshape(-1, d_in).T @ dh.reshape(-1, r)", "looks transposed"),
    ("9.6", "dh = scaling * grad_output @ B ", "dh = 0 * grad_output @ B ", "gradient checks need a random B"),
    ("9.6", "grad_x = dh @ A ", "grad_x = dh.reshape(-1, r) @ A ", "grad_x has shape (8, 8), expected (2, 4, 8)"),
    ("9.6", "grad_A = dh.reshape(-1, r).T @ x.reshape(-1, d_in)",
     "grad_A = dh[0].T @ x[0] if x.ndim == 3 else dh.T @ x", "wrong values: worst index"),
    ("9.7", "return x + f(self.z) @ self.W_up", "return f(self.z) @ self.W_up", "the residual is missing"),
    ("9.7", "return grad_output + dz @ self.W_down.T", "return dz @ self.W_down.T",
     "misses the residual path"),
    ("9.7", "0.5 * z * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z * z * z)))",
     "z * 0.5 * (1.0 + np.vectorize(__import__('math').erf)(z / np.sqrt(2)))",
     "exact (erf) GELU"),
    ("9.8", "self.prompt_grad = grad_output[:, :P].sum(axis=0)",
     "self.prompt_grad = grad_output[:, :P].mean(axis=0)", "averaged over the batch"),
    ("9.8", "return grad_output[:, P:]", "return grad_output", "drop the prompt positions"),
    ("9.8", "self.prompt = vocab[rows].copy()", "self.prompt = vocab[:prompt_length]", "is a view of it"),
    ("9.8", "return np.concatenate([prompt, input_embeds], axis=1)",
     "return np.concatenate([input_embeds, prompt], axis=1)", "the prompt goes first"),
]


def _case_id(case):
    return f"{case[0]}-{case[3][:30]}"


@pytest.mark.parametrize("case", MISTAKES, ids=[_case_id(c) for c in MISTAKES])
def test_checker_names_the_mistake(case, tmp_path):
    ex_id, old, new, phrase = case
    (ex,) = find(ex_id)
    source = ex.solution_path.read_text()
    assert source.count(old) == 1, f"{old!r} should occur once in {ex.solution_path.name}"
    path = tmp_path / ex.solution_path.name
    path.write_text(source.replace(old, new))
    result = run_check(ex.check, path, f"mutant_{ex.slug}")
    assert result.status == "failed", (result.status, result.message)
    assert phrase in result.message, result.message
