// Python bindings of the CUDA extension (kernels in cuda.cu); same interface as cpu.cpp.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "chunk_scan.h"
#include "tree_scan.h"

int64_t channel_group_cuda(int64_t N);
int64_t max_state_cuda();
std::vector<int64_t> plan_cuda(const at::Tensor& parent, const at::Tensor& order, at::Tensor flags,
                               at::Tensor ckpt_offset, at::Tensor sizes);
void forward_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                  int64_t h_depth, at::Tensor y, c10::optional<at::Tensor> root);
void backward_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                   const at::Tensor& ckpt_offset, const at::Tensor& sizes, const std::vector<int64_t>& largest,
                   const at::Tensor& gy, c10::optional<at::Tensor> g_root, at::Tensor du, at::Tensor d_delta,
                   at::Tensor dA_part, at::Tensor dB_part, at::Tensor dC_part);
std::vector<int64_t> mamba2_parts_cuda(int64_t heads_per_group, int64_t P, int64_t N);
void mamba2_forward_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                         int64_t h_depth, at::Tensor y, c10::optional<at::Tensor> root);
void mamba2_backward_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order,
                          const at::Tensor& flags, const at::Tensor& ckpt_offset, const at::Tensor& sizes,
                          const std::vector<int64_t>& largest, const at::Tensor& gy, c10::optional<at::Tensor> g_root,
                          at::Tensor dx, at::Tensor d_dt, at::Tensor dA_part, at::Tensor dB_part, at::Tensor dC_part);
void build_tree_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& B,
                     const at::Tensor& context_lens, const at::Tensor& start, int64_t k, int64_t distance,
                     at::Tensor parent, at::Tensor order, at::Tensor flags, at::Tensor ckpt_offset, at::Tensor sizes);
void build_grouped_tree_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& context_lens,
                             const at::Tensor& start, int64_t k, int64_t distance, at::Tensor parent, at::Tensor order,
                             at::Tensor flags, at::Tensor ckpt_offset, at::Tensor sizes);
int64_t max_span_cuda();
std::vector<std::string> chunked_kernels_cuda(int64_t batch, int64_t D, int64_t L, int64_t N, int64_t element_size);
void forward_chunked_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, at::Tensor y,
                          c10::optional<at::Tensor> root);
void backward_chunked_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& gy,
                           c10::optional<at::Tensor> g_root, at::Tensor du, at::Tensor d_delta, at::Tensor dA,
                           at::Tensor dB_part, at::Tensor dC_part);
void mamba2_forward_chunked_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, at::Tensor y,
                                 c10::optional<at::Tensor> root);
void mamba2_backward_chunked_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                  const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order,
                                  const at::Tensor& gy, c10::optional<at::Tensor> g_root, at::Tensor dx,
                                  at::Tensor d_dt, at::Tensor dA_part, at::Tensor dB_part, at::Tensor dC_part);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GrootL tree scan, CUDA";
  m.def("channel_group", &channel_group_cuda, "channels per dB/dC partial sum (one block), given N");
  m.def("max_state", &max_state_cuda, "largest N the scan kernels take");
  m.def("chunk_size", [] { return int64_t(grootl::kChunk); }, "nodes per backward recompute chunk");
  m.def("plan", &plan_cuda, "row plans of a tree; returns the largest stack sizes over the rows");
  m.def("forward", &forward_cuda, "tree scan forward (B, C as (batch, L, N))");
  m.def("backward", &backward_cuda, "tree scan backward (partial sums for dA, dB, dC)");
  m.def("mamba2_forward", &mamba2_forward_cuda, "tree scan forward, Mamba-2 layout (scalar decay per head, grouped B, C)");
  m.def("mamba2_backward", &mamba2_backward_cuda, "its backward (partial sums for d_dt, dA, dB, dC)");
  m.def("mamba2_parts", &mamba2_parts_cuda, "(dB/dC partials per group, d_dt/dA partials) of the Mamba-2 backward");
  m.def("scan_chunk", [] { return int64_t(grootl::kScanChunk); }, "positions per chunk of the chunked scans");
  m.def("max_span", &max_span_cuda, "longest edge |v - parent[v]| the chunked (sequence-parallel) scans take");
  m.def("forward_chunked", &forward_chunked_cuda, "forward, parallel over chunks of the sequence (span <= max_span)");
  m.def("chunked_kernels", &chunked_kernels_cuda,
        "how forward_chunked and backward_chunked run a Mamba-1 call of (batch, D, L, N, u's element size): "
        "'fused' (one launch), 'fused passes 1-2' (then pass 3) or 'per pass'");
  m.def("backward_chunked", &backward_chunked_cuda, "its backward (dA summed; dB, dC as backward's partials)");
  m.def("mamba2_forward_chunked", &mamba2_forward_chunked_cuda, "mamba2_forward, parallel over chunks");
  m.def("mamba2_backward_chunked", &mamba2_backward_chunked_cuda, "its backward (d_dt, dA, dB, dC as mamba2_backward's)");
  m.def("build_tree", &build_tree_cuda, "minimum spanning tree of the token graph, rooted at L-1, and its plan");
  m.def("build_grouped_tree", &build_grouped_tree_cuda, "build_tree from grouped (Mamba-2) features a_g (outer) b_g");
}
