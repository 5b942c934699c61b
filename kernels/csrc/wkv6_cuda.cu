// wkv6 (RWKV-6) forward and backward CUDA kernels: sequential in T, parallel over B*H and the state.
//
// Plain CUDA (no torch headers): launchers take raw pointers and a stream, so this file compiles with
// `nvcc -c`. kernels/csrc/wkv6_cuda_bind.cpp allocates tensors and calls the launchers.
//
// Layout: r, k, w [B,T,H,N]; v, y [B,T,H,N] (K = V = N, N in {32, 64, 128}); u [H,N] fp32;
// states [B,H,N,N] fp32 (row = key index i, column = value index j). r, k, v (and y, gr, gk, gv) are
// float or bf16 (Tin); w (and gw) float or bf16 (Tw). All math in fp32 registers; the log-decay
// gradient's running sum in fp64.
//
// Recurrence: d_t = exp(-exp(w_t)); y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j] + S_{t-1}[i,j]);
//             S_t[i,j] = d_t[i] S_{t-1}[i,j] + k_t[i] v_t[j].
// Backward (same identities as the CPU kernel, see wkv6_cpu.cpp), G_t = dL/dS_t:
//   gr_t = S_{t-1} gy_t + u k_t (v_t.gy_t)           forward sweep, "row" layout     (kernel A, y=0)
//   gv_t = G_t^T k_t + (r_t.u.k_t) gy_t               reverse sweep, "column" layout  (kernel A, y=1)
//   gk_t = G_t v_t + u r_t (v_t.gy_t), gw_t, gh0       reverse sweep, "row" layout     (kernel B)
//   dL/dl_t = P' - sum_{s>=t} a'_s + sum_{s>t} b'_s with a'_s = k_s*(d_{s+1} G_{s+1} v_s),
//   b'_s = r_s*(d_{s-1} S_{s-2} gy_s), P' = rowsum(G_{T-1} * d_{T-1} S_{T-2}); gw_t = dL/dl_t * (-exp(w_t)).
//   (Every term carries a decay factor, so fast-decaying channels keep relative accuracy: see
//   wkv6_cpu.cpp.) Kernel A writes b'_t (fp32 scratch) and P'; kernel B consumes them. Kernel A's
//   two halves are independent and share one launch.
//
// Thread mapping: one block of 4N threads per (b,h). Each thread owns N/4 entries of the N x N
// state in registers: "column" layout = thread (s, j) holds S[s*N/4 .. s*N/4+N/4-1, j] and reduces
// over i with two lane shuffles; "row" layout = thread (s, i) holds S[i, s*N/4 ..] and reduces over
// j the same way (s = lane & 3, so the 4 partners sit in one warp).
// Inputs are staged through shared memory TC time steps at a time, double-buffered: the next
// chunk's global loads are in flight in registers while the current chunk is computed, so there is
// one __syncthreads per TC steps (the official kernel syncs twice per step and waits on each load).
// Per-step vectors are stored padded (4 floats after every 16) so the 4 lanes that read different
// parts of one vector with 16-byte loads hit different banks.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int SPLIT = 4;

__device__ __forceinline__ int pad(int x) { return x + (x >> 4) * 4; }

template <int N>
struct Geo {
  static constexpr int NT = SPLIT * N;    // threads per block
  static constexpr int PER = N / SPLIT;   // state entries per thread
  static constexpr int PADN = N + N / 4;  // padded length of one per-step vector
};

// Steps per staged chunk: the largest TC <= 16 whose double buffer of NV vectors fits in 40 KiB
// of static shared memory (TC <= 16 keeps every thread to at most one 16-byte load per vector).
template <int N, int NV>
__host__ __device__ constexpr int chunk_steps() {
  return (40960 / (2 * NV * Geo<N>::PADN * 4)) < 16 ? (40960 / (2 * NV * Geo<N>::PADN * 4)) : 16;
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float decay(float w) { return __expf(-__expf(w)); }

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

__device__ __forceinline__ float comp(const float4& v, int c) {
  return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
}

// One thread's share of staging a chunk of TC steps of one [B,T,H,N] tensor: thread tid loads the
// 4 elements [4g, 4g+4) of step tt (zeros outside [0, T)).
template <int N, int TC>
struct Stager {
  static constexpr int UNITS = TC * N / 4;
  static_assert(UNITS <= Geo<N>::NT, "one 16-byte load per thread per vector");
  int tt, g;
  bool active;
  __device__ explicit Stager(int tid) : tt(tid / (N / 4)), g(tid % (N / 4)), active(tid < UNITS) {}
  template <bool DECAY, typename Elem>
  __device__ float4 load(const Elem* base, int64_t stride, int t0, int T) const {
    const int t = t0 + tt;
    if (!active || t < 0 || t >= T) return make_float4(0.f, 0.f, 0.f, 0.f);
    float4 x = load4(base + (int64_t)t * stride + 4 * g);
    if (DECAY) x = make_float4(decay(x.x), decay(x.y), decay(x.z), decay(x.w));
    return x;
  }
  __device__ void store(float* vec, const float4& x) const {
    if (active) *reinterpret_cast<float4*>(vec + tt * Geo<N>::PADN + pad(4 * g)) = x;
  }
};

// ------------------------------------------------------------------------------------------------
// Forward: column layout, thread (s, j). Staged vectors: r, k, d = exp(-exp(w)), v.
template <typename Tin, typename Tw, int N>
__global__ void __launch_bounds__(Geo<N>::NT)
wkv6_forward_kernel(int T, int H, const Tin* __restrict__ r, const Tin* __restrict__ k,
                    const Tin* __restrict__ v, const Tw* __restrict__ w, const float* __restrict__ u,
                    const float* __restrict__ h0, Tin* __restrict__ y, float* __restrict__ hT) {
  constexpr int NV = 4, TC = chunk_steps<N, NV>(), PER = Geo<N>::PER, PADN = Geo<N>::PADN;
  __shared__ __align__(16) float sm[2 * NV * TC * PADN];
  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int tid = threadIdx.x, s = tid & 3, j = tid >> 2;
  const int64_t base = ((int64_t)b * T * H + h) * N, stride = (int64_t)H * N;
  const int64_t sbase = (int64_t)bh * N * N;

  float S[PER], uu[PER];
#pragma unroll
  for (int m = 0; m < PER; ++m) {
    const int i = s * PER + m;
    uu[m] = u[h * N + i];
    S[m] = h0 ? h0[sbase + (int64_t)i * N + j] : 0.f;
  }
  const Stager<N, TC> st(tid);
  auto vec = [&](int buf, int n) { return sm + (buf * NV + n) * TC * PADN; };
  float4 pr = st.template load<false>(r + base, stride, 0, T), pk = st.template load<false>(k + base, stride, 0, T);
  float4 pd = st.template load<true>(w + base, stride, 0, T), pv = st.template load<false>(v + base, stride, 0, T);
  st.store(vec(0, 0), pr); st.store(vec(0, 1), pk); st.store(vec(0, 2), pd); st.store(vec(0, 3), pv);
  __syncthreads();
  const int nch = (T + TC - 1) / TC;
  for (int c = 0; c < nch; ++c) {
    const int cur = c & 1, t0 = c * TC;
    const bool more = c + 1 < nch;
    if (more) {
      pr = st.template load<false>(r + base, stride, t0 + TC, T);
      pk = st.template load<false>(k + base, stride, t0 + TC, T);
      pd = st.template load<true>(w + base, stride, t0 + TC, T);
      pv = st.template load<false>(v + base, stride, t0 + TC, T);
    }
    const int nsteps = min(TC, T - t0);
    for (int tt = 0; tt < nsteps; ++tt) {
      const float* sr = vec(cur, 0) + tt * PADN + pad(s * PER);
      const float* sk = vec(cur, 1) + tt * PADN + pad(s * PER);
      const float* sd = vec(cur, 2) + tt * PADN + pad(s * PER);
      const float vj = vec(cur, 3)[tt * PADN + pad(j)];
      float y0 = 0.f, y1 = 0.f;
#pragma unroll
      for (int m4 = 0; m4 < PER; m4 += 4) {
        const float4 r4 = load4(sr + pad(m4)), k4 = load4(sk + pad(m4)), d4 = load4(sd + pad(m4));
#pragma unroll
        for (int c4 = 0; c4 < 4; ++c4) {
          const int m = m4 + c4;
          const float kv = comp(k4, c4) * vj;
          const float x = fmaf(uu[m], kv, S[m]);  // u_i k_i v_j + S_ij; two accumulators for ILP
          if (c4 & 1) y1 = fmaf(comp(r4, c4), x, y1); else y0 = fmaf(comp(r4, c4), x, y0);
          S[m] = fmaf(comp(d4, c4), S[m], kv);
        }
      }
      const float yj = quad_sum(y0 + y1);
      if (s == 0) y[base + (int64_t)(t0 + tt) * stride + j] = from_float<Tin>(yj);
    }
    if (more) {
      st.store(vec(cur ^ 1, 0), pr); st.store(vec(cur ^ 1, 1), pk);
      st.store(vec(cur ^ 1, 2), pd); st.store(vec(cur ^ 1, 3), pv);
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < PER; ++m) hT[sbase + (int64_t)(s * PER + m) * N + j] = S[m];
}

// ------------------------------------------------------------------------------------------------
// Backward part A, y = 0: forward sweep in the row layout, thread (s, i). Staged: r, k, w, v, gy.
// Writes gr, b' (fp32 scratch [B,T,H,N]), gu partials [B,H,N] and P' [B,H,N].
template <typename Tin, typename Tw, int N>
__device__ __forceinline__ void bwd_forward_sweep(float* sm, int T, int H, const Tin* r, const Tin* k,
                                                  const Tin* v, const Tw* w, const float* u, const float* h0,
                                                  const Tin* gy, const float* ghT, Tin* gr, float* bscr,
                                                  float* gu_part, float* P) {
  constexpr int NV = 5, TC = chunk_steps<N, NV>(), PER = Geo<N>::PER, PADN = Geo<N>::PADN;
  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int tid = threadIdx.x, s = tid & 3, i = tid >> 2;
  const int64_t base = ((int64_t)b * T * H + h) * N, stride = (int64_t)H * N;
  const int64_t srow = (int64_t)bh * N * N + (int64_t)i * N + s * PER;  // &state[b,h,i,s*PER]

  float S[PER], D[PER];  // S_{t-1} and its decayed part d_{t-1} S_{t-2}
#pragma unroll
  for (int m = 0; m < PER; ++m) {
    S[m] = h0 ? h0[srow + m] : 0.f;
    D[m] = 0.f;
  }
  const float ui = u[h * N + i];
  double gu_acc = 0.0;
  const Stager<N, TC> st(tid);
  auto vec = [&](int buf, int n) { return sm + (buf * NV + n) * TC * PADN; };
  float4 p[NV];
  auto load_all = [&](int t0) {
    p[0] = st.template load<false>(r + base, stride, t0, T);
    p[1] = st.template load<false>(k + base, stride, t0, T);
    p[2] = st.template load<false>(w + base, stride, t0, T);
    p[3] = st.template load<false>(v + base, stride, t0, T);
    p[4] = st.template load<false>(gy + base, stride, t0, T);
  };
  auto store_all = [&](int buf) {
#pragma unroll
    for (int n = 0; n < NV; ++n) st.store(vec(buf, n), p[n]);
  };
  load_all(0);
  store_all(0);
  __syncthreads();
  const int nch = (T + TC - 1) / TC;
  for (int c = 0; c < nch; ++c) {
    const int cur = c & 1, t0 = c * TC;
    const bool more = c + 1 < nch;
    if (more) load_all(t0 + TC);
    const int nsteps = min(TC, T - t0);
    for (int tt = 0; tt < nsteps; ++tt) {
      const float ri = vec(cur, 0)[tt * PADN + pad(i)];
      const float ki = vec(cur, 1)[tt * PADN + pad(i)];
      const float di = decay(vec(cur, 2)[tt * PADN + pad(i)]);
      const float* sv = vec(cur, 3) + tt * PADN + pad(s * PER);
      const float* sg = vec(cur, 4) + tt * PADN + pad(s * PER);
      float sgy = 0.f, dgy = 0.f, vgy = 0.f;
#pragma unroll
      for (int m4 = 0; m4 < PER; m4 += 4) {
        const float4 v4 = load4(sv + pad(m4)), g4 = load4(sg + pad(m4));
#pragma unroll
        for (int c4 = 0; c4 < 4; ++c4) {
          const int m = m4 + c4;
          const float vv = comp(v4, c4), gg = comp(g4, c4);
          sgy = fmaf(S[m], gg, sgy);  // (S_{t-1} gy_t)[i]
          dgy = fmaf(D[m], gg, dgy);  // (d_{t-1} S_{t-2} gy_t)[i]
          vgy = fmaf(vv, gg, vgy);
          D[m] = di * S[m];
          S[m] = fmaf(ki, vv, D[m]);
        }
      }
      sgy = quad_sum(sgy);
      dgy = quad_sum(dgy);
      vgy = quad_sum(vgy);
      gu_acc += (double)(ri * ki * vgy);
      if (s == 0) {
        const int64_t o = base + (int64_t)(t0 + tt) * stride + i;
        gr[o] = from_float<Tin>(sgy + ui * ki * vgy);
        bscr[o] = ri * dgy;  // b'_t
      }
    }
    if (more) store_all(cur ^ 1);
    __syncthreads();
  }
  float pp = 0.f;
  if (ghT) {
#pragma unroll
    for (int m = 0; m < PER; ++m) pp = fmaf(ghT[srow + m], D[m], pp);  // D = d_{T-1} S_{T-2}
  }
  pp = quad_sum(pp);
  if (s == 0) {
    P[(int64_t)bh * N + i] = pp;
    gu_part[(int64_t)bh * N + i] = (float)gu_acc;
  }
}

// Backward part A, y = 1: reverse sweep in the column layout, thread (s, j). Staged: r, k, d, gy.
// Writes gv.
template <typename Tin, typename Tw, int N>
__device__ __forceinline__ void bwd_gv_sweep(float* sm, int T, int H, const Tin* r, const Tin* k, const Tw* w,
                                             const float* u, const Tin* gy, const float* ghT, Tin* gv) {
  constexpr int NV = 4, TC = chunk_steps<N, NV>(), PER = Geo<N>::PER, PADN = Geo<N>::PADN;
  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int tid = threadIdx.x, s = tid & 3, j = tid >> 2;
  const int64_t base = ((int64_t)b * T * H + h) * N, stride = (int64_t)H * N;
  const int64_t sbase = (int64_t)bh * N * N;

  float G[PER], uu[PER];
#pragma unroll
  for (int m = 0; m < PER; ++m) {
    const int i = s * PER + m;
    uu[m] = u[h * N + i];
    G[m] = ghT ? ghT[sbase + (int64_t)i * N + j] : 0.f;
  }
  const Stager<N, TC> st(tid);
  auto vec = [&](int buf, int n) { return sm + (buf * NV + n) * TC * PADN; };
  float4 p[NV];
  auto load_all = [&](int t0) {
    p[0] = st.template load<false>(r + base, stride, t0, T);
    p[1] = st.template load<false>(k + base, stride, t0, T);
    p[2] = st.template load<true>(w + base, stride, t0, T);
    p[3] = st.template load<false>(gy + base, stride, t0, T);
  };
  auto store_all = [&](int buf) {
#pragma unroll
    for (int n = 0; n < NV; ++n) st.store(vec(buf, n), p[n]);
  };
  const int nch = (T + TC - 1) / TC;
  // Chunk c covers steps [T - (c+1)*TC, T - c*TC); the first chunk in time may start below 0.
  load_all(T - TC);
  store_all(0);
  __syncthreads();
  for (int c = 0; c < nch; ++c) {
    const int cur = c & 1, t0 = T - (c + 1) * TC;
    const bool more = c + 1 < nch;
    if (more) load_all(t0 - TC);
    const int tt_lo = max(0, -t0);
    for (int tt = TC - 1; tt >= tt_lo; --tt) {
      const float* sr = vec(cur, 0) + tt * PADN + pad(s * PER);
      const float* sk = vec(cur, 1) + tt * PADN + pad(s * PER);
      const float* sd = vec(cur, 2) + tt * PADN + pad(s * PER);
      const float gyj = vec(cur, 3)[tt * PADN + pad(j)];
      float gvp = 0.f, q = 0.f;
#pragma unroll
      for (int m4 = 0; m4 < PER; m4 += 4) {
        const float4 r4 = load4(sr + pad(m4)), k4 = load4(sk + pad(m4)), d4 = load4(sd + pad(m4));
#pragma unroll
        for (int c4 = 0; c4 < 4; ++c4) {
          const int m = m4 + c4;
          const float rr = comp(r4, c4), kk = comp(k4, c4);
          gvp = fmaf(G[m], kk, gvp);      // (G_t^T k_t)[j]
          q = fmaf(rr * uu[m], kk, q);    // partial of r_t.u.k_t
          G[m] = fmaf(comp(d4, c4), G[m], rr * gyj);
        }
      }
      gvp = quad_sum(gvp);
      q = quad_sum(q);
      if (s == 0) gv[base + (int64_t)(t0 + tt) * stride + j] = from_float<Tin>(gvp + q * gyj);
    }
    if (more) store_all(cur ^ 1);
    __syncthreads();
  }
}

template <int N>
__host__ __device__ constexpr int max_smem_floats_a() {
  return 2 * 5 * chunk_steps<N, 5>() * Geo<N>::PADN > 2 * 4 * chunk_steps<N, 4>() * Geo<N>::PADN
             ? 2 * 5 * chunk_steps<N, 5>() * Geo<N>::PADN
             : 2 * 4 * chunk_steps<N, 4>() * Geo<N>::PADN;
}

template <typename Tin, typename Tw, int N>
__global__ void __launch_bounds__(Geo<N>::NT)
wkv6_backward_a_kernel(int T, int H, const Tin* __restrict__ r, const Tin* __restrict__ k,
                       const Tin* __restrict__ v, const Tw* __restrict__ w, const float* __restrict__ u,
                       const float* __restrict__ h0, const Tin* __restrict__ gy, const float* __restrict__ ghT,
                       Tin* __restrict__ gr, Tin* __restrict__ gv, float* __restrict__ bscr,
                       float* __restrict__ gu_part, float* __restrict__ P) {
  __shared__ __align__(16) float sm[max_smem_floats_a<N>()];
  if (blockIdx.y == 0) {
    bwd_forward_sweep<Tin, Tw, N>(sm, T, H, r, k, v, w, u, h0, gy, ghT, gr, bscr, gu_part, P);
  } else {
    bwd_gv_sweep<Tin, Tw, N>(sm, T, H, r, k, w, u, gy, ghT, gv);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward part B: reverse sweep in the row layout, thread (s, i). Staged: r, k, w, v, gy, b.
// Writes gk, gw and gh0.
template <typename Tin, typename Tw, int N>
__global__ void __launch_bounds__(Geo<N>::NT)
wkv6_backward_b_kernel(int T, int H, const Tin* __restrict__ r, const Tin* __restrict__ k,
                       const Tin* __restrict__ v, const Tw* __restrict__ w, const float* __restrict__ u,
                       const Tin* __restrict__ gy, const float* __restrict__ ghT, const float* __restrict__ bscr,
                       const float* __restrict__ P, Tin* __restrict__ gk, Tw* __restrict__ gw,
                       float* __restrict__ gh0) {
  constexpr int NV = 6, TC = chunk_steps<N, NV>(), PER = Geo<N>::PER, PADN = Geo<N>::PADN;
  __shared__ __align__(16) float sm[2 * NV * TC * PADN];
  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int tid = threadIdx.x, s = tid & 3, i = tid >> 2;
  const int64_t base = ((int64_t)b * T * H + h) * N, stride = (int64_t)H * N;
  const int64_t srow = (int64_t)bh * N * N + (int64_t)i * N + s * PER;

  float G[PER], E[PER];  // G_t and its decayed part d_{t+1} G_{t+1} (0 at t = T-1: a'_{T-1} = 0)
#pragma unroll
  for (int m = 0; m < PER; ++m) {
    G[m] = ghT ? ghT[srow + m] : 0.f;
    E[m] = 0.f;
  }
  const float ui = u[h * N + i];
  double acc = (double)P[(int64_t)bh * N + i];  // P' - sum_{s>t} a'_s + sum_{s>t} b'_s
  const Stager<N, TC> st(tid);
  auto vec = [&](int buf, int n) { return sm + (buf * NV + n) * TC * PADN; };
  float4 p[NV];
  auto load_all = [&](int t0) {
    p[0] = st.template load<false>(r + base, stride, t0, T);
    p[1] = st.template load<false>(k + base, stride, t0, T);
    p[2] = st.template load<false>(w + base, stride, t0, T);
    p[3] = st.template load<false>(v + base, stride, t0, T);
    p[4] = st.template load<false>(gy + base, stride, t0, T);
    p[5] = st.template load<false>(bscr + base, stride, t0, T);
  };
  auto store_all = [&](int buf) {
#pragma unroll
    for (int n = 0; n < NV; ++n) st.store(vec(buf, n), p[n]);
  };
  const int nch = (T + TC - 1) / TC;
  load_all(T - TC);
  store_all(0);
  __syncthreads();
  for (int c = 0; c < nch; ++c) {
    const int cur = c & 1, t0 = T - (c + 1) * TC;
    const bool more = c + 1 < nch;
    if (more) load_all(t0 - TC);
    const int tt_lo = max(0, -t0);
    for (int tt = TC - 1; tt >= tt_lo; --tt) {
      const float ri = vec(cur, 0)[tt * PADN + pad(i)];
      const float ki = vec(cur, 1)[tt * PADN + pad(i)];
      const float ew = __expf(vec(cur, 2)[tt * PADN + pad(i)]);
      const float di = __expf(-ew);
      const float bi = vec(cur, 5)[tt * PADN + pad(i)];
      const float* sv = vec(cur, 3) + tt * PADN + pad(s * PER);
      const float* sg = vec(cur, 4) + tt * PADN + pad(s * PER);
      float gvd = 0.f, evd = 0.f, vgy = 0.f;
#pragma unroll
      for (int m4 = 0; m4 < PER; m4 += 4) {
        const float4 v4 = load4(sv + pad(m4)), g4 = load4(sg + pad(m4));
#pragma unroll
        for (int c4 = 0; c4 < 4; ++c4) {
          const int m = m4 + c4;
          const float vv = comp(v4, c4), gg = comp(g4, c4);
          gvd = fmaf(G[m], vv, gvd);  // (G_t v_t)[i]
          evd = fmaf(E[m], vv, evd);  // (d_{t+1} G_{t+1} v_t)[i]
          vgy = fmaf(vv, gg, vgy);
          E[m] = di * G[m];
          G[m] = fmaf(ri, gg, E[m]);
        }
      }
      gvd = quad_sum(gvd);
      evd = quad_sum(evd);
      vgy = quad_sum(vgy);
      acc -= (double)(ki * evd);  // - a'_t
      const double dl = acc;      // dL/dl_t
      acc += (double)bi;          // + b'_t, for step t-1
      if (s == 0) {
        const int64_t o = base + (int64_t)(t0 + tt) * stride + i;
        gk[o] = from_float<Tin>(gvd + ui * ri * vgy);
        gw[o] = from_float<Tw>((float)(dl * (double)(-ew)));
      }
    }
    if (more) store_all(cur ^ 1);
    __syncthreads();
  }
  if (gh0) {
#pragma unroll
    for (int m = 0; m < PER; ++m) gh0[srow + m] = G[m];
  }
}

// ------------------------------------------------------------------------------------------------
template <typename Tin, typename Tw, int N>
cudaError_t launch_forward(int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
                           const float* u, const float* h0, void* y, float* hT, cudaStream_t stream) {
  wkv6_forward_kernel<Tin, Tw, N><<<B * H, Geo<N>::NT, 0, stream>>>(
      T, H, (const Tin*)r, (const Tin*)k, (const Tin*)v, (const Tw*)w, u, h0, (Tin*)y, hT);
  return cudaGetLastError();
}

template <typename Tin, typename Tw, int N>
cudaError_t launch_backward(int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
                            const float* u, const float* h0, const void* gy, const float* ghT, void* gr,
                            void* gk, void* gv, void* gw, float* gu_part, float* gh0, float* bscr, float* P,
                            cudaStream_t stream) {
  wkv6_backward_a_kernel<Tin, Tw, N><<<dim3(B * H, 2), Geo<N>::NT, 0, stream>>>(
      T, H, (const Tin*)r, (const Tin*)k, (const Tin*)v, (const Tw*)w, u, h0, (const Tin*)gy, ghT, (Tin*)gr,
      (Tin*)gv, bscr, gu_part, P);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  wkv6_backward_b_kernel<Tin, Tw, N><<<B * H, Geo<N>::NT, 0, stream>>>(
      T, H, (const Tin*)r, (const Tin*)k, (const Tin*)v, (const Tw*)w, u, (const Tin*)gy, ghT, bscr, P,
      (Tin*)gk, (Tw*)gw, gh0);
  return cudaGetLastError();
}

// dtype codes: 0 = float32, 1 = bfloat16. Supported (r/k/v, w): (0,0), (1,1), (1,0).
#define WKV6_DISPATCH(tin, tw, n, FN, ...)                                                         \
  do {                                                                                            \
    if (n != 32 && n != 64 && n != 128) return cudaErrorInvalidValue;                             \
    if (tin == 0 && tw == 0) {                                                                    \
      if (n == 32) return FN<float, float, 32>(__VA_ARGS__);                                      \
      if (n == 64) return FN<float, float, 64>(__VA_ARGS__);                                      \
      return FN<float, float, 128>(__VA_ARGS__);                                                  \
    }                                                                                             \
    if (tin == 1 && tw == 1) {                                                                    \
      if (n == 32) return FN<__nv_bfloat16, __nv_bfloat16, 32>(__VA_ARGS__);                     \
      if (n == 64) return FN<__nv_bfloat16, __nv_bfloat16, 64>(__VA_ARGS__);                     \
      return FN<__nv_bfloat16, __nv_bfloat16, 128>(__VA_ARGS__);                                  \
    }                                                                                             \
    if (tin == 1 && tw == 0) {                                                                    \
      if (n == 32) return FN<__nv_bfloat16, float, 32>(__VA_ARGS__);                              \
      if (n == 64) return FN<__nv_bfloat16, float, 64>(__VA_ARGS__);                              \
      return FN<__nv_bfloat16, float, 128>(__VA_ARGS__);                                          \
    }                                                                                             \
    return cudaErrorInvalidValue;                                                                 \
  } while (0)

}  // namespace

// Launchers (declared in wkv6_cuda_bind.cpp). All pointers are device pointers to contiguous,
// 16-byte-aligned buffers; h0 and ghT may be null (zero state / no state gradient), gh0 may be null.
// bscr is fp32 scratch [B,T,H,N]; gu_part and P fp32 scratch [B,H,N].
cudaError_t wkv6_cuda_forward(int tin, int tw, int N, int B, int T, int H, const void* r, const void* k,
                              const void* v, const void* w, const float* u, const float* h0, void* y, float* hT,
                              cudaStream_t stream) {
  WKV6_DISPATCH(tin, tw, N, launch_forward, B, T, H, r, k, v, w, u, h0, y, hT, stream);
}

cudaError_t wkv6_cuda_backward(int tin, int tw, int N, int B, int T, int H, const void* r, const void* k,
                               const void* v, const void* w, const float* u, const float* h0, const void* gy,
                               const float* ghT, void* gr, void* gk, void* gv, void* gw, float* gu_part,
                               float* gh0, float* bscr, float* P, cudaStream_t stream) {
  WKV6_DISPATCH(tin, tw, N, launch_backward, B, T, H, r, k, v, w, u, h0, gy, ghT, gr, gk, gv, gw, gu_part, gh0,
                bscr, P, stream);
}
