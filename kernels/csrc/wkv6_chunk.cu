// wkv6 (RWKV-6) chunked forward and backward on tensor cores: intra-chunk parallel, inter-chunk
// recurrent. bf16 r, k, v (and y, gy, gr, gk, gv), w in bf16 or fp32, head size N = 64, chunks of
// C = 16 steps. The sequential kernels in wkv6_cuda.cu stay the reference backend (fp32 inputs,
// head sizes 32 and 128); kernels/wkv6.py picks between them. w is one decay per channel [B, T, H, N] or
// one per head [B, T, H, 1] (template flag WH; Mamba-2 through wkv6): the per-head value is read once per step
// and stands for every channel. The state products are the same; the intra-chunk sums over pairs (s, t), which
// per channel are elementwise with a decay per channel, become matrix products on tensor cores (head_scores);
// gw then sums over the channels (chunk_gw_head_kernel).
//
// Per (b, h) one block of 256 threads walks the chunks in order, keeping the 64 x 64 state in fp32 in its
// warps' mma accumulators (RegState in the forward, RegRows in the backward). The backward's two sweeps are
// independent and run side by side in one launch (two blocks per (b, h)); a small third kernel then forms gw
// from both sweeps' per-step terms. The intra-chunk scores A below depend on their chunk's inputs alone: with one
// decay per channel chunk_scores_kernel forms them for every chunk at once before the forward walks the chunks, and
// with one per head the forward forms them; either way the forward reads them from a buffer that the backward's
// sweep 2 reads again (1 KiB per chunk). Within a chunk, with t, s local positions, lw = -exp(w) the log-decay,
// Ex_t = sum_{m<t} lw_m (exclusive), Ei_t = Ex_{t+1} (inclusive), Et = Ei_{C-1}:
//   y_t   = (r_t e^{Ex_t}) S0  +  sum_{s<t} A_ts v_s  +  (r_t.u.k_t) v_t
//   A_ts  = sum_i r_t[i] k_s[i] e^{Ex_t[i] - Ei_s[i]}                       (s < t)
//   S_end = e^{Et} S0  +  sum_s (k_s e^{Et - Ei_s})^T v_s
// Every exponent is "later minus earlier" of a non-increasing cumsum, so it is <= 0: no overflow for
// any decay (log-decays are clamped at -1e4, where exp already underflows to 0 in fp32). With one decay per
// channel the intra-chunk sums over pairs s < t (the scores A, and the backward's decayed gradient terms) are
// formed element by element in fp32, their decay factor e^{Ex_t - Ei_s} as the running product of the per-step
// decays e^{lw_m}, s < m < t (each <= 1; no exp per term, and no rounding of the cumsums in it); every matrix
// product runs as bf16 mma with fp32 accumulation, with each fp32 operand split into a bf16 pair
// hi + lo (hi = bf16(x), lo = bf16(x - hi)) so products keep ~16 bits: r, k, v, gy are bf16 already,
// so r e^{Ex}, k e^{Et-Ei}, A, S and G are the only split operands (x*y ~ xh*yh + xh*yl + xl*yh).
// Where a product feeds the decay gradient (below) it keeps fp32 precision instead: a third term
// mid = bf16(x - hi - lo) makes hi + lo + mid == x, for S and G as read by the backward sweeps and for
// the rows k e^{Et-Ei} (sweep 1) and r e^{Ex} (sweep 2) that update them. A pair (s, t) in different
// chunks reaches the running sum twice, through S0 in sweep 1 and through G in sweep 2, and the two
// copies must cancel to fp32 rounding: ~16-bit rows would leave ~1e-5 relative, passed on times |lw|.
//
// Backward: sweep 1 (forward in time) recomputes the states and writes
//   gr_t = e^{Ex_t} (S0 gy_t) + sum_{s<t} dA_ts k_s e^{Ex_t - Ei_s} + u k_t dA_tt,  dA_ts = gy_t . v_s,
// b_t = r_t * (gr_t - u k_t dA_tt) (fp32 scratch), gu partials and P = rowsum(ghT * S_T).
// Sweep 2 (reverse) carries G = dL/dS_end:
//   gv_s = sum_{t>=s} A_ts gy_t + (k_s e^{Et-Ei_s}) G,   (A_ss = r_s.u.k_s)
//   gk_s = sum_{t>s} dA_ts r_t e^{Ex_t - Ei_s} + e^{Et-Ei_s} (G v_s) + u r_s dA_ss,
//   G   <- e^{Et} G + sum_t (r_t e^{Ex_t})^T gy_t,
//   dL/dlw_m = P + sum_{t>m} b_t - sum_{s>=m} k_s * (gk_s - u r_s dA_ss - r_{s+1} dA_{s+1,s})
//   (sweep 2 writes the kd_s terms, chunk_gw_kernel sums backwards in fp64), gw = dL/dlw * lw;
//   P and the term s = T-1 leave out the pair of step T-1 with the final-state gradient for the same
//   reason. b_t likewise leaves out k_{t-1} dA_{t,t-1}: the pair
//   (s, s+1) has no decay between its ends and would enter both sums with weight 1 and cancel; left
//   out of both, every remaining term carries at least one decay, so a vanishing decay gives gw = 0
//   instead of rounding noise times a huge lw. The pair is never added and subtracted again: inside a
//   chunk its term is summed apart; at a chunk edge it sits inside a state product (b_0 through S0 gy_0,
//   the last row's gk through G v_{C-1}), and RegRows::edge forms that product in fp32 with the pair
//   taken out of the state first: (S0 - k_prev v_prev^T) gy_0 and (G - r_next^T gy_next) v_{C-1}. The
//   pair is a bf16 x bf16 product, exact in fp32, and it entered the state with weight exactly 1, so
//   what remains is the decayed rest of the state up to fp32 rounding (exactly 0 for a vanishing decay).
//   The neighbour row (the previous chunk's last k, v; the next chunk's first r, gy) is kept in X1, X2.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

namespace {

using namespace nvcuda;
using bf16 = __nv_bfloat16;

constexpr int N = 64;          // head size (K = V)
constexpr int C = 16;          // chunk length
constexpr int NT = 256;        // threads per block (8 warps)
constexpr int PF = N + 4;      // fp32 per-step rows, 16-byte aligned (float4 reads and writes)
constexpr int PB = N + 8;      // bf16 rows (wmma: ldm % 8 == 0, tiles 32-byte aligned; ldmatrix: 16-byte rows)
constexpr int PA = C + 8;      // bf16 16 x 16 score matrix
constexpr int PS = N + 4;      // fp32 64-wide rows for wmma accumulators (ldm % 4 == 0)
constexpr float LW_MIN = -1e4f;
static_assert(PF == PS, "s.O3 (rows of PS) is s.D's storage (rows of PF)");

using FragAr = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragAc = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major>;
using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// ---------------------------------------------------------------------------------- shared memory
// One carve-out for the forward and backward kernels (the backward sweeps use a superset of the forward's arrays).
// The state itself lives in registers (RegState, RegRows); sweep 2 also keeps G's bf16 terms here for gv.
struct Smem {
  float *R, *K, *LW, *Ex, *Ei;          // [C][PF]
  float *D;                               // [C][PF] per-step decay e^{lw} (the per-channel scores and decayed sums)
  float *O3;                              // [C][PS] one more mma output, one decay per head: it is D's storage
  float *Et, *EEt, *U, *X1, *X2;          // [N]; EEt = e^{Et}; X1, X2: the neighbouring chunk's edge row
  float *Z, *XS;                          // [2][N] per half of the state's columns: Z = rowsum(ghT * S), XS: the
                                          // edge row's state product without the edge pair
  float *O1, *O2, *O4, *dA;               // [C][PS] mma outputs
  bf16 *V, *DY, *Rh, *Rl, *Kh, *Kl;       // [C][PB]
  bf16 *Rm, *Km;                          // [C][PB] third terms of r e^{Ex}, k e^{Et-Ei} (backward updates)
  bf16 *Rb, *Kb;                          // [C][PB] r, k as loaded (one decay per head: score products)
  bf16 *Ah, *Al;                          // [C][PA]
  bf16 *Mh, *Ml, *Mm;                     // [C][PA] decayed gradient scores M (one decay per head), three terms
  bf16 *Sh, *Sl;                          // [N][PB]: G = Sh + Sl (sweep 2's gv)
};

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

__host__ __device__ constexpr size_t smem_bytes() {
  return 6 * align128(C * PF * 4) + 5 * align128(N * 4) + 2 * align128(2 * N * 4) + 4 * align128(C * PS * 4) +
         10 * align128(C * PB * 2) + 5 * align128(C * PA * 2) + 2 * align128(N * PB * 2);
}

__device__ Smem carve(unsigned char* p) {
  Smem s;
  auto take = [&p](size_t bytes) { unsigned char* q = p; p += align128(bytes); return q; };
  s.R = (float*)take(C * PF * 4); s.K = (float*)take(C * PF * 4); s.LW = (float*)take(C * PF * 4);
  s.Ex = (float*)take(C * PF * 4); s.Ei = (float*)take(C * PF * 4);
  s.D = (float*)take(C * PF * 4);
  s.O3 = s.D;  // only the per-channel sweeps form per-step decays (cumsum<true>)
  s.Et = (float*)take(N * 4); s.EEt = (float*)take(N * 4); s.U = (float*)take(N * 4); s.X1 = (float*)take(N * 4); s.X2 = (float*)take(N * 4);
  s.Z = (float*)take(2 * N * 4); s.XS = (float*)take(2 * N * 4);
  s.O1 = (float*)take(C * PS * 4); s.O2 = (float*)take(C * PS * 4); s.O4 = (float*)take(C * PS * 4);
  s.dA = (float*)take(C * PS * 4);
  s.V = (bf16*)take(C * PB * 2); s.DY = (bf16*)take(C * PB * 2); s.Rh = (bf16*)take(C * PB * 2);
  s.Rl = (bf16*)take(C * PB * 2); s.Kh = (bf16*)take(C * PB * 2); s.Kl = (bf16*)take(C * PB * 2);
  s.Rm = (bf16*)take(C * PB * 2); s.Km = (bf16*)take(C * PB * 2);
  s.Rb = (bf16*)take(C * PB * 2); s.Kb = (bf16*)take(C * PB * 2);
  s.Ah = (bf16*)take(C * PA * 2); s.Al = (bf16*)take(C * PA * 2);
  s.Mh = (bf16*)take(C * PA * 2); s.Ml = (bf16*)take(C * PA * 2); s.Mm = (bf16*)take(C * PA * 2);
  s.Sh = (bf16*)take(N * PB * 2); s.Sl = (bf16*)take(N * PB * 2);
  return s;
}

// ------------------------------------------------------------------------------------- load/store
// Thread tid moves elements [4*tid, 4*tid+4) of a chunk's C x N tile: row t = tid/16, column i0.
struct Slot {
  int t, i0;
  __device__ explicit Slot(int tid) : t(tid >> 4), i0((tid & 15) * 4) {}
};

// Addresses for sequence (b, h): row(t) is step t's first element in the [B, T, H, N] tensors; off(c) is the
// slot's first element of chunk c there, woff(c) its step's decay when w has one value per head ([B, T, H, 1]).
struct ChunkAddr {
  int b, h, T, H;
  int64_t base, stride;
  Slot sl;  // thread tid's slot
  __device__ ChunkAddr(int b_, int h_, int T_, int H_, int tid)
      : b(b_), h(h_), T(T_), H(H_), base(((int64_t)b_ * T_ * H_ + h_) * N), stride((int64_t)H_ * N), sl(tid) {}
  __device__ int64_t row(int t) const { return base + (int64_t)t * stride; }
  __device__ int64_t off(int c) const { return row(c * C + sl.t) + sl.i0; }
  __device__ int64_t woff(int c) const { return ((int64_t)b * T + c * C + sl.t) * H + h; }
};

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ uint2 ld_raw(const bf16* p) { return *reinterpret_cast<const uint2*>(p); }
// Four bf16 values as ld_raw loads them, in fp32.
__device__ __forceinline__ float4 unpack4(const uint2& x) {
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

template <typename T>
__device__ __forceinline__ T cvt(float x);
template <>
__device__ __forceinline__ float cvt<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 cvt<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void put4(float* dst, const float4& x) { *reinterpret_cast<float4*>(dst) = x; }
// One fp32 value as bf16 terms hi + lo (MID: and mid, hi + lo + mid == x); split4 below does four at once.
template <bool MID = false>
__device__ __forceinline__ void split(float x, bf16* hi, bf16* lo, bf16* mid = nullptr) {
  const bf16 h = __float2bfloat16_rn(x);
  *hi = h;
  const float d = x - __bfloat162float(h);
  const bf16 l = __float2bfloat16_rn(d);
  *lo = l;
  if (MID) *mid = __float2bfloat16_rn(d - __bfloat162float(l));
}
__device__ __forceinline__ float lw_of(float w) { return -__expf(w); }  // exact; the cumsums clamp it
// A step's log-decays as the kernels keep them: lw_of(w), or 0 past T (the step is the identity on the state);
// clamp_lw bounds them where they are summed or exponentiated.
__device__ __forceinline__ float4 step_lw(const float4& w, bool valid) {
  return valid ? make_float4(lw_of(w.x), lw_of(w.y), lw_of(w.z), lw_of(w.w)) : make_float4(0.f, 0.f, 0.f, 0.f);
}
__device__ __forceinline__ float clamp_lw(float lw) { return fmaxf(lw, LW_MIN); }
// e^x for the kernels' exponents (all <= 0): one ex2.approx with subnormal results flushed to zero. __expf
// would add a rescaling step per call for those results; below 2^-126 they only ever multiply values that the
// bf16 outputs and the fp32 sums cannot resolve.
__device__ __forceinline__ float exp_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

// w as loaded: fp32 as is, bf16 still packed. Converting only at store time keeps the prefetch's global
// load latency off the critical path (a conversion right after the load would wait for it).
template <typename Tw>
struct RawW;
template <>
struct RawW<float> {
  float4 x;
  __device__ void load(const float* p) { x = ld4(p); }
  __device__ void zero() { x = make_float4(0.f, 0.f, 0.f, 0.f); }
  __device__ float4 get() const { return x; }
};
template <>
struct RawW<bf16> {
  uint2 x;
  __device__ void load(const bf16* p) { x = ld_raw(p); }
  __device__ void zero() { x = make_uint2(0u, 0u); }
  __device__ float4 get() const { return unpack4(x); }
};

// One decay per head ([B, T, H, 1] w): the step's value stands for all four channels of the thread.
template <typename Tw>
struct RawW1 {
  Tw x;
  __device__ void load(const Tw* p) { x = *p; }
  __device__ void zero() { x = cvt<Tw>(0.f); }
  __device__ float4 get() const {
    const float f = to_f32(x);
    return make_float4(f, f, f, f);
  }
};

// Raw inputs of one chunk held in registers while the previous chunk computes. WH: w holds one decay per head
// ([B, T, H, 1], element woff of the step); otherwise one per channel, at the same offset as r, k, v.
template <typename Tw, bool DY, bool WH>
struct Prefetch {
  uint2 r, k, v, dy;
  typename std::conditional<WH, RawW1<Tw>, RawW<Tw>>::type w;
  __device__ void load(const Slot& sl, int64_t off, int64_t woff, bool valid, const bf16* R, const bf16* K,
                       const bf16* V, const Tw* W, const bf16* G) {
    if (!valid) {
      r = k = v = dy = make_uint2(0u, 0u);
      w.zero();
      return;
    }
    r = ld_raw(R + off); k = ld_raw(K + off); v = ld_raw(V + off);
    w.load(W + (WH ? woff : off));
    if (DY) dy = ld_raw(G + off);
  }
  // valid = false leaves zeros and a zero log-decay (the step is the identity on the state)
  __device__ void store(const Smem& s, const Slot& sl, bool valid) const {
    const int o = sl.t * PF + sl.i0;
    put4(s.R + o, unpack4(r));
    put4(s.K + o, unpack4(k));
    put4(s.LW + o, step_lw(w.get(), valid));
    *reinterpret_cast<uint2*>(s.V + sl.t * PB + sl.i0) = v;
    if (DY) *reinterpret_cast<uint2*>(s.DY + sl.t * PB + sl.i0) = dy;
    if (WH) {
      *reinterpret_cast<uint2*>(s.Rb + sl.t * PB + sl.i0) = r;
      *reinterpret_cast<uint2*>(s.Kb + sl.t * PB + sl.i0) = k;
    }
  }
};

// Exclusive / inclusive cumsums of the log-decay per channel, e^{Et} and (PD) the per-step decays e^{lw}.
// Thread (channel i, quarter q) = (8 * warp + lane % 8, lane / 8) sums rows 4q..4q+3; every lane of a
// channel then adds the four quarter totals in the same order, so Ex_{t+1} == Ei_t holds exactly.
template <bool PD>  // PD: write s.D for the per-channel decayed sums (with one decay per head it holds O3)
__device__ __forceinline__ void cumsum(const Smem& s, int tid) {
  const int lane = tid & 31, i = 8 * (tid >> 5) + (lane & 7), q = lane >> 3;
  float lw[4], loc[4], run = 0.f;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    lw[m] = clamp_lw(s.LW[(4 * q + m) * PF + i]);
    run += lw[m];
    loc[m] = run;
  }
  float e[5];  // e[q'] = sum of the quarters before q'; e[4] = Et
  e[0] = 0.f;
#pragma unroll
  for (int qq = 0; qq < 4; ++qq) e[qq + 1] = e[qq] + __shfl_sync(0xffffffffu, run, (lane & 7) + 8 * qq);
  const float base = q == 0 ? e[0] : q == 1 ? e[1] : q == 2 ? e[2] : e[3];
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int o = (4 * q + m) * PF + i;
    s.Ex[o] = m == 0 ? base : base + loc[m - 1];
    s.Ei[o] = base + loc[m];
    if (PD) s.D[o] = exp_ftz(lw[m]);
  }
  if (q == 3) {
    s.Et[i] = e[4];
    s.EEt[i] = exp_ftz(e[4]);
  }
}

__device__ __forceinline__ uint32_t bf16x2(float lo, float hi) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&p);
}

// Two fp32 values as bf16x2 terms hi + lo (MID: and the third term mid, hi + lo + mid == x), as `split` forms
// them. Every difference below is exact in fp32.
template <bool MID = false>
__device__ __forceinline__ void split2(float x0, float x1, uint32_t& hi, uint32_t& lo, uint32_t* mid = nullptr) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 f = __bfloat1622float2(h);
  const float d0 = x0 - f.x, d1 = x1 - f.y;
  const __nv_bfloat162 l = __floats2bfloat162_rn(d0, d1);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
  if (MID) {
    const float2 e = __bfloat1622float2(l);
    *mid = bf16x2(d0 - e.x, d1 - e.y);
  }
}

// Four fp32 values (split2 twice), each term packed into 8 bytes.
template <bool MID>
__device__ __forceinline__ void split4(const float4& x, bf16* hi, bf16* lo, bf16* mid) {
  uint32_t h01, l01, m01, h23, l23, m23;
  split2<MID>(x.x, x.y, h01, l01, &m01);
  split2<MID>(x.z, x.w, h23, l23, &m23);
  *reinterpret_cast<uint2*>(hi) = make_uint2(h01, h23);
  *reinterpret_cast<uint2*>(lo) = make_uint2(l01, l23);
  if (MID) *reinterpret_cast<uint2*>(mid) = make_uint2(m01, m23);
}

// r e^{Ex} and k e^{Et - Ei} as bf16 terms (4 elements per thread). RT, KT: how many terms of each to
// write: 0 (not needed), 2 (Rh, Rl / Kh, Kl) or 3 (also Rm / Km).
template <int RT, int KT>
__device__ __forceinline__ void scaled_rk(const Smem& s, const Slot& sl) {
  const int o = sl.t * PF + sl.i0, ob = sl.t * PB + sl.i0;
  if (RT > 0) {
    const float4 r = ld4(s.R + o), ex = ld4(s.Ex + o);
    split4<RT == 3>(make_float4(r.x * exp_ftz(ex.x), r.y * exp_ftz(ex.y), r.z * exp_ftz(ex.z), r.w * exp_ftz(ex.w)),
                    s.Rh + ob, s.Rl + ob, s.Rm + ob);
  }
  if (KT > 0) {
    const float4 k = ld4(s.K + o), ei = ld4(s.Ei + o), et = ld4(s.Et + sl.i0);
    split4<KT == 3>(make_float4(k.x * exp_ftz(et.x - ei.x), k.y * exp_ftz(et.y - ei.y), k.z * exp_ftz(et.z - ei.z),
                                k.w * exp_ftz(et.w - ei.w)),
                    s.Kh + ob, s.Kl + ob, s.Km + ob);
  }
}

// One reduce-scatter step over lanes c ^ O: p[0 .. 2O) -> p[0 .. O), keeping the half of the rows whose bit O
// matches the lane's (after the steps 8, 4, 2, 1, p[0] on lane c is the full sum of row c).
template <int O>
__device__ __forceinline__ void halve(float* p, int c) {
  const bool upper = c & O;
#pragma unroll
  for (int j = 0; j < O; ++j) {
    const float keep = upper ? p[j + O] : p[j], send = upper ? p[j] : p[j + O];
    p[j] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}

// Intra-chunk scores A (16 x 16: s < t, plus the bonus diagonal) as a bf16 pair.
//   A_ts = sum_i r_t[i] k_s[i] f_ts[i],  f_ts = prod_{s<m<t} e^{lw_m}  (s < t),   A_tt = sum_i r_t[i] u[i] k_t[i].
// k_s f_ts is carried as a running product with factors <= 1 (no overflow; underflow is the exact limit): the
// log-space k_s e^{Ex_t - Ei_s} without an exp per term. Thread (s, c) = (tid / 16, tid % 16) owns key row s and
// channels 4c..4c+3 and forms a partial A_ts for every t; the 16 lanes of one s then reduce their 16 partial
// rows with a butterfly reduce-scatter (one shuffle per value per step) that leaves A[c][s] on lane c.
__device__ __forceinline__ void scores(const Smem& s, int tid) {
  const int sr = tid >> 4, c = tid & 15, i0 = 4 * c;
  const float4 k = ld4(s.K + sr * PF + i0);
  float4 kf = k;  // k_s f_ts
  float p[C];
#pragma unroll
  for (int t = 0; t < C; ++t) {
    const float4 r = ld4(s.R + t * PF + i0);
    if (t > sr) {
      const float4 d = ld4(s.D + t * PF + i0);
      p[t] = r.x * kf.x + r.y * kf.y + r.z * kf.z + r.w * kf.w;
      kf.x *= d.x; kf.y *= d.y; kf.z *= d.z; kf.w *= d.w;
    } else if (t == sr) {
      const float4 u = ld4(s.U + i0);
      p[t] = r.x * u.x * k.x + r.y * u.y * k.y + r.z * u.z * k.z + r.w * u.w * k.w;
    } else {
      p[t] = 0.f;
    }
  }
  halve<8>(p, c); halve<4>(p, c); halve<2>(p, c); halve<1>(p, c);
  split(p[0], s.Ah + c * PA + sr, s.Al + c * PA + sr);
}

// The forward hands each chunk's scores to the backward's sweep 2, which needs the same bf16 pair Ah + Al for gv:
// per (b, h) and chunk, SCORE_WORDS 32-bit words (Ah's 16 x 16 values row-major, then Al's). Thread tid moves word
// tid: term tid / 128, row (tid / 8) % 16, columns 2 (tid % 8) ..+1.
constexpr int SCORE_WORDS = C * C;  // 2 terms x C x C bf16
static_assert(SCORE_WORDS == NT, "one word of a chunk's scores per thread");
__device__ __forceinline__ int score_slot(int tid) { return ((tid >> 3) & 15) * PA + 2 * (tid & 7); }
__device__ __forceinline__ uint32_t score_word(const Smem& s, int tid) {
  return *reinterpret_cast<const uint32_t*>((tid >> 7 ? s.Al : s.Ah) + score_slot(tid));
}
__device__ __forceinline__ void put_score_word(const Smem& s, int tid, uint32_t x) {
  *reinterpret_cast<uint32_t*>((tid >> 7 ? s.Al : s.Ah) + score_slot(tid)) = x;
}

// dst[t][s] = X_t . Y_s (16 x 16 fp32, row stride PS) for bf16 rows X, Y: one warp. The gradient scores
// dA = gy v^T, and with one decay per head the undecayed scores r k^T. Each product of two bf16 values is exact
// in fp32, so these are the fp32 dot products of the elementwise form.
__device__ __forceinline__ void dots(float* dst, const bf16* X, const bf16* Y) {
  FragC acc;
  wmma::fill_fragment(acc, 0.f);
  FragAr a;
  FragBc b;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    wmma::load_matrix_sync(a, X + kk * 16, PB);
    wmma::load_matrix_sync(b, Y + kk * 16, PB);
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::store_matrix_sync(dst, acc, PS, wmma::mem_row_major);
}

// One decay per head: every channel shares the log-decay, so the intra-chunk decay of a pair is one number,
// F_ts = e^{Ex_t - Ei_s} (s < t), and the elementwise sums over channels become products of matrices:
//   A_ts = (r_t . k_s) F_ts (s < t),  A_tt = r_t . (u k_t)     (the scores; RK = r k^T from `dots`)
//   M_ts = dA_ts F_ts (s < t-1, else 0)                         (the backward's in-chunk decayed terms)
// gr's in-chunk sum is then M k and gk's is M^T r (decayed_times). A is written as a bf16 pair like `scores`
// writes it; M as three terms, so hi + lo + mid == M and its products keep fp32 precision (they feed gw). M
// leaves out the adjacent pair s = t-1 as the elementwise sums do. Thread (t, s) = (tid / 16, tid % 16); the
// diagonal's partial sums over channels 4s..4s+3 are added across the 16 lanes of row t.
template <bool WA, bool WM>
__device__ __forceinline__ void head_scores(const Smem& s, int tid, const float* RK) {
  const int t = tid >> 4, c = tid & 15;
  const float f = c < t ? exp_ftz(s.Ex[t * PF] - s.Ei[c * PF]) : 0.f;
  if (WA) {
    const int i0 = 4 * c;
    const float4 r = ld4(s.R + t * PF + i0), k = ld4(s.K + t * PF + i0), u = ld4(s.U + i0);
    float d = r.x * u.x * k.x + r.y * u.y * k.y + r.z * u.z * k.z + r.w * u.w * k.w;
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    split(c < t ? RK[t * PS + c] * f : c == t ? d : 0.f, s.Ah + t * PA + c, s.Al + t * PA + c);
  }
  if (WM) split<true>(c + 1 < t ? s.dA[t * PS + c] * f : 0.f, s.Mh + t * PA + c, s.Ml + t * PA + c, s.Mm + t * PA + c);
}

// out[:, 16 tj ..] = M X[:, 16 tj ..] (TR: M^T X), M the three-term decayed gradient scores of head_scores and
// X a chunk of bf16 rows (C x 64): every product exact, fp32 accumulation. One warp per 16-column tile.
template <bool TR>
__device__ __forceinline__ void decayed_times(float* out, const Smem& s, const bf16* X, int tj) {
  using FragM = typename std::conditional<TR, FragAc, FragAr>::type;
  FragC acc;
  wmma::fill_fragment(acc, 0.f);
  FragM m;
  FragBr x;
  wmma::load_matrix_sync(x, X + tj * 16, PB);
  wmma::load_matrix_sync(m, s.Mm, PA);
  wmma::mma_sync(acc, m, x, acc);
  wmma::load_matrix_sync(m, s.Ml, PA);
  wmma::mma_sync(acc, m, x, acc);
  wmma::load_matrix_sync(m, s.Mh, PA);
  wmma::mma_sync(acc, m, x, acc);
  wmma::store_matrix_sync(out + tj * 16, acc, PS, wmma::mem_row_major);
}

// The elementwise passes of the backward sweeps give thread group g = tid / 64 the rows {g, 7-g, 8+g, 15-g}:
// their in-chunk loops cost ~t (sweep 1) or ~C-t (sweep 2) steps, so every group gets the same work.
__device__ __forceinline__ int owned_row(int g, int m) { return m == 0 ? g : m == 1 ? 7 - g : m == 2 ? 8 + g : 15 - g; }

// One decay per channel: the in-chunk decayed sums of the four rows t = owned_row(g, m) of channel i, without the
// adjacent pair, as sum over pairs of coef(pair) * X[other end][i] * prod e^{lw_m} over the steps strictly between
// the ends (the running product of s.D). Sweep 1 (REV = false, gr's sums):  in_t = sum_{j < t-1} dA_tj k_j[i] f_tj,
// walking j down from t-2. Sweep 2 (REV = true, gk's sums, t the key step): in_t = sum_{q > t+1} dA_qt r_q[i] f_qt,
// walking q up from t+2. The rows' lengths pair up: after 8 terms of rows m = 2, 3 (sweep 2: m = 0, 1), each has
// as many terms left as row m = 0, 1 (sweep 2: m = 2, 3) has in all, at the same steps. So two rows always advance
// together, two independent chains, and in the second and third loops they share the loads of D and X.
template <bool REV>
struct PairedRows {
  const Smem& s;
  const float* X;
  int i;
  __device__ PairedRows(const Smem& s_, const float* X_, int i_) : s(s_), X(X_), i(i_) {}
  // row t's k-th pair has its other end at e = first(t, k) (j = t-2-k in sweep 1, q = t+2+k in sweep 2); the
  // row's running product takes the decay of the step next to e towards t, and the pair's coefficient is dA_tj
  // (sweep 1) or dA_qt (sweep 2)
  __device__ __forceinline__ static int first(int t, int k) { return REV ? t + 2 + k : t - 2 - k; }
  __device__ __forceinline__ float decay(int e) const { return s.D[(REV ? e - 1 : e + 1) * PF + i]; }
  __device__ __forceinline__ float coef(int t, int e) const { return REV ? s.dA[e * PS + t] : s.dA[t * PS + e]; }
  __device__ __forceinline__ void term(int t, int e, float& f, float& in) const {
    f *= decay(e);
    in = fmaf(coef(t, e) * X[e * PF + i], f, in);
  }
  // row ta going on beside row tb from tb's first pair to its last, the two sharing each step's decay and X
  __device__ __forceinline__ void beside(int ta, int tb, float& fa, float& fb, float& ina, float& inb) const {
    for (int e = first(tb, 0); REV ? e < C : e >= 0; e += REV ? 1 : -1) {
      const float d = decay(e), x = X[e * PF + i];
      fa *= d;
      fb *= d;
      ina = fmaf(coef(ta, e) * x, fa, ina);
      inb = fmaf(coef(tb, e) * x, fb, inb);
    }
  }
  __device__ __forceinline__ void sums(int g, float* in) const {
    float f[4] = {1.f, 1.f, 1.f, 1.f};
    in[0] = in[1] = in[2] = in[3] = 0.f;
    const int t[4] = {g, 7 - g, 8 + g, 15 - g};
    // the long rows: sweep 1 m = 2, 3 (lengths 7 + g, 14 - g); sweep 2 m = 0, 1 (14 - g, 7 + g)
    const int la = REV ? 0 : 3;  // the row whose 8th term always exists
    const int lb = REV ? 1 : 2;  // the row of 7 + g terms (only 7 with g = 0)
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      term(t[la], first(t[la], k), f[la], in[la]);
      if (k < 7 || g > 0) term(t[lb], first(t[lb], k), f[lb], in[lb]);
    }
    // row m = 2 (sweep 2: 0) goes on beside row 0 (sweep 2: 2), then row 3 (1) beside row 1 (3)
    const int p0 = REV ? 0 : 2, q0 = REV ? 2 : 0, p1 = REV ? 1 : 3, q1 = REV ? 3 : 1;
    beside(t[p0], t[q0], f[p0], f[q0], in[p0], in[q0]);
    beside(t[p1], t[q1], f[p1], f[q1], in[p1], in[q1]);
  }
};

// ------------------------------------------------------------------------------- the state in registers
// The kernels keep the state in the warps' mma accumulators, not in shared memory. The state products use the PTX
// m16n8k16 bf16 mma, whose fragment layouts are fixed (g = lane / 4, c = lane % 4; pairs are bf16x2, the lower
// index in the low half):
//   A (16 x 16, row-major): a[0..3] = (g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..)
//   B (16 x 8):             b[0..1] = (rows 2c..2c+1, col g), (rows 2c+8..2c+9, col g)
//   C (16 x 8, fp32):       d[0..3] = (g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)
// A C tile of S^T (rows j, columns i) holds, for the same (g, c), the pairs that a B fragment of S (rows i,
// columns j) needs, so y = (r e^{Ex}) S0 reads its B operand straight from the accumulators.
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 bf16 matrices from shared memory, lane l giving the address of row l % 8 of matrix l / 8; lane l
// gets (row l / 4, columns 2 (l % 4)..+1) of each (TR: of its transpose).
template <bool TR>
__device__ __forceinline__ void ldsm4(uint32_t* x, const bf16* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if (TR)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3]) : "r"(a) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3]) : "r"(a) : "memory");
}

// A thread's share of a 64 x 64 fp32 state held as four m16n8 C tiles, st[n][0..3]; Layout::at(n, e) is the
// (key i, value j) row-major index i N + j of st[n][e] (RegState and RegRows place the tiles differently).
template <class Layout>
struct TileState {
  float st[4][4];
  // src: [N][N] fp32 (i, j) row-major, or nullptr for zeros
  __device__ void load(const float* src) {
    const Layout& l = *static_cast<const Layout*>(this);
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[n][e] = src ? src[l.at(n, e)] : 0.f;
  }
  __device__ void store(float* dst) const {
    const Layout& l = *static_cast<const Layout*>(this);
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[l.at(n, e)] = st[n][e];
  }
};

// The 64 x 64 state of one (b, h), spread over the 8 warps: warp w holds S^T rows j in [16 jb, 16 jb + 16),
// jb = w % 4, for the keys i in [32 ih, 32 ih + 32), ih = w / 4, as four C tiles; tile n covers the keys
// 32 ih + 8 n ..+7:  st[n] = S[i][j], S[i+1][j], S[i][j+8], S[i+1][j+8]  with i = 32 ih + 8 n + 2c, j = 16 jb + g.
struct RegState : TileState<RegState> {
  int jb, ih, g, c;
  __device__ explicit RegState(int tid) : jb((tid >> 5) & 3), ih(tid >> 7), g((tid & 31) >> 2), c(tid & 3) {}
  __device__ int key(int n, int e) const { return 32 * ih + 8 * n + 2 * c + (e & 1); }
  __device__ int val(int e) const { return 16 * jb + g + 8 * (e >> 1); }
  __device__ int at(int n, int e) const { return key(n, e) * N + val(e); }

  // out (16 x 16 fp32: t, the warp's columns j) = (r e^{Ex})[:, this warp's keys] S0[keys, j] with r e^{Ex} and
  // S0 as bf16 pairs (three products), plus with AV the in-chunk A V (A a bf16 pair, V
  // exact); vt: ldmatrix.trans of V's 16 x 16 block at columns 16 jb (blocks t 0-7 | 8-15 x j 0-7 | 8-15).
  __device__ void y_partial(float (*out)[4], const Smem& s, const uint32_t* vt, bool AV, int lane) const {
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[nb][e] = 0.f;
    const int row = lane & 15, col = 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      uint32_t ah[4], al[4];
      ldsm4<false>(ah, s.Rh + row * PB + 32 * ih + 16 * kk + col);
      ldsm4<false>(al, s.Rl + row * PB + 32 * ih + 16 * kk + col);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        uint32_t h0, l0, h1, l1;
        split2(st[2 * kk][2 * nb], st[2 * kk][2 * nb + 1], h0, l0);
        split2(st[2 * kk + 1][2 * nb], st[2 * kk + 1][2 * nb + 1], h1, l1);
        mma16816(out[nb], ah, h0, h1);
        mma16816(out[nb], ah, l0, l1);
        mma16816(out[nb], al, h0, h1);
      }
    }
    if (AV) {
      uint32_t ah[4], al[4];
      ldsm4<false>(ah, s.Ah + row * PA + col);
      ldsm4<false>(al, s.Al + row * PA + col);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        mma16816(out[nb], ah, vt[2 * nb], vt[2 * nb + 1]);
        mma16816(out[nb], al, vt[2 * nb], vt[2 * nb + 1]);
      }
    }
  }

  // S <- e^{Et} S + (k e^{Et-Ei})^T V, with k e^{Et-Ei} the bf16 pair Kh + Kl:
  // S^T[j][i] += sum_t V^T[j][t] K[t][i], A = V^T from vt, B = K by ldmatrix.trans.
  __device__ void update(const Smem& s, const uint32_t* vt, int lane) {
    const uint32_t av[4] = {vt[0], vt[2], vt[1], vt[3]};
    const int row = (lane & 7) + 8 * ((lane >> 3) & 1), col = 8 * (lane >> 4);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const float2 d = *reinterpret_cast<const float2*>(s.EEt + key(n, 0));
      st[n][0] *= d.x; st[n][1] *= d.y; st[n][2] *= d.x; st[n][3] *= d.y;
    }
#pragma unroll
    for (int np = 0; np < 2; ++np) {  // key tiles 2 np, 2 np + 1
      uint32_t kh[4], kl[4];
      ldsm4<true>(kh, s.Kh + row * PB + 32 * ih + 16 * np + col);
      ldsm4<true>(kl, s.Kl + row * PB + 32 * ih + 16 * np + col);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        mma16816(st[2 * np + q], av, kh[2 * q], kh[2 * q + 1]);
        mma16816(st[2 * np + q], av, kl[2 * q], kl[2 * q + 1]);
      }
    }
  }
};

// The backward sweeps' state (S in sweep 1, G = dL/dS_end in sweep 2) in registers, rows on the fragments' g:
// warp w holds S[i][j] for the keys i in [16 ib, 16 ib + 16), ib = w % 4, and the values j in [32 jh, 32 jh + 32),
// jh = w / 4, as four C tiles; tile n covers the values 32 jh + 8 n ..+7:
//   st[n] = S[i][j], S[i][j+1], S[i+8][j], S[i+8][j+1]  with i = 16 ib + g, j = 32 jh + 8 n + 2c.
// A C tile of S (rows i, columns j) holds the pairs that a B fragment of S^T needs: X S^T reads its operand from
// the accumulators.
struct RegRows : TileState<RegRows> {
  int ib, jh, g, c;
  __device__ explicit RegRows(int tid) : ib((tid >> 5) & 3), jh(tid >> 7), g((tid & 31) >> 2), c(tid & 3) {}
  __device__ int key(int e) const { return 16 * ib + g + 8 * (e >> 1); }
  __device__ int val(int n, int e) const { return 32 * jh + 8 * n + 2 * c + (e & 1); }
  __device__ int at(int n, int e) const { return key(e) * N + val(n, e); }

  // dst[t][i] (PS rows, this warp's keys i) = sum over this warp's values j of X[t][j] S[i][j]: X bf16 rows (exact),
  // S as three bf16 terms, so every product is exact and the sums keep fp32 precision (they feed gw).
  __device__ void times_t(float* dst, const bf16* X, int lane) const {
    float out[2][4] = {};
    const int row = lane & 15, col = 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      uint32_t x[4];
      ldsm4<false>(x, X + row * PB + 32 * jh + 16 * kk + col);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        uint32_t h0, l0, m0, h1, l1, m1;
        split2<true>(st[2 * kk][2 * nb], st[2 * kk][2 * nb + 1], h0, l0, &m0);
        split2<true>(st[2 * kk + 1][2 * nb], st[2 * kk + 1][2 * nb + 1], h1, l1, &m1);
        mma16816(out[nb], x, m0, m1);
        mma16816(out[nb], x, l0, l1);
        mma16816(out[nb], x, h0, h1);
      }
    }
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
      const int i = 16 * ib + 8 * nb + 2 * c;
      *reinterpret_cast<float2*>(dst + g * PS + i) = make_float2(out[nb][0], out[nb][1]);
      *reinterpret_cast<float2*>(dst + (g + 8) * PS + i) = make_float2(out[nb][2], out[nb][3]);
    }
  }

  // S <- e^{Et} S + X^T Y: X (C x N) as three bf16 terms Xh + Xl + Xm, Y bf16 rows (C x N); every product exact.
  // A = X^T by ldmatrix.trans of X's 16 x 16 block at the warp's keys, B = Y likewise at its values.
  __device__ void update(const Smem& s, const bf16* Xh, const bf16* Xl, const bf16* Xm, const bf16* Y, int lane) {
    const float e0 = s.EEt[key(0)], e1 = s.EEt[key(2)];
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      st[n][0] *= e0; st[n][1] *= e0; st[n][2] *= e1; st[n][3] *= e1;
    }
    const int xo = ((lane & 7) + 8 * (lane >> 4)) * PB + 16 * ib + 8 * ((lane >> 3) & 1);
    uint32_t xh[4], xl[4], xm[4];
    ldsm4<true>(xh, Xh + xo);
    ldsm4<true>(xl, Xl + xo);
    ldsm4<true>(xm, Xm + xo);
    const int row = (lane & 7) + 8 * ((lane >> 3) & 1), col = 8 * (lane >> 4);
#pragma unroll
    for (int np = 0; np < 2; ++np) {  // value tiles 2 np, 2 np + 1
      uint32_t y[4];
      ldsm4<true>(y, Y + row * PB + 32 * jh + 16 * np + col);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        mma16816(st[2 * np + q], xh, y[2 * q], y[2 * q + 1]);
        mma16816(st[2 * np + q], xl, y[2 * q], y[2 * q + 1]);
        mma16816(st[2 * np + q], xm, y[2 * q], y[2 * q + 1]);
      }
    }
  }

  // dst[i] = this warp's share (its values j) of sum_j (S[i][j] - X1[i] X2[j]) x[j], x a bf16 row and X1 X2^T the
  // edge pair: a product of two bf16 values, exact in fp32, which the inner fma takes out of S before any other
  // rounding. The two warps of a key block write the two halves of dst (XS[jh * N + i]).
  __device__ void edge(float* dst, const Smem& s, const bf16* x) const {
    float p[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float a = s.X1[key(2 * r)];
      float acc = 0.f;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const int j = val(n, 0);
        const float2 b = *reinterpret_cast<const float2*>(s.X2 + j);
        const float2 xv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x + j));
        acc = fmaf(fmaf(-a, b.x, st[n][2 * r]), xv.x, acc);
        acc = fmaf(fmaf(-a, b.y, st[n][2 * r + 1]), xv.y, acc);
      }
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      p[r] = acc;
    }
    if (c == 0) {
      dst[key(0)] = p[0];
      dst[key(2)] = p[1];
    }
  }

  // dst[i] = this warp's share of rowsum(gm * S)[i], gm an [N][N] fp32 matrix in global memory (nullptr: zeros).
  __device__ void rowdot(float* dst, const float* gm) const {
    float p[2] = {0.f, 0.f};
    if (gm) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          const float2 q = *reinterpret_cast<const float2*>(gm + key(2 * r) * N + val(n, 0));
          p[r] = fmaf(q.x, st[n][2 * r], p[r]);
          p[r] = fmaf(q.y, st[n][2 * r + 1], p[r]);
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        p[r] += __shfl_xor_sync(0xffffffffu, p[r], 1);
        p[r] += __shfl_xor_sync(0xffffffffu, p[r], 2);
      }
    }
    if (c == 0) {
      dst[key(0)] = p[0];
      dst[key(2)] = p[1];
    }
  }

  // The bf16 pair hi + lo of S into [N][PB] rows (sweep 2's gv reads G from there).
  __device__ void split_to(bf16* hi, bf16* lo) const {
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint32_t h, l;
        split2(st[n][2 * r], st[n][2 * r + 1], h, l);
        const int o = key(2 * r) * PB + val(n, 0);
        *reinterpret_cast<uint32_t*>(hi + o) = h;
        *reinterpret_cast<uint32_t*>(lo + o) = l;
      }
  }
};

// Sweep 2's gv[s][j] for the 8 values j in [8 w, 8 w + 8) of warp w, into dst (PS rows):
//   gv = A^T gy + (k e^{Et-Ei}) G,  A and k e^{Et-Ei} as bf16 pairs, G as the pair Sh + Sl (three products).
__device__ __forceinline__ void gv_tile(float* dst, const Smem& s, int warp, int lane) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int g = lane >> 2, c = lane & 3;
  {  // A^T gy: A^T by ldmatrix.trans of the scores [t][s]; gy [t][j] likewise (the upper lanes repeat the lower)
    const int ao = ((lane & 7) + 8 * (lane >> 4)) * PA + 8 * ((lane >> 3) & 1);
    uint32_t ah[4], al[4], gy[4];
    ldsm4<true>(ah, s.Ah + ao);
    ldsm4<true>(al, s.Al + ao);
    ldsm4<true>(gy, s.DY + (lane & 15) * PB + 8 * warp);
    mma16816(acc, ah, gy[0], gy[1]);
    mma16816(acc, al, gy[0], gy[1]);
  }
  const int row = lane & 15, col = 8 * (lane >> 4);
#pragma unroll
  for (int half = 0; half < 2; ++half) {  // keys 32 half ..+31: G's rows by ldmatrix.trans, 8 keys per matrix
    uint32_t gh[4], gl[4];
    ldsm4<true>(gh, s.Sh + (32 * half + lane) * PB + 8 * warp);
    ldsm4<true>(gl, s.Sl + (32 * half + lane) * PB + 8 * warp);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int kk = 2 * half + q;
      uint32_t kh[4], kl[4];
      ldsm4<false>(kh, s.Kh + row * PB + 16 * kk + col);
      ldsm4<false>(kl, s.Kl + row * PB + 16 * kk + col);
      mma16816(acc, kh, gh[2 * q], gh[2 * q + 1]);
      mma16816(acc, kh, gl[2 * q], gl[2 * q + 1]);
      mma16816(acc, kl, gh[2 * q], gh[2 * q + 1]);
    }
  }
  const int j = 8 * warp + 2 * c;
  *reinterpret_cast<float2*>(dst + g * PS + j) = make_float2(acc[0], acc[1]);
  *reinterpret_cast<float2*>(dst + (g + 8) * PS + j) = make_float2(acc[2], acc[3]);
}

// ================================================================================================ scores
// One decay per channel: every chunk's scores A (`scores`, as a bf16 pair) depend on that chunk's r, k, w and u
// alone, so they are formed for all chunks at once, before the forward's walk through the chunks, which then reads
// them like sweep 2 does. A block takes one chunk at a time (grid-stride over (b, h, chunk), the next chunk's inputs
// loaded while the current one computes, five blocks per SM); the per-step decays
// e^{lw} are formed as `cumsum` forms them, steps past T are zero with decay 1, so A is what the walk would form.
// Raw r, k, w of one chunk's slot (Slot(tid)) in registers: the scores kernel loads the next chunk's while it forms
// the current one's scores.
template <typename Tw>
struct ScoreInputs {
  uint2 r, k;
  RawW<Tw> w;
  bool valid;
  __device__ void load(const bf16* R, const bf16* K, const Tw* W, int T, int H, int nch, int64_t item, int tid) {
    const int bh = (int)(item / nch), c = (int)(item % nch);
    const ChunkAddr at(bh / H, bh % H, T, H, tid);
    valid = c * C + at.sl.t < T;
    r = k = make_uint2(0u, 0u);
    w.zero();
    if (valid) {
      const int64_t off = at.off(c);
      r = ld_raw(R + off); k = ld_raw(K + off); w.load(W + off);
    }
  }
};

template <typename Tw>
__global__ void __launch_bounds__(NT, 5)
chunk_scores_kernel(int T, int H, int64_t items, const bf16* __restrict__ r, const bf16* __restrict__ k,
                    const Tw* __restrict__ w, const float* __restrict__ u, bf16* __restrict__ scores) {
  __shared__ __align__(16) float R[C * PF], K[C * PF], D[C * PF], U[N];
  __shared__ __align__(16) bf16 Ah[C * PA], Al[C * PA];
  Smem s{};
  s.R = R; s.K = K; s.D = D; s.U = U; s.Ah = Ah; s.Al = Al;
  const int tid = threadIdx.x, nch = (T + C - 1) / C;
  const Slot sl(tid);
  const int o = sl.t * PF + sl.i0;
  ScoreInputs<Tw> next;
  if (blockIdx.x < items) next.load(r, k, w, T, H, nch, blockIdx.x, tid);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const ScoreInputs<Tw> in = next;
    if (item + gridDim.x < items) next.load(r, k, w, T, H, nch, item + gridDim.x, tid);
    if (tid < N) U[tid] = u[(int)(item / nch) % H * N + tid];
    put4(R + o, unpack4(in.r));
    put4(K + o, unpack4(in.k));
    const float4 lw = step_lw(in.w.get(), in.valid);  // as Prefetch::store and cumsum form the decays
    put4(D + o, make_float4(exp_ftz(clamp_lw(lw.x)), exp_ftz(clamp_lw(lw.y)), exp_ftz(clamp_lw(lw.z)),
                            exp_ftz(clamp_lw(lw.w))));
    __syncthreads();
    ::scores(s, tid);
    __syncthreads();
    reinterpret_cast<uint32_t*>(scores)[item * SCORE_WORDS + tid] = score_word(s, tid);
    // the next item's stores to R, K, D, U follow this item's reads of them (in scores) behind the barrier above;
    // its scores' writes to Ah, Al follow these reads behind the next item's first barrier
  }
}

// =============================================================================================== forward
// Per chunk: cumsums | scaled rows (with one decay per head: and the scores) | per warp: its share of y and of the
// state update, from the state in its registers | y out, next chunk in; a barrier after each phase. With one decay
// per channel the chunks' scores come from chunk_scores_kernel (scores in, read one chunk ahead with its inputs);
// with one per head they are formed here (three small products) and written to scores unless it is nullptr.
template <typename Tw, bool WH>
__global__ void __launch_bounds__(NT, 2)  // one block per (b, h), two per SM
chunk_forward_kernel(int T, int H, const bf16* __restrict__ r, const bf16* __restrict__ k,
                     const bf16* __restrict__ v, const Tw* __restrict__ w, const float* __restrict__ u,
                     const float* __restrict__ h0, bf16* __restrict__ y, float* __restrict__ hT,
                     bf16* __restrict__ scores) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem s = carve(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, bh = blockIdx.x, b = bh / H, h = bh % H;
  const ChunkAddr at(b, h, T, H, tid);
  const Slot& sl = at.sl;
  const int nch = (T + C - 1) / C;
  uint32_t* const a_io = scores ? reinterpret_cast<uint32_t*>(scores) + (int64_t)bh * nch * SCORE_WORDS + tid : nullptr;
  RegState S(tid);
  S.load(h0 ? h0 + (int64_t)bh * N * N : nullptr);
  if (WH && tid < N) s.U[tid] = u[h * N + tid];  // the scores' diagonal (per channel: chunk_scores_kernel's)
  Prefetch<Tw, false, WH> pf;
  uint32_t a_pf = 0u;
  pf.load(sl, at.off(0), at.woff(0), sl.t < T, r, k, v, w, nullptr);
  if (!WH) a_pf = a_io[0];
  pf.store(s, sl, sl.t < T);
  if (!WH) put_score_word(s, tid, a_pf);
  __syncthreads();
  float* const part = S.ih ? s.O2 : s.O1;  // y over this warp's half of the keys
  for (int c = 0; c < nch; ++c) {
    const bool more = c + 1 < nch, next_valid = (c + 1) * C + sl.t < T;
    if (more) {
      pf.load(sl, at.off(c + 1), at.woff(c + 1), next_valid, r, k, v, w, nullptr);
      if (!WH) a_pf = a_io[(int64_t)(c + 1) * SCORE_WORDS];
    }
    cumsum<false>(s, tid);
    if (WH && warp == 0) dots(s.dA, s.Rb, s.Kb);  // r k^T (s.dA is free in the forward)
    __syncthreads();
    scaled_rk<2, 2>(s, sl);
    if (WH) head_scores<true, false>(s, tid, s.dA);
    __syncthreads();
    {
      uint32_t vt[4];
      ldsm4<true>(vt, s.V + ((lane & 7) + 8 * ((lane >> 3) & 1)) * PB + 16 * S.jb + 8 * (lane >> 4));
      float out[2][4];
      S.y_partial(out, s, vt, S.ih == 0, lane);
      S.update(s, vt, lane);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        const int j = 16 * S.jb + 8 * nb + 2 * S.c;
        *reinterpret_cast<float2*>(part + S.g * PS + j) = make_float2(out[nb][0], out[nb][1]);
        *reinterpret_cast<float2*>(part + (S.g + 8) * PS + j) = make_float2(out[nb][2], out[nb][3]);
      }
    }
    __syncthreads();
    if (c * C + sl.t < T) {
      const float4 o1 = ld4(s.O1 + sl.t * PS + sl.i0), o2 = ld4(s.O2 + sl.t * PS + sl.i0);
      *reinterpret_cast<uint2*>(y + at.off(c)) = make_uint2(bf16x2(o1.x + o2.x, o1.y + o2.y), bf16x2(o1.z + o2.z, o1.w + o2.w));
    }
    if (WH && a_io) a_io[(int64_t)c * SCORE_WORDS] = score_word(s, tid);
    if (more) {
      pf.store(s, sl, next_valid);
      if (!WH) put_score_word(s, tid, a_pf);  // y_partial above was the last reader of this chunk's scores
    }
    __syncthreads();
  }
  S.store(hT + (int64_t)bh * N * N);
}

// ====================================================================================== backward sweep 1
// Forward in time: gr, b = r * (gr without the bonus), gu partials, P = rowsum(ghT * S_T).
template <typename Tw, bool WH>
__device__ __forceinline__ void backward_sweep1(const Smem& s, int bh, int T, int H, const bf16* __restrict__ r,
                                                const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                const Tw* __restrict__ w, const float* __restrict__ u,
                                                const float* __restrict__ h0, const bf16* __restrict__ gy,
                                                const float* __restrict__ ghT, bf16* __restrict__ gr,
                                                float* __restrict__ bscr, float* __restrict__ gu_part,
                                                float* __restrict__ P) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, b = bh / H, h = bh % H;
  const ChunkAddr at(b, h, T, H, tid);
  const Slot& sl = at.sl;
  // elementwise ownership: channel i = tid & 63, rows owned_row(tid >> 6, 0..3)
  const int ei = tid & 63, eg = tid >> 6;
  float gu_acc = 0.f;
  if (tid < N) {
    s.U[tid] = u[h * N + tid];
    s.X1[tid] = 0.f;  // k of the previous chunk's last step
    s.X2[tid] = 0.f;  // v of the previous chunk's last step
  }
  RegRows S(tid);
  S.load(h0 ? h0 + (int64_t)bh * N * N : nullptr);
  Prefetch<Tw, true, WH> pf;
  const int nch = (T + C - 1) / C;
  pf.load(sl, at.off(0), at.woff(0), sl.t < T, r, k, v, w, gy);
  pf.store(s, sl, sl.t < T);
  __syncthreads();
  for (int c = 0; c < nch; ++c) {
    const bool more = c + 1 < nch, next_valid = (c + 1) * C + sl.t < T;
    if (more) pf.load(sl, at.off(c + 1), at.woff(c + 1), next_valid, r, k, v, w, gy);
    S.edge(s.XS + S.jh * N, s, s.DY);  // XS = (S0 - k_prev v_prev^T) gy_0, from the undecayed S0
    cumsum<!WH>(s, tid);
    if (warp == 4) dots(s.dA, s.DY, s.V);
    if (!more) S.rowdot(s.Z + S.jh * N, ghT ? ghT + (int64_t)bh * N * N : nullptr);  // Z = rowsum(ghT * S0), for P
    __syncthreads();
    scaled_rk<0, 3>(s, sl);
    if (WH) head_scores<false, true>(s, tid, nullptr);
    __syncthreads();
    // O1 + O4 = gy S0^T (per half of the values); S <- e^{Et} S + (k e^{Et-Ei})^T v; one decay per head: O2 = M k
    S.times_t(S.jh ? s.O4 : s.O1, s.DY, lane);
    S.update(s, s.Kh, s.Kl, s.Km, s.V, lane);
    if (WH && warp < 4) decayed_times<false>(s.O2, s, s.Kb, warp);
    __syncthreads();
    float gr_out[4], b_out[4], in[4];
    if (!WH) PairedRows<false>(s, s.K, ei).sums(eg, in);
    // one decay per head: rolled, which keeps the registers under the bound of two blocks per SM (unrolled,
    // ptxas spilled 140 bytes); gr_out and b_out then take 32 bytes of local memory
#pragma unroll(WH ? 1 : 4)
    for (int m = 0; m < 4; ++m) {
      const int t = owned_row(eg, m), o = t * PF + ei;
      // the in-chunk sum leaves j = t-1 (weight exactly 1) out: b leaves the adjacent pair out, and subtracting it
      // after rounding it into acc left noise that gw multiplies by |lw| (up to 1e5 for strong decays)
      const float acc = exp_ftz(s.Ex[o]) * (s.O1[t * PS + ei] + s.O4[t * PS + ei]) + (WH ? s.O2[t * PS + ei] : in[m]);
      const float rt = s.R[o], kt = s.K[o], dtt = s.dA[t * PS + t];
      gu_acc = fmaf(rt * kt, dtt, gu_acc);
      // t = 0: the pair with the previous chunk's last step is inside the state term (gr keeps it); b takes
      // the state term from XS, where it was left out before rounding (e^{Ex_0} = 1, no in-chunk terms)
      const float adj = t == 0 ? 0.f : s.dA[t * PS + t - 1] * s.K[(t - 1) * PF + ei];
      const float far = t == 0 ? s.XS[ei] + s.XS[N + ei] : acc;
      gr_out[m] = acc + adj + s.U[ei] * kt * dtt;
      b_out[m] = rt * far;
    }
#pragma unroll
    for (int m = 0; m < 4; ++m) {  // stores after all loads (the compiler cannot tell smem from global here)
      const int t = owned_row(eg, m);
      if (c * C + t < T) {
        const int64_t g = at.row(c * C + t) + ei;
        gr[g] = cvt<bf16>(gr_out[m]);
        bscr[g] = b_out[m];
      }
    }
    if (tid < N) {  // X1, X2 were last read by S.edge, before the first barrier of this chunk
      s.X1[tid] = s.K[(C - 1) * PF + tid];
      s.X2[tid] = __bfloat162float(s.V[(C - 1) * PB + tid]);
    }
    __syncthreads();  // the elementwise pass above still reads this chunk's R, K
    if (more) pf.store(s, sl, next_valid);
    __syncthreads();
  }
  // gu partial: reduce the four row groups of each channel
  s.O2[tid] = gu_acc;  // O2 has >= 256 floats
  __syncthreads();
  if (tid < N) {
    gu_part[(int64_t)bh * N + tid] = s.O2[tid] + s.O2[tid + 64] + s.O2[tid + 128] + s.O2[tid + 192];
    // P = rowsum(ghT * (S_T - k_{T-1} v_{T-1}^T)): the final-state gradient without the pair
    // (T-1, "T") that the reverse sweep leaves out of gk's share of the decay gradient likewise.
    // From the last chunk's S0 and rows s < L (L = its last valid row), every term decayed.
    const int L = T - 1 - (nch - 1) * C;
    const float eL = s.Ei[L * PF + tid];
    float p = exp_ftz(eL) * (s.Z[tid] + s.Z[N + tid]);
    if (ghT) {
      const float* g = ghT + (int64_t)bh * N * N + tid * N;
      for (int q = 0; q < L; ++q) {
        float gv_ = 0.f;
        for (int j = 0; j < N; ++j) gv_ = fmaf(g[j], __bfloat162float(s.V[q * PB + j]), gv_);
        p = fmaf(s.K[q * PF + tid] * exp_ftz(eL - s.Ei[q * PF + tid]), gv_, p);
      }
    }
    P[(int64_t)bh * N + tid] = p;
  }
}

// ====================================================================================== backward sweep 2
// Reverse in time: gk, gv, gh0, and kd_s = k_s * (gk_s - u r_s dA_ss - r_{s+1} dA_{s+1,s}) (the decay
// gradient's share of each key step, into kscr). G (registers) holds dL/dS_end of the current chunk. Independent of
// sweep 1, so both run at once (chunk_backward_kernel); chunk_gw_kernel then combines kd with sweep 1's b and P.
template <typename Tw, bool WH>
__device__ __forceinline__ void backward_sweep2(const Smem& s, int bh, int T, int H, const bf16* __restrict__ r,
                                                const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                const Tw* __restrict__ w, const float* __restrict__ u,
                                                const bf16* __restrict__ gy, const float* __restrict__ ghT,
                                                const bf16* __restrict__ scores, bf16* __restrict__ gk,
                                                bf16* __restrict__ gv, float* __restrict__ kscr,
                                                float* __restrict__ gh0) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, b = bh / H, h = bh % H;
  const ChunkAddr at(b, h, T, H, tid);
  const Slot& sl = at.sl;
  const int ei = tid & 63, eg = tid >> 6;
  if (tid < N) {
    s.U[tid] = u[h * N + tid];
    s.X1[tid] = 0.f;  // r of the next chunk's first step
    s.X2[tid] = 0.f;  // gy of the next chunk's first step
  }
  RegRows G(tid);
  G.load(ghT ? ghT + (int64_t)bh * N * N : nullptr);
  G.split_to(s.Sh, s.Sl);
  Prefetch<Tw, true, WH> pf;
  const int nch = (T + C - 1) / C;
  // the scores A of every chunk, as the forward formed them (score_word)
  const uint32_t* const a_in = reinterpret_cast<const uint32_t*>(scores) + (int64_t)bh * nch * SCORE_WORDS + tid;
  pf.load(sl, at.off(nch - 1), at.woff(nch - 1), (nch - 1) * C + sl.t < T, r, k, v, w, gy);
  uint32_t a_pf = a_in[(int64_t)(nch - 1) * SCORE_WORDS];
  pf.store(s, sl, (nch - 1) * C + sl.t < T);
  put_score_word(s, tid, a_pf);
  __syncthreads();
  for (int c = nch - 1; c >= 0; --c) {
    const bool more = c > 0;  // chunk c-1 is always full
    if (more) {
      pf.load(sl, at.off(c - 1), at.woff(c - 1), true, r, k, v, w, gy);
      a_pf = a_in[(int64_t)(c - 1) * SCORE_WORDS];
    }
    G.edge(s.XS + G.jh * N, s, s.V + (C - 1) * PB);  // XS = (G - r_next^T gy_next) v_{C-1}, undecayed G
    cumsum<!WH>(s, tid);
    if (warp == 0) dots(s.dA, s.DY, s.V);
    __syncthreads();
    scaled_rk<3, 2>(s, sl);
    if (WH) head_scores<false, true>(s, tid, nullptr);
    __syncthreads();
    // O1 = gv (Sh + Sl: the undecayed G); O2 + O4 = V G^T (per half of the values); G <- e^{Et} G + (r e^{Ex})^T gy;
    // one decay per head: O3 = M^T r (the in-chunk sum of gk)
    gv_tile(s.O1, s, warp, lane);
    G.times_t(G.jh ? s.O4 : s.O2, s.V, lane);
    G.update(s, s.Rh, s.Rl, s.Rm, s.DY, lane);
    if (WH && warp < 4) decayed_times<true>(s.O3, s, s.Rb, warp);
    __syncthreads();
    float kd_out[4], gk_out[4], gv_out[4], ins[4];
    if (!WH) PairedRows<true>(s, s.R, ei).sums(eg, ins);
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int t = owned_row(eg, m), o = t * PF + ei;  // t plays "s" (the key position) here
      const float fs = exp_ftz(s.Et[ei] - s.Ei[o]);
      const float st = fs * (s.O2[t * PS + ei] + s.O4[t * PS + ei]);  // through G (the chunk's end state)
      // the in-chunk sum leaves q = t+1 (weight exactly 1) out, as in the forward sweep; t = C-1: that pair is
      // inside G
      const float in = WH ? s.O3[t * PS + ei] : ins[m];
      const float adj = t == C - 1 ? 0.f : s.dA[(t + 1) * PS + t] * s.R[(t + 1) * PF + ei];
      // the state part without the pair (t, t+1): t = C-1 takes it from XS, where the pair with the next chunk's
      // first step was left out before rounding; at T-1 the whole state part is the pair with the final-state
      // gradient, left out of P too
      const float far = c * C + t == T - 1 ? 0.f : t == C - 1 ? fs * (s.XS[ei] + s.XS[N + ei]) : st;
      kd_out[m] = s.K[o] * (far + in);
      gk_out[m] = st + in + adj + s.U[ei] * s.R[o] * s.dA[t * PS + t];
      gv_out[m] = s.O1[t * PS + ei];
    }
#pragma unroll
    for (int m = 0; m < 4; ++m) {  // stores after all loads, as in sweep 1
      const int t = owned_row(eg, m);
      if (c * C + t < T) {
        const int64_t g = at.row(c * C + t) + ei;
        gk[g] = cvt<bf16>(gk_out[m]);
        gv[g] = cvt<bf16>(gv_out[m]);
        kscr[g] = kd_out[m];
      }
    }
    if (tid < N) {  // X1, X2 were last read by G.edge, before the first barrier of this chunk
      s.X1[ei] = s.R[ei];
      s.X2[ei] = __bfloat162float(s.DY[ei]);
    }
    G.split_to(s.Sh, s.Sl);  // every warp's gv_tile above has read the former G
    __syncthreads();
    if (more) {
      pf.store(s, sl, true);
      put_score_word(s, tid, a_pf);  // gv_tile above was the last reader of this chunk's scores
    }
    __syncthreads();
  }
  if (gh0) G.store(gh0 + (int64_t)bh * N * N);
}

// ========================================================================================= backward launch
// The two sweeps are independent (gw, the only output needing both, is formed afterwards), so one launch runs
// them side by side: block 2 bh is sweep 1 of (b, h), block 2 bh + 1 its sweep 2. Two blocks fit an SM (smem
// and the 128-register bound below, under which ptxas spills nothing), so up to 2 x (SMs) sweeps run at once
// instead of one sweep after the other.
template <typename Tw, bool WH>
__global__ void __launch_bounds__(NT, 2)
chunk_backward_kernel(int T, int H, const bf16* __restrict__ r, const bf16* __restrict__ k,
                      const bf16* __restrict__ v, const Tw* __restrict__ w, const float* __restrict__ u,
                      const float* __restrict__ h0, const bf16* __restrict__ gy, const float* __restrict__ ghT,
                      const bf16* __restrict__ scores, bf16* __restrict__ gr, bf16* __restrict__ gk,
                      bf16* __restrict__ gv,
                      float* __restrict__ gu_part, float* __restrict__ gh0, float* __restrict__ bscr,
                      float* __restrict__ kscr, float* __restrict__ P) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem s = carve(smem_raw);
  const int bh = blockIdx.x >> 1;
  if (blockIdx.x & 1)
    backward_sweep2<Tw, WH>(s, bh, T, H, r, k, v, w, u, gy, ghT, scores, gk, gv, kscr, gh0);
  else
    backward_sweep1<Tw, WH>(s, bh, T, H, r, k, v, w, u, h0, gy, ghT, gr, bscr, gu_part, P);
}

// gw from the sweeps' per-step terms, per channel i of (b, h) (the sum runs backwards in time, in fp64):
//   dL/dlw_m = P + sum_{t>m} b_t - sum_{s>=m} kd_s,   gw_m = dL/dlw_m * lw_m.
// One block per (b, h) walks tiles of GW_TILE steps from the last and reads every input once. Thread (group q,
// channel i) loads its GW_ROWS consecutive steps of the tile into registers, all loads in flight together; the
// groups' sums of b - kd meet in shared memory; each thread then walks its steps backwards from the carry (P plus
// every later tile) and the later groups' sums.
constexpr int GW_GROUPS = 16, GW_ROWS = 8, GW_TILE = GW_GROUPS * GW_ROWS;

// A thread's rows of a tile: steps t0 + r for r in [r0, GW_ROWS) (r0 > 0 only in the sequence's first tile, when
// it is partial; FULL: the caller passes r0 = 0 and nothing is predicated), step t0 + r0 at p[0] of each
// [B, T, H, N] tensor and the next steps every `stride` elements (32-bit offsets keep the registers within the 64
// of 1024 threads). seg: this tile's half of seg_sum. Returns the carry for the tile before.
template <typename Tw, bool FULL>
__device__ __forceinline__ double gw_rows(const float* pb, const float* pk, const Tw* pw, Tw* pg, int stride, int r0,
                                          double carry, double (*seg)[N], int q, int i) {
  float bv[GW_ROWS], kv[GW_ROWS], lw[GW_ROWS];
#pragma unroll
  for (int r = 0; r < GW_ROWS; ++r) {
    const bool ok = FULL || r >= r0;
    const int o = (r - r0) * stride;
    bv[r] = ok ? pb[o] : 0.f;
    kv[r] = ok ? pk[o] : 0.f;
    lw[r] = ok ? lw_of(to_f32(pw[o])) : 0.f;
  }
  double sum = 0.0;
#pragma unroll
  for (int r = 0; r < GW_ROWS; ++r) sum += (double)bv[r] - (double)kv[r];
  seg[q][i] = sum;
  __syncthreads();
  double run = 0.0, later = 0.0;  // run: the groups' sums from the last down to p; later: those after q
#pragma unroll
  for (int p = GW_GROUPS - 1; p >= 0; --p) {
    if (p == q) later = run;
    run += seg[p][i];
  }
  double acc = carry + later;
#pragma unroll
  for (int r = GW_ROWS - 1; r >= 0; --r) {
    const double dl = acc - (double)kv[r];
    acc = dl + (double)bv[r];
    if (FULL || r >= r0) pg[(r - r0) * stride] = cvt<Tw>((float)(dl * (double)lw[r]));
  }
  return carry + run;
}

template <typename Tw>
__global__ void __launch_bounds__(N * GW_GROUPS)
chunk_gw_kernel(int T, int H, const Tw* __restrict__ w, const float* __restrict__ bscr,
                const float* __restrict__ kscr, const float* __restrict__ P, Tw* __restrict__ gw) {
  __shared__ double seg_sum[2][GW_GROUPS][N];  // two tiles' worth: one barrier per tile
  const int i = threadIdx.x % N, q = threadIdx.x / N, bh = blockIdx.x, b = bh / H, h = bh % H;
  const int64_t base = ((int64_t)b * T * H + h) * N + i;
  const int stride = H * N;
  double carry = (double)P[(int64_t)bh * N + i];
  int buf = 0;
  for (int end = T; end > 0; end -= GW_TILE, buf ^= 1) {
    const int t0 = end - GW_TILE + q * GW_ROWS;  // steps t0 .. t0 + GW_ROWS - 1; those before 0 do not exist
    const int r0 = max(-t0, 0);
    const int64_t first = base + (int64_t)(t0 + r0) * stride;
    if (end >= GW_TILE)  // the same for the whole block, like the barrier inside
      carry = gw_rows<Tw, true>(bscr + first, kscr + first, w + first, gw + first, stride, 0, carry, seg_sum[buf], q, i);
    else
      carry = gw_rows<Tw, false>(bscr + first, kscr + first, w + first, gw + first, stride, r0, carry, seg_sum[buf], q, i);
  }
}

// gw for one decay per head ([B, T, H, 1] w): gw_m = lw_m * sum_i dL/dlw_m[i], the channel sum taken first.
// With x_t = sum_i (b_t[i] - kd_t[i]) and kh_t = sum_i kd_t[i] (fp64):
//   sum_i dL/dlw_m[i] = sum_i P[i] + sum_{t>m} x_t - kh_m.
// One block of GWH_THREADS per (b, h) walks tiles of GWH_THREADS steps from the last: each warp reduces rows
// (one step's 64 channels, two per lane) into x and kh, then thread j of the tile takes the sum of x over the
// later steps from a suffix scan (within its warp by shuffles, across warps from the warp totals).
constexpr int GWH_THREADS = 1024;

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename Tw>
__global__ void __launch_bounds__(GWH_THREADS)
chunk_gw_head_kernel(int T, int H, const Tw* __restrict__ w, const float* __restrict__ bscr,
                     const float* __restrict__ kscr, const float* __restrict__ P, Tw* __restrict__ gw) {
  constexpr int WARPS = GWH_THREADS / 32;
  __shared__ double xs[GWH_THREADS], ks[GWH_THREADS], wtot[WARPS], psum;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, bh = blockIdx.x, b = bh / H, h = bh % H;
  const int64_t base = ((int64_t)b * T * H + h) * N, stride = (int64_t)H * N, wbase = (int64_t)b * T * H + h;
  if (warp == 0) {
    const double p = warp_sum((double)P[(int64_t)bh * N + lane] + (double)P[(int64_t)bh * N + lane + 32]);
    if (lane == 0) psum = p;
  }
  __syncthreads();
  double carry = psum;  // sum_i P[i] plus x of every step after the current tile
  for (int t0 = (T - 1) / GWH_THREADS * GWH_THREADS; t0 >= 0; t0 -= GWH_THREADS) {
    const int len = min(GWH_THREADS, T - t0);
    for (int j = warp; j < len; j += WARPS) {
      const int64_t g = base + (int64_t)(t0 + j) * stride;
      const double b0 = bscr[g + lane], b1 = bscr[g + lane + 32], k0 = kscr[g + lane], k1 = kscr[g + lane + 32];
      const double x = warp_sum((b0 - k0) + (b1 - k1)), kh = warp_sum(k0 + k1);
      if (lane == 0) { xs[j] = x; ks[j] = kh; }
    }
    __syncthreads();
    const double own = tid < len ? xs[tid] : 0.0;
    double suf = own;  // inclusive suffix sum over the lanes of this warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_down_sync(0xffffffffu, suf, o);
      if (lane + o < 32) suf += n;
    }
    if (lane == 0) wtot[warp] = suf;
    __syncthreads();
    double later = 0.0, total = 0.0;  // the later warps' totals; the tile's
    for (int q = WARPS - 1; q >= 0; --q) {
      if (q > warp) later += wtot[q];
      total += wtot[q];
    }
    if (tid < len) {
      const int64_t gi = wbase + (int64_t)(t0 + tid) * H;
      const double dl = carry + (suf - own + later) - ks[tid];
      gw[gi] = cvt<Tw>((float)(dl * (double)lw_of(to_f32(w[gi]))));
    }
    carry += total;
    __syncthreads();  // xs, ks, wtot are refilled for the next tile
  }
}

// The forward and backward kernels ask for the largest shared-memory carve-out, so two blocks (2 x 89 KiB) fit an
// SM.
cudaError_t setup(const void* fn) {
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes());
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(fn, cudaFuncAttributePreferredSharedMemoryCarveout, (int)cudaSharedmemCarveoutMaxShared);
}

// Blocks of chunk_scores_kernel: enough to fill every SM several times over (kernels.bench counts them the same
// way), each then takes items in turn.
constexpr int SCORES_BLOCKS_PER_SM = 32;
cudaError_t scores_grid(int64_t items, int* grid) {
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  *grid = (int)std::min<int64_t>(items, (int64_t)sms * SCORES_BLOCKS_PER_SM);
  return err;
}

template <typename Tw, bool WH>
cudaError_t launch_forward(int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
                           const float* u, const float* h0, void* y, float* hT, void* scores, cudaStream_t stream) {
  cudaError_t err = setup((const void*)chunk_forward_kernel<Tw, WH>);
  if (err != cudaSuccess) return err;
  if (!WH) {
    const int64_t items = (int64_t)B * H * ((T + C - 1) / C);
    int grid = 0;
    err = scores_grid(items, &grid);
    if (err != cudaSuccess) return err;
    chunk_scores_kernel<Tw><<<grid, NT, 0, stream>>>(T, H, items, (const bf16*)r, (const bf16*)k, (const Tw*)w, u,
                                                     (bf16*)scores);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  chunk_forward_kernel<Tw, WH><<<B * H, NT, smem_bytes(), stream>>>(
      T, H, (const bf16*)r, (const bf16*)k, (const bf16*)v, (const Tw*)w, u, h0, (bf16*)y, hT, (bf16*)scores);
  return cudaGetLastError();
}

template <typename Tw, bool WH>
cudaError_t launch_backward(int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
                            const float* u, const float* h0, const void* gy, const float* ghT, const void* scores,
                            void* gr, void* gk, void* gv, void* gw, float* gu_part, float* gh0, float* bscr,
                            float* kscr, float* P, cudaStream_t stream) {
  cudaError_t err = setup((const void*)chunk_backward_kernel<Tw, WH>);
  if (err != cudaSuccess) return err;
  chunk_backward_kernel<Tw, WH><<<2 * B * H, NT, smem_bytes(), stream>>>(
      T, H, (const bf16*)r, (const bf16*)k, (const bf16*)v, (const Tw*)w, u, h0, (const bf16*)gy, ghT,
      (const bf16*)scores, (bf16*)gr,
      (bf16*)gk, (bf16*)gv, gu_part, gh0, bscr, kscr, P);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (WH)
    chunk_gw_head_kernel<Tw><<<B * H, GWH_THREADS, 0, stream>>>(T, H, (const Tw*)w, bscr, kscr, P, (Tw*)gw);
  else
    chunk_gw_kernel<Tw><<<B * H, N * GW_GROUPS, 0, stream>>>(T, H, (const Tw*)w, bscr, kscr, P, (Tw*)gw);
  return cudaGetLastError();
}

// Resident blocks per SM of fn; a kernel launched with dynamic shared memory gets setup's attributes first, as
// its launches do.
int blocks_per_sm(const void* fn, int threads, size_t smem) {
  if (smem > 0 && setup(fn) != cudaSuccess) return -1;
  int n = 0;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, threads, smem) == cudaSuccess ? n : -1;
}

}  // namespace

// Launchers (declared in wkv6_cuda_bind.cpp). r, k, v, y, gy, gr, gk, gv bf16; w, gw bf16 (tw = 1) or
// fp32 (tw = 0), [B,T,H,N] or, with wh = 1, one decay per head [B,T,H,1]; head size 64. Same buffers and meaning
// as wkv6_cuda_forward / wkv6_cuda_backward, plus kscr (fp32 [B,T,H,N] scratch, like bscr) and the chunks' scores
// (bf16 [B,H,ceil(T/16),2,16,16], wkv6_chunk_scores_numel values), which the forward writes and the backward reads.
// With one decay per head the forward takes scores = nullptr when no backward will run; with one per channel it
// always needs the buffer (chunk_scores_kernel fills it first).
int64_t wkv6_chunk_scores_numel(int B, int T, int H) { return (int64_t)B * H * ((T + C - 1) / C) * 2 * SCORE_WORDS; }

cudaError_t wkv6_chunk_forward(int tw, int wh, int B, int T, int H, const void* r, const void* k, const void* v,
                               const void* w, const float* u, const float* h0, void* y, float* hT, void* scores,
                               cudaStream_t stream) {
#define WKV6_FWD(TW, WH) launch_forward<TW, WH>(B, T, H, r, k, v, w, u, h0, y, hT, scores, stream)
  if (tw == 1) return wh ? WKV6_FWD(bf16, true) : WKV6_FWD(bf16, false);
  return wh ? WKV6_FWD(float, true) : WKV6_FWD(float, false);
#undef WKV6_FWD
}

cudaError_t wkv6_chunk_backward(int tw, int wh, int B, int T, int H, const void* r, const void* k, const void* v,
                                const void* w, const float* u, const float* h0, const void* gy, const float* ghT,
                                const void* scores, void* gr, void* gk, void* gv, void* gw, float* gu_part,
                                float* gh0, float* bscr, float* kscr, float* P, cudaStream_t stream) {
#define WKV6_BWD(TW, WH) \
  launch_backward<TW, WH>(B, T, H, r, k, v, w, u, h0, gy, ghT, scores, gr, gk, gv, gw, gu_part, gh0, bscr, kscr, P, \
                          stream)
  if (tw == 1) return wh ? WKV6_BWD(bf16, true) : WKV6_BWD(bf16, false);
  return wh ? WKV6_BWD(float, true) : WKV6_BWD(float, false);
#undef WKV6_BWD
}

// Resident blocks per SM of the chunk kernels (bf16 w) on the current device: {forward, backward, gw} with one
// decay per channel, then {forward, backward} with one per head, then the scores kernel.
void wkv6_chunk_occupancy(int* out) {
  out[5] = blocks_per_sm((const void*)chunk_scores_kernel<bf16>, NT, 0);
  out[0] = blocks_per_sm((const void*)chunk_forward_kernel<bf16, false>, NT, smem_bytes());
  out[1] = blocks_per_sm((const void*)chunk_backward_kernel<bf16, false>, NT, smem_bytes());
  out[2] = blocks_per_sm((const void*)chunk_gw_kernel<bf16>, N * GW_GROUPS, 0);
  out[3] = blocks_per_sm((const void*)chunk_forward_kernel<bf16, true>, NT, smem_bytes());
  out[4] = blocks_per_sm((const void*)chunk_backward_kernel<bf16, true>, NT, smem_bytes());
}
