// Python bindings of the statistics kernels: argument checks, then the raw launchers.
// Plain C++ (compiled by the host compiler): includes torch/extension.h and cuda_runtime.h only.
#include <torch/extension.h>
#include <cuda_runtime.h>

#include "statistics_kernels.h"

namespace {

using namespace fisher_kernels;

void check_accumulator(const torch::Tensor& acc, const char* name) {
  TORCH_CHECK(acc.is_cuda(), name, ": accumulator must be a CUDA tensor");
  TORCH_CHECK(acc.scalar_type() == torch::kFloat32, name, ": accumulator must be float32");
}

const float* mask_pointer(const c10::optional<torch::Tensor>& mask, int64_t rows) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->is_cuda(), "mask must be a CUDA tensor");
  TORCH_CHECK(mask->scalar_type() == torch::kFloat32 && mask->is_contiguous() && mask->numel() == rows,
              "mask must be a contiguous float32 vector with one entry per row");
  return mask->data_ptr<float>();
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Makes the accumulator's device current for the launch and restores the caller's device after
// (the stream passed in from Python belongs to that device). cuda_runtime only, so it compiles
// without torch's CUDA headers.
class DeviceGuard {
 public:
  explicit DeviceGuard(const torch::Tensor& acc) {
    TORCH_CHECK(cudaGetDevice(&previous_) == cudaSuccess, "cannot query the current CUDA device");
    const int device = acc.get_device();
    if (device != previous_) TORCH_CHECK(cudaSetDevice(device) == cudaSuccess, "cannot select CUDA device ", device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

void check_same_device(const torch::Tensor& acc, const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.get_device() == acc.get_device(), name, ": all tensors must be on the accumulator's device (",
              acc.device(), "), got one on ", x.device());
}

DType input_dtype(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, ": inputs must be CUDA tensors");
  switch (x.scalar_type()) {
    case torch::kFloat32: return DType::kFloat32;
    case torch::kFloat16: return DType::kFloat16;
    case torch::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": unsupported input dtype ", x.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* name) {
  TORCH_CHECK(err == cudaSuccess, name, ": kernel launch failed: ", cudaGetErrorString(err));
}

void masked_gram(torch::Tensor acc, torch::Tensor a, torch::Tensor b, c10::optional<torch::Tensor> mask,
                 bool symmetric, int64_t stream) {
  check_accumulator(acc, "masked_gram");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "masked_gram: a (T, M) and b (T, N) expected");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "masked_gram: a and b must share a dtype");
  TORCH_CHECK(acc.size(0) == a.size(1) && acc.size(1) == b.size(1), "masked_gram: acc must be (M, N)");
  const int64_t rows = a.size(0), M = a.size(1), N = b.size(1);
  check_same_device(acc, a, "masked_gram");
  check_same_device(acc, b, "masked_gram");
  if (mask.has_value()) check_same_device(acc, *mask, "masked_gram");
  const float* m = mask_pointer(mask, rows);
  DeviceGuard guard(acc);
  check_launch(launch_masked_gram(input_dtype(a, "masked_gram"), a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(),
                                  b.stride(0), b.stride(1), m, acc.data_ptr<float>(), acc.stride(0), acc.stride(1),
                                  rows, M, N, symmetric, as_stream(stream)),
               "masked_gram");
}

void masked_column_sumsq(torch::Tensor acc, torch::Tensor x, c10::optional<torch::Tensor> mask, int64_t stream) {
  check_accumulator(acc, "masked_column_sumsq");
  TORCH_CHECK(x.dim() == 2 && acc.numel() == x.size(1) && acc.is_contiguous(), "masked_column_sumsq: x (T, D), acc (D,)");
  const int64_t rows = x.size(0), D = x.size(1);
  check_same_device(acc, x, "masked_column_sumsq");
  if (mask.has_value()) check_same_device(acc, *mask, "masked_column_sumsq");
  const float* m = mask_pointer(mask, rows);
  DeviceGuard guard(acc);
  check_launch(launch_masked_column_sumsq(input_dtype(x, "masked_column_sumsq"), x.data_ptr(), x.stride(0), x.stride(1),
                                          m, acc.data_ptr<float>(), rows, D, as_stream(stream)),
               "masked_column_sumsq");
}

void masked_projected_energy(torch::Tensor acc, torch::Tensor x, torch::Tensor basis,
                             c10::optional<torch::Tensor> mask, int64_t stream) {
  check_accumulator(acc, "masked_projected_energy");
  TORCH_CHECK(basis.scalar_type() == torch::kFloat32, "masked_projected_energy: basis must be float32");
  TORCH_CHECK(x.dim() == 2 && basis.dim() == 2 && basis.size(0) == x.size(1) && acc.numel() == basis.size(1) &&
                  acc.is_contiguous(),
              "masked_projected_energy: x (T, d), basis (d, m), acc (m,)");
  const int64_t rows = x.size(0), D = x.size(1), M = basis.size(1);
  check_same_device(acc, x, "masked_projected_energy");
  check_same_device(acc, basis, "masked_projected_energy");
  if (mask.has_value()) check_same_device(acc, *mask, "masked_projected_energy");
  const float* m = mask_pointer(mask, rows);
  DeviceGuard guard(acc);
  check_launch(launch_masked_projected_energy(input_dtype(x, "masked_projected_energy"), x.data_ptr(), x.stride(0),
                                              x.stride(1), basis.data_ptr<float>(), basis.stride(0), basis.stride(1),
                                              m, acc.data_ptr<float>(), rows, D, M, as_stream(stream)),
               "masked_projected_energy");
}

}  // namespace

PYBIND11_MODULE(_cuda_kernels, module) {
  module.doc() = "fisher_kernels fused statistics kernels (CUDA)";
  module.def("masked_gram", &masked_gram, "acc += a^T diag(mask) b", py::arg("acc"), py::arg("a"), py::arg("b"),
             py::arg("mask"), py::arg("symmetric"), py::arg("stream"));
  module.def("masked_column_sumsq", &masked_column_sumsq, "acc += sum_t mask_t x_t^2", py::arg("acc"),
             py::arg("x"), py::arg("mask"), py::arg("stream"));
  module.def("masked_projected_energy", &masked_projected_energy, "acc += sum_t mask_t (basis^T x_t)^2",
             py::arg("acc"), py::arg("x"), py::arg("basis"), py::arg("mask"), py::arg("stream"));
}
