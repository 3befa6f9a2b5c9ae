"""Transcriptions of facebookresearch/mae's models_mae.py code paths (MaskedAutoencoderViT methods as
plain functions): the baselines the benchmarks time and the tests compare against. Square RGB images."""
import torch


def random_masking(x, mask_ratio, noise):
    """MaskedAutoencoderViT.random_masking, with the noise passed in."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def decoder_input(x, ids_restore, mask_token, decoder_pos_embed, repeat=True):
    """The start of MaskedAutoencoderViT.forward_decoder after decoder_embed (``repeat=False``: the same
    with an expanded rather than repeated index, i.e. plain torch.gather)."""
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    index = ids_restore.unsqueeze(-1)
    index = index.repeat(1, 1, x.shape[2]) if repeat else index.expand(-1, -1, x.shape[2])
    x_ = torch.gather(x_, dim=1, index=index)
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + decoder_pos_embed


def patchify(imgs, p):
    """MaskedAutoencoderViT.patchify."""
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))


def forward_loss(imgs, pred, mask, p, norm_pix_loss=True):
    """MaskedAutoencoderViT.forward_loss."""
    target = patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()
