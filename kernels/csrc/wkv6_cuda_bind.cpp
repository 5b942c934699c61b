// Torch binding for the wkv6 CUDA kernels in wkv6_cuda.cu: allocates outputs and scratch, picks the
// current stream, and turns launch errors into exceptions. kernels/wkv6.py validates user input
// (shapes, dtypes, head size) and raises ValueError first; the checks here guard invariants.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <map>
#include <string>

cudaError_t wkv6_cuda_forward(int tin, int tw, int N, int B, int T, int H, const void* r, const void* k,
                              const void* v, const void* w, const float* u, const float* h0, void* y, float* hT,
                              cudaStream_t stream);
cudaError_t wkv6_cuda_backward(int tin, int tw, int N, int B, int T, int H, const void* r, const void* k,
                               const void* v, const void* w, const float* u, const float* h0, const void* gy,
                               const float* ghT, void* gr, void* gk, void* gv, void* gw, float* gu_part,
                               float* gh0, float* bscr, float* P, cudaStream_t stream);
int64_t wkv6_chunk_scores_numel(int B, int T, int H);
cudaError_t wkv6_chunk_forward(int tw, int wh, int B, int T, int H, const void* r, const void* k, const void* v,
                               const void* w, const float* u, const float* h0, void* y, float* hT, void* scores,
                               cudaStream_t stream);
cudaError_t wkv6_chunk_backward(int tw, int wh, int B, int T, int H, const void* r, const void* k, const void* v,
                                const void* w, const float* u, const float* h0, const void* gy, const float* ghT,
                                const void* scores, void* gr, void* gk, void* gv, void* gw, float* gu_part,
                                float* gh0, float* bscr, float* kscr, float* P, cudaStream_t stream);
void wkv6_chunk_occupancy(int* out);

namespace {

int dtype_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return 0;
  if (t.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(false, "wkv6_cuda: unsupported dtype ", t.scalar_type());
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "wkv6_cuda: ", name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "wkv6_cuda: ", name, " must be 16-byte aligned");
}

// w [B,T,H,1]: one decay per head, shared by the N channels (chunked kernels only).
bool head_decay(const at::Tensor& r, const at::Tensor& w) {
  return w.dim() == 4 && w.size(0) == r.size(0) && w.size(1) == r.size(1) && w.size(2) == r.size(2) &&
         w.size(3) == 1 && r.size(3) > 1;
}

void check_inputs(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                  const at::Tensor& u) {
  check(r, "r"); check(k, "k"); check(v, "v"); check(w, "w"); check(u, "u");
  TORCH_CHECK(r.dim() == 4 && k.sizes() == r.sizes() && v.sizes() == r.sizes() &&
                  (w.sizes() == r.sizes() || head_decay(r, w)),
              "wkv6_cuda: r, k, v must be [B,T,H,N] and w [B,T,H,N] or [B,T,H,1]");
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.numel() == r.size(2) * r.size(3), "wkv6_cuda: u must be fp32 [H,N]");
  TORCH_CHECK(k.scalar_type() == r.scalar_type() && v.scalar_type() == r.scalar_type(), "wkv6_cuda: r,k,v dtypes differ");
  TORCH_CHECK(r.numel() < (int64_t(1) << 62) && r.size(0) * r.size(2) < (int64_t(1) << 31) && r.size(1) < (int64_t(1) << 31),
              "wkv6_cuda: sizes out of range");
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t.has_value()) return nullptr;
  check(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat, "wkv6_cuda: ", name, " must be fp32");
  TORCH_CHECK(t->dim() == 4 && t->size(0) == like.size(0) && t->size(1) == like.size(2) &&
                  t->size(2) == like.size(3) && t->size(3) == like.size(3),
              "wkv6_cuda: ", name, " must be [B,H,N,N]");
  return t->data_ptr<float>();
}

// The chunked tensor-core kernels (wkv6_chunk.cu) take bf16 r, k, v and head size 64 only; the sequential ones
// take w per channel only.
void check_impl(const at::Tensor& r, const at::Tensor& w, bool chunked) {
  if (chunked) {
    TORCH_CHECK(r.scalar_type() == at::kBFloat16 && r.size(3) == 64,
                "wkv6_cuda: the chunked kernel needs bf16 r, k, v and head size 64");
  } else {
    TORCH_CHECK(w.sizes() == r.sizes(), "wkv6_cuda: the sequential kernel needs w [B,T,H,N]");
  }
}

// The chunked kernels' per-chunk scores, which the forward hands to the backward (bf16, 1 KiB per (b, h) and chunk).
at::Tensor chunk_scores_like(const at::Tensor& r) {
  return at::empty({wkv6_chunk_scores_numel((int)r.size(0), (int)r.size(1), (int)r.size(2))}, r.options());
}

// chunked with save_scores: also returns the scores for the backward (else an empty tensor in their place; with one
// decay per channel the forward still forms them, in a buffer freed on return).
std::vector<at::Tensor> wkv6_forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& w, const at::Tensor& u,
                                     const c10::optional<at::Tensor>& h0, bool chunked, bool save_scores) {
  check_inputs(r, k, v, w, u);
  check_impl(r, w, chunked);
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const float* h0p = opt_ptr(h0, r, "initial_state");
  auto y = at::empty_like(v);
  auto hT = at::empty({B, H, N, N}, r.options().dtype(at::kFloat));
  const bool wh = head_decay(r, w);
  auto scores = chunked && (save_scores || !wh) ? chunk_scores_like(r) : at::empty({0}, r.options());
  const cudaError_t err =
      chunked ? wkv6_chunk_forward(dtype_code(w), (int)wh, (int)B, (int)T, (int)H, r.data_ptr(),
                                   k.data_ptr(), v.data_ptr(), w.data_ptr(), u.data_ptr<float>(), h0p, y.data_ptr(),
                                   hT.data_ptr<float>(), scores.numel() ? scores.data_ptr() : nullptr,
                                   at::cuda::getCurrentCUDAStream())
              : wkv6_cuda_forward(dtype_code(r), dtype_code(w), (int)N, (int)B, (int)T, (int)H, r.data_ptr(),
                                  k.data_ptr(), v.data_ptr(), w.data_ptr(), u.data_ptr<float>(), h0p, y.data_ptr(),
                                  hT.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wkv6_cuda forward launch failed (N=", N, "): ", cudaGetErrorString(err));
  return {y, hT, save_scores ? scores : at::empty({0}, r.options())};
}

// scores: what the chunked forward returned with save_scores for these inputs (unused by the sequential kernels).
std::vector<at::Tensor> wkv6_backward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& w, const at::Tensor& u,
                                      const c10::optional<at::Tensor>& h0, const at::Tensor& gy,
                                      const c10::optional<at::Tensor>& ghT, bool chunked, const at::Tensor& scores) {
  check_inputs(r, k, v, w, u);
  check_impl(r, w, chunked);
  check(gy, "gy");
  TORCH_CHECK(gy.sizes() == v.sizes() && gy.scalar_type() == v.scalar_type(), "wkv6_cuda: bad gy");
  if (chunked) {
    check(scores, "scores");
    TORCH_CHECK(scores.scalar_type() == at::kBFloat16 && scores.dim() == 1 &&
                    scores.numel() == wkv6_chunk_scores_numel((int)r.size(0), (int)r.size(1), (int)r.size(2)),
                "wkv6_cuda: the chunked backward needs the scores its forward saved (save_scores) for these "
                "shapes, got ", scores.scalar_type(), " of ", scores.numel(), " values");
  }
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const float* h0p = opt_ptr(h0, r, "initial_state");
  const float* ghTp = opt_ptr(ghT, r, "final_state grad");
  auto gr = at::empty_like(r), gk = at::empty_like(k), gv = at::empty_like(v), gw = at::empty_like(w);
  auto f32 = r.options().dtype(at::kFloat);
  auto gu_part = at::empty({B, H, N}, f32);
  auto P = at::empty({B, H, N}, f32);
  auto bscr = at::empty({B, T, H, N}, f32);
  // the chunked sweep 2's kd terms: a scratch of their own, since both sweeps write at the same time
  auto kscr = chunked ? at::empty({B, T, H, N}, f32) : at::empty({0}, f32);
  auto gh0 = h0.has_value() ? at::empty({B, H, N, N}, f32) : at::empty({0}, f32);
  float* gh0p = h0.has_value() ? gh0.data_ptr<float>() : nullptr;
  const cudaError_t err =
      chunked ? wkv6_chunk_backward(dtype_code(w), (int)head_decay(r, w), (int)B, (int)T, (int)H, r.data_ptr(),
                                    k.data_ptr(), v.data_ptr(), w.data_ptr(), u.data_ptr<float>(), h0p, gy.data_ptr(),
                                    ghTp, scores.data_ptr(), gr.data_ptr(), gk.data_ptr(), gv.data_ptr(), gw.data_ptr(),
                                    gu_part.data_ptr<float>(), gh0p,
                                    bscr.data_ptr<float>(), kscr.data_ptr<float>(), P.data_ptr<float>(),
                                    at::cuda::getCurrentCUDAStream())
              : wkv6_cuda_backward(dtype_code(r), dtype_code(w), (int)N, (int)B, (int)T, (int)H, r.data_ptr(),
                                   k.data_ptr(), v.data_ptr(), w.data_ptr(), u.data_ptr<float>(), h0p, gy.data_ptr(),
                                   ghTp, gr.data_ptr(), gk.data_ptr(), gv.data_ptr(), gw.data_ptr(),
                                   gu_part.data_ptr<float>(), gh0p, bscr.data_ptr<float>(), P.data_ptr<float>(),
                                   at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wkv6_cuda backward launch failed (N=", N, "): ", cudaGetErrorString(err));
  return {gr, gk, gv, gw, gu_part.sum(0), gh0};
}

// Resident blocks per SM of the chunked kernels on the current device (bf16 w): what the GPU can overlap.
std::map<std::string, int> chunk_occupancy() {
  int n[6];
  wkv6_chunk_occupancy(n);
  return {{"forward", n[0]}, {"backward", n[1]}, {"gw", n[2]}, {"forward_head", n[3]}, {"backward_head", n[4]},
          {"scores", n[5]}};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wkv6 (RWKV-6) CUDA kernels, sequential and chunked: fp32/bf16 inputs, fp32 state and accumulation";
  m.def("forward", &wkv6_forward,
        "wkv6 forward(r, k, v, w, u, h0, chunked, save_scores) -> (y, final_state fp32, the chunked backward's "
        "scores or an empty tensor)");
  m.def("chunk_occupancy", &chunk_occupancy,
        "resident blocks per SM of the chunked kernels: {forward, backward, gw, forward_head, backward_head, scores}");
  m.def("backward", &wkv6_backward,
        "wkv6 backward(r, k, v, w, u, h0, gy, ghT, chunked, scores) -> (gr, gk, gv, gw, gu fp32 [H,N], gh0 fp32)");
}
