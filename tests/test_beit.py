"""BEiT-style pre-training: the block-wise masks, the k-means tokenizer, the model against an unfused reading."""
import pytest
import torch
import torch.nn.functional as F

import mimkernels
from mimkernels.models import BEiT, KMeansTokenizer, beit_block_mask, beit_vit_base_patch16, beit_vit_tiny_patch8


def test_beit_block_mask_statistics_and_determinism():
    mask = beit_block_mask(200, 14, 75, generator=torch.Generator().manual_seed(0))  # BEiT's ViT-B setting
    counts = mask.sum(1)
    assert mask.shape == (200, 196) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert counts.max() <= 75 and counts.float().mean() > 70  # never over, rarely a few short
    assert mask.mean(0).min() > 0  # every position is masked now and then (corners least: blocks lie inside)
    grid = mask.view(200, 14, 14)
    neighbours = (grid[:, 1:] * grid[:, :-1]).sum() + (grid[:, :, 1:] * grid[:, :, :-1]).sum()
    assert neighbours / mask.sum() > 1.2  # blocks, not scattered patches (random 40% would give about 0.8)
    again = beit_block_mask(200, 14, 75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again) and not torch.equal(mask[0], mask[1])


@pytest.mark.parametrize("count, aspect, match", [(0, 0.3, "count must be"), (196, 0.3, "count must be"),
                                                  (2.5, 0.3, "count must be"), (10, 0.0, "min_aspect")])
def test_beit_block_mask_bad_arguments(count, aspect, match):
    with pytest.raises(ValueError, match=match):
        beit_block_mask(1, 14, count, min_aspect=aspect)


def test_beit_block_mask_ignores_the_default_device():
    """Under ``torch.set_default_device`` (here "meta", standing in for "cuda") the mask is drawn on the host from
    the same seed: the same mask, no device tensor read back."""
    torch.manual_seed(0)
    want = beit_block_mask(2, 14, 75)
    torch.manual_seed(0)
    with torch.device("meta"):
        got = beit_block_mask(2, 14, 75)
    assert got.device.type == "cpu" and torch.equal(got, want)


def _tokenizer(vocab=16):
    gen = torch.Generator().manual_seed(0)
    return KMeansTokenizer.fit(torch.randn(8, 3, 64, 64, generator=gen), 8, vocab, iters=3, generator=gen)


def test_kmeans_tokenizer_codes_are_the_nearest_centres():
    tokenizer = _tokenizer()
    assert tokenizer.vocab_size == 16 and tokenizer.centroids.shape == (16, 8 * 8 * 3)
    imgs = torch.randn(2, 3, 64, 64)
    codes = tokenizer(imgs)
    assert codes.shape == (2, 64) and codes.dtype == torch.int64
    patches = KMeansTokenizer._normalised_patches(imgs, 8)
    distances = ((patches.unsqueeze(2) - tokenizer.centroids) ** 2).sum(-1)
    assert torch.equal(codes, distances.argmin(-1))
    assert torch.equal(_tokenizer().centroids, tokenizer.centroids)  # seeded: the same fit on every rank
    with pytest.raises(ValueError, match="cannot fit 1000 centres"):
        KMeansTokenizer.fit(torch.randn(1, 3, 64, 64), 8, 1000)
    with pytest.raises(ValueError, match="centroids must be"):
        KMeansTokenizer(8, torch.randn(4, 100))
    with pytest.raises(ValueError, match=r"imgs must be \[batch, 3, height, width\]"):  # a cdist error before
        tokenizer(torch.randn(2, 1, 64, 64))


def _unfused_beit_loss(model, imgs, mask):
    """BEiT's forward as the official code writes it: Conv2d patches, mask token blended in, the head on the
    masked positions only (x[bool_masked_pos]), cross-entropy against the tokenizer's codes there."""
    p = model.patch_embed.patch_size
    x = F.conv2d(imgs, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    w = mask.unsqueeze(-1)
    x = x * (1 - w) + model.mask_token * w + model.pos_embed[:, 1:]
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
    with mimkernels.use_backend("torch"):
        for block in model.blocks:
            x = block(x)
    x = model.norm(x)[:, 1:]
    chosen = mask.bool()
    return F.cross_entropy(model.lm_head(x[chosen]), model.tokenizer(imgs)[chosen])


def test_beit_loss_is_the_official_masked_cross_entropy():
    torch.manual_seed(0)
    model = beit_vit_tiny_patch8(_tokenizer(), vocab_size=16)
    imgs = torch.randn(2, 3, 64, 64)
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(1))
    with mimkernels.use_backend("torch"):
        loss, logits, got_mask = model(imgs, mask=mask)
    assert logits.shape == (2, 64, 16) and torch.equal(got_mask, mask)
    torch.testing.assert_close(loss, _unfused_beit_loss(model, imgs, mask), rtol=1e-5, atol=1e-6)


def test_fused_matches_torch_backend_forward_and_every_gradient(device):
    torch.manual_seed(0)
    model = beit_vit_tiny_patch8(_tokenizer(), vocab_size=16).to(device)
    imgs = torch.randn(2, 3, 64, 64, device=device)
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(1))
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with mimkernels.use_backend(backend):
            loss, logits, _ = model(imgs, mask=mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want_loss, want_grads), (loss, grads) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and "mask_token" in grads and "lm_head.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def _loss_grads_logits(model, imgs, **kwargs):
    model.zero_grad(set_to_none=True)
    loss, logits, mask = model(imgs, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, logits, mask


@pytest.mark.parametrize("backend, weights", [("torch", "drawn"), ("torch", "given"), ("torch", "fractional"),
                                             ("triton", "fractional")])
def test_head_on_masked_patches_gives_the_loss_and_gradients_of_the_head_on_all(backend, weights):
    """The head on ``masked_count()`` patches per sample (the masked ones first) against the head on every patch:
    the same loss and every gradient, for a drawn mask (from the same seed), a given block mask, and given real
    weights of either sign (zeros wherever a sample masks nothing)."""
    torch.manual_seed(0)
    model = beit_vit_tiny_patch8(_tokenizer(), vocab_size=16, img_size=32)  # 4 x 4 patches: at 64 px the
    imgs = torch.randn(3, 3, 32, 32)                                         # interpreter took 50 s a case
    kwargs = {}
    if weights != "drawn":
        mask = model.random_mask(3, generator=torch.Generator().manual_seed(1))
        if weights == "fractional":
            mask = mask * torch.empty_like(mask).uniform_(-0.5, 2.0, generator=torch.Generator().manual_seed(2))
            mask[1] = 0.0  # a sample with no masked patch: its rows weigh 0 in either head
        kwargs["mask"] = mask
    results = {}
    for head_on in ("all", "masked"):
        model.head_on = head_on
        torch.manual_seed(3)  # the drawn masks
        with mimkernels.use_backend(backend):
            results[head_on] = _loss_grads_logits(model, imgs, **kwargs)
    (want, want_grads, all_logits, mask), (loss, grads, logits, got_mask) = results["all"], results["masked"]
    assert torch.equal(got_mask, mask) and logits.shape == (3, model.masked_count(), 16)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and "lm_head.weight" in grads and "mask_token" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    rows = model.head_rows(mask)
    torch.testing.assert_close(logits, all_logits.gather(1, rows.unsqueeze(-1).expand(-1, -1, 16)),
                               rtol=1e-5, atol=1e-6)
    predicted = model.patch_predictions(logits, mask)
    assert predicted.shape == mask.shape and (predicted[mask != 0] >= 0).all()
    ran = predicted >= 0
    assert ran.sum(1).tolist() == [model.masked_count()] * 3
    assert torch.equal(predicted[ran], model.patch_predictions(all_logits, mask)[ran])


def test_head_rows_put_each_samples_masked_patches_first_in_patch_order():
    model = beit_vit_tiny_patch8(torch.nn.Identity(), vocab_size=16, mask_ratio=0.0625)  # 4 rows of 64 patches
    mask = torch.zeros(2, 64)
    mask[0, [50, 3, 17]] = 1.0
    mask[1, [0, 63]] = torch.tensor([-0.5, 2.0])
    assert model.head_rows(mask).tolist() == [[3, 17, 50, 0], [0, 63, 1, 2]]
    assert model.head_rows(mask, 0.05).tolist() == [[3, 17, 50], [0, 63, 1]]
    with pytest.raises(ValueError, match=r"mask must be a \[batch, 64\] tensor"):
        model.head_rows(torch.zeros(2, 63))


def test_head_on_masked_refuses_a_mask_it_does_not_cover():
    """A given mask with more masked patches in a sample than ``masked_count(mask_ratio)``: a ValueError where the
    mask can be read without a GPU sync (on the CPU), a NaN loss where it cannot (here: under torch.compile, which
    does not read tensors on the host), never a loss that leaves patches out."""
    model = beit_vit_tiny_patch8(_tokenizer(), vocab_size=16, head_on="masked")  # 26 of 64 patches
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64)
    mask[1, :27] = 1.0
    with pytest.raises(ValueError, match="mask masks up to 27 patches of a sample, more than the 26"):
        model(imgs, mask=mask)
    with mimkernels.use_backend("torch"):
        assert torch.isfinite(model(imgs, mask_ratio=0.5, mask=mask)[0])  # a larger ratio covers it
        compiled = torch.compile(lambda imgs, mask: model(imgs, mask=mask)[0], fullgraph=True, backend="aot_eager")
        assert torch.isnan(compiled(imgs, mask))
        assert torch.isfinite(compiled(imgs, mask * (torch.arange(64) < 26)))  # 26 masked: covered
    with pytest.raises(ValueError, match="head_on must be one of"):
        beit_vit_tiny_patch8(_tokenizer(), vocab_size=16, head_on="unmasked")
    model.head_on = "masked_only"
    with pytest.raises(ValueError, match="head_on must be one of"):
        model(imgs)


def test_beit_checks_its_input():
    model = beit_vit_tiny_patch8(_tokenizer(), vocab_size=16)
    imgs = torch.randn(2, 3, 64, 64)
    with mimkernels.use_backend("torch"):
        loss, _, mask = model(imgs)
        assert torch.isfinite(loss) and 20 <= mask.sum(1).min() and mask.sum(1).max() <= 26
        with pytest.raises(ValueError, match=r"mask must be a \[2, 64\] tensor"):
            model(imgs, mask=torch.zeros(2, 10))
        with pytest.raises(TypeError, match="mask must be bool, integer or real"):
            model(imgs, mask=torch.zeros(2, 64, dtype=torch.complex64))
        broken = beit_vit_tiny_patch8(torch.nn.Identity(), vocab_size=16)
        with pytest.raises(ValueError, match="the tokenizer must give integer codes"):
            broken(imgs)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        beit_vit_tiny_patch8()
    with pytest.raises(ValueError, match="norm_pix_loss does not apply"):
        beit_vit_tiny_patch8(_tokenizer(), norm_pix_loss=True)
    # codes past the head: an IndexError in cross_entropy on the CPU before, a device assert on a GPU
    with pytest.raises(ValueError, match="assigns 16 visual tokens, more than vocab_size = 8"):
        beit_vit_tiny_patch8(_tokenizer(), vocab_size=8)
    # 0 built a head of no outputs that failed at the first forward; 1, a loss of 0 that learns nothing
    for vocab in (0, 1, 16.0, True):
        with pytest.raises(ValueError, match=f"vocab_size must be an int >= 2, got {vocab!r}"):
            beit_vit_tiny_patch8(torch.nn.Identity(), vocab_size=vocab)
    for ratio in (0.0, 0.001, 1.0, float("nan"), True):  # named as the ratio (an error about a count before)
        with pytest.raises(ValueError, match="mask_ratio must mask some but not all of the 64 patches"):
            model(imgs, mask_ratio=ratio)
        with pytest.raises(ValueError, match="mask_ratio must mask some but not all of the 64 patches"):
            beit_vit_tiny_patch8(_tokenizer(), mask_ratio=ratio)  # at construction, not at the first forward
    with torch.device("meta"):
        base = beit_vit_base_patch16(torch.nn.Identity())
    assert isinstance(base, BEiT) and base.lm_head.out_features == 8192 and base.patch_embed.num_patches == 196
