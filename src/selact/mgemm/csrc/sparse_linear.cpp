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
constexpr int64_t JB = 96;  // kept inputs per block of the shared-mask path: 96 x 256 B = 24 KB of weights, in L1

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


// Shared mask, several rows: acc[r][0:64] += ... for four rows at once, so each kept weight row
// chunk is loaded once per four rows (16 accumulator registers, 4 for the weights). values is
// [j][4]; acc is read and written back, so callers can walk the kept inputs in blocks.
#if defined(__AVX512F__)
inline void chunk_rows4(const float* __restrict w, const int32_t* __restrict index,
                        const float* __restrict values, int64_t count, float* __restrict acc,
                        int64_t acc_stride) {
  __m512 a[4][4];
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = _mm512_loadu_ps(acc + r * acc_stride + 16 * i);
  for (int64_t j = 0; j < count; ++j) {
    const float* wk = w + static_cast<int64_t>(index[j]) * NB;
    if (j + 6 < count) {  // the gaps between kept rows defeat the hardware prefetcher
      const char* ahead = reinterpret_cast<const char*>(w + static_cast<int64_t>(index[j + 6]) * NB);
      for (int i = 0; i < 256; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T0);
    }
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16),
                 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
    for (int r = 0; r < 4; ++r) {
      const __m512 v = _mm512_set1_ps(values[j * 4 + r]);
      a[r][0] = _mm512_fmadd_ps(v, w0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(v, w1, a[r][1]);
      a[r][2] = _mm512_fmadd_ps(v, w2, a[r][2]);
      a[r][3] = _mm512_fmadd_ps(v, w3, a[r][3]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc + r * acc_stride + 16 * i, a[r][i]);
}
#else
inline void chunk_rows4(const float* __restrict w, const int32_t* __restrict index,
                        const float* __restrict values, int64_t count, float* __restrict acc,
                        int64_t acc_stride) {
  for (int64_t j = 0; j < count; ++j) {
    const float* __restrict wk = w + static_cast<int64_t>(index[j]) * NB;
    for (int r = 0; r < 4; ++r) {
      const float v = values[j * 4 + r];
#pragma omp simd
      for (int c = 0; c < 64; ++c) acc[r * acc_stride + c] += v * wk[c];
    }
  }
}
#endif

}  // namespace

// The shared-mask product: y[r][n] = sum_j values[r][j] * W[n][index[j]] + b[n] for R rows that
// share one list of kept inputs. Rows go through the kernel four at a time (values is laid out
// [row block][j][4], zero-padded), and the kept inputs in blocks of JB whose weights stay in L1
// across the row blocks. Output element (r, n) is written at out[r * row_stride + n * col_stride].
void shared_product(const std::vector<int32_t>& index, const std::vector<float>& values, int64_t R,
                    const float* w, const float* b, int64_t K, int64_t T, int64_t n_out, float* out,
                    int64_t row_stride, int64_t col_stride) {
  const int64_t J = static_cast<int64_t>(index.size()), blocks = (R + 3) / 4;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(static_cast<size_t>(blocks * 4 * NB));  // every row of one tile
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NB, width = std::min(NB, n_out - n0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t c0 = 0; c0 < NB; c0 += 64)
        for (int64_t j0 = 0; j0 < J; j0 += JB)
          for (int64_t block = 0; block < blocks; ++block)
            chunk_rows4(w + t * K * NB + c0, index.data() + j0, values.data() + block * J * 4 + j0 * 4,
                        std::min(JB, J - j0), acc.data() + block * 4 * NB + c0, NB);
      for (int64_t r = 0; r < R; ++r) {
        const float* ar = acc.data() + r * NB;
        for (int64_t c = 0; c < width; ++c)
          out[r * row_stride + (n0 + c) * col_stride] = ar[c] + (b ? b[n0 + c] : 0.0f);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> shared_rows(const float* x, const bool* m, const float* w, const float* b,
                                               int64_t R, int64_t K, int64_t T, int64_t n_out,
                                               const at::TensorOptions& options) {
  std::vector<int32_t> index;
  for (int64_t k = 0; k < K; ++k)
    if (m[k]) index.push_back(static_cast<int32_t>(k));
  const int64_t J = static_cast<int64_t>(index.size());
  std::vector<float> values(static_cast<size_t>((R + 3) / 4 * J * 4), 0.0f);
  int64_t nonzero = 0;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < J; ++j) {
      const float v = x[r * K + index[j]];
      values[(r / 4) * J * 4 + j * 4 + r % 4] = v;
      nonzero += v != 0.0f;
    }
  at::Tensor y = at::empty({R, n_out}, options);
  shared_product(index, values, R, w, b, K, T, n_out, y.data_ptr<float>(), n_out, 1);
  return {y, at::scalar_tensor(nonzero * n_out, at::kLong)};
}

// A convolution of one sample whose kept input channels are `keep`, as the shared-mask product
// of its im2col rows (one per output position) and the packed (C_out, C_in·kh·kw) weight; the
// im2col entries of dropped channels are never formed. Returns (y (C_out, H_out, W_out), MACs).
std::tuple<at::Tensor, at::Tensor> channel_conv(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& packed,
                                                const c10::optional<at::Tensor>& bias, int64_t n_out, int64_t kh,
                                                int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                                                int64_t dw) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous (C, H, W) float32");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.is_contiguous() && keep.numel() == x.size(0), "keep: (C,) bool");
  const int64_t C = x.size(0), H = x.size(1), W = x.size(2), T = packed.size(0), K = C * kh * kw;
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K && packed.size(2) == NB && T * NB >= n_out, "packed weight");
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  const int64_t R = Ho * Wo;
  const float* xp = x.data_ptr<float>();
  const bool* kp = keep.data_ptr<bool>();
  std::vector<int32_t> index;
  std::vector<int64_t> channel;
  for (int64_t c = 0; c < C; ++c)
    if (kp[c])
      for (int64_t tap = 0; tap < kh * kw; ++tap) {
        index.push_back(static_cast<int32_t>(c * kh * kw + tap));
        channel.push_back(c);
      }
  const int64_t J = static_cast<int64_t>(index.size());
  std::vector<float> values(static_cast<size_t>((R + 3) / 4 * J * 4), 0.0f);
  int64_t nonzero = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t oy = r / Wo, ox = r % Wo;
    for (int64_t j = 0; j < J; ++j) {
      const int64_t tap = index[j] % (kh * kw), iy = oy * sh - ph + (tap / kw) * dh, ix = ox * sw - pw + (tap % kw) * dw;
      const float v = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? xp[(channel[j] * H + iy) * W + ix] : 0.0f;
      values[(r / 4) * J * 4 + j * 4 + r % 4] = v;
      nonzero += v != 0.0f;
    }
  }
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_out && bias->is_contiguous(), "bias");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({n_out, Ho, Wo}, x.options());
  shared_product(index, values, R, packed.data_ptr<float>(), b, K, T, n_out, y.data_ptr<float>(), 1, R);
  return {y, at::scalar_tensor(nonzero * n_out, at::kLong)};
}

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
  static_assert(NB % 64 == 0, "the shared-mask kernel works in 64-output chunks");
  if (shared && R > 1) return shared_rows(x.data_ptr<float>(), m, packed.data_ptr<float>(), b, R, K, T, n_out, x.options());
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
  m.def(
      "channel_conv(Tensor x, Tensor keep, Tensor packed, Tensor? bias, int n_out, int kh, int kw, int sh, int sw, "
      "int ph, int pw, int dh, int dw) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(selact_cpu, CPU, m) {
  m.impl("sparse_linear", &sparse_linear);
  m.impl("channel_conv", &channel_conv);
}
