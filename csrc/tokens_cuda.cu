// CUDA implementations of mimkernels::gather_rows / restore_rows: one thread block per output row,
// 16-byte vector loads and stores when the row layout allows, each row's id read once.
// Ids outside their range never address memory outside the tensors: gathered rows are written as
// zeros, restored rows take the token (the Python layer documents this and can check ids first).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "tokens.h"

namespace mimkernels {
namespace {

constexpr int kMaxThreads = 256;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// The row copy both ops share: out = (src, or the fp32 fill row, or zeros) + pos, rounded once,
// kVec elements per thread step. A plain copy (no pos) moves the bits unchanged.
template <typename scalar_t, int kVec>
__device__ void write_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ src,
                          const float* __restrict__ fill, const float* __restrict__ pos, int64_t dim) {
  using P = Pack<scalar_t, kVec>;
  for (int64_t d = threadIdx.x * kVec; d < dim; d += blockDim.x * kVec) {
    P values;
    if (src != nullptr) values = *reinterpret_cast<const P*>(src + d);
    if (src == nullptr || pos != nullptr) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        float value = src != nullptr ? static_cast<float>(values.v[i]) : (fill != nullptr ? fill[d + i] : 0.0f);
        if (pos != nullptr) value += pos[d + i];
        values.v[i] = static_cast<scalar_t>(value);
      }
    }
    *reinterpret_cast<P*>(out + d) = values;
  }
}

template <typename scalar_t, typename index_t, int kVec>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ x, const index_t* __restrict__ ids,
                                   const float* __restrict__ pos, scalar_t* __restrict__ out, int64_t x_stride_b,
                                   int64_t x_stride_t, int64_t ids_stride_b, int64_t num_prefix, int64_t num_ids,
                                   int64_t num_src, int64_t dim) {
  const int64_t rows = num_prefix + num_ids;
  const int64_t b = blockIdx.x / rows, row = blockIdx.x % rows;
  const int64_t src = row < num_prefix ? row : num_prefix + static_cast<int64_t>(ids[b * ids_stride_b + row - num_prefix]);
  const bool readable = src >= 0 && src < num_src;
  write_row<scalar_t, kVec>(out + static_cast<int64_t>(blockIdx.x) * dim,
                            readable ? x + b * x_stride_b + src * x_stride_t : nullptr, nullptr,
                            pos != nullptr && readable ? pos + src * dim : nullptr, dim);
}

template <typename scalar_t, typename index_t, int kVec>
__global__ void restore_rows_kernel(const scalar_t* __restrict__ x, const index_t* __restrict__ ids,
                                    const float* __restrict__ token, const float* __restrict__ pos,
                                    scalar_t* __restrict__ out, int64_t x_stride_b, int64_t x_stride_t,
                                    int64_t ids_stride_b, int64_t num_prefix, int64_t num_kept, int64_t num_ids,
                                    int64_t dim) {
  const int64_t rows = num_prefix + num_ids;
  const int64_t b = blockIdx.x / rows, row = blockIdx.x % rows;
  const int64_t id = row < num_prefix ? -1 : static_cast<int64_t>(ids[b * ids_stride_b + row - num_prefix]);
  const scalar_t* src = row < num_prefix            ? x + b * x_stride_b + row * x_stride_t
                        : (id >= 0 && id < num_kept) ? x + b * x_stride_b + (num_prefix + id) * x_stride_t
                                                     : nullptr;  // the mask token
  write_row<scalar_t, kVec>(out + static_cast<int64_t>(blockIdx.x) * dim, src, token,
                            pos != nullptr ? pos + row * dim : nullptr, dim);
}

// The widest vector (up to 16 bytes) that every row start and the row length are aligned to.
template <typename scalar_t>
int vector_width(int64_t dim, std::initializer_list<const void*> bases, std::initializer_list<int64_t> strides) {
  int vec = 16 / static_cast<int>(sizeof(scalar_t));
  auto fits = [&](int v) {
    if (dim % v != 0) return false;
    for (const void* p : bases) {
      if (reinterpret_cast<uintptr_t>(p) % (v * sizeof(scalar_t)) != 0) return false;
    }
    for (int64_t s : strides) {
      if (s % v != 0) return false;
    }
    return true;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  return vec;
}

int threads_for(int64_t dim, int vec) {
  const int64_t needed = (dim / vec + 31) / 32 * 32;
  return static_cast<int>(std::max<int64_t>(32, std::min<int64_t>(kMaxThreads, needed)));
}

#define MIMKERNELS_DISPATCH_VEC(vec, ...)  \
  switch (vec) {                           \
    case 8: { constexpr int kVec = 8; __VA_ARGS__(); break; } \
    case 4: { constexpr int kVec = 4; __VA_ARGS__(); break; } \
    case 2: { constexpr int kVec = 2; __VA_ARGS__(); break; } \
    default: { constexpr int kVec = 1; __VA_ARGS__(); break; } \
  }

}  // namespace

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& ids, const std::optional<at::Tensor>& pos_in,
                            int64_t num_prefix) {
  check_row_copy_args(x, ids, pos_in, x.size(1), num_prefix, "gather_rows");
  TORCH_CHECK_VALUE(ids.size(1) <= 1 || ids.stride(1) == 1, "gather_rows: ids must have unit stride in dim 1");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::Tensor pos = pos_in.has_value() ? pos_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t batch = x.size(0), dim = x.size(2), num_ids = ids.size(1), rows = num_prefix + num_ids;
  at::Tensor out = at::empty({batch, rows, dim}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_rows_cuda", [&] {
    const int vec = vector_width<scalar_t>(dim, {x.const_data_ptr(), out.const_data_ptr()},
                                           {x.stride(0), x.stride(1)});
    const float* pos_data = pos.defined() ? pos.const_data_ptr<float>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "gather_rows_cuda_ids", [&] {
      MIMKERNELS_DISPATCH_VEC(vec, [&] {
        gather_rows_kernel<scalar_t, index_t, kVec>
            <<<batch * rows, threads_for(dim, kVec), 0, c10::cuda::getCurrentCUDAStream()>>>(
                x.const_data_ptr<scalar_t>(), ids.const_data_ptr<index_t>(), pos_data,
                out.mutable_data_ptr<scalar_t>(), x.stride(0), x.stride(1), ids.stride(0), num_prefix, num_ids,
                x.size(1), dim);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor restore_rows_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& token_in,
                             const std::optional<at::Tensor>& pos_in, int64_t num_prefix) {
  const int64_t num_ids = ids.size(-1);
  check_row_copy_args(x, ids, pos_in, num_prefix + num_ids, num_prefix, "restore_rows");
  TORCH_CHECK_VALUE(ids.size(1) <= 1 || ids.stride(1) == 1, "restore_rows: ids must have unit stride in dim 1");
  TORCH_CHECK_VALUE(token_in.numel() == x.size(2), "restore_rows: token must hold ", x.size(2), " values");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::Tensor token = token_in.to(at::kFloat).contiguous();  // a no-op for the usual fp32 parameter
  const at::Tensor pos = pos_in.has_value() ? pos_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t batch = x.size(0), dim = x.size(2), rows = num_prefix + num_ids;
  at::Tensor out = at::empty({batch, rows, dim}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "restore_rows_cuda", [&] {
    const int vec = vector_width<scalar_t>(dim, {x.const_data_ptr(), out.const_data_ptr()}, {x.stride(0), x.stride(1)});
    const float* pos_data = pos.defined() ? pos.const_data_ptr<float>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "restore_rows_cuda_ids", [&] {
      MIMKERNELS_DISPATCH_VEC(vec, [&] {
        restore_rows_kernel<scalar_t, index_t, kVec>
            <<<batch * rows, threads_for(dim, kVec), 0, c10::cuda::getCurrentCUDAStream()>>>(
                x.const_data_ptr<scalar_t>(), ids.const_data_ptr<index_t>(), token.const_data_ptr<float>(),
                pos_data, out.mutable_data_ptr<scalar_t>(), x.stride(0), x.stride(1), ids.stride(0), num_prefix,
                x.size(1) - num_prefix, num_ids, dim);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(mimkernels, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("restore_rows", &restore_rows_cuda);
}

}  // namespace mimkernels
