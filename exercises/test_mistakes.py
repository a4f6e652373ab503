"""The checkers catch classic mistakes, and say so in words a learner can use.

Each case edits one line of a reference solution into a known mistake, runs the
checker on the edited copy and expects a failure whose message contains a phrase.
"""
from __future__ import annotations

import pytest

from checking import run_check
from catalog import find

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
     "grad_A = dh[0].T @ x[0] if x.ndim == 3 else dh.T @ x",
     "grad_A for x of shape (2, 4, 8): right shape, wrong values: worst index"),
    ("9.6", "grad_B = scaling * dy.T @ h.reshape(-1, r)",
     "grad_B = scaling * dy.T @ h.reshape(-1, r) / dy.shape[0]",
     "grad_B for x of shape (5, 8) is off by a factor of 1/5 = 0.2: did you average over batch and sequence?"),
    ("9.6", "grad_A = dh.reshape(-1, r).T @ x.reshape(-1, d_in)",
     "grad_A = dh.reshape(-1, r).T @ x.reshape(-1, d_in) / (x.shape[0] if x.ndim == 3 else 1)",
     "grad_A for x of shape (2, 4, 8) is off by a factor of 1/2 = 0.5: did you average over the batch?"),
    ("9.8", "self.prompt = rng.standard_normal((prompt_length, d_model)) * 0.5",
     "self.prompt = rng.standard_normal((prompt_length, d_model))", "did you forget the * 0.5?"),
    ("9.8", "rows = rng.integers(0, vocab.shape[0], prompt_length)",
     "rows = np.arange(prompt_length)", "those are the first prompt_length rows"),
    ("9.6", "return grad_A, grad_B, grad_x", "return [grad_A, grad_B, grad_x]",
     "must return a tuple (grad_A, grad_B, grad_x), got list of length 3"),
    ("9.6", "return grad_A, grad_B, grad_x", "grad_A, grad_B, grad_x", "got None (a missing return?)"),
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
    ("9.9", "merged = dict(self.weights)", "merged = self.weights", "leave the layer itself unchanged"),
    ("9.9", 'target_modules=("q", "v"),', 'target_modules=("q", "k", "v", "o"),',
     "the default target_modules"),
    ("9.9", 'raise ValueError(f"unknown target(s) {unknown}; choose among {list(TARGETS)}")',
     'raise ValueError(f"unknown target(s) {unknown}")', "should name the valid choices"),
    ("9.10", "    if optimizer not in OPTIMIZER_STATE_BYTES:\n", "    if False:\n",
     "optimizer='lion') should raise ValueError"),

    ("9.10", "master = num_params * 4 if mixed_precision else 0", "master = 0", "master_weights"),
    ("9.10", "grads, master, states = trainable_params * 4, 0, trainable_params * opt",
     "grads, master, states = num_params * b, 0, trainable_params * opt", "['gradients']"),
    ("9.11", 'w * p["scaling"] * p["B"][layer]', 'w * p["B"][layer]', "'mix'"),
    ("9.11", "return {layer: W + self.delta_weight(layer) for layer, W in self.base_weights.items()}",
     "return {layer: W.__iadd__(self.delta_weight(layer)) for layer, W in self.base_weights.items()}",
     "modified base weight"),
    ("9.11", "del self.adapters[name]\n        if self.active_adapter == name:\n            self.active_adapter = None",
     "del self.adapters[name]", "active_adapter after deleting"),
    ("9.12", "return scale * (np.asarray(q, dtype=np.float64) - zero_point)",
     "return scale * (np.asarray(q) - np.uint8(zero_point)).astype(np.float64)", "wrapped around"),
    ("9.12", "self.qweight, self.scale, self.zero_point = quantize_to_4bit(weight)",
     "self.qweight, self.scale, self.zero_point = quantize_to_4bit(weight); self.W = np.array(weight)",
     "holds a float"),
    ("9.12", "lo, hi = min(float(tensor.min()), 0.0), max(float(tensor.max()), 0.0)",
     "lo, hi = float(tensor.min()), float(tensor.max())", "scale"),
    ("9.13", "dh = da * gelu_grad(self.h)", "dh = da * gelu_grad(self.a)", "backward's return value"),
    ("9.14", "return x @ W.T + self.scaling * self.h @ self.B.T",
     "return x_drop @ W.T + self.scaling * self.h @ self.B.T", "must not touch the frozen path"),
    ("9.14", "(self.rng.random(x.shape) >= self.p) / (1.0 - self.p)",
     "(self.rng.random(x.shape) >= self.p) * 1.0", "1/(1-p)"),
    ("9.14", "dx_drop = dx_drop * self.mask", "dx_drop = dx_drop", "multiplied by the forward's mask"),
    ("9.15", "self.z = x @ self.W_down", "self.z = sublayer_out @ self.W_down", "serial adapter"),
    ("9.16", "return flat.reshape(P, L, 2, H, dh).transpose(1, 2, 0, 3, 4)",
     "return flat.reshape(L, 2, P, H, dh)", "wrong layout"),
    ("9.16", "dpre = (dflat @ self.W2) * (1.0 - self.h * self.h)", "dpre = (dflat @ self.W2) * (1.0 - self.h)",
     "W1_grad"),
    ("9.17", "self.model.zero_grad()\n        B, T, V", "B, T, V", "piled up"),
    ("9.18", "wrapper.lora.B -= lr * wrapper.lora.B_grad", "pass", "lora.B after sgd_step"),
    ("9.19", "allowed = np.concatenate([np.ones((T, P), dtype=bool), np.tril(np.ones((T, T), dtype=bool))], axis=1)",
     "allowed = np.tril(np.ones((T, P + T), dtype=bool))", "prefix must be visible"),
    ("9.19", "dscores = att * (datt - np.sum(datt * att, axis=-1, keepdims=True))", "dscores = att * datt",
     "misses the subtraction"),
    ("9.19", '"dprefix_k": dk_all[:, :, :P].sum(0).swapaxes(0, 1),', '"dprefix_k": dk_all[:, :, :P].swapaxes(1, 2),',
     "sum over the extra leading"),
    ("9.20", "dV = (m / norm)[:, None] * (G - grad_m[:, None] * V_hat)", "dV = (m / norm)[:, None] * G",
     "detached approximation"),
    ("9.20", "grad_m = np.sum(G * V_hat, axis=1)", "grad_m = np.sum(G * V, axis=1)", "unit direction"),
    ("9.21", "absmax = np.abs(blocks).max(axis=1) ", "absmax = np.full(blocks.shape[0], np.abs(blocks).max()) ",
     "give each block of 32 its own absmax"),
    ("9.21", "blocks = weight.reshape(-1, blocksize) ", "blocks = weight.T.reshape(-1, blocksize) ",
     "not of its columns"),
    ("9.21", "codes = np.searchsorted(midpoints, normed) ",
     "codes = np.clip(np.round((normed + 1) * 7.5), 0, 15) ", "that is a uniform grid"),
    ("9.21", "codes = np.searchsorted(midpoints, normed) ",
     "codes = np.searchsorted(midpoints, normed, side='right') ", "halfway between two NF4 levels"),
    ("9.21", "return codes.reshape(-1).astype(np.uint8), absmax.astype(np.float32)",
     "return codes.reshape(-1), absmax", "codes should have dtype uint8"),
    ("9.21", "return codes.reshape(-1).astype(np.uint8), absmax.astype(np.float32)",
     "return codes.reshape(-1).astype(np.uint8), absmax.astype(np.float64)",
     "absmax should have dtype float32"),
    ("9.21", "return (codes[0::2] << 4) | codes[1::2]", "return (codes[1::2] << 4) | codes[0::2]",
     "nibbles are swapped"),
    ("9.22", "A -= lr * grad_A", "A -= lr * loraplus_lr_ratio * grad_A", "the losses with ratio 16"),
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
