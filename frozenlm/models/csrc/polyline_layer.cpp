// VectorNet's subgraph layer after its matmul, fused for CPUs: (per-polyline row added) -> LayerNorm -> ReLU ->
// max-pool over each polyline's rows, and its backward. Built on first use by frozenlm.models.polyline_kernel
// (torch.utils.cpp_extension); frozenlm.models.vectornet falls back to PyTorch's own operations without it.
//
// Rows `h [R, D]` come in contiguous ranges, one per polyline: range p is rows starts[p] .. starts[p] + lengths[p]
// and its pooled row is dest[p] of `[pooled_rows, D]`. Each pass reads a row once and writes it once, where
// PyTorch's operations take a pass each (add, LayerNorm, ReLU, pool; in backward a zero fill, a scatter, the
// gradients' sum, the ReLU's and the LayerNorm's backward, the per-polyline row's index_add).
//
// Same results as PyTorch's operations up to rounding: max_pool1d's tie rule (the first maximum; NaN wins),
// the ReLU's (NaN passes, its gradient is 0 where the output is 0), LayerNorm's biased variance. The
// LayerNorm weight and bias gradients are summed over fixed chunks of polylines, then the chunks in order:
// the same bits on any number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;  // polylines per partial sum of the weight and bias gradients

// `body(first, last)` over items (polylines, chunks of them) whose rows are contiguous and in order, item i's
// first row being `first_row(i)`: the threads split the rows evenly, not the items (an agent's polyline can
// have five times the rows of a lane's), each taking the items that start in its rows.
template <typename FirstRow, typename Body>
void parallel_by_rows(int64_t items, int64_t rows, const FirstRow& first_row, const Body& body) {
  at::parallel_for(0, rows, 2048, [&](int64_t r0, int64_t r1) {
    auto find = [&](int64_t r) {  // the first item starting at or after row r
      int64_t lo = 0, hi = items;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (first_row(mid) < r) lo = mid + 1;
        else hi = mid;
      }
      return lo;
    };
    body(r0 == 0 ? 0 : find(r0), r1 >= rows ? items : find(r1));
  });
}

template <typename T>
void forward_kernel(const T* __restrict__ h, const T* __restrict__ per_polyline, const T* __restrict__ gamma,
                    const T* __restrict__ beta, const int64_t* starts, const int64_t* lengths, const int64_t* dest,
                    int64_t polylines, int64_t rows, int64_t D, T eps, T* __restrict__ nodes, T* __restrict__ pooled,
                    int32_t* __restrict__ argmax, T* __restrict__ mean_out, T* __restrict__ rstd_out) {
  parallel_by_rows(polylines, rows, [&](int64_t p) { return starts[p]; }, [&](int64_t first, int64_t last) {
    std::vector<T> row(D), best(D);
    std::vector<int32_t> slot_of_best(D);
    T* __restrict__ v = row.data();
    T* __restrict__ pool = best.data();
    int32_t* __restrict__ arg = slot_of_best.data();
    for (int64_t p = first; p < last; ++p) {
      const int64_t start = starts[p], n = lengths[p], q = dest[p];
      const T* __restrict__ add = per_polyline ? per_polyline + q * D : nullptr;
      for (int64_t c = 0; c < D; ++c) { pool[c] = n ? -std::numeric_limits<T>::infinity() : T(0); arg[c] = 0; }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = start + i;
        const T* __restrict__ x = h + r * D;
        if (add) for (int64_t c = 0; c < D; ++c) v[c] = x[c] + add[c];
        else for (int64_t c = 0; c < D; ++c) v[c] = x[c];
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < D; ++c) sum += v[c];
        const T mean = sum / D;
        T var = 0;
#pragma omp simd reduction(+ : var)
        for (int64_t c = 0; c < D; ++c) var += (v[c] - mean) * (v[c] - mean);
        const T rstd = T(1) / std::sqrt(var / D + eps);
        mean_out[r] = mean;
        rstd_out[r] = rstd;
        T* __restrict__ y = nodes + r * D;
        for (int64_t c = 0; c < D; ++c) {
          const T o = (v[c] - mean) * rstd * gamma[c] + beta[c];
          y[c] = o < T(0) ? T(0) : o;  // ReLU; NaN passes
        }
        const int32_t slot = static_cast<int32_t>(i);
        for (int64_t c = 0; c < D; ++c) {
          const T o = y[c];
          const bool take = (o > pool[c]) | (o != o);  // max_pool1d: the first maximum; NaN wins
          pool[c] = take ? o : pool[c];
          arg[c] = take ? slot : arg[c];
        }
      }
      for (int64_t c = 0; c < D; ++c) { pooled[q * D + c] = pool[c]; argmax[q * D + c] = arg[c]; }
    }
  });
}

template <typename T, bool HasGradNodes, bool HasPerPolyline>
void backward_kernel(const T* __restrict__ grad_nodes, const T* __restrict__ grad_pooled, const T* __restrict__ h,
                     const T* __restrict__ per_polyline, const T* __restrict__ nodes, const T* __restrict__ gamma,
                     const T* __restrict__ mean_in, const T* __restrict__ rstd_in, const int32_t* __restrict__ argmax,
                     const int64_t* starts, const int64_t* lengths, const int64_t* dest, int64_t polylines,
                     int64_t rows, int64_t D, T* __restrict__ grad_h, T* __restrict__ grad_per_polyline, T* __restrict__ partial_gamma,
                     T* __restrict__ partial_beta) {
  const int64_t chunks = (polylines + kChunk - 1) / kChunk;
  const auto chunk_start = [&](int64_t k) { return starts[k * kChunk]; };
  parallel_by_rows(chunks, rows, chunk_start, [&](int64_t first, int64_t last) {
    std::vector<T> grad_buf(D), xhat_buf(D), rows_grad;
    T* __restrict__ g = grad_buf.data();
    T* __restrict__ xh = xhat_buf.data();
    for (int64_t k = first; k < last; ++k) {
      T* __restrict__ pg = partial_gamma + k * D;
      T* __restrict__ pb = partial_beta + k * D;
      for (int64_t c = 0; c < D; ++c) { pg[c] = 0; pb[c] = 0; }
      for (int64_t p = k * kChunk; p < std::min(polylines, (k + 1) * kChunk); ++p) {
        const int64_t start = starts[p], n = lengths[p], q = dest[p];
        const T* __restrict__ add = HasPerPolyline ? per_polyline + q * D : nullptr;
        T* __restrict__ grad_add = HasPerPolyline ? grad_per_polyline + q * D : nullptr;
        if (HasPerPolyline) for (int64_t c = 0; c < D; ++c) grad_add[c] = 0;
        if (n == 0) continue;
        // the output gradient of the polyline's rows: the nodes' own plus the pooled one at each maximum
        if (static_cast<int64_t>(rows_grad.size()) < n * D) rows_grad.resize(n * D);
        T* __restrict__ go = rows_grad.data();
        if (HasGradNodes) std::copy(grad_nodes + start * D, grad_nodes + (start + n) * D, go);
        else std::fill(go, go + n * D, T(0));
        const T* __restrict__ gp = grad_pooled + q * D;
        const int32_t* __restrict__ arg = argmax + q * D;
        for (int64_t c = 0; c < D; ++c) go[arg[c] * D + c] += gp[c];
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = start + i;
          const T* __restrict__ x = h + r * D;
          const T* __restrict__ y = nodes + r * D;
          const T* __restrict__ gr = go + i * D;
          const T mean = mean_in[r], rstd = rstd_in[r];
          for (int64_t c = 0; c < D; ++c) {  // through the ReLU (both operands loaded: no branch)
            const T grad = gr[c], out = y[c];
            g[c] = out > T(0) ? grad : T(0);
          }
          if (HasPerPolyline) for (int64_t c = 0; c < D; ++c) xh[c] = (x[c] + add[c] - mean) * rstd;
          else for (int64_t c = 0; c < D; ++c) xh[c] = (x[c] - mean) * rstd;
          for (int64_t c = 0; c < D; ++c) { pg[c] += g[c] * xh[c]; pb[c] += g[c]; }
          for (int64_t c = 0; c < D; ++c) g[c] *= gamma[c];
          T sum1 = 0, sum2 = 0;
#pragma omp simd reduction(+ : sum1, sum2)
          for (int64_t c = 0; c < D; ++c) { sum1 += g[c]; sum2 += g[c] * xh[c]; }
          const T m1 = sum1 / D, m2 = sum2 / D;
          T* __restrict__ dx = grad_h + r * D;
          for (int64_t c = 0; c < D; ++c) dx[c] = rstd * (g[c] - m1 - xh[c] * m2);
          if (HasPerPolyline) for (int64_t c = 0; c < D; ++c) grad_add[c] += dx[c];
        }
      }
    }
  });
}

void check(const torch::Tensor& h, const torch::Tensor& starts, const torch::Tensor& lengths,
           const torch::Tensor& dest) {
  TORCH_CHECK(h.device().is_cpu() && h.dim() == 2 && h.is_contiguous(), "h must be a contiguous [rows, D] CPU tensor");
  for (const auto* t : {&starts, &lengths, &dest})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->numel() == starts.numel(),
                "starts, lengths and dest must be contiguous int64 tensors of one length");
}

}  // namespace

std::vector<torch::Tensor> forward(torch::Tensor h, std::optional<torch::Tensor> per_polyline, torch::Tensor gamma,
                                   torch::Tensor beta, torch::Tensor starts, torch::Tensor lengths, torch::Tensor dest,
                                   int64_t pooled_rows, double eps) {
  check(h, starts, lengths, dest);
  const int64_t R = h.size(0), D = h.size(1), polylines = starts.size(0);
  auto nodes = torch::empty_like(h);
  auto pooled = torch::zeros({pooled_rows, D}, h.options());
  auto argmax = torch::zeros({pooled_rows, D}, h.options().dtype(torch::kInt32));
  auto mean = torch::empty({R}, h.options());
  auto rstd = torch::empty({R}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "polyline_layer_forward", [&] {
    forward_kernel<scalar_t>(h.data_ptr<scalar_t>(), per_polyline ? per_polyline->data_ptr<scalar_t>() : nullptr,
                             gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), starts.data_ptr<int64_t>(),
                             lengths.data_ptr<int64_t>(), dest.data_ptr<int64_t>(), polylines, R, D,
                             static_cast<scalar_t>(eps), nodes.data_ptr<scalar_t>(), pooled.data_ptr<scalar_t>(),
                             argmax.data_ptr<int32_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  return {nodes, pooled, argmax, mean, rstd};
}

std::vector<torch::Tensor> backward(std::optional<torch::Tensor> grad_nodes, torch::Tensor grad_pooled, torch::Tensor h,
                                    std::optional<torch::Tensor> per_polyline, torch::Tensor nodes, torch::Tensor gamma,
                                    torch::Tensor mean, torch::Tensor rstd, torch::Tensor argmax, torch::Tensor starts,
                                    torch::Tensor lengths, torch::Tensor dest) {
  check(h, starts, lengths, dest);
  const int64_t D = h.size(1), polylines = starts.size(0);
  const int64_t chunks = (polylines + kChunk - 1) / kChunk;
  auto grad_h = torch::empty_like(h);
  torch::Tensor grad_per_polyline = per_polyline ? torch::zeros_like(*per_polyline) : torch::Tensor();
  auto partial_gamma = torch::zeros({chunks, D}, h.options());
  auto partial_beta = torch::zeros({chunks, D}, h.options());
  auto grad_gamma = torch::zeros({D}, h.options());
  auto grad_beta = torch::zeros({D}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "polyline_layer_backward", [&] {
    const scalar_t* gn = grad_nodes ? grad_nodes->data_ptr<scalar_t>() : nullptr;
    const scalar_t* add = per_polyline ? per_polyline->data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_add = per_polyline ? grad_per_polyline.data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto kernel) {
      kernel(gn, grad_pooled.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), add, nodes.data_ptr<scalar_t>(),
             gamma.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
             argmax.data_ptr<int32_t>(), starts.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
             dest.data_ptr<int64_t>(), polylines, h.size(0), D, grad_h.data_ptr<scalar_t>(), grad_add,
             partial_gamma.data_ptr<scalar_t>(), partial_beta.data_ptr<scalar_t>());
    };
    if (gn && add) run(backward_kernel<scalar_t, true, true>);
    else if (gn) run(backward_kernel<scalar_t, true, false>);
    else if (add) run(backward_kernel<scalar_t, false, true>);
    else run(backward_kernel<scalar_t, false, false>);
    // the chunks' partial sums in order, on one thread: the same bits on any number of threads
    const scalar_t* pg = partial_gamma.data_ptr<scalar_t>();
    const scalar_t* pb = partial_beta.data_ptr<scalar_t>();
    scalar_t* gg = grad_gamma.data_ptr<scalar_t>();
    scalar_t* gb = grad_beta.data_ptr<scalar_t>();
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = 0; c < D; ++c) { gg[c] += pg[k * D + c]; gb[c] += pb[k * D + c]; }
  });
  return {grad_h, grad_per_polyline, grad_gamma, grad_beta};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "(per-polyline row added) -> LayerNorm -> ReLU -> max-pool per polyline");
  m.def("backward", &backward, "its backward");
}
