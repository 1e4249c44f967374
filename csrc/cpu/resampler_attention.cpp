// CPU kernel of omniret::resampler_attention_fwd / _bwd (SPEC section 2): cross-attention of latent queries over
// packed, unpadded keys, flash-attention style.
//
// One task per (sample, kv head): the G = H / Hk query heads that share the kv head are contiguous in q, so the
// task treats them as one (G * Nq) x d query matrix and reads the sample's keys once for all of them. The keys
// are walked in blocks of kBlockKeys; each block is two (forward) or five (backward) GEMMs on tiles plus the
// row-wise online-softmax math of omniret/resampler_attention_math.h. Nothing of size Nq x T is ever stored: the
// backward recomputes the probabilities of each block from the saved log-sum-exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "omniret/resampler_attention_checks.h"
#include "omniret/resampler_attention_math.h"

// The BLAS that ATen itself calls for float/double mm on x86 wheels (MKL, linked into libtorch_cpu). Declared
// weak so that a torch built without it still loads this library; gemm_rowmajor then falls back to at::addmm_out.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace omniret {
namespace resampler {
namespace {

// Keys per block: 64 query rows x 256 keys of float scores stay in L2 with the K/V tiles.
constexpr int64_t kBlockKeys = 256;

template <typename T>
void blas_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
               T* c, int ldc);
template <>
void blas_gemm<float>(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                      int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <>
void blas_gemm<double>(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                       const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  return dgemm_ != nullptr;
}

// A row-major view of rows x cols at ptr with row stride ld, transposed when `trans`.
template <typename T>
at::Tensor view(const T* ptr, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  auto t = at::from_blob(const_cast<T*>(ptr), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return trans ? t.t() : t;
}

// Row-major C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C; lda/ldb/ldc are the stored row strides.
// beta == 0 ignores C's old contents (even NaN). Column-major BLAS computes C^T = op(B)^T op(A)^T.
template <typename T>
void gemm_rowmajor(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                   const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (have_blas<T>()) {
    blas_gemm<T>(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M),
                 static_cast<int>(K), alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda), beta, C,
                 static_cast<int>(ldc));
    return;
  }
  at::Tensor a = trans_a ? view(A, K, M, lda, true) : view(A, M, K, lda, false);
  at::Tensor b = trans_b ? view(B, N, K, ldb, true) : view(B, K, N, ldb, false);
  at::Tensor c = view(C, M, N, ldc, false);
  if (beta == T(0)) {
    c.copy_(at::mm(a, b).mul_(alpha));
  } else {
    c.copy_(at::addmm(c, a, b, beta, alpha));
  }
}

struct Problem {
  int64_t B, H, Hk, Nq, d, G, M;  // M = G * Nq query rows per task
  const int32_t* cu;
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens) {
  Problem p;
  p.B = q.size(0);
  p.H = q.size(1);
  p.Nq = q.size(2);
  p.d = q.size(3);
  p.Hk = k.size(1);
  p.G = p.H / p.Hk;
  p.M = p.G * p.Nq;
  p.cu = cu_seqlens.data_ptr<int32_t>();
  return p;
}

// Tasks (sample, kv head) in order of decreasing sample length: with dynamic scheduling the long samples start
// first and the short ones fill the gaps, so ragged batches keep every thread busy to the end.
std::vector<int64_t> task_order(const Problem& p) {
  std::vector<int64_t> order(p.B * p.Hk);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t la = p.cu[a / p.Hk + 1] - p.cu[a / p.Hk], lb = p.cu[b / p.Hk + 1] - p.cu[b / p.Hk];
    return la > lb;
  });
  return order;
}

template <typename T>
void forward_kernel(const Problem& p, const T* q, const T* k, const T* v, T scale, T* out, T* lse) {
  const auto order = task_order(p);
  const int64_t ntasks = static_cast<int64_t>(order.size());
  const int64_t kv_ld = p.Hk * p.d;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> scores(p.M * kBlockKeys), row_max(p.M), row_sum(p.M);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t b = order[t] / p.Hk, hk = order[t] % p.Hk;
      const int64_t start = p.cu[b], len = p.cu[b + 1] - start;
      const int64_t head0 = b * p.H + hk * p.G;  // first query head of the group
      const T* Q = q + head0 * p.Nq * p.d;
      T* O = out + head0 * p.Nq * p.d;
      const T* K = k + (start * p.Hk + hk) * p.d;
      const T* V = v + (start * p.Hk + hk) * p.d;
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<T>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      for (int64_t j0 = 0; j0 < len; j0 += kBlockKeys) {
        const int64_t n = std::min(kBlockKeys, len - j0);
        gemm_rowmajor<T>(false, true, p.M, n, p.d, scale, Q, p.d, K + j0 * kv_ld, kv_ld, T(0), scores.data(),
                         kBlockKeys);
        for (int64_t r = 0; r < p.M; ++r) {
          const T rescale = online_softmax_step(scores.data() + r * kBlockKeys, n, row_max[r], row_sum[r]);
          if (j0 > 0) {
            T* o = O + r * p.d;
            for (int64_t c = 0; c < p.d; ++c) o[c] *= rescale;
          }
        }
        gemm_rowmajor<T>(false, false, p.M, p.d, n, T(1), scores.data(), kBlockKeys, V + j0 * kv_ld, kv_ld,
                         j0 > 0 ? T(1) : T(0), O, p.d);
      }
      for (int64_t r = 0; r < p.M; ++r) {
        const T inv = T(1) / row_sum[r];
        T* o = O + r * p.d;
        for (int64_t c = 0; c < p.d; ++c) o[c] *= inv;
        lse[head0 * p.Nq + r] = finish_lse(row_max[r], row_sum[r]);
      }
    }
  }
}

template <typename T>
void backward_kernel(const Problem& p, const T* dout, const T* q, const T* k, const T* v, const T* lse,
                     const T* delta, T scale, T* dq, T* dk, T* dv) {
  const auto order = task_order(p);
  const int64_t ntasks = static_cast<int64_t>(order.size());
  const int64_t kv_ld = p.Hk * p.d;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> probs(p.M * kBlockKeys), dprobs(p.M * kBlockKeys);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t b = order[t] / p.Hk, hk = order[t] % p.Hk;
      const int64_t start = p.cu[b], len = p.cu[b + 1] - start;
      const int64_t head0 = b * p.H + hk * p.G;
      const T* Q = q + head0 * p.Nq * p.d;
      const T* dO = dout + head0 * p.Nq * p.d;
      const T* LSE = lse + head0 * p.Nq;
      const T* Delta = delta + head0 * p.Nq;
      T* dQ = dq + head0 * p.Nq * p.d;
      const int64_t kv_off = (start * p.Hk + hk) * p.d;
      for (int64_t j0 = 0; j0 < len; j0 += kBlockKeys) {
        const int64_t n = std::min(kBlockKeys, len - j0);
        const T* K = k + kv_off + j0 * kv_ld;
        const T* V = v + kv_off + j0 * kv_ld;
        // P = exp(scale Q K^T - lse)
        gemm_rowmajor<T>(false, true, p.M, n, p.d, scale, Q, p.d, K, kv_ld, T(0), probs.data(), kBlockKeys);
        for (int64_t r = 0; r < p.M; ++r) recompute_probs(probs.data() + r * kBlockKeys, n, LSE[r]);
        // dV_blk = P^T dO (this task owns these rows of dv: one sample, one kv head)
        gemm_rowmajor<T>(true, false, n, p.d, p.M, T(1), probs.data(), kBlockKeys, dO, p.d, T(0),
                         dv + kv_off + j0 * kv_ld, kv_ld);
        // dP = dO V^T, then dS = P * (dP - delta)
        gemm_rowmajor<T>(false, true, p.M, n, p.d, T(1), dO, p.d, V, kv_ld, T(0), dprobs.data(), kBlockKeys);
        for (int64_t r = 0; r < p.M; ++r)
          softmax_grad(probs.data() + r * kBlockKeys, dprobs.data() + r * kBlockKeys, n, Delta[r]);
        // dQ += scale dS K, dK_blk = scale dS^T Q
        gemm_rowmajor<T>(false, false, p.M, p.d, n, scale, dprobs.data(), kBlockKeys, K, kv_ld,
                         j0 > 0 ? T(1) : T(0), dQ, p.d);
        gemm_rowmajor<T>(true, false, n, p.d, p.M, scale, dprobs.data(), kBlockKeys, Q, p.d, T(0),
                         dk + kv_off + j0 * kv_ld, kv_ld);
      }
    }
  }
}

// float32 computes as is, float64 in double; half and bfloat16 are computed in float32 and cast back.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> resampler_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                               double scale) {
  check_resampler_attention_fwd_args(q, k, v, cu_seqlens);
  const auto ct = compute_type(q.scalar_type());
  const auto qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  const auto cu = cu_seqlens.contiguous();
  auto out = at::empty(qc.sizes(), qc.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, qc.options());
  const Problem p = make_problem(qc, kc, cu);
  if (p.B > 0 && p.Nq > 0 && p.H > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "resampler_attention_fwd_cpu", [&] {
      forward_kernel<scalar_t>(p, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                               static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
    });
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> resampler_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, double scale) {
  check_resampler_attention_bwd_args(grad_out, q, k, v, out, lse, cu_seqlens);
  const auto ct = compute_type(q.scalar_type());
  const auto qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  const auto doc = grad_out.to(ct).contiguous();
  const auto lsec = lse.to(ct).contiguous();
  const auto delta = (doc * out.to(ct)).sum(-1).contiguous();  // (B, H, Nq): rowsum(dO * O)
  const auto cu = cu_seqlens.contiguous();
  auto dq = at::empty(qc.sizes(), qc.options());
  auto dk = at::empty(kc.sizes(), kc.options());
  auto dv = at::empty(vc.sizes(), vc.options());
  const Problem p = make_problem(qc, kc, cu);
  if (p.B > 0 && p.Nq > 0 && p.H > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "resampler_attention_bwd_cpu", [&] {
      backward_kernel<scalar_t>(p, doc.data_ptr<scalar_t>(), qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                vc.data_ptr<scalar_t>(), lsec.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
                                static_cast<scalar_t>(scale), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                dv.data_ptr<scalar_t>());
    });
  } else {
    dk.zero_();
    dv.zero_();
    dq.zero_();
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace
}  // namespace resampler
}  // namespace omniret

TORCH_LIBRARY_IMPL(omniret, CPU, m) {
  m.impl("resampler_attention_fwd", &omniret::resampler::resampler_attention_fwd_cpu);
  m.impl("resampler_attention_bwd", &omniret::resampler::resampler_attention_bwd_cpu);
}
