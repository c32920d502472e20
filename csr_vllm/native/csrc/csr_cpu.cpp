// Native CPU kernels of the CSR KV cache: encode + store, pages to dense, decode attention.
//
// The plain-PyTorch codec (csr_vllm/codec) is the spec; every op here is tested against it
// (tests/test_native_kernels.py). Shapes use the project's notation: N vectors/tokens, H KV
// heads, G query heads per KV head, D head_dim, A atoms, S atoms per vector, BS block size,
// C slot bytes.
//
// A tensor's code (key or value) sits in each slot at a byte offset, as one little-endian
// bit stream: S coefficient fields of `coef_bits`, then S index fields of `index_bits`
// (csr_vllm/codec/packing.py). A format travels as `int[] fmt` =
// [byte_offset, S, coef_kind, coef_bits, index_bits, code_bytes, octaves] with coef_kind 0 = fp16,
// 1 = fp8 (e4m3), 2 = logB (sign bit over a ladder index; ladder table [S, M] fp32, entry
// [s, i] = top_s * step_i, exactly what the reference multiplies; octaves: the ladder's span).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// int8 correlation: AVX512-VNNI, else AVX2 (vpmaddubsw: Zen 2/3, Intel before Ice Lake).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define CSR_I8_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CSR_I8_AVX2 1
#endif
// AMX int8 tiles (Sapphire Rapids and later) for the full search over the blocked table.
#if defined(CSR_I8_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define CSR_I8_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
// The attention and dense-decode kernels' 16-lane vectors (namespace v16).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define CSR_V16 1
#endif

namespace csr {
namespace {

constexpr int kMaxAtoms = 64;      // S per vector (csr-4b at head_dim 256 is 56)
constexpr int kMaxCodeBytes = 192;  // one tensor's code bytes

struct Format {
  int64_t offset, atoms, kind, coef_bits, index_bits, bytes, octaves;
};

Format format_of(c10::IntArrayRef f) {
  TORCH_CHECK(f.size() == 7, "a code format is [offset, S, coef_kind, coef_bits, index_bits, bytes, octaves]");
  Format fm{f[0], f[1], f[2], f[3], f[4], f[5], f[6]};
  TORCH_CHECK(fm.atoms >= 1 && fm.atoms <= kMaxAtoms, "atoms per vector must be in [1, 64]");
  TORCH_CHECK(fm.bytes <= kMaxCodeBytes, "code too wide for the native kernels");
  TORCH_CHECK(fm.kind >= 0 && fm.kind <= 2, "unknown coefficient kind");
  TORCH_CHECK(fm.atoms * (fm.coef_bits + fm.index_bits) <= 8 * fm.bytes, "fields exceed the code bytes");
  return fm;
}

// -- bit fields -----------------------------------------------------------------------------
inline uint32_t read_field(const uint8_t* buf, int64_t bit, int64_t width) {
  // buf is zero-padded by 8 bytes past the code, so a 64-bit read is always in bounds.
  uint64_t word;
  std::memcpy(&word, buf + (bit >> 3), 8);
  return static_cast<uint32_t>((word >> (bit & 7)) & ((uint64_t(1) << width) - 1));
}

inline void write_field(uint8_t* buf, int64_t bit, int64_t width, uint32_t value) {
  for (int64_t b = 0; b < width; ++b, ++bit) {
    if ((value >> b) & 1u) buf[bit >> 3] |= uint8_t(1u << (bit & 7));
  }
}

// One vector's code, unpacked: S indices and dequantised coefficients.
struct Code {
  int32_t idx[kMaxAtoms];
  float coef[kMaxAtoms];
};

inline float coef_value(const Format& f, uint32_t code, int64_t s, const float* ladder, int64_t m) {
  if (f.kind == 0) return static_cast<float>(c10::Half(static_cast<uint16_t>(code), c10::Half::from_bits()));
  if (f.kind == 1) return static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(code), c10::Float8_e4m3fn::from_bits()));
  const uint32_t levels = (1u << (f.coef_bits - 1)) - 1;
  const float mag = ladder[s * m + (code & levels)];
  return (code >> (f.coef_bits - 1)) ? -mag : mag;
}

inline void unpack(const uint8_t* slot, const Format& f, const float* ladder, int64_t m, Code& out) {
  uint8_t buf[kMaxCodeBytes + 8];
  std::memcpy(buf, slot + f.offset, f.bytes);
  std::memset(buf + f.bytes, 0, 8);
  const int64_t ib = f.atoms * f.coef_bits;
  for (int64_t s = 0; s < f.atoms; ++s) {
    out.coef[s] = coef_value(f, read_field(buf, s * f.coef_bits, f.coef_bits), s, ladder, m);
    out.idx[s] = static_cast<int32_t>(read_field(buf, ib + s * f.index_bits, f.index_bits));
  }
}

// A tensor's code reader for one op call: fields read straight from the slot with 64-bit
// loads (a local copy only where a load could pass the end of the cache), coefficients through
// a table (S x 2^B entries for logB, 256 for fp8) instead of branches per field. With
// AVX-512 VBMI and a code of at most 64 bytes and 16 atoms, all S fields of a kind at once:
// one masked load of the code, a byte permutation that puts each field's 4 bytes in its own
// 32-bit lane, a per-lane shift and mask; coefficients from the table.
struct Decoder {
  Format f;
  std::vector<float> lut;
  int64_t lut_stride = 0;  // entries per pursuit position (0: one table for all)
  uint64_t cmask, imask;
  const float* ladder;
  int64_t m;
#if defined(__AVX512VBMI__)
  bool vec = false;
  __mmask64 bytes_mask = 0;
  __mmask16 atoms_mask = 0;
  __m512i iperm, ishift, imaskv, cperm, cshift, cmaskv, lut_base;
#endif

  Decoder(const Format& fm, const float* lad, int64_t mm) : f(fm), ladder(lad), m(mm) {
    cmask = (uint64_t(1) << f.coef_bits) - 1;
    imask = (uint64_t(1) << f.index_bits) - 1;
    if (f.kind == 2) {
      lut_stride = int64_t(1) << f.coef_bits;
      lut.resize(f.atoms * lut_stride);
      for (int64_t s = 0; s < f.atoms; ++s)
        for (int64_t c = 0; c < lut_stride; ++c) lut[s * lut_stride + c] = coef_value(f, uint32_t(c), s, ladder, m);
    } else if (f.kind == 1) {
      lut.resize(256);
      for (int c = 0; c < 256; ++c) lut[c] = coef_value(f, uint32_t(c), 0, ladder, m);
    }
#if defined(__AVX512VBMI__)
    // Every field's 4-byte window inside the 64 loaded bytes, and the field inside its window.
    const int64_t ib = f.atoms * f.coef_bits;
    vec = f.bytes <= 64 && f.atoms <= 16 && f.index_bits + 7 <= 32 && f.coef_bits + 7 <= 32 &&
          (ib + (f.atoms - 1) * f.index_bits) / 8 + 4 <= 64;
    if (!vec) return;
    alignas(64) uint8_t ip[64] = {}, cp[64] = {};
    alignas(64) int32_t is[16] = {}, cs[16] = {}, base[16] = {};
    for (int64_t s = 0; s < f.atoms; ++s) {
      const int64_t cbit = s * f.coef_bits, ibit = ib + s * f.index_bits;
      for (int b = 0; b < 4; ++b) {
        ip[4 * s + b] = uint8_t(ibit / 8 + b);
        cp[4 * s + b] = uint8_t(cbit / 8 + b);
      }
      is[s] = int32_t(ibit % 8);
      cs[s] = int32_t(cbit % 8);
      base[s] = int32_t(s * lut_stride);
    }
    bytes_mask = f.bytes == 64 ? ~__mmask64(0) : ((__mmask64(1) << f.bytes) - 1);
    atoms_mask = __mmask16((1u << f.atoms) - 1);
    iperm = _mm512_load_si512(ip);
    cperm = _mm512_load_si512(cp);
    ishift = _mm512_load_si512(is);
    cshift = _mm512_load_si512(cs);
    lut_base = _mm512_load_si512(base);
    imaskv = _mm512_set1_epi32(int32_t(imask));
    cmaskv = _mm512_set1_epi32(int32_t(cmask));
#endif
  }

  // code: the slot's first byte + f.offset; end: one past the last byte of the cache.
  inline void unpack(const uint8_t* code, const uint8_t* end, Code& out) const {
#if defined(__AVX512VBMI__)
    if (vec) {  // masked-off bytes are never read, so no copy near the end of the cache
      const __m512i raw = _mm512_maskz_loadu_epi8(bytes_mask, code);
      const __m512i ix = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi8(iperm, raw), ishift), imaskv);
      _mm512_mask_storeu_epi32(out.idx, atoms_mask, ix);
      const __m512i cv = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi8(cperm, raw), cshift), cmaskv);
      if (f.kind == 0) {
        _mm512_mask_storeu_ps(out.coef, atoms_mask, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(cv)));
        return;
      }
      // Table lookups one by one: a vector gather is slower than S scalar loads here (Zen 4).
      alignas(64) int32_t at[16];
      _mm512_store_si512(at, _mm512_add_epi32(cv, lut_base));
      for (int64_t s = 0; s < f.atoms; ++s) out.coef[s] = lut[at[s]];
      return;
    }
#endif
    uint8_t buf[kMaxCodeBytes + 8];
    const uint8_t* src = code;
    if (code + f.bytes + 8 > end) {
      std::memcpy(buf, code, f.bytes);
      std::memset(buf + f.bytes, 0, 8);
      src = buf;
    }
    const int64_t ib = f.atoms * f.coef_bits;
    for (int64_t s = 0; s < f.atoms; ++s) {
      uint64_t w;
      const int64_t cbit = s * f.coef_bits, ibit = ib + s * f.index_bits;
      std::memcpy(&w, src + (cbit >> 3), 8);
      const uint32_t c = static_cast<uint32_t>((w >> (cbit & 7)) & cmask);
      std::memcpy(&w, src + (ibit >> 3), 8);
      out.idx[s] = static_cast<int32_t>((w >> (ibit & 7)) & imask);
      out.coef[s] = f.kind == 0 ? static_cast<float>(c10::Half(static_cast<uint16_t>(c), c10::Half::from_bits()))
                                : lut[s * lut_stride + c];
    }
  }
};

// Quantise coefficient c of pursuit position s: returns the stored value, sets the field.
inline float quantize(const Format& f, float c, int64_t s, const float* ladder, int64_t m,
                      uint32_t& code) {
  if (f.kind == 0) {
    c10::Half h(c);
    code = h.x;
    return static_cast<float>(h);
  }
  if (f.kind == 1) {
    c10::Float8_e4m3fn q(c);
    code = q.x;
    return static_cast<float>(q);
  }
  // logB: nearest ladder level in the log domain (as CoefFormat.encode, in float32).
  const int64_t levels = (int64_t(1) << (f.coef_bits - 1)) - 1;
  const float top = ladder[s * m];
  const float factor = static_cast<float>(static_cast<double>(levels) / static_cast<double>(f.octaves));
  const float ratio = std::log2(top / std::max(std::fabs(c), FLT_MIN));
  float r = std::nearbyint(ratio * factor);
  r = std::min(std::max(r, 0.0f), static_cast<float>(levels));
  const uint32_t i = static_cast<uint32_t>(r);
  code = i | (uint32_t(c < 0) << (f.coef_bits - 1));
  return c < 0 ? -ladder[s * m + i] : ladder[s * m + i];
}

// x[D] = sum_s coef_s * atoms[idx_s]  (atoms [A, D] row-major, float32 or bfloat16)
template <typename T>
inline void rebuild(const Code& code, int64_t atoms_n, const T* atoms, int64_t d, float* x) {
  std::fill(x, x + d, 0.0f);
  for (int64_t s = 0; s < atoms_n; ++s) {
    const float c = code.coef[s];
    const T* a = atoms + int64_t(code.idx[s]) * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) x[j] += c * static_cast<float>(a[j]);
  }
}

// RoPE, half-rotation convention (csr_vllm/codec/rope.py); sign = +1 apply, -1 undo.
inline void rope(const float* x, const float* cos, const float* sin, int64_t d, float sign, float* out) {
  const int64_t h = d / 2;
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) out[j] = x[j] * cos[j] - sign * x[j + h] * sin[j];
#pragma omp simd
  for (int64_t j = h; j < d; ++j) out[j] = x[j] * cos[j] + sign * x[j - h] * sin[j];
}

// Row `row` (of d elements) of a bfloat16 / float16 / float32 tensor, as float32 in dst.
inline void load_row(const at::Tensor& t, int64_t row, int64_t d, float* dst) {
  switch (t.scalar_type()) {
    case at::kBFloat16: {
      const auto* p = t.data_ptr<at::BFloat16>() + row * d;
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(p[j]);
      break;
    }
    case at::kHalf: {
      const auto* p = t.data_ptr<at::Half>() + row * d;
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(p[j]);
      break;
    }
    default:
      std::copy(t.data_ptr<float>() + row * d, t.data_ptr<float>() + (row + 1) * d, dst);
  }
}

inline void check_float_like(const at::Tensor& t, const char* what) {
  TORCH_CHECK(!t.numel() || (t.is_contiguous() && (t.scalar_type() == at::kBFloat16 ||
              t.scalar_type() == at::kHalf || t.scalar_type() == at::kFloat)),
              what, " must be a contiguous bfloat16, float16 or float32 tensor");
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) s += a[j] * b[j];
  return s;
}

// The dictionary's rows [A, D] as the encoder reads them: float32, or bfloat16 converted a row
// at a time (the engine keeps only a bf16 copy when the native kernels serve it).
struct AtomRows {
  const float* f32 = nullptr;
  const c10::BFloat16* b16 = nullptr;
  int64_t d = 0;
  // Row a as float32: the row itself, or converted into buf [d].
  inline const float* row(int64_t a, float* buf) const {
    if (f32) return f32 + a * d;
    const c10::BFloat16* p = b16 + a * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) buf[j] = static_cast<float>(p[j]);
    return buf;
  }
};

// -- correlation: argmax_a |<r_i, atom_a>| for a block of rows ----------------------------
// atoms_t is [D, A] (atoms in lanes), so a block of R rows reads the dictionary once and keeps
// every correlation in registers: the [N, A] product is never written out.
constexpr int kRows = 16;

#if defined(__AVX512F__)
// R rows at a time: R accumulators stay in registers (R is a template argument so the
// compiler can keep them there), each FMA reads 16 atoms' channel j once for all R rows.
template <int R>
void best_atoms_avx512(const float* res, int64_t d, const float* atoms_t, int64_t a0, int64_t a1,
                       int64_t a_total, float* best_abs, int32_t* best_idx) {
  __m512 bestv[R];
  __m512i besti[R];
  for (int r = 0; r < R; ++r) { bestv[r] = _mm512_set1_ps(-1.0f); besti[r] = _mm512_setzero_si512(); }
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t a = a0;
  for (; a + 16 <= a1; a += 16) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const float* col = atoms_t + a;
    for (int64_t j = 0; j < d; ++j, col += a_total) {
      const __m512 c = _mm512_loadu_ps(col);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(res[r * d + j]), c, acc[r]);
    }
    const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(a)), lane);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_and_ps(acc[r], absmask);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, bestv[r], _CMP_GT_OQ);
      bestv[r] = _mm512_mask_mov_ps(bestv[r], gt, v);
      besti[r] = _mm512_mask_mov_epi32(besti[r], gt, ids);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) float bv[16];
    alignas(64) int32_t bi[16];
    _mm512_store_ps(bv, bestv[r]);
    _mm512_store_si512(reinterpret_cast<__m512i*>(bi), besti[r]);
    for (int l = 0; l < 16; ++l) {  // lowest index among equal maxima, as a scan would find
      if (bv[l] > best_abs[r] || (bv[l] == best_abs[r] && bi[l] < best_idx[r])) {
        best_abs[r] = bv[l];
        best_idx[r] = bi[l];
      }
    }
  }
  for (; a < a1; ++a) {  // tail of the range
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t j = 0; j < d; ++j) acc += res[r * d + j] * atoms_t[j * a_total + a];
      const float v = std::fabs(acc);
      if (v > best_abs[r]) { best_abs[r] = v; best_idx[r] = static_cast<int32_t>(a); }
    }
  }
}

template <int... Rs>
void dispatch_rows(std::integer_sequence<int, Rs...>, int64_t rows, const float* res, int64_t d,
                   const float* atoms_t, int64_t a0, int64_t a1, int64_t a_total, float* best_abs,
                   int32_t* best_idx) {
  ((rows == Rs + 1 ? best_atoms_avx512<Rs + 1>(res, d, atoms_t, a0, a1, a_total, best_abs, best_idx)
                   : void()), ...);
}
#endif

constexpr int kRescore = 4;  // lane winners rescored in fp32 (bf16 / int8 correlation)

// The kRescore best lanes of one row's quantised scores (per-lane value bv, index bi)
// rescored exactly in fp32, then the range's tail [a, a1) (fewer than 16 atoms) exactly.
inline void rescore_lanes(const float* bv, const int32_t* bi, const float* rr, const AtomRows& atoms,
                          int64_t d, int64_t a, int64_t a1, float& best_abs, int32_t& best_idx,
                          int keep = kRescore) {
  int order[16];
  alignas(64) float buf[256];
  for (int x = 0; x < 16; ++x) order[x] = x;
  std::partial_sort(order, order + keep, order + 16, [&](int u, int w) { return bv[u] > bv[w]; });
  for (int x = 0; x < keep; ++x) {
    if (bv[order[x]] < 0.0f) break;  // an empty lane (range shorter than 16 atoms)
    const int32_t id = bi[order[x]];
    const float v = std::fabs(dot(rr, atoms.row(id, buf), d));
    if (v > best_abs || (v == best_abs && id < best_idx)) { best_abs = v; best_idx = id; }
  }
  for (int64_t t = a; t < a1; ++t) {
    const float v = std::fabs(dot(rr, atoms.row(t, buf), d));
    if (v > best_abs) { best_abs = v; best_idx = static_cast<int32_t>(t); }
  }
}

// A residual row as s8 channel quads (quads[j * stride]) with entries in [-qmax, qmax], and
// the int8 + 128 table's offset correction 128 * sum(entries).
inline int32_t quantize_row_s8(const float* r, int64_t d, int qmax, int32_t* quads, int64_t stride) {
  float mx = 0.0f;
  for (int64_t j = 0; j < d; ++j) mx = std::max(mx, std::fabs(r[j]));
  const float inv = mx > 0.0f ? static_cast<float>(qmax) / mx : 1.0f;
  int32_t sum = 0;
  for (int64_t j = 0; j < d / 4; ++j) {
    uint32_t w = 0;
    for (int b = 0; b < 4; ++b) {
      const int v = std::min(qmax, std::max(-qmax, static_cast<int>(std::nearbyint(r[4 * j + b] * inv))));
      sum += v;
      w |= uint32_t(static_cast<uint8_t>(static_cast<int8_t>(v))) << (8 * b);
    }
    quads[j * stride] = static_cast<int32_t>(w);
  }
  return 128 * sum;
}

// The int8 correlation table (python: csr_vllm.native.correlation_table): each atom's int8
// value + 128 (uint8) and a scale per atom, in one of two layouts:
// * ``int8`` [D/4, A, 4] (VNNI): a 64-byte line holds one channel quad of 16 atoms, so any
//   atom range starts on a lane (the screened search's clusters), and a pass over 16 atoms
//   reads D/4 lines A * 4 bytes apart;
// * ``int8-blocked`` [A/16, D/4, 16, 4] (AVX2), A padded to a multiple of 16: a pass reads one
//   contiguous D * 16 bytes, which the hardware prefetcher follows (faster than the strided
//   layout on Zen 3, docs/results.md; on Sapphire Rapids it was not, so VNNI keeps that one).
struct I8Table {
  const uint8_t* q;
  const float* scale;  // [A], blocked: [A padded to 16], 0 past A
};

#if defined(CSR_I8_AVX2)
// int8 correlation with AVX2 over the blocked table: vpmaddubsw multiplies the table's u8 by
// the row's s8 and sums pairs into s16 (saturating), vpmaddwd by ones widens to s32. No pair
// may saturate: 2 x 255 x 63 < 2^15, so rows are quantised to [-63, 63] (the VNNI path's s32
// sums take 127). 16 atoms a pass (two 8-atom halves); lanes outside [a0, a1) are masked off
// (a range may start and end inside a group: the screened search's clusters); the
// kAvx2Rescore best of 16 lanes rescored in fp32, so the pick is the exact one except where
// the coarse scores hide it.
constexpr int kAvx2Rows = 4;  // 2 x 4 accumulators + table, broadcast and ones: 12 of 16 ymm
constexpr int kAvx2Rescore = 8;  // the 7-bit rows' coarser scores: twice the VNNI path's lanes

template <int R>
void best_atoms_i8_avx2(const float* res, int64_t d, const I8Table& t8, const AtomRows& atoms,
                        int64_t a0, int64_t a1, float* best_abs, int32_t* best_idx) {
  alignas(32) int32_t quads[64][R];
  int32_t offset[R];
  for (int r = 0; r < R; ++r) offset[r] = quantize_row_s8(res + r * d, d, 63, &quads[0][r], R);
  alignas(32) float bv[R][16];
  alignas(32) int32_t bi[R][16];
  for (int r = 0; r < R; ++r) { std::fill(bv[r], bv[r] + 16, -1.0f); std::fill(bi[r], bi[r] + 16, 0); }
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i first = _mm256_set1_epi32(static_cast<int32_t>(a0 - 1));
  const __m256i end = _mm256_set1_epi32(static_cast<int32_t>(a1));
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const int64_t group_bytes = 16 * d;
  for (int64_t a = a0 / 16 * 16; a < a1; a += 16) {
    __m256i acc[2][R];
    for (int q = 0; q < 2; ++q)
      for (int r = 0; r < R; ++r) acc[q][r] = _mm256_setzero_si256();
    const uint8_t* col = t8.q + a * d;
    for (int64_t j = 0; j < d / 4; ++j, col += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(col + 2 * group_bytes), _MM_HINT_T0);
      const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col));
      const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + 32));
      for (int r = 0; r < R; ++r) {
        const __m256i b = _mm256_set1_epi32(quads[j][r]);
        acc[0][r] = _mm256_add_epi32(acc[0][r], _mm256_madd_epi16(_mm256_maddubs_epi16(c0, b), ones));
        acc[1][r] = _mm256_add_epi32(acc[1][r], _mm256_madd_epi16(_mm256_maddubs_epi16(c1, b), ones));
      }
    }
    for (int q = 0; q < 2; ++q) {
      const __m256 sc = _mm256_loadu_ps(t8.scale + a + 8 * q);
      const __m256i ids = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(a + 8 * q)), lane);
      const __m256 live = _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(ids, first),
                                                               _mm256_cmpgt_epi32(end, ids)));
      for (int r = 0; r < R; ++r) {
        const __m256 v = _mm256_and_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(
            _mm256_sub_epi32(acc[q][r], _mm256_set1_epi32(offset[r]))), sc), absmask);
        const __m256 old = _mm256_load_ps(bv[r] + 8 * q);
        const __m256 gt = _mm256_and_ps(_mm256_cmp_ps(v, old, _CMP_GT_OQ), live);
        _mm256_store_ps(bv[r] + 8 * q, _mm256_blendv_ps(old, v, gt));
        const __m256i oi = _mm256_load_si256(reinterpret_cast<const __m256i*>(bi[r] + 8 * q));
        _mm256_store_si256(reinterpret_cast<__m256i*>(bi[r] + 8 * q),
                           _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(oi), _mm256_castsi256_ps(ids), gt)));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    rescore_lanes(bv[r], bi[r], res + r * d, atoms, d, a1, a1, best_abs[r], best_idx[r], kAvx2Rescore);
}

template <int... Rs>
void dispatch_rows_i8_avx2(std::integer_sequence<int, Rs...>, int64_t rows, const float* res, int64_t d,
                           const I8Table& t8, const AtomRows& atoms, int64_t a0, int64_t a1,
                           float* best_abs, int32_t* best_idx) {
  ((rows == Rs + 1 ? best_atoms_i8_avx2<Rs + 1>(res, d, t8, atoms, a0, a1, best_abs, best_idx)
                   : void()), ...);
}
#endif

#if defined(__AVX512F__)

// Per-lane running best |score| and its atom of R rows (16 lanes each), then each row's pick:
// the best lanes rescored in fp32 (rescore_lanes). Shared by the bf16 and int8 correlations.
template <int R>
struct LaneBest {
  __m512 v[R];
  __m512i i[R];
  LaneBest() {
    for (int r = 0; r < R; ++r) { v[r] = _mm512_set1_ps(-1.0f); i[r] = _mm512_setzero_si512(); }
  }
  inline void update(int r, __m512 score, __m512i ids, __mmask16 live = 0xFFFF) {
    score = _mm512_and_ps(score, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)));
    const __mmask16 gt = _mm512_mask_cmp_ps_mask(live, score, v[r], _CMP_GT_OQ);
    v[r] = _mm512_mask_mov_ps(v[r], gt, score);
    i[r] = _mm512_mask_mov_epi32(i[r], gt, ids);
  }
  void finish(const float* res, const AtomRows& atoms, int64_t d, int64_t a, int64_t a1,
              float* best_abs, int32_t* best_idx) const {
    for (int r = 0; r < R; ++r) {
      alignas(64) float bv[16];
      alignas(64) int32_t bi[16];
      _mm512_store_ps(bv, v[r]);
      _mm512_store_si512(reinterpret_cast<__m512i*>(bi), i[r]);
      rescore_lanes(bv, bi, res + r * d, atoms, d, a, a1, best_abs[r], best_idx[r]);
    }
  }
};

#endif

#if defined(__AVX512BF16__)
// bf16 correlation (AVX512-BF16 dot products: two channels per multiply-add, twice the fp32
// FMA rate, half the dictionary bytes), then the few best candidates rescored in fp32 so the
// pick is the reference's except where bf16 rounding hides an fp32 near-tie. atoms_t2 is
// [D/2, A, 2] bf16 (channel pairs of 16 atoms per 64-byte vector); atoms [A, D] fp32.
constexpr int kBf16Rows = 8;

template <int R>
void best_atoms_bf16(const float* res, int64_t d, const uint16_t* at2, const AtomRows& atoms,
                     int64_t a0, int64_t a1, int64_t a_total, float* best_abs, int32_t* best_idx) {
  uint32_t pairs[R][128];
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < d / 2; ++j)
      pairs[r][j] = uint32_t(c10::BFloat16(res[r * d + 2 * j]).x) |
                    (uint32_t(c10::BFloat16(res[r * d + 2 * j + 1]).x) << 16);
  LaneBest<R> best;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t a = a0;
  for (; a + 16 <= a1; a += 16) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint16_t* col = at2 + a * 2;
    for (int64_t j = 0; j < d / 2; ++j, col += a_total * 2) {
      const __m512bh c = (__m512bh)_mm512_loadu_si512(col);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[r][j])), c);
    }
    const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(a)), lane);
    for (int r = 0; r < R; ++r) best.update(r, acc[r], ids);
  }
  best.finish(res, atoms, d, a, a1, best_abs, best_idx);
}

template <int... Rs>
void dispatch_rows_bf16(std::integer_sequence<int, Rs...>, int64_t rows, const float* res, int64_t d,
                        const uint16_t* at2, const AtomRows& atoms, int64_t a0, int64_t a1,
                        int64_t a_total, float* best_abs, int32_t* best_idx) {
  ((rows == Rs + 1 ? best_atoms_bf16<Rs + 1>(res, d, at2, atoms, a0, a1, a_total, best_abs, best_idx)
                   : void()), ...);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 correlation (VNNI: four channels per multiply-add, a quarter of fp32's dictionary
// bytes, so a layer's table stays in L2 across the pursuit's picks). Atoms are stored as
// int8 + 128 (u8) with a scale per atom ([D/4, A, 4] + scale [A]); each residual row is
// quantised to s8 with its own scale, so the row's channel quad is the multiply-add's
// broadcast memory operand (VNNI multiplies u8 by s8: the row must be the s8 side to be
// broadcast for free); the offset's 128 * sum(row) comes back out once per row.
// Candidates are rescored in fp32 as on the bf16 path.
// One pass over atoms [a, a + 16 G): G groups of 16 atoms, each row's correlations kept in
// registers, then the lane bests updated (group q covers atoms a + 16 q + lane).
template <int R, int G>
__attribute__((always_inline)) inline void i8_pass(const int32_t (*__restrict quads)[R], const __m512i* __restrict offset, int64_t d, const I8Table& t8,
                    int64_t a, int64_t a_total, LaneBest<R>& best, __mmask16 live = 0xFFFF) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i acc[G][R];
  for (int q = 0; q < G; ++q)
    for (int r = 0; r < R; ++r) acc[q][r] = _mm512_setzero_si512();
  const uint8_t* col = t8.q + a * 4;
  for (int64_t j = 0; j < d / 4; ++j, col += a_total * 4) {
    // Lines 4 passes ahead: a pass's channel quads lie a_total * 4 bytes apart (32 KiB at
    // 8192 atoms), 16 streams the hardware prefetcher does not follow.
    _mm_prefetch(reinterpret_cast<const char*>(col + 64 * 4 * G), _MM_HINT_T0);
    if (G > 1) _mm_prefetch(reinterpret_cast<const char*>(col + 64 * 4 * G + 64), _MM_HINT_T0);
    for (int q = 0; q < G; ++q) {
      const __m512i c = _mm512_loadu_si512(col + 64 * q);
      for (int r = 0; r < R; ++r)
        acc[q][r] = _mm512_dpbusd_epi32(acc[q][r], c, _mm512_set1_epi32(quads[j][r]));
    }
  }
  for (int q = 0; q < G; ++q) {
    const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(a + 16 * q)), lane);
    const __m512 sc = _mm512_maskz_loadu_ps(live, t8.scale + a + 16 * q);
    for (int r = 0; r < R; ++r)
      best.update(r, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[q][r], offset[r])), sc), ids, live);
  }
}

// Rows res [R, D] as s8 channel quads (quads[j][r]) with their offset correction.
template <int R>
inline void quantize_rows(const float* res, int64_t d, int32_t (*quads)[R], __m512i* offset) {
  for (int r = 0; r < R; ++r) offset[r] = _mm512_set1_epi32(quantize_row_s8(res + r * d, d, 127, &quads[0][r], R));
}

// One row, G groups of 16 atoms, the channel quads split over 4 accumulators per group
// (4 G independent multiply-add chains: one row alone would leave G, too few to hide VNNI's
// latency); int32 sums, so the scores are exactly i8_pass's.
template <int G>
__attribute__((always_inline)) inline void i8_pass_row(const int32_t (*__restrict quads)[1], const __m512i* __restrict offset, int64_t d, const I8Table& t8,
                    int64_t a, int64_t a_total, LaneBest<1>& best, __mmask16 live = 0xFFFF) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i acc[G][4];
  for (int q = 0; q < G; ++q)
    for (int u = 0; u < 4; ++u) acc[q][u] = _mm512_setzero_si512();
  const uint8_t* col = t8.q + a * 4;
  const int64_t stride = a_total * 4;
  int64_t j = 0;
  for (; j + 4 <= d / 4; j += 4, col += 4 * stride) {
    for (int u = 0; u < 4; ++u)
      for (int q = 0; q < G; ++q)
        acc[q][u] = _mm512_dpbusd_epi32(acc[q][u], _mm512_loadu_si512(col + u * stride + 64 * q),
                                        _mm512_set1_epi32(quads[j + u][0]));
  }
  for (; j < d / 4; ++j, col += stride)
    for (int q = 0; q < G; ++q)
      acc[q][0] = _mm512_dpbusd_epi32(acc[q][0], _mm512_loadu_si512(col + 64 * q), _mm512_set1_epi32(quads[j][0]));
  for (int q = 0; q < G; ++q) {
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(acc[q][0], acc[q][1]), _mm512_add_epi32(acc[q][2], acc[q][3]));
    const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(a + 16 * q)), lane);
    const __m512 sc = _mm512_maskz_loadu_ps(live, t8.scale + a + 16 * q);
    best.update(0, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, offset[0])), sc), ids, live);
  }
}

template <int R>
void best_atoms_i8(const float* res, int64_t d, const I8Table& t8, const AtomRows& atoms, int64_t a0,
                   int64_t a1, int64_t a_total, float* best_abs, int32_t* best_idx) {
  alignas(64) int32_t quads[64][R];  // [channel quad][row]: one cache line feeds R rows
  __m512i offset[R];
  quantize_rows<R>(res, d, quads, offset);
  LaneBest<R> best;
  // Two groups of 16 atoms per pass when there are few rows (a decode step's handful of
  // vectors): one group leaves only R dependent multiply-add chains, too few to hide VNNI's
  // latency. Each lane still sees its atoms in ascending order, so ties resolve alike.
  constexpr int G = R <= 4 ? 2 : 1;
  int64_t a = a0;
  for (; a + 16 * G <= a1; a += 16 * G) i8_pass<R, G>(quads, offset, d, t8, a, a_total, best);
  for (; a + 16 <= a1; a += 16) i8_pass<R, 1>(quads, offset, d, t8, a, a_total, best);
  best.finish(res, atoms, d, a, a1, best_abs, best_idx);
}

// -- screened search (csr_vllm/codec/search.py), int8 --------------------------------------
// Rows are taken in blocks; within a block each cluster's atoms are scanned once for every
// tile of up to 8 rows that probe it (inverted lists, as an IVF index searches a batch), so a
// cluster's table bytes are shared by its rows as the full search's tiles share the whole
// table. Each row keeps 16 lane bests across its clusters (loaded into and stored from the
// registers around each tile); then its best lanes are rescored in fp32 as in the full search.
// A cluster's last partial group of 16 is scanned with the lanes past its end masked off;
// only the table's very last atoms (where a 16-wide load would pass its end) are scored
// exactly, for the rows that probe their cluster.
struct ScreenRows {
  int32_t quads[64];  // the row's channel quads (s8)
  int32_t offset;     // 128 * sum of the row's s8 entries
  alignas(64) float lane_v[16];
  alignas(64) int32_t lane_i[16];
};

template <int R>
void screen_tile_i8(ScreenRows* const* rows, int64_t d, const I8Table& t8, int64_t a0, int64_t a1,
                    int64_t scan_end, int64_t a_total) {
  alignas(64) int32_t quads[64][R];
  __m512i offset[R];
  LaneBest<R> best;
  for (int r = 0; r < R; ++r) {
    for (int64_t j = 0; j < d / 4; ++j) quads[j][r] = rows[r]->quads[j];
    offset[r] = _mm512_set1_epi32(rows[r]->offset);
    best.v[r] = _mm512_load_ps(rows[r]->lane_v);
    best.i[r] = _mm512_load_si512(reinterpret_cast<const __m512i*>(rows[r]->lane_i));
  }
  const int64_t e = std::min(a1, scan_end);
  int64_t a = a0;
  if constexpr (R == 1) {
    for (; a + 32 <= e; a += 32) i8_pass_row<2>(quads, offset, d, t8, a, a_total, best);
    for (; a + 16 <= e; a += 16) i8_pass_row<1>(quads, offset, d, t8, a, a_total, best);
    if (a < e) i8_pass_row<1>(quads, offset, d, t8, a, a_total, best, static_cast<__mmask16>((1u << (e - a)) - 1));
  } else {
    constexpr int G = R <= 4 ? 2 : 1;
    for (; a + 16 * G <= e; a += 16 * G) i8_pass<R, G>(quads, offset, d, t8, a, a_total, best);
    for (; a + 16 <= e; a += 16) i8_pass<R, 1>(quads, offset, d, t8, a, a_total, best);
    if (a < e) i8_pass<R, 1>(quads, offset, d, t8, a, a_total, best, static_cast<__mmask16>((1u << (e - a)) - 1));
  }
  for (int r = 0; r < R; ++r) {
    _mm512_store_ps(rows[r]->lane_v, best.v[r]);
    _mm512_store_si512(reinterpret_cast<__m512i*>(rows[r]->lane_i), best.i[r]);
  }
}

template <int... Rs>
void dispatch_screen_tile(std::integer_sequence<int, Rs...>, int64_t n, ScreenRows* const* rows, int64_t d,
                          const I8Table& t8, int64_t a0, int64_t a1, int64_t scan_end, int64_t a_total) {
  ((n == Rs + 1 ? screen_tile_i8<Rs + 1>(rows, d, t8, a0, a1, scan_end, a_total) : void()), ...);
}

template <int... Rs>
void dispatch_rows_i8(std::integer_sequence<int, Rs...>, int64_t rows, const float* res, int64_t d,
                      const I8Table& t8, const AtomRows& atoms, int64_t a0, int64_t a1,
                      int64_t a_total, float* best_abs, int32_t* best_idx) {
  ((rows == Rs + 1 ? best_atoms_i8<Rs + 1>(res, d, t8, atoms, a0, a1, a_total, best_abs, best_idx)
                   : void()), ...);
}
#endif


#if defined(CSR_I8_AMX)
// Linux hands out AMX's tile state only on request (once per process); without it the
// blocked table is not offered (isa() has no "_amx") and the VNNI kernel serves.
bool amx_ready() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// int8 correlation with AMX over the blocked table [A/16, D/4, 16, 4]: a 16-atom group's
// D/64 K-chunks are B tiles as they lie (16 channel-quad rows of 64 bytes), the rows' s8
// channels the A tiles, so _tile_dpbsud (s8 x u8) gives the VNNI kernel's int32 sums exactly;
// scores, lane updates (ascending atoms per lane) and the rescoring are the VNNI path's, so
// the picks are too. The C tiles go through memory to the lane bests: that reduce, not the
// tile multiply, bounds the kernel (~3x VNNI's rate, docs/results.md). tmm0..KQ-1: the rows;
// KQ, KQ+1: B (alternating); KQ+2..KQ+1+NC: C.
// GCC's tile intrinsics take literal register numbers (they are pasted into the asm), so each
// head_dim's tile plan is written out. Group g's K-chunk k is the 1 KiB at block + (g KQ + k) KiB.
#define CSR_DP(c, a, b, p) do { _tile_loadd(b, p, 64); _tile_dpbsud(c, a, b); } while (0)
template <int KQ>
inline void amx_tiles(const uint8_t* b, int32_t (*cb)[16][16], int ng) {
  if constexpr (KQ == 1) {  // rows tmm0, B tmm1/2, C tmm3..6
    if (ng == 4) {
      _tile_zero(3); _tile_zero(4); _tile_zero(5); _tile_zero(6);
      CSR_DP(3, 0, 1, b); CSR_DP(4, 0, 2, b + 1024); CSR_DP(5, 0, 1, b + 2048); CSR_DP(6, 0, 2, b + 3072);
      _tile_stored(3, cb[0], 64); _tile_stored(4, cb[1], 64); _tile_stored(5, cb[2], 64); _tile_stored(6, cb[3], 64);
    } else {
      _tile_zero(3); CSR_DP(3, 0, 1, b); _tile_stored(3, cb[0], 64);
    }
  } else if constexpr (KQ == 2) {  // rows tmm0/1, B tmm2/3, C tmm4..7
    if (ng == 4) {
      _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
      CSR_DP(4, 0, 2, b); CSR_DP(4, 1, 3, b + 1024); CSR_DP(5, 0, 2, b + 2048); CSR_DP(5, 1, 3, b + 3072);
      CSR_DP(6, 0, 2, b + 4096); CSR_DP(6, 1, 3, b + 5120); CSR_DP(7, 0, 2, b + 6144); CSR_DP(7, 1, 3, b + 7168);
      _tile_stored(4, cb[0], 64); _tile_stored(5, cb[1], 64); _tile_stored(6, cb[2], 64); _tile_stored(7, cb[3], 64);
    } else {
      _tile_zero(4); CSR_DP(4, 0, 2, b); CSR_DP(4, 1, 3, b + 1024); _tile_stored(4, cb[0], 64);
    }
  } else {  // KQ 4: rows tmm0..3, B tmm4/5, C tmm6/7
    _tile_zero(6);
    CSR_DP(6, 0, 4, b); CSR_DP(6, 1, 5, b + 1024); CSR_DP(6, 2, 4, b + 2048); CSR_DP(6, 3, 5, b + 3072);
    _tile_stored(6, cb[0], 64);
    if (ng == 2) {
      _tile_zero(7);
      CSR_DP(7, 0, 4, b + 4096); CSR_DP(7, 1, 5, b + 5120); CSR_DP(7, 2, 4, b + 6144); CSR_DP(7, 3, 5, b + 7168);
      _tile_stored(7, cb[1], 64);
    }
  }
}
#undef CSR_DP

template <int KQ>
void best_atoms_amx(const float* res, int64_t rows, const I8Table& t8, const AtomRows& atoms, int64_t a0,
                    int64_t a1, float* best_abs, int32_t* best_idx) {
  constexpr int d = 64 * KQ, NC = KQ == 4 ? 2 : 4;
  alignas(64) int8_t rowq[16][d];
  alignas(64) int32_t cbuf[NC][16][16];
  int32_t off[16];
  for (int64_t r = 0; r < rows; ++r)
    off[r] = quantize_row_s8(res + r * d, d, 127, reinterpret_cast<int32_t*>(rowq[r]), 1);
  TileConfig cfg;
  for (int t = 0; t < KQ + 2 + NC; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = static_cast<uint8_t>(t == KQ || t == KQ + 1 ? 16 : rows);
  }
  _tile_loadconfig(&cfg);  // every call: oneDNN reconfigures the tiles on this thread too
  _tile_loadd(0, &rowq[0][0], d);
  if constexpr (KQ >= 2) _tile_loadd(1, &rowq[0][64], d);
  if constexpr (KQ == 4) { _tile_loadd(2, &rowq[0][128], d); _tile_loadd(3, &rowq[0][192], d); }
  __m512 v[16];
  __m512i ix[16];
  for (int r = 0; r < 16; ++r) { v[r] = _mm512_set1_ps(-1.0f); ix[r] = _mm512_setzero_si512(); }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  auto reduce = [&](int64_t g0, int ng) {
    for (int g = 0; g < ng; ++g) {
      const int64_t a = 16 * (g0 + g);
      const __mmask16 live = static_cast<__mmask16>(
          _mm512_cmpge_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(a)), lane), _mm512_set1_epi32(static_cast<int32_t>(a0))) &
          _mm512_cmplt_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(a)), lane), _mm512_set1_epi32(static_cast<int32_t>(a1))));
      const __m512 sc = _mm512_load_ps(t8.scale + a);
      const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(a)), lane);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512i sum = _mm512_load_si512(reinterpret_cast<const __m512i*>(cbuf[g][r]));
        const __m512 s = _mm512_and_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, _mm512_set1_epi32(off[r]))), sc), absm);
        const __mmask16 gt = _mm512_mask_cmp_ps_mask(live, s, v[r], _CMP_GT_OQ);
        v[r] = _mm512_mask_mov_ps(v[r], gt, s);
        ix[r] = _mm512_mask_mov_epi32(ix[r], gt, ids);
      }
    }
  };
  const int64_t g_end = (a1 + 15) / 16;
  int64_t g = a0 / 16;
  for (; g + NC <= g_end; g += NC) {
    amx_tiles<KQ>(t8.q + g * 16 * d, cbuf, NC);
    reduce(g, NC);
  }
  for (; g < g_end; ++g) {
    amx_tiles<KQ>(t8.q + g * 16 * d, cbuf, 1);
    reduce(g, 1);
  }
  for (int64_t r = 0; r < rows; ++r) {
    alignas(64) float bv[16];
    alignas(64) int32_t bi[16];
    _mm512_store_ps(bv, v[r]);
    _mm512_store_si512(reinterpret_cast<__m512i*>(bi), ix[r]);
    rescore_lanes(bv, bi, res + r * d, atoms, d, a1, a1, best_abs[r], best_idx[r]);
  }
}
#endif

// Best atoms of `rows` residual rows over atoms [a0, a1): through the bf16 pair layout when
// it is given (atoms_t2 != nullptr), else exactly in fp32 from atoms_t [D, A].
struct CorrTable {
  const float* fp32 = nullptr;      // [D, A]
  const uint16_t* bf16 = nullptr;   // [D/2, A, 2]
  const uint8_t* i8 = nullptr;      // int8 + 128 (I8Table's layout for this build), with:
  const float* i8_scale = nullptr;  // [A] (blocked: padded to 16)
  bool blocked = false;             // i8 is int8-blocked (AVX2, AMX) rather than int8 (VNNI)
};

void best_atoms_any(const float* res, int64_t rows, int64_t d, const CorrTable& t,
                    const AtomRows& atoms, int64_t a0, int64_t a1, int64_t a_total,
                    float* best_abs, int32_t* best_idx);

void best_atoms(const float* res, int64_t rows, int64_t d, const float* atoms_t, int64_t a0,
                int64_t a1, int64_t a_total, float* best_abs, int32_t* best_idx) {
  for (int64_t r = 0; r < rows; ++r) { best_abs[r] = -1.0f; best_idx[r] = 0; }
#if defined(__AVX512F__)
  dispatch_rows(std::make_integer_sequence<int, kRows>{}, rows, res, d, atoms_t, a0, a1, a_total,
                best_abs, best_idx);
#else
  for (int64_t a = a0; a < a1; ++a) {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int64_t j = 0; j < d; ++j) acc += res[r * d + j] * atoms_t[j * a_total + a];
      const float v = std::fabs(acc);
      if (v > best_abs[r]) { best_abs[r] = v; best_idx[r] = static_cast<int32_t>(a); }
    }
  }
#endif
}

void best_atoms_any(const float* res, int64_t rows, int64_t d, const CorrTable& t,
                    const AtomRows& atoms, int64_t a0, int64_t a1, int64_t a_total,
                    float* best_abs, int32_t* best_idx) {
#if defined(CSR_I8_AVX2)
  if (t.i8) {
    const I8Table t8{t.i8, t.i8_scale};
    for (int64_t r0 = 0; r0 < rows; r0 += kAvx2Rows) {
      const int64_t nr = std::min<int64_t>(kAvx2Rows, rows - r0);
      for (int64_t r = r0; r < r0 + nr; ++r) { best_abs[r] = -1.0f; best_idx[r] = 0; }
      dispatch_rows_i8_avx2(std::make_integer_sequence<int, kAvx2Rows>{}, nr, res + r0 * d, d, t8, atoms,
                            a0, a1, best_abs + r0, best_idx + r0);
    }
    return;
  }
#endif
#if defined(CSR_I8_AMX)
  if (t.i8 && t.blocked) {
    const I8Table t8{t.i8, t.i8_scale};
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      const int64_t nr = std::min<int64_t>(16, rows - r0);
      for (int64_t r = r0; r < r0 + nr; ++r) { best_abs[r] = -1.0f; best_idx[r] = 0; }
      if (d == 64) best_atoms_amx<1>(res + r0 * d, nr, t8, atoms, a0, a1, best_abs + r0, best_idx + r0);
      else if (d == 128) best_atoms_amx<2>(res + r0 * d, nr, t8, atoms, a0, a1, best_abs + r0, best_idx + r0);
      else best_atoms_amx<4>(res + r0 * d, nr, t8, atoms, a0, a1, best_abs + r0, best_idx + r0);
    }
    return;
  }
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (t.i8) {
    const I8Table t8{t.i8, t.i8_scale};
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const int64_t nr = std::min<int64_t>(8, rows - r0);
      for (int64_t r = r0; r < r0 + nr; ++r) { best_abs[r] = -1.0f; best_idx[r] = 0; }
      dispatch_rows_i8(std::make_integer_sequence<int, 8>{}, nr, res + r0 * d, d, t8, atoms, a0,
                       a1, a_total, best_abs + r0, best_idx + r0);
    }
    return;
  }
#endif
  const uint16_t* atoms_t2 = t.bf16;
  const float* atoms_t = t.fp32;
#if defined(__AVX512BF16__)
  if (atoms_t2) {
    for (int64_t r0 = 0; r0 < rows; r0 += kBf16Rows) {
      const int64_t nr = std::min<int64_t>(kBf16Rows, rows - r0);
      for (int64_t r = r0; r < r0 + nr; ++r) { best_abs[r] = -1.0f; best_idx[r] = 0; }
      dispatch_rows_bf16(std::make_integer_sequence<int, kBf16Rows>{}, nr, res + r0 * d, d, atoms_t2,
                         atoms, a0, a1, a_total, best_abs + r0, best_idx + r0);
    }
    return;
  }
#endif
  TORCH_CHECK(atoms_t, "no correlation layout for this build");
  best_atoms(res, rows, d, atoms_t, a0, a1, a_total, best_abs, best_idx);
}

// |<r, centroid_k>| for k < kpad (cent_t [D, kpad], kpad a multiple of 128: eight
// accumulators of 16 centroids stay in registers across the channels).
void centroid_scores(const float* r, int64_t d, const float* cent_t, int64_t kpad, float* out) {
#if defined(__AVX512F__)
  for (int64_t k = 0; k < kpad; k += 128) {
    __m512 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm512_setzero_ps();
    const float* row = cent_t + k;
    for (int64_t j = 0; j < d; ++j, row += kpad) {
      const __m512 x = _mm512_set1_ps(r[j]);
      for (int q = 0; q < 8; ++q) acc[q] = _mm512_fmadd_ps(x, _mm512_loadu_ps(row + 16 * q), acc[q]);
    }
    for (int q = 0; q < 8; ++q) _mm512_storeu_ps(out + k + 16 * q, _mm512_abs_ps(acc[q]));
  }
#else
  for (int64_t k = 0; k < kpad; ++k) {
    float acc = 0.0f;
    for (int64_t j = 0; j < d; ++j) acc += r[j] * cent_t[j * kpad + k];
    out[k] = std::fabs(acc);
  }
#endif
}

// The P largest of scores [K] (>= 0): out [P] = their indices, ties to the lower index (as a
// stable sort would take them). A score's bits order like the score, so the P-th largest
// bit pattern is found by bisection on the bits, each step one compare and count per 16.
void top_clusters(const float* score, int64_t k, int64_t p, int32_t* out) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(score);
  auto count_ge = [&](uint32_t t) {
    int64_t n = 0;
#if defined(__AVX512F__)
    int64_t c = 0;
    const __m512i tv = _mm512_set1_epi32(static_cast<int32_t>(t));
    __m512i acc = _mm512_setzero_si512();  // per-lane counts: no popcount chain
    for (; c + 16 <= k; c += 16)
      acc = _mm512_sub_epi32(acc, _mm512_movm_epi32(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(bits + c), tv)));
    n = _mm512_reduce_add_epi32(acc);
    for (; c < k; ++c) n += bits[c] >= t;
#else
    for (int64_t c = 0; c < k; ++c) n += bits[c] >= t;
#endif
    return n;
  };
  uint32_t lo = ~0u, hi = 0;  // count_ge(lo) >= p; the answer is at most the largest score
  for (int64_t c = 0; c < k; ++c) {
    hi = std::max(hi, bits[c]);
    lo = std::min(lo, bits[c]);
  }
  while (lo < hi) {  // the largest t with count_ge(t) >= p; any t with exactly p is as good
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    const int64_t n_ge = count_ge(mid);
    if (n_ge == p) {  // the same P scores as the largest such t (none lies in between)
      lo = mid;
      break;
    }
    if (n_ge > p) lo = mid; else hi = mid - 1;
  }
  int64_t n = 0;
  int64_t c = 0;
#if defined(__AVX512F__)
  const __m512i lov = _mm512_set1_epi32(static_cast<int32_t>(lo));
  for (; c + 16 <= k; c += 16) {  // all above the threshold (fewer than p of them)
    // Set bits one by one: a compress-store to memory is microcoded on Zen 4 (~100 cycles).
    for (uint32_t m = _mm512_cmpgt_epu32_mask(_mm512_loadu_si512(bits + c), lov); m; m &= m - 1)
      out[n++] = static_cast<int32_t>(c + __builtin_ctz(m));
  }
#endif
  for (; c < k; ++c)
    if (bits[c] > lo) out[n++] = static_cast<int32_t>(c);
  for (c = 0; c < k && n < p; ++c)  // then the threshold's own, lower index first
    if (bits[c] == lo) out[n++] = static_cast<int32_t>(c);
}

// Solve (G + ridge I) c = b for the first entry of c; G is n x n (row stride ld), Cholesky.
float first_of_solve(const float* g, int64_t ld, const float* b, int64_t n, float ridge) {
  double l[kMaxAtoms * kMaxAtoms];
  double y[kMaxAtoms];
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double sum = g[i * ld + j] + (i == j ? ridge : 0.0f);
      for (int64_t k = 0; k < j; ++k) sum -= l[i * n + k] * l[j * n + k];
      if (i == j) {
        l[i * n + i] = std::sqrt(std::max(sum, 1e-30));
      } else {
        l[i * n + j] = sum / l[j * n + j];
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {  // L y = b
    double sum = b[i];
    for (int64_t k = 0; k < i; ++k) sum -= l[i * n + k] * y[k];
    y[i] = sum / l[i * n + i];
  }
  double x[kMaxAtoms];
  for (int64_t i = n - 1; i >= 0; --i) {  // L^T x = y
    double sum = y[i];
    for (int64_t k = i + 1; k < n; ++k) sum -= l[k * n + i] * x[k];
    x[i] = sum / l[i * n + i];
  }
  return static_cast<float>(x[0]);
}

}  // namespace

// encode_store: OMP- (omp) or MP-code x [N, H, D] (keys after RoPE when undo_rope: rotated back first with
// positions [N]), quantise inside the pursuit as the reference does, pack each code into
// kv_cache [NB, H, BS, C] at slots [N] and the format's byte offset. Returns the relative
// reconstruction error [N, H] (from the final residual).
at::Tensor encode_store(const at::Tensor& x_in, const at::Tensor& positions,
                        const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                        const at::Tensor& atoms_in, const at::Tensor& atoms_t_in,
                        const at::Tensor& corr_scale_in, const at::Tensor& ladder_in,
                        at::Tensor& kv_cache,
                        const at::Tensor& slots_in, c10::IntArrayRef fmt_list, bool omp, bool undo,
                        const std::optional<at::Tensor>& centroids_in,
                        const std::optional<at::Tensor>& cluster_offsets_in, int64_t probes) {
  const Format f = format_of(fmt_list);
  TORCH_CHECK(x_in.dim() == 3, "x must be [N, H, D]");
  TORCH_CHECK(kv_cache.scalar_type() == at::kByte && kv_cache.dim() == 4 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous uint8 [NB, H, BS, C] tensor");
  const int64_t n = x_in.size(0), h = x_in.size(1), d = x_in.size(2);
  TORCH_CHECK(d <= 256, "head_dim above 256 is not supported by the native encoder");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor atoms = atoms_in.scalar_type() == at::kBFloat16 ? atoms_in.contiguous()
                                                                   : atoms_in.to(at::kFloat).contiguous();
  const bool pairs = atoms_t_in.scalar_type() == at::kBFloat16;
  const bool quads = atoms_t_in.scalar_type() == at::kByte;
  const at::Tensor atoms_t = pairs || quads ? atoms_t_in.contiguous() : atoms_t_in.to(at::kFloat).contiguous();
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(atoms.dim() == 2 && atoms.size(1) == d, "atoms must be [A, D]");
  const int64_t a_total = atoms.size(0);
  at::Tensor i8_scale;
  bool blocked = false;
  if (quads) {
#if !defined(CSR_I8_VNNI) && !defined(CSR_I8_AVX2)
    TORCH_CHECK(false, "int8 correlation tables need a build with AVX512-VNNI or AVX2 (see csr_cpu::isa)");
#endif
    i8_scale = corr_scale_in.to(at::kFloat).contiguous();
#if defined(CSR_I8_AMX)
    blocked = atoms_t.dim() == 4;
    TORCH_CHECK(!blocked || (amx_ready() && (d == 64 || d == 128 || d == 256)),
                "the int8-blocked table needs AMX (granted by the OS) and head_dim 64, 128 or 256 on this build");
#elif defined(CSR_I8_AVX2)
    blocked = true;
#endif
#if defined(CSR_I8_AVX2) || defined(CSR_I8_AMX)
    const int64_t groups = (a_total + 15) / 16;
    if (blocked) {
    TORCH_CHECK(atoms_t.dim() == 4 && atoms_t.size(0) == groups && atoms_t.size(1) == d / 4 &&
                atoms_t.size(2) == 16 && atoms_t.size(3) == 4 && d % 4 == 0,
                "this build's int8 correlation takes the blocked [A/16, D/4, 16, 4] uint8 table "
                "(layout int8-blocked)");
    TORCH_CHECK(i8_scale.dim() == 1 && i8_scale.size(0) == groups * 16,
                "int8-blocked atoms_t needs corr_scale [A padded to 16]");
    }
#endif
#if !defined(CSR_I8_AVX2)
    if (!blocked) {
    TORCH_CHECK(atoms_t.dim() == 3 && atoms_t.size(0) == d / 4 && atoms_t.size(1) == a_total &&
                atoms_t.size(2) == 4 && d % 4 == 0, "this build's int8 correlation takes the "
                "[D/4, A, 4] uint8 table (layout int8)");
    TORCH_CHECK(i8_scale.dim() == 1 && i8_scale.size(0) == a_total, "int8 atoms_t needs corr_scale [A]");
    }
#endif
  } else if (pairs) {
#if !defined(__AVX512BF16__)
    TORCH_CHECK(false, "bf16 correlation tables need a build with AVX512-BF16 (see csr_cpu::isa)");
#endif
    TORCH_CHECK(atoms_t.dim() == 3 && atoms_t.size(0) == d / 2 && atoms_t.size(1) == a_total &&
                atoms_t.size(2) == 2 && d % 2 == 0 && d <= 256, "bf16 atoms_t must be [D/2, A, 2]");
  } else {
    TORCH_CHECK(atoms_t.dim() == 2 && atoms_t.size(0) == d && atoms_t.size(1) == a_total, "atoms_t must be [D, A]");
  }
  TORCH_CHECK(slots.numel() == n && pos.numel() == n, "slots and positions must be [N]");
  TORCH_CHECK(kv_cache.size(1) == h, "kv_cache heads differ from x's");
  TORCH_CHECK(f.offset + f.bytes <= kv_cache.size(3), "code does not fit in the slot");
  TORCH_CHECK((int64_t(1) << f.index_bits) >= a_total, "index field too narrow for the atoms");
  const at::Tensor ladder = ladder_in.numel() ? ladder_in.to(at::kFloat).contiguous() : ladder_in;
  TORCH_CHECK(f.kind != 2 || (ladder.dim() == 2 && ladder.size(0) >= f.atoms && f.octaves > 0), "logB needs its [S, M] ladder table and octaves");
  const int64_t m = f.kind == 2 ? ladder.size(1) : 0;
  const float* lad = f.kind == 2 ? ladder.data_ptr<float>() : nullptr;
  at::Tensor cos, sin;
  if (undo) {
    cos = rope_cos.to(at::kFloat).contiguous();
    sin = rope_sin.to(at::kFloat).contiguous();
    TORCH_CHECK(cos.size(1) == d && sin.sizes() == cos.sizes(), "rope tables must be [P, D]");
    if (n) TORCH_CHECK(pos.max().item<int64_t>() < cos.size(0), "position beyond the RoPE table");
  }

  // A screened search (csr_vllm/codec/search.py): each pick scans only the atoms of the
  // `probes` clusters (contiguous ranges, cluster_offsets [K + 1]) whose centroids [K, D]
  // correlate best with the residual.
  const bool screened = probes > 0;
  at::Tensor centroids, cluster_offsets;
  int64_t n_clusters = 0;
  if (screened) {
    TORCH_CHECK(centroids_in.has_value() && cluster_offsets_in.has_value(),
                "a screened search needs centroids and cluster offsets");
    centroids = centroids_in->to(at::kFloat).contiguous();
    cluster_offsets = cluster_offsets_in->to(at::kLong).contiguous();
    n_clusters = centroids.size(0);
    TORCH_CHECK(centroids.dim() == 2 && centroids.size(1) == d, "centroids must be [K, D]");
    TORCH_CHECK(cluster_offsets.dim() == 1 && cluster_offsets.size(0) == n_clusters + 1,
                "cluster offsets must be [K + 1]");
    TORCH_CHECK(probes <= n_clusters, "more probes than clusters");
    const int64_t* o = cluster_offsets.data_ptr<int64_t>();
    TORCH_CHECK(o[0] == 0 && o[n_clusters] <= a_total, "cluster offsets outside the atoms");
    for (int64_t c = 0; c < n_clusters; ++c) TORCH_CHECK(o[c] <= o[c + 1], "cluster offsets must not decrease");
  }
  // Centroids in SIMD lanes ([D, K] padded to 128): a row's K scores in D FMAs per 16.
  const int64_t kpad = (n_clusters + 127) / 128 * 128;
  std::vector<float> cent_t(screened ? d * kpad : 0, 0.0f);
  if (screened) {
    const float* cp = centroids.data_ptr<float>();
    for (int64_t c = 0; c < n_clusters; ++c)
      for (int64_t j = 0; j < d; ++j) cent_t[j * kpad + c] = cp[c * d + j];
  }

  const int64_t rows = n * h, s_n = f.atoms;
  std::vector<float> x0(rows * d), res(rows * d), basis(omp ? rows * s_n * d : 0);
  std::vector<int32_t> picks(rows * s_n);
  std::vector<uint32_t> mp_codes(omp ? 0 : rows * s_n);
  const float* xp = x.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = xp + r * d;
      if (undo) {
        const int64_t p = pp[r / h];
        rope(src, cos.data_ptr<float>() + p * d, sin.data_ptr<float>() + p * d, d, -1.0f, &x0[r * d]);
      } else {
        std::copy(src, src + d, &x0[r * d]);
      }
      std::copy(&x0[r * d], &x0[r * d] + d, &res[r * d]);
    }
  });

  // Picks: the blocks of rows and, when there are few, atom ranges run in parallel.
  CorrTable table;
  if (quads) {
    table.i8 = atoms_t.data_ptr<uint8_t>();
    table.i8_scale = i8_scale.data_ptr<float>();
    table.blocked = blocked;
  } else if (pairs) {
    table.bf16 = reinterpret_cast<const uint16_t*>(atoms_t.data_ptr<at::BFloat16>());
  } else {
    table.fp32 = atoms_t.data_ptr<float>();
  }
  AtomRows ar;
  ar.d = d;
  if (atoms.scalar_type() == at::kBFloat16) ar.b16 = atoms.data_ptr<c10::BFloat16>();
  else ar.f32 = atoms.data_ptr<float>();
  // Few rows (a decode step's) and more threads than row blocks: split the atom range, or,
  // for a quantised table, the rows: splitting the atoms there would rescore each range's
  // best lanes instead of the whole range's, and a row's code would depend on the batch.
  const int64_t threads = at::get_num_threads();
  const bool exact_table = !quads && !pairs;
  const int64_t block_rows = exact_table || rows >= kRows * threads ? kRows
                             : std::max<int64_t>(1, (rows + threads - 1) / threads);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const int64_t splits = blocks >= threads || screened || !exact_table ? 1 : std::min<int64_t>((threads + blocks - 1) / blocks, a_total / 512 + 1);
  const int64_t span = ((a_total + splits - 1) / splits + 15) / 16 * 16;
  std::vector<float> part_abs(splits * rows);
  std::vector<int32_t> part_idx(splits * rows);
  for (int64_t k = 0; k < s_n; ++k) {
    if (screened) {
      const int64_t* o = cluster_offsets.data_ptr<int64_t>();
      const int64_t scan_end = std::max<int64_t>(0, a_total - 15);  // past it: exact (see ScreenRows)
      constexpr int64_t kBlock = 256;
      const int64_t nblocks = (rows + kBlock - 1) / kBlock;
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> score(kpad, -1.0f);
        std::vector<int32_t> probe(kBlock * probes), first(n_clusters + 1), list(kBlock * probes);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        std::vector<ScreenRows> sr(table.i8 ? kBlock : 0);
#endif
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * kBlock, nr = std::min(kBlock, rows - r0);
          for (int64_t i = 0; i < nr; ++i) {  // the P best clusters of each row
            const float* rr = &res[(r0 + i) * d];
            centroid_scores(rr, d, cent_t.data(), kpad, score.data());
            top_clusters(score.data(), n_clusters, probes, &probe[i * probes]);
          }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
          if (table.i8 && !table.blocked) {
            const I8Table t8{table.i8, table.i8_scale};
            for (int64_t i = 0; i < nr; ++i) {
              alignas(64) int32_t q1[64][1];
              __m512i off1[1];
              quantize_rows<1>(&res[(r0 + i) * d], d, q1, off1);
              for (int64_t j = 0; j < d / 4; ++j) sr[i].quads[j] = q1[j][0];
              sr[i].offset = _mm_cvtsi128_si32(_mm512_castsi512_si128(off1[0]));
              std::fill(sr[i].lane_v, sr[i].lane_v + 16, -1.0f);
              std::fill(sr[i].lane_i, sr[i].lane_i + 16, 0);
            }
            // Rows by cluster (counting sort), then each cluster's rows in tiles of 8.
            std::fill(first.begin(), first.end(), 0);
            for (int64_t x = 0; x < nr * probes; ++x) ++first[probe[x] + 1];
            for (int64_t c = 0; c < n_clusters; ++c) first[c + 1] += first[c];
            {
              std::vector<int32_t> fill(first.begin(), first.end() - 1);
              for (int64_t i = 0; i < nr; ++i)
                for (int64_t p = 0; p < probes; ++p) list[fill[probe[i * probes + p]]++] = static_cast<int32_t>(i);
            }
            // A cluster's table lines (D/4 runs of its atoms' quads, 32 KiB apart): prefetched
            // while the cluster before it is scanned, since a few rows per cluster (a decode
            // step's) leave each scan waiting on its first touch of every run.
            auto prefetch_cluster = [&](int64_t c) {
              const int64_t bytes = (std::min(o[c + 1], scan_end) - o[c]) * 4;
              for (int64_t j = 0; j < d / 4; ++j) {
                const char* run = reinterpret_cast<const char*>(t8.q + (j * a_total + o[c]) * 4);
                for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(run + b, _MM_HINT_T0);
              }
            };
            auto scanned = [&](int64_t c) { return first[c] < first[c + 1] && o[c] < std::min(o[c + 1], scan_end); };
            int64_t next = 0;
            while (next < n_clusters && !scanned(next)) ++next;
            if (next < n_clusters) prefetch_cluster(next);
            ScreenRows* tile[8];
            for (int64_t c = next; c < n_clusters; c = next) {
              next = c + 1;
              while (next < n_clusters && !scanned(next)) ++next;
              if (next < n_clusters) prefetch_cluster(next);
              for (int64_t t = first[c]; t < first[c + 1]; t += 8) {
                const int64_t nt = std::min<int64_t>(8, first[c + 1] - t);
                for (int64_t u = 0; u < nt; ++u) tile[u] = &sr[list[t + u]];
                dispatch_screen_tile(std::make_integer_sequence<int, 8>{}, nt, tile, d, t8, o[c], o[c + 1],
                                     scan_end, a_total);
              }
            }
            for (int64_t i = 0; i < nr; ++i) {  // best lanes rescored, the table's end exactly
              const float* rr = &res[(r0 + i) * d];
              float bv = -1.0f;
              int32_t bi = 0;
              rescore_lanes(sr[i].lane_v, sr[i].lane_i, rr, ar, d, 0, 0, bv, bi);
              alignas(64) float buf[256];
              for (int64_t p = 0; p < probes; ++p) {
                const int64_t c = probe[i * probes + p];
                for (int64_t t = std::max(o[c], scan_end); t < o[c + 1]; ++t) {
                  const float v = std::fabs(dot(rr, ar.row(t, buf), d));
                  if (v > bv || (v == bv && t < bi)) { bv = v; bi = static_cast<int32_t>(t); }
                }
              }
              part_abs[r0 + i] = bv;
              part_idx[r0 + i] = bi;
            }
            continue;
          }
#endif
          for (int64_t i = 0; i < nr; ++i) {  // other tables: each probed cluster's range
            const float* rr = &res[(r0 + i) * d];
            float bv = -1.0f;
            int32_t bi = 0;
            for (int64_t p = 0; p < probes; ++p) {
              const int64_t c = probe[i * probes + p];
              if (o[c] == o[c + 1]) continue;
              float v;
              int32_t x;
              best_atoms_any(rr, 1, d, table, ar, o[c], o[c + 1], a_total, &v, &x);
              if (v > bv || (v == bv && x < bi)) { bv = v; bi = x; }
            }
            part_abs[r0 + i] = bv;
            part_idx[r0 + i] = bi;
          }
        }
      });
    } else
    at::parallel_for(0, blocks * splits, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / splits, sp = w % splits;
        const int64_t r0 = b * block_rows, nr = std::min<int64_t>(block_rows, rows - r0);
        const int64_t a0 = std::min(a_total, sp * span), a1 = std::min(a_total, a0 + span);
        best_atoms_any(&res[r0 * d], nr, d, table, ar, a0, a1, a_total, &part_abs[sp * rows + r0], &part_idx[sp * rows + r0]);
      }
    });
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float bv = -1.0f;
        int32_t bi = 0;
        for (int64_t sp = 0; sp < splits; ++sp) {
          if (part_abs[sp * rows + r] > bv) { bv = part_abs[sp * rows + r]; bi = part_idx[sp * rows + r]; }
        }
        picks[r * s_n + k] = bi;
        alignas(64) float abuf[256];
        const float* atom = ar.row(bi, abuf);
        if (!omp) {  // matching pursuit: the pick's quantised correlation, off the residual
          float* rr = &res[r * d];
          uint32_t code = 0;
          const float c = quantize(f, dot(rr, atom, d), k, lad, m, code);
          mp_codes[r * s_n + k] = code;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) rr[j] -= c * atom[j];
          continue;
        }
        // Gram-Schmidt: the least-squares residual of x on the picked atoms, incrementally.
        float* q = &basis[(r * s_n + k) * d];
        std::copy(atom, atom + d, q);
        for (int64_t i = 0; i < k; ++i) {
          const float* qi = &basis[(r * s_n + i) * d];
          const float c = dot(qi, atom, d);
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) q[j] -= c * qi[j];
        }
        const float norm = std::sqrt(dot(q, q, d));
        if (norm < 1e-6f) {  // a re-picked (or parallel) atom adds nothing
          std::fill(q, q + d, 0.0f);
          continue;
        }
        for (int64_t j = 0; j < d; ++j) q[j] /= norm;
        float* rr = &res[r * d];
        const float c = dot(q, rr, d);
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) rr[j] -= c * q[j];
      }
    });
  }

  // Quantised coefficients with sequential error feedback (as the reference OMP): atom k is
  // quantised from the least-squares fit of the remaining target on atoms k..S-1.
  at::Tensor err = at::empty({n, h}, x.options());
  float* errp = err.data_ptr<float>();
  uint8_t* cache = kv_cache.data_ptr<uint8_t>();
  const int64_t bs = kv_cache.size(2), cbytes = kv_cache.size(3);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float ridge = 1e-6f;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> gram(s_n * s_n), rhs(s_n), target(d);
    alignas(64) float b1[256], b2[256];
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t* idx = &picks[r * s_n];
      for (int64_t i = 0; omp && i < s_n; ++i)
        for (int64_t j = 0; j <= i; ++j)
          gram[i * s_n + j] = gram[j * s_n + i] = dot(ar.row(idx[i], b1), ar.row(idx[j], b2), d);
      uint8_t buf[kMaxCodeBytes + 8];
      std::memset(buf, 0, sizeof(buf));
      if (!omp) {  // codes chosen in the pursuit; the residual is the final one
        for (int64_t k = 0; k < s_n; ++k) {
          write_field(buf, k * f.coef_bits, f.coef_bits, mp_codes[r * s_n + k]);
          write_field(buf, s_n * f.coef_bits + k * f.index_bits, f.index_bits, static_cast<uint32_t>(idx[k]));
        }
        std::copy(&res[r * d], &res[r * d] + d, target.begin());
      }
      if (omp) std::copy(&x0[r * d], &x0[r * d] + d, target.begin());
      for (int64_t k = 0; omp && k < s_n; ++k) {
        for (int64_t i = k; i < s_n; ++i) rhs[i] = dot(ar.row(idx[i], b1), target.data(), d);
        const float free = first_of_solve(&gram[k * s_n + k], s_n, &rhs[k], s_n - k, ridge);
        uint32_t code = 0;
        const float c = quantize(f, free, k, lad, m, code);
        write_field(buf, k * f.coef_bits, f.coef_bits, code);
        write_field(buf, s_n * f.coef_bits + k * f.index_bits, f.index_bits, static_cast<uint32_t>(idx[k]));
        const float* atom = ar.row(idx[k], b1);
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) target[j] -= c * atom[j];
      }
      const float xn = std::sqrt(dot(&x0[r * d], &x0[r * d], d));
      errp[r] = std::sqrt(dot(target.data(), target.data(), d)) / std::max(xn, 1e-12f);
      const int64_t slot = sp[r / h], head = r % h;
      TORCH_CHECK(slot >= 0 && slot / bs < kv_cache.size(0), "slot outside the KV cache");
      uint8_t* dst = cache + (((slot / bs) * h + head) * bs + slot % bs) * cbytes + f.offset;
      std::memcpy(dst, buf, f.bytes);
    }
  });
  return err;
}

// Reads one byte of every 64-byte line of t (threads split the range), so that the rows a
// kernel gathers next are cache hits.
namespace {
void warm_cache(const at::Tensor& t) {
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  const int64_t lines = (t.numel() * t.element_size() + 63) / 64;
  at::parallel_for(0, lines, 4096, [&](int64_t l0, int64_t l1) {
    uint32_t sink = 0;
    for (int64_t l = l0; l < l1; ++l) sink += p[l * 64];
    asm volatile("" : : "r"(sink));  // the loads must happen; their values are not needed
  });
}
}  // namespace

#if defined(CSR_V16)
// What the vectorised rows of decode_dense read (decode_dense_rows, defined with the
// attention kernel's register helpers below).
struct DenseArgs {
  const Decoder *dk, *dv;
  const uint8_t *cache, *cache_end;
  const int64_t *blocks, *counts, *pos0;
  const c10::BFloat16 *ka, *va;
  const float *cos, *sin;
  int64_t rope_rows, h, bs, cb, koff, voff;
  at::BFloat16 *ok16, *ov16;
  float *ok32, *ov32;
};
template <int D>
void decode_dense_rows(const DenseArgs& A, int64_t w0, int64_t w1);
#endif

// decode_dense: K and V of the first counts[r] slots of blocks[r] (positions pos0[r] + offset)
// into out_k / out_v [R * BS, H, D] at row r * BS + offset; keys rotated forward (pre-RoPE
// dictionaries) so they read as vLLM's post-RoPE keys.
void decode_dense(const at::Tensor& kv_cache, const at::Tensor& blocks_in, const at::Tensor& counts_in,
                  const at::Tensor& pos0_in, c10::IntArrayRef key_fmt, c10::IntArrayRef value_fmt,
                  const at::Tensor& key_atoms_in, const at::Tensor& key_ladder_in,
                  const at::Tensor& value_atoms_in, const at::Tensor& value_ladder_in,
                  const at::Tensor& rope_cos, const at::Tensor& rope_sin, bool apply,
                  at::Tensor& out_k, at::Tensor& out_v) {
  const Format fk = format_of(key_fmt), fv = format_of(value_fmt);
  const at::Tensor blocks = blocks_in.to(at::kLong).contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const at::Tensor pos0 = pos0_in.to(at::kLong).contiguous();
  // bf16 dictionaries are read as they are; anything else as float32.
  const bool bf16_atoms = key_atoms_in.scalar_type() == at::kBFloat16 && value_atoms_in.scalar_type() == at::kBFloat16;
  const at::Tensor ka = bf16_atoms ? key_atoms_in.contiguous() : key_atoms_in.to(at::kFloat).contiguous();
  const at::Tensor va = bf16_atoms ? value_atoms_in.contiguous() : value_atoms_in.to(at::kFloat).contiguous();
  const at::Tensor kl = key_ladder_in.numel() ? key_ladder_in.to(at::kFloat).contiguous() : key_ladder_in;
  const at::Tensor vl = value_ladder_in.numel() ? value_ladder_in.to(at::kFloat).contiguous() : value_ladder_in;
  TORCH_CHECK(kv_cache.scalar_type() == at::kByte && kv_cache.is_contiguous(), "kv_cache must be contiguous uint8");
  TORCH_CHECK(out_k.is_contiguous() && out_v.is_contiguous() && out_k.sizes() == out_v.sizes(), "outputs must be contiguous [R*BS, H, D]");
  const int64_t h = kv_cache.size(1), bs = kv_cache.size(2), cb = kv_cache.size(3), d = ka.size(1);
  const int64_t r_n = blocks.numel();
  TORCH_CHECK(out_k.size(0) >= r_n * bs && out_k.size(1) == h && out_k.size(2) == d, "outputs too small");
  at::Tensor cos, sin;
  if (apply) { cos = rope_cos.to(at::kFloat).contiguous(); sin = rope_sin.to(at::kFloat).contiguous(); }
  const int64_t mk = fk.kind == 2 ? kl.size(1) : 0, mv = fv.kind == 2 ? vl.size(1) : 0;
  const float* klp = fk.kind == 2 ? kl.data_ptr<float>() : nullptr;
  const float* vlp = fv.kind == 2 ? vl.data_ptr<float>() : nullptr;
  const uint8_t* cache = kv_cache.data_ptr<uint8_t>();
  const bool bf16 = out_k.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || out_k.scalar_type() == at::kFloat, "outputs must be bfloat16 or float32");
  if (r_n > 0) {  // rows gathered at random next: stream them in first (see decode_attention)
    warm_cache(ka);
    warm_cache(va);
  }
#if defined(CSR_V16)
  if (bf16_atoms && (d == 64 || d == 128 || d == 256)) {  // the vectorised rows (below)
    const Decoder dk(fk, klp, mk), dv(fv, vlp, mv);
    const DenseArgs args{&dk, &dv, cache, cache + kv_cache.numel(), blocks.data_ptr<int64_t>(),
                         counts.data_ptr<int64_t>(), pos0.data_ptr<int64_t>(),
                         ka.data_ptr<c10::BFloat16>(), va.data_ptr<c10::BFloat16>(),
                         apply ? cos.data_ptr<float>() : nullptr, apply ? sin.data_ptr<float>() : nullptr,
                         apply ? cos.size(0) : 0, h, bs, cb, fk.offset, fv.offset,
                         bf16 ? out_k.data_ptr<at::BFloat16>() : nullptr,
                         bf16 ? out_v.data_ptr<at::BFloat16>() : nullptr,
                         bf16 ? nullptr : out_k.data_ptr<float>(), bf16 ? nullptr : out_v.data_ptr<float>()};
    for (int64_t r = 0; r < r_n; ++r) {
      const int64_t cnt = std::min(args.counts[r], bs);
      TORCH_CHECK(!apply || cnt <= 0 || args.pos0[r] + cnt - 1 < args.rope_rows, "position beyond the RoPE table");
    }
    at::parallel_for(0, r_n * h, 1, [&](int64_t w0, int64_t w1) {
      if (d == 64) decode_dense_rows<64>(args, w0, w1);
      else if (d == 128) decode_dense_rows<128>(args, w0, w1);
      else decode_dense_rows<256>(args, w0, w1);
    });
    return;
  }
#endif
  at::parallel_for(0, r_n * h, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> k(d), kr(d), v(d);
    Code code;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t r = w / h, head = w % h;
      const int64_t blk = blocks.data_ptr<int64_t>()[r];
      const int64_t cnt = std::min(counts.data_ptr<int64_t>()[r], bs);
      for (int64_t o = 0; o < cnt; ++o) {
        const uint8_t* slot = cache + ((blk * h + head) * bs + o) * cb;
        unpack(slot, fk, klp, mk, code);
        if (bf16_atoms) rebuild(code, fk.atoms, ka.data_ptr<at::BFloat16>(), d, k.data());
        else rebuild(code, fk.atoms, ka.data_ptr<float>(), d, k.data());
        const float* kk = k.data();
        if (apply) {
          const int64_t p = pos0.data_ptr<int64_t>()[r] + o;
          TORCH_CHECK(p < cos.size(0), "position beyond the RoPE table");
          rope(k.data(), cos.data_ptr<float>() + p * d, sin.data_ptr<float>() + p * d, d, 1.0f, kr.data());
          kk = kr.data();
        }
        unpack(slot, fv, vlp, mv, code);
        if (bf16_atoms) rebuild(code, fv.atoms, va.data_ptr<at::BFloat16>(), d, v.data());
        else rebuild(code, fv.atoms, va.data_ptr<float>(), d, v.data());
        const int64_t row = ((r * bs + o) * h + head) * d;
        if (bf16) {
          auto* ok = out_k.data_ptr<at::BFloat16>() + row;
          auto* ov = out_v.data_ptr<at::BFloat16>() + row;
          for (int64_t j = 0; j < d; ++j) { ok[j] = kk[j]; ov[j] = v[j]; }
        } else {
          std::copy(kk, kk + d, out_k.data_ptr<float>() + row);
          std::copy(v.data(), v.data() + d, out_v.data_ptr<float>() + row);
        }
      }
    }
  });
}

namespace {
// Tokens a work item of decode attention covers: long contexts are split so that both cores
// work on one sequence (partials merged by their log-sum-exp).
constexpr int64_t kSplitTokens = 512;
constexpr int64_t kTile = 32;

template <typename T>
struct Rows {
  const T* p;
  int64_t stride;  // elements between rows
};
}  // namespace

// Everything one work item of decode attention reads, as raw pointers.
struct AttnArgs {
  Format fk, fv;
  const Decoder *dk, *dv;
  const uint8_t* cache_end;
  const float *q, *ka, *va, *klp, *vlp, *cos, *sin;
  int64_t mk, mv, h, g, d, bs, cb, hq, wlen, table_cols, va_rows;
  const uint8_t* cache;
  const int64_t *tab, *lens, *rows, *widx;
  const at::Tensor *own_k, *own_v, *win;
  bool apply;
  float scale;
};

// Value accumulation in the dictionary's domain ("bins"): sum_t p_t v_t = sum_a w_a D_a with
// w_a = sum over (t, s) of p_t c_ts where idx_ts = a, so each coded value costs S vector
// adds (all G heads at once) instead of S row gathers, plus one A x D pass per (request, KV
// head). Taken when a context holds at least kBinFactor x A value atom references
// (t * S >= kBinFactor * A). Outside the AVX-512 kernel (vectorised head_dim) never.
constexpr int64_t kBinFactor = 1;

// -- 16 float lanes: one zmm register with AVX-512, a pair of ymm registers with AVX2 --------
// The attention kernel below is written once against these; with AVX2 (Zen 2/3, Intel before
// Skylake-SP) each op is two 8-lane ops, the same arithmetic in the same order, so both builds
// agree bit for bit on everything but exp's last place.
#if defined(CSR_V16)
namespace v16 {
#define CSR_V16_INLINE inline __attribute__((always_inline))
#if defined(__AVX512F__)
using F = __m512;
CSR_V16_INLINE F set1(float x) { return _mm512_set1_ps(x); }
CSR_V16_INLINE F setzero() { return _mm512_setzero_ps(); }
CSR_V16_INLINE F loadu(const float* p) { return _mm512_loadu_ps(p); }
CSR_V16_INLINE F load(const float* p) { return _mm512_load_ps(p); }
CSR_V16_INLINE void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
CSR_V16_INLINE void store(float* p, F v) { _mm512_store_ps(p, v); }
CSR_V16_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
CSR_V16_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
CSR_V16_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
CSR_V16_INLINE F max(F a, F b) { return _mm512_max_ps(a, b); }
CSR_V16_INLINE F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
CSR_V16_INLINE F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
CSR_V16_INLINE bool any_nonzero(F v) { return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0; }
CSR_V16_INLINE F load_bf16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
CSR_V16_INLINE F round_nearest(F x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
CSR_V16_INLINE F scale_pow2(F p, F i) { return _mm512_scalef_ps(p, i); }  // p * 2^i
// The lane sums of four vectors, as one vector (sum a, sum b, sum c, sum d).
CSR_V16_INLINE __m128 hsum4(F a, F b, F c, F d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#else
struct F {
  __m256 lo, hi;
};
CSR_V16_INLINE F set1(float x) { const __m256 v = _mm256_set1_ps(x); return {v, v}; }
CSR_V16_INLINE F setzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
CSR_V16_INLINE F loadu(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
CSR_V16_INLINE F load(const float* p) { return {_mm256_load_ps(p), _mm256_load_ps(p + 8)}; }
CSR_V16_INLINE void storeu(float* p, F v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
CSR_V16_INLINE void store(float* p, F v) { _mm256_store_ps(p, v.lo); _mm256_store_ps(p + 8, v.hi); }
CSR_V16_INLINE F add(F a, F b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
CSR_V16_INLINE F sub(F a, F b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
CSR_V16_INLINE F mul(F a, F b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
CSR_V16_INLINE F max(F a, F b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
CSR_V16_INLINE F fmadd(F a, F b, F c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
CSR_V16_INLINE F fnmadd(F a, F b, F c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
CSR_V16_INLINE bool any_nonzero(F v) {
  const __m256 z = _mm256_setzero_ps();
  return (_mm256_movemask_ps(_mm256_cmp_ps(v.lo, z, _CMP_NEQ_UQ)) | _mm256_movemask_ps(_mm256_cmp_ps(v.hi, z, _CMP_NEQ_UQ))) != 0;
}
CSR_V16_INLINE F load_bf16(const c10::BFloat16* p) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(lo), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(hi), 16))};
}
CSR_V16_INLINE F round_nearest(F x) {
  return {_mm256_round_ps(x.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
          _mm256_round_ps(x.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
CSR_V16_INLINE __m256 scale_pow2_8(__m256 p, __m256 i) {  // p * 2^i, i integral in [-126, 0]
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
CSR_V16_INLINE F scale_pow2(F p, F i) { return {scale_pow2_8(p.lo, i.lo), scale_pow2_8(p.hi, i.hi)}; }
CSR_V16_INLINE __m128 hsum4(F a, F b, F c, F d) {
  // Each 8-lane half as the 512-bit version's 128-bit lanes: pairs, then quads, then halves.
  auto four = [](__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    const __m256d abd = _mm256_castps_pd(ab), cdd = _mm256_castps_pd(cd);
    return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(abd, cdd)), _mm256_castpd_ps(_mm256_unpackhi_pd(abd, cdd)));
  };
  const __m256 s = _mm256_add_ps(four(a.lo, b.lo, c.lo, d.lo), four(a.hi, b.hi, c.hi, d.hi));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif
// exp(x) for x <= 0 (softmax weights): 2^(x log2 e) as 2^i * p(f), p a degree-6 polynomial
// (relative error ~2e-7, below the bf16 output's rounding).
CSR_V16_INLINE F exp_nonpos(F x) {
  x = max(x, set1(-87.0f));
  const F t = mul(x, set1(1.44269504088896341f));
  const F i = round_nearest(t);
  const F f = sub(t, i);  // [-0.5, 0.5]
  F p = set1(1.535336188319500e-4f);
  p = fmadd(p, f, set1(1.339887440266574e-3f));
  p = fmadd(p, f, set1(9.618437357674640e-3f));
  p = fmadd(p, f, set1(5.550332471162809e-2f));
  p = fmadd(p, f, set1(2.402264791363012e-1f));
  p = fmadd(p, f, set1(6.931472028550421e-1f));
  p = fmadd(p, f, set1(1.0f));
  return scale_pow2(p, i);
}
}  // namespace v16
#endif

#if defined(CSR_V16)
// Register-level helpers of the attention kernel: always inlined (an out-of-line call passes
// the vectors through memory once per token).
#define CSR_VINLINE inline __attribute__((always_inline))

// exp(x) for x <= 0 (softmax weights): 2^(x log2 e) as 2^i * p(f), p a degree-6 polynomial
// (relative error ~2e-7, below the bf16 output's rounding).
CSR_VINLINE v16::F exp_ps(v16::F x) { return v16::exp_nonpos(x); }

template <int D>
struct VecD {
  static constexpr int U = D / 16;
  v16::F v[U];
};

CSR_VINLINE v16::F load16(const float* p) { return v16::loadu(p); }
CSR_VINLINE v16::F load16(const c10::BFloat16* p) { return v16::load_bf16(p); }

template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < d * int64_t(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

template <int D, typename T>
CSR_VINLINE void rebuild_v(const Code& code, int64_t atoms_n, const T* atoms, VecD<D>& out) {
  for (int u = 0; u < VecD<D>::U; ++u) out.v[u] = v16::setzero();
  for (int64_t s = 0; s < atoms_n; ++s) {
    const v16::F c = v16::set1(code.coef[s]);
    const T* a = atoms + int64_t(code.idx[s]) * D;
    for (int u = 0; u < VecD<D>::U; ++u) out.v[u] = v16::fmadd(c, load16(a + 16 * u), out.v[u]);
  }
}

template <int D>
CSR_VINLINE void rope_v(VecD<D>& x, const float* cos, const float* sin) {
  constexpr int H2 = VecD<D>::U / 2;
  for (int u = 0; u < H2; ++u) {
    const v16::F lo = x.v[u], hi = x.v[u + H2];
    x.v[u] = v16::fnmadd(hi, v16::loadu(sin + 16 * u), v16::mul(lo, v16::loadu(cos + 16 * u)));
    x.v[u + H2] = v16::fmadd(lo, v16::loadu(sin + 16 * (u + H2)), v16::mul(hi, v16::loadu(cos + 16 * (u + H2))));
  }
}

template <int D>
CSR_VINLINE void load_v(const float* src, VecD<D>& x) {
  for (int u = 0; u < VecD<D>::U; ++u) x.v[u] = v16::loadu(src + 16 * u);
}

// A token's scores for its G query heads sit side by side in GP lanes (G rounded up to 4, 8
// or 16: "token-major"), so one vector op updates all G heads' value bins, and four heads'
// dot products share one horizontal reduction (hsum4) instead of one each.
template <int GP>
struct GVec;
template <>
struct GVec<4> {
  using V = __m128;
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, V v) { _mm_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm_fmadd_ps(a, b, c); }
  static V set1(float x) { return _mm_set1_ps(x); }
  static bool any(V v) { return _mm_movemask_ps(_mm_cmpneq_ps(v, _mm_setzero_ps())) != 0; }
};
template <>
struct GVec<8> {
  using V = __m256;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static bool any(V v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ)) != 0; }
};
template <>
struct GVec<16> {
  using V = v16::F;
  static V load(const float* p) { return v16::loadu(p); }
  static void store(float* p, V v) { v16::storeu(p, v); }
  static V fma(V a, V b, V c) { return v16::fmadd(a, b, c); }
  static V set1(float x) { return v16::set1(x); }
  static bool any(V v) { return v16::any_nonzero(v); }
};

// The lane sums of four vectors, as one vector (sum a, sum b, sum c, sum d).

// Scores of key k against the G scaled queries qs [G, D], into out[0, GP) (lanes >= G: 0).
template <int D, int GP>
CSR_VINLINE void group_scores(const VecD<D>& k, const float* qs, int64_t g, float* out) {
  for (int j = 0; j < GP; j += 4) {
    v16::F s[4];
    for (int y = 0; y < 4; ++y) {
      if (j + y >= g) {
        s[y] = v16::setzero();
        continue;
      }
      const float* qy = qs + (j + y) * D;
      s[y] = v16::mul(k.v[0], v16::load(qy));
      for (int u = 1; u < VecD<D>::U; ++u) s[y] = v16::fmadd(k.v[u], v16::load(qy + 16 * u), s[y]);
    }
    _mm_storeu_ps(out + j, v16::hsum4(s[0], s[1], s[2], s[3]));
  }
}

// Per-head max / sum of token-major scores sc [n, GP] (n * GP a multiple of 16) into out[GP].
template <int GP, bool kMax>
inline void fold_heads(const float* sc, int64_t n, float* out) {
  v16::F r = v16::set1(kMax ? -INFINITY : 0.0f);
  for (int64_t x = 0; x < n * GP; x += 16) {
    const v16::F v = v16::loadu(sc + x);
    r = kMax ? v16::max(r, v) : v16::add(r, v);
  }
  alignas(64) float lanes[16];
  v16::store(lanes, r);
  for (int y = 0; y < GP; ++y) out[y] = lanes[y];
  for (int l = GP; l < 16; ++l) out[l % GP] = kMax ? std::max(out[l % GP], lanes[l]) : out[l % GP] + lanes[l];
}

// exp(sc - m[head]) in place over token-major scores sc [n, GP] (n * GP a multiple of 16).
template <int GP>
inline void exp_heads(float* sc, int64_t n, const float* m) {
  alignas(64) float rep[16];
  for (int l = 0; l < 16; ++l) rep[l] = m[l % GP];
  const v16::F mv = v16::load(rep);
  for (int64_t x = 0; x < n * GP; x += 16)
    v16::storeu(sc + x, exp_ps(v16::sub(v16::loadu(sc + x), mv)));
}

// One work item: request i, KV head `head`, tokens [t0, t1); partial softmax state out.
// Tiles of kT tokens, software-pipelined: while a tile's keys are rebuilt, the next tile's
// codes are unpacked and its key atoms prefetched, and this tile's value atoms are in flight,
// so the dictionary's random row gathers overlap instead of stalling one by one. A tile
// inside one block and before the exact window takes its slots by stride, without the
// per-token block lookup and window test.
// kBins: values through bins (above); the item then covers the whole context, scores are
// kept for a two-pass softmax (bins need each token's final weight).
template <int D, int GP, typename T, bool kBins>
void attend_item(const AttnArgs& A, const T* ka, const T* va, int64_t i, int64_t head, int64_t t0, int64_t t1, float* m,
                 float* l, float* acc) {
  constexpr int64_t kT = 16;
  using G = GVec<GP>;
  const int64_t g = A.g, h = A.h, bs = A.bs;
  const int64_t t = A.lens[i], row = A.rows[i];
  const int64_t wstart = t - 1 - A.wlen;
  alignas(64) float qs[16 * D];
  alignas(64) float ebuf[D];
  alignas(64) float tile_scores[kT * GP];
  static thread_local std::vector<float> all_scores, bins;  // [t1 - t0 (+ pad), GP], [A, GP] (kBins)
  const int64_t span = t1 - t0;
  if (kBins) all_scores.assign((span + 16) * GP, -INFINITY);
  // Raw pointers: through the thread_local vectors every store would reload them (TLS calls).
  float* const sc_all = kBins ? all_scores.data() : nullptr;
  for (int64_t x = 0; x < g * D; ++x) qs[x] = A.q[(row * A.hq + head * g) * D + x] * A.scale;
  for (int64_t y = 0; y < g; ++y) { m[y] = -INFINITY; l[y] = 0.0f; }
  std::fill(acc, acc + g * D, 0.0f);
  auto exact = [&](int64_t p, int which) -> const float* {
    if (p == t - 1) {
      load_row(which ? *A.own_v : *A.own_k, row * h + head, D, ebuf);
      return ebuf;
    }
    const int64_t wi = p - wstart;
    if (A.wlen && wi >= 0 && wi < A.wlen) {
      const int64_t e = A.widx[i * A.wlen + wi];
      if (e >= 0) {
        load_row(*A.win, ((((e / bs) * h + head) * bs + e % bs) * 2) + which, D, ebuf);
        return ebuf;
      }
    }
    return nullptr;
  };
  const int64_t* trow = A.tab + i * A.table_cols;
  auto slot_of = [&](int64_t p) { return A.cache + ((trow[p / bs] * h + head) * bs + p % bs) * A.cb; };
  // Tokens [p0, p0 + tn) all coded and in one block: their slots are one stride apart.
  auto plain_tile = [&](int64_t p0, int64_t tn) { return p0 + tn - 1 < wstart && p0 % bs + tn <= bs; };
  VecD<D> k, v;
  // Two tiles in flight; kx holds a token's exact key (copied out of ebuf).
  struct Tile {
    Code kc[kT], vc[kT];
    alignas(64) float kx[kT][D];
    bool is_exact[kT];
  };
  static thread_local Tile tiles[2];
  auto stage = [&](int64_t p0, Tile& tl) {
    const int64_t tn = std::min(kT, t1 - p0);
    const bool plain = plain_tile(p0, tn);
    const uint8_t* base = plain ? slot_of(p0) : nullptr;
    for (int64_t x = 0; x < tn; ++x) {
      const int64_t p = p0 + x;
      const float* e = plain ? nullptr : exact(p, 0);
      tl.is_exact[x] = e != nullptr;
      if (e) {
        std::copy(e, e + D, tl.kx[x]);
        continue;
      }
      const uint8_t* slot = plain ? base + x * A.cb : slot_of(p);
      A.dk->unpack(slot + A.fk.offset, A.cache_end, tl.kc[x]);
      if (!kBins) A.dv->unpack(slot + A.fv.offset, A.cache_end, tl.vc[x]);
      for (int64_t s = 0; s < A.fk.atoms; ++s) prefetch_row(ka + int64_t(tl.kc[x].idx[s]) * D, D);
    }
  };
  int cur = 0;
  if (t0 < t1) stage(t0, tiles[0]);
  for (int64_t p0 = t0; p0 < t1; p0 += kT, cur ^= 1) {
    Tile& tl = tiles[cur];
    const int64_t tn = std::min(kT, t1 - p0);
    for (int64_t x = 0; !kBins && x < tn; ++x) {
      if (tl.is_exact[x]) continue;
      for (int64_t s = 0; s < A.fv.atoms; ++s) prefetch_row(va + int64_t(tl.vc[x].idx[s]) * D, D);
    }
    if (p0 + kT < t1) stage(p0 + kT, tiles[cur ^ 1]);
    float* scores = kBins ? sc_all + (p0 - t0) * GP : tile_scores;
    for (int64_t x = 0; x < tn; ++x) {
      const int64_t p = p0 + x;
      if (tl.is_exact[x]) {
        load_v<D>(tl.kx[x], k);
      } else {
        rebuild_v<D>(tl.kc[x], A.fk.atoms, ka, k);
        if (A.apply) rope_v<D>(k, A.cos + p * D, A.sin + p * D);
      }
      group_scores<D, GP>(k, qs, g, scores + x * GP);
    }
    if (kBins) continue;
    std::fill(scores + tn * GP, scores + kT * GP, -INFINITY);
    alignas(64) float mx[GP], sum[GP];
    fold_heads<GP, true>(scores, kT, mx);
    float corr[GP];
    for (int64_t y = 0; y < GP; ++y) {
      if (y >= g) {
        mx[y] = 0.0f;
        continue;
      }
      mx[y] = std::max(m[y], mx[y]);
      corr[y] = m[y] == -INFINITY ? 0.0f : std::exp(m[y] - mx[y]);
    }
    exp_heads<GP>(scores, kT, mx);
    fold_heads<GP, false>(scores, kT, sum);
    for (int64_t y = 0; y < g; ++y) {
      l[y] = l[y] * corr[y] + sum[y];
      if (corr[y] != 1.0f) {
        const v16::F cv = v16::set1(corr[y]);
        for (int u = 0; u < VecD<D>::U; ++u) v16::storeu(acc + y * D + 16 * u, v16::mul(cv, v16::loadu(acc + y * D + 16 * u)));
      }
      m[y] = mx[y];
    }
    for (int64_t x = 0; x < tn; ++x) {
      const int64_t p = p0 + x;
      const float* ve = tl.is_exact[x] ? exact(p, 1) : nullptr;  // a token is exact for K and V alike
      if (ve) {
        load_v<D>(ve, v);
      } else {
        rebuild_v<D>(tl.vc[x], A.fv.atoms, va, v);
      }
      for (int64_t y = 0; y < g; ++y) {
        const v16::F e = v16::set1(scores[x * GP + y]);
        float* a = acc + y * D;
        for (int u = 0; u < VecD<D>::U; ++u) v16::storeu(a + 16 * u, v16::fmadd(e, v.v[u], v16::loadu(a + 16 * u)));
      }
    }
  }
  if (!kBins) return;
  // Softmax weights of every token (second pass), then the values: exact ones directly,
  // coded ones into the bins, and the bins through the dictionary once.
  const int64_t n16 = (span * GP + 15) / 16 * 16 / GP;  // tokens covered by whole vectors
  alignas(64) float mx[GP], sum[GP];
  fold_heads<GP, true>(sc_all, n16, mx);
  for (int64_t y = g; y < GP; ++y) mx[y] = 0.0f;
  exp_heads<GP>(sc_all, n16, mx);
  fold_heads<GP, false>(sc_all, n16, sum);
  for (int64_t y = 0; y < g; ++y) { m[y] = mx[y]; l[y] = sum[y]; }
  const int64_t a_n = A.va_rows;
  bins.assign(a_n * GP, 0.0f);
  float* const bin = bins.data();
  Code vcode;
  for (int64_t p0 = t0; p0 < t1; p0 += kT) {
    const int64_t tn = std::min(kT, t1 - p0);
    const bool plain = plain_tile(p0, tn);
    const uint8_t* base = plain ? slot_of(p0) : nullptr;
    for (int64_t x = 0; x < tn; ++x) {
      const int64_t p = p0 + x;
      const float* sc = sc_all + (p - t0) * GP;
      if (!plain && exact(p, 0)) {  // exact for K and V alike
        load_v<D>(exact(p, 1), v);
        for (int64_t y = 0; y < g; ++y) {
          const v16::F e = v16::set1(sc[y]);
          float* a = acc + y * D;
          for (int u = 0; u < VecD<D>::U; ++u) v16::storeu(a + 16 * u, v16::fmadd(e, v.v[u], v16::loadu(a + 16 * u)));
        }
        continue;
      }
      A.dv->unpack((plain ? base + x * A.cb : slot_of(p)) + A.fv.offset, A.cache_end, vcode);
      const typename G::V ev = G::load(sc);
      for (int64_t s = 0; s < A.fv.atoms; ++s) {
        float* w = bin + int64_t(vcode.idx[s]) * GP;
        G::store(w, G::fma(G::set1(vcode.coef[s]), ev, G::load(w)));
      }
    }
  }
  // The bins through the dictionary, YB heads at a time, their outputs in registers.
  constexpr int YB = D == 64 ? 4 : (D == 128 ? 2 : 1);
  for (int64_t y0 = 0; y0 < g; y0 += YB) {
    const int64_t yn = std::min<int64_t>(YB, g - y0);
    VecD<D> o[YB];
    for (int y = 0; y < YB; ++y)
      for (int u = 0; u < VecD<D>::U; ++u) o[y].v[u] = v16::setzero();
    for (int64_t a = 0; a < a_n; ++a) {
      const float* w = bin + a * GP;
      if (!G::any(G::load(w))) continue;  // an atom no token uses
      const T* row_a = va + a * D;
      VecD<D> atom;
      for (int u = 0; u < VecD<D>::U; ++u) atom.v[u] = load16(row_a + 16 * u);
      for (int y = 0; y < YB; ++y) {
        const v16::F wy = v16::set1(y < yn ? w[y0 + y] : 0.0f);
        for (int u = 0; u < VecD<D>::U; ++u) o[y].v[u] = v16::fmadd(wy, atom.v[u], o[y].v[u]);
      }
    }
    for (int64_t y = 0; y < yn; ++y) {
      float* out = acc + (y0 + y) * D;
      for (int u = 0; u < VecD<D>::U; ++u) v16::storeu(out + 16 * u, v16::add(o[y].v[u], v16::loadu(out + 16 * u)));
    }
  }
}
#endif

#if defined(CSR_V16)
template <int D, typename T>
void attend_dispatch_d(const AttnArgs& A, const T* ka, const T* va, bool bins, int64_t i, int64_t head, int64_t t0,
                       int64_t t1, float* m, float* l, float* acc) {
  if (A.g <= 4) {
    if (bins) attend_item<D, 4, T, true>(A, ka, va, i, head, t0, t1, m, l, acc);
    else attend_item<D, 4, T, false>(A, ka, va, i, head, t0, t1, m, l, acc);
  } else if (A.g <= 8) {
    if (bins) attend_item<D, 8, T, true>(A, ka, va, i, head, t0, t1, m, l, acc);
    else attend_item<D, 8, T, false>(A, ka, va, i, head, t0, t1, m, l, acc);
  } else {
    if (bins) attend_item<D, 16, T, true>(A, ka, va, i, head, t0, t1, m, l, acc);
    else attend_item<D, 16, T, false>(A, ka, va, i, head, t0, t1, m, l, acc);
  }
}

template <typename T>
void attend_dispatch(const AttnArgs& A, const T* ka, const T* va, bool bins, int64_t i, int64_t head, int64_t t0,
                     int64_t t1, float* m, float* l, float* acc) {
  if (A.d == 64) attend_dispatch_d<64>(A, ka, va, bins, i, head, t0, t1, m, l, acc);
  else if (A.d == 128) attend_dispatch_d<128>(A, ka, va, bins, i, head, t0, t1, m, l, acc);
  else attend_dispatch_d<256>(A, ka, va, bins, i, head, t0, t1, m, l, acc);
}
#endif

#if defined(CSR_V16)
// decode_dense's rows with bf16 dictionaries and a vectorised head_dim: codes through the
// Decoder, K and V rebuilt in registers (rebuild_v, rope_v as decode attention does).
template <int D>
void decode_dense_rows(const DenseArgs& A, int64_t w0, int64_t w1) {
  Code code;
  VecD<D> k, v;
  alignas(64) float kb[D], vb[D];
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t r = w / A.h, head = w % A.h;
    const int64_t cnt = std::min(A.counts[r], A.bs);
    for (int64_t o = 0; o < cnt; ++o) {
      const uint8_t* slot = A.cache + ((A.blocks[r] * A.h + head) * A.bs + o) * A.cb;
      A.dk->unpack(slot + A.koff, A.cache_end, code);
      rebuild_v<D>(code, A.dk->f.atoms, A.ka, k);
      if (A.cos) {
        const int64_t p = A.pos0[r] + o;
        rope_v<D>(k, A.cos + p * D, A.sin + p * D);
      }
      A.dv->unpack(slot + A.voff, A.cache_end, code);
      rebuild_v<D>(code, A.dv->f.atoms, A.va, v);
      const int64_t row = ((r * A.bs + o) * A.h + head) * D;
      if (A.ok32) {
        for (int u = 0; u < VecD<D>::U; ++u) {
          v16::storeu(A.ok32 + row + 16 * u, k.v[u]);
          v16::storeu(A.ov32 + row + 16 * u, v.v[u]);
        }
        continue;
      }
      for (int u = 0; u < VecD<D>::U; ++u) {
        v16::store(kb + 16 * u, k.v[u]);
        v16::store(vb + 16 * u, v.v[u]);
      }
      for (int64_t j = 0; j < D; ++j) {  // c10's rounding, as the scalar path
        A.ok16[row + j] = kb[j];
        A.ov16[row + j] = vb[j];
      }
    }
  }
}
#endif

// decode_attention: one decode query per request i (row rows[i] of query [N, Hq, D]) over its
// seq_lens[i] tokens: token t-1 exact from own_k/own_v [N, H, D] (row rows[i]); tokens whose
// window index win_index[i, w] >= 0 (position t-1-W+w) exact from the window store
// [cap, H, BS, 2, D] (index = pool slot * BS + offset); every other token from its code in the
// pages (block_table [B, M]). Writes output [N, Hq, D] rows rows[i].
void decode_attention(const at::Tensor& query_in, const at::Tensor& kv_cache,
                      const at::Tensor& block_table_in, const at::Tensor& seq_lens_in,
                      const at::Tensor& rows_in, c10::IntArrayRef key_fmt,
                      c10::IntArrayRef value_fmt, const at::Tensor& key_atoms_in,
                      const at::Tensor& key_ladder_in, const at::Tensor& value_atoms_in,
                      const at::Tensor& value_ladder_in, const at::Tensor& rope_cos,
                      const at::Tensor& rope_sin, bool apply, const at::Tensor& win_store_in,
                      const at::Tensor& win_index_in, const at::Tensor& own_k_in,
                      const at::Tensor& own_v_in, double scale, at::Tensor& output) {
  const Format fk = format_of(key_fmt), fv = format_of(value_fmt);
  const at::Tensor q = query_in.to(at::kFloat).contiguous();
  const at::Tensor table = block_table_in.to(at::kLong).contiguous();
  const at::Tensor lens = seq_lens_in.to(at::kLong).contiguous();
  const at::Tensor rows = rows_in.to(at::kLong).contiguous();
#if defined(CSR_V16)
  // bf16 dictionaries are read as they are (the fast kernel converts rows in registers).
  const bool bf16_atoms = key_atoms_in.scalar_type() == at::kBFloat16 &&
                          value_atoms_in.scalar_type() == at::kBFloat16 &&
                          key_atoms_in.is_contiguous() && value_atoms_in.is_contiguous() &&
                          (query_in.size(2) == 64 || query_in.size(2) == 128 || query_in.size(2) == 256);
#else
  const bool bf16_atoms = false;
#endif
  const at::Tensor ka = bf16_atoms ? key_atoms_in : key_atoms_in.to(at::kFloat).contiguous();
  const at::Tensor va = bf16_atoms ? value_atoms_in : value_atoms_in.to(at::kFloat).contiguous();
  const at::Tensor kl = key_ladder_in.numel() ? key_ladder_in.to(at::kFloat).contiguous() : key_ladder_in;
  const at::Tensor vl = value_ladder_in.numel() ? value_ladder_in.to(at::kFloat).contiguous() : value_ladder_in;
  const at::Tensor own_k = own_k_in.contiguous(), own_v = own_v_in.contiguous();
  const at::Tensor& win = win_store_in;
  check_float_like(own_k, "own_k");
  check_float_like(own_v, "own_v");
  check_float_like(win, "win_store");
  const at::Tensor widx = win_index_in.to(at::kLong).contiguous();
  TORCH_CHECK(kv_cache.scalar_type() == at::kByte && kv_cache.is_contiguous(), "kv_cache must be contiguous uint8");
  TORCH_CHECK(output.is_contiguous(), "output must be contiguous");
  const int64_t b_n = rows.numel(), h = kv_cache.size(1), bs = kv_cache.size(2), cb = kv_cache.size(3);
  const int64_t hq = q.size(1), d = q.size(2), g = hq / h;
  TORCH_CHECK(hq % h == 0 && ka.size(1) == d && va.size(1) == d, "head shapes disagree");
  TORCH_CHECK(g <= 16, "at most 16 query heads per KV head");
  const int64_t wlen = widx.dim() == 2 ? widx.size(1) : 0;
  TORCH_CHECK(wlen == 0 || win.numel(), "window indices without a window store");
  at::Tensor cos, sin;
  if (apply) { cos = rope_cos.to(at::kFloat).contiguous(); sin = rope_sin.to(at::kFloat).contiguous(); }
  const int64_t mk = fk.kind == 2 ? kl.size(1) : 0, mv = fv.kind == 2 ? vl.size(1) : 0;
  const float* klp = fk.kind == 2 ? kl.data_ptr<float>() : nullptr;
  const float* vlp = fv.kind == 2 ? vl.data_ptr<float>() : nullptr;

  // Work items (request, KV head, split); partial (max, sum, acc[G, D]) per item.
#if defined(CSR_V16)
  const bool bins_allowed = d == 64 || d == 128 || d == 256;  // the vectorised kernel's
#else
  const bool bins_allowed = false;
#endif
  // A context long enough for value bins is one item (its softmax is two-pass), else
  // split every kSplitTokens tokens.
  std::vector<int64_t> first(b_n + 1, 0);
  std::vector<char> binned(b_n, 0);
  for (int64_t i = 0; i < b_n; ++i) {
    const int64_t t = lens.data_ptr<int64_t>()[i];
    TORCH_CHECK(t >= 1, "a decode request has at least its own token");
    TORCH_CHECK((t + bs - 1) / bs <= table.size(1), "block table too short for the sequence");
    binned[i] = bins_allowed && t * fv.atoms >= kBinFactor * va.size(0);
    first[i + 1] = first[i] + (binned[i] ? 1 : (t + kSplitTokens - 1) / kSplitTokens);
  }
  const int64_t splits = first[b_n];
  std::vector<float> part_m(splits * h * g), part_l(splits * h * g), part_acc(splits * h * g * d);
  const uint8_t* cache = kv_cache.data_ptr<uint8_t>();
  const int64_t* tab = table.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);

  const Decoder dk(fk, klp, mk), dv(fv, vlp, mv);
  AttnArgs args{fk, fv, &dk, &dv, cache + kv_cache.numel(), q.data_ptr<float>(),
                bf16_atoms ? nullptr : ka.data_ptr<float>(), bf16_atoms ? nullptr : va.data_ptr<float>(), klp, vlp,
                apply ? cos.data_ptr<float>() : nullptr, apply ? sin.data_ptr<float>() : nullptr,
                mk, mv, h, g, d, bs, cb, hq, wlen, table.size(1), va.size(0), cache, tab,
                lens.data_ptr<int64_t>(), rows.data_ptr<int64_t>(),
                wlen ? widx.data_ptr<int64_t>() : nullptr, &own_k, &own_v, &win, apply,
                static_cast<float>(scale)};
  (void)args;
#if defined(CSR_V16)
  const bool fast = d == 64 || d == 128 || d == 256;
#else
  const bool fast = false;
#endif
  // Stream both dictionaries through the cache before the random row gathers. A decode step
  // reads every layer's dictionaries once (SmolLM2: 60 x 1 MiB bf16, twice the L3), so each
  // layer's rows come from memory, one dependent miss per row; one sequential pass
  // (prefetcher-friendly, ~0.1 ms for 2 MiB) leaves them in L2/L3 for the gathers
  // (benchmarks/read_paths.py, 30 layers cycling: docs/results.md "Read and write paths").
  // Only where the step gathers at least a quarter as many rows as the dictionaries hold: a
  // row gathered from memory costs ~4x a streamed one (SmolLM2, 30 layers cycling: 130
  // coded tokens read in 0.19 ms a layer either way), so a few coded tokens (a context just
  // past the window) gather faster than the pass streams both dictionaries.
  int64_t coded = 0;  // tokens read from their codes: all but the own token and window hits
  for (int64_t i = 0; i < b_n; ++i) {
    coded += args.lens[i] - 1;
    for (int64_t w = std::max<int64_t>(0, wlen - (args.lens[i] - 1)); w < wlen; ++w) coded -= args.widx[i * wlen + w] >= 0;
  }
  if (4 * coded * h * (fk.atoms + fv.atoms) >= ka.size(0) + va.size(0)) {
    warm_cache(ka);
    warm_cache(va);
  }
  at::parallel_for(0, splits * h, 1, [&](int64_t w0, int64_t w1) {
#if defined(CSR_V16)
    if (fast) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t sidx = w / h, head = w % h;
        const int64_t i = std::upper_bound(first.begin(), first.end(), sidx) - first.begin() - 1;
        const int64_t t = args.lens[i];
        const int64_t t0 = binned[i] ? 0 : (sidx - first[i]) * kSplitTokens;
        const int64_t t1 = binned[i] ? t : std::min(t, t0 + kSplitTokens);
        float* m = &part_m[w * g];
        float* l = &part_l[w * g];
        float* acc = &part_acc[w * g * d];
        if (bf16_atoms) {
          attend_dispatch(args, key_atoms_in.data_ptr<c10::BFloat16>(), value_atoms_in.data_ptr<c10::BFloat16>(),
                          binned[i], i, head, t0, t1, m, l, acc);
        } else {
          attend_dispatch(args, args.ka, args.va, binned[i], i, head, t0, t1, m, l, acc);
        }
      }
      return;
    }
#endif
    std::vector<float> kbuf(d), kr(d), vbuf(d), ebuf(d), qs(g * d), scores(g * kTile);
    Code code;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t sidx = w / h, head = w % h;
      const int64_t i = std::upper_bound(first.begin(), first.end(), sidx) - first.begin() - 1;
      const int64_t t = lens.data_ptr<int64_t>()[i], row = rows.data_ptr<int64_t>()[i];
      const int64_t t0 = (sidx - first[i]) * kSplitTokens, t1 = std::min(t, t0 + kSplitTokens);
      const int64_t wstart = t - 1 - wlen;  // window position of win_index[i, 0]
      for (int64_t x = 0; x < g * d; ++x) qs[x] = q.data_ptr<float>()[(row * hq + head * g) * d + x] * sc;
      float* m = &part_m[w * g];
      float* l = &part_l[w * g];
      float* acc = &part_acc[w * g * d];
      for (int64_t x = 0; x < g; ++x) { m[x] = -INFINITY; l[x] = 0.0f; }
      std::fill(acc, acc + g * d, 0.0f);
      // K or V of token p, fp32: exact where the step or the window holds it, else decoded.
      auto exact = [&](int64_t p, int which) -> const float* {
        if (p == t - 1) {
          load_row(which ? own_v : own_k, row * h + head, d, ebuf.data());
          return ebuf.data();
        }
        const int64_t wi = p - wstart;
        if (wlen && wi >= 0 && wi < wlen) {
          const int64_t e = widx.data_ptr<int64_t>()[i * wlen + wi];
          if (e >= 0) {
            const int64_t gslot = e / bs, off = e % bs;
            load_row(win, (((gslot * h + head) * bs + off) * 2) + which, d, ebuf.data());
            return ebuf.data();
          }
        }
        return nullptr;
      };
      auto slot_of = [&](int64_t p) {
        return cache + ((tab[i * table.size(1) + p / bs] * h + head) * bs + p % bs) * cb;
      };
      for (int64_t p0 = t0; p0 < t1; p0 += kTile) {
        const int64_t tn = std::min(kTile, t1 - p0);
        for (int64_t x = 0; x < tn; ++x) {
          const int64_t p = p0 + x;
          const float* k = exact(p, 0);
          if (!k) {
            unpack(slot_of(p), fk, klp, mk, code);
            rebuild(code, fk.atoms, ka.data_ptr<float>(), d, kbuf.data());
            k = kbuf.data();
            if (apply) {
              rope(kbuf.data(), cos.data_ptr<float>() + p * d, sin.data_ptr<float>() + p * d, d, 1.0f, kr.data());
              k = kr.data();
            }
          }
          for (int64_t y = 0; y < g; ++y) scores[y * kTile + x] = dot(&qs[y * d], k, d);
        }
        for (int64_t y = 0; y < g; ++y) {
          float mx = m[y];
          for (int64_t x = 0; x < tn; ++x) mx = std::max(mx, scores[y * kTile + x]);
          const float corr = std::exp(m[y] - mx);
          l[y] *= corr;
          for (int64_t j = 0; j < d; ++j) acc[y * d + j] *= corr;
          for (int64_t x = 0; x < tn; ++x) {
            const float e = std::exp(scores[y * kTile + x] - mx);
            scores[y * kTile + x] = e;
            l[y] += e;
          }
          m[y] = mx;
        }
        for (int64_t x = 0; x < tn; ++x) {
          const int64_t p = p0 + x;
          const float* v = exact(p, 1);
          if (!v) {
            unpack(slot_of(p), fv, vlp, mv, code);
            rebuild(code, fv.atoms, va.data_ptr<float>(), d, vbuf.data());
            v = vbuf.data();
          }
          for (int64_t y = 0; y < g; ++y) {
            const float e = scores[y * kTile + x];
            float* a = &acc[y * d];
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) a[j] += e * v[j];
          }
        }
      }
    }
  });

  // Merge the splits of each (request, KV head) and write the rows.
  at::parallel_for(0, b_n * h, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> out(d);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w / h, head = w % h, row = rows.data_ptr<int64_t>()[i];
      for (int64_t y = 0; y < g; ++y) {
        float mx = -INFINITY;
        for (int64_t s = first[i]; s < first[i + 1]; ++s) mx = std::max(mx, part_m[(s * h + head) * g + y]);
        float total = 0.0f;
        std::fill(out.begin(), out.end(), 0.0f);
        for (int64_t s = first[i]; s < first[i + 1]; ++s) {
          const int64_t it = (s * h + head) * g + y;
          const float c = std::exp(part_m[it] - mx);
          total += c * part_l[it];
          for (int64_t j = 0; j < d; ++j) out[j] += c * part_acc[it * d + j];
        }
        const int64_t dst = (row * hq + head * g + y) * d;
        if (output.scalar_type() == at::kBFloat16) {
          auto* o = output.data_ptr<at::BFloat16>() + dst;
          for (int64_t j = 0; j < d; ++j) o[j] = out[j] / total;
        } else if (output.scalar_type() == at::kHalf) {
          auto* o = output.data_ptr<at::Half>() + dst;
          for (int64_t j = 0; j < d; ++j) o[j] = out[j] / total;
        } else {
          float* o = output.data_ptr<float>() + dst;
          for (int64_t j = 0; j < d; ++j) o[j] = out[j] / total;
        }
      }
    }
  });
}

// What this build vectorises with: the correlation layouts encode_store accepts follow.
std::string isa() {
#if defined(CSR_I8_AMX) && defined(__AVX512BF16__)
  return amx_ready() ? "avx512_vnni_bf16_amx" : "avx512_vnni_bf16";
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
  return "avx512_vnni_bf16";
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "avx512_vnni";
#elif defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "generic";
#endif
}

TORCH_LIBRARY(csr_cpu, m) {
  m.def("isa() -> str");
  m.def("encode_store(Tensor x, Tensor positions, Tensor rope_cos, Tensor rope_sin, Tensor atoms, "
        "Tensor atoms_t, Tensor corr_scale, Tensor ladder, Tensor(a!) kv_cache, Tensor slots, int[] fmt, "
        "bool omp, bool undo_rope, Tensor? centroids=None, Tensor? cluster_offsets=None, "
        "int probes=0) -> Tensor");
  m.def("decode_dense(Tensor kv_cache, Tensor blocks, Tensor counts, Tensor pos0, int[] key_fmt, "
        "int[] value_fmt, Tensor key_atoms, Tensor key_ladder, Tensor value_atoms, "
        "Tensor value_ladder, Tensor rope_cos, Tensor rope_sin, bool apply_rope, "
        "Tensor(a!) out_k, Tensor(b!) out_v) -> ()");
  m.def("decode_attention(Tensor query, Tensor kv_cache, Tensor block_table, Tensor seq_lens, "
        "Tensor rows, int[] key_fmt, int[] value_fmt, Tensor key_atoms, Tensor key_ladder, "
        "Tensor value_atoms, Tensor value_ladder, Tensor rope_cos, Tensor rope_sin, "
        "bool apply_rope, Tensor win_store, Tensor win_index, Tensor own_k, Tensor own_v, "
        "float scale, Tensor(a!) output) -> ()");
}

TORCH_LIBRARY_IMPL(csr_cpu, CatchAll, m) { m.impl("isa", &isa); }

TORCH_LIBRARY_IMPL(csr_cpu, CPU, m) {
  m.impl("encode_store", &encode_store);
  m.impl("decode_dense", &decode_dense);
  m.impl("decode_attention", &decode_attention);
}

}  // namespace csr
