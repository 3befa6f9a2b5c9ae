"""Transcriptions of the official code paths, as plain functions: the baselines the benchmarks time and
the tests compare against. facebookresearch/mae's models_mae.py (MaskedAutoencoderViT methods, square RGB
images) and apple/ml-aim's PrefixCausalAttention, both on timm-style blocks with PyTorch's SDPA.

The model-level functions run a mimkernels model's own parameters through the official computation, so
the two implementations are compared (and timed) on the very same weights. ``TimmMAE`` is the other way
round: the official model as a module of timm's own blocks, as users run it, for
``mimkernels.integrations.apply`` to patch."""
from functools import partial

import torch
import torch.nn.functional as F


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


def vit_block(block, x, attn_mask=None):
    """timm's ``Block.forward`` (ml-aim's, with an attention mask) on a mimkernels ``Block``'s parameters."""
    batch, tokens, dim = x.shape
    attn = block.attn
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, dim // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    x = x + attn.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
    return x + block.mlp(block.norm2(x))


def mae_forward(model, imgs, mask_ratio, noise):
    """MaskedAutoencoderViT.forward (encoder, decoder, loss) on a mimkernels MAE's parameters."""
    embed = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # timm PatchEmbed
    return mae_from_embedding(model, imgs, embed, mask_ratio, noise, vit_block, model.patch_embed.patch_size)


def mae_from_embedding(model, imgs, embed, mask_ratio, noise, run_block, patch):
    """MaskedAutoencoderViT.forward after the patch embedding ``embed`` [B, L, E], each block run by
    ``run_block(block, x)``: (loss, pred, mask)."""
    x = embed + model.pos_embed[:, 1:, :]
    if noise is None:  # the official code's draw
        noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
    x, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls_token = model.cls_token + model.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for block in model.blocks:
        x = run_block(block, x)
    x = model.decoder_embed(model.norm(x))
    x = decoder_input(x, ids_restore, model.mask_token, model.decoder_pos_embed)
    for block in model.decoder_blocks:
        x = run_block(block, x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:, :]
    return forward_loss(imgs, pred, mask, patch, model.norm_pix_loss), pred, mask


def mask_token_encoder(model, imgs, mask):
    """SimMIM's and BEiT's encoder as their official code runs it: Conv2d patches, the mask token blended in
    where ``mask`` is 1, cls token and positions, SDPA blocks, the final norm. ``[B, 1 + L, E]``."""
    x = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
    w = mask.unsqueeze(-1).type_as(model.mask_token)
    x = x * (1 - w) + model.mask_token * w
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    for block in model.blocks:
        x = vit_block(block, x)
    return model.norm(x)


def simmim_forward(model, imgs, mask):
    """microsoft/SimMIM's ViT forward on a mimkernels SimMIM's parameters: the official encoder, the head, and
    the official masked L1 (pixel sum / (masked pixels + 1e-5) / C)."""
    pred = model.decoder_pred(mask_token_encoder(model, imgs, mask))[:, 1:]
    patch = model.patch_embed.patch_size
    target = imgs.reshape(imgs.shape[0], 3, imgs.shape[2] // patch, patch, imgs.shape[3] // patch, patch)
    target = target.permute(0, 2, 4, 3, 5, 1).reshape(pred.shape)
    pixel_mask = mask.unsqueeze(-1).expand_as(target)
    loss = ((pred.float() - target).abs() * pixel_mask).sum() / (pixel_mask.sum() / 3 + 1e-5) / 3
    return loss, pred


def beit_forward(model, imgs, mask):
    """BEiT's pre-training forward (unilm/beit's modeling_pretrain) on a mimkernels BEiT's parameters: the official
    encoder, then the head on the masked positions only (a host sync)."""
    chosen = mask.bool()
    logits = model.lm_head(mask_token_encoder(model, imgs, mask)[:, 1:][chosen])
    return F.cross_entropy(logits.float(), model.tokenizer(imgs)[chosen]), logits


def prefix_causal_attn_mask(causal_mask, prefix_len):
    """ml-aim's PrefixCausalAttention mask: the causal [1, N, N] buffer or'ed with the prefix columns."""
    tokens = causal_mask.shape[-1]
    not_prefix = torch.arange(tokens, device=prefix_len.device) >= prefix_len.reshape(-1, 1)  # ml-aim's mask
    prefix_mask = (~not_prefix).unsqueeze(1).expand(-1, tokens, -1)
    attn_mask = causal_mask.clone().expand(prefix_len.shape[0], -1, -1)
    return torch.logical_or(attn_mask, prefix_mask).unsqueeze(1), not_prefix


def aim_forward(model, imgs, prefix_len):
    """AIM pre-training step, ml-aim style (dense boolean mask + SDPA, Conv2d patches, unfused loss), on a
    mimkernels AIM's parameters. prefix_len: int64 tensor [B]."""
    tokens = model.num_patches
    causal = torch.ones(1, tokens, tokens, dtype=torch.bool, device=imgs.device).tril(diagonal=0)
    attn_mask, not_prefix = prefix_causal_attn_mask(causal, prefix_len)
    x = model.patch_norm(model.patch_embed.proj(imgs).flatten(2).transpose(1, 2)) + model.pos_embed
    for block in model.blocks:
        x = vit_block(block, x, attn_mask)
    pred = F.pad(model.forward_head(model.norm(x)[:, :-1]), (0, 0, 1, 0))  # row l: patch l, from position l - 1
    loss = forward_loss(imgs, pred, not_prefix.float(), model.patch_embed.patch_size, model.norm_pix_loss)
    return loss, pred


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """util/pos_embed.py's get_2d_sincos_pos_embed (numpy, float64), [(1 +) grid_size**2, embed_dim]."""
    import numpy as np

    def one_dim(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = np.concatenate([one_dim(embed_dim // 2, grid[0]), one_dim(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


class TimmMAE(torch.nn.Module):
    """facebookresearch/mae's ``MaskedAutoencoderViT`` as its models_mae.py builds it: timm's ``PatchEmbed`` and
    ``Block`` (with a timm of 0.9 or later, which no longer takes ``qk_scale``), fixed sin-cos positions, LayerNorm
    of eps 1e-6, and the official forward (``mae_from_embedding``). ``forward(imgs, mask_ratio, noise)`` returns
    ``(loss, pred, mask)``; without ``noise`` it draws ``torch.rand`` as the official code does."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=True):
        super().__init__()
        from timm.models.vision_transformer import Block, PatchEmbed

        norm_layer = partial(torch.nn.LayerNorm, eps=1e-6)

        def blocks(width, depth, heads):
            return torch.nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                       for _ in range(depth))

        def fixed_positions(width):
            table = get_2d_sincos_pos_embed(width, img_size // patch_size, cls_token=True)
            return torch.nn.Parameter(torch.from_numpy(table).float().unsqueeze(0), requires_grad=False)

        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = fixed_positions(embed_dim)
        self.blocks = blocks(embed_dim, depth, num_heads)
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = torch.nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = torch.nn.Parameter(torch.randn(1, 1, decoder_embed_dim) * 0.02)
        self.decoder_pos_embed = fixed_positions(decoder_embed_dim)
        self.decoder_blocks = blocks(decoder_embed_dim, decoder_depth, decoder_num_heads)
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = torch.nn.Linear(decoder_embed_dim, patch_size**2 * 3)
        self.norm_pix_loss = norm_pix_loss

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        return mae_from_embedding(self, imgs, self.patch_embed(imgs), mask_ratio, noise, _call_block,
                                  self.patch_embed.patch_size[0])


def _call_block(block, x):
    return block(x)
