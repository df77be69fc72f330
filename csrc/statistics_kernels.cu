// Fused K-FAC statistics updates (CUDA). Each kernel matches fisher_kernels/ops/reference.py:
//   masked_gram:             C += A^T diag(mask) B           (symmetric: upper-triangle tiles only)
//   masked_column_sumsq:     c += sum_t mask_t x_t^2
//   masked_projected_energy: e += sum_t mask_t (P^T x_t)^2    (the (T, m) projection never hits memory)
// masked_gram has two kernels: fp32 inputs run on the fp32 FMA tiles (tile_gemm.cuh); bf16/fp16
// inputs on devices of compute capability >= 8.0 run on the tensor cores (WMMA 16x16x16, fp32
// accumulation; products of 16-bit numbers are exact in fp32, so only the summation order differs).
// This file includes no torch header: nvcc compiles it quickly and against any torch build.
// bindings.cpp (plain C++, torch/extension.h) checks arguments and calls the launchers below
// with raw pointers and the CUDA stream taken from Python.
#include <cuda_runtime.h>
#include <mma.h>

#include "statistics_kernels.h"
#include "tile_gemm.cuh"

#include <type_traits>

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

// Tensor-core masked Gram for bf16/fp16 inputs: one block of 4 warps computes a 64 x 64 tile of C,
// each warp a 32 x 32 quarter as 2 x 2 WMMA fragments. Chunks of 32 rows (tokens) of both operands
// are staged through shared memory in the input dtype; masked and out-of-range rows are staged as
// zeros (the mask is 0/1, so this is exact), which also frees the loads from any stride or alignment
// requirement. The tile is written back through shared memory and added to C with bounds checks.
constexpr int kTcTile = 64, kTcChunk = 32, kTcThreads = 128, kTcPad = 8, kTcOutPad = 4;
static_assert(kTcTile == kTile, "the launcher shares one grid between the two Gram kernels");

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
masked_gram_tensor_core_kernel(const T* __restrict__ a, int64_t a_st, int64_t a_sm, const T* __restrict__ b,
                               int64_t b_st, int64_t b_sn, const float* __restrict__ mask, float* __restrict__ c,
                               int64_t c_sm, int64_t c_sn, int64_t rows, int64_t M, int64_t N, bool symmetric) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  const int64_t i0 = int64_t(blockIdx.y) * kTcTile, j0 = int64_t(blockIdx.x) * kTcTile;
  if (symmetric && j0 + kTcTile <= i0) return;  // tile strictly below the diagonal
  __shared__ __align__(32) T As[kTcChunk][kTcTile + kTcPad];  // As[k][i] = a[k0 + k, i0 + i]
  __shared__ __align__(32) T Bs[kTcChunk][kTcTile + kTcPad];  // Bs[k][j] = b[k0 + k, j0 + j]
  __shared__ __align__(32) float Cs[kTcTile][kTcTile + kTcOutPad];
  const int warp = threadIdx.x / 32;
  const int wi = (warp / 2) * 32, wj = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int p = 0; p < 2; ++p)
    for (int q = 0; q < 2; ++q) wmma::fill_fragment(acc[p][q], 0.f);
  const T zero = T(0.f);
  for (int64_t k0 = 0; k0 < rows; k0 += kTcChunk) {
    for (int e = threadIdx.x; e < kTcChunk * kTcTile; e += kTcThreads) {
      const int kk = e / kTcTile, col = e % kTcTile;
      const int64_t k = k0 + kk, i = i0 + col, j = j0 + col;
      const bool keep = k < rows && (mask == nullptr || mask[k] != 0.f);
      As[kk][col] = (keep && i < M) ? a[k * a_st + i * a_sm] : zero;
      Bs[kk][col] = (keep && j < N) ? b[k * b_st + j * b_sn] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcChunk; kk += 16) {
      // A(i, k) = As[k][i]: column-major with leading dimension kTcTile + kTcPad; B(k, j) = Bs[k][j]: row-major
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
      for (int p = 0; p < 2; ++p) wmma::load_matrix_sync(fa[p], &As[kk][wi + 16 * p], kTcTile + kTcPad);
      for (int q = 0; q < 2; ++q) wmma::load_matrix_sync(fb[q], &Bs[kk][wj + 16 * q], kTcTile + kTcPad);
      for (int p = 0; p < 2; ++p)
        for (int q = 0; q < 2; ++q) wmma::mma_sync(acc[p][q], fa[p], fb[q], acc[p][q]);
    }
    __syncthreads();
  }
  for (int p = 0; p < 2; ++p)
    for (int q = 0; q < 2; ++q)
      wmma::store_matrix_sync(&Cs[wi + 16 * p][wj + 16 * q], acc[p][q], kTcTile + kTcOutPad, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < kTcTile * kTcTile; e += kTcThreads) {
    const int r = e / kTcTile, col = e % kTcTile;
    const int64_t i = i0 + r, j = j0 + col;
    if (i < M && j < N) c[i * c_sm + j * c_sn] += Cs[r][col];
  }
#endif
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
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile);  // kTcTile == kTile
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  const bool tensor_cores = dtype != DType::kFloat32 && major >= 8;
  with_input_type(dtype, a, [&](auto* pa) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(pa)>>;
    if constexpr (std::is_same_v<T, float>) {
      masked_gram_kernel<T><<<grid, kThreads, 0, stream>>>(pa, a_st, a_sm, static_cast<const T*>(b), b_st, b_sn,
                                                           mask, c, c_sm, c_sn, rows, M, N, symmetric);
    } else if (tensor_cores) {
      masked_gram_tensor_core_kernel<T><<<grid, kTcThreads, 0, stream>>>(
          pa, a_st, a_sm, static_cast<const T*>(b), b_st, b_sn, mask, c, c_sm, c_sn, rows, M, N, symmetric);
    } else {
      masked_gram_kernel<T><<<grid, kThreads, 0, stream>>>(pa, a_st, a_sm, static_cast<const T*>(b), b_st, b_sn,
                                                           mask, c, c_sm, c_sn, rows, M, N, symmetric);
    }
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
