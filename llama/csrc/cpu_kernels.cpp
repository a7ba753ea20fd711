// Products for a few rows of x on an x86 CPU (llama/cpu_kernels.py builds this file once with the machine's own
// instruction set, loads it, and says when to use it): weight-only int8 and int4, the decode step's matrix-vector
// products of llama/quant.py's layers, reading its stored layout as it is; and oneDNN's matmul over a prepacked
// weight for a speculative verify step (packed_linear, at the end), so that a compiled graph calls it from C++.
//
//   llamaref_cpu::int8_linear(x [M, K], q int8 [N, K], scale [N]) -> y [M, N]
//       y[m, n] = scale[n] * sum_k x[m, k] q[n, k]
//   llamaref_cpu::int4_linear(x [M, Kp], qweight uint8 [N, Kp/2], scales [N, Kp/G], mins [N, Kp/G], G) -> y [M, N]
//       y[m, n] = sum_g (scales[n, g] * sum_{k in g} x[m, k] q[n, k] + mins[n, g] * sum_{k in g} x[m, k])
//       q[n, 2j] = qweight[n, j] & 15 and q[n, 2j + 1] = qweight[n, j] >> 4
//
// Everything is float32 (x, the scales, the sums). A decode step reads every weight once, so these loops are
// judged by the bytes they stream: at one row a product is a few multiply-adds a byte, and a CPU core converts
// and multiplies faster than its share of the memory bandwidth delivers bytes, but only if the bytes arrive
// early. The hardware prefetcher stops at page boundaries and ramps up slowly on each new matrix, so each block
// of rows asks for the bytes PREFETCH ahead of it in the same stream (on the 2-core EPYC of docs/benchmarks.md
// this alone took a sweep over SmolLM2's int8 matrices from 15-17 to 27-32 GB/s).
//
// Work is split over torch's own threads (at::parallel_for: torch.set_num_threads applies) by blocks of ROWS
// consecutive weight rows, which lie one after the other in memory, so each thread reads one contiguous range.
// Within a block, each of the M rows of x is multiplied by the block's weights in turn: the weights are read
// from memory once and from the L1 cache after that.
//
// int4 needs no unpacked copy: the low nibbles of W bytes are the even features 2j and the high nibbles the odd
// ones 2j + 1, so x is split once per call into its even and odd features (xe, xo), and a group's products are
// sum_j xe[j] w(b[j] & 15) + xo[j] w(b[j] >> 4) over the group's G / 2 bytes b, where w(q) = q s + mn comes,
// with AVX-512, from a table of the group's 16 weights made once per group and row (a vector permute looks up
// 16 at a time: 7-22% faster than converting q and scaling each group's sums); AVX2's 8 lanes cannot look up 16
// entries, so there q is converted, each group's sums are scaled once, and mn times the group's sum of x added.
//
// The loops are written once over a small vector vocabulary (VF: W floats; load, convert, fused multiply-add,
// sum; an int4 group's dequantizer), defined for AVX-512 and for AVX2 + FMA; the compiler's -march=native picks
// the first the CPU has.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

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
// One int4 group's 16 possible weights q s + mn, q = 0..15, as a table; a vector permute looks W of them up at
// once by the low 4 bits of each lane, so no mask and no int-to-float conversion is needed.
constexpr bool LOOKUP = true;
using Dequantizer = __m512;
inline Dequantizer dequantizer(float s, float mn) {
  const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_fmadd_ps(q, _mm512_set1_ps(s), _mm512_set1_ps(mn));
}
inline void from_u4(const uint8_t* p, Dequantizer table, VF& low, VF& high) {  // W bytes -> 2W weights
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  low = _mm512_permutexvar_ps(b, table);  // (the byte's low nibble)
  high = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}
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
// 8 lanes cannot look up 16 entries: the nibbles q are converted as they are, and int4_block scales each group's
// sums once and adds mn times the group's sum of x (LOOKUP false)
constexpr bool LOOKUP = false;
using Dequantizer = int;
inline Dequantizer dequantizer(float, float) { return 0; }
inline void from_u4(const uint8_t* p, Dequantizer, VF& low, VF& high) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  low = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  high = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#else
#error "llamaref's CPU kernels need AVX2 and FMA (or AVX-512); cpu_kernels.py falls back to PyTorch without them"
#endif

// A value loaded once and used by several rows, kept in a register: left alone, GCC folds the load into every
// multiply-add that uses it, and the loads then bound the loop.
inline VF in_register(VF v) {
  __asm__("" : "+v"(v));
  return v;
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

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check(x, q, x.size(1), "int8_linear");
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.numel() == q.size(0),
              "int8_linear: q must be int8 [N, K] and scale float32 [N]");
  const int64_t M = x.size(0), N = q.size(0), K = q.size(1), blocks = N / ROWS;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const int8_t* end = qp + N * K;
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, GRAIN, [&](int64_t begin, int64_t stop) {
    for (int64_t b = begin; b < stop; ++b) {
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
  });
  for (int64_t n = blocks * ROWS; n < N; ++n) int8_block<1>(xp, M, K, qp + n * K, sp + n, yp + n, N);
  return y;
}

// y[m, n .. n + R) for a block of R int4 weight rows starting at r (KB = Kp / 2 bytes a row); xs: x summed over
// each group, for the minimums where from_u4 gives q itself (LOOKUP false)
template <int R>
inline void int4_block(const float* xe, const float* xo, const float* xs, int64_t M, int64_t KB, int64_t G,
                       const uint8_t* r, const float* scales, const float* mins, float* y, int64_t N) {
  const int64_t groups = 2 * KB / G, GB = G / 2;  // (G / 2 bytes a group, a multiple of W)
  for (int64_t m = 0; m < M; ++m) {
    const float *xem = xe + m * KB, *xom = xo + m * KB, *xsm = xs + m * groups;
    VF acc[R], even[R], odd[R];  // (two sums a row, so that the multiply-adds do not wait for each other)
    float offset[R] = {};
    for (int i = 0; i < R; ++i) acc[i] = even[i] = odd[i] = zero();
    for (int64_t g = 0; g < groups; ++g) {
      Dequantizer group[R];
      for (int i = 0; i < R; ++i) {
        if constexpr (!LOOKUP) even[i] = odd[i] = zero();  // (the group's own sums, scaled below)
        group[i] = dequantizer(scales[i * groups + g], mins[i * groups + g]);
      }
      for (int64_t j = g * GB; j < (g + 1) * GB; j += W) {
        const VF xv = in_register(load(xem + j)), xw = in_register(load(xom + j));
        for (int i = 0; i < R; ++i) {
          VF low, high;
          from_u4(r + i * KB + j, group[i], low, high);
          even[i] = fma(xv, low, even[i]);
          odd[i] = fma(xw, high, odd[i]);
        }
      }
      if constexpr (!LOOKUP) {
        for (int i = 0; i < R; ++i) {  // s sum_k x_k q_k + mn sum_k x_k
          acc[i] = fma(add(even[i], odd[i]), broadcast(scales[i * groups + g]), acc[i]);
          offset[i] += mins[i * groups + g] * xsm[g];
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      if constexpr (LOOKUP) acc[i] = add(even[i], odd[i]);  // (the weights were looked up whole: no scaling)
      y[m * N + i] = sum(acc[i]) + offset[i];
    }
  }
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t G) {
  check(x, qweight, x.size(1) / 2, "int4_linear");
  const int64_t M = x.size(0), N = qweight.size(0), KB = qweight.size(1), Kp = 2 * KB;
  TORCH_CHECK(G % (2 * W) == 0 && Kp % G == 0, "int4_linear: group size ", G, " must divide ", Kp,
              " and be a multiple of ", 2 * W);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat &&
              mins.scalar_type() == at::kFloat && scales.is_contiguous() && mins.is_contiguous() &&
              scales.numel() == N * (Kp / G) && mins.numel() == N * (Kp / G),
              "int4_linear: qweight must be uint8 [N, Kp/2], scales and mins float32 [N, Kp/G]");
  const int64_t groups = Kp / G;
  std::vector<float> xe(M * KB), xo(M * KB), xs(M * groups, 0.0f);
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < M * KB; ++i) {
    xe[i] = xp[2 * i];
    xo[i] = xp[2 * i + 1];
    xs[i / (G / 2)] += xp[2 * i] + xp[2 * i + 1];  // (the G / 2 pairs of a group are consecutive)
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *mp = mins.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = N / ROWS, ahead = PREFETCH / KB;  // (the rows PREFETCH bytes of weights ahead)
  at::parallel_for(0, blocks, GRAIN, [&](int64_t begin, int64_t stop) {
    for (int64_t b = begin; b < stop; ++b) {
      const int64_t n = b * ROWS;
      prefetch(qp + n * KB + PREFETCH, ROWS * KB, qp + N * KB);
      prefetch(sp + (n + ahead) * groups, ROWS * groups * 4, sp + N * groups);
      prefetch(mp + (n + ahead) * groups, ROWS * groups * 4, mp + N * groups);
      int4_block<ROWS>(xe.data(), xo.data(), xs.data(), M, KB, G, qp + n * KB, sp + n * groups, mp + n * groups,
                       yp + n, N);
    }
  });
  for (int64_t n = blocks * ROWS; n < N; ++n)
    int4_block<1>(xe.data(), xo.data(), xs.data(), M, KB, G, qp + n * KB, sp + n * groups, mp + n * groups, yp + n,
                  N);
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

}  // namespace

TORCH_LIBRARY(llamaref_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamaref_cpu, CPU, m) {  // (CPU tensors only; cpu_kernels.py gives torch.compile their shapes)
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("packed_linear", &packed_linear);
}

TORCH_LIBRARY_IMPL(llamaref_cpu, MkldnnCPU, m) {  // (the prepacked weight is a oneDNN tensor)
  m.impl("packed_linear", &packed_linear);
}

TORCH_LIBRARY_IMPL(llamaref_cpu, Autograd, m) {  // (inference only: nothing to differentiate)
  m.impl("int8_linear", torch::CppFunction::makeFallthrough());
  m.impl("int4_linear", torch::CppFunction::makeFallthrough());
  m.impl("packed_linear", torch::CppFunction::makeFallthrough());
}
