// CUDA kernels: the tree_scan.h / tree_build.h algorithms on the device. Python bindings: cuda_bind.cpp.
//   plan:     one thread per row.
//   forward:  one thread per (row, channel); the pending-sum stack lives in a per-channel scratch of
//             (max stack depth + 1) * N accumulators, never (L * N).
//   backward: one warp per (row, 32 channels), a thread per channel; dB/dC terms are summed over the warp
//             with shuffles (a fixed butterfly, so deterministic) into per-group partials that the caller
//             sums; H is recomputed from stack checkpoints every kChunk nodes.
//   build:    one block per row: norms and edge weights in parallel, a bitonic sort by (weight, id), then
//             Kruskal and the rooting on one thread. No host round trip.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cfloat>
#include <limits>

#include "tree_build.h"
#include "tree_scan.h"

namespace {

constexpr int kWarp = 32;
constexpr int kForwardThreads = 128;
constexpr int kBuildThreads = 256;

__global__ void plan_kernel(const int64_t* parent, const int64_t* order, int batch, int L, uint8_t* flags,
                            int32_t* ckpt_offset, int32_t* sizes, int32_t* status, int32_t* work) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int chunks = grootl::num_chunks(L);
  status[b] = grootl::plan_row(parent + (int64_t)b * L, order + (int64_t)b * L, L, flags + (int64_t)b * L,
                               ckpt_offset + (int64_t)b * (chunks + 1), sizes + b * 3, work + (int64_t)b * 3 * L);
}

template <typename scalar_t, typename acc_t>
__device__ grootl::Channel<scalar_t, acc_t> channel(const scalar_t* u, const scalar_t* delta, const acc_t* A,
                                                    const scalar_t* B, const scalar_t* C, const int64_t* parent,
                                                    const int64_t* order, const uint8_t* flags, int b, int d, int D,
                                                    int N, int L) {
  const int64_t bd = (int64_t)b * D + d;
  return {u + bd * L,         delta + bd * L,           A + (int64_t)d * N,       B + (int64_t)b * N * L,
          C + (int64_t)b * N * L, parent + (int64_t)b * L, order + (int64_t)b * L, flags + (int64_t)b * L,
          L,                  N};
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* u, const scalar_t* delta, const acc_t* A, const scalar_t* B,
                               const scalar_t* C, const int64_t* parent, const int64_t* order, const uint8_t* flags,
                               int D, int N, int L, int64_t scratch_stride, acc_t* scratch, scalar_t* y, acc_t* root) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
  if (d >= D) return;
  const int64_t bd = (int64_t)b * D + d;
  const auto ch = channel(u, delta, A, B, C, parent, order, flags, b, d, D, N, L);
  acc_t* mine = scratch + bd * scratch_stride;
  grootl::tree_scan_forward(ch, mine, y + bd * L, root ? root + bd * N : nullptr);
}

template <typename acc_t>
struct WarpSink {  // sums a term over the warp's channels; lane 0 writes the group's partial
  acc_t* dB;
  acc_t* dC;
  int L;
  bool active;
  __device__ void add(int n, int64_t v, acc_t b_term, acc_t c_term) {
    b_term = active ? b_term : acc_t(0);
    c_term = active ? c_term : acc_t(0);
    for (int off = kWarp / 2; off > 0; off /= 2) {
      b_term += __shfl_xor_sync(0xffffffffu, b_term, off);
      c_term += __shfl_xor_sync(0xffffffffu, c_term, off);
    }
    if ((threadIdx.x & (kWarp - 1)) == 0) {
      dB[(int64_t)n * L + v] = b_term;
      dC[(int64_t)n * L + v] = c_term;
    }
  }
};

// One warp per (row, group); channels past D repeat channel D-1 into the padded outputs' spare rows.
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* u, const scalar_t* delta, const acc_t* A, const scalar_t* B,
                                const scalar_t* C, const int64_t* parent, const int64_t* order,
                                const uint8_t* flags, const int32_t* ckpt_offset, const int32_t* sizes,
                                const scalar_t* gy, const acc_t* g_root, int D, int N, int L, int64_t scratch_stride,
                                acc_t* scratch, scalar_t* du, acc_t* d_delta, acc_t* dA, acc_t* dB_part,
                                acc_t* dC_part) {
  const int grp = blockIdx.x, b = blockIdx.y, groups = gridDim.x, lane = threadIdx.x;
  const int d_pad = grp * kWarp + lane, d = d_pad < D ? d_pad : D - 1, D_pad = groups * kWarp;
  const int64_t bd = (int64_t)b * D + d, bd_pad = (int64_t)b * D_pad + d_pad;
  const auto ch = channel(u, delta, A, B, C, parent, order, flags, b, d, D, N, L);
  const int64_t part = ((int64_t)b * groups + grp) * N * L;
  WarpSink<acc_t> sink{dB_part + part, dC_part + part, L, d_pad < D};
  const int chunks = grootl::num_chunks(L);
  grootl::tree_scan_backward(ch, gy + bd * L, g_root ? g_root + bd * N : nullptr,
                             ckpt_offset + (int64_t)b * (chunks + 1), sizes[b * 3], sizes[b * 3 + 1],
                             scratch + bd_pad * scratch_stride, du + bd_pad * L, d_delta + bd_pad * L,
                             dA + bd_pad * N, sink);
}

template <typename acc_t>
__device__ void bitonic_sort(acc_t* key, int32_t* id, int n) {  // n a power of two; whole block
  for (int size = 2; size <= n; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int other = i ^ stride;
        if (other > i) {
          const bool ascending = (i & size) == 0;
          const bool swap = grootl::edge_before(key[other], id[other], key[i], id[i]) == ascending;
          if (swap) {
            const acc_t k = key[i];
            key[i] = key[other];
            key[other] = k;
            const int32_t t = id[i];
            id[i] = id[other];
            id[other] = t;
          }
        }
      }
      __syncthreads();
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void build_kernel(const scalar_t* u, const scalar_t* delta, const scalar_t* B, const int64_t* context_lens,
                             const int64_t* start, int D, int N, int L, int k, int distance, int n_pad, acc_t* norms,
                             acc_t* keys, int32_t* ids, uint8_t* in_tree, int32_t* work, int64_t* parent,
                             int64_t* order) {
  const int b = blockIdx.x;
  const scalar_t* u_b = u + (int64_t)b * D * L;
  const scalar_t* delta_b = delta + (int64_t)b * D * L;
  const scalar_t* B_b = B + (int64_t)b * N * L;
  acc_t* aa = norms + (int64_t)b * 2 * L;
  acc_t* bb = aa + L;
  acc_t* key = keys + (int64_t)b * n_pad;
  int32_t* id = ids + (int64_t)b * n_pad;
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    aa[t] = grootl::dot_a<scalar_t, acc_t>(u_b, delta_b, D, L, t, t);
    bb[t] = grootl::norm_b<scalar_t, acc_t>(B_b, N, L, t);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_pad; e += blockDim.x) {
    const int t = e / k, j = e % k + 1;
    const bool exists = e < L * k && grootl::edge_exists(t, j, L, context_lens[b], start[b]);
    const acc_t da = exists && distance != grootl::kManhattan
                         ? grootl::dot_a<scalar_t, acc_t>(u_b, delta_b, D, L, t, t - j)
                         : acc_t(0);
    key[e] = exists ? grootl::edge_weight(u_b, delta_b, B_b, D, N, L, t, j, aa, bb, da, distance)
                    : std::numeric_limits<acc_t>::infinity();
    id[e] = exists ? e : L * k + e;  // missing edges sort last
  }
  __syncthreads();
  bitonic_sort(key, id, n_pad);
  if (threadIdx.x == 0) {
    int n_edges = 0;
    for (int e = 0; e < L * k; ++e) n_edges += grootl::edge_exists(e / k, e % k + 1, L, context_lens[b], start[b]);
    int32_t* w = work + (int64_t)b * 3 * L;
    uint8_t* tree = in_tree + (int64_t)b * L * k;
    grootl::kruskal(id, n_edges, L, k, tree, w);
    grootl::root_tree(tree, L, k, parent + (int64_t)b * L, order + (int64_t)b * L, w);
  }
}

#define CHECK_CUDA_INPUT(x) TORCH_CHECK((x).is_cuda() && (x).is_contiguous(), #x " must be a contiguous CUDA tensor")

}  // namespace

void plan_cuda(const at::Tensor& parent, const at::Tensor& order, at::Tensor flags, at::Tensor ckpt_offset,
               at::Tensor sizes) {
  CHECK_CUDA_INPUT(parent);
  CHECK_CUDA_INPUT(order);
  const c10::cuda::CUDAGuard guard(parent.device());
  const int batch = parent.size(0), L = parent.size(1);
  auto status = at::empty({batch}, parent.options().dtype(at::kInt));
  auto work = at::empty({batch, 3 * L}, parent.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  plan_kernel<<<(batch + 63) / 64, 64, 0, stream>>>(parent.data_ptr<int64_t>(), order.data_ptr<int64_t>(), batch, L,
                                                    flags.data_ptr<uint8_t>(), ckpt_offset.data_ptr<int32_t>(),
                                                    sizes.data_ptr<int32_t>(), status.data_ptr<int32_t>(),
                                                    work.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto host = status.cpu();  // the one sync: bad trees raise here, and the scan needs the sizes anyway
  for (int b = 0; b < batch; ++b) {
    TORCH_CHECK(host[b].item<int>() != grootl::kBadParent, "tree.parent row ", b,
                " is not a tree rooted at L-1: every parent must lie in [0, L) except parent[L-1] == -1");
    TORCH_CHECK(host[b].item<int>() != grootl::kBadOrder, "tree.order row ", b,
                " is not a DFS preorder of tree.parent starting at the root L-1");
  }
}

void forward_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                  const at::Tensor& sizes, at::Tensor y, c10::optional<at::Tensor> root) {
  CHECK_CUDA_INPUT(u);
  const c10::cuda::CUDAGuard guard(u.device());
  const int batch = u.size(0), D = u.size(1), L = u.size(2), N = B.size(1);
  const int64_t h_depth = sizes.select(1, 0).max().item<int32_t>();
  const int64_t stride = grootl::forward_scratch_entries(h_depth) * N;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_tree_scan_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto scratch = at::empty({(int64_t)batch * D * stride}, u.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const dim3 grid((D + kForwardThreads - 1) / kForwardThreads, batch);
    forward_kernel<scalar_t, acc_t><<<grid, kForwardThreads, 0, stream>>>(
        u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<acc_t>(), B.data_ptr<scalar_t>(),
        C.data_ptr<scalar_t>(), parent.data_ptr<int64_t>(), order.data_ptr<int64_t>(), flags.data_ptr<uint8_t>(), D,
        N, L, stride, scratch.data_ptr<acc_t>(), y.data_ptr<scalar_t>(),
        root.has_value() ? root->data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                   const at::Tensor& ckpt_offset, const at::Tensor& sizes, const at::Tensor& gy,
                   c10::optional<at::Tensor> g_root, at::Tensor du, at::Tensor d_delta, at::Tensor dA_part,
                   at::Tensor dB_part, at::Tensor dC_part) {
  CHECK_CUDA_INPUT(u);
  const c10::cuda::CUDAGuard guard(u.device());
  const int batch = u.size(0), D = u.size(1), L = u.size(2), N = B.size(1);
  const int groups = (D + kWarp - 1) / kWarp, D_pad = groups * kWarp;
  const auto max_sizes = std::get<0>(sizes.max(0)).cpu();
  const int64_t entries = grootl::backward_scratch_entries(max_sizes[0].item<int>(), max_sizes[1].item<int>(),
                                                           max_sizes[2].item<int>());
  const int64_t stride = entries * N;
  const bool padded = D_pad != D;  // lanes past D write into spare rows of padded outputs
  auto du_out = padded ? at::empty({batch, D_pad, L}, du.options()) : du;
  auto d_delta_out = padded ? at::empty({batch, D_pad, L}, d_delta.options()) : d_delta;
  auto dA_out = padded ? at::empty({batch, D_pad, N}, dA_part.options()) : dA_part;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_tree_scan_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto scratch =
        at::empty({(int64_t)batch * D_pad * stride}, u.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    backward_kernel<scalar_t, acc_t><<<dim3(groups, batch), kWarp, 0, stream>>>(
        u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<acc_t>(), B.data_ptr<scalar_t>(),
        C.data_ptr<scalar_t>(), parent.data_ptr<int64_t>(), order.data_ptr<int64_t>(), flags.data_ptr<uint8_t>(),
        ckpt_offset.data_ptr<int32_t>(), sizes.data_ptr<int32_t>(), gy.data_ptr<scalar_t>(),
        g_root.has_value() ? g_root->data_ptr<acc_t>() : nullptr, D, N, L, stride, scratch.data_ptr<acc_t>(),
        du_out.data_ptr<scalar_t>(), d_delta_out.data_ptr<acc_t>(), dA_out.data_ptr<acc_t>(),
        dB_part.data_ptr<acc_t>(), dC_part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (padded) {
    du.copy_(du_out.narrow(1, 0, D));
    d_delta.copy_(d_delta_out.narrow(1, 0, D));
    dA_part.copy_(dA_out.narrow(1, 0, D));
  }
}

void build_tree_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& B,
                     const at::Tensor& context_lens, const at::Tensor& start, int64_t k, int64_t distance,
                     at::Tensor parent, at::Tensor order) {
  CHECK_CUDA_INPUT(u);
  const c10::cuda::CUDAGuard guard(u.device());
  const int batch = u.size(0), D = u.size(1), L = u.size(2), N = B.size(1);
  int n_pad = 1;
  while (n_pad < L * k) n_pad *= 2;
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto ints = u.options().dtype(at::kInt);
  auto ids = at::empty({batch, n_pad}, ints);
  auto work = at::empty({batch, 3 * L}, ints);
  auto in_tree = at::empty({batch, L * k}, u.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_build_tree_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = u.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto norms = at::empty({batch, 2 * L}, acc_opts);
    auto keys = at::empty({batch, n_pad}, acc_opts);
    build_kernel<scalar_t, acc_t><<<batch, kBuildThreads, 0, stream>>>(
        u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), context_lens.data_ptr<int64_t>(),
        start.data_ptr<int64_t>(), D, N, L, (int)k, (int)distance, n_pad, norms.data_ptr<acc_t>(),
        keys.data_ptr<acc_t>(), ids.data_ptr<int32_t>(), in_tree.data_ptr<uint8_t>(), work.data_ptr<int32_t>(),
        parent.data_ptr<int64_t>(), order.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
