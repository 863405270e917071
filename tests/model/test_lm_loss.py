"""The fused, chunked LM-head cross-entropy equals linear + F.cross_entropy in value and gradients."""
import pytest
import torch

from tinyllm_mcore.model import losses as lm_loss
from tinyllm_mcore.model.losses import linear_cross_entropy


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_unfused_reference(monkeypatch, dtype, tol):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * 33 * 300)  # 300-column slices: a ragged last slice
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(1000, 16, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (3, 11), generator=g)
    upstream = torch.rand(3, 11, generator=g)  # e.g. a loss mask times a scale

    loss = linear_cross_entropy(hidden, weight, labels)
    (loss * upstream).sum().backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())

    hidden.grad = weight.grad = None
    logits = (hidden @ weight.t()).float()
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 1000), labels.view(-1), reduction="none").view(3, 11)
    (ref * upstream).sum().backward()

    assert loss.dtype == torch.float32
    torch.testing.assert_close(got[0], ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(got[1].float(), hidden.grad.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got[2].float(), weight.grad.float(), atol=tol, rtol=tol)
