// The token family, mimkernels::gather_rows and mimkernels::restore_rows: schemas, argument checks and the CPU
// implementations. The CUDA implementations live in tokens_cuda.cu and register themselves when the extension is
// built with CUDA. The library itself and the Python module are defined once, in module.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "tokens.h"

namespace mimkernels {

void check_row_copy_args(const at::Tensor& x, const at::Tensor& ids, const std::optional<at::Tensor>& pos,
                         int64_t pos_rows, int64_t num_prefix, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be 3-D [batch, tokens, dim], got ", x.sizes());
  // an empty x holds no row to read, whatever its strides (the backward of out.sum() hands an expanded one: stride 0)
  TORCH_CHECK_VALUE(x.numel() == 0 || x.size(2) <= 1 || x.stride(2) == 1, op,
                    ": x must have unit stride in its last dim");
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == x.size(0), op, ": ids must be [batch, n], got ", ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
                   ": ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.device() == x.device(), op, ": ids and x must be on one device");
  TORCH_CHECK_VALUE(num_prefix >= 0 && num_prefix <= x.size(1), op, ": num_prefix out of range: ", num_prefix);
  if (pos.has_value()) {
    TORCH_CHECK_VALUE(pos->dim() == 3 && pos->size(0) == 1 && pos->size(1) == pos_rows && pos->size(2) == x.size(2),
                      op, ": pos must be [1, ", pos_rows, ", ", x.size(2), "], got ", pos->sizes());
    TORCH_CHECK_VALUE(pos->device() == x.device(), op, ": pos and x must be on one device");
  }
}

namespace {

// Index range check on the host: CPU ops raise IndexError rather than touch memory outside x.
void check_ids_range(const at::Tensor& ids, int64_t upper, const char* op) {
  if (ids.numel() == 0) return;
  const int64_t low = ids.min().item<int64_t>();
  const int64_t high = ids.max().item<int64_t>();
  TORCH_CHECK_INDEX(low >= 0 && high < upper, op, ": ids must lie in [0, ", upper, "), got values from ", low,
                    " to ", high);
}

// One output row: a copy of src, or the fp32 fill row (zeros when null), plus pos, rounded once.
template <typename scalar_t>
void write_row(scalar_t* out, const scalar_t* src, const float* fill, const float* pos, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    if (src != nullptr && pos == nullptr) {
      out[d] = src[d];
    } else {
      const float value = src != nullptr ? static_cast<float>(src[d]) : (fill != nullptr ? fill[d] : 0.0f);
      out[d] = static_cast<scalar_t>(pos != nullptr ? value + pos[d] : value);
    }
  }
}

struct RowSource {
  int64_t x_row;    // row of x to copy; negative: the fill row
  int64_t pos_row;  // row of pos to add
};

// out[b, row] for every b < B and row < rows, from source(b, row), in parallel.
template <typename Source>
at::Tensor copy_rows_cpu(const at::Tensor& x, int64_t rows, const at::Tensor& fill, const at::Tensor& pos,
                         Source source) {
  const int64_t batch = x.size(0), dim = x.size(2);
  at::Tensor out = at::empty({batch, rows, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "copy_rows_cpu", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const float* fill_data = fill.defined() ? fill.const_data_ptr<float>() : nullptr;
    const float* pos_data = pos.defined() ? pos.const_data_ptr<float>() : nullptr;
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / rows;
        const RowSource s = source(b, i % rows);
        write_row(out_data + i * dim, s.x_row >= 0 ? x_data + b * x.stride(0) + s.x_row * x.stride(1) : nullptr,
                  fill_data, pos_data ? pos_data + s.pos_row * dim : nullptr, dim);
      }
    });
  });
  return out;
}

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& ids_in, const std::optional<at::Tensor>& pos_in,
                           int64_t num_prefix) {
  check_row_copy_args(x, ids_in, pos_in, x.size(1), num_prefix, "gather_rows");
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  check_ids_range(ids, x.size(1) - num_prefix, "gather_rows");
  const at::Tensor pos = pos_in.has_value() ? pos_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t* id_data = ids.const_data_ptr<int64_t>();
  const int64_t num_ids = ids.size(1);
  return copy_rows_cpu(x, num_prefix + num_ids, at::Tensor(), pos, [&](int64_t b, int64_t row) {
    const int64_t src = row < num_prefix ? row : num_prefix + id_data[b * num_ids + row - num_prefix];
    return RowSource{src, src};
  });
}

at::Tensor restore_rows_cpu(const at::Tensor& x, const at::Tensor& ids_in, const at::Tensor& token_in,
                            const std::optional<at::Tensor>& pos_in, int64_t num_prefix) {
  const int64_t num_ids = ids_in.size(-1);
  check_row_copy_args(x, ids_in, pos_in, num_prefix + num_ids, num_prefix, "restore_rows");
  TORCH_CHECK_VALUE(token_in.numel() == x.size(2), "restore_rows: token must hold ", x.size(2), " values");
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  check_ids_range(ids, num_ids, "restore_rows");
  const at::Tensor token = token_in.to(at::kFloat).contiguous();
  const at::Tensor pos = pos_in.has_value() ? pos_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t* id_data = ids.const_data_ptr<int64_t>();
  const int64_t kept = x.size(1) - num_prefix;
  return copy_rows_cpu(x, num_prefix + num_ids, token, pos, [&](int64_t b, int64_t row) {
    if (row < num_prefix) return RowSource{row, row};
    const int64_t id = id_data[b * num_ids + row - num_prefix];
    return RowSource{id < kept ? num_prefix + id : -1, row};
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mimkernels, m) {
  m.def("gather_rows(Tensor x, Tensor ids, Tensor? pos, int num_prefix) -> Tensor");
  m.def("restore_rows(Tensor x, Tensor ids, Tensor token, Tensor? pos, int num_prefix) -> Tensor");
}

TORCH_LIBRARY_IMPL(mimkernels, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("restore_rows", &restore_rows_cpu);
}

}  // namespace mimkernels
