// Fused K-FAC statistics updates (CUDA). Each kernel matches fisher_kernels/ops/reference.py:
//   masked_gram:             C += A^T diag(mask) B           (symmetric: upper-triangle tiles only)
//   masked_column_sumsq:     c += sum_t mask_t x_t^2
//   masked_projected_energy: e += sum_t mask_t (P^T x_t)^2    (the (T, m) projection never hits memory)
// This file includes no torch header: nvcc compiles it quickly and against any torch build.
// bindings.cpp (plain C++, torch/extension.h) checks arguments and calls the launchers below
// with raw pointers and the CUDA stream taken from Python.
#include <cuda_runtime.h>

#include "statistics_kernels.h"
#include "tile_gemm.cuh"

namespace fisher_kernels {

template <typename T>
__global__ void masked_gram_kernel(const T* __restrict__ a, int64_t a_st, int64_t a_sm,
                                   const T* __restrict__ b, int64_t b_st, int64_t b_sn,
                                   const float* __restrict__ mask, float* __restrict__ c,
                                   int64_t c_sm, int64_t c_sn, int64_t rows, int64_t M, int64_t N,
                                   bool symmetric) {
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  if (symmetric && j0 + kTile <= i0) return;  // tile strictly below the diagonal
  float acc[4][4];
  tile_product(a, a_st, a_sm, b, b_st, b_sn, mask, rows, M, N, i0, j0, acc);
  const int ti = (threadIdx.x / 16) * 4, tj = (threadIdx.x % 16) * 4;
  for (int p = 0; p < 4; ++p)
    for (int q = 0; q < 4; ++q) {
      const int64_t i = i0 + ti + p, j = j0 + tj + q;
      if (i < M && j < N) c[i * c_sm + j * c_sn] += acc[p][q];
    }
}

template <typename T>
__global__ void masked_column_sumsq_kernel(const T* __restrict__ x, int64_t x_st, int64_t x_sd,
                                           const float* __restrict__ mask, float* __restrict__ out,
                                           int64_t rows, int64_t D, int64_t rows_per_block) {
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const int64_t start = int64_t(blockIdx.y) * rows_per_block;
  const int64_t stop = start + rows_per_block < rows ? start + rows_per_block : rows;
  float sum = 0.f;
  for (int64_t t = start; t < stop; ++t) {
    const float v = to_float(x[t * x_st + d * x_sd]);
    sum += (mask == nullptr ? 1.f : mask[t]) * v * v;
  }
  atomicAdd(out + d, sum);
}

template <typename T>
__global__ void masked_projected_energy_kernel(const T* __restrict__ x, int64_t x_st, int64_t x_sd,
                                               const float* __restrict__ basis, int64_t p_sd, int64_t p_sm,
                                               const float* __restrict__ mask, float* __restrict__ out,
                                               int64_t rows, int64_t D, int64_t M) {
  // tile: 64 rows (tokens) x 64 basis vectors; K runs over the feature dimension D
  const int64_t t0 = int64_t(blockIdx.y) * kTile, m0 = int64_t(blockIdx.x) * kTile;
  float acc[4][4];
  tile_product(x, x_sd, x_st, basis, p_sd, p_sm, static_cast<const float*>(nullptr), D, rows, M, t0, m0, acc);
  __shared__ float column_sums[kTile];
  if (threadIdx.x < kTile) column_sums[threadIdx.x] = 0.f;
  __syncthreads();
  const int ti = (threadIdx.x / 16) * 4, tj = (threadIdx.x % 16) * 4;
  for (int q = 0; q < 4; ++q) {
    float s = 0.f;
    for (int p = 0; p < 4; ++p) {
      const int64_t t = t0 + ti + p;
      if (t < rows) s += (mask == nullptr ? 1.f : mask[t]) * acc[p][q] * acc[p][q];
    }
    atomicAdd(&column_sums[tj + q], s);
  }
  __syncthreads();
  if (threadIdx.x < kTile && m0 + threadIdx.x < M) atomicAdd(out + m0 + threadIdx.x, column_sums[threadIdx.x]);
}

}  // namespace fisher_kernels


namespace fisher_kernels {

namespace {

template <typename F>
void with_input_type(DType dtype, const void* x, F&& launch) {
  switch (dtype) {
    case DType::kFloat32: launch(static_cast<const float*>(x)); break;
    case DType::kFloat16: launch(static_cast<const __half*>(x)); break;
    case DType::kBFloat16: launch(static_cast<const __nv_bfloat16*>(x)); break;
  }
}

}  // namespace

cudaError_t launch_masked_gram(DType dtype, const void* a, int64_t a_st, int64_t a_sm, const void* b, int64_t b_st,
                               int64_t b_sn, const float* mask, float* c, int64_t c_sm, int64_t c_sn, int64_t rows,
                               int64_t M, int64_t N, bool symmetric, cudaStream_t stream) {
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile);
  with_input_type(dtype, a, [&](auto* pa) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(pa)>>;
    masked_gram_kernel<T><<<grid, kThreads, 0, stream>>>(pa, a_st, a_sm, static_cast<const T*>(b), b_st, b_sn, mask,
                                                         c, c_sm, c_sn, rows, M, N, symmetric);
  });
  return cudaGetLastError();
}

cudaError_t launch_masked_column_sumsq(DType dtype, const void* x, int64_t x_st, int64_t x_sd, const float* mask,
                                       float* out, int64_t rows, int64_t D, cudaStream_t stream) {
  const int64_t rows_per_block = 512;
  const dim3 grid((D + kThreads - 1) / kThreads, (rows + rows_per_block - 1) / rows_per_block);
  with_input_type(dtype, x, [&](auto* px) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(px)>>;
    masked_column_sumsq_kernel<T><<<grid, kThreads, 0, stream>>>(px, x_st, x_sd, mask, out, rows, D, rows_per_block);
  });
  return cudaGetLastError();
}

cudaError_t launch_masked_projected_energy(DType dtype, const void* x, int64_t x_st, int64_t x_sd, const float* basis,
                                           int64_t p_sd, int64_t p_sm, const float* mask, float* out, int64_t rows,
                                           int64_t D, int64_t M, cudaStream_t stream) {
  const dim3 grid((M + kTile - 1) / kTile, (rows + kTile - 1) / kTile);
  with_input_type(dtype, x, [&](auto* px) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(px)>>;
    masked_projected_energy_kernel<T><<<grid, kThreads, 0, stream>>>(px, x_st, x_sd, basis, p_sd, p_sm, mask, out,
                                                                     rows, D, M);
  });
  return cudaGetLastError();
}

}  // namespace fisher_kernels
