// Launchers of the fused statistics kernels: raw pointers, element strides, the stream.
// Shared by statistics_kernels.cu (nvcc, no torch headers) and bindings.cpp (torch).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace fisher_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// c (M, N) fp32 += a^T diag(mask) b, a (rows, M), b (rows, N); symmetric: upper-triangle tiles only.
cudaError_t launch_masked_gram(DType dtype, const void* a, int64_t a_st, int64_t a_sm, const void* b, int64_t b_st,
                               int64_t b_sn, const float* mask, float* c, int64_t c_sm, int64_t c_sn, int64_t rows,
                               int64_t M, int64_t N, bool symmetric, cudaStream_t stream);

// out (D,) fp32 += sum_t mask_t x_t^2, x (rows, D).
cudaError_t launch_masked_column_sumsq(DType dtype, const void* x, int64_t x_st, int64_t x_sd, const float* mask,
                                       float* out, int64_t rows, int64_t D, cudaStream_t stream);

// out (M,) fp32 += sum_t mask_t (basis^T x_t)^2, x (rows, D), basis (D, M) fp32.
cudaError_t launch_masked_projected_energy(DType dtype, const void* x, int64_t x_st, int64_t x_sd, const float* basis,
                                           int64_t p_sd, int64_t p_sm, const float* mask, float* out, int64_t rows,
                                           int64_t D, int64_t M, cudaStream_t stream);

}  // namespace fisher_kernels
