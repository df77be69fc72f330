// Register-tiled product of two strided operands, shared by the statistics kernels.
//
// One thread block computes a 64 x 64 tile  C[i, j] = sum_k L(k, i) * R(k, j)  in fp32, with
// L(k, i) = L[k * l_sk + i * l_si] and R(k, j) = R[k * r_sk + j * r_sj] (any strides, any of
// float / half / bfloat16 inputs). 256 threads, 4 x 4 outputs each; K is walked in chunks of 16
// through shared memory. Out-of-range rows and columns read as zero. An optional k-weight
// (the token mask) multiplies L(k, .) as it is staged.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace fisher_kernels {

constexpr int kTile = 64;
constexpr int kChunk = 16;
constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename TL, typename TR>
__device__ void tile_product(const TL* __restrict__ L, int64_t l_sk, int64_t l_si,
                             const TR* __restrict__ R, int64_t r_sk, int64_t r_sj,
                             const float* __restrict__ k_weight,
                             int64_t K, int64_t I, int64_t J, int64_t i0, int64_t j0,
                             float acc[4][4]) {
  __shared__ float Ls[kChunk][kTile];
  __shared__ float Rs[kChunk][kTile];
  const int tid = threadIdx.x;
  const int ti = (tid / 16) * 4;  // this thread's 4 rows of the tile
  const int tj = (tid % 16) * 4;  // and 4 columns
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    // stage a 16 x 64 chunk of each operand: 1024 elements, 4 per thread
    for (int e = tid; e < kChunk * kTile; e += kThreads) {
      const int kk = e / kTile, c = e % kTile;
      const int64_t k = k0 + kk, i = i0 + c, j = j0 + c;
      float lv = 0.f, rv = 0.f;
      if (k < K && i < I) {
        lv = to_float(L[k * l_sk + i * l_si]);
        if (k_weight != nullptr) lv *= k_weight[k];
      }
      if (k < K && j < J) rv = to_float(R[k * r_sk + j * r_sj]);
      Ls[kk][c] = lv;
      Rs[kk][c] = rv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
      float l[4], r[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) l[a] = Ls[kk][ti + a];
#pragma unroll
      for (int b = 0; b < 4; ++b) r[b] = Rs[kk][tj + b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(l[a], r[b], acc[a][b]);
    }
    __syncthreads();
  }
}

}  // namespace fisher_kernels
