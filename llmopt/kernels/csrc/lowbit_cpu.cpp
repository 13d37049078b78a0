// llmopt lowbit_cpu: fused low-bit matmul for CPUs, y = x @ W.T (+ bias), W never materialised.
//
// Weights stay at their real width in memory (2, 3, 4 or 8 bits per code) and are decoded in
// registers, 32 codes at a time (one "chunk"). Two arithmetic paths:
//
// * integer formats (int2/int3/int4/int8 affine, 4-bit codebooks such as NF4 and FP4): the
//   activations are quantized per token to int16 in blocks of XB columns (XB = the largest of 256,
//   128, 64, 32 that divides the group size; one float scale per block, range +-16383), and each
//   chunk is two AVX-512 VNNI word dot products (vpdpwssd, exact in int32) accumulated over the
//   block; one float multiply per block and one per group. With 14-bit activations the kernel
//   matches a float32 product to ~1e-4 (int8 activations, llama.cpp's Q8 way, measured ~5e-3).
//   A codebook's levels become int16 through a 16-entry table (vpermw), scaled by L so that
//   |level * L| <= 4095 (exact for FP4 with L = 12; NF4 within 1.2e-4 of the group's absmax).
//   Overflow bound: XB/8 products per int32 lane of at most 4095 * 16383: < 2^31 for XB <= 256.
// * fp8 (e4m3): activations stay float32; codes become fp16 bit patterns (a shift) and are widened
//   by vcvtph2ps, then multiplied in float32.
//
// The Python side (llmopt/kernels/lowbit_cpu.py) owns the layouts; this file only reads them:
//   int4 / 4-bit codebooks: canonical nibble packing (byte j = code 2j | code 2j+1 << 4), 16 bytes
//     per chunk; the chunk's even codes fill lanes 0-15, odd codes lanes 16-31.
//   int2: canonical packing (byte j = codes 4j..4j+3, 2 bits each), 8 bytes per chunk; lane 8q+j
//     holds code 4j+q.
//   int3: two bit planes per chunk: the low 2 bits as int2 (8 bytes), then a 32-bit word whose bit l
//     is the high bit of the code in lane l (4 bytes): 12 bytes per chunk, 3 bits per weight.
//   int8 / fp8: one byte per code, in order.
// The activations are quantized into the same lane order, so no weight is ever shuffled at run time.
//
// A portable scalar path computes the same function on CPUs without AVX-512 VNNI (slow: the Python
// side only lets kernel="auto" choose this kernel on CPUs with avx512_vnni).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

enum Kind : int64_t { K_INT2 = 0, K_INT3 = 1, K_INT4 = 2, K_INT8 = 3, K_LUT4 = 4, K_FP8 = 5 };
constexpr int CHUNK = 32;
constexpr float XQ_MAX = 16383.f;
// From this many tokens on, the weight is decoded to bf16 once and multiplied by PyTorch's GEMM.
constexpr int64_t PREFILL_TOKENS = 16;  // activation code range: 15 bits (see the overflow bound above)

inline int chunk_bytes(int64_t kind) {
  switch (kind) {
    case K_INT2: return 8;
    case K_INT3: return 12;
    case K_INT4: case K_LUT4: return 16;
    default: return 32;
  }
}

// Lane p of a chunk holds the code (and activation) of column chunk_col(kind, p) of the chunk.
inline int chunk_col(int64_t kind, int p) {
  switch (kind) {
    case K_INT4: case K_LUT4: return p < 16 ? 2 * p : 2 * (p - 16) + 1;
    case K_INT2: case K_INT3: return 4 * (p & 7) + (p >> 3);
    default: return p;
  }
}

// Code of lane p in a chunk (the scalar path).
inline int chunk_code(int64_t kind, const uint8_t* c, int p) {
  switch (kind) {
    case K_INT4: case K_LUT4: return p < 16 ? (c[p] & 0xF) : (c[p - 16] >> 4);
    case K_INT2: return (c[p & 7] >> (2 * (p >> 3))) & 3;
    case K_INT3: {
      uint32_t hi;
      std::memcpy(&hi, c + 8, 4);
      return ((c[p & 7] >> (2 * (p >> 3))) & 3) | (((hi >> p) & 1) << 2);
    }
    default: return c[p];
  }
}

enum ParamType : int { P_F32 = 0, P_BF16 = 1, P_F16 = 2 };

inline int param_type(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return P_F32;
  if (t.scalar_type() == at::kBFloat16) return P_BF16;
  if (t.scalar_type() == at::kHalf) return P_F16;
  TORCH_CHECK(false, "lowbit_cpu: scale/zero_point must be float32, bfloat16 or float16, got ", t.scalar_type());
  return P_F32;
}

inline float load_param(const void* base, int type, int64_t i) {
  if (type == P_BF16) {
    uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  if (type == P_F16) return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

inline float fp8_e4m3_value(uint8_t b) {
  int e = (b >> 3) & 0xF, m = b & 7;
  float mag = e ? std::ldexp(1.0f + m / 8.0f, e - 7) : std::ldexp(m / 8.0f, -6);
  return (b & 0x80) ? -mag : mag;
}

struct Problem {
  int64_t kind, M, N, K, Kp, G, gs, C, row_bytes;
  int64_t xb, B, bpg, cpb;  // activation block: columns, count, blocks per group, chunks per block
  const uint8_t* qdata;
  const void* scale;
  const void* zero;
  int scale_type, zero_type;
  const int16_t* lut;  // 16 int16 levels (K_LUT4)
  float unit;          // value of one code step (codebooks: 1/L)
  float offset;        // code that stands for 0 (affine: mid; codebooks: 0)
  // Prepared activations.
  const int16_t* xq;  // [M, Kp] in lane order per chunk (integer path)
  const float* xs;    // [M, B] block scales (integer path)
  const float* xcorr; // [M, G] -unit * offset * (sum of dequantized activations of the group)
  const float* xsum;  // [M, G] exact sum of the activations of each group (zero points)
  const float* xf;    // [M, Kp] float32 activations (fp8 path)
  float* y;           // [M, N] float32 output, or nullptr when the output is bfloat16
  c10::BFloat16* y16; // [M, N] bfloat16 output (bfloat16 activations)
  const float* bias;  // [N] float32 or nullptr
};

// y[m, n] = value + bias[n], in the output's dtype.
inline void store_out(const Problem& p, int64_t m, int64_t n, float value) {
  if (p.bias) value += p.bias[n];
  if (p.y) p.y[m * p.N + n] = value;
  else p.y16[m * p.N + n] = c10::BFloat16(value);
}

// Activations of every token: int16 codes per block in the chunks' lane order, block scales, and the
// per-group sums that the zero point and the code offset need. Columns past K are zero.
template <typename T>
void prepare_tokens(const T* x, Problem& p, std::vector<int16_t>& xq, std::vector<float>& xs,
                    std::vector<float>& xcorr, std::vector<float>& xsum, std::vector<float>& xf) {
  const bool integer = p.kind != K_FP8;
  at::parallel_for(0, p.M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(p.xb);
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = x + m * p.K;
      for (int64_t g = 0; g < p.G; ++g) {
        float group_sum = 0.f;
        double group_hat = 0.0;
        for (int64_t bb = 0; bb < p.bpg; ++bb) {
          const int64_t b = g * p.bpg + bb, col0 = b * p.xb;
          float amax = 0.f;
          for (int64_t i = 0; i < p.xb; ++i) {
            const int64_t col = col0 + i;
            const float v = col < p.K ? static_cast<float>(row[col]) : 0.f;
            buf[i] = v;
            group_sum += v;
            amax = std::fmax(amax, std::fabs(v));
          }
          if (!integer) {
            std::memcpy(xf.data() + m * p.Kp + col0, buf.data(), p.xb * sizeof(float));
            continue;
          }
          const float s = amax / XQ_MAX;
          const float inv = amax > 0.f ? XQ_MAX / amax : 0.f;
          int64_t total = 0;
          for (int64_t c0 = 0; c0 < p.xb; c0 += CHUNK) {
            int16_t* dst = xq.data() + m * p.Kp + col0 + c0;
            for (int lane = 0; lane < CHUNK; ++lane) {
              float q = std::nearbyint(buf[c0 + chunk_col(p.kind, lane)] * inv);
              q = q > XQ_MAX ? XQ_MAX : (q < -XQ_MAX ? -XQ_MAX : q);
              dst[lane] = static_cast<int16_t>(q);
              total += static_cast<int64_t>(q);
            }
          }
          xs[m * p.B + b] = s;
          group_hat += static_cast<double>(s) * static_cast<double>(total);
        }
        xsum[m * p.G + g] = group_sum;
        if (integer) xcorr[m * p.G + g] = static_cast<float>(-p.unit * p.offset * group_hat);
      }
    }
  });
}

// sum_g a[g] * b[g] (vectorised by the compiler).
inline float dot_g(const float* a, const float* b, int64_t G) {
  float acc = 0.f;
  for (int64_t g = 0; g < G; ++g) acc += a[g] * b[g];
  return acc;
}

// Per-row parameters as float32: scale[R][G] and zero[R][G] of rows n0 .. n0+R-1.
inline void load_row_params(const Problem& p, int64_t n0, int R, float* sc, float* zc) {
  for (int r = 0; r < R; ++r) {
    for (int64_t g = 0; g < p.G; ++g) sc[r * p.G + g] = load_param(p.scale, p.scale_type, (n0 + r) * p.G + g);
    if (p.zero) {
      for (int64_t g = 0; g < p.G; ++g) zc[r * p.G + g] = load_param(p.zero, p.zero_type, (n0 + r) * p.G + g);
    }
  }
}

// Zero-point and code-offset terms of y[m, n] for row r of a tile.
inline float tile_correction(const Problem& p, const float* sc, const float* zc, int r, int64_t m) {
  float acc = p.kind == K_FP8 ? 0.f : dot_g(sc + r * p.G, p.xcorr + m * p.G, p.G);
  if (p.zero) acc += dot_g(zc + r * p.G, p.xsum + m * p.G, p.G);
  return acc;
}

// ------------------------------------------------------------------------------ scalar path
void rows_scalar(const Problem& p, int64_t n0, int64_t n1) {
  std::vector<float> sc(p.G), zc(p.zero ? p.G : 0);
  const int cb = chunk_bytes(p.kind);
  for (int64_t n = n0; n < n1; ++n) {
    load_row_params(p, n, 1, sc.data(), zc.data());
    const uint8_t* row = p.qdata + n * p.row_bytes;
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < p.G; ++g) {
        float gacc = 0.f;
        for (int64_t bb = 0; bb < p.bpg; ++bb) {
          const int64_t b = g * p.bpg + bb;
          int64_t iacc = 0;
          float facc = 0.f;
          for (int64_t cc = 0; cc < p.cpb; ++cc) {
            const int64_t c = b * p.cpb + cc;
            const uint8_t* chunk = row + c * cb;
            for (int lane = 0; lane < CHUNK; ++lane) {
              if (p.kind == K_FP8) {
                facc += fp8_e4m3_value(chunk[lane]) * p.xf[m * p.Kp + c * CHUNK + lane];
                continue;
              }
              int code = chunk_code(p.kind, chunk, lane);
              if (p.kind == K_LUT4) code = p.lut[code];
              iacc += static_cast<int64_t>(code) * p.xq[m * p.Kp + c * CHUNK + lane];
            }
          }
          gacc += p.kind == K_FP8 ? facc : static_cast<float>(iacc) * p.xs[m * p.B + b];
        }
        acc += gacc * sc[g];
      }
      store_out(p, m, n, p.unit * acc + tile_correction(p, sc.data(), zc.data(), 0, m));
    }
  }
}

// ------------------------------------------------------------------------------ AVX-512 path
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 codes of one chunk as two vectors of 16 int16 (lanes 0-15, 16-31; see the layout notes).
template <int64_t KIND>
inline void chunk_words(const uint8_t* c, __m256i table, __m256i& lo, __m256i& hi) {
  if constexpr (KIND == K_INT8) {
    lo = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    hi = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)));
  } else if constexpr (KIND == K_INT2 || KIND == K_INT3) {
    int64_t word;
    std::memcpy(&word, c, 8);
    const __m256i v = _mm256_cvtepu8_epi16(_mm_set1_epi64x(word));
    const __m256i three = _mm256_set1_epi16(3);
    lo = _mm256_and_si256(_mm256_srlv_epi16(v, _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2)), three);
    hi = _mm256_and_si256(_mm256_srlv_epi16(v, _mm256_setr_epi16(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6)), three);
    if constexpr (KIND == K_INT3) {
      uint32_t bits;
      std::memcpy(&bits, c + 8, 4);
      const __m256i four = _mm256_set1_epi16(4);
      lo = _mm256_mask_add_epi16(lo, static_cast<__mmask16>(bits), lo, four);
      hi = _mm256_mask_add_epi16(hi, static_cast<__mmask16>(bits >> 16), hi, four);
    }
  } else {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    hi = _mm256_srli_epi16(v, 4);
    if constexpr (KIND == K_LUT4) {
      lo = _mm256_permutexvar_epi16(lo, table);
      hi = _mm256_permutexvar_epi16(hi, table);
    }
  }
}

// int2 read two chunks (64 codes, 16 bytes) at a time when blocks hold whole pairs: one widening load
// and immediate shifts give 4 vectors of 16 codes, vector q holding codes 4j+q of the first chunk in
// lanes 0-7 and of the second in lanes 8-15 (4 instructions per chunk instead of 6). The activations
// are laid out to match (prepare_row_avx512); both chunks belong to the same activation block.
inline bool int2_pairs(const Problem& p) { return p.kind == K_INT2 && p.cpb % 2 == 0; }

inline void pair_words_int2(const uint8_t* c, __m256i* v) {
  const __m256i t = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  const __m256i three = _mm256_set1_epi16(3);
  v[0] = _mm256_and_si256(t, three);
  v[1] = _mm256_and_si256(_mm256_srli_epi16(t, 2), three);
  v[2] = _mm256_and_si256(_mm256_srli_epi16(t, 4), three);
  v[3] = _mm256_srli_epi16(t, 6);
}

// One tile: rows n0 .. n0+R-1 x tokens m0 .. m0+T-1, integer path. Each decoded chunk serves T tokens,
// each activation chunk R rows; R*T independent accumulators keep the pipes busy.
template <int64_t KIND, int R, int T>
void tile_int_avx512(const Problem& p, int64_t n0, int64_t m0, const float* sc, const float* zc) {
  const int cb = chunk_bytes(KIND);
  const __m256i table = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.lut));
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = p.qdata + (n0 + r) * p.row_bytes;
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    __m256 gacc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) gacc[r][t] = _mm256_setzero_ps();
    for (int64_t bb = 0; bb < p.bpg; ++bb) {
      const int64_t b = g * p.bpg + bb;
      // Two integer accumulators per (row, token): halves the dependency chain of vpdpwssd.
      __m256i iacc[R][T], iacc2[R][T];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) iacc[r][t] = iacc2[r][t] = _mm256_setzero_si256();
      for (int64_t cc = 0; cc < p.cpb; ++cc) {
        const int64_t c = b * p.cpb + cc;
        __m256i lo[R], hi[R];
        for (int r = 0; r < R; ++r) chunk_words<KIND>(rows[r] + c * cb, table, lo[r], hi[r]);
        for (int t = 0; t < T; ++t) {
          const int16_t* xq = p.xq + (m0 + t) * p.Kp + c * CHUNK;
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
          for (int r = 0; r < R; ++r) {
            iacc[r][t] = _mm256_dpwssd_epi32(iacc[r][t], lo[r], x0);
            iacc2[r][t] = _mm256_dpwssd_epi32(iacc2[r][t], hi[r], x1);
          }
        }
      }
      for (int t = 0; t < T; ++t) {
        const __m256 sx = _mm256_set1_ps(p.xs[(m0 + t) * p.B + b]);
        for (int r = 0; r < R; ++r) {
          const __m256i sum = _mm256_add_epi32(iacc[r][t], iacc2[r][t]);
          gacc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), sx, gacc[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(sc[r * p.G + g]);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(gacc[r][t], s, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      const int64_t m = m0 + t;
      store_out(p, m, n0 + r, p.unit * hsum256(acc[r][t]) + tile_correction(p, sc, zc, r, m));
    }
}

// Lane sums of 8 int32 vectors: out[j] = sum of the lanes of v[j].
inline __m256i reduce8_epi32(const __m256i* v) {
  const __m256i a0 = _mm256_hadd_epi32(v[0], v[1]), a1 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i a2 = _mm256_hadd_epi32(v[4], v[5]), a3 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3);
  return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Decode tile (one token, R rows) for groups of at most 256 columns (one activation block per group).
// The per-group float work is what limits small groups, so it is done 8 groups at a time: the 8
// integer group dots of a row are reduced to one vector and scaled by 8 (weight scale x activation
// scale) products at once, instead of a convert and two FMAs per group.
template <int64_t KIND, int R, int CPG>
void tile_decode_avx512(const Problem& p, int64_t n0, int64_t m, const float* sc, const float* zc) {
  constexpr int cb = KIND == K_INT2 ? 8 : (KIND == K_INT3 ? 12 : (KIND == K_INT8 ? 32 : 16));
  const __m256i table = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.lut));
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = p.qdata + (n0 + r) * p.row_bytes;
  const int16_t* xrow = p.xq + m * p.Kp;
  const float* xs = p.xs + m * p.B;
  // Batches run over activation blocks (one per group when groups have <= 256 columns); a block's
  // coefficient is its group's weight scale times its activation scale.
  const int64_t bpg = p.bpg;
  __m256 acc[R];
  float rest[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    rest[r] = 0.f;
  }
  int64_t g = 0;  // block index
  // Bytes of one 8-group batch of a row, and how far ahead of it to prefetch: the hardware prefetcher
  // alone leaves the decode loop waiting on DRAM (measured: 0.8 ms vs 0.46 ms warm, 4096^2 int4 g64).
  constexpr int64_t batch_bytes = 8 * CPG * cb;
  constexpr int64_t ahead = 2048;
  for (; g + 8 <= p.B; g += 8) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* next = rows[r] + g * CPG * cb + ahead;
      for (int64_t line = 0; line < batch_bytes; line += 64) _mm_prefetch(reinterpret_cast<const char*>(next + line), _MM_HINT_T0);
    }
    __m256i iacc[R][8];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) iacc[r][j] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if constexpr (KIND == K_INT2 && CPG % 2 == 0) {
#pragma GCC unroll 8
        for (int cc = 0; cc < CPG; cc += 2) {
          const int64_t c = (g + j) * CPG + cc;
          const int16_t* xp = xrow + c * CHUNK;
          __m256i xv[4];
          for (int q = 0; q < 4; ++q) xv[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16 * q));
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            __m256i v[4];
            pair_words_int2(rows[r] + c * cb, v);
            for (int q = 0; q < 4; ++q) iacc[r][j] = _mm256_dpwssd_epi32(iacc[r][j], v[q], xv[q]);
          }
        }
      } else {
#pragma GCC unroll 8
        for (int cc = 0; cc < CPG; ++cc) {
          const int64_t c = (g + j) * CPG + cc;
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrow + c * CHUNK));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrow + c * CHUNK + 16));
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            __m256i lo, hi;
            chunk_words<KIND>(rows[r] + c * cb, table, lo, hi);
            iacc[r][j] = _mm256_dpwssd_epi32(iacc[r][j], lo, x0);
            iacc[r][j] = _mm256_dpwssd_epi32(iacc[r][j], hi, x1);
          }
        }
      }
    }
    const __m256 sx = _mm256_loadu_ps(xs + g);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* srow = sc + r * p.G;
      const __m256 wscale = bpg == 1 ? _mm256_loadu_ps(srow + g)
          : _mm256_setr_ps(srow[(g + 0) / bpg], srow[(g + 1) / bpg], srow[(g + 2) / bpg], srow[(g + 3) / bpg],
                           srow[(g + 4) / bpg], srow[(g + 5) / bpg], srow[(g + 6) / bpg], srow[(g + 7) / bpg]);
      const __m256 coef = _mm256_mul_ps(wscale, sx);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8_epi32(iacc[r])), coef, acc[r]);
    }
  }
  for (; g < p.B; ++g) {
    __m256i iacc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) iacc[r] = _mm256_setzero_si256();
    if constexpr (KIND == K_INT2 && CPG % 2 == 0) {
      for (int cc = 0; cc < CPG; cc += 2) {
        const int64_t c = g * CPG + cc;
        const int16_t* xp = xrow + c * CHUNK;
        for (int r = 0; r < R; ++r) {
          __m256i v[4];
          pair_words_int2(rows[r] + c * cb, v);
          for (int q = 0; q < 4; ++q) {
            iacc[r] = _mm256_dpwssd_epi32(iacc[r], v[q],
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16 * q)));
          }
        }
      }
    } else {
#pragma GCC unroll 8
      for (int cc = 0; cc < CPG; ++cc) {
        const int64_t c = g * CPG + cc;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrow + c * CHUNK));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrow + c * CHUNK + 16));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          __m256i lo, hi;
          chunk_words<KIND>(rows[r] + c * cb, table, lo, hi);
          iacc[r] = _mm256_dpwssd_epi32(iacc[r], lo, x0);
          iacc[r] = _mm256_dpwssd_epi32(iacc[r], hi, x1);
        }
      }
    }
    for (int r = 0; r < R; ++r) rest[r] += static_cast<float>(hsum_epi32(iacc[r])) * sc[r * p.G + g / bpg] * xs[g];
  }
  for (int r = 0; r < R; ++r) {
    store_out(p, m, n0 + r, p.unit * (hsum256(acc[r]) + rest[r]) + tile_correction(p, sc, zc, r, m));
  }
}

// fp8 e4m3 codes -> float32, 16 at a time: the e4m3 bits moved into an fp16 bit pattern whose value
// is the e4m3 value * 2^-8 (exponent bias 15 instead of 7; subnormals map to fp16 subnormals, which
// vcvtph2ps widens exactly). The 2^8 is folded into the group scale.
inline __m512 fp8x16(const uint8_t* c) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  const __m256i mag = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7);
  const __m256i sign = _mm256_and_si256(_mm256_slli_epi16(w, 8), _mm256_set1_epi16(static_cast<short>(0x8000)));
  return _mm512_cvtph_ps(_mm256_or_si256(mag, sign));
}

template <int R, int T>
void tile_fp8_avx512(const Problem& p, int64_t n0, int64_t m0, const float* sc, const float* zc) {
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = p.qdata + (n0 + r) * p.row_bytes;
  const int64_t cpg = p.gs / CHUNK;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 gacc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) gacc[r][t] = _mm512_setzero_ps();
    for (int64_t cc = 0; cc < cpg; ++cc) {
      const int64_t c = g * cpg + cc;
      __m512 w0[R], w1[R];
      for (int r = 0; r < R; ++r) {
        w0[r] = fp8x16(rows[r] + c * CHUNK);
        w1[r] = fp8x16(rows[r] + c * CHUNK + 16);
      }
      for (int t = 0; t < T; ++t) {
        const float* xf = p.xf + (m0 + t) * p.Kp + c * CHUNK;
        const __m512 x0 = _mm512_loadu_ps(xf), x1 = _mm512_loadu_ps(xf + 16);
        for (int r = 0; r < R; ++r) {
          gacc[r][t] = _mm512_fmadd_ps(w0[r], x0, gacc[r][t]);
          gacc[r][t] = _mm512_fmadd_ps(w1[r], x1, gacc[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(256.f * sc[r * p.G + g]);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(gacc[r][t], s, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      const int64_t m = m0 + t;
      store_out(p, m, n0 + r, _mm512_reduce_add_ps(acc[r][t]) + tile_correction(p, sc, zc, r, m));
    }
}

template <int64_t KIND, int R>
void decode_cpg(const Problem& p, int64_t n0, int64_t m, const float* sc, const float* zc) {
  switch (p.cpb) {
    case 1: tile_decode_avx512<KIND, R, 1>(p, n0, m, sc, zc); break;
    case 2: tile_decode_avx512<KIND, R, 2>(p, n0, m, sc, zc); break;
    case 4: tile_decode_avx512<KIND, R, 4>(p, n0, m, sc, zc); break;
    default: tile_decode_avx512<KIND, R, 8>(p, n0, m, sc, zc); break;
  }
}

// Rows per decode tile: 1 (default) or 2 (LLMOPT_LOWBIT_DECODE_ROWS=2, read once). One row at a
// time reads each thread's share of the weight as one sequential stream; measured on the AMD EPYC,
// 4096x4096 int4 g64 from DRAM: 0.49 ms with 1 row, 0.60-0.66 ms with 2 (two streams 2 KiB apart).
int decode_rows() {
  static const int rows = [] {
    const char* env = std::getenv("LLMOPT_LOWBIT_DECODE_ROWS");
    return (env && env[0] == '2') ? 2 : 1;
  }();
  return rows;
}

// Decode tiles of DECODE_ROWS rows (8 integer accumulators per row stay in registers).
inline bool decode_batched(const Problem& p) {
  return p.kind != K_FP8 && (p.cpb == 1 || p.cpb == 2 || p.cpb == 4 || p.cpb == 8);
}

template <int R>
void dispatch_decode(const Problem& p, int64_t n0, int64_t m, const float* sc, const float* zc) {
  switch (p.kind) {
    case K_INT2: decode_cpg<K_INT2, R>(p, n0, m, sc, zc); break;
    case K_INT3: decode_cpg<K_INT3, R>(p, n0, m, sc, zc); break;
    case K_INT4: decode_cpg<K_INT4, R>(p, n0, m, sc, zc); break;
    case K_INT8: decode_cpg<K_INT8, R>(p, n0, m, sc, zc); break;
    default: decode_cpg<K_LUT4, R>(p, n0, m, sc, zc); break;
  }
}

template <int R, int T>
void dispatch_tile(const Problem& p, int64_t n0, int64_t m0, const float* sc, const float* zc) {
  switch (p.kind) {
    case K_INT2: tile_int_avx512<K_INT2, R, T>(p, n0, m0, sc, zc); break;
    case K_INT3: tile_int_avx512<K_INT3, R, T>(p, n0, m0, sc, zc); break;
    case K_INT4: tile_int_avx512<K_INT4, R, T>(p, n0, m0, sc, zc); break;
    case K_INT8: tile_int_avx512<K_INT8, R, T>(p, n0, m0, sc, zc); break;
    case K_LUT4: tile_int_avx512<K_LUT4, R, T>(p, n0, m0, sc, zc); break;
    default: tile_fp8_avx512<R, T>(p, n0, m0, sc, zc); break;
  }
}

// All tokens of rows n0 .. n0+R-1: tiles of TMAX tokens, then 2, then 1.
template <int R, int TMAX>
void row_tile(const Problem& p, int64_t n0, const float* sc, const float* zc) {
  int64_t m = 0;
  for (; m + TMAX <= p.M; m += TMAX) dispatch_tile<R, TMAX>(p, n0, m, sc, zc);
  if constexpr (TMAX > 2) {
    for (; m + 2 <= p.M; m += 2) dispatch_tile<R, 2>(p, n0, m, sc, zc);
  }
  for (; m < p.M; ++m) dispatch_tile<R, 1>(p, n0, m, sc, zc);
}

// Rows [n0, n1) for every token, 2 rows per tile. Decode (M < 4): one token at a time; prefill:
// 4 tokens per tile share each decoded chunk.
void rows_avx512(const Problem& p, int64_t n0, int64_t n1) {
  std::vector<float> sc(4 * p.G), zc(p.zero ? 4 * p.G : 0);
  const bool decode = p.M < PREFILL_TOKENS;  // each token on the GEMV path (the row stays in L1)
  int64_t n = n0;
  if (decode && decode_batched(p)) {
    const int rows = decode_rows();
    for (; n + rows <= n1; n += rows) {
      load_row_params(p, n, rows, sc.data(), zc.data());
      for (int64_t m = 0; m < p.M; ++m) {
        if (rows == 2) dispatch_decode<2>(p, n, m, sc.data(), zc.data());
        else dispatch_decode<1>(p, n, m, sc.data(), zc.data());
      }
    }
    // A last odd row stays on the batched path too (the activations are laid out for it).
    for (; n < n1; ++n) {
      load_row_params(p, n, 1, sc.data(), zc.data());
      for (int64_t m = 0; m < p.M; ++m) dispatch_decode<1>(p, n, m, sc.data(), zc.data());
    }
  }
  const int R = decode ? 4 : 2;
  for (; n + R <= n1; n += R) {
    load_row_params(p, n, R, sc.data(), zc.data());
    if (decode) row_tile<4, 1>(p, n, sc.data(), zc.data());
    else row_tile<2, 4>(p, n, sc.data(), zc.data());
  }
  for (; n < n1; ++n) {
    load_row_params(p, n, 1, sc.data(), zc.data());
    row_tile<1, 4>(p, n, sc.data(), zc.data());
  }
}

// Activations of token m (already float32, Kp columns, zero-padded) for the integer path, vectorised:
// block absmax, then per chunk a lane permutation (vpermt2ps), a scale, a round to nearest even and a
// saturating pack to int16. Same results as the scalar loop in prepare_tokens.
void prepare_row_avx512(const float* buf, const Problem& p, int64_t m, int16_t* xq, float* xs, float* xcorr,
                        float* xsum) {
  alignas(64) int32_t lo_idx[16], hi_idx[16];
  for (int lane = 0; lane < 16; ++lane) {
    lo_idx[lane] = chunk_col(p.kind, lane);
    hi_idx[lane] = chunk_col(p.kind, lane + 16);
  }
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_load_si512(hi_idx);
  const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const bool pair = int2_pairs(p);
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 group_sum = _mm512_setzero_ps();
    double group_hat = 0.0;
    for (int64_t bb = 0; bb < p.bpg; ++bb) {
      const int64_t b = g * p.bpg + bb, col0 = b * p.xb;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t i = 0; i < p.xb; i += 16) {
        const __m512 v = _mm512_loadu_ps(buf + col0 + i);
        amax = _mm512_max_ps(amax, _mm512_and_ps(v, sign_mask));
        group_sum = _mm512_add_ps(group_sum, v);
      }
      const float top = _mm512_reduce_max_ps(amax);
      const float s = top / XQ_MAX;
      const __m512 inv = _mm512_set1_ps(top > 0.f ? XQ_MAX / top : 0.f);
      __m512 qsum = _mm512_setzero_ps();
      for (int64_t c0 = 0; c0 < p.xb; c0 += CHUNK) {
        const __m512 a = _mm512_loadu_ps(buf + col0 + c0), bvec = _mm512_loadu_ps(buf + col0 + c0 + 16);
        const __m512 qlo = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_permutex2var_ps(a, ilo, bvec), inv),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 qhi = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_permutex2var_ps(a, ihi, bvec), inv),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        qsum = _mm512_add_ps(qsum, _mm512_add_ps(qlo, qhi));
        const __m256i wlo = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(qlo));
        const __m256i whi = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(qhi));
        if (pair) {
          // int2 chunk pairs (see pair_words_int2): groups of 8 lanes interleaved with the other chunk's.
          const int64_t col = col0 + c0, half = (col >> 5) & 1;
          int16_t* base = xq + m * p.Kp + (col & ~int64_t(63)) + 8 * half;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(base), _mm256_castsi256_si128(wlo));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(base + 16), _mm256_extracti128_si256(wlo, 1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(base + 32), _mm256_castsi256_si128(whi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(base + 48), _mm256_extracti128_si256(whi, 1));
        } else {
          int16_t* dst = xq + m * p.Kp + col0 + c0;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), wlo);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), whi);
        }
      }
      xs[m * p.B + b] = s;
      group_hat += static_cast<double>(s) * static_cast<double>(_mm512_reduce_add_ps(qsum));
    }
    xsum[m * p.G + g] = _mm512_reduce_add_ps(group_sum);
    xcorr[m * p.G + g] = static_cast<float>(-p.unit * p.offset * group_hat);
  }
}

// ------------------------------------------------------------------------------ prefill
// For many tokens a dense bfloat16 GEMM (AVX512-BF16 dot products) does 4x more multiply-adds per
// instruction than the int16 dot products above, so prefill decodes the weight once into a bf16
// buffer, in the chunks' lane order, and hands it to PyTorch's GEMM with the activations permuted to
// the same order. Precision is then bf16, like PyTorch's int4 kernel and bf16 dense.

inline __m256i f32_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

template <int64_t KIND>
void dequant_rows_avx512(const Problem& p, int64_t n0, int64_t n1, uint16_t* w) {
  constexpr int cb = KIND == K_INT2 ? 8 : (KIND == K_INT3 ? 12 : (KIND == K_INT4 || KIND == K_LUT4 ? 16 : 32));
  const __m256i table = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.lut));
  const int64_t cpg = p.gs / CHUNK;
  std::vector<float> sc(p.G), zc(p.zero ? p.G : 0);
  for (int64_t n = n0; n < n1; ++n) {
    load_row_params(p, n, 1, sc.data(), zc.data());
    const uint8_t* row = p.qdata + n * p.row_bytes;
    uint16_t* out = w + n * p.Kp;
    for (int64_t g = 0; g < p.G; ++g) {
      const float step = KIND == K_FP8 ? 256.f * sc[g] : p.unit * sc[g];
      const __m512 s = _mm512_set1_ps(step);
      // value = (code - offset) * step + zero  ==  code * step + (zero - offset * step)
      const __m512 base = _mm512_set1_ps((p.zero ? zc[g] : 0.f) - (KIND == K_FP8 ? 0.f : p.offset * step));
      for (int64_t cc = 0; cc < cpg; ++cc) {
        const int64_t c = g * cpg + cc;
        __m512 v0, v1;
        if constexpr (KIND == K_FP8) {
          v0 = _mm512_fmadd_ps(fp8x16(row + c * cb), s, base);
          v1 = _mm512_fmadd_ps(fp8x16(row + c * cb + 16), s, base);
        } else {
          __m256i lo, hi;
          chunk_words<KIND>(row + c * cb, table, lo, hi);
          v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(lo)), s, base);
          v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(hi)), s, base);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * CHUNK), f32_to_bf16(v0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * CHUNK + 16), f32_to_bf16(v1));
      }
    }
  }
}

void dequant_avx512(const Problem& p, int64_t n0, int64_t n1, uint16_t* w) {
  switch (p.kind) {
    case K_INT2: dequant_rows_avx512<K_INT2>(p, n0, n1, w); break;
    case K_INT3: dequant_rows_avx512<K_INT3>(p, n0, n1, w); break;
    case K_INT4: dequant_rows_avx512<K_INT4>(p, n0, n1, w); break;
    case K_INT8: dequant_rows_avx512<K_INT8>(p, n0, n1, w); break;
    case K_LUT4: dequant_rows_avx512<K_LUT4>(p, n0, n1, w); break;
    default: dequant_rows_avx512<K_FP8>(p, n0, n1, w); break;
  }
}

#pragma GCC pop_options

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

int64_t activation_block(int64_t group_size) {
  for (int64_t xb : {256, 128, 64, 32}) {
    if (group_size % xb == 0) return xb;
  }
  return CHUNK;
}

// isa: 0 = best available, 1 = force the scalar path (tests), 2 = require AVX-512 VNNI.
at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& lut, int64_t kind, int64_t group_size, int64_t out_features,
                     double unit, double offset, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && qdata.device().is_cpu(), "lowbit_cpu: CPU tensors only");
  TORCH_CHECK(kind >= K_INT2 && kind <= K_FP8, "lowbit_cpu: unknown kind ", kind);
  TORCH_CHECK(x.dim() == 2, "lowbit_cpu: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "lowbit_cpu: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 2 && qdata.is_contiguous(),
              "lowbit_cpu: qdata must be contiguous uint8 [N, bytes]");
  TORCH_CHECK(group_size > 0 && group_size % CHUNK == 0, "lowbit_cpu: group_size must be a multiple of 32");
  Problem p{};
  p.kind = kind;
  p.M = x.size(0);
  p.K = x.size(1);
  p.N = out_features;
  p.gs = group_size;
  p.G = (p.K + group_size - 1) / group_size;
  p.Kp = p.G * group_size;
  p.C = p.Kp / CHUNK;
  p.xb = activation_block(group_size);
  p.B = p.Kp / p.xb;
  p.bpg = group_size / p.xb;
  p.cpb = p.xb / CHUNK;
  p.row_bytes = p.C * chunk_bytes(kind);
  TORCH_CHECK(qdata.size(0) == p.N && qdata.size(1) == p.row_bytes, "lowbit_cpu: qdata has shape ",
              qdata.sizes(), ", expected [", p.N, ", ", p.row_bytes, "]");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == p.N && scale.size(1) == p.G && scale.is_contiguous(),
              "lowbit_cpu: scale must be contiguous [N, G]");
  TORCH_CHECK(lut.scalar_type() == at::kShort && lut.numel() == 16 && lut.is_contiguous(),
              "lowbit_cpu: lut must be 16 contiguous int16");
  p.qdata = qdata.data_ptr<uint8_t>();
  p.scale = scale.data_ptr();
  p.scale_type = param_type(scale);
  at::Tensor zero;
  if (zero_point.has_value() && zero_point->defined()) {
    zero = *zero_point;
    TORCH_CHECK(zero.dim() == 2 && zero.size(0) == p.N && zero.size(1) == p.G && zero.is_contiguous(),
                "lowbit_cpu: zero_point must be contiguous [N, G]");
    p.zero = zero.data_ptr();
    p.zero_type = param_type(zero);
  }
  p.lut = lut.data_ptr<int16_t>();
  p.unit = static_cast<float>(unit);
  p.offset = static_cast<float>(offset);

  const at::Tensor xc = x.contiguous();
  const bool integer = kind != K_FP8;
  static const bool has_avx512 = cpu_has_avx512_vnni();
  TORCH_CHECK(isa != 2 || has_avx512, "lowbit_cpu: this CPU has no AVX-512 VNNI");
  const bool fast = has_avx512 && isa != 1;
  if (fast && p.M >= PREFILL_TOKENS) {
    // Activations permuted to the chunks' lane order (zero pad), bf16, transposed for the GEMM below.
    at::Tensor xl = at::zeros({p.M, p.Kp}, x.options().dtype(at::kBFloat16));
    const at::Tensor xb = xc.to(at::kBFloat16);
    const uint16_t* src = reinterpret_cast<const uint16_t*>(xb.data_ptr());
    uint16_t* dst = reinterpret_cast<uint16_t*>(xl.data_ptr());
    int col[CHUNK];
    for (int lane = 0; lane < CHUNK; ++lane) col[lane] = chunk_col(kind, lane);
    at::parallel_for(0, p.M, 4, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        for (int64_t c0 = 0; c0 < p.Kp; c0 += CHUNK) {
          for (int lane = 0; lane < CHUNK; ++lane) {
            const int64_t k = c0 + col[lane];
            if (k < p.K) dst[m * p.Kp + c0 + lane] = src[m * p.K + k];
          }
        }
      }
    });
    // The weight is decoded in blocks of rows into a reused buffer of about 1 MiB (no page faults,
    // stays in cache), each block multiplied right away: y^T[rows] = W[rows] @ x^T.
    const int64_t block = std::max<int64_t>(16, std::min<int64_t>(p.N, ((1 << 19) / p.Kp + 15) / 16 * 16));
    thread_local at::Tensor wbuf;
    if (!wbuf.defined() || wbuf.numel() < block * p.Kp) wbuf = at::empty({block * p.Kp}, x.options().dtype(at::kBFloat16));
    at::Tensor yt = at::empty({p.N, p.M}, x.options().dtype(at::kBFloat16));
    const at::Tensor xt = xl.t();
    uint16_t* wp = reinterpret_cast<uint16_t*>(wbuf.data_ptr());
    for (int64_t n0 = 0; n0 < p.N; n0 += block) {
      const int64_t nb = std::min(block, p.N - n0);
      // Decode rows n0 .. n0+nb into the buffer (row r of the block at wp + r * Kp).
      at::parallel_for(0, nb, 8, [&](int64_t r0, int64_t r1) { dequant_avx512(p, n0 + r0, n0 + r1, wp - n0 * p.Kp); });
      at::Tensor wblock = wbuf.narrow(0, 0, nb * p.Kp).view({nb, p.Kp});
      at::Tensor out = yt.narrow(0, n0, nb);
      at::mm_out(out, wblock, xt);
    }
    at::Tensor y = yt.t();
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->numel() == p.N, "lowbit_cpu: bias has ", bias->numel(), " elements, expected ", p.N);
      return y.to(at::kFloat).add_(bias->to(at::kFloat)).to(x.scalar_type()).contiguous();
    }
    return y.to(x.scalar_type()).contiguous();
  }
  // Per-thread scratch, reused across calls (no allocation in the steady state).
  thread_local std::vector<int16_t> xq;
  thread_local std::vector<float> xs, xcorr, xsum, xf;
  xq.resize(integer ? p.M * p.Kp : 0);
  xs.resize(integer ? p.M * p.B : 0);
  xcorr.resize(integer ? p.M * p.G : 0);
  xsum.resize(p.M * p.G);
  xf.resize(integer ? 0 : p.M * p.Kp);
  if (fast && integer) {
    const bool is_f32 = x.scalar_type() == at::kFloat;
    const float* xf32 = is_f32 ? xc.data_ptr<float>() : nullptr;
    const c10::BFloat16* xb16 = is_f32 ? nullptr : reinterpret_cast<const c10::BFloat16*>(xc.data_ptr());
    // Raw pointers: inside the lambda, a worker thread would see its own (empty) thread_local vectors.
    int16_t* xq_ptr = xq.data();
    float *xs_ptr = xs.data(), *xcorr_ptr = xcorr.data(), *xsum_ptr = xsum.data();
    at::parallel_for(0, p.M, 1, [&](int64_t m0, int64_t m1) {
      std::vector<float> buf(p.Kp, 0.f);
      for (int64_t m = m0; m < m1; ++m) {
        if (is_f32) std::memcpy(buf.data(), xf32 + m * p.K, p.K * sizeof(float));
        else for (int64_t k = 0; k < p.K; ++k) buf[k] = static_cast<float>(xb16[m * p.K + k]);
        prepare_row_avx512(buf.data(), p, m, xq_ptr, xs_ptr, xcorr_ptr, xsum_ptr);
      }
    });
  } else if (x.scalar_type() == at::kFloat) {
    prepare_tokens(xc.data_ptr<float>(), p, xq, xs, xcorr, xsum, xf);
  } else {
    prepare_tokens(reinterpret_cast<const c10::BFloat16*>(xc.data_ptr()), p, xq, xs, xcorr, xsum, xf);
  }
  p.xq = xq.data();
  p.xs = xs.data();
  p.xcorr = xcorr.data();
  p.xsum = xsum.data();
  p.xf = xf.data();

  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == p.N, "lowbit_cpu: bias has ", bias->numel(), " elements, expected ", p.N);
    bias_f = bias->to(at::kFloat).contiguous();
    p.bias = bias_f.data_ptr<float>();
  }
  at::Tensor y = at::empty({p.M, p.N}, x.options());
  if (x.scalar_type() == at::kFloat) p.y = y.data_ptr<float>();
  else p.y16 = reinterpret_cast<c10::BFloat16*>(y.data_ptr());
  // Grain: at least 16 rows per task so tiny layers do not pay for waking every thread.
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    if (fast) rows_avx512(p, n0, n1);
    else rows_scalar(p, n0, n1);
  });
  return y;
}

bool has_fast_path() { return cpu_has_avx512_vnni(); }

}  // namespace

TORCH_LIBRARY(llmopt_lowbit, m) {
  m.def("mm(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, Tensor? bias, Tensor lut, int kind, "
        "int group_size, int out_features, float unit, float offset, int isa) -> Tensor");
  m.def("has_fast_path() -> bool", &has_fast_path);
}

TORCH_LIBRARY_IMPL(llmopt_lowbit, CPU, m) { m.impl("mm", &lowbit_mm); }
