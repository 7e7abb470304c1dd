// tree_scan.h's layouts over a batch's tensors, for the host code of kernels/cpu.cpp and kernels/cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include "tree_scan.h"

namespace grootl {

// u, delta (batch, D, L), A (D, N), B, C (batch, L, N); delta and A in acc_t; flags may be null (chain_tree_*).
template <typename scalar_t, typename acc_t>
Mamba1Layout<scalar_t, acc_t> mamba1_layout(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                            const at::Tensor& B, const at::Tensor& C, const at::Tensor& parent,
                                            const at::Tensor& order, const uint8_t* flags) {
  return {u.data_ptr<scalar_t>(), delta.data_ptr<acc_t>(), A.data_ptr<acc_t>(), B.data_ptr<scalar_t>(),
          C.data_ptr<scalar_t>(), parent.data_ptr<int64_t>(), order.data_ptr<int64_t>(), flags,
          (int)u.size(1), (int)B.size(2), (int)u.size(2)};
}

// Ā = exp(dt * A) once per (row, t, head), in the accumulation type (A's).
inline at::Tensor mamba2_decay(const at::Tensor& dt, const at::Tensor& A) { return at::exp(dt.to(A.scalar_type()) * A); }

// x (batch, L, H, P), dt (batch, L, H), decay = mamba2_decay(dt, A), A (H), B, C (batch, L, G, N); dt, decay and A
// in acc_t. dt_parts: 1 where a head's channels run in turn (d_dt and dA summed in place), P where they run
// concurrently.
template <typename scalar_t, typename acc_t>
Mamba2Layout<scalar_t, acc_t> mamba2_layout(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& decay,
                                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                            const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                                            int dt_parts) {
  return {x.data_ptr<scalar_t>(), dt.data_ptr<acc_t>(), decay.data_ptr<acc_t>(), A.data_ptr<acc_t>(),
          B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), parent.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
          flags.data_ptr<uint8_t>(), (int)x.size(2), (int)x.size(3), (int)B.size(2), (int)B.size(3),
          (int)x.size(1), dt_parts};
}

}  // namespace grootl
