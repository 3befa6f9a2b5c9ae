"""Hugging Face transformers' ViTMAE on mimkernels' kernels (see mimkernels.integrations), and mimkernels as a
transformers attention implementation (``attn_implementation="mimkernels"``)."""
from __future__ import annotations

import warnings

import torch
import transformers
from transformers.models.vit_mae import modeling_vit_mae as vit_mae

import mimkernels

from ..models import vit
from ..nn import check_head_dim
from ..ops._checks import kernels_take
from ..ops.tokens import checked_noise, kept_count
from . import check_release, covered_by_patches, release_unsupported, warn_kept

# Two generations of ViTMAE. transformers 5.9 and later: one ViTMAEAttention (q/k/v/o projections) and one ViTMAEMLP
# per layer, the loss inside ViTMAEForPreTraining.forward. transformers 4.5x to 5.8: ViTMAESelfAttention (query, key,
# value) under ViTMAEAttention, ViTMAEIntermediate and ViTMAEOutput for the MLP, the loss in
# ViTMAEForPreTraining.forward_loss; its attention and layer forwards took a head mask (4.5x), the hidden states alone
# (5.0-5.4), then transformers' keyword arguments too (5.5-5.8).
SELF_ATTENTION_MODULES = hasattr(vit_mae, "ViTMAESelfAttention")
SELF_ATTENTION_FORWARDS = (("self", "hidden_states", "head_mask"), ("self", "hidden_states"),
                           ("self", "hidden_states", "kwargs"))

try:  # transformers 5.3 and later record outputs by hooks that keep what the running model call's collector asks for
    from transformers.utils.output_capturing import _active_collector as _OUTPUT_COLLECTOR
except ImportError:
    _OUTPUT_COLLECTOR = None
# 5.3-5.8 hand a call's output_attentions to that collector, not down to the attention modules (5.9 and later do)
_ASK_THE_COLLECTOR = _OUTPUT_COLLECTOR is not None and SELF_ATTENTION_MODULES


def _release_unsupported(patched: type) -> str | None:
    """Why ``patched`` cannot stand in for its original class in this transformers release, or None: each patched
    class names the method it replaces and that method's parameters in each release it reproduces
    (``_mimkernels_replaces``)."""
    method, signatures = patched._mimkernels_replaces
    return release_unsupported("transformers", patched.__mro__[1], method, signatures)


def _attention_weights_wanted(module, kwargs) -> bool:
    """Whether transformers records this attention module's weights in this call (``output_attentions``, given to the
    model's forward or set in the config), for which the original code runs: it returns them under eager attention,
    our kernels do not compute them. transformers 4.5x-5.2 record them by wrapping the instance's ``forward``; 5.3
    and later by a forward hook that keeps what the running model call's collector asks for; 5.9 and later also hand
    the call's flag down in ``kwargs``, so only 5.3-5.8 need the collector asked."""
    if "forward" in vars(module):
        return True
    if "output_attentions" in kwargs:
        return bool(kwargs["output_attentions"])
    if getattr(getattr(module, "config", None), "output_attentions", False):
        return True
    return _ASK_THE_COLLECTOR and _collector_asks_for_attentions()


def _collector_asks_for_attentions() -> bool:
    """transformers 5.3-5.8: whether the running model call's output collector asks for attention weights, read as
    its own ``get`` reads it, except that while Dynamo traces, a collector that no traced call has set holds none
    (Dynamo cannot trace ``ContextVar.get``, which 5.5-5.8's ``get`` calls then: the decoder runs outside the
    collector's call)."""
    if _OUTPUT_COLLECTOR.compiling:  # set while Dynamo traced the model's forward: a plain attribute holds it
        collected = _OUTPUT_COLLECTOR.global_var
    elif torch.compiler.is_compiling():
        return False
    else:
        collected = _OUTPUT_COLLECTOR.get()
    return "attentions" in (collected or {})


def _kept_patches(config, num_patches: int) -> int | None:
    """How many of ``num_patches`` patches ViTMAE's masking at ``config.mask_ratio`` keeps (its ``len_keep``, which
    ``kept_count`` computes as the masking does), or None where ``kept_count`` refuses the ratio: one that keeps no
    patch (a high ratio on a small grid), which the original runs (its encoder sees the [CLS] token alone), or one
    outside [0, 1). The original masking code runs then."""
    try:
        return kept_count(config.mask_ratio, num_patches)
    except ValueError:
        return None


def _original_loss_runs(config, num_patches: int) -> bool:
    """Whether the original loss code runs: where our masking refuses the ratio (above), and where the masking
    keeps all patches, for which the original loss divides 0 by 0 (NaN) where :func:`mimkernels.masked_patch_loss`
    gives 0; so that the numbers stay the original's."""
    kept = _kept_patches(config, num_patches)
    return kept is None or kept == num_patches


def _save_as_original(self, *args, **kwargs):
    """The checkpoint an unpatched model writes: transformers records the model's class name in
    ``config.architectures``, which must name a class transformers has (``push_to_hub`` saves through here)."""
    patched = type(self)
    self.__class__ = patched.__mro__[1]
    try:
        return self.save_pretrained(*args, **kwargs)
    finally:
        self.__class__ = patched


class MimkernelsViTMAEEmbeddings(vit_mae.ViTMAEEmbeddings):
    """Patch embedding of only the kept patches (with their positions, in one GEMM) and MAE's masking, by
    mimkernels; the same masks and ids as the original for the same noise, and the same random draws without."""

    _mimkernels_patch = True
    _mimkernels_replaces = ("forward", (("self", "pixel_values", "noise", "interpolate_pos_encoding"),))
    _mimkernels_patch_embed = True  # False: HF's convolution, then mimkernels' masking

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None,
                interpolate_pos_encoding: bool = False):
        if interpolate_pos_encoding or _kept_patches(self.config, self.patch_embeddings.num_patches) is None or \
                not kernels_take(self.patch_embeddings.projection.weight):
            return super().forward(pixel_values, noise, interpolate_pos_encoding)
        batch, channels, height, width = pixel_values.shape
        if channels != self.patch_embeddings.num_channels:
            raise ValueError(f"pixel_values have {channels} channels, the configuration "
                             f"{self.patch_embeddings.num_channels}")
        image_size = tuple(self.patch_embeddings.image_size)
        if (height, width) != image_size:
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model "
                             f"({image_size[0]}*{image_size[1]}).")
        num_patches = self.patch_embeddings.num_patches
        # without noise: the draw the original makes, so that seeded runs mask the same patches
        noise = checked_noise(noise, batch, num_patches, pixel_values.device)
        positions = self.position_embeddings
        if self._mimkernels_patch_embed:
            mask, ids_restore, ids_keep = mimkernels.masking_indices(noise, self.config.mask_ratio)
            projection = self.patch_embeddings.projection
            images = covered_by_patches(pixel_values, projection.stride[0])  # a configured size past whole patches
            kept = mimkernels.patch_embed(images, projection.weight, projection.bias,
                                          pos_embed=positions[:, 1:], ids_keep=ids_keep)
        else:
            patches = self.patch_embeddings(pixel_values)
            kept, mask, ids_restore, _ = mimkernels.random_masking(patches, self.config.mask_ratio, noise=noise,
                                                                   pos_embed=positions[:, 1:])
        cls = (self.cls_token + positions[:, :1]).expand(batch, -1, -1).to(kept.dtype)
        return torch.cat((cls, kept), dim=1), mask, ids_restore


class MimkernelsViTMAEDecoder(vit_mae.ViTMAEDecoder):
    """The unshuffle (kept tokens back in place, mask tokens elsewhere, plus positions) in one pass."""

    _mimkernels_patch = True
    _mimkernels_replaces = ("forward", (("self", "hidden_states", "ids_restore", "interpolate_pos_encoding"),))

    def forward(self, hidden_states: torch.Tensor, ids_restore: torch.Tensor, interpolate_pos_encoding: bool = False):
        if interpolate_pos_encoding or not kernels_take(hidden_states):  # the token ops move float64 exactly, too
            return super().forward(hidden_states, ids_restore, interpolate_pos_encoding)
        hidden_states = self.decoder_embed(hidden_states)
        hidden_states = mimkernels.restore_tokens(hidden_states, ids_restore, self.mask_token,
                                                  pos_embed=self.decoder_pos_embed, num_prefix_tokens=1)
        for layer in self.decoder_layers:
            hidden_states = layer(hidden_states)
        logits = self.decoder_pred(self.decoder_norm(hidden_states))
        return vit_mae.ViTMAEDecoderOutput(logits=logits[:, 1:, :])


# keyword arguments of transformers' attention functions that change the scores or where keys come from
_SDPA_ONLY_KWARGS = ("position_bias", "softcap", "sliding_window", "s_aux", "cache")


def _kernel_runs(query, key, value, attention_mask, dropout, kwargs) -> bool:
    """Whether a call is self-attention our kernels run as is: no mask, no dropout, the same heads and length for q,
    k and v (no grouped kv heads, no kv cache longer than the queries), a dtype and head dim the kernels take."""
    return (attention_mask is None and not dropout and query.shape == key.shape == value.shape
            and query.dtype == key.dtype == value.dtype and kernels_take(query)
            and query.shape[-1] % 8 == 0 and 16 <= query.shape[-1] <= 256
            and all(kwargs.get(name) is None for name in _SDPA_ONLY_KWARGS))


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """An AttentionInterface function: [B, H, N, D] in, ([B, N, H, D], None) out. Causal as transformers' sdpa
    function decides it (``is_causal``, else the module's, else True); calls the kernels do not run as is go to
    that function."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not isinstance(causal, bool) or not _kernel_runs(query, key, value, attention_mask, dropout, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = mimkernels.attention(query, key, value, causal=causal, scale=scaling)
    return out.transpose(1, 2), None


if SELF_ATTENTION_MODULES:
    class MimkernelsViTMAESelfAttention(vit_mae.ViTMAESelfAttention):
        """Self-attention by :func:`mimkernels.attention` on the query, key and value projections; the original code
        for a head mask, attention dropout while training, or when transformers records this module's weights
        (``output_attentions``). ``head_mask`` (4.5x) and ``kwargs`` (5.5-5.8) reach the original as given."""

        _mimkernels_patch = True
        _mimkernels_replaces = ("forward", SELF_ATTENTION_FORWARDS)

        def forward(self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, **kwargs):
            dropout = self.dropout_prob if self.training else 0.0
            if head_mask is not None or dropout > 0 or _attention_weights_wanted(self, kwargs) or \
                    not kernels_take(hidden_states):
                return super().forward(hidden_states, *(() if head_mask is None else (head_mask,)), **kwargs)
            shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
            q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
            out = mimkernels.attention(q, k, v, scale=self.scaling)
            return out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1), None

    class MimkernelsViTMAEForPreTraining(vit_mae.ViTMAEForPreTraining):
        """The reconstruction loss (per-patch normalised pixels with ``norm_pix_loss``, mean over removed patches)
        by :func:`mimkernels.masked_patch_loss`, which reads the target pixels from the image in place."""

        _mimkernels_patch = True
        _mimkernels_replaces = ("forward_loss",
                                (("self", "pixel_values", "pred", "mask", "interpolate_pos_encoding"),))
        save_pretrained = _save_as_original

        def forward_loss(self, pixel_values, pred, mask, interpolate_pos_encoding: bool = False):
            if interpolate_pos_encoding or _original_loss_runs(self.config, mask.shape[1]) or not kernels_take(pred):
                return super().forward_loss(pixel_values, pred, mask, interpolate_pos_encoding)
            return mimkernels.masked_patch_loss(pred, pixel_values, mask, norm_pix=self.config.norm_pix_loss)

    class MimkernelsViTMAELayer(vit_mae.ViTMAELayer):
        """transformers 4.5x-5.8's layer, whose MLP is two modules (ViTMAEIntermediate: fc1 and GELU; ViTMAEOutput: fc2,
        dropout and the residual add), so both fusions live here: with ``add_norm`` the add after attention in one
        pass with ``layernorm_after`` (:func:`mimkernels.add_layer_norm`), with ``gelu_mlp`` the MLP by
        :func:`mimkernels.gelu_mlp`, then the output's dropout and add. ``patch`` sets which, per layer."""

        _mimkernels_patch = True
        _mimkernels_replaces = ("forward", SELF_ATTENTION_FORWARDS)
        _mimkernels_add_norm = False
        _mimkernels_gelu_mlp = False

        def forward(self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, **kwargs):
            branch = self.attention(self.layernorm_before(hidden_states), *(() if head_mask is None else (head_mask,)),
                                    **kwargs)
            hidden_states, normed = vit.add_norm(hidden_states, branch, self.layernorm_after,
                                                 fuse=self._mimkernels_add_norm)
            if not self._mimkernels_gelu_mlp or not kernels_take(normed):
                return self.output(self.intermediate(normed), hidden_states)
            fc1, fc2 = self.intermediate.dense, self.output.dense
            return self.output.dropout(mimkernels.gelu_mlp(normed, fc1.weight, fc1.bias, fc2.weight, fc2.bias)) \
                + hidden_states

    def _layer_fusions_unsupported(layer) -> dict:
        """fusion -> why MimkernelsViTMAELayer cannot run it for ``layer`` (an older ViTMAELayer, 4.5x-5.8), or None."""
        intermediate, output = layer.intermediate, layer.output
        if type(intermediate) is not vit_mae.ViTMAEIntermediate or type(output) is not vit_mae.ViTMAEOutput:
            why = "its MLP is not a ViTMAEIntermediate and a ViTMAEOutput"
            return {"add_norm": why, "gelu_mlp": why}
        return {"add_norm": _norm_before_linear_unsupported(layer.layernorm_after, intermediate.dense),
                "gelu_mlp": _gelu_linears_unsupported(intermediate.intermediate_act_fn, intermediate.dense,
                                                      output.dense)}

    ATTENTION = {vit_mae.ViTMAESelfAttention: MimkernelsViTMAESelfAttention}
else:
    class MimkernelsViTMAEAttention(vit_mae.ViTMAEAttention):
        """Self-attention by :func:`mimkernels.attention` on the q, k, v projections; the original code for an
        attention mask, attention dropout while training, or when attention weights are asked for."""

        _mimkernels_patch = True
        _mimkernels_replaces = ("forward", (("self", "hidden_states", "attention_mask", "kwargs"),))

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
            dropout = self.attention_dropout if self.training else 0.0
            if attention_mask is not None or dropout > 0 or _attention_weights_wanted(self, kwargs) or \
                    not kernels_take(hidden_states):
                return super().forward(hidden_states, attention_mask, **kwargs)
            shape = (*hidden_states.shape[:-1], -1, self.head_dim)
            q, k, v = (proj(hidden_states).view(shape).transpose(1, 2)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
            out = mimkernels.attention(q, k, v, scale=self.scaling)
            return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None

    class MimkernelsViTMAEForPreTraining(vit_mae.ViTMAEForPreTraining):
        """The reconstruction loss (per-patch normalised pixels with ``norm_pix_loss``, mean over removed patches)
        by :func:`mimkernels.masked_patch_loss`, which reads the target pixels from the image in place."""

        _mimkernels_patch = True
        _mimkernels_replaces = ("forward", (("self", "pixel_values", "noise", "interpolate_pos_encoding",
                                             "attention_mask", "kwargs"),))
        save_pretrained = _save_as_original

        def forward(self, pixel_values=None, noise=None, interpolate_pos_encoding=None, attention_mask=None,
                    **kwargs):
            if interpolate_pos_encoding or kwargs.get("return_dict") is False or \
                    _original_loss_runs(self.config, self.vit.embeddings.patch_embeddings.num_patches) or \
                    not kernels_take(self.decoder.decoder_pred.weight):
                return super().forward(pixel_values, noise=noise, interpolate_pos_encoding=interpolate_pos_encoding,
                                       attention_mask=attention_mask, **kwargs)
            outputs = self.vit(pixel_values, noise=noise, attention_mask=attention_mask, **kwargs)
            logits = self.decoder(outputs.last_hidden_state, outputs.ids_restore).logits
            loss = mimkernels.masked_patch_loss(logits, pixel_values, outputs.mask,
                                                norm_pix=self.config.norm_pix_loss)
            return vit_mae.ViTMAEForPreTrainingOutput(loss=loss, logits=logits, mask=outputs.mask,
                                                      ids_restore=outputs.ids_restore,
                                                      hidden_states=outputs.hidden_states,
                                                      attentions=outputs.attentions)

    class MimkernelsViTMAELayer(vit_mae.ViTMAELayer):
        """The residual add after attention in one pass with ``layernorm_after`` (:func:`mimkernels.add_layer_norm`);
        the add after the MLP stays (fusing it with the next layer's ``layernorm_before`` would change what a layer
        returns)."""

        _mimkernels_patch = True
        _mimkernels_replaces = ("forward", (("self", "hidden_states", "attention_mask", "kwargs"),))

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
            branch, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
            hidden_states, normed = vit.add_norm(hidden_states, self.dropout(branch), self.layernorm_after, fuse=True)
            return self.dropout(self.mlp(normed)) + hidden_states

    class MimkernelsViTMAEMLP(vit_mae.ViTMAEMLP):
        """fc1 -> GELU -> fc2 by :func:`mimkernels.gelu_mlp` (GELU inside the GEMMs); same parameters."""

        _mimkernels_patch = True
        _mimkernels_replaces = ("forward", (("self", "hidden_states"),))

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            if not kernels_take(hidden_states):
                return super().forward(hidden_states)
            return mimkernels.gelu_mlp(hidden_states, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)

    ATTENTION = {vit_mae.ViTMAEAttention: MimkernelsViTMAEAttention}


def _gelu_linears_unsupported(activation, fc1, fc2) -> str | None:
    """Why fc1 -> ``activation`` -> fc2 cannot run as :func:`mimkernels.gelu_mlp`, or None. ``hidden_act`` "gelu"
    and "gelu_python" are both the exact GELU (``GELUActivation``); the tanh and other approximations are not."""
    from transformers.activations import GELUActivation

    if type(activation) is not GELUActivation:
        return f"its activation ({type(activation).__name__}) is not the exact GELU"
    if type(fc1) is not torch.nn.Linear or type(fc2) is not torch.nn.Linear:
        return "its layers are not Linear"
    return None


def _norm_before_linear_unsupported(norm, linear) -> str | None:
    """Why a residual add and ``norm`` cannot run as :func:`mimkernels.add_layer_norm` before ``linear``, or None.
    Under autocast the fused norm comes out in the autocast dtype, which is what the Linear casts the LayerNorm's
    fp32 output to."""
    if type(norm) is not torch.nn.LayerNorm or type(linear) is not torch.nn.Linear:
        return "its layernorm_after is not a LayerNorm followed by a Linear"
    return None


def _mlp_unsupported(mlp) -> str | None:
    """Why MimkernelsViTMAEMLP cannot stand in for ``mlp`` (a transformers 5 ViTMAEMLP), or None."""
    return _gelu_linears_unsupported(mlp.activation_fn, mlp.fc1, mlp.fc2)


def _layer_unsupported(layer) -> str | None:
    """Why MimkernelsViTMAELayer cannot stand in for ``layer`` (a transformers 5 ViTMAELayer), or None."""
    mlp = getattr(layer, "mlp", None)
    if type(mlp) is not vit_mae.ViTMAEMLP:
        return "its mlp is not a ViTMAEMLP"
    return _norm_before_linear_unsupported(layer.layernorm_after, mlp.fc1)


def _older_layer_unsupported(layer, asked: dict) -> str | None:
    """Why an older ViTMAELayer (transformers 4.5x-5.8) runs none of the fusions ``asked`` ({fusion: bool}), or None."""
    reasons = {why for fusion, why in _layer_fusions_unsupported(layer).items() if asked[fusion]}
    return None if None in reasons else "; ".join(sorted(reasons))


SUPPORTED = (vit_mae.ViTMAEForPreTraining, vit_mae.ViTMAEModel)


def _always(module) -> None:
    return None


def _swaps(*, attention: bool, masking: bool, add_norm: bool, gelu_mlp: bool) -> dict:
    """original class -> (patched class, why a module of it cannot be patched, or None): the swaps asked for."""
    swaps = {}
    if attention:
        swaps.update({original: (patched, _always) for original, patched in ATTENTION.items()})
    if masking:  # the embeddings' masking, and with patch_embed the kept-only embedding, which needs our masking
        swaps[vit_mae.ViTMAEEmbeddings] = MimkernelsViTMAEEmbeddings, _always
        swaps[vit_mae.ViTMAEDecoder] = MimkernelsViTMAEDecoder, _always
    if SELF_ATTENTION_MODULES and (add_norm or gelu_mlp):  # one module holds both (MimkernelsViTMAELayer, up to 5.8)
        asked = {"add_norm": add_norm, "gelu_mlp": gelu_mlp}
        swaps[vit_mae.ViTMAELayer] = MimkernelsViTMAELayer, lambda layer: _older_layer_unsupported(layer, asked)
    if add_norm and not SELF_ATTENTION_MODULES:
        swaps[vit_mae.ViTMAELayer] = MimkernelsViTMAELayer, _layer_unsupported
    if gelu_mlp and not SELF_ATTENTION_MODULES:
        swaps[vit_mae.ViTMAEMLP] = MimkernelsViTMAEMLP, _mlp_unsupported
    return swaps


def patch(model: torch.nn.Module, *, attention: bool, patch_embed: bool, masking: bool, loss: bool,
          add_norm: bool, gelu_mlp: bool) -> None:
    check_release("transformers", transformers.__version__, "mimkernels.integrations.apply")
    config = model.config
    try:
        check_head_dim("attention", config.hidden_size, config.num_attention_heads)
        if isinstance(model, vit_mae.ViTMAEForPreTraining):
            check_head_dim("decoder attention", config.decoder_hidden_size, config.decoder_num_attention_heads)
    except ValueError as error:
        if attention:
            warnings.warn(f"mimkernels.integrations: attention keeps its original code: {error}", stacklevel=3)
        attention = False
    patch_size = config.patch_size
    if isinstance(patch_size, (tuple, list)) and patch_size[0] != patch_size[1]:
        if patch_embed:
            warnings.warn("mimkernels.integrations: patch embedding keeps its original code: patches are not "
                          "square", stacklevel=3)
        patch_embed = False
    if patch_embed and not masking:
        warnings.warn("mimkernels.integrations: patch_embed=True without masking=True keeps HF's patch embedding "
                      "(ours embeds only the kept patches)", stacklevel=3)
    swaps = _swaps(attention=attention, masking=masking, add_norm=add_norm, gelu_mlp=gelu_mlp)
    if loss and type(model) is vit_mae.ViTMAEForPreTraining:
        swaps[vit_mae.ViTMAEForPreTraining] = MimkernelsViTMAEForPreTraining, _always
    kept = {}  # reason -> names of the modules that keep their code for it
    for name, module in model.named_modules():
        if type(module) not in swaps:
            continue
        patched, unsupported = swaps[type(module)]
        reason = _release_unsupported(patched) or unsupported(module)
        if reason is not None:
            kept.setdefault(reason, []).append(name or type(module).__name__)
            continue
        module.__class__ = patched
        if patched is MimkernelsViTMAEEmbeddings:
            module._mimkernels_patch_embed = patch_embed
        if SELF_ATTENTION_MODULES and patched is MimkernelsViTMAELayer:  # the fusions asked for that this layer allows
            asked = {"add_norm": add_norm, "gelu_mlp": gelu_mlp}
            for fusion, why in _layer_fusions_unsupported(module).items():
                setattr(module, f"_mimkernels_{fusion}", asked[fusion] and why is None)
                if asked[fusion] and why is not None:  # the other fusion runs; this part keeps its code
                    part = "layernorm_after" if fusion == "add_norm" else "intermediate"
                    kept.setdefault(why, []).append(f"{name}.{part}")
    warn_kept(kept)


def register_attention() -> str:
    """Register ``"mimkernels"`` as a transformers attention implementation, with sdpa's mask function (see
    :func:`_attention_forward` for what runs on our kernels). Returns the name."""
    check_release("transformers", transformers.__version__, "mimkernels.integrations.register_hf_attention")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("mimkernels", _attention_forward)
    # the masks sdpa gets (None where is_causal or nothing stands for them): without a mask function of its own, an
    # implementation gets no mask at all, and a padded batch would attend to its padding
    AttentionMaskInterface.register("mimkernels", sdpa_mask)
    return "mimkernels"
