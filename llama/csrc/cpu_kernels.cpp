// Products for a few rows of x on an x86 CPU (llama/cpu_kernels.py builds this file once with the machine's own
// instruction set, loads it, and says when to use it): weight-only int8 and int4, the decode step's matrix-vector
// products of llama/quant.py's layers, reading its stored layout as it is; and oneDNN's matmul over a prepacked
// weight for a speculative verify step (packed_linear, at the end), so that a compiled graph calls it from C++.
//
//   llamaref_cpu::int8_linear(x [M, K], q int8 [N, K], scale [N]) -> y [M, N]
//       y[m, n] = scale[n] * sum_k x[m, k] q[n, k]
//   llamaref_cpu::int4_linear(x [M, Kp], qweight uint8 [N, Kp/2], scales [N, Kp/G], mins [N, Kp/G], G) -> y [M, N]
//       y[m, n] = sum_g (scales[n, g] * sum_{k in g} x[m, k] q[n, k] + mins[n, g] * sum_{k in g} x[m, k])
//       q[n, 2j] = qweight[n, j] & 15 and q[n, 2j + 1] = qweight[n, j] >> 4   (x rounded to 16 bits in the first sum)
//   llamaref_cpu::decode_layer(...)   a whole block of a decode step, at the end of the file
//
// int8 is float32 throughout (x, the scales, the sums). A decode step reads every weight once, so these loops are
// judged by the bytes they stream: at one row a product is a few operations a byte, and a CPU core converts and
// multiplies faster than its share of the memory bandwidth delivers bytes, but only if the bytes arrive early.
// The hardware prefetcher stops at page boundaries and ramps up slowly on each new matrix, so each block of rows
// asks for the bytes PREFETCH ahead of it in the same stream (on the 2-core EPYC of docs/benchmarks.md this alone
// took a sweep over SmolLM2's int8 matrices from 15-17 to 27-32 GB/s).
//
// Work is split over torch's number of threads (at::parallel_for: torch.set_num_threads applies; the fused decode
// block keeps one team of them for all its steps) by blocks of ROWS consecutive weight rows, which lie one after
// the other in memory, so each thread reads one contiguous range.
// Within a block, each of the M rows of x is multiplied by the block's weights in turn: the weights are read
// from memory once and from the L1 cache after that.
//
// int4 multiplies in integers: x is rounded to 16 bits per block of 32 features (d = max |x| / 32767, a relative
// error of ~1e-5 against int4's own ~1e-1: the decode-step perplexity of SmolLM2 did not move, docs/benchmarks.md),
// and the nibbles, zero-extended to 16 bits, meet it in pairwise 16-bit products summed exactly in int32
// (vpdpwssd with AVX-512 VNNI, vpmaddwd otherwise); each block's sum is then scaled by its d and its group's scale,
// and mins . (x summed over each group) added. The packed bytes need no reordering: x is laid out once per call in
// the order the unpacked nibbles come in (IntX). Per 64 weights that is ~12 integer operations of 256 bits,
// against ~18 for converting the nibbles to float32 and multiplying there (the loop this replaced: 13-15% slower
// over SmolLM2's matrices, 5-9% slower decoding); rounding x to 8 bits (vpdpbusd, as llama.cpp's Q4_1 x Q8_1) was
// faster again but cost 1.3% of decode-step perplexity, and the same 16-bit scheme for int8 weights was slower than
// int8's float loop.
//
// The float loops are written once over a small vector vocabulary (VF: W floats; load, convert, fused
// multiply-add, sum, e^x), defined for AVX-512 and for AVX2 + FMA; the compiler's -march=native picks the first the
// CPU has. The integer loops use 256-bit AVX2 instructions (and vpdpwssd where the CPU has it).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int W = 16;
using VF = __m512;
inline VF zero() { return _mm512_setzero_ps(); }
inline VF load(const float* p) { return _mm512_loadu_ps(p); }
inline VF broadcast(float v) { return _mm512_set1_ps(v); }
inline VF fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF add(VF a, VF b) { return _mm512_add_ps(a, b); }
inline float sum(VF v) { return _mm512_reduce_add_ps(v); }
inline VF from_i8(const int8_t* p) {  // W int8 -> W floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline VF mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF maximum(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF minimum(VF a, VF b) { return _mm512_min_ps(a, b); }
inline VF div(VF a, VF b) { return _mm512_div_ps(a, b); }
inline void store(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF round_nearest(VF v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF times_two_to(VF p, VF n) { return _mm512_scalef_ps(p, n); }  // p 2^n
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
using VF = __m256;
inline VF zero() { return _mm256_setzero_ps(); }
inline VF load(const float* p) { return _mm256_loadu_ps(p); }
inline VF broadcast(float v) { return _mm256_set1_ps(v); }
inline VF fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF add(VF a, VF b) { return _mm256_add_ps(a, b); }
inline float sum(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline VF from_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF maximum(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF minimum(VF a, VF b) { return _mm256_min_ps(a, b); }
inline VF div(VF a, VF b) { return _mm256_div_ps(a, b); }
inline void store(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF round_nearest(VF v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF times_two_to(VF p, VF n) {  // p 2^n, n in [-126, 127] (vexp clamps its argument so)
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#else
#error "llamaref's CPU kernels need AVX2 and FMA (or AVX-512); cpu_kernels.py falls back to PyTorch without them"
#endif

// e^x for W lanes: x = n ln 2 + r with n whole and |r| <= ln 2 / 2, e^r by its degree-7 Taylor-like polynomial
// (Cephes' expf coefficients; ~1 ulp in float32), times 2^n. x is clamped to [-87, 88]: e^-87 is float32's
// smallest normal number and e^89 its overflow, so a lane below gives ~1.6e-38 instead of a denormal or 0, one
// above ~1.7e38 instead of inf (softmax and SiLU take 0 and inf there as well as these).
inline VF vexp(VF x) {
  x = maximum(minimum(x, broadcast(88.0f)), broadcast(-87.0f));
  const VF n = round_nearest(mul(x, broadcast(1.44269504088896341f)));
  VF r = fma(n, broadcast(-0.693359375f), x);  // (ln 2 in two parts, so that n ln 2 is exact enough)
  r = fma(n, broadcast(2.12194440e-4f), r);
  VF p = broadcast(1.9875691500e-4f);
  p = fma(p, r, broadcast(1.3981999507e-3f));
  p = fma(p, r, broadcast(8.3334519073e-3f));
  p = fma(p, r, broadcast(4.1665795894e-2f));
  p = fma(p, r, broadcast(1.6666665459e-1f));
  p = fma(p, r, broadcast(5.0000001201e-1f));
  p = fma(p, mul(r, r), add(r, broadcast(1.0f)));
  return times_two_to(p, n);
}

// A value loaded once and used by several rows, kept in a register: left alone, GCC folds the load into every
// multiply-add that uses it, and the loads then bound the loop.
inline VF in_register(VF v) {
  __asm__("" : "+v"(v));
  return v;
}

// sum_i a[i] b[i]
inline float dot(const float* a, const float* b, int64_t n) {
  VF acc = zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = fma(load(a + i), load(b + i), acc);
  float total = sum(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

constexpr int64_t ROWS = 4;         // weight rows a block
constexpr int64_t PREFETCH = 4096;  // bytes ahead of the block being read
constexpr int64_t GRAIN = 16;       // blocks a thread takes at least

// ask for bytes [from, from + bytes), but none at or past `end` (past a tensor's end it costs and brings nothing)
inline void prefetch(const void* from, int64_t bytes, const void* end) {
  const char* p = static_cast<const char*>(from);
  for (int64_t i = 0; i < bytes && p + i < end; i += 64) __builtin_prefetch(p + i);
}

void check(const at::Tensor& x, const at::Tensor& weight, int64_t in_bytes, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), name, ": x must be a contiguous "
              "float32 [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == in_bytes, name, ": weight of shape ",
              weight.sizes(), " does not match x of shape ", x.sizes());
}

// y[m, n .. n + R) for a block of R int8 weight rows starting at r (R is a constant, so the sums stay in registers)
template <int R>
inline void int8_block(const float* x, int64_t M, int64_t K, const int8_t* r, const float* scale, float* y,
                       int64_t N) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    VF acc[R];
    for (int i = 0; i < R; ++i) acc[i] = zero();
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      const VF xv = in_register(load(xm + k));
      for (int i = 0; i < R; ++i) acc[i] = fma(xv, from_i8(r + i * K + k), acc[i]);
    }
    float total[R];
    for (int i = 0; i < R; ++i) total[i] = sum(acc[i]);  // (a loop of its own, so the sums stay in registers)
    for (int i = 0; i < R; ++i) {
      for (int64_t j = k; j < K; ++j) total[i] += xm[j] * r[i * K + j];  // (the features past the last vector)
      y[m * N + i] = total[i] * scale[i];
    }
  }
}

// y[:, n] for the weight rows of blocks [b0, b1) (ROWS rows each) and, with `tail`, the rows past the last block
void int8_rows(const float* xp, int64_t M, int64_t K, const int8_t* qp, const float* sp, int64_t N, float* yp,
               int64_t b0, int64_t b1, bool tail) {
  const int8_t* end = qp + N * K;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = b * ROWS;
    prefetch(qp + n * K + PREFETCH, ROWS * K, end);
    // One row (a decode step) as a constant: the sweep over SmolLM2's int8 matrices took 3.4-3.8 ms with this
    // branch and 6.7-6.9 ms without it
    if (M == 1) {
      int8_block<ROWS>(xp, 1, K, qp + n * K, sp + n, yp + n, N);
    } else {
      int8_block<ROWS>(xp, M, K, qp + n * K, sp + n, yp + n, N);
    }
  }
  for (int64_t n = (N / ROWS) * ROWS; tail && n < N; ++n) int8_block<1>(xp, M, K, qp + n * K, sp + n, yp + n, N);
}

// y [M, N] = x [M, K] q^T * scale, from raw pointers
void int8_product(const float* xp, int64_t M, int64_t K, const int8_t* qp, const float* sp, int64_t N, float* yp) {
  at::parallel_for(0, N / ROWS, GRAIN, [&](int64_t begin, int64_t stop) {
    int8_rows(xp, M, K, qp, sp, N, yp, begin, stop, false);
  });
  int8_rows(xp, M, K, qp, sp, N, yp, 0, 0, true);
}

// acc (int32) += w . x for 16 pairs of 16-bit integers (two products a lane)
inline __m256i pair_products(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check(x, q, x.size(1), "int8_linear");
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.numel() == q.size(0),
              "int8_linear: q must be int8 [N, K] and scale float32 [N]");
  at::Tensor y = at::empty({x.size(0), q.size(0)}, x.options());
  int8_product(x.data_ptr<float>(), x.size(0), q.size(1), q.data_ptr<int8_t>(), scale.data_ptr<float>(), q.size(0),
               y.data_ptr<float>());
  return y;
}

// x in 16-bit integers, per block of 32 features: xq = round(x / d), d = max |x| / 32767 (a relative error of
// ~1e-5), laid out in the order int4_x16_block multiplies the weights' nibbles in: for the 32
// weight bytes j .. j + 31 of a chunk of 64 features, four runs of 16 (two per 128-bit half, bytes j .. j + 15 in
// the lower half, j + 16 .. j + 31 in the upper):  x[2j'] for the bytes of _mm256_unpacklo_epi8, then of unpackhi,
// then x[2j' + 1] for the same two. A last half chunk (16 bytes) is laid out the same in 128 bits.
struct IntX {
  std::vector<int16_t> q;          // [M, Kp]
  std::vector<float> scale, sums;  // [M, Kp / 32] (d of each block), [M, Kp / G] (x summed over each group)
};

IntX quantize_x16(const float* xp, int64_t M, int64_t Kp, int64_t G) {
  const int64_t blocks = Kp / 32, groups = Kp / G;
  IntX out{std::vector<int16_t>(M * Kp), std::vector<float>(M * blocks), std::vector<float>(M * groups, 0.0f)};
  std::vector<float> inverse(blocks);  // 32767 / max |x| of each block (0 for a block of zeros)
  for (int64_t m = 0; m < M; ++m) {
    const float* x = xp + m * Kp;
    for (int64_t b = 0; b < blocks; ++b) {
      float most = 0.0f, total = 0.0f;
      for (int i = 0; i < 32; ++i) most = std::max(most, std::fabs(x[32 * b + i])), total += x[32 * b + i];
      out.scale[m * blocks + b] = most / 32767.0f;
      out.sums[m * groups + 32 * b / G] += total;
      inverse[b] = most > 0 ? 32767.0f / most : 0.0f;
    }
    for (int64_t c = 0; c < Kp / 64 + (Kp % 64 != 0); ++c) {  // chunks of 64 features (the last may be 32)
      const int lanes = 64 * c + 64 > Kp ? 1 : 2;  // 128-bit halves in this chunk, one block of x each
      int16_t* q = out.q.data() + m * Kp + 64 * c;
      const int run = 8 * lanes;  // words per run: 8 per 128-bit half
      for (int parity = 0; parity < 2; ++parity)      // even features (low nibbles), then odd (high)
        for (int part = 0; part < 2; ++part)          // the bytes of unpacklo, then of unpackhi
          for (int h = 0; h < lanes; ++h)             // 128-bit half: bytes 16 h .. 16 h + 15 of the chunk
            for (int k = 0; k < 8; ++k) {
              const int64_t byte = 32 * c + 16 * h + 8 * part + k;  // (a byte index within the row)
              q[(2 * parity + part) * run + 8 * h + k] =
                  static_cast<int16_t>(std::nearbyint(x[2 * byte + parity] * inverse[2 * c + h]));
            }
    }
  }
  return out;
}

// acc (int32) += the products of 32 weight bytes (64 nibbles) with their x, in IntX's order
inline __m256i nibble_products(__m256i acc, __m256i w, const int16_t* x) {
  const __m256i zero = _mm256_setzero_si256(), low4 = _mm256_set1_epi16(15);
  const __m256i lo = _mm256_unpacklo_epi8(w, zero), hi = _mm256_unpackhi_epi8(w, zero);  // bytes as 16-bit words
  const __m256i* xv = reinterpret_cast<const __m256i*>(x);
  acc = pair_products(acc, _mm256_and_si256(lo, low4), _mm256_loadu_si256(xv));
  acc = pair_products(acc, _mm256_and_si256(hi, low4), _mm256_loadu_si256(xv + 1));
  acc = pair_products(acc, _mm256_srli_epi16(lo, 4), _mm256_loadu_si256(xv + 2));
  return pair_products(acc, _mm256_srli_epi16(hi, 4), _mm256_loadu_si256(xv + 3));
}

// y[m, n .. n + R) for a block of R int4 weight rows starting at r: per chunk of 64 features, the integer products
// (exact in int32), times the chunk's two blocks' x scales and the rows' group scales; plus mins . (x summed per group)
template <int R>
inline void int4_x16_block(const IntX& x, int64_t M, int64_t KB, int64_t G, const uint8_t* r, const float* scales,
                           const float* mins, float* y, int64_t N) {
  const int64_t Kp = 2 * KB, groups = Kp / G, blocks = Kp / 32;
  for (int64_t m = 0; m < M; ++m) {
    const int16_t* xq = x.q.data() + m * Kp;
    const float* d = x.scale.data() + m * blocks;
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= KB; j += 32) {  // bytes j .. j + 31: features 2j .. 2j + 63, blocks 2j / 32 and the next
      const __m256 dv = _mm256_set_m128(_mm_set1_ps(d[j / 16 + 1]), _mm_set1_ps(d[j / 16]));
      const int64_t g0 = 2 * j / G, g1 = (2 * j + 32) / G;
      for (int i = 0; i < R; ++i) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i * KB + j));
        const __m256i s = nibble_products(_mm256_setzero_si256(), w, xq + 2 * j);
        const __m256 sv = _mm256_set_m128(_mm_set1_ps(scales[i * groups + g1]), _mm_set1_ps(scales[i * groups + g0]));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(sv, dv), acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) {
      float total = hsum(acc[i]) + dot(mins + i * groups, x.sums.data() + m * groups, groups);
      if (j < KB) {  // a last 16 bytes (32 features, one block): the same in 128 bits
        const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + i * KB + j));
        const __m128i zero = _mm_setzero_si128(), low4 = _mm_set1_epi16(15);
        const __m128i lo = _mm_unpacklo_epi8(w, zero), hi = _mm_unpackhi_epi8(w, zero);
        const __m128i* xv = reinterpret_cast<const __m128i*>(xq + 2 * j);
        __m128i s = _mm_madd_epi16(_mm_and_si128(lo, low4), _mm_loadu_si128(xv));
        s = _mm_add_epi32(s, _mm_madd_epi16(_mm_and_si128(hi, low4), _mm_loadu_si128(xv + 1)));
        s = _mm_add_epi32(s, _mm_madd_epi16(_mm_srli_epi16(lo, 4), _mm_loadu_si128(xv + 2)));
        s = _mm_add_epi32(s, _mm_madd_epi16(_mm_srli_epi16(hi, 4), _mm_loadu_si128(xv + 3)));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
        total += _mm_cvtsi128_si32(s) * d[j / 16] * scales[i * groups + 2 * j / G];
      }
      y[m * N + i] = total;
    }
  }
}

// y[:, n] for the int4 weight rows of blocks [b0, b1) and, with `tail`, the rows past the last block
void int4_rows(const IntX& q, int64_t M, int64_t Kp, const uint8_t* qp, const float* sp, const float* mp, int64_t G,
               int64_t N, float* yp, int64_t b0, int64_t b1, bool tail) {
  const int64_t KB = Kp / 2, groups = Kp / G;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = b * ROWS;
    prefetch(qp + n * KB + PREFETCH, ROWS * KB, qp + N * KB);
    int4_x16_block<ROWS>(q, M, KB, G, qp + n * KB, sp + n * groups, mp + n * groups, yp + n, N);
  }
  for (int64_t n = (N / ROWS) * ROWS; tail && n < N; ++n)
    int4_x16_block<1>(q, M, KB, G, qp + n * KB, sp + n * groups, mp + n * groups, yp + n, N);
}

// y [M, N] from x [M, Kp] and an int4 weight [N, Kp / 2] with groups of G, from raw pointers
void int4_product(const float* xp, int64_t M, int64_t Kp, const uint8_t* qp, const float* sp, const float* mp,
                  int64_t G, int64_t N, float* yp) {
  const IntX q = quantize_x16(xp, M, Kp, G);
  at::parallel_for(0, N / ROWS, GRAIN, [&](int64_t begin, int64_t stop) {
    int4_rows(q, M, Kp, qp, sp, mp, G, N, yp, begin, stop, false);
  });
  int4_rows(q, M, Kp, qp, sp, mp, G, N, yp, 0, 0, true);
}

void check_int4(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, int64_t G,
                const char* name) {
  const int64_t N = qweight.size(0), Kp = 2 * qweight.size(1);
  TORCH_CHECK(G % 32 == 0 && Kp % G == 0, name, ": group size ", G, " must divide ", Kp, " and be a multiple of 32");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat &&
              mins.scalar_type() == at::kFloat && scales.is_contiguous() && mins.is_contiguous() &&
              scales.numel() == N * (Kp / G) && mins.numel() == N * (Kp / G),
              name, ": qweight must be uint8 [N, Kp/2], scales and mins float32 [N, Kp/G]");
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t G) {
  check(x, qweight, x.size(1) / 2, "int4_linear");
  check_int4(qweight, scales, mins, G, "int4_linear");
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  int4_product(x.data_ptr<float>(), x.size(0), x.size(1), qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(),
               mins.data_ptr<float>(), G, qweight.size(0), y.data_ptr<float>());
  return y;
}

// x [..., K] times a weight that oneDNN prepacked (torch.ops.mkldnn._reorder_linear_weight), plus a bias:
// oneDNN's matmul, for a speculative verify step's few rows (speculative.pack_for_verify). Called from here, a
// compiled graph reaches it without going through a Python function (~23 us a call, 121 calls a step).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x.reshape({-1, x.size(-1)}), packed, bias, std::string("none"),
                                 c10::List<std::optional<at::Scalar>>({std::nullopt}), std::string("")};
  op.callBoxed(&stack);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return stack[0].toTensor().view(shape);
}

// ---------------------------------------------------------------------------- a decode step's block, fused
// llamaref_cpu::decode_layer: one block of model.py (Block.forward) for a decode step of B rows, one token each
// (x [B, 1, C] -> [B, 1, C]; cos, sin [B, 1, D]; positions [B, 1]; the caches [B_max, K, S, D], written in place),
// every product quantized (int8 or int4), float32 activations:
//
//   h = x + o(attend(rope(qkv(norm_a(x)))))        attend: row b sees its cache slots 0 .. positions[b]
//   y = h + down(silu(gate(norm_m(h))) * up(norm_m(h)))
//
// Called from Python a step costs ~0.3 ms of calls where the layers' compiled graphs cost ~4 ms around the same
// products (the guards, Inductor's wrapper code, SDPA's dispatch: docs/benchmarks.md, CPU). The arithmetic is
// model.py's, in float32; the tests compare the two (tests/test_quant.py).

// one quantized layer's stored tensors: int8 [qweight int8 [N, K], scales [N]] or int4 [qweight uint8 [N, Kp/2],
// scales [N, Kp/G], mins [N, Kp/G]], and its bias
struct Product {
  at::Tensor q, scales, mins;
  std::optional<at::Tensor> bias;
  int64_t N, Kp, G;  // G = 0: int8 (Kp = K)

  Product(at::TensorList t, const std::optional<at::Tensor>& b, const char* name) : bias(b) {
    TORCH_CHECK(t.size() == 2 || t.size() == 3, "decode_layer: ", name, " needs 2 (int8) or 3 (int4) tensors");
    q = t[0], scales = t[1];
    TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && scales.is_contiguous(), "decode_layer: ", name,
                ": a contiguous [N, K] qweight and scales");
    N = q.size(0);
    if (t.size() == 2) {
      TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.numel() == N,
                  "decode_layer: ", name, ": int8 qweight [N, K] and float32 scales [N]");
      Kp = q.size(1), G = 0;
    } else {
      mins = t[2], Kp = 2 * q.size(1), G = Kp / std::max<int64_t>(scales.size(-1), 1);
      check_int4(q, scales, mins, G, name);
    }
    TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()),
                "decode_layer: ", name, ": the bias must be float32 [N]");
  }

  // Thread t of T's share of y [M, N] = x [M, Kp] W^T (+ bias): the weight rows of a contiguous range of blocks
  // (the last thread also takes the rows past the last block). x's features past the layer's own (int4's
  // padding) are zero; for int4, `xq` is x rounded to 16 bits (`quantize_x16`), made once for all threads.
  void part(const float* x, const IntX& xq, int64_t M, float* y, int t, int T) const {
    const int64_t blocks = N / ROWS, chunk = (blocks + T - 1) / T;
    const int64_t b0 = std::min(blocks, t * chunk), b1 = std::min(blocks, b0 + chunk);
    const bool last = t == T - 1;
    if (G == 0)
      int8_rows(x, M, Kp, q.data_ptr<int8_t>(), scales.data_ptr<float>(), N, y, b0, b1, last);
    else
      int4_rows(xq, M, Kp, q.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>(), G, N, y, b0, b1,
                last);
    if (bias) {
      const float* b = bias->data_ptr<float>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = b0 * ROWS; n < (last ? N : b1 * ROWS); ++n) y[m * N + n] += b[n];
    }
  }

  IntX prepare(const float* x, int64_t M) const { return G == 0 ? IntX{} : quantize_x16(x, M, Kp, G); }
};

// p[t] = e^(p[t] - most) for t < L; -> their sum
float exps(float* p, int64_t L, float most) {
  VF total = zero();
  int64_t t = 0;
  for (; t + W <= L; t += W) {
    const VF e = vexp(add(load(p + t), broadcast(-most)));
    store(p + t, e);
    total = add(total, e);
  }
  float rest = sum(total);
  for (; t < L; ++t) rest += p[t] = std::exp(p[t] - most);
  return rest;
}

// out [F] = silu(gate) * up = gate / (1 + e^-gate) * up, for gate_up [2F] (gate, then up)
void silu_mul(const float* gate_up, int64_t F, float* out) {
  int64_t f = 0;
  for (; f + W <= F; f += W) {
    const VF g = load(gate_up + f), e = vexp(mul(g, broadcast(-1.0f)));
    store(out + f, mul(div(g, add(e, broadcast(1.0f))), load(gate_up + F + f)));
  }
  for (; f < F; ++f) out[f] = gate_up[f] / (1.0f + std::exp(-gate_up[f])) * gate_up[F + f];
}

// out [C] = x / sqrt(mean(x^2) + eps) * weight (RMSNorm)
void rms_norm(const float* x, int64_t C, const float* weight, double eps, float* out) {
  const float scale = 1.0f / std::sqrt(dot(x, x, C) / C + static_cast<float>(eps));
  for (int64_t c = 0; c < C; ++c) out[c] = weight[c] * (x[c] * scale);
}

// (x_j, x_{j + D/2}) -> (x_j cos_j - x_{j + D/2} sin_j, x_{j + D/2} cos_{j + D/2} + x_j sin_{j + D/2}) (apply_rope)
void rope(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < half; ++j) {
    out[j] = x[j] * cos[j] - x[j + half] * sin[j];
    out[j + half] = x[j + half] * cos[j + half] + x[j] * sin[j + half];
  }
}

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& attention_norm, const at::Tensor& mlp_norm,
                        double eps, at::TensorList qkv_w, at::TensorList o_w, at::TensorList gate_up_w,
                        at::TensorList down_w, const c10::List<std::optional<at::Tensor>>& biases,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                        const at::Tensor& cache_k, const at::Tensor& cache_v, int64_t n_heads) {
  TORCH_CHECK(biases.size() == 4, "decode_layer: 4 biases (qkv, o, gate_up, down), each a tensor or None");
  const Product qkv(qkv_w, biases.get(0), "qkv"), o(o_w, biases.get(1), "o"), gate_up(gate_up_w, biases.get(2),
                    "gate_up"), down(down_w, biases.get(3), "down");
  TORCH_CHECK((x.dim() == 2 || (x.dim() == 3 && x.size(1) == 1)) && x.scalar_type() == at::kFloat &&
              x.is_contiguous(), "decode_layer: x must be a contiguous float32 [B, 1, C] or [B, C]");
  const int64_t B = x.size(0), C = x.size(-1), H = n_heads, K = cache_k.size(1), S = cache_k.size(2),
                D = cache_k.size(3), F = gate_up.N / 2, HD = H * D;
  TORCH_CHECK(cache_k.scalar_type() == at::kFloat && cache_k.is_contiguous() && cache_v.sizes() == cache_k.sizes() &&
              cache_v.scalar_type() == at::kFloat && cache_v.is_contiguous() && cache_k.size(0) >= B &&
              H % K == 0, "decode_layer: float32 caches [B_max >= B, K, S, D] and n_heads a multiple of K");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == B * D && sin.numel() == B * D, "decode_layer: cos and sin "
              "float32 [B, 1, D] or [B, D]");
  const at::Tensor position = positions.reshape({-1}).contiguous();
  TORCH_CHECK(position.scalar_type() == at::kLong && position.numel() == B, "decode_layer: positions int64 [B]");
  TORCH_CHECK(qkv.N == HD + 2 * K * D && qkv.Kp >= C && o.N == C && o.Kp >= HD && gate_up.Kp >= C &&
              down.N == C && down.Kp >= F && attention_norm.numel() == C && mlp_norm.numel() == C,
              "decode_layer: the layers' shapes do not fit together");
  const int64_t* pos = position.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= pos[b] && pos[b] < S, "decode_layer: position ", pos[b], " outside the cache of ", S);

  // every row's activations side by side, each padded with zeros to the next layer's input features Kp
  std::vector<float> xn(B * qkv.Kp, 0.0f), qkv_out(B * qkv.N), attn(B * o.Kp, 0.0f), hn(B * gate_up.Kp, 0.0f),
      gu(B * gate_up.N), act(B * down.Kp, 0.0f), proj(B * C);
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kp = cache_k.data_ptr<float>(), *vp = cache_v.data_ptr<float>(), *yp = y.data_ptr<float>();

  std::vector<float> q(B * HD);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  IntX xq;  // (an int4 product's x in 16 bits, made by one thread for all)
  // One team of threads for the whole block, each product split over them by weight rows, the small steps between
  // on one thread (`single`, which the others wait at); a parallel region per product measured the same
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
#pragma omp single
    {
      for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * C, C, attention_norm.data_ptr<float>(), eps, &xn[b * qkv.Kp]);
      xq = qkv.prepare(xn.data(), B);
    }
    qkv.part(xn.data(), xq, B, qkv_out.data(), t, T);
#pragma omp barrier
#pragma omp single
    for (int64_t b = 0; b < B; ++b) {  // rotate q and k; write k and v at the row's position
      const float *row = &qkv_out[b * qkv.N], *c = cp + b * D, *s = sp + b * D;
      for (int64_t h = 0; h < H; ++h) rope(row + h * D, c, s, D, &q[b * HD + h * D]);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t slot = ((b * K + k) * S + pos[b]) * D;
        rope(row + HD + k * D, c, s, D, kp + slot);
        std::copy(row + HD + K * D + k * D, row + HD + K * D + (k + 1) * D, vp + slot);
      }
    }
    std::vector<float> p;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {  // softmax(q k^T / sqrt(D)) v, a head at a time
      const int64_t b = bh / H, h = bh % H, L = pos[b] + 1;
      const float* qh = &q[bh * D];
      const float *keys = kp + (b * K + h / (H / K)) * S * D, *values = vp + (b * K + h / (H / K)) * S * D;
      p.resize(L);
      float most = -INFINITY;
      for (int64_t i = 0; i < L; ++i) most = std::max(most, p[i] = dot(qh, keys + i * D, D) * scale);
      const float total = exps(p.data(), L, most);
      float* out = &attn[b * o.Kp + h * D];
      for (int64_t i = 0; i < L; ++i) {
        const float w = p[i] / total, *v = values + i * D;
        for (int64_t d = 0; d < D; ++d) out[d] += w * v[d];
      }
    }
#pragma omp single
    xq = o.prepare(attn.data(), B);
    o.part(attn.data(), xq, B, proj.data(), t, T);
#pragma omp barrier
#pragma omp single
    {
      for (int64_t i = 0; i < B * C; ++i) yp[i] = xp[i] + proj[i];  // h, the residual stream after attention
      for (int64_t b = 0; b < B; ++b) rms_norm(yp + b * C, C, mlp_norm.data_ptr<float>(), eps, &hn[b * gate_up.Kp]);
      xq = gate_up.prepare(hn.data(), B);
    }
    gate_up.part(hn.data(), xq, B, gu.data(), t, T);
#pragma omp barrier
#pragma omp single
    {
      for (int64_t b = 0; b < B; ++b) silu_mul(&gu[b * gate_up.N], F, &act[b * down.Kp]);
      xq = down.prepare(act.data(), B);
    }
    down.part(act.data(), xq, B, proj.data(), t, T);
  }
  for (int64_t i = 0; i < B * C; ++i) yp[i] += proj[i];
  return y;
}

}  // namespace

TORCH_LIBRARY(llamaref_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group_size) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor attention_norm, Tensor mlp_norm, float eps, Tensor[] qkv, Tensor[] o, "
        "Tensor[] gate_up, Tensor[] down, Tensor?[] biases, Tensor cos, Tensor sin, Tensor positions, "
        "Tensor(a!) cache_k, Tensor(b!) cache_v, int n_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamaref_cpu, CPU, m) {  // (CPU tensors only; cpu_kernels.py gives torch.compile their shapes)
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("packed_linear", &packed_linear);
  m.impl("decode_layer", &decode_layer);
}

TORCH_LIBRARY_IMPL(llamaref_cpu, MkldnnCPU, m) {  // (the prepacked weight is a oneDNN tensor)
  m.impl("packed_linear", &packed_linear);
}

TORCH_LIBRARY_IMPL(llamaref_cpu, Autograd, m) {  // (inference only: nothing to differentiate)
  m.impl("int8_linear", torch::CppFunction::makeFallthrough());
  m.impl("int4_linear", torch::CppFunction::makeFallthrough());
  m.impl("packed_linear", torch::CppFunction::makeFallthrough());
  m.impl("decode_layer", torch::CppFunction::makeFallthrough());
}
