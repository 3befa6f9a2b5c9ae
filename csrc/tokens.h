// MAE token row copies shared by the CPU and CUDA implementations of mimkernels::gather_rows / restore_rows.
//
//   gather_rows(x [B, P + L, D], ids [B, K], pos [1, P + L, D]?, P) -> [B, P + K, D]
//     out[b, r] = x[b, r] (r < P);  out[b, P + k] = x[b, P + ids[b, k]];  + pos[0, source row] when given
//   restore_rows(x [B, P + K, D], ids [B, L], token [D], pos [1, P + L, D]?, P) -> [B, P + L, D]
//     out[b, r] = x[b, r] (r < P);  out[b, P + l] = ids[b, l] < K ? x[b, P + ids[b, l]] : token;  + pos[0, row]
//
// Additions happen in fp32 and round once to x's dtype, as in the Triton kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace mimkernels {

// Shapes, dtypes and strides common to both ops; returns nothing, raises ValueError-style errors.
void check_row_copy_args(const at::Tensor& x, const at::Tensor& ids, const std::optional<at::Tensor>& pos,
                         int64_t pos_rows, int64_t num_prefix, const char* op);

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& ids, const std::optional<at::Tensor>& pos,
                            int64_t num_prefix);
at::Tensor restore_rows_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& token,
                             const std::optional<at::Tensor>& pos, int64_t num_prefix);

}  // namespace mimkernels
