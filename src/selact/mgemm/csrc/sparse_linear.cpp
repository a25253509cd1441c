// selact CPU kernels: masked linear layers and channel-masked convolutions that read only the
// weight rows the mask keeps.
//
// Weights are packed once per layer as Wt = (K, Np) (packed_for, a cache keyed by the weight):
// row k holds the weights that input k feeds, N outputs padded with zeros to Np, a multiple of 16
// (for a convolution, k = c·kh·kw + tap).
// A kept input costs one contiguous row; a dropped one costs nothing, not even a cache line
// fetched by the hardware prefetcher, which stops at the ends of the rows it streams through.
//
// Two product kernels:
//  - gemv: one row of x (batch 1, or per-row masks): y = Σ_j x[k_j] Wt[k_j]. The outputs are
//    split between the threads, each accumulating its slice of y in L1. Memory-bound: it streams
//    the kept rows, 8 at a time, and prefetches the next 8.
//  - indexed_gemm: M rows that share one list of kept inputs (a batch-shared mask, or the output
//    positions of a convolution whose sample keeps the same channels everywhere):
//    C[m] = Σ_j A(m, j) Wt[k_j] with A(m, j) = src[offset(m) + base[j]], so a convolution is an
//    implicit GEMM over a zero-padded copy of its kept channels, with no im2col buffer. Blocked
//    as a GEMM: up to 64 columns x 4-12 rows of accumulators in registers (AVX2: 16 x 6), 128 kept
//    rows of Wt per block (32 KB, in L1) reused across all rows of C.
// The product code is written once against a 16-float Vec (AVX-512, or two AVX2 registers; see
// "simd" below), with portable loops for other CPUs.
// Both run on ATen's thread pool (torch.set_num_threads applies). More than 8 rows with their own
// masks go through one dense GEMM of the masked rows instead. The AMU's top-k (keep_top_k) is a
// radix select. The ops are registered twice: as torch ops (torch.ops.selact_cpu.*, with fake
// implementations in Python for code that calls them under torch.compile) and as plain Python
// functions, which the cpu backend calls (no dispatcher boxing every argument). The public ops'
// call signatures that the Python dispatcher gives the cpu backend are planned here and served
// without Python afterwards (planned_linear, planned_conv2d).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <immintrin.h>
#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t LANES = 16;  // floats per Vec (below); packed rows are padded to it
constexpr int64_t NR = 64;     // columns of C per register tile (4 Vecs)
constexpr int64_t KC = 128;    // kept rows of Wt per block: 128 x 64 x 4 B = 32 KB, in L1
constexpr int GEMV_ROWS = 8;  // kept rows streamed at once by the GEMV
// Rows with their own masks taken by GEMVs at most (selact.mgemm.cpu.MAX_ROWS); more go through
// one masked dense GEMM.
constexpr int64_t MAX_GEMV_ROWS = 8;
constexpr int64_t MIN_WORK = 1 << 15;  // multiply-adds (or copies) below which a thread is not worth waking

// ---------------------------------------------------------------------------------------------
// simd: 16 floats at a time, as one AVX-512 register or a pair of AVX2 registers. The product
// kernels are written once against Vec; the AVX-512 build uses 32 registers, the AVX2 build 16
// (so its register tiles are smaller: REGISTER_VECS). Lanes: which of the 16 lanes a load or store
// touches (bit i, lane i); the loads without Lanes read all 16.
#if defined(__AVX512F__)
#define SELACT_SIMD 1
using Lanes = __mmask16;
using Vec = __m512;
constexpr int REGISTER_VECS = 32;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float a) { return _mm512_set1_ps(a); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const float* p, Lanes lanes) { return _mm512_maskz_loadu_ps(lanes, p); }
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a); }
inline void vstore(float* p, Vec a, Lanes lanes) { _mm512_mask_storeu_ps(p, lanes, a); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void vmove(Vec& to, Vec from) { to = from; }
#elif defined(__AVX2__) && defined(__FMA__)
#define SELACT_SIMD 1
using Lanes = uint16_t;
struct Vec {
  __m256 lo, hi;
};
constexpr int REGISTER_VECS = 8;  // 16 ymm registers, two a Vec
// The 8 lanes of `bits` as an AVX2 load/store mask (all ones where the bit is set).
inline __m256i half_lanes(unsigned bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
}
inline Vec vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec vset1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline Vec vload(const float* p, Lanes lanes) {
  if (lanes == 0xFFFF) return vload(p);
  return {_mm256_maskload_ps(p, half_lanes(lanes & 0xFFu)), _mm256_maskload_ps(p + 8, half_lanes(lanes >> 8))};
}
inline void vstore(float* p, Vec a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void vstore(float* p, Vec a, Lanes lanes) {
  if (lanes == 0xFFFF) return vstore(p, a);
  _mm256_maskstore_ps(p, half_lanes(lanes & 0xFFu), a.lo);
  _mm256_maskstore_ps(p + 8, half_lanes(lanes >> 8), a.hi);
}
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
// A copy register by register (GCC copies the struct through the stack, in 16-byte pieces).
inline void vmove(Vec& to, Vec from) {
  to.lo = from.lo;
  to.hi = from.hi;
}
#else
#define SELACT_SIMD 0  // the portable loops below serve every op
#endif
// Element convolutions of this many outputs or more take the gather form (element_conv). On
// AVX2, whose scatter passes hold 32 outputs, 256 (1 thread, VGG-16's shapes at its densities:
// 512 at 4x4 0.49 of dense against 0.63, at 2x2 0.23 against 0.43, 256 at 4x4 0.50 against 0.57,
// at 8x8 level; 64 and 128 outputs slower).
#if SELACT_SIMD && !defined(__AVX512F__)
constexpr int64_t GATHER_OUTPUTS = 256;
#else
constexpr int64_t GATHER_OUTPUTS = INT64_MAX;
#endif
#if SELACT_SIMD
// Output Vecs (16 channels each) that a scatter pass holds per tap: with up to 3 taps, 12
// accumulators of 32 AVX-512 registers, or 6 Vecs (12 ymm) of AVX2's 16.
constexpr int64_t PASS_VECS = REGISTER_VECS == 32 ? 4 : 2;
// The first n of 16 lanes (all of them for n >= 16).
inline Lanes first_lanes(int64_t n) { return n >= LANES ? Lanes(0xFFFF) : static_cast<Lanes>((1u << n) - 1u); }
#endif

// Whether `units` independent products (a batch's samples, a token sequence's runs) run side by
// side, one thread each, rather than one after another on all threads: when the threads share
// them evenly, or nearly (4 a thread or more). No fork per unit, and each thread's kept weights
// stay in its own L2.
bool side_by_side(int64_t units) {
  const int64_t threads = at::get_num_threads();
  return threads > 1 && units >= threads && (units % threads == 0 || units >= 4 * threads);
}

// body(u0, u1) for the units [0, units): split between the threads when side_by_side, else in one
// call on this thread, outside any parallel region, so that the body's own loops use all threads
// (at::parallel_for would run it marked as inside one, and the body's loops serially).
template <class F>
void for_units(int64_t units, const F& body) {
  if (side_by_side(units))
    at::parallel_for(0, units, 1, body);
  else
    body(0, units);
}

// ---------------------------------------------------------------------------------------------
// gemv

// acc[0:n] += Σ_j value[j] · wt[row[j]][0:n] for j < count: G rows at a time (G streams for the
// prefetchers, one pass over acc per G rows), and the next G rows fetched into L2 meanwhile (the
// hardware prefetcher cannot see across the gaps between kept rows). The rows of wt are read in
// whole registers (they are padded to 16 floats), acc only up to n.
template <int G>
int64_t axpy_group(const float* __restrict wt, int64_t n, const int64_t* __restrict row,
                   const float* __restrict value, int64_t count, float* __restrict acc) {
  int64_t j = 0;
#if SELACT_SIMD
  for (; j + G <= count; j += G) {
    const float* w[G];
    const char* ahead[G];
    Vec v[G];
    const int64_t next = j + 2 * G <= count ? j + G : j;
    for (int g = 0; g < G; ++g) {
      w[g] = wt + row[j + g];
      ahead[g] = reinterpret_cast<const char*>(wt + row[next + g]);
      v[g] = vset1(value[j + g]);
    }
    for (int64_t c = 0; c < n; c += LANES) {
      const Lanes live = first_lanes(n - c);
      Vec a = vload(acc + c, live);
      for (int g = 0; g < G; ++g) {
        _mm_prefetch(ahead[g] + 4 * c, _MM_HINT_T1);
        a = vfma(v[g], vload(w[g] + c), a);
      }
      vstore(acc + c, a, live);
    }
  }
#endif
  return j;
}

void axpy_rows(const float* __restrict wt, int64_t n, const int64_t* __restrict row,
               const float* __restrict value, int64_t count, float* __restrict acc) {
  int64_t j = axpy_group<GEMV_ROWS>(wt, n, row, value, count, acc);
  for (; j < count; ++j) {
    const float* __restrict w = wt + row[j];
    const float v = value[j];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) acc[c] += v * w[c];
  }
}

// y[0:N] = b + Σ_{k kept, x[k] != 0} x[k] · Wt[k]; returns the executed MACs. The outputs are
// split between the threads, each streaming its slice of every kept row into its slice of y, in
// its L1: no partial sums to add up afterwards (a split of the rows left the threads' sums to be
// added across cores: 3 us of the 60 of a 768 -> 3072 layer at density 0.25, cold).
int64_t gemv(const float* x, const bool* mask, int64_t K, const float* wt, int64_t N, int64_t Np,
             const float* b, float* y) {
  std::vector<int64_t> row;
  std::vector<float> value;
  row.reserve(K);
  value.reserve(K);
  for (int64_t k = 0; k < K; ++k)
    if ((mask == nullptr || mask[k]) && x[k] != 0.0f) {
      row.push_back(k * Np);
      value.push_back(x[k]);
    }
  const int64_t J = static_cast<int64_t>(row.size());
  // one slice per thread, each of at least MIN_WORK MACs (a thread costs a few microseconds to
  // wake) and a whole number of registers
  const int64_t parts = std::max<int64_t>(
      1, std::min({static_cast<int64_t>(at::get_num_threads()), J * Np / MIN_WORK, Np / LANES}));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = Np / LANES * p / parts * LANES;
      const int64_t n1 = std::min(N, Np / LANES * (p + 1) / parts * LANES);
      for (int64_t n = n0; n < n1; ++n) y[n] = b != nullptr ? b[n] : 0.0f;
      axpy_rows(wt + n0, n1 - n0, row.data(), value.data(), J, y + n0);
    }
  });
  return J * N;
}

// ---------------------------------------------------------------------------------------------
// indexed_gemm

// The rows of C come in lines of `line` rows (a convolution's output rows); row m = (l, i) reads
// A(m, j) = src[l · line_stride + i · step + base[j]].
struct Gemm {
  const float* src;
  int64_t line, line_stride, step;
  const int64_t* base;    // (J,)
  const int64_t* row;     // (J,) offsets of the kept rows in wt: k_j · Np
  const float* wt;        // (K, Np)
  const float* bias;      // (N,) or null
  float* c;               // (M, N), row-major
  int64_t M, N, J;
};

// A block of the GEMM: columns [n0, n0 + 64) of C, kept rows [j0, j1).
struct Block {
  int64_t n0, j0, j1;
};

#if SELACT_SIMD
// C[m0 : m0 + P, n0 : n0 + 16·Q] (+)= Σ_{j in [j0, j1)} A(m, j) · Wt[k_j][n0 : ...] for P rows
// of one line, whose A entries are `step` apart (UNIT: step 1, addresses known at compile time).
// The last register of the tile writes only the columns in `tail`. `first`: start from the bias.
template <int P, int Q, bool UNIT>
void tile(const Gemm& g, const float* a0, int64_t m0, int64_t n0, int64_t j0, int64_t j1, bool first,
          Lanes tail) {
  Vec acc[P][Q];
  for (int q = 0; q < Q; ++q) {
    const Lanes lanes = q == Q - 1 ? tail : Lanes(0xFFFF);
    const Vec init = first && g.bias ? vload(g.bias + n0 + 16 * q, lanes) : vzero();
    for (int p = 0; p < P; ++p) acc[p][q] = first ? init : vload(g.c + (m0 + p) * g.N + n0 + 16 * q, lanes);
  }
  const float* w = g.wt + n0;
  const int64_t step = g.step;
  for (int64_t j = j0; j < j1; ++j) {
    const float* wj = w + g.row[j];
    Vec wv[Q];
    for (int q = 0; q < Q; ++q) wv[q] = vload(wj + 16 * q);
    const float* a = a0 + g.base[j];
    for (int p = 0; p < P; ++p) {
      const Vec v = vset1(UNIT ? a[p] : *a);
      if (!UNIT) a += step;
      for (int q = 0; q < Q; ++q) acc[p][q] = vfma(v, wv[q], acc[p][q]);
    }
  }
  for (int q = 0; q < Q; ++q) {
    const Lanes lanes = q == Q - 1 ? tail : Lanes(0xFFFF);
    for (int p = 0; p < P; ++p) vstore(g.c + (m0 + p) * g.N + n0 + 16 * q, acc[p][q], lanes);
  }
}

using TileFn = void (*)(const Gemm&, const float*, int64_t, int64_t, int64_t, int64_t, bool, Lanes);
// Rows per register tile for Q column Vecs: about 12 accumulators or more, enough to hide the FMA
// latency, and no more than 31 registers in all (AVX-512); about 12 ymm registers of
// accumulators of the 16 (AVX2: a Vec is two).
using RowsFor = std::array<int, 5>;
constexpr RowsFor ROWS_FOR = REGISTER_VECS == 32 ? RowsFor{0, 12, 6, 4, 4} : RowsFor{0, 6, 3, 2, 1};
// Column Vecs per register tile: all 64 columns of a block at once (AVX-512), or 16 (AVX2: 6 rows
// x 16 columns, 12 of the 16 ymm registers, each weight Vec loaded once for 6 rows).
constexpr int64_t TILE_VECS = REGISTER_VECS == 32 ? 4 : 1;

template <int Q, bool UNIT, int... P>
constexpr std::array<TileFn, sizeof...(P)> tiles(std::integer_sequence<int, P...>) {
  return {tile<P + 1, Q, UNIT>...};
}
template <bool UNIT>
struct Tiles {
  static constexpr auto q1 = tiles<1, UNIT>(std::make_integer_sequence<int, ROWS_FOR[1]>{});
  static constexpr auto q2 = tiles<2, UNIT>(std::make_integer_sequence<int, ROWS_FOR[2]>{});
  static constexpr auto q3 = tiles<3, UNIT>(std::make_integer_sequence<int, ROWS_FOR[3]>{});
  static constexpr auto q4 = tiles<4, UNIT>(std::make_integer_sequence<int, ROWS_FOR[4]>{});
  static TileFn get(int64_t q, int64_t p) {
    switch (q) {
      case 1: return q1[p - 1];
      case 2: return q2[p - 1];
      case 3: return q3[p - 1];
      default: return q4[p - 1];
    }
  }
};

// Rows [m0, m1) of C, columns [n0, n0 + 64), kept rows [j0, j1): register tiles that never
// straddle two lines.
// Kept rows [j0, j1) of Wt, columns [n0, n0 + 64), fetched into L2.
void prefetch_block(const Gemm& g, int64_t n0, int64_t j0, int64_t j1) {
  const int64_t lines = (std::min(NR, g.N - n0) + LANES - 1) / LANES;
  for (int64_t j = j0; j < j1; ++j) {
    const char* w = reinterpret_cast<const char*>(g.wt + g.row[j] + n0);
    for (int64_t line = 0; line < lines; ++line) _mm_prefetch(w + 64 * line, _MM_HINT_T1);
  }
}

// Block `next` (columns from next.n0, kept rows [next.j0, next.j1)) is fetched a share per
// register tile while this block computes: its rows are scattered, so no hardware prefetcher
// sees them coming, and a block read cold from L3 stalls the tiles for microseconds.
void run_rows(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t j0, int64_t j1, bool first,
              const Block& next) {
  const int64_t cols = std::min(NR, g.N - n0), regs = (cols + LANES - 1) / LANES;
  const Lanes tail = first_lanes(cols - (regs - 1) * LANES);
  const int64_t wide = std::min(TILE_VECS, regs), most = ROWS_FOR[wide];
  const int64_t share = std::max<int64_t>(1, (next.j1 - next.j0) * most / std::max<int64_t>(1, m1 - m0));
  int64_t ahead = next.j0;
  for (int64_t m = m0; m < m1;) {
    const int64_t l = m / g.line, i = m % g.line, rows = std::min({most, m1 - m, g.line - i});
    const float* a0 = g.src + l * g.line_stride + i * g.step;
    for (int64_t q0 = 0; q0 < regs; q0 += wide) {  // the columns in tiles of `wide` Vecs
      const int64_t q = std::min(wide, regs - q0);
      const TileFn fn = g.step == 1 ? Tiles<true>::get(q, rows) : Tiles<false>::get(q, rows);
      fn(g, a0, m, n0 + q0 * LANES, j0, j1, first, q0 + q == regs ? tail : Lanes(0xFFFF));
    }
    if (ahead < next.j1) {
      prefetch_block(g, next.n0, ahead, std::min(next.j1, ahead + share));
      ahead += share;
    }
    m += rows;
  }
}
#else
// Portable version: the same blocking, the compiler vectorises the column loop.
void run_rows(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t j0, int64_t j1, bool first,
              const Block&) {
  const int64_t cols = std::min(NR, g.N - n0);
  for (int64_t m = m0; m < m1; ++m) {
    float* cp = g.c + m * g.N + n0;
    if (first)
      for (int64_t n = 0; n < cols; ++n) cp[n] = g.bias ? g.bias[n0 + n] : 0.0f;
    const float* s = g.src + (m / g.line) * g.line_stride + (m % g.line) * g.step;
    for (int64_t j = j0; j < j1; ++j) {
      const float a = s[g.base[j]];
      const float* __restrict w = g.wt + g.row[j] + n0;
#pragma omp simd
      for (int64_t n = 0; n < cols; ++n) cp[n] += a * w[n];
    }
  }
}
#endif

// C = A · Wt[kept] + bias. Threads split the columns first (each reads its part of every kept
// row), then the rows of C (each reads all of its columns' kept rows, from L2).
void indexed_gemm(const Gemm& g) {
  const int64_t work = g.M * g.N * g.J, n_blocks = (g.N + NR - 1) / NR;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / MIN_WORK));
  const int64_t n_parts = std::min(threads, n_blocks);
  const int64_t m_parts = std::max<int64_t>(1, std::min(threads / n_parts, g.M / 16));
  at::parallel_for(0, n_parts * m_parts, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t np = i / m_parts, mp = i % m_parts;
      const int64_t b0 = n_blocks * np / n_parts, b1 = n_blocks * (np + 1) / n_parts;
      const int64_t m0 = g.M * mp / m_parts, m1 = g.M * (mp + 1) / m_parts;
      if (g.J == 0)
        for (int64_t b = b0; b < b1; ++b) run_rows(g, m0, m1, b * NR, 0, 0, true, {0, 0, 0});
      for (int64_t j0 = 0; j0 < g.J; j0 += KC)
        for (int64_t b = b0; b < b1; ++b) {
          const bool last_column = b + 1 == b1;  // the blocks run column block by column block
          const int64_t next_j0 = last_column ? j0 + KC : j0;
          const Block next{(last_column ? b0 : b + 1) * NR, std::min(g.J, next_j0), std::min(g.J, next_j0 + KC)};
          run_rows(g, m0, m1, b * NR, j0, std::min(g.J, j0 + KC), j0 == 0, next);
        }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// ops

// A new uninitialised CPU tensor, allocated without a trip through PyTorch's dispatcher: that trip
// (at::empty) costs about 4 us when a previous layer has evicted the caches, as much as the rest
// of a small call (measured on 2 Xeon cores).
at::Tensor new_tensor(at::IntArrayRef sizes, at::ScalarType dtype,
                      at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, format);
}

at::Tensor new_mask(at::IntArrayRef sizes) {
  at::Tensor keep = new_tensor(sizes, at::kBool);
  std::memset(keep.data_ptr<bool>(), 0, static_cast<size_t>(keep.numel()));
  return keep;
}

// ---------------------------------------------------------------------------------------------
// packed weights

constexpr size_t HUGE_PAGE = size_t{2} << 20;

// Wt (K, Np) of a float32 weight (N, ...) with K = its numel / N: row k the weights that input k
// feeds, the N outputs zero-padded to Np, a multiple of 16. The buffer starts on a page boundary
// (rows of whole pages are skipped without the hardware prefetcher touching a byte of them); from
// 2 MB up on a 2-MB boundary, with transparent huge pages asked of Linux (madvise; advice, never an
// error): the kept rows are read in an order no prefetcher predicts, and with 4-KB pages nearly
// every row start missed the TLB (measured on 2 Xeon cores, batch-1 GEMV at density 0.25, the
// kernel alone against dense: 768 -> 3072 in 0.31 instead of 0.38 of dense's time).
at::Tensor pack(const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = N > 0 ? w.numel() / N : 0, Np = (N + LANES - 1) / LANES * LANES;
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(K * Np, 1)) * sizeof(float);
  const size_t align = bytes >= HUGE_PAGE ? HUGE_PAGE : 4096;
  void* buffer = nullptr;
  TORCH_CHECK(posix_memalign(&buffer, align, (bytes + align - 1) / align * align) == 0, "packing a weight of ",
              bytes, " bytes: out of memory");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == HUGE_PAGE) madvise(buffer, bytes / HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE);
#endif
  at::Tensor packed = at::from_blob(buffer, {K, Np}, [](void* p) { std::free(p); }, at::TensorOptions(at::kFloat));
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  // blocks of 64 inputs: each source row is read 256 bytes at a time, 64 packed rows written
  // side by side
  constexpr int64_t BLOCK = 64;
  at::parallel_for(0, (K + BLOCK - 1) / BLOCK, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t k0 = b0 * BLOCK; k0 < std::min(K, b1 * BLOCK); k0 += BLOCK) {
      const int64_t k1 = std::min(K, k0 + BLOCK);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = k0; k < k1; ++k) dst[k * Np + n] = src[n * K + k];
      for (int64_t k = k0; k < k1; ++k) std::fill(dst + k * Np + N, dst + (k + 1) * Np, 0.0f);
    }
  });
  return packed;
}

// The packed copies, one per weight tensor, keyed by its TensorImpl. An entry is made again when
// the weight's data pointer, version (an in-place update) or sizes change, and erased when the
// weight is freed: by forget_packed, which Python calls from a weakref.finalize registered by
// on_packed for each weight's first entry, else at the next packing once its weak pointer has
// expired (the weak pointer also keeps a freed TensorImpl's address from being reused meanwhile).
struct PackedEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> owner;
  const void* data;
  uint32_t version;
  std::vector<int64_t> sizes;
  at::Tensor packed;
};
std::mutex packed_mutex;
std::unordered_map<const c10::TensorImpl*, PackedEntry> packed_cache;
PyObject* on_packed = nullptr;  // Python's hook, called with each newly packed weight (never freed)

uint32_t version_of(const at::Tensor& t) {
  return t.is_inference() ? 0 : t.unsafeGetTensorImpl()->version_counter().current_version();
}

bool packed_is_current(const PackedEntry& e, const at::Tensor& w) {
  return !e.owner.expired() && e.data == w.data_ptr() && e.version == version_of(w) && w.sizes().equals(e.sizes);
}

// The packed copy of weight (float32 (N, K) or (N, C, kh, kw)), made on first use.
at::Tensor packed_for(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.device().is_cpu() && weight.dim() >= 2,
              "weight: float32 on the CPU, (N, K) or (N, C, kh, kw)");
  const c10::TensorImpl* key = weight.unsafeGetTensorImpl();
  {
    std::lock_guard<std::mutex> lock(packed_mutex);
    if (auto it = packed_cache.find(key); it != packed_cache.end() && packed_is_current(it->second, weight))
      return it->second.packed;
  }
  at::Tensor packed = pack(weight);
  bool first;  // the weight's first entry (not one made again after an update)
  {
    std::lock_guard<std::mutex> lock(packed_mutex);
    for (auto it = packed_cache.begin(); it != packed_cache.end();)
      it = it->second.owner.expired() ? packed_cache.erase(it) : std::next(it);
    first = packed_cache.count(key) == 0;
    packed_cache.insert_or_assign(
        key, PackedEntry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(weight.getIntrusivePtr()),
                         weight.data_ptr(), version_of(weight), weight.sizes().vec(), packed});
  }
  if (first && on_packed != nullptr) {
    py::gil_scoped_acquire gil;
    try {
      py::reinterpret_borrow<py::object>(on_packed)(weight);
    } catch (py::error_already_set&) {  // no finalizer: the entry goes at the next packing instead
    }
  }
  return packed;
}

const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t n_out) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n_out,
              "bias: contiguous (N,) float32");
  return bias->data_ptr<float>();
}

const float* norms_data(const c10::optional<at::Tensor>& norms, int64_t n) {
  if (!norms.has_value()) return nullptr;
  TORCH_CHECK(norms->scalar_type() == at::kFloat && norms->is_contiguous() && norms->numel() == n,
              "norms: contiguous (", n, ",) float32");
  return norms->data_ptr<float>();
}

// Order-preserving unsigned keys of floating-point scores: a larger score, a larger key, equal
// scores (-0 and +0 too) equal keys; NaN above every number (as torch.topk ranks it).
inline uint32_t order_key(float f) {
  uint32_t u;
  f += 0.0f;  // -0 becomes +0
  std::memcpy(&u, &f, sizeof u);
  return std::isnan(f) ? ~0u : (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t order_key(double f) {
  uint64_t u;
  f += 0.0;
  std::memcpy(&u, &f, sizeof u);
  return std::isnan(f) ? ~0ull : (u >> 63) ? ~u : (u | (1ull << 63));
}

// The largest t with at least k of key[0:n] >= t, its bits from `bit` down found one counting
// pass each (vectorised, branch-free), above `prefix` (the bits already fixed).
template <class Key>
Key refine_threshold(const Key* __restrict key, int64_t n, int64_t k, Key prefix, int bit) {
  using Count = std::make_signed_t<Key>;  // counters as wide as the keys: one vector lane each
  for (; bit >= 0; --bit) {
    const Key candidate = prefix | (Key{1} << bit);
    Count at_least = 0;
#pragma omp simd reduction(+ : at_least)
    for (int64_t i = 0; i < n; ++i) at_least += key[i] >= candidate;
    if (at_least >= k) prefix = candidate;
  }
  return prefix;
}

constexpr int RADIX_BITS = 11;                // bits of the first pass's histogram
constexpr int64_t RADIX_MIN = 4 << RADIX_BITS;  // rows from which the histogram pays

// The k-th largest of key[0:n] (0 < k <= n, any order), by radix select: for long rows a
// histogram of the top RADIX_BITS bits finds its bucket, then refine_threshold its lower bits.
template <class Key>
Key kth_largest_key(const Key* __restrict key, int64_t n, int64_t k) {
  constexpr int BITS = 8 * static_cast<int>(sizeof(Key)), SHIFT = BITS - RADIX_BITS;
  if (n < RADIX_MIN || k == 0) return refine_threshold(key, n, k, Key{0}, BITS - 1);
  thread_local std::vector<Key> bucket;
  // four histograms side by side: runs of equal buckets (common in activations) would
  // otherwise chain every increment on the one before
  constexpr int64_t B = int64_t{1} << RADIX_BITS;
  thread_local std::vector<int32_t> count;
  count.assign(4 * B, 0);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int64_t j = 0; j < 4; ++j) ++count[j * B + (key[i + j] >> SHIFT)];
  for (; i < n; ++i) ++count[key[i] >> SHIFT];
  int64_t top = B - 1, above = 0;  // the bucket of the k-th key, and the keys above it
  auto in_bucket = [&](int64_t b) { return count[b] + count[B + b] + count[2 * B + b] + count[3 * B + b]; };
  while (above + in_bucket(top) < k) above += in_bucket(top--);
  bucket.resize(static_cast<size_t>(in_bucket(top)) + 1);
  Key* out = bucket.data();
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {  // without a branch: every key written, the bucket's kept
    out[m] = key[j];
    m += static_cast<int64_t>(key[j] >> SHIFT) == top;
  }
  return refine_threshold(out, m, k - above, static_cast<Key>(static_cast<Key>(top) << SHIFT), SHIFT - 1);
}

// keep[i] = true for the k first of score[0:n] in the AMU's order: larger first, NaN above every
// number, ties to the lower i. A radix select, branch-free where it counts: the k-th largest key
// (the threshold) is built bit by bit, each bit one vectorised counting pass (32 for float, 64 for
// double); on long rows a histogram of the top 11 bits first finds the threshold's bucket, and
// the passes count only that bucket's keys. Then one pass marks the keys above the threshold and
// the first of those equal to it. A comparison-based select (std::nth_element, as torch.topk)
// mispredicts a branch on every other comparison: 1.5 us a row of 192 scores against 0.4, 70 us
// a row of 16384 against 15.
template <class T>
void keep_top_k(const T* score, int64_t n, int64_t k, bool* keep) {
  using Key = decltype(order_key(T{}));
  thread_local std::vector<Key> keys;
  keys.resize(static_cast<size_t>(n));
  Key* __restrict key = keys.data();
  for (int64_t i = 0; i < n; ++i) key[i] = order_key(score[i]);
  const Key threshold = kth_largest_key(key, n, k);
  using Count = std::make_signed_t<Key>;
  Count above = 0;
#pragma omp simd reduction(+ : above)
  for (int64_t i = 0; i < n; ++i) {
    keep[i] = key[i] > threshold;
    above += key[i] > threshold;
  }
  // the keys equal to the threshold that are kept: the first ones
  for (int64_t i = 0, ties = k - above; i < n && ties > 0; ++i)
    if (key[i] == threshold) {
      keep[i] = true;
      --ties;
    }
}

// keep_top_k of score times norms (where given).
template <class T>
void mark_top_k(std::vector<T>& score, const float* norms, int64_t k, bool* keep) {
  const int64_t n = static_cast<int64_t>(score.size());
  if (norms)
    for (int64_t i = 0; i < n; ++i) score[i] *= norms[i];
  keep_top_k(score.data(), n, k, keep);
}

// The AMU's channel top-k for SAPI (norms undefined) and SAPW: per sample, the k channels of x
// (B, C, H, W), any strides, with the largest mean |x| (times norms[c]); ties go to the lower
// channel. Returns keep (B, C) bool: the selection of selact.amu.mask with channel granularity
// and a top-k budget, in one pass over x.
at::Tensor channel_topk(const at::Tensor& x, const c10::optional<at::Tensor>& norms, int64_t k) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(k >= 1 && k <= C, "k must be in [1, C]");
  const float* np = norms_data(norms, C);
  at::Tensor keep = new_mask({B, C});
  const float* xp = x.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  std::vector<double> score(C);
  std::vector<float> sum(C);
  for (int64_t s = 0; s < B; ++s) {
    const float* xs = xp + s * s0;
    if (s1 == 1) {  // channels-last: sum over positions, vectorised across channels
      std::fill(sum.begin(), sum.end(), 0.0f);
      float* __restrict acc = sum.data();
      for (int64_t iy = 0; iy < H; ++iy)
        for (int64_t ix = 0; ix < W; ++ix) {
          const float* __restrict xq = xs + iy * s2 + ix * s3;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) acc[c] += std::abs(xq[c]);
        }
      for (int64_t c = 0; c < C; ++c) score[c] = sum[c];
    } else {
      for (int64_t c = 0; c < C; ++c) {
        double total = 0.0;
        for (int64_t iy = 0; iy < H; ++iy) {
          const float* __restrict xr = xs + c * s1 + iy * s2;
          float row = 0.0f;
          if (s3 == 1) {
#pragma omp simd reduction(+ : row)
            for (int64_t ix = 0; ix < W; ++ix) row += std::abs(xr[ix]);
          } else {
            for (int64_t ix = 0; ix < W; ++ix) row += std::abs(xr[ix * s3]);
          }
          total += row;
        }
        score[c] = total;
      }
    }
    mark_top_k(score, np, k, keep.data_ptr<bool>() + s * C);
  }
  return keep;
}

// The AMU's top-k for linear inputs, the R = G·T rows of K floats at xp: per run g of T rows (a sample's
// tokens; T = 1: per row) the k features with the largest mean |x| over the run (times
// norms[f] for SAPW); ties go to the lower feature. Returns keep (G, K) bool: the selection of
// selact.amu.mask with channel granularity (element when T = 1) and a top-k budget.
at::Tensor feature_topk(const float* xp, int64_t R, int64_t K, int64_t G, const c10::optional<at::Tensor>& norms,
                        int64_t k) {
  const int64_t T = G > 0 ? R / G : 0;
  TORCH_CHECK(k >= 1 && k <= K, "k must be in [1, K]");
  const float* np = norms_data(norms, K);
  at::Tensor keep = new_mask({G, K});
  bool* kp = keep.data_ptr<bool>();
  at::parallel_for(0, G, std::max<int64_t>(1, MIN_WORK / std::max<int64_t>(1, 8 * T * K)), [&](int64_t g0, int64_t g1) {
    std::vector<float> score(K);  // float sums, as the AMU's float32 means
    for (int64_t g = g0; g < g1; ++g) {
      std::fill(score.begin(), score.end(), 0.0f);
      float* __restrict acc = score.data();
      for (int64_t t = 0; t < T; ++t) {
        const float* __restrict xr = xp + (g * T + t) * K;
#pragma omp simd
        for (int64_t f = 0; f < K; ++f) acc[f] += std::abs(xr[f]);
      }
      mark_top_k(score, np, k, kp + g * K);
    }
  });
  return keep;
}

}  // namespace

namespace {

// y = (m ⊙ x) Wᵀ + b for the R rows of x (R·K contiguous floats) and m (G, K) (or null: every
// input kept, G = R), G dividing R: runs of one row take the GEMV, longer runs one GEMM each over
// their kept inputs. y has the sizes y_sizes (R·N floats). Returns (y, MACs): the kept nonzero
// inputs times N (zero when count is false).
std::pair<at::Tensor, int64_t> masked_linear(const float* xp, int64_t R, int64_t K, const bool* m, int64_t G,
                                             const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                             int64_t n_out, bool count, at::IntArrayRef y_sizes) {
  const int64_t Np = packed.size(1);
  const float* b = bias_data(bias, n_out);
  const float* wt = packed.data_ptr<float>();
  at::Tensor y = new_tensor(y_sizes, at::kFloat);
  float* yp = y.data_ptr<float>();
  const int64_t T = G > 0 ? R / G : 0;  // rows per mask row
  int64_t macs = 0;
  if (T == 1 && R > MAX_GEMV_ROWS) {
    // Many rows with their own masks: each GEMV would re-read its kept weights, so the masked
    // rows go through one dense GEMM (MKL) instead, which reads the weight once. The dropped
    // inputs are zeros there; the MACs counted are the kept ones, as for the reference backend.
    at::Tensor kept = new_tensor({R, K}, at::kFloat);
    float* kp = kept.data_ptr<float>();
    at::parallel_for(0, R, std::max<int64_t>(1, MIN_WORK / std::max<int64_t>(1, K)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0 * K; i < r1 * K; ++i) kp[i] = m == nullptr || m[i] ? xp[i] : 0.0f;
    });
    const at::Tensor w = packed.narrow(1, 0, n_out);  // Wᵀ (K, N), rows Np apart
    at::Tensor y2 = y.view({R, n_out});
    if (bias.has_value())
      at::addmm_out(y2, *bias, kept, w);
    else
      at::mm_out(y2, kept, w);
    if (count) {
      int64_t nonzero = 0;
      for (int64_t i = 0; i < R * K; ++i) nonzero += kp[i] != 0.0f;
      macs = nonzero * n_out;
    }
  } else if (T == 1) {
    for (int64_t r = 0; r < R; ++r)
      macs += gemv(xp + r * K, m == nullptr ? nullptr : m + r * K, K, wt, n_out, Np, b, yp + r * n_out);
  } else if (T > 0) {
    // Run g: one GEMM over its kept inputs. Runs that the threads share evenly (or nearly)
    // go side by side, one thread each, as a convolution's samples do; else one after another.
    auto run = [&](int64_t g, std::vector<int64_t>& base, std::vector<int64_t>& row) -> int64_t {
      base.clear();
      row.clear();
      for (int64_t k = 0; k < K; ++k)
        if (m[g * K + k]) {
          base.push_back(k);
          row.push_back(k * Np);
        }
      const int64_t J = static_cast<int64_t>(base.size());
      const float* xg = xp + g * T * K;
      indexed_gemm({xg, T, 0, K, base.data(), row.data(), wt, b, yp + g * T * n_out, T, n_out, J});
      int64_t part = 0;
      if (count)
        for (int64_t r = 0; r < T; ++r)
          for (int64_t j = 0; j < J; ++j) part += (xg[r * K + base[j]] != 0.0f) * n_out;
      return part;
    };
    std::atomic<int64_t> total{0};
    for_units(G, [&](int64_t g0, int64_t g1) {
      std::vector<int64_t> base, row;
      int64_t part = 0;
      for (int64_t g = g0; g < g1; ++g) part += run(g, base, row);
      total += part;
    });
    macs = total.load();
  }
  return {y, count ? macs : 0};
}

// The rows of x (..., K) as the kernels take them: R rows of K contiguous floats, and y's sizes
// (..., N).
struct Rows {
  at::Tensor x;  // contiguous (copied only if it was not)
  int64_t R, K;
  std::vector<int64_t> y_sizes;
};

Rows linear_rows(const at::Tensor& x_in, const at::Tensor& weight) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kFloat, "x: (..., K) float32");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x_in.size(-1), "weight ", weight.sizes(),
              " does not take x of ", x_in.size(-1), " features");
  Rows rows{x_in.contiguous(), 1, x_in.size(-1), std::vector<int64_t>(x_in.sizes().begin(), x_in.sizes().end())};
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) rows.R *= x_in.size(d);
  rows.y_sizes.back() = weight.size(0);
  return rows;
}

// A mask broadcastable to x (..., K) as the kernels read it: G rows of K, one per run of
// consecutive rows of x that share it (selact.mgemm.cpu.mask_groups: a (K,) mask, G = 1; per-row
// masks, G = rows; a (B, 1, K) mask on (B, T, K) tokens, G = B). Read in place where its memory
// already is that (G, K) array (the common cases), else copied into `copy`.
std::pair<const bool*, int64_t> mask_rows(const at::Tensor& mask, at::IntArrayRef x_sizes, std::vector<uint8_t>& copy) {
  const int64_t dims = static_cast<int64_t>(x_sizes.size()), lead = dims - 1, K = x_sizes[lead];
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() <= dims, "mask: bool, broadcastable to x");
  // the mask's sizes and strides right-aligned to x's dims, stride 0 where it broadcasts
  std::vector<int64_t> size(dims, 1), stride(dims, 0);
  for (int64_t i = 0; i < mask.dim(); ++i) {
    const int64_t d = dims - mask.dim() + i;
    size[d] = mask.size(i);
    stride[d] = size[d] == 1 ? 0 : mask.stride(i);
    TORCH_CHECK(size[d] == 1 || size[d] == x_sizes[d], "mask ", mask.sizes(), " does not broadcast to x ", x_sizes);
  }
  int64_t varying = lead;  // the mask changes along x's dims [0, varying) and is shared along the rest
  while (varying > 0 && size[varying - 1] == 1) --varying;
  int64_t G = 1;
  for (int64_t d = 0; d < varying; ++d) G *= x_sizes[d];
  const bool* data = mask.data_ptr<bool>();
  // In place: the features contiguous, each varying dim the mask's own (no broadcast inside the
  // runs) with the strides of a contiguous (x_sizes[0:varying]..., K) array.
  bool in_place = size[lead] == K && (K <= 1 || stride[lead] == 1);
  for (int64_t d = varying - 1, step = K; d >= 0 && in_place; --d) {
    in_place = size[d] == x_sizes[d] && (size[d] == 1 || stride[d] == step);
    step *= x_sizes[d];
  }
  if (in_place) return {data, G};
  copy.resize(static_cast<size_t>(G * K));
  for (int64_t g = 0; g < G; ++g) {
    int64_t offset = 0;
    for (int64_t d = varying - 1, rest = g; d >= 0; --d) {
      offset += (rest % x_sizes[d]) * stride[d];
      rest /= x_sizes[d];
    }
    for (int64_t k = 0; k < K; ++k) copy[g * K + k] = data[offset + k * stride[lead]];
  }
  return {reinterpret_cast<const bool*>(copy.data()), G};
}

}  // namespace

// y = (mask ⊙ x) Wᵀ + b for x (..., K) float32, weight (N, K) and a bool mask broadcastable to x
// (see mask_rows: runs of consecutive rows that share a mask row are taken together). Without a
// mask every input is kept. Returns (y (..., N), MACs), see masked_linear.
std::pair<at::Tensor, int64_t> sparse_linear(const at::Tensor& x_in, const c10::optional<at::Tensor>& mask,
                                             const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                             bool count) {
  const Rows rows = linear_rows(x_in, weight);
  const float* xp = rows.x.data_ptr<float>();
  const at::Tensor packed = packed_for(weight);
  const int64_t N = weight.size(0);
  if (!mask.has_value())
    return masked_linear(xp, rows.R, rows.K, nullptr, rows.R, packed, bias, N, count, rows.y_sizes);
  std::vector<uint8_t> copy;
  const auto [m, G] = mask_rows(*mask, x_in.sizes(), copy);
  return masked_linear(xp, rows.R, rows.K, m, G, packed, bias, N, count, rows.y_sizes);
}

// The AMU's feature top-k and the masked linear in one call: the R rows of x (..., K) float32
// in G runs of R/G rows (a sample's tokens, or single rows), each run keeping its k features of
// largest mean |x| (times norms for SAPW; see feature_topk). Returns (y (..., N), keep (G, K)
// bool, MACs).
std::tuple<at::Tensor, at::Tensor, int64_t> select_linear(const at::Tensor& x_in, int64_t G, int64_t k,
                                                          const c10::optional<at::Tensor>& norms,
                                                          const at::Tensor& weight,
                                                          const c10::optional<at::Tensor>& bias, bool count) {
  const Rows rows = linear_rows(x_in, weight);
  TORCH_CHECK(G > 0 ? rows.R % G == 0 : rows.R == 0, G, " runs do not divide the ", rows.R, " rows of x");
  const float* xp = rows.x.data_ptr<float>();
  const at::Tensor keep = feature_topk(xp, rows.R, rows.K, G, norms, k);
  auto [y, macs] = masked_linear(xp, rows.R, rows.K, keep.data_ptr<bool>(), G, packed_for(weight), bias,
                                 weight.size(0), count, rows.y_sizes);
  return {y, keep, macs};
}

// The AMU's top-k as a mask: keep (U, n) bool marks the k first of each row of scores (U, n)
// float32 in keep_top_k's order (larger first, NaN above every number, ties to the lower index).
// Rows in parallel.
at::Tensor topk_mask(const at::Tensor& scores_in, int64_t k) {
  TORCH_CHECK(scores_in.dim() == 2 && scores_in.scalar_type() == at::kFloat, "scores: (U, n) float32");
  const at::Tensor scores = scores_in.contiguous();
  const int64_t U = scores.size(0), n = scores.size(1);
  TORCH_CHECK(k >= 0 && k <= n, "k must be in [0, n]");
  at::Tensor keep = new_mask({U, n});
  const float* sp = scores.data_ptr<float>();
  bool* kp = keep.data_ptr<bool>();
  at::parallel_for(0, U, std::max<int64_t>(1, MIN_WORK / std::max<int64_t>(1, 8 * n)), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) keep_top_k(sp + u * n, n, k, kp + u * n);
  });
  return keep;
}

// How many (output position, tap) pairs along one dimension read each of its n_in inputs: a
// nonzero input's MACs per output channel, one factor per dimension.
std::vector<int64_t> cover(int64_t n_in, int64_t n_out, int64_t k, int64_t stride, int64_t pad, int64_t dilation) {
  std::vector<int64_t> reach(static_cast<size_t>(n_in), 0);
  for (int64_t o = 0; o < n_out; ++o)
    for (int64_t t = 0; t < k; ++t)
      if (const int64_t i = o * stride - pad + t * dilation; i >= 0 && i < n_in) ++reach[i];
  return reach;
}

// The operands of a convolution kernel: x (B, C, H, W) float32, an ungrouped weight, a valid
// geometry with at least one output position.
void check_conv(const at::Tensor& x, const at::Tensor& weight, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                int64_t dh, int64_t dw) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "x: (B, C, H, W) float32");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1), "weight ", weight.sizes(), " does not take x of ",
              x.size(1), " channels (an ungrouped convolution)");
  TORCH_CHECK(sh > 0 && sw > 0 && dh > 0 && dw > 0 && ph >= 0 && pw >= 0, "stride (", sh, ", ", sw, "), padding (",
              ph, ", ", pw, ") and dilation (", dh, ", ", dw, ") of a convolution");
  TORCH_CHECK(x.size(2) + 2 * ph - dh * (weight.size(2) - 1) > 0 && x.size(3) + 2 * pw - dw * (weight.size(3) - 1) > 0,
              "the convolution has no output position");
}

// A convolution of x (B, C, H, W), any strides, in which sample b keeps the input channels
// keep[b] (keep: (B, C) or (1, C) bool, also (B, C, 1, 1), any strides; a channel size of 1 keeps
// or drops whole samples; if undefined, the AMU's channel top-k of k channels, see
// channel_topk): per sample an implicit GEMM over a zero-padded copy of the kept channels.
// Returns y (B, N, Ho, Wo) in channels-last memory format, the AMU's keep (B, C) (undefined when
// keep was given), and the MACs: the kept nonzero inputs under each output position's receptive
// field, times N (zero when count is false).
std::tuple<at::Tensor, at::Tensor, int64_t> channel_conv(
    const at::Tensor& x, const c10::optional<at::Tensor>& given_keep, int64_t k, const c10::optional<at::Tensor>& norms,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
    int64_t dh, int64_t dw, bool count) {
  check_conv(x, weight, sh, sw, ph, pw, dh, dw);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t n_out = weight.size(0), kh = weight.size(2), kw = weight.size(3), taps = kh * kw;
  // Sample s keeps channel c where kp[s · keep_s0 + c · keep_s1] (strides 0 where broadcast): the
  // given mask read in place, no reshape or copy through the dispatcher.
  at::Tensor keep;
  const bool* kp;
  int64_t keep_s0 = C, keep_s1 = 1;
  if (given_keep.has_value()) {
    const at::Tensor& g = *given_keep;
    TORCH_CHECK(g.scalar_type() == at::kBool && (g.dim() == 2 || (g.dim() == 4 && g.size(2) == 1 && g.size(3) == 1)) &&
                    (g.size(0) == 1 || g.size(0) == B) && (g.size(1) == 1 || g.size(1) == C),
                "keep: (B, C), (1, C), (B, 1) or (B, C, 1, 1) bool");
    kp = g.data_ptr<bool>();
    keep_s0 = g.size(0) == 1 ? 0 : g.stride(0);
    keep_s1 = g.size(1) == 1 ? 0 : g.stride(1);
  } else {
    keep = channel_topk(x, norms, k);
    kp = keep.data_ptr<bool>();
  }
  const at::Tensor packed = packed_for(weight);
  const int64_t Np = packed.size(1);
  const float* b = bias_data(bias, n_out);
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, M = Ho * Wo;
  at::Tensor y = new_tensor({B, n_out, Ho, Wo}, at::kFloat, at::MemoryFormat::ChannelsLast);
  // How many (output position, tap) pairs read input row iy (col ix): the MACs of a nonzero input.
  const std::vector<int64_t> cover_y = cover(H, Ho, kh, sh, ph, dh), cover_x = cover(W, Wo, kw, sw, pw, dw);
  const float* xp = x.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  // Sample s: its kept channels, zero-padded, then the implicit GEMM; returns its MACs. Inside a
  // parallel region (samples side by side) its own parallel loops run on the calling thread.
  auto conv_sample = [&](int64_t s, std::vector<float>& padded, std::vector<int64_t>& base,
                         std::vector<int64_t>& row) -> int64_t {
    const bool* ks = kp + s * keep_s0;
    std::vector<int64_t> kept;
    for (int64_t c = 0; c < C; ++c)
      if (ks[c * keep_s1]) kept.push_back(c);
    const int64_t Ck = static_cast<int64_t>(kept.size());
    padded.assign(static_cast<size_t>(Ck * Hp * Wp), 0.0f);
    std::atomic<int64_t> sample_macs{0};
    at::parallel_for(0, Ck, std::max<int64_t>(1, MIN_WORK / (Hp * Wp)), [&](int64_t c0, int64_t c1) {
      int64_t part = 0;
      for (int64_t i = c0; i < c1; ++i) {
        const float* xc = xp + s * s0 + kept[i] * s1;
        float* pc = padded.data() + (i * Hp + ph) * Wp + pw;
        for (int64_t iy = 0; iy < H; ++iy) {
          int64_t nonzero = 0;
          if (count) {
            for (int64_t ix = 0; ix < W; ++ix) {
              const float v = xc[iy * s2 + ix * s3];
              pc[iy * Wp + ix] = v;
              nonzero += (v != 0.0f) * cover_x[ix];
            }
          } else {
            for (int64_t ix = 0; ix < W; ++ix) pc[iy * Wp + ix] = xc[iy * s2 + ix * s3];
          }
          part += nonzero * cover_y[iy];
        }
      }
      sample_macs += part;
    });
    base.clear();
    row.clear();
    for (int64_t i = 0; i < Ck; ++i)
      for (int64_t t = 0; t < taps; ++t) {
        base.push_back(i * Hp * Wp + (t / kw) * dh * Wp + (t % kw) * dw);
        row.push_back((kept[i] * taps + t) * Np);
      }
    indexed_gemm({padded.data(), Wo, sh * Wp, sw, base.data(), row.data(), packed.data_ptr<float>(), b,
                  y.data_ptr<float>() + s * M * n_out, M, n_out, static_cast<int64_t>(base.size())});
    return sample_macs.load() * n_out;
  };
  // The samples side by side, one thread each (see side_by_side), or one after another, each on
  // all threads.
  std::atomic<int64_t> macs{0};
  for_units(B, [&](int64_t b0, int64_t b1) {
    std::vector<float> padded;
    std::vector<int64_t> base, row;
    int64_t part = 0;
    for (int64_t s = b0; s < b1; ++s) part += conv_sample(s, padded, base, row);
    macs += part;
  });
  return {y, keep, count ? macs.load() : 0};
}

// Whether a convolution's mask keeps positions (all channels of each): (B or 1, 1, H, W) with
// more than one position (a (B, 1, 1, 1) mask keeps or drops whole samples: channel_conv's).
bool is_spatial_mask(const at::Tensor& mask, const at::Tensor& x) {
  return mask.dim() == 4 && x.dim() == 4 && mask.size(1) == 1 && mask.size(2) * mask.size(3) > 1;
}

// A convolution of x (B, C, H, W), any strides, in which sample b keeps the input positions
// mask[b] (mask: (B, 1, H, W) or (1, 1, H, W) bool, any strides): every channel of a kept
// position, nothing of a dropped one. Scatter form: the kept positions' inputs (n, C) times the
// packed weight viewed as (C, taps · Np) (each kept input times every weight it feeds: no im2col,
// no dropped position read); then each output position sums the products that reach it, one per
// tap whose input is kept. At stride 1 every input meets every tap: one GEMM. At stride s an input
// meets the taps of its residue class only (row iy and tap ty meet where iy + ph = ty · dh mod s),
// so the kept positions are grouped by class and each tap multiplies its class's rows alone: the
// products computed are the ones some output reads (but at the borders). Returns y (B, N, Ho, Wo)
// in channels-last memory format and the MACs: the kept nonzero inputs times the output positions
// they reach, times N (zero when count is false).
std::tuple<at::Tensor, int64_t> spatial_conv(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight,
                                             const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw,
                                             int64_t ph, int64_t pw, int64_t dh, int64_t dw, bool count) {
  check_conv(x, weight, sh, sw, ph, pw, dh, dw);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == B) &&
                  mask.size(1) == 1 && mask.size(2) == H && mask.size(3) == W,
              "mask: (B, 1, H, W) or (1, 1, H, W) bool for x of ", x.sizes());
  const int64_t n_out = weight.size(0), kh = weight.size(2), kw = weight.size(3), taps = kh * kw;
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  const at::Tensor packed = packed_for(weight);
  const int64_t Np = packed.size(1);
  const float* b = bias_data(bias, n_out);
  at::Tensor y = new_tensor({B, n_out, Ho, Wo}, at::kFloat, at::MemoryFormat::ChannelsLast);
  float* yp = y.data_ptr<float>();  // (B, Ho, Wo, N)
  // The kept positions, by residue class (one class at stride 1), then in order (sample, row,
  // column): their rows of the products, their inputs' offsets in x, and, per position, its row
  // or -1 (dropped).
  const bool* mp = mask.data_ptr<bool>();
  const int64_t m0 = mask.size(0) == 1 ? 0 : mask.stride(0), m2 = mask.stride(2), m3 = mask.stride(3);
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  std::vector<int64_t> offset;  // of each kept position's first channel in x
  std::vector<int32_t> row_of(static_cast<size_t>(B * H * W), -1);
  std::vector<int64_t> class_first(static_cast<size_t>(sh * sw + 1), 0);  // the rows of each class
  for (int64_t cy = 0; cy < sh; ++cy)
    for (int64_t cx = 0; cx < sw; ++cx) {
      class_first[cy * sw + cx] = static_cast<int64_t>(offset.size());
      for (int64_t s = 0; s < B; ++s)
        for (int64_t iy = ((cy - ph) % sh + sh) % sh; iy < H; iy += sh)
          for (int64_t ix = ((cx - pw) % sw + sw) % sw; ix < W; ix += sw)
            if (mp[s * m0 + iy * m2 + ix * m3]) {
              row_of[(s * H + iy) * W + ix] = static_cast<int32_t>(offset.size());
              offset.push_back(s * s0 + iy * s2 + ix * s3);
            }
    }
  const int64_t n = static_cast<int64_t>(offset.size());
  class_first.back() = n;
  const bool unit = sh == 1 && sw == 1;
  // The input lines (sample, row) and the output lines come in one band per thread, the same
  // split of both: a thread gathers the kept inputs of its input lines and sums its output lines.
  // At stride 1 with more kept positions than channels (the products outweigh the weights) it
  // also multiplies its own inputs (a GEMM each), so that its sums read its own products but at
  // the bands' edges; else GEMMs of all of them, the threads splitting the weights (measured on 2
  // Xeon cores, density 0.5, warm: 64 channels at 32x32, 144 us banded against 203 with one GEMM;
  // 256 channels at 8x8, 131 with one GEMM against 147 banded).
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * Ho));
  std::vector<int64_t> first(static_cast<size_t>(B * H + 1), 0);  // stride 1: kept positions before each input line
  if (unit)
    for (int64_t line = 0; line < B * H; ++line) {
      const int32_t* r = row_of.data() + line * W;
      first[line + 1] = first[line] + std::count_if(r, r + W, [](int32_t v) { return v >= 0; });
    }
  at::Tensor rows = new_tensor({std::max<int64_t>(n, 1), C}, at::kFloat);
  at::Tensor products = new_tensor({std::max<int64_t>(n, 1), taps * Np}, at::kFloat);
  float* rp = rows.data_ptr<float>();
  const float* zp = products.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const at::Tensor weights = packed.view({C, taps * Np});
  const bool banded = unit && n > C;
  auto band_of = [&](int64_t t, int64_t lines) { return std::pair{t * lines / bands, (t + 1) * lines / bands}; };
  at::parallel_for(0, bands, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t r0 = t * n / bands, r1 = (t + 1) * n / bands;  // rows in order at stride > 1
      if (unit) {
        const auto [a, z] = band_of(t, B * H);
        r0 = first[a], r1 = first[z];
      }
      if (r1 == r0) continue;
      for (int64_t r = r0; r < r1; ++r) {  // the kept inputs as rows (n, C)
        if (s1 == 1) {
          std::memcpy(rp + r * C, xp + offset[r], static_cast<size_t>(C) * sizeof(float));
        } else {
          for (int64_t c = 0; c < C; ++c) rp[r * C + c] = xp[offset[r] + c * s1];
        }
      }
      if (banded) {  // each kept input times every weight it feeds
        at::Tensor part = products.narrow(0, r0, r1 - r0);
        at::mm_out(part, rows.narrow(0, r0, r1 - r0), weights);
      }
    }
  });
  if (!banded && unit && n > 0) {
    at::Tensor all = products.narrow(0, 0, n);
    at::mm_out(all, rows.narrow(0, 0, n), weights);
  }
  if (!unit)  // each tap times the rows of its class, into its columns of their products; the
    // threads take whole taps (small GEMMs, each on one thread)
    at::parallel_for(0, taps, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t cls = (t / kw * dh % sh) * sw + t % kw * dw % sw;
        const int64_t a = class_first[cls], z = class_first[cls + 1];
        if (z == a) continue;
        at::Tensor part = products.narrow(0, a, z - a).narrow(1, t * Np, Np);
        at::mm_out(part, rows.narrow(0, a, z - a), weights.narrow(1, t * Np, Np));
      }
    });
  int64_t nonzero_reach = 0;  // sum over kept inputs, nonzero, of the output positions they reach
  if (count) {
    const std::vector<int64_t> reach_y = cover(H, Ho, kh, sh, ph, dh), reach_x = cover(W, Wo, kw, sw, pw, dw);
    for (int64_t s = 0; s < B; ++s)
      for (int64_t iy = 0; iy < H; ++iy)
        for (int64_t ix = 0; ix < W; ++ix)
          if (const int64_t r = row_of[(s * H + iy) * W + ix]; r >= 0) {
            int64_t nonzero = 0;
            for (int64_t c = 0; c < C; ++c) nonzero += rp[r * C + c] != 0.0f;
            nonzero_reach += nonzero * reach_y[iy] * reach_x[ix];
          }
  }
  // Each output position sums the products of the kept inputs it reads (one per tap) in its row of
  // y, written once.
  at::parallel_for(0, bands, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto [l0, l1] = band_of(t, B * Ho);
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t s = l / Ho, oy = l % Ho;
        for (int64_t ox = 0; ox < Wo; ++ox) {
          float* __restrict acc = yp + (l * Wo + ox) * n_out;
          for (int64_t o = 0; o < n_out; ++o) acc[o] = b ? b[o] : 0.0f;
          for (int64_t ty = 0; ty < kh; ++ty) {
            const int64_t iy = oy * sh - ph + ty * dh;
            if (iy < 0 || iy >= H) continue;
            const int32_t* rows_of_line = row_of.data() + (s * H + iy) * W;
            for (int64_t tx = 0; tx < kw; ++tx) {
              const int64_t ix = ox * sw - pw + tx * dw;
              if (ix < 0 || ix >= W || rows_of_line[ix] < 0) continue;
              const float* __restrict z = zp + (rows_of_line[ix] * taps + ty * kw + tx) * Np;
#pragma omp simd
              for (int64_t o = 0; o < n_out; ++o) acc[o] += z[o];
            }
          }
        }
      }
    }
  });
  return {y, nonzero_reach * n_out};
}

// Whether a convolution's mask keeps single inputs: (B or 1, C, H, W) with more than one channel
// and more than one position (coarser masks are channel_conv's or spatial_conv's).
bool is_element_mask(const at::Tensor& mask, const at::Tensor& x) {
  return mask.dim() == 4 && x.dim() == 4 && mask.size(1) > 1 && mask.size(2) * mask.size(3) > 1;
}

// The AMU's element top-k for SAPI (norms undefined) and SAPW, per sample: the k inputs of x[s]
// (C·H·W of them, any strides) with the largest |x| (times norms[c]), into keep[0 : C·H·W]
// (c, iy, ix) order; ties go to the lower index. The selection of selact.amu.mask with element
// granularity and a top-k budget.
void element_topk(const float* xs, int64_t C, int64_t H, int64_t W, int64_t s1, int64_t s2, int64_t s3,
                  const float* norms, int64_t k, bool* keep) {
  const int64_t n = C * H * W;
  if (k >= n) {
    std::memset(keep, 1, static_cast<size_t>(n));
    return;
  }
  thread_local std::vector<float> score;
  score.resize(static_cast<size_t>(n));
  float* __restrict sp = score.data();
  for (int64_t c = 0; c < C; ++c) {
    const float scale = norms ? norms[c] : 1.0f;
    for (int64_t iy = 0; iy < H; ++iy) {
      const float* row = xs + c * s1 + iy * s2;
      float* out = sp + (c * H + iy) * W;
      if (norms) {
        for (int64_t ix = 0; ix < W; ++ix) out[ix] = std::fabs(row[ix * s3]) * scale;
      } else {
        for (int64_t ix = 0; ix < W; ++ix) out[ix] = std::fabs(row[ix * s3]);
      }
    }
  }
  keep_top_k(sp, n, k, keep);
}

// A sample's kept nonzero inputs, listed per input position (each list in channel order): their
// values and the offsets in the packed weight of their channels' first taps (c · taps · Np).
struct KeptLists {
  std::vector<float> value;
  std::vector<int32_t> offset;
  std::vector<int64_t> first;   // per position: where its list starts
  std::vector<int32_t> length;  // per position
};

// One output position's reads (the gather form, any stride): for each tap whose input position
// keeps something, that position's list, its length and the tap's offset (tap · Np).
struct Reads {
  const float* value[64];
  const int32_t* offset[64];
  int32_t count[64], tap[64];
  int n = 0;
};

#if SELACT_SIMD
// Gather form: out[0 : 16·NV] (the last register only the lanes in `tail`) = bias + Σ over the
// reads of value · wt[offset + tap : ...]. U sets of accumulators take the list's entries in
// turn, so that U·NV chains of multiply-adds are in flight.
template <int NV>
void position_sums(const Reads& r, const float* wt, const float* bias, float* out, Lanes tail) {
  constexpr int U = NV >= 3 ? 1 : 4 / NV;
  Vec acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int q = 0; q < NV; ++q) {
      const Lanes lanes = q == NV - 1 ? tail : Lanes(0xFFFF);
      acc[u][q] = u == 0 && bias ? vload(bias + 16 * q, lanes) : vzero();
    }
  for (int t = 0; t < r.n; ++t) {
    const float* value = r.value[t];
    const int32_t* offset = r.offset[t];
    const int64_t n = r.count[t];
    const float* w = wt + r.tap[t];
    int64_t j = 0;
    for (; j + U <= n; j += U)
      for (int u = 0; u < U; ++u) {
        const Vec v = vset1(value[j + u]);
        const float* wj = w + offset[j + u];
        for (int q = 0; q < NV; ++q) acc[u][q] = vfma(v, vload(wj + 16 * q), acc[u][q]);
      }
    for (; j < n; ++j) {
      const Vec v = vset1(value[j]);
      const float* wj = w + offset[j];
      for (int q = 0; q < NV; ++q) acc[0][q] = vfma(v, vload(wj + 16 * q), acc[0][q]);
    }
  }
  for (int u = 1; u < U; ++u)
    for (int q = 0; q < NV; ++q) acc[0][q] = vadd(acc[0][q], acc[u][q]);
  for (int q = 0; q < NV; ++q)
    vstore(out + 16 * q, acc[0][q], q == NV - 1 ? tail : Lanes(0xFFFF));
}

// out[0 : n] for the columns [n0, n0 + n) of the outputs, n ≤ 64.
void position_chunk(const Reads& r, const float* wt, const float* bias, float* out, int64_t n) {
  const int nv = static_cast<int>((n + LANES - 1) / LANES);
  const Lanes tail = first_lanes(n - (nv - 1) * LANES);
  switch (nv) {
    case 1: return position_sums<1>(r, wt, bias, out, tail);
    case 2: return position_sums<2>(r, wt, bias, out, tail);
    case 3: return position_sums<3>(r, wt, bias, out, tail);
    default: return position_sums<4>(r, wt, bias, out, tail);
  }
}

// Scatter form: the n inputs of one position's list, each times its weights for KW taps of one
// row of the kernel (wt + offset + tap[t]), added into the KW output positions they reach (acc +
// reach[t]; 16·NV floats each), held in registers across the list (one row of taps at a time:
// the compiler keeps up to 12 accumulators in registers, where 9·NV went through the stack). Per
// input one broadcast and KW·NV multiply-adds, each reading its weight from the packed row.
template <int KW, int NV>
void scatter_position(const float* value, const int32_t* offset, int64_t n, const float* wt, const int64_t* tap,
                      float* acc, const int64_t* reach) {
  Vec sum[KW][NV];
  for (int t = 0; t < KW; ++t)
    for (int q = 0; q < NV; ++q) sum[t][q] = vload(acc + reach[t] + 16 * q);
  for (int64_t j = 0; j < n; ++j) {
    const Vec v = vset1(value[j]);
    const float* w = wt + offset[j];
    for (int t = 0; t < KW; ++t)
      for (int q = 0; q < NV; ++q) sum[t][q] = vfma(v, vload(w + tap[t] + 16 * q), sum[t][q]);
  }
  for (int t = 0; t < KW; ++t)
    for (int q = 0; q < NV; ++q) vstore(acc + reach[t] + 16 * q, sum[t][q]);
}

template <int KW>
void scatter_columns(const float* value, const int32_t* offset, int64_t n, const float* wt, int64_t Np,
                     const int64_t* tap, float* acc, const int64_t* reach) {
  for (int64_t v0 = 0, vectors = Np / LANES; v0 < vectors; v0 += PASS_VECS) {
    const int64_t nv = std::min(PASS_VECS, vectors - v0), c0 = v0 * LANES;
    if (nv == 1) scatter_position<KW, 1>(value, offset, n, wt + c0, tap, acc + c0, reach);
    else if (nv == 2) scatter_position<KW, 2>(value, offset, n, wt + c0, tap, acc + c0, reach);
    else if (nv == 3) scatter_position<KW, 3>(value, offset, n, wt + c0, tap, acc + c0, reach);
    else scatter_position<KW, 4>(value, offset, n, wt + c0, tap, acc + c0, reach);
  }
}

// scatter_position over all Np columns (up to 4 registers of them at a time) for the `taps`
// (1 to 3) taps of one kernel row that reach outputs from this position.
void scatter_list(int64_t taps, const float* value, const int32_t* offset, int64_t n, const float* wt, int64_t Np,
                  const int64_t* tap, float* acc, const int64_t* reach) {
  if (taps == 1) scatter_columns<1>(value, offset, n, wt, Np, tap, acc, reach);
  else if (taps == 2) scatter_columns<2>(value, offset, n, wt, Np, tap, acc, reach);
  else scatter_columns<3>(value, offset, n, wt, Np, tap, acc, reach);
}

// Row form of the scatter, for kernels at horizontal dilation 1 and stride 1 (each input column
// meets all KW ≤ 3 taps of a kernel row, its outputs KW consecutive columns) or stride 2 with
// KW = 3 (below): one pass along an input row's lists for KT ≤ 3 kernel rows that reach outputs
// from it and the 16·NV output channels from c0, the output positions the current column reaches
// held in registers. Moving on completes the leftmost of each output row's window: it is added
// into the copy (out[t] + column · Np) and the window slides. Per kept input one broadcast and
// KT·KW·NV multiply-adds (at stride 2 on average half that) on independent chains, enough to keep
// the FMA units busy on lists of 2 or 3 entries, where scatter_position (a list at a time) waits
// on its KW chains and on its outputs' store and reload.
template <int KT, int KW, int NV, int SW>
void scatter_row(const KeptLists& row, int64_t W, const float* wt, int64_t Np, int64_t c0, const int64_t* ty_offset,
                 float* const* out, int64_t parity) {
  static_assert(SW == 1 || (SW == 2 && KW == 3), "the row form takes stride 1, or stride 2 with 3 taps");
  constexpr int S = SW == 1 ? KW : 2;  // output columns in the window
  Vec sum[KT][S][NV];
  for (int t = 0; t < KT; ++t)
    for (int s = 0; s < S; ++s)
      for (int q = 0; q < NV; ++q) sum[t][s][q] = vzero();
  auto flush = [&](int s, int64_t column) {
    for (int t = 0; t < KT; ++t)
      for (int q = 0; q < NV; ++q) {
        float* o = out[t] + column * Np + c0 + 16 * q;
        vstore(o, vadd(vload(o), sum[t][s][q]));
      }
  };
  auto slide = [&] {
    for (int t = 0; t < KT; ++t)
      for (int q = 0; q < NV; ++q) {
        for (int s = 0; s + 1 < S; ++s) vmove(sum[t][s][q], sum[t][s + 1][q]);
        sum[t][S - 1][q] = vzero();
      }
  };
  // f(v, w) for each kept input of column ix: its value broadcast, its packed weights from c0
  auto each_input = [&](int64_t ix, auto f) {
    const float* value = row.value.data() + row.first[ix];
    const int32_t* offset = row.offset.data() + row.first[ix];
    for (int64_t j = 0, n = row.length[ix]; j < n; ++j) f(vset1(value[j]), wt + c0 + offset[j]);
  };
  if constexpr (SW == 1) {
    for (int64_t ix = 0; ix < W; ++ix) {
      each_input(ix, [&](const Vec v, const float* w) {
        for (int t = 0; t < KT; ++t)
          for (int s = 0; s < KW; ++s)  // slot s: tap KW - 1 - s of the kernel row
            for (int q = 0; q < NV; ++q)
              sum[t][s][q] =
                  vfma(v, vload(w + ty_offset[t] + (KW - 1 - s) * Np + 16 * q), sum[t][s][q]);
      });
      flush(0, ix);
      slide();
    }
    for (int s = 0; s + 1 < KW; ++s) flush(s, W + s);
  } else {
    // Input column a (ix + pw; parity: pw's) meets tap 1 alone when odd, its output (a - 1) / 2,
    // and taps 2 and 0 when even, outputs a / 2 - 1 and a / 2; output o is complete after column
    // 2o + 2. The window holds outputs o (slot 0) and o + 1; out[t]'s column 0 is the first o.
    auto tap_into = [&](const Vec v, const float* w, int tap, int slot) {
      for (int t = 0; t < KT; ++t)
        for (int q = 0; q < NV; ++q)
          sum[t][slot][q] = vfma(v, vload(w + ty_offset[t] + tap * Np + 16 * q), sum[t][slot][q]);
    };
    int64_t column = 0;
    for (int64_t ix = 0; ix < W; ++ix) {
      if ((ix + parity) % 2 == 1) {
        each_input(ix, [&](const Vec v, const float* w) { tap_into(v, w, 1, 0); });
        continue;
      }
      each_input(ix, [&](const Vec v, const float* w) {
        tap_into(v, w, 2, 0);
        tap_into(v, w, 0, 1);
      });
      flush(0, column++);
      slide();
    }
    flush(0, column);
  }
}

// scatter_row over all Np output channels. One register of them (16): all KT kernel rows at
// once, KT·KW chains (16 channels at 32x32, density 1/4 to 1/2: 1.4-1.75 times faster than
// scatter_position). More: one kernel row at a time, up to 4 registers (64 channels) a pass, so
// that each kept input's weights for a tap are read as whole contiguous runs (all rows at once, a
// register a pass, reads 9 scattered lines an input: 2 times slower than scatter_position on 256
// channels at 8x8, density 1/2; 2 registers of all rows at once were slower too).
template <int KT, int KW, int SW>
void scatter_row_all(const KeptLists& row, int64_t W, const float* wt, int64_t Np, const int64_t* ty_offset,
                     float* const* out, int64_t parity) {
  if (Np == LANES) return scatter_row<KT, KW, 1, SW>(row, W, wt, Np, 0, ty_offset, out, parity);
  for (int t = 0; t < KT; ++t)
    for (int64_t c0 = 0; c0 < Np; c0 += PASS_VECS * LANES) {
      const int64_t nv = std::min(PASS_VECS, (Np - c0) / LANES);
      if (nv == 4) scatter_row<1, KW, 4, SW>(row, W, wt, Np, c0, ty_offset + t, out + t, parity);
      else if (nv == 3) scatter_row<1, KW, 3, SW>(row, W, wt, Np, c0, ty_offset + t, out + t, parity);
      else if (nv == 2) scatter_row<1, KW, 2, SW>(row, W, wt, Np, c0, ty_offset + t, out + t, parity);
      else scatter_row<1, KW, 1, SW>(row, W, wt, Np, c0, ty_offset + t, out + t, parity);
    }
}

// scatter_row for `rows` (1 to 3) kernel rows: kernels `kw` (1 to 3) wide at stride 1, or 3 wide
// at stride 2 (`sw`; `parity`: pw's).
void scatter_row_taps(int64_t rows, int64_t kw, int64_t sw, const KeptLists& row, int64_t W, const float* wt,
                      int64_t Np, const int64_t* ty_offset, float* const* out, int64_t parity) {
  using Fn = void (*)(const KeptLists&, int64_t, const float*, int64_t, const int64_t*, float* const*, int64_t);
  static constexpr Fn table[3][4] = {
      {scatter_row_all<1, 1, 1>, scatter_row_all<1, 2, 1>, scatter_row_all<1, 3, 1>, scatter_row_all<1, 3, 2>},
      {scatter_row_all<2, 1, 1>, scatter_row_all<2, 2, 1>, scatter_row_all<2, 3, 1>, scatter_row_all<2, 3, 2>},
      {scatter_row_all<3, 1, 1>, scatter_row_all<3, 2, 1>, scatter_row_all<3, 3, 1>, scatter_row_all<3, 3, 2>},
  };
  table[rows - 1][sw == 2 ? 3 : kw - 1](row, W, wt, Np, ty_offset, out, parity);
}

#if defined(__AVX512F__)
// The lanes of channels [c0, c0 + 16) that exist among C.
inline __mmask16 channel_lanes(int64_t C, int64_t c0) {
  return C - c0 >= LANES ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (C - c0)) - 1u);
}

// Order keys (order_key) of 16 non-negative-or-NaN scores at once.
inline __m512i order_keys(__m512 f) {
  const __m512i u = _mm512_castps_si512(_mm512_add_ps(f, _mm512_setzero_ps()));
  const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(INT32_MIN)));
  return _mm512_mask_mov_epi32(key, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(-1));
}

// How many of key[0:n] are above `upper`, and how many at least `lower`.
std::pair<int64_t, int64_t> count_bracket(const uint32_t* key, int64_t n, uint32_t lower, uint32_t upper) {
  int64_t above = 0, at_least = 0;
  const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(upper)), lo = _mm512_set1_epi32(static_cast<int32_t>(lower));
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    const __m512i kv = _mm512_loadu_si512(key + i);
    above += _mm_popcnt_u32(_mm512_cmpgt_epu32_mask(kv, hi));
    at_least += _mm_popcnt_u32(_mm512_cmpge_epu32_mask(kv, lo));
  }
  for (; i < n; ++i) above += key[i] > upper, at_least += key[i] >= lower;
  return {above, at_least};
}

// The keys of key[0:n] in [lower, upper], in order, into out (room for their number + 16);
// returns their number.
int64_t keys_between(const uint32_t* key, int64_t n, uint32_t lower, uint32_t upper, uint32_t* out) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(upper)), lo = _mm512_set1_epi32(static_cast<int32_t>(lower));
  int64_t m = 0, i = 0;
  for (; i + LANES <= n; i += LANES) {
    const __m512i kv = _mm512_loadu_si512(key + i);
    const __mmask16 in = _mm512_cmpge_epu32_mask(kv, lo) & _mm512_cmple_epu32_mask(kv, hi);
    _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi32(in, kv));
    m += _mm_popcnt_u32(in);
  }
  for (; i < n; ++i)
    if (key[i] >= lower && key[i] <= upper) out[m++] = key[i];
  return m;
}
#else  // AVX2: the compress of AVX-512 is a permutation looked up per 8-bit mask
// COMPRESS[m]: the lanes set in the 8-bit mask m, in order, first (the permutation that packs them).
constexpr std::array<std::array<int32_t, 8>, 256> compress_table() {
  std::array<std::array<int32_t, 8>, 256> table{};
  for (int m = 0; m < 256; ++m)
    for (int lane = 0, at = 0; lane < 8; ++lane)
      if (m >> lane & 1) table[m][at++] = lane;
  return table;
}
alignas(32) constexpr auto COMPRESS = compress_table();
// BYTES[m]: the 8-bit mask m as 8 bools.
constexpr std::array<uint64_t, 256> bytes_table() {
  std::array<uint64_t, 256> table{};
  for (int m = 0; m < 256; ++m)
    for (int lane = 0; lane < 8; ++lane) table[m] |= static_cast<uint64_t>(m >> lane & 1) << (8 * lane);
  return table;
}
constexpr auto BYTES = bytes_table();

inline __m256i compress_permutation(unsigned m) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(COMPRESS[m].data()));
}
// Unsigned 32-bit a > b, lane by lane (AVX2 compares signed: both biased by 2^31).
inline __m256i greater_unsigned(__m256i a, __m256i b) {
  const __m256i bias = _mm256_set1_epi32(INT32_MIN);
  return _mm256_cmpgt_epi32(_mm256_xor_si256(a, bias), _mm256_xor_si256(b, bias));
}
inline unsigned lanes_of(__m256i m) { return static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(m))); }

std::pair<int64_t, int64_t> count_bracket(const uint32_t* key, int64_t n, uint32_t lower, uint32_t upper) {
  int64_t above = 0, at_least = 0;
#pragma omp simd reduction(+ : above, at_least)
  for (int64_t i = 0; i < n; ++i) above += key[i] > upper, at_least += key[i] >= lower;
  return {above, at_least};
}

int64_t keys_between(const uint32_t* key, int64_t n, uint32_t lower, uint32_t upper, uint32_t* out) {
  const __m256i lo = _mm256_set1_epi32(static_cast<int32_t>(lower)), hi = _mm256_set1_epi32(static_cast<int32_t>(upper));
  int64_t m = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + i));
    const unsigned in = ~lanes_of(_mm256_or_si256(greater_unsigned(lo, kv), greater_unsigned(kv, hi))) & 0xFFu;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m), _mm256_permutevar8x32_epi32(kv, compress_permutation(in)));
    m += __builtin_popcount(in);
  }
  for (; i < n; ++i)
    if (key[i] >= lower && key[i] <= upper) out[m++] = key[i];
  return m;
}
#endif

// The k-th largest of key[0:n] (0 < k < n) and how many keys are above it and equal to it.
struct Kth {
  uint32_t key;
  int64_t above, equal;
};

// Kth of key[0:n] with every key counted: a radix select (kth_largest_key), then a counting pass.
Kth kth_counted(const uint32_t* key, int64_t n, int64_t k) {
  Kth kth{kth_largest_key(key, n, k), 0, 0};
  int64_t above = 0, equal = 0;
#pragma omp simd reduction(+ : above, equal)
  for (int64_t i = 0; i < n; ++i) {
    above += key[i] > kth.key;
    equal += key[i] == kth.key;
  }
  kth.above = above, kth.equal = equal;
  return kth;
}

// Kth of key[0:n], first bracketed from a sample of n/8 keys (at most 1024; spread over the
// offsets within each stride, so that a channels-last map's sample holds every channel, not the
// first of each position only): the sample's ranks around k's (a margin of 4 standard
// deviations of a sampled rank, and 8) give two keys between which the k-th lies, checked by one
// vectorised counting pass; the keys between them (a few percent) are then compressed out and the
// k-th found among them, its radix select starting below the bits the two keys share. Where the
// bracket misses (a sample far off), kth_counted of all keys. About 5 times faster than that on
// 16384 activations, whose histogram pass costs a scalar increment a key. `floor`: a key the k-th
// is known not to be below (at least k keys reach it): the bracket starts there at the lowest,
// so that a ReLU map whose nonzero inputs only just outnumber k does not bring its thousands of
// zeros into the bracket (the sample's lower key is zero there).
Kth kth_largest_sampled(const uint32_t* key, int64_t n, int64_t k, uint32_t floor) {
  const int64_t samples = std::min<int64_t>(1024, n / 8);
  if (samples < 256) return kth_counted(key, n, k);
  thread_local std::vector<uint32_t> sample, between;
  const int64_t step = n / samples;
  sample.resize(static_cast<size_t>(samples));
  for (int64_t i = 0, at = 0; i < samples; ++i, at = at + 1 == step ? 0 : at + 1) sample[i] = key[i * step + at];
  const double share = static_cast<double>(k) / static_cast<double>(n);
  const double rank = share * samples, margin = 4.0 * std::sqrt(samples * share * (1.0 - share)) + 8.0;
  const int64_t upper_rank = static_cast<int64_t>(rank - margin), lower_rank = static_cast<int64_t>(rank + margin);
  // the bracket: keys in [lower, upper] (each a radix select of the sample: vectorised passes,
  // where std::nth_element mispredicts a branch on every other comparison)
  const uint32_t upper = upper_rank >= 0 ? kth_largest_key(sample.data(), samples, upper_rank + 1) : ~0u;
  const uint32_t lower =
      std::max(floor, lower_rank < samples ? kth_largest_key(sample.data(), samples, lower_rank + 1) : 0u);
  const auto [above, at_least] = count_bracket(key, n, lower, upper);  // keys > upper, keys >= lower
  if (!(above < k && k <= at_least)) return kth_counted(key, n, k);
  between.resize(static_cast<size_t>(at_least - above + LANES));
  const int64_t m = keys_between(key, n, lower, upper, between.data());
  // the (k - above)-th largest in the bracket: every key there has the bits above the highest
  // one in which lower and upper differ
  const int differ = lower == upper ? -1 : 31 - __builtin_clz(lower ^ upper);
  const uint32_t shared = differ < 0 ? lower : lower & ~((uint32_t{2} << differ) - 1u);
  Kth kth{differ < 0 ? lower : refine_threshold(between.data(), m, k - above, shared, differ), above, 0};
  const uint32_t* b = between.data();
  int64_t more = 0, equal = 0;
#pragma omp simd reduction(+ : more, equal)
  for (int64_t j = 0; j < m; ++j) {
    more += b[j] > kth.key;
    equal += b[j] == kth.key;
  }
  kth.above += more, kth.equal = equal;
  return kth;
}

// The AMU's element top-k of a channels-last sample (channels contiguous, position (iy, ix) at
// xs + iy · s2 + ix · s3) as a rule the list builder applies per 16 channels: keys (C per
// position, position-major) above `threshold` are kept, and those equal to it in the channels
// before `tie_channel`, and in that channel at the positions before `tie_position`: the first
// ties in (c, iy, ix) order, as selact.amu ranks them (all ties: tie_channel = C).
struct TopK {
  std::vector<uint32_t> keys;
  uint32_t threshold = 0;
  int64_t tie_channel = 0, tie_position = 0;
};

constexpr uint32_t ZERO_KEY = 0x80000000u;  // order_key(+0)

// The helpers of the element top-k and list builder, over one position's C channels (contiguous):
//  - position_keys: the order keys of |in[c]| (times norms[c]) into key; returns how many are
//    above zero's;
//  - count_ties: ties_of[c] += 1 where key[c] == threshold;
//  - list_kept: the top-k rule's kept inputs (keys above threshold, or equal to it in channels up
//    to last_tie) marked in keep_out, and those of them that are nonzero listed: their values and
//    offsets (c · stride) appended to value and offset (room for C + 16); returns how many;
//  - list_given: the same for the inputs a given mask (C bytes) keeps.
#if defined(__AVX512F__)
int64_t position_keys(const float* in, const float* norms, int64_t C, uint32_t* key) {
  int64_t nonzero = 0;
  for (int64_t c0 = 0; c0 < C; c0 += LANES) {
    const __mmask16 lanes = channel_lanes(C, c0);
    __m512 score = _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes, in + c0));
    if (norms) score = _mm512_mul_ps(score, _mm512_maskz_loadu_ps(lanes, norms + c0));
    const __m512i kv = order_keys(score);
    _mm512_mask_storeu_epi32(key + c0, lanes, kv);
    nonzero += _mm_popcnt_u32(_mm512_mask_cmpgt_epu32_mask(lanes, kv, _mm512_set1_epi32(static_cast<int32_t>(ZERO_KEY))));
  }
  return nonzero;
}

void count_ties(const uint32_t* key, int64_t C, uint32_t threshold, int32_t* ties_of) {
  const __m512i t = _mm512_set1_epi32(static_cast<int32_t>(threshold)), one = _mm512_set1_epi32(1);
  for (int64_t c0 = 0; c0 < C; c0 += LANES) {
    const __mmask16 lanes = channel_lanes(C, c0);
    const __mmask16 eq = _mm512_mask_cmpeq_epu32_mask(lanes, _mm512_maskz_loadu_epi32(lanes, key + c0), t);
    const __m512i count = _mm512_loadu_si512(ties_of + c0);
    _mm512_storeu_si512(ties_of + c0, _mm512_mask_add_epi32(count, eq, count, one));
  }
}

// The nonzero inputs of in[c0 : c0 + 16] among `kept`, compressed in registers and stored whole
// (the lists have 16 entries of room at their end); returns how many.
inline int64_t list_lanes(const float* in, int64_t c0, __mmask16 lanes, __mmask16 kept, int64_t stride, float* value,
                          int32_t* offset) {
  const __m512 v = _mm512_maskz_loadu_ps(lanes, in + c0);
  kept &= _mm512_mask_cmp_ps_mask(lanes, v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  const __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i off = _mm512_mullo_epi32(_mm512_add_epi32(lane_index, _mm512_set1_epi32(static_cast<int32_t>(c0))),
                                         _mm512_set1_epi32(static_cast<int32_t>(stride)));
  _mm512_storeu_ps(value, _mm512_maskz_compress_ps(kept, v));
  _mm512_storeu_si512(offset, _mm512_maskz_compress_epi32(kept, off));
  return _mm_popcnt_u32(kept);
}

int64_t list_kept(const float* in, int64_t C, int64_t stride, const uint32_t* key, uint32_t threshold,
                  int64_t last_tie, bool* keep_out, float* value, int32_t* offset) {
  const __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i t = _mm512_set1_epi32(static_cast<int32_t>(threshold));
  const __m512i last = _mm512_set1_epi32(static_cast<int32_t>(last_tie));
  int64_t at = 0;
  for (int64_t c0 = 0; c0 < C; c0 += LANES) {
    const __mmask16 lanes = channel_lanes(C, c0);
    const __m512i kv = _mm512_maskz_loadu_epi32(lanes, key + c0);
    const __m512i channel = _mm512_add_epi32(lane_index, _mm512_set1_epi32(static_cast<int32_t>(c0)));
    const __mmask16 kept = _mm512_mask_cmpgt_epu32_mask(lanes, kv, t) |
                           (_mm512_mask_cmpeq_epu32_mask(lanes, kv, t) & _mm512_cmple_epi32_mask(channel, last));
    _mm_mask_storeu_epi8(keep_out + c0, lanes, _mm_movm_epi8(kept));
    at += list_lanes(in, c0, lanes, kept, stride, value + at, offset + at);
  }
  return at;
}

int64_t list_given(const float* in, int64_t C, int64_t stride, const bool* mask, float* value, int32_t* offset) {
  int64_t at = 0;
  for (int64_t c0 = 0; c0 < C; c0 += LANES) {
    const __mmask16 lanes = channel_lanes(C, c0);
    const __mmask16 kept = _mm_mask_cmpneq_epi8_mask(lanes, _mm_maskz_loadu_epi8(lanes, mask + c0), _mm_setzero_si128());
    at += list_lanes(in, c0, lanes, kept, stride, value + at, offset + at);
  }
  return at;
}
#else  // AVX2: 8 channels at a time
int64_t position_keys(const float* in, const float* norms, int64_t C, uint32_t* key) {
  int64_t nonzero = 0, c = 0;
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  const __m256i top = _mm256_set1_epi32(INT32_MIN), nan = _mm256_set1_epi32(-1);
  for (; c + 8 <= C; c += 8) {
    __m256 f = _mm256_andnot_ps(sign, _mm256_loadu_ps(in + c));  // |x|: never -0, so key = bits | 2^31
    if (norms) f = _mm256_mul_ps(f, _mm256_loadu_ps(norms + c));
    const __m256 unordered = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
    const __m256i kv = _mm256_blendv_epi8(_mm256_or_si256(_mm256_castps_si256(f), top), nan, _mm256_castps_si256(unordered));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(key + c), kv);
    nonzero += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(f, zero, _CMP_NEQ_UQ))));
  }
  for (; c < C; ++c) {
    key[c] = order_key(norms ? std::fabs(in[c]) * norms[c] : std::fabs(in[c]));
    nonzero += key[c] > ZERO_KEY;
  }
  return nonzero;
}

void count_ties(const uint32_t* key, int64_t C, uint32_t threshold, int32_t* ties_of) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) ties_of[c] += key[c] == threshold;
}

// The nonzero inputs of in[c0 : c0 + 8] among the 8-bit `kept`, packed and stored whole (the
// lists have 16 entries of room at their end); returns how many.
inline int64_t list_lanes(const float* in, int64_t c0, unsigned kept, int64_t stride, float* value, int32_t* offset) {
  const __m256 v = _mm256_loadu_ps(in + c0);
  kept &= static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ)));
  const __m256i order = compress_permutation(kept);
  const __m256i channel = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int32_t>(c0)));
  const __m256i off = _mm256_mullo_epi32(channel, _mm256_set1_epi32(static_cast<int32_t>(stride)));
  _mm256_storeu_ps(value, _mm256_permutevar8x32_ps(v, order));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset), _mm256_permutevar8x32_epi32(off, order));
  return __builtin_popcount(kept);
}

int64_t list_kept(const float* in, int64_t C, int64_t stride, const uint32_t* key, uint32_t threshold,
                  int64_t last_tie, bool* keep_out, float* value, int32_t* offset) {
  const __m256i t = _mm256_set1_epi32(static_cast<int32_t>(threshold));
  int64_t at = 0, c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + c));
    const __m256i channel = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int32_t>(c)));
    const __m256i tie = _mm256_andnot_si256(_mm256_cmpgt_epi32(channel, _mm256_set1_epi32(static_cast<int32_t>(last_tie))),
                                            _mm256_cmpeq_epi32(kv, t));
    const unsigned kept = lanes_of(_mm256_or_si256(greater_unsigned(kv, t), tie));
    std::memcpy(keep_out + c, &BYTES[kept], 8);
    at += list_lanes(in, c, kept, stride, value + at, offset + at);
  }
  for (; c < C; ++c) {  // branch-free: each input written, kept by moving on (a NaN is nonzero)
    const bool kept = key[c] > threshold || (key[c] == threshold && c <= last_tie);
    keep_out[c] = kept;
    value[at] = in[c];
    offset[at] = static_cast<int32_t>(c * stride);
    at += kept && in[c] != 0.0f;
  }
  return at;
}

int64_t list_given(const float* in, int64_t C, int64_t stride, const bool* mask, float* value, int32_t* offset) {
  int64_t at = 0, c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + c));
    const unsigned kept = ~static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_setzero_si128()))) & 0xFFu;
    at += list_lanes(in, c, kept, stride, value + at, offset + at);
  }
  for (; c < C; ++c) {
    value[at] = in[c];
    offset[at] = static_cast<int32_t>(c * stride);
    at += mask[c] && in[c] != 0.0f;
  }
  return at;
}
#endif

void element_topk_channels_last(const float* xs, int64_t C, int64_t H, int64_t W, int64_t s2, int64_t s3,
                                const float* norms, int64_t k, TopK& top) {
  const int64_t n = C * H * W, P = H * W;
  top.keys.resize(static_cast<size_t>(n));
  uint32_t* key = top.keys.data();
  int64_t nonzero = 0;
  for (int64_t p = 0; p < P; ++p) nonzero += position_keys(xs + (p / W) * s2 + (p % W) * s3, norms, C, key + p * C);
  top.tie_channel = C, top.tie_position = 0;
  if (k >= n) {  // every input kept
    top.threshold = 0;
    return;
  }
  // where no more than k scores are above zero (ReLU maps at high densities), the k-th is zero;
  // else it is above zero
  const Kth kth = nonzero <= k ? Kth{ZERO_KEY, nonzero, n - nonzero} : kth_largest_sampled(key, n, k, ZERO_KEY + 1);
  top.threshold = kth.key;
  const int64_t above = kth.above;
  if (above + kth.equal == k) return;  // every tie kept
  // the first k - above ties in (c, iy, ix) order: whole channels, then part of one
  thread_local std::vector<int32_t> ties_of;
  ties_of.assign(static_cast<size_t>(C + LANES), 0);
  for (int64_t p = 0; p < P; ++p) count_ties(key + p * C, C, top.threshold, ties_of.data());
  int64_t left = k - above, c = 0;
  while (ties_of[c] < left) left -= ties_of[c++];
  int64_t p = 0;
  for (; left > 0; ++p) left -= key[p * C + c] == top.threshold;
  top.tie_channel = c, top.tie_position = p;
}

// The lists of input row iy of a channels-last sample, into value and offset (room for C · W + 16
// entries; position ix's list from first[ix], length[ix] long), 16 channels at a time: which are
// kept (the given mask's bytes, channels contiguous, or the top-k rule, whose mask it also writes
// to keep_out), and nonzero, compressed into the lists. Returns the row's MACs per output channel.
int64_t list_row_channels_last(const float* xs, int64_t iy, int64_t C, int64_t W, int64_t s2, int64_t s3,
                               const bool* mask, int64_t m2, int64_t m3, const TopK* top, bool* keep_out,
                               int64_t taps, int64_t Np, const std::vector<int64_t>& cover_x, float* value,
                               int32_t* offset, int64_t* first, int32_t* length) {
  int64_t at = 0, reach = 0;
  for (int64_t ix = 0; ix < W; ++ix) {
    const int64_t start = at, pos = iy * W + ix;
    if (top) {
      // ties: in the channels before tie_channel, and in it before tie_position
      const int64_t last_tie = top->tie_channel - (pos < top->tie_position ? 0 : 1);
      at += list_kept(xs + iy * s2 + ix * s3, C, taps * Np, top->keys.data() + pos * C, top->threshold, last_tie,
                      keep_out + pos * C, value + at, offset + at);
    } else {
      at += list_given(xs + iy * s2 + ix * s3, C, taps * Np, mask + iy * m2 + ix * m3, value + at, offset + at);
    }
    first[ix] = start;
    length[ix] = static_cast<int32_t>(at - start);
    reach += (at - start) * cover_x[ix];
  }
  return reach;
}
constexpr bool SCATTER = true;
#else
// Portable version of the gather form: the same sums, the compiler vectorises the column loop.
void position_chunk(const Reads& r, const float* wt, const float* bias, float* out, int64_t n) {
  float acc[NR];
  for (int64_t o = 0; o < n; ++o) acc[o] = bias ? bias[o] : 0.0f;
  for (int t = 0; t < r.n; ++t)
    for (int64_t j = 0; j < r.count[t]; ++j) {
      const float v = r.value[t][j];
      const float* w = wt + r.tap[t] + r.offset[t][j];
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) acc[o] += v * w[o];
    }
  std::memcpy(out, acc, static_cast<size_t>(n) * sizeof(float));
}
struct TopK {};
constexpr bool SCATTER = false;  // the gather form serves every case
#endif

// A convolution of x (B, C, H, W), any strides, in which sample b keeps the single inputs
// mask[b] (mask: (B, C, H, W) or (1, C, H, W) bool, any strides; if undefined, the AMU's element
// top-k of k inputs a sample, see element_topk). No im2col and no GEMM: the kept nonzero inputs
// are listed per input position (in channel order). Scatter form (AVX-512; any stride, where a
// kernel row reaches at most 3 outputs from one input column; x and mask read channels-last, as
// the cpu backend's convolutions and BatchNorm give them, copied so where they are not): the
// threads take bands of input rows, list each row's kept inputs 16 channels at a time
// (compressed in registers) and add each list, times its weights, into the output positions it
// reaches, held in registers across the list, in the band's own copy of the outputs; the copies
// are then summed into y. Gather form (any other case): all lists first, then each output position
// sums the lists its taps read. A dropped or zero input costs nothing. A multiply-add per kept
// nonzero input, output position it reaches and output channel: the MACs counted. Returns y
// (B, N, Ho, Wo) in channels-last memory format, the AMU's mask (B, C, H, W) (channels-last where
// x is; undefined when the mask was given) and the MACs (zero when count is false).
std::tuple<at::Tensor, at::Tensor, int64_t> element_conv(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& given_in, int64_t k, const c10::optional<at::Tensor>& norms,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
    int64_t dh, int64_t dw, bool count) {
  check_conv(x_in, weight, sh, sw, ph, pw, dh, dw);
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t n_out = weight.size(0), kh = weight.size(2), kw = weight.size(3), taps = kh * kw;
  TORCH_CHECK(taps <= 64, "the element kernel takes kernels of at most 64 taps, not ", kh, "x", kw);
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  if (given_in.has_value()) {
    const at::Tensor& g = *given_in;
    TORCH_CHECK(g.scalar_type() == at::kBool && g.dim() == 4 && (g.size(0) == 1 || g.size(0) == B) &&
                    g.size(1) == C && g.size(2) == H && g.size(3) == W,
                "mask: (B, C, H, W) or (1, C, H, W) bool for x of ", x_in.sizes());
  }
  // the scatter form takes kernels whose rows reach from any input column at most 3 outputs
  int64_t most_taps = 0;
  for (int64_t r = 0; r < sw; ++r) {
    int64_t n = 0;
    for (int64_t tx = 0; tx < kw; ++tx) n += (r - tx * dw % sw + sw) % sw == 0;
    most_taps = std::max(most_taps, n);
  }
  const bool scatter = SCATTER && most_taps <= 3 && n_out < GATHER_OUTPUTS;
  // and takes a whole input row at a time where a kernel row's taps meet every input column, or
  // every other one (3 taps at stride 2)
  [[maybe_unused]] const bool by_rows = scatter && dw == 1 && ((sw == 1 && kw <= 3) || (sw == 2 && kw == 3));
  // the scatter form reads x and the mask channels-last (a channel size of 1 is either)
  auto readable = [&](const at::Tensor& t) { return !scatter || C == 1 || t.stride(1) == 1; };
  const at::Tensor x = readable(x_in) ? x_in : x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const c10::optional<at::Tensor> given_mask =
      !given_in.has_value() || readable(*given_in) ? given_in : given_in->contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  const bool given = given_mask.has_value();
  at::Tensor keep;
  if (!given) {
    TORCH_CHECK(k >= 0, "k: the inputs kept per sample, not ", k);
    keep = new_tensor({B, C, H, W}, at::kBool, scatter ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  const at::Tensor& mask = given ? *given_mask : keep;
  const bool* mp = mask.data_ptr<bool>();
  const int64_t m0 = mask.size(0) == 1 ? 0 : mask.stride(0), m1 = mask.stride(1), m2 = mask.stride(2),
                m3 = mask.stride(3);
  const float* np = norms_data(norms, C);
  const at::Tensor packed = packed_for(weight);
  const int64_t Np = packed.size(1);
  TORCH_CHECK(packed.numel() < (int64_t{1} << 31), "the element kernel takes weights of under 2^31 floats");
  const float* wt = packed.data_ptr<float>();
  const float* b = bias_data(bias, n_out);
  at::Tensor y = new_tensor({B, n_out, Ho, Wo}, at::kFloat, at::MemoryFormat::ChannelsLast);
  float* yp = y.data_ptr<float>();  // (B, Ho, Wo, N)
  const float* xp = x.data_ptr<float>();
  const std::vector<int64_t> cover_y = cover(H, Ho, kh, sh, ph, dh), cover_x = cover(W, Wo, kw, sw, pw, dw);

  // Scatter form: the bands' copies of the outputs, (GY, GX, Np) each, output (oy, ox) at
  // (oy + HY, ox + HX). Input row iy reaches output row (iy + ph - ty · dh) / sh by the kernel
  // rows ty that divide evenly (all of them at stride 1), column ix likewise: a copy holds every
  // output, and every output position an input reaches off the edges too. Column ix's taps:
  // col_taps[ix], their weights' offsets (tx · Np) and their outputs' (gx · Np) in col_tap and
  // col_reach.
  auto floor_div = [](int64_t a, int64_t d) { return (a >= 0 ? a : a - d + 1) / d; };
  const int64_t HY = ((kh - 1) * dh + sh - 1) / sh, HX = ((kw - 1) * dw + sw - 1) / sw;
  const int64_t GY = std::max((H - 1 + ph) / sh + 1, Ho) + HY, GX = std::max((W - 1 + pw) / sw + 1, Wo) + HX;
  std::vector<int64_t> col_taps(static_cast<size_t>(W), 0), col_tap(static_cast<size_t>(3 * W)),
      col_reach(static_cast<size_t>(3 * W));
  for (int64_t ix = 0; ix < W && scatter; ++ix)
    for (int64_t tx = 0; tx < kw; ++tx) {
      const int64_t at = ix + pw - tx * dw;
      if (((at % sw) + sw) % sw != 0) continue;
      col_tap[3 * ix + col_taps[ix]] = tx * Np;
      col_reach[3 * ix + col_taps[ix]++] = (floor_div(at, sw) + HX) * Np;
    }
  auto scatter_sample = [&](int64_t s) -> int64_t {
    const float* xs = xp + s * s0;
    const TopK* top = nullptr;
#if SELACT_SIMD
    thread_local TopK topk;
    if (!given) {
      element_topk_channels_last(xs, C, H, W, s2, s3, np, k, topk);
      top = &topk;
    }
#endif
    bool* keep_out = given ? nullptr : keep.data_ptr<bool>() + s * C * H * W;
    const int64_t bands = at::in_parallel_region() ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), H));
    const int64_t plane = GY * GX * Np;
    thread_local std::vector<float> copies;
    copies.resize(static_cast<size_t>(bands * plane));
    float* copy0 = copies.data();
    auto rows_of = [&](int64_t t) { return std::pair{t * H / bands, (t + 1) * H / bands}; };
    // the rows of a copy that input rows from a on (to z) reach
    auto lowest = [&](int64_t a) { return floor_div(a + ph - (kh - 1) * dh, sh) + HY; };
    auto highest = [&](int64_t z) { return floor_div(z - 1 + ph, sh) + HY; };
    std::atomic<int64_t> reach{0};
    at::parallel_for(0, bands, 1, [&](int64_t t0, int64_t t1) {
      thread_local KeptLists row;
      row.value.resize(static_cast<size_t>(C * W + LANES));
      row.offset.resize(static_cast<size_t>(C * W + LANES));
      row.first.resize(static_cast<size_t>(W));
      row.length.resize(static_cast<size_t>(W));
      int64_t part = 0;
      for (int64_t t = t0; t < t1; ++t) {
        const auto [a, z] = rows_of(t);
        float* acc = copy0 + t * plane;
        const int64_t rows = highest(z) - lowest(a) + 1;
        std::memset(acc + lowest(a) * GX * Np, 0, static_cast<size_t>(rows * GX * Np) * sizeof(float));
        for (int64_t iy = a; iy < z; ++iy) {
#if SELACT_SIMD
          part += cover_y[iy] * list_row_channels_last(xs, iy, C, W, s2, s3, mp + s * m0, m2, m3, top, keep_out, taps,
                                                       Np, cover_x, row.value.data(), row.offset.data(),
                                                       row.first.data(), row.length.data());
          int64_t rows = 0, ty_offset[3];
          float* out[3];
          for (int64_t ty = 0; ty < kh; ++ty) {
            const int64_t at = iy + ph - ty * dh;
            if (((at % sh) + sh) % sh != 0) continue;
            const float* wrow = wt + ty * kw * Np;
            float* arow = acc + (floor_div(at, sh) + HY) * GX * Np;
            if (by_rows && rows < 3) {
              ty_offset[rows] = ty * kw * Np;
              // the copy's column of the first output the row form's window holds
              out[rows++] = arow + (sw == 1 ? pw + HX - (kw - 1) : floor_div(pw - 1, 2) + HX) * Np;
              continue;
            }
            for (int64_t ix = 0; ix < W; ++ix)
              if (const int64_t n = row.length[ix]; n > 0 && col_taps[ix] > 0)
                scatter_list(col_taps[ix], row.value.data() + row.first[ix], row.offset.data() + row.first[ix], n,
                             wrow, Np, col_tap.data() + 3 * ix, arow, col_reach.data() + 3 * ix);
          }
          if (rows > 0) scatter_row_taps(rows, kw, sw, row, W, wt, Np, ty_offset, out, pw % 2);
#endif
        }
      }
      reach += part;
    });
    // y = bias + the copies' sums; output row oy reads the copies whose band reaches it
    at::parallel_for(0, Ho, std::max<int64_t>(1, MIN_WORK / std::max<int64_t>(1, Wo * n_out)), [&](int64_t o0, int64_t o1) {
      for (int64_t oy = o0; oy < o1; ++oy) {
        float* __restrict out = yp + (s * Ho + oy) * Wo * n_out;
        const int64_t gy = oy + HY;
        bool written = false;  // the first copy that reaches the row is added to the bias
        for (int64_t t = 0; t < bands; ++t) {
          const auto [a, z] = rows_of(t);
          if (z == a || gy < lowest(a) || gy > highest(z)) continue;
          const float* __restrict in = copy0 + t * plane + (gy * GX + HX) * Np;
          for (int64_t ox = 0; ox < Wo; ++ox) {
            float* __restrict o_row = out + ox * n_out;
            const float* __restrict i_row = in + ox * Np;
            if (written) {
#pragma omp simd
              for (int64_t o = 0; o < n_out; ++o) o_row[o] += i_row[o];
            } else if (b) {
#pragma omp simd
              for (int64_t o = 0; o < n_out; ++o) o_row[o] = b[o] + i_row[o];
            } else {
              std::memcpy(o_row, i_row, static_cast<size_t>(n_out) * sizeof(float));
            }
          }
          written = true;
        }
        for (int64_t ox = 0; ox < Wo && !written; ++ox)  // a row no input reaches (padding only)
          for (int64_t o = 0; o < n_out; ++o) out[ox * n_out + o] = b ? b[o] : 0.0f;
      }
    });
    return reach.load();
  };

  // Gather form: every row's lists (row iy's in [iy · (C + 1) · W, ...), each with a spare slot),
  // then the output positions.
  auto gather_sample = [&](int64_t s) -> int64_t {
    const float* xs = xp + s * s0;
    if (!given) element_topk(xs, C, H, W, s1, s2, s3, np, k, keep.data_ptr<bool>() + s * C * H * W);
    const bool* ms = mp + s * m0;
    thread_local KeptLists lists;
    lists.value.resize(static_cast<size_t>(H * (C + 1) * W));
    lists.offset.resize(static_cast<size_t>(H * (C + 1) * W));
    lists.first.resize(static_cast<size_t>(H * W));
    lists.length.resize(static_cast<size_t>(H * W));
    // (the parallel loops see this thread's lists through these: a thread_local named in them
    // would be each thread's own)
    float* value = lists.value.data();
    int32_t* offset = lists.offset.data();
    int64_t* first = lists.first.data();
    int32_t* length = lists.length.data();
    std::atomic<int64_t> reach{0};
    at::parallel_for(0, H, std::max<int64_t>(1, MIN_WORK / std::max<int64_t>(1, 4 * C * W)), [&](int64_t y0, int64_t y1) {
      int64_t part = 0;
      for (int64_t iy = y0; iy < y1; ++iy) {
        // every input is written (no branch on the mask): a kept nonzero one to its place, any
        // other to the slot the next takes, or to its list's spare slot
        int64_t at = iy * (C + 1) * W, nonzero_reach = 0;
        for (int64_t ix = 0; ix < W; ++ix) {
          const int64_t start = at;
          const float* in = xs + iy * s2 + ix * s3;
          const bool* m = ms + iy * m2 + ix * m3;
          for (int64_t c = 0; c < C; ++c) {
            const float v = in[c * s1];
            value[at] = v;
            offset[at] = static_cast<int32_t>(c * taps * Np);
            at += m[c * m1] & (v != 0.0f);
          }
          length[iy * W + ix] = static_cast<int32_t>(at - start);
          first[iy * W + ix] = start;
          nonzero_reach += (at - start) * cover_x[ix];
          ++at;
        }
        part += nonzero_reach * cover_y[iy];
      }
      reach += part;
    });
    const int64_t grain = std::max<int64_t>(1, MIN_WORK / std::max<int64_t>(1, Wo * n_out * taps));
    at::parallel_for(0, Ho, grain, [&](int64_t o0, int64_t o1) {
      Reads r;
      for (int64_t oy = o0; oy < o1; ++oy)
        for (int64_t ox = 0; ox < Wo; ++ox) {
          r.n = 0;
          for (int64_t ty = 0; ty < kh; ++ty) {
            const int64_t iy = oy * sh - ph + ty * dh;
            if (iy < 0 || iy >= H) continue;
            for (int64_t tx = 0; tx < kw; ++tx) {
              const int64_t ix = ox * sw - pw + tx * dw, pos = iy * W + ix;
              if (ix < 0 || ix >= W || length[pos] == 0) continue;
              r.value[r.n] = value + first[pos];
              r.offset[r.n] = offset + first[pos];
              r.count[r.n] = length[pos];
              r.tap[r.n++] = static_cast<int32_t>((ty * kw + tx) * Np);
            }
          }
          float* out = yp + ((s * Ho + oy) * Wo + ox) * n_out;
          for (int64_t n0 = 0; n0 < n_out; n0 += NR)
            position_chunk(r, wt + n0, b ? b + n0 : nullptr, out + n0, std::min<int64_t>(NR, n_out - n0));
        }
    });
    return reach.load();
  };
  std::atomic<int64_t> macs{0};
  for_units(B, [&](int64_t b0, int64_t b1) {
    int64_t part = 0;
    for (int64_t s = b0; s < b1; ++s) part += scatter ? scatter_sample(s) : gather_sample(s);
    macs += part;
  });
  return {y, keep, count ? macs.load() * n_out : 0};
}

// Two front-ends for each kernel. As torch ops (torch.ops.selact_cpu.*, for torch.compile's
// fake tensors and torch.library.opcheck): every result a tensor, the MACs 0-dim int64. As plain
// Python functions (pybind11), which the cpu backend calls: no dispatcher boxing the arguments,
// the MACs None when not counted and the mask None when given, so that a call allocates its
// output and nothing else (each allocation costs microseconds under a cold cache).

at::Tensor macs_tensor(int64_t macs) { return at::scalar_tensor(macs, at::kLong); }

py::object macs_or_none(int64_t macs, bool count) {
  return count ? py::cast(macs_tensor(macs)) : py::none();
}

py::object tensor_or_none(const at::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

std::tuple<at::Tensor, at::Tensor> sparse_linear_op(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                                                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                    bool count) {
  auto [y, macs] = sparse_linear(x, mask, weight, bias, count);
  return {y, macs_tensor(macs)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_linear_op(const at::Tensor& x, int64_t G, int64_t k,
                                                                const c10::optional<at::Tensor>& norms,
                                                                const at::Tensor& weight,
                                                                const c10::optional<at::Tensor>& bias, bool count) {
  auto [y, keep, macs] = select_linear(x, G, k, norms, weight, bias, count);
  return {y, keep, macs_tensor(macs)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_conv_op(
    const at::Tensor& x, const c10::optional<at::Tensor>& given_keep, int64_t k, const c10::optional<at::Tensor>& norms,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
    int64_t dh, int64_t dw, bool count) {
  auto [y, keep, macs] = channel_conv(x, given_keep, k, norms, weight, bias, sh, sw, ph, pw, dh, dw, count);
  if (!keep.defined()) {  // a new (B or 1, C) mask: an op's outputs do not alias its inputs
    const at::Tensor& g = *given_keep;
    keep = g.reshape({g.size(0), g.size(1)}).expand({g.size(0), x.size(1)}).clone();
  }
  return {y, keep, macs_tensor(macs)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> element_conv_op(
    const at::Tensor& x, const c10::optional<at::Tensor>& given_mask, int64_t k, const c10::optional<at::Tensor>& norms,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
    int64_t dh, int64_t dw, bool count) {
  auto [y, keep, macs] = element_conv(x, given_mask, k, norms, weight, bias, sh, sw, ph, pw, dh, dw, count);
  // contiguous, as the fake implementation says; a new tensor: an op's outputs do not alias its inputs
  keep = keep.defined() ? keep.contiguous() : given_mask->expand(x.sizes()).clone(at::MemoryFormat::Contiguous);
  return {y, keep, macs_tensor(macs)};
}

std::tuple<at::Tensor, at::Tensor> spatial_conv_op(const at::Tensor& x, const at::Tensor& mask,
                                                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                   int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                                                   int64_t dw, bool count) {
  auto [y, macs] = spatial_conv(x, mask, weight, bias, sh, sw, ph, pw, dh, dw, count);
  return {y, macs_tensor(macs)};
}

// ---------------------------------------------------------------------------------------------
// planned calls: the public ops without Python

// A call's signature: everything the public op's checks and choice of backend depend on
// (selact.mgemm._signature): the op, the requested backend (else SELACT_BACKEND), the settings,
// whether gradients are needed, and each operand's sizes, dtype and device, or its absence. The
// Python dispatcher checks a signature's first call and, when it gives it to this backend, plans it
// here (plan); later calls of a planned signature are served at once (serve_planned), without the
// Python that costs 10-20 us a call when the previous layer has evicted the caches.
using Signature = std::vector<int64_t>;

struct SignatureHash {
  size_t operator()(const Signature& s) const {
    size_t h = s.size();
    for (int64_t v : s) h = h * 1000003u ^ std::hash<int64_t>{}(v);
    return h;
  }
};

constexpr size_t MAX_PLANS = 4096;  // as selact.mgemm.registry.MAX_PLANS
std::mutex plan_mutex;
std::unordered_set<Signature, SignatureHash> plans;

enum Op : int64_t { LINEAR = 1, CONV2D = 2 };

// Whether h is a plain tensor or a parameter: a tensor subclass (a FakeTensor while torch.export
// traces, a user's own tensor type) may mean something else by its data and goes through Python.
bool plain_tensor(py::handle h) {
  static PyObject* parameter = py::object(py::module_::import("torch.nn").attr("Parameter")).release().ptr();
  return THPVariable_CheckExact(h.ptr()) || Py_TYPE(h.ptr()) == reinterpret_cast<PyTypeObject*>(parameter);
}

// Appends a tensor operand (its dims, sizes, dtype, device) or None; false for anything else.
bool add_operand(Signature& s, py::handle h) {
  if (h.is_none()) {
    s.push_back(-1);
    return true;
  }
  if (!plain_tensor(h)) return false;
  const at::Tensor& t = THPVariable_Unpack(h.ptr());
  s.push_back(t.dim());
  for (int64_t size : t.sizes()) s.push_back(size);
  s.push_back(static_cast<int64_t>(t.scalar_type()));
  s.push_back(static_cast<int64_t>(t.device().type()));
  s.push_back(t.device().index());
  return true;
}

// Appends the backend asked for: the argument, else SELACT_BACKEND (empty: the automatic choice).
bool add_requested(Signature& s, py::handle requested) {
  std::string name;
  if (!requested.is_none()) {
    if (!py::isinstance<py::str>(requested)) return false;
    name = requested.cast<std::string>();
  }
  if (name.empty())
    if (const char* env = std::getenv("SELACT_BACKEND")) name = env;
  s.push_back(static_cast<int64_t>(name.size()));
  for (char c : name) s.push_back(c);
  return true;
}

bool requires_grad(std::initializer_list<py::handle> operands) {
  if (!at::GradMode::is_enabled()) return false;
  for (py::handle h : operands)
    if (!h.is_none() && THPVariable_Unpack(h.ptr()).requires_grad()) return true;
  return false;
}

// A convolution setting as a pair (an int, or a sequence of two ints); false for anything else
// (a padding string): such calls stay with the Python dispatcher.
bool pair_of(py::handle h, int64_t (&out)[2]) {
  if (PyLong_Check(h.ptr())) {
    out[0] = out[1] = h.cast<int64_t>();
    return true;
  }
  if (!(PyTuple_Check(h.ptr()) || PyList_Check(h.ptr())) || py::len(h) != 2) return false;
  py::sequence seq = py::reinterpret_borrow<py::sequence>(h);
  for (int i = 0; i < 2; ++i) {
    if (!PyLong_Check(seq[i].ptr())) return false;
    out[i] = seq[i].cast<int64_t>();
  }
  return true;
}

struct ConvSettings {
  int64_t stride[2], padding[2], dilation[2], groups;
};

bool linear_signature(Signature& s, py::handle x, py::handle weight, py::handle bias, py::handle in_mask,
                      py::handle out_mask, py::handle requested) {
  s.reserve(64);  // one allocation: a layer's signature has 20-30 words
  s.push_back(LINEAR);
  if (!add_requested(s, requested)) return false;
  for (py::handle h : {x, weight, bias, in_mask, out_mask})
    if (!add_operand(s, h)) return false;
  if (x.is_none() || weight.is_none()) return false;
  s.push_back(requires_grad({x, weight, bias}));
  return true;
}

bool conv_signature(Signature& s, py::handle x, py::handle weight, py::handle bias, py::handle stride,
                    py::handle padding, py::handle dilation, py::handle groups, py::handle in_mask,
                    py::handle requested, ConvSettings& settings) {
  s.reserve(64);
  s.push_back(CONV2D);
  if (!add_requested(s, requested)) return false;
  for (py::handle h : {x, weight, bias, in_mask})
    if (!add_operand(s, h)) return false;
  if (x.is_none() || weight.is_none() || !pair_of(stride, settings.stride) || !pair_of(padding, settings.padding) ||
      !pair_of(dilation, settings.dilation) || !PyLong_Check(groups.ptr()))
    return false;
  settings.groups = groups.cast<int64_t>();
  for (const int64_t* pair : {settings.stride, settings.padding, settings.dilation}) {
    s.push_back(pair[0]);
    s.push_back(pair[1]);
  }
  s.push_back(settings.groups);
  s.push_back(requires_grad({x, weight, bias}));
  return true;
}

void plan(Signature&& s) {
  std::lock_guard<std::mutex> lock(plan_mutex);
  if (plans.size() >= MAX_PLANS) plans.clear();
  plans.insert(std::move(s));
}

bool is_planned(const Signature& s) {
  std::lock_guard<std::mutex> lock(plan_mutex);
  return plans.count(s) > 0;
}

c10::optional<at::Tensor> optional_tensor(py::handle h) {
  if (h.is_none()) return c10::nullopt;
  return THPVariable_Unpack(h.ptr());
}

TORCH_LIBRARY(selact_cpu, m) {
  m.def("sparse_linear(Tensor x, Tensor? mask, Tensor weight, Tensor? bias, bool count) -> (Tensor, Tensor)");
  m.def(
      "select_linear(Tensor x, int groups, int k, Tensor? norms, Tensor weight, Tensor? bias, bool count) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("topk_mask(Tensor scores, int k) -> Tensor");
  m.def(
      "channel_conv(Tensor x, Tensor? keep, int k, Tensor? norms, Tensor weight, Tensor? bias, int sh, int sw, "
      "int ph, int pw, int dh, int dw, bool count) -> (Tensor, Tensor, Tensor)");
  m.def(
      "spatial_conv(Tensor x, Tensor mask, Tensor weight, Tensor? bias, int sh, int sw, int ph, int pw, int dh, int dw, "
      "bool count) "
      "-> (Tensor, Tensor)");
  m.def(
      "element_conv(Tensor x, Tensor? mask, int k, Tensor? norms, Tensor weight, Tensor? bias, int sh, int sw, "
      "int ph, int pw, int dh, int dw, bool count) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(selact_cpu, CPU, m) {
  m.impl("sparse_linear", &sparse_linear_op);
  m.impl("select_linear", &select_linear_op);
  m.impl("topk_mask", &topk_mask);
  m.impl("channel_conv", &channel_conv_op);
  m.impl("spatial_conv", &spatial_conv_op);
  m.impl("element_conv", &element_conv_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", [](const at::Tensor& x, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, bool count) {
    auto [y, macs] = sparse_linear(x, mask, weight, bias, count);
    return py::make_tuple(y, macs_or_none(macs, count));
  });
  m.def("select_linear", [](const at::Tensor& x, int64_t G, int64_t k, const c10::optional<at::Tensor>& norms,
                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool count) {
    auto [y, keep, macs] = select_linear(x, G, k, norms, weight, bias, count);
    return py::make_tuple(y, keep, macs_or_none(macs, count));
  });
  m.def("topk_mask", &topk_mask);
  m.def("channel_conv", [](const at::Tensor& x, const c10::optional<at::Tensor>& keep, int64_t k,
                           const c10::optional<at::Tensor>& norms, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                           int64_t dh, int64_t dw, bool count) {
    auto [y, kept, macs] = channel_conv(x, keep, k, norms, weight, bias, sh, sw, ph, pw, dh, dw, count);
    return py::make_tuple(y, tensor_or_none(kept), macs_or_none(macs, count));
  });
  m.def("spatial_conv", [](const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                           int64_t dh, int64_t dw, bool count) {
    auto [y, macs] = spatial_conv(x, mask, weight, bias, sh, sw, ph, pw, dh, dw, count);
    return py::make_tuple(y, macs_or_none(macs, count));
  });
  m.def("element_conv", [](const at::Tensor& x, const c10::optional<at::Tensor>& mask, int64_t k,
                           const c10::optional<at::Tensor>& norms, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                           int64_t dh, int64_t dw, bool count) {
    auto [y, kept, macs] = element_conv(x, mask, k, norms, weight, bias, sh, sw, ph, pw, dh, dw, count);
    return py::make_tuple(y, tensor_or_none(kept), macs_or_none(macs, count));
  });
  m.def("packed", &packed_for);
  m.def("set_on_packed", [](py::function hook) { on_packed = hook.release().ptr(); });
  m.def("forget_packed", [](uintptr_t impl) {
    std::lock_guard<std::mutex> lock(packed_mutex);
    packed_cache.erase(reinterpret_cast<const c10::TensorImpl*>(impl));
  });
  m.def("impl_of", [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.unsafeGetTensorImpl()); });
  // the planned public ops: (results) for a planned call, None for any other
  m.def("plan_linear", [](py::handle x, py::handle weight, py::handle bias, py::handle in_mask, py::handle out_mask,
                          py::handle requested) {
    Signature s;
    if (linear_signature(s, x, weight, bias, in_mask, out_mask, requested)) plan(std::move(s));
  });
  m.def("planned_linear", [](py::handle x, py::handle weight, py::handle bias, py::handle in_mask,
                             py::handle out_mask, bool count, py::handle requested) -> py::object {
    Signature s;
    if (!linear_signature(s, x, weight, bias, in_mask, out_mask, requested) || !out_mask.is_none() || !is_planned(s))
      return py::none();
    auto [y, macs] = sparse_linear(THPVariable_Unpack(x.ptr()), optional_tensor(in_mask),
                                   THPVariable_Unpack(weight.ptr()), optional_tensor(bias), count);
    return py::make_tuple(y, macs_or_none(macs, count));
  });
  m.def("plan_conv2d", [](py::handle x, py::handle weight, py::handle bias, py::handle stride, py::handle padding,
                          py::handle dilation, py::handle groups, py::handle in_mask, py::handle requested) {
    Signature s;
    ConvSettings c;
    if (conv_signature(s, x, weight, bias, stride, padding, dilation, groups, in_mask, requested, c))
      plan(std::move(s));
  });
  m.def("planned_conv2d", [](py::handle x, py::handle weight, py::handle bias, py::handle stride, py::handle padding,
                             py::handle dilation, py::handle groups, py::handle in_mask, bool count,
                             py::handle requested) -> py::object {
    Signature s;
    ConvSettings c;
    if (!conv_signature(s, x, weight, bias, stride, padding, dilation, groups, in_mask, requested, c) ||
        c.groups != 1 || !is_planned(s))
      return py::none();
    const auto mask = optional_tensor(in_mask);
    if (mask.has_value() && is_spatial_mask(*mask, THPVariable_Unpack(x.ptr()))) {
      auto [y, macs] = spatial_conv(THPVariable_Unpack(x.ptr()), *mask, THPVariable_Unpack(weight.ptr()),
                                    optional_tensor(bias), c.stride[0], c.stride[1], c.padding[0], c.padding[1],
                                    c.dilation[0], c.dilation[1], count);
      return py::make_tuple(y, macs_or_none(macs, count));
    }
    if (mask.has_value() && is_element_mask(*mask, THPVariable_Unpack(x.ptr()))) {
      auto [y, kept, macs] = element_conv(THPVariable_Unpack(x.ptr()), mask, 0, c10::nullopt,
                                          THPVariable_Unpack(weight.ptr()), optional_tensor(bias), c.stride[0],
                                          c.stride[1], c.padding[0], c.padding[1], c.dilation[0], c.dilation[1], count);
      return py::make_tuple(y, macs_or_none(macs, count));
    }
    auto [y, kept, macs] = channel_conv(THPVariable_Unpack(x.ptr()), mask, 0, c10::nullopt,
                                        THPVariable_Unpack(weight.ptr()), optional_tensor(bias), c.stride[0],
                                        c.stride[1], c.padding[0], c.padding[1], c.dilation[0], c.dilation[1], count);
    return py::make_tuple(y, macs_or_none(macs, count));
  });
  m.def("forget_plans", [] {
    std::lock_guard<std::mutex> lock(plan_mutex);
    plans.clear();
  });
}
