// selact CPU kernels: sparse-input linear layers that read only the weight rows the mask keeps.
//
// The weight is packed once per layer as W_packed[t][k][c] = W[t*NB + c][k] (NB = 64 outputs
// per tile, N padded with zeros): for one tile of outputs, the weights of input k are 64
// contiguous floats, and the kept inputs of a row are read in increasing k, so the kernel
// streams through memory and the bytes it reads are proportional to the kept inputs.
// Tiles run in parallel on ATen's thread pool (torch.set_num_threads applies).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

#ifndef SELACT_NB
#define SELACT_NB 128
#endif
constexpr int64_t NB = SELACT_NB;  // outputs per tile

struct Rows {
  std::vector<int32_t> index;   // kept nonzero inputs of every row, concatenated
  std::vector<float> value;
  std::vector<int64_t> start;   // row r owns [start[r], start[r + 1])
};

// Kept nonzero inputs of each row. mask: (R, K), (K,) or undefined (all kept).
Rows compact(const float* x, const bool* mask, bool shared, int64_t R, int64_t K) {
  Rows rows;
  rows.start.reserve(R + 1);
  rows.index.reserve(R * K / 2);
  rows.value.reserve(R * K / 2);
  rows.start.push_back(0);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * K;
    const bool* mr = mask == nullptr ? nullptr : (shared ? mask : mask + r * K);
    for (int64_t k = 0; k < K; ++k) {
      if ((mr == nullptr || mr[k]) && xr[k] != 0.0f) {
        rows.index.push_back(static_cast<int32_t>(k));
        rows.value.push_back(xr[k]);
      }
    }
    rows.start.push_back(static_cast<int64_t>(rows.index.size()));
  }
  return rows;
}

#if defined(__AVX512F__)
// acc[0:NB] = sum_j value[j] * w[index[j]][0:NB]. Accumulators live in NB/16 registers per
// input, two inputs in flight to hide the FMA latency; each kept weight row is read once, and
// the row two steps ahead is prefetched (the hardware prefetcher cannot guess the gaps).
template <int64_t W>
inline void tile_row_t(const float* __restrict w, const int32_t* __restrict index,
                       const float* __restrict value, int64_t count, float* __restrict acc) {
  constexpr int R = W / 16;
  __m512 a[R], b[R];
  for (int i = 0; i < R; ++i) a[i] = b[i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 1 < count; j += 2) {
    const float* w0 = w + static_cast<int64_t>(index[j]) * W;
    const float* w1 = w + static_cast<int64_t>(index[j + 1]) * W;
    if (j + 5 < count) {
      const char* p0 = reinterpret_cast<const char*>(w + static_cast<int64_t>(index[j + 4]) * W);
      const char* p1 = reinterpret_cast<const char*>(w + static_cast<int64_t>(index[j + 5]) * W);
      for (int i = 0; i < W * 4; i += 64) {
        _mm_prefetch(p0 + i, _MM_HINT_T0);
        _mm_prefetch(p1 + i, _MM_HINT_T0);
      }
    }
    const __m512 v0 = _mm512_set1_ps(value[j]), v1 = _mm512_set1_ps(value[j + 1]);
    for (int i = 0; i < R; ++i) {
      a[i] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(w0 + 16 * i), a[i]);
      b[i] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(w1 + 16 * i), b[i]);
    }
  }
  if (j < count) {
    const float* w0 = w + static_cast<int64_t>(index[j]) * W;
    const __m512 v0 = _mm512_set1_ps(value[j]);
    for (int i = 0; i < R; ++i) a[i] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(w0 + 16 * i), a[i]);
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(acc + 16 * i, _mm512_add_ps(a[i], b[i]));
}

inline void tile_row(const float* __restrict w, const int32_t* __restrict index,
                     const float* __restrict value, int64_t count, float* __restrict acc) {
  tile_row_t<NB>(w, index, value, count, acc);
}
#else
// Portable version: the compiler vectorises the inner loop.
inline void tile_row(const float* __restrict w, const int32_t* __restrict index,
                     const float* __restrict value, int64_t count, float* __restrict acc) {
  for (int64_t c = 0; c < NB; ++c) acc[c] = 0.0f;
  for (int64_t j = 0; j < count; ++j) {
    const float* __restrict wk = w + static_cast<int64_t>(index[j]) * NB;
    const float v = value[j];
#pragma omp simd
    for (int64_t c = 0; c < NB; ++c) acc[c] += v * wk[c];
  }
}
#endif

}  // namespace

// y = (mask ⊙ x) Wᵀ + b for x (R, K) float32; returns (y, executed MACs).
std::tuple<at::Tensor, at::Tensor> sparse_linear(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                                                 const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                                 int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous (R, K) float32");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NB && packed.is_contiguous(), "packed weight: (T, K, NB)");
  const int64_t R = x.size(0), K = x.size(1), T = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && T * NB >= n_out, "packed weight does not match x");
  const bool* m = nullptr;
  bool shared = false;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous(), "mask: contiguous bool");
    shared = mask->dim() == 1;
    TORCH_CHECK(mask->numel() == (shared ? K : R * K), "mask must be (K,) or (R, K)");
    m = mask->data_ptr<bool>();
  }
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_out, "bias: (N,) float32");
    b = bias->contiguous().data_ptr<float>();
  }
  Rows rows = compact(x.data_ptr<float>(), m, shared, R, K);
  at::Tensor y = at::empty({R, n_out}, x.options());
  float* out = y.data_ptr<float>();
  const float* w = packed.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float acc[NB];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NB, width = std::min(NB, n_out - n0);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t s = rows.start[r];
        tile_row(w + t * K * NB, rows.index.data() + s, rows.value.data() + s, rows.start[r + 1] - s, acc);
        float* yr = out + r * n_out + n0;
        for (int64_t c = 0; c < width; ++c) yr[c] = acc[c] + (b ? b[n0 + c] : 0.0f);
      }
    }
  });
  at::Tensor macs = at::scalar_tensor(static_cast<int64_t>(rows.index.size()) * n_out, at::kLong);
  return {y, macs};
}

TORCH_LIBRARY(selact_cpu, m) {
  m.def("sparse_linear(Tensor x, Tensor? mask, Tensor packed, Tensor? bias, int n_out) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(selact_cpu, CPU, m) { m.impl("sparse_linear", &sparse_linear); }
