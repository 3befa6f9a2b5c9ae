"""Full, causal and prefix-causal attention: validation, backend choice, autograd."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .. import _backend, reference
from .._backend import env_flag
from .._custom_ops import custom_op_when_compiling
from ._autograd import distinct, first_derivative_only
from ._checks import KERNEL_DTYPES, autocast_dtype, check_bool, is_int, is_real, unit_stride

# Imported here, not on first use, so torch.compile never traces the module's first import.
_kernels = None
if _backend._HAS_TRITON:
    from ..triton import attention as _kernels


def _centre_keys_from_environment():
    value = os.environ.get("MIMKERNELS_CENTRE_KEYS", "").strip().lower()
    if value == "dq":
        return "dq"
    try:
        return env_flag("MIMKERNELS_CENTRE_KEYS", False)
    except ValueError as error:
        raise ValueError(f"{error}, or dq (the kernels' dQ correction)") from None


# Keys that share a large part (a key bias) make dQ = dS K, which a backward built like FlashAttention's (ours too)
# computes from dS rounded to 16 bits, carry that part times the sum of dS's rounding errors (benchmarks/NOTES.md,
# "Keys that share a large part"). Two cures, each exact in exact arithmetic; neither timed on a GPU, so off by
# default:
# - True (MIMKERNELS_CENTRE_KEYS=1): subtract each (sample, head)'s mean key from its keys before attending (every
#   key a query sees moves its logit by the same q . mean, which softmax ignores), whatever runs the attention. About
#   five K-sized memory passes per call (the mean, the extremes, the subtraction; qkv_attention's backward subtracts
#   again).
# - "dq" (MIMKERNELS_CENTRE_KEYS=dq): our kernels compute dQ as dS~ K - rowsum(dS~) c (c a few keys' mean, read by
#   each dQ program: no pre-pass, no copy, dK and dV untouched); a call that runs anything else (SDPA's causal route,
#   the torch backend) centres its keys as with True.
CENTRE_KEYS = _centre_keys_from_environment()


def _centre_keys_mode():
    """CENTRE_KEYS, checked: a misspelt mode must not leave the keys silently as they are."""
    if isinstance(CENTRE_KEYS, bool) or CENTRE_KEYS == "dq":
        return CENTRE_KEYS
    raise ValueError(f"mimkernels.ops.attention.CENTRE_KEYS must be False, True or 'dq', got {CENTRE_KEYS!r}")


def _key_mean(k):
    """The mean of ``k``'s keys per sample and head, ``[B, H, 1, D]`` in k's dtype, detached (the attention does not
    depend on it).

    Rounded to a multiple of the spacing of k's dtype at the column's largest key, so that ``k - mean`` is exact
    (no rounding the input did not have) for every key within a factor of 2 of the mean and every key of the mean's
    sign at least twice its size: a mean with finer bits would round nearly every centred key once more. 0 in a
    column whose mean is not finite (a NaN or inf key, or no keys), so that a bad key still reaches only the
    queries that see it."""
    keys = k.detach()
    if keys.shape[2] == 0:
        return keys.new_zeros(*keys.shape[:2], 1, keys.shape[3])
    mean = keys.mean(dim=2, keepdim=True, dtype=torch.float32)
    # amax and amin, not aminmax (3 ms on the CPU for a 2 x 4 x 50 x 64 view of a packed qkv, where these take
    # 5 us) nor vector_norm (100 us there)
    largest = torch.maximum(keys.amax(dim=2, keepdim=True), -keys.amin(dim=2, keepdim=True)).float()
    spacing = torch.exp2((torch.frexp(largest).exponent - 1).float()) * torch.finfo(k.dtype).eps
    mean = torch.round(mean / spacing) * spacing
    return torch.where(mean.isfinite(), mean, 0.0).to(k.dtype)


def _centred(k, key_mean):
    return k if key_mean is None else k - key_mean


def _checked_qkv(q, k, v, *, called="q, k, v", head_dim_of="q"):
    """q, k and v checked (and cast under autocast); ``called`` / ``head_dim_of`` name the caller's argument in the
    dtype and head-dim errors (``qkv`` for :func:`qkv_attention`'s views of one packed tensor)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq_len, head_dim], got shape {tuple(t.shape)}")
    dtype = autocast_dtype(q.device)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.shape[2] != q.shape[2]:
            raise ValueError(f"query and key lengths differ: q has {q.shape[2]} tokens, {name} has {t.shape[2]}")
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}; they must match")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{called} must be float16, bfloat16 or float32, got {q.dtype}")
    head_dim = q.shape[-1]
    if head_dim % 8 or not 16 <= head_dim <= 256:  # arithmetic, not `in range`: Dynamo traces it on symbolic sizes
        raise ValueError(f"head_dim ({head_dim_of}.shape[-1]) must be a multiple of 8 from 16 to 256, got {head_dim}")
    return q, k, v


def _check_prefix_type(prefix_len):
    """prefix_len is a non-negative int or an integer tensor (shape and device are the caller's to check)."""
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dtype == torch.bool or prefix_len.is_floating_point() or prefix_len.is_complex():
            raise TypeError(f"prefix_len must be an integer tensor, got dtype {prefix_len.dtype}")
    elif not is_int(prefix_len):
        raise TypeError(f"prefix_len must be an int or an integer tensor [batch], got {type(prefix_len).__name__}")
    elif prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")


def _checked_prefix(prefix_len, q, data="q"):
    """An int clamped to N, or an integer tensor [B] (clamped later, on the device); ``data`` names q in errors."""
    _check_prefix_type(prefix_len)
    batch, seq_len = q.shape[0], q.shape[2]
    if not isinstance(prefix_len, torch.Tensor):
        return min(int(prefix_len), seq_len)
    if tuple(prefix_len.shape) != (batch,):
        raise ValueError(f"prefix_len must have shape [batch] = ({batch},), got {tuple(prefix_len.shape)}")
    if prefix_len.device != q.device:
        raise ValueError(f"prefix_len is on {prefix_len.device} but {data} is on {q.device}")
    return prefix_len.contiguous()  # the kernels index it as a flat array


def _checked_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not is_real(scale):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    # finite iff scale - scale == 0 (inf and NaN give NaN): math.isfinite cannot trace the symbolic float that
    # torch.compile(dynamic=True) makes of a module's float attribute (timm's Attention.scale)
    if not scale - scale == 0:
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


@custom_op_when_compiling(
    "attention_forward",
    "(Tensor q, Tensor k, Tensor v, Tensor? prefix, int prefix_int, float scale) -> (Tensor, Tensor)",
    lambda q, k, v, prefix, prefix_int, scale: (_kernels._empty_bnhd(q), q.new_empty(q.shape[:3], dtype=torch.float32)))
def _forward_kernels(q, k, v, prefix, prefix_int, scale):
    """Output and log-sum-exp; the prefix is the tensor ``prefix`` [B], or the int ``prefix_int`` where it is None."""
    if q.numel() == 0:
        return _kernels._empty_bnhd(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    return _kernels.forward(q, k, v, prefix_int if prefix is None else prefix, scale)


@custom_op_when_compiling(
    "attention_backward",
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? prefix, int prefix_int, "
    "float scale, bool deterministic, bool key_centre) -> (Tensor, Tensor, Tensor)",
    lambda grad_out, q, k, v, *rest: (_kernels._empty_bnhd(q), _kernels._empty_bnhd(k), _kernels._empty_bnhd(v)))
def _backward_kernels(grad_out, q, k, v, out, lse, prefix, prefix_int, scale, deterministic, key_centre):
    """dq, dk, dv; ``key_centre``: the kernels' dQ correction for keys that share a large part (CENTRE_KEYS "dq")."""
    if q.numel() == 0:
        return tuple(_kernels._empty_bnhd(t).zero_() for t in (q, k, v))
    grad_out = unit_stride(grad_out)
    atomic = not deterministic and _kernels.atomic_dq_measured_faster(q)
    return _kernels.backward(grad_out, q, k, v, out, lse, prefix_int if prefix is None else prefix, scale,
                             atomic_dq=atomic, key_centre=key_centre)


class _TritonAttention(torch.autograd.Function):
    """``prefix`` a tensor [B] or None, then ``prefix_int`` holds the int prefix."""

    @staticmethod
    def forward(ctx, q, k, v, prefix, prefix_int, scale, deterministic, key_centre):
        out, lse = _forward_kernels(q, k, v, prefix, prefix_int, scale)
        ctx.prefix_int, ctx.scale, ctx.deterministic, ctx.key_centre = prefix_int, scale, deterministic, key_centre
        ctx.save_for_backward(q, k, v, out, lse, *(() if prefix is None else (prefix,)))
        return out

    @staticmethod
    @first_derivative_only("attention")
    def backward(ctx, grad_out):
        q, k, v, out, lse, *prefix = ctx.saved_tensors
        dq, dk, dv = _backward_kernels(grad_out, q, k, v, out, lse, prefix[0] if prefix else None, ctx.prefix_int,
                                       ctx.scale, ctx.deterministic, ctx.key_centre)
        return dq, dk, dv, None, None, None, None, None


def _unpacked(qkv):
    """q, k, v as [B, H, N, D] views of a packed [B, N, 3, H, D] tensor (no copy)."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


def _empty_packed(qkv):
    return qkv.new_empty(qkv.shape)


@custom_op_when_compiling(
    "attention_backward_packed",
    "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor? prefix, int prefix_int, float scale, "
    "bool deterministic, Tensor? key_mean, bool key_centre) -> Tensor",
    lambda grad_out, qkv, *rest: _empty_packed(qkv))
def _packed_backward_kernels(grad_out, qkv, out, lse, prefix, prefix_int, scale, deterministic, key_mean, key_centre):
    """The gradient of a packed qkv, [B, N, 3, H, D]: the kernels write dq, dk and dv into it in place, so no stack
    and no reshape copy joins three separate gradients afterwards. ``key_mean``: what the forward subtracted from
    the keys (CENTRE_KEYS True), or None; the gradient of the centred keys is that of the keys. ``key_centre``: the
    kernels' dQ correction instead (CENTRE_KEYS "dq")."""
    grad_qkv = _empty_packed(qkv)
    if qkv.numel() == 0:
        return grad_qkv.zero_()
    q, k, v = _unpacked(qkv)
    k = _centred(k, key_mean)
    atomic = not deterministic and _kernels.atomic_dq_measured_faster(q)
    _kernels.backward(unit_stride(grad_out), q, k, v, out, lse, prefix_int if prefix is None else prefix, scale,
                      atomic_dq=atomic, grads=_unpacked(grad_qkv), key_centre=key_centre)
    return grad_qkv


class _TritonPackedAttention(torch.autograd.Function):
    """Attention on a packed qkv ``[B, N, 3, H, D]``, output ``[B, N, H, D]``; the kernels as _TritonAttention's."""

    @staticmethod
    def forward(ctx, qkv, prefix, prefix_int, scale, deterministic, key_mean, key_centre):
        q, k, v = _unpacked(qkv)
        out, lse = _forward_kernels(q, _centred(k, key_mean), v, prefix, prefix_int, scale)
        ctx.prefix_int, ctx.scale, ctx.deterministic, ctx.key_centre = prefix_int, scale, deterministic, key_centre
        ctx.has_prefix, ctx.has_key_mean = prefix is not None, key_mean is not None
        ctx.save_for_backward(qkv, out, lse, *(t for t in (prefix, key_mean) if t is not None))
        return out.transpose(1, 2)  # stored [B, N, H, D]: this view is contiguous

    @staticmethod
    @first_derivative_only("qkv_attention")
    def backward(ctx, grad_out):
        qkv, out, lse, *optional = ctx.saved_tensors  # then prefix, then key_mean, each where given
        prefix = optional[0] if ctx.has_prefix else None
        key_mean = optional[-1] if ctx.has_key_mean else None  # indexing: torch 2.11's Dynamo cannot trace list.pop
        grad_qkv = _packed_backward_kernels(grad_out.transpose(1, 2), qkv, out, lse, prefix, ctx.prefix_int,
                                            ctx.scale, ctx.deterministic, key_mean, ctx.key_centre)
        return grad_qkv, None, None, None, None, None, None


def _checked_deterministic(deterministic) -> bool:
    """The caller's choice, made True by ``torch.use_deterministic_algorithms(True)``: PyTorch's own ops pick their
    deterministic implementation where they have one, and so does this."""
    return check_bool("deterministic", deterministic) or torch.are_deterministic_algorithms_enabled()


def _sdpa_measured_faster(q, prefix, deterministic) -> bool:
    """Causal attention (prefix 0) with ``deterministic=False`` under the auto backend, in fp16 / bf16 on CUDA.

    Decided by GPU time (CUDA-graph replay), which is what an attention call costs inside a training step whose host
    runs ahead of the GPU (benchmarks/NOTES.md). Causal: SDPA's causal kernel (flash / cuDNN, whose backward may use
    atomics) took 0.88x the GPU time of our prefix-causal kernels at AIM-600M, with 25% fewer visible pairs; ours
    on a causal mask is not yet timed against it, so causal still routes. Full attention stays on our kernels:
    SDPA took 1.67x their GPU time at the MAE encoder (B256 H16 N50 D64), 1.33x at the decoder (N197 D32) and
    0.98x at ViT-B (N197 D64), a tie (H200 run 9, results/nvidia-h200/2026-12-04-run9-*). Per call, with host
    time, SDPA was faster at the encoder (ours 0.72x its speed): not what a training step sees. A
    per-sample prefix never routes (it would need a host sync to see whether it is all 0), nor does an explicit
    ``triton`` backend."""
    return (not deterministic and q.is_cuda and q.dtype != torch.float32 and isinstance(prefix, int)
            and prefix == 0 and _backend.current_backend() == "auto")


def _attend(q, k, v, prefix, scale, deterministic, op):
    scale = _checked_scale(scale, q.shape[-1])
    deterministic = _checked_deterministic(deterministic)
    centre_keys = _centre_keys_mode()
    backend = _backend.select(op, q.device, implemented=("triton",))
    our_kernels = backend == "triton" and not _sdpa_measured_faster(q, prefix, deterministic)
    if centre_keys is True or (centre_keys and not our_kernels):  # "dq" centres the keys of what is not ours
        k = _centred(k, _key_mean(k))
    if backend == "triton" and not our_kernels:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if our_kernels:
        key_centre = centre_keys == "dq"
        q, k, v = distinct(unit_stride(q), unit_stride(k), unit_stride(v))
        if isinstance(prefix, torch.Tensor):
            return _TritonAttention.apply(q, k, v, prefix, 0, scale, deterministic, key_centre)
        return _TritonAttention.apply(q, k, v, None, prefix, scale, deterministic, key_centre)
    if isinstance(prefix, int) and prefix == q.shape[2]:
        return reference.attention(q, k, v, scale=scale)
    return reference.prefix_causal_attention(q, k, v, prefix, scale=scale)


def prefix_causal_attention(q, k, v, prefix_len, *, scale=None, deterministic=True):
    """Prefix-causal softmax attention (AIM): query i sees key j iff ``j <= i or j < prefix_len[b]``.

    Args:
        q, k, v: ``[B, H, N, D]`` tensors of one dtype (fp16, bf16, fp32) and device, any strides
            (a non-unit stride in the head dim costs a copy). D is a multiple of 8 in [16, 256].
        prefix_len: a non-negative int for the whole batch, or an integer tensor ``[B]`` on q's device
            whose values are clamped to ``[0, N]`` on the device (no host sync).
        scale: softmax scale, default ``1 / sqrt(D)``.
        deterministic: True (default): bit-identical gradients run after run (our kernels; dK/dV and dQ in two
            launches, no atomics). False: the fastest path measured on GPU time, whose summation order may vary:
            the atomic-dQ backward where the tile table measured it faster, and for causal attention
            (``attention(causal=True)``) on CUDA in fp16/bf16, PyTorch's SDPA. Under
            ``torch.use_deterministic_algorithms(True)`` it is always True.

    Returns:
        ``[B, H, N, D]``, equal to ``F.scaled_dot_product_attention(q, k, v,
        attn_mask=prefix_causal_mask(N, prefix_len))``. The Triton backend stores it as
        ``[B, N, H, D]``, so ``out.transpose(1, 2).reshape(B, N, H * D)`` is a free view.

    With ``mimkernels.ops.attention.CENTRE_KEYS = True`` (or ``MIMKERNELS_CENTRE_KEYS=1``), off by default, every
    attention call first subtracts each sample and head's mean key from its keys: the same attention, and a dQ
    free of the error that a part shared by all keys brings into a backward that rounds dS to 16 bits (ours, like
    FlashAttention's). With ``CENTRE_KEYS = "dq"`` (``MIMKERNELS_CENTRE_KEYS=dq``) our kernels' backward takes
    that part out of dQ itself (dS K as dS K - rowsum(dS) c, c the mean of a few keys), with no pass over K before
    the call; calls that run other kernels (SDPA's causal route, the torch backend) centre their keys as with
    True.
    """
    q, k, v = _checked_qkv(q, k, v)
    return _attend(q, k, v, _checked_prefix(prefix_len, q), scale, deterministic, "prefix_causal_attention")


def attention(q, k, v, *, causal=False, prefix_len=None, scale=None, deterministic=True):
    """One entry for full (MAE, BEiT, SimMIM), causal, and prefix-causal (AIM) attention.

    ``prefix_len=None`` gives full attention, or causal attention with ``causal=True``. A given
    ``prefix_len`` always means prefix-causal attention, whatever ``causal`` says (prefix 0 is causal).
    Other arguments as in :func:`prefix_causal_attention`.
    """
    check_bool("causal", causal)
    q, k, v = _checked_qkv(q, k, v)
    if prefix_len is None:
        prefix = 0 if causal else q.shape[2]
    else:
        prefix = _checked_prefix(prefix_len, q)
    return _attend(q, k, v, prefix, scale, deterministic, "attention")


def qkv_attention(qkv, *, causal=False, prefix_len=None, scale=None, deterministic=True):
    """:func:`attention` on one packed ``[B, N, 3, H, D]`` tensor: what a transformer's qkv projection gives,
    ``qkv_proj(x).unflatten(-1, (3, H, D))``. Returns ``[B, N, H, D]``, so ``out.reshape(B, N, H * D)`` is free.

    Same masks, arguments and numbers as ``attention(q, k, v)`` with ``q, k, v = qkv.permute(2, 0, 3, 1, 4)``,
    with one difference in the backward: the Triton kernels write dq, dk and dv straight into one packed
    gradient, where separate q, k, v views of the projection cost two copies of it (stacking the three gradients,
    then undoing the permute).
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be 5-D [batch, seq_len, 3, heads, head_dim], got shape {tuple(qkv.shape)}")
    check_bool("causal", causal)
    dtype = autocast_dtype(qkv.device)
    if dtype is not None:
        qkv = qkv.to(dtype)  # one cast of the packed tensor
    q, k, v = _checked_qkv(*_unpacked(qkv), called="qkv", head_dim_of="qkv")
    prefix = (0 if causal else q.shape[2]) if prefix_len is None else _checked_prefix(prefix_len, q, "qkv")
    scale = _checked_scale(scale, q.shape[-1])
    deterministic = _checked_deterministic(deterministic)
    backend = _backend.select("attention", q.device, implemented=("triton",))
    if backend == "triton" and not _sdpa_measured_faster(q, prefix, deterministic):
        qkv = unit_stride(qkv)
        centre_keys = _centre_keys_mode()
        key_mean = _key_mean(k) if centre_keys is True else None
        if isinstance(prefix, torch.Tensor):
            return _TritonPackedAttention.apply(qkv, prefix, 0, scale, deterministic, key_mean, centre_keys == "dq")
        return _TritonPackedAttention.apply(qkv, None, prefix, scale, deterministic, key_mean, centre_keys == "dq")
    return _attend(q, k, v, prefix, scale, deterministic, "attention").transpose(1, 2)


def prefix_causal_mask(seq_len, prefix_len, *, device=None):
    """Boolean mask ``[B or 1, 1, N, N]``, True where query i may attend to key j (``j <= i or j < prefix``).

    ``prefix_len``: a non-negative int (mask of batch 1) or an integer tensor ``[B]`` (values clamped
    to ``[0, N]``). ``device`` defaults to the tensor's device, else the CPU.
    """
    if not is_int(seq_len) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    _check_prefix_type(prefix_len)
    if isinstance(prefix_len, torch.Tensor) and prefix_len.dim() != 1:
        raise ValueError(f"prefix_len must have shape [batch], got {tuple(prefix_len.shape)}")
    return reference.prefix_causal_mask(int(seq_len), prefix_len, device=device)
