"""TSQ's pieces: sparse quantization of activations and ternary weights by iterative least
squares."""

import pytest
import torch

from gppq_dist.pq.ternary import (
    InputQuantizer,
    fit_sparse_quantizer,
    reconstruction_error,
    sparse_quantize,
    ternary_codes,
    ternary_least_squares,
    twn,
)


def test_sparse_quantization_zeroes_small_values_and_passes_gradients_inside_its_range():
    x = torch.tensor([-1.0, 0.0, 0.1, 0.25, 0.3, 0.55, 0.9, 5.0], requires_grad=True)
    y = sparse_quantize(x, eps=0.2, step=0.25, levels=3)
    # levels: 0.325, 0.575, 0.825 (midpoints of (0.2, 0.45], (0.45, 0.7], (0.7, 0.95+])
    assert y.detach().tolist() == pytest.approx([0, 0, 0, 0.325, 0.325, 0.575, 0.825, 0.825])
    y.sum().backward()
    assert x.grad.tolist() == [0, 0, 0, 1, 1, 1, 1, 0]


def test_the_fitted_quantizer_has_the_sparsity_asked_for_and_a_locally_best_step():
    torch.manual_seed(0)
    samples = torch.relu(torch.randn(50_000))  # half zeros, like a ReLU output
    eps, step = fit_sparse_quantizer(samples, bits=2, sparsity=0.7)
    zero = float((sparse_quantize(samples, eps, step, 3) == 0).float().mean())
    assert zero == pytest.approx(0.7, abs=0.01)
    above = samples[samples > eps]

    def error(s):
        return float(((sparse_quantize(above, eps, s, 3) - above) ** 2).sum())

    assert error(step) <= min(error(step * 0.8), error(step * 1.25))


def test_least_squares_recovers_an_exactly_ternary_layer():
    torch.manual_seed(0)
    t = torch.randint(-1, 2, (8, 40)).float()
    alpha = torch.rand(8) + 0.5
    weight = alpha.unsqueeze(1) * t
    x = torch.randn(500, 40)
    found_t, found_alpha = ternary_least_squares(weight, x.T @ x, ridge=0.0)
    assert torch.equal(found_t, t)
    assert torch.allclose(found_alpha, alpha, atol=1e-5)


def test_least_squares_beats_the_threshold_rule_on_the_output_error():
    """Correlated inputs: fitting the layer's output on the codes is not fitting its weights."""
    torch.manual_seed(0)
    weight = torch.randn(16, 72) * 0.1
    mixing = torch.randn(72, 72) * 0.3 + torch.eye(72)
    codes = torch.relu(torch.randn(2000, 72) @ mixing)
    moment = (codes.T @ codes).double()
    t0, a0 = twn(weight)
    start = reconstruction_error(weight, t0, a0, moment)
    one = reconstruction_error(weight, *ternary_least_squares(weight, moment, iterations=1, ridge=0.0), moment)
    three = reconstruction_error(weight, *ternary_least_squares(weight, moment, iterations=3, ridge=0.0), moment)
    assert three <= one < 0.8 * start


def test_the_finetune_quantizer_is_exact_on_a_ternary_weight_and_the_hook_round_trips():
    alpha = torch.tensor([0.5, 2.0])
    t = torch.tensor([[1.0, 0.0, -1.0], [0.0, -1.0, 1.0]])
    assert torch.equal(ternary_codes(alpha.unsqueeze(1) * t, alpha), t)
    hook = InputQuantizer(0.1, 0.2, 3)
    again = InputQuantizer.from_tensor(hook.to_tensor())
    x = torch.rand(100)
    assert torch.equal(hook(None, (x,))[0], again(None, (x,))[0])
