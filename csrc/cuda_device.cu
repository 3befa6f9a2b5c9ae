// mimkernels::has_cuda_kernels_for(device) -> bool: whether this extension's CUDA code runs on that GPU.
//
// nvcc puts machine code in the library for the archs it was built for (TORCH_CUDA_ARCH_LIST; setup.py's default
// without a visible GPU is sm_80 and sm_90 plus PTX, which newer GPUs compile when the library loads). On a GPU
// outside those every launch fails with "no kernel image is available". mimkernels/_backend.py asks once per
// device and, where the answer is no, runs the ops on another backend instead of failing at the first launch.
// Only CUDA builds of the extension define the op: its absence says the extension has no CUDA code at all.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace mimkernels {
namespace {

// Compiled for the same archs as every other kernel of the extension, so its loadability stands for theirs.
__global__ void probe_kernel() {}

bool has_cuda_kernels_for(int64_t device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    cudaGetLastError();  // no driver or no such device is an answer here, not an error for the next CUDA call
    return false;
  }
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  // Loads the kernel's module for this device (lazy loading included): fails when no image or PTX fits it.
  const cudaError_t status = cudaFuncGetAttributes(&attributes, probe_kernel);
  cudaGetLastError();
  return status == cudaSuccess;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mimkernels, m) {
  m.def("has_cuda_kernels_for(int device) -> bool", &has_cuda_kernels_for);
}

}  // namespace mimkernels
