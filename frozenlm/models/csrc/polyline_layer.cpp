// One VectorNet subgraph layer fused for CPUs: matmul -> (per-polyline row added) -> LayerNorm -> ReLU -> max-pool
// over each polyline's rows, and its backward. Built on first use by frozenlm.models.polyline_kernel
// (torch.utils.cpp_extension); frozenlm.models.vectornet falls back to PyTorch's own operations without it.
//
// Rows `inputs [R, K]` come in contiguous ranges, one per polyline: range p is rows starts[p] .. starts[p] +
// lengths[p] and its pooled row is dest[p] of `[pooled_rows, D]`. The work goes by chunks of kChunk polylines
// (a few hundred rows): the chunk's matmul, then its rows through the rest while they are still in cache,
// where PyTorch's operations take a pass over all rows each (the matmul, add, LayerNorm, ReLU, pool; in
// backward a zero fill, a scatter, the gradients' sum, the ReLU's and the LayerNorm's backward, the per-polyline
// row's index_add and two matmuls). The matmuls are a register-blocked kernel (6 rows by two SIMD vectors),
// faster than a BLAS call on these thin `[R, 64] x [64, 64]` shapes.
//
// Same results as PyTorch's operations up to rounding: max_pool1d's tie rule (the first maximum; NaN wins),
// the ReLU's (NaN passes, its gradient is 0 where the output is 0), LayerNorm's biased variance. The weight,
// LayerNorm weight and bias gradients are summed per chunk, then the chunks in order: the same bits on any
// number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;  // polylines per chunk (and per partial sum of the parameters' gradients)
constexpr int64_t kRowBlock = 16;  // rows per step of the weight gradient's sum (its operands stay in L1)

// `body(first, last)` over items (chunks of polylines) whose rows are contiguous and in order, item i's first
// row being `first_row(i)`: the threads split the rows evenly, not the items (an agent's polyline can have five
// times the rows of a lane's), each taking the items that start in its rows.
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

// A 32-byte SIMD vector of T (GCC's and Clang's vector extension; AVX registers where built with -mavx2).
template <typename T>
struct Simd {
  typedef T Vec __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));
  static constexpr int64_t kLanes = 32 / sizeof(T);
  static Vec load(const T* p) { return *reinterpret_cast<const Vec*>(p); }
  static void store(T* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
};

// C[MR, N] (= or +=) A[MR, K] B[K, N], A's element (i, p) at a[i * a_i + p * a_p], B and C row-major with row
// strides ldb and ldc: MR rows by two vectors of columns held in registers over the K products.
template <typename T, int MR>
void rows_block(const T* __restrict__ a, int64_t a_i, int64_t a_p, int64_t K, const T* __restrict__ b, int64_t ldb,
                int64_t N, T* __restrict__ c, int64_t ldc, bool accumulate) {
  using S = Simd<T>;
  using V = typename S::Vec;
  constexpr int64_t L = S::kLanes;
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L) {
    V acc[MR][2];
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = accumulate ? S::load(c + r * ldc + j) : V{};
      acc[r][1] = accumulate ? S::load(c + r * ldc + j + L) : V{};
    }
    for (int64_t p = 0; p < K; ++p) {
      const V b0 = S::load(b + p * ldb + j), b1 = S::load(b + p * ldb + j + L);
      for (int r = 0; r < MR; ++r) {
        const T x = a[r * a_i + p * a_p];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
      }
    }
    for (int r = 0; r < MR; ++r) { S::store(c + r * ldc + j, acc[r][0]); S::store(c + r * ldc + j + L, acc[r][1]); }
  }
  for (; j + L <= N; j += L) {
    V acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = accumulate ? S::load(c + r * ldc + j) : V{};
    for (int64_t p = 0; p < K; ++p) {
      const V b0 = S::load(b + p * ldb + j);
      for (int r = 0; r < MR; ++r) acc[r] += a[r * a_i + p * a_p] * b0;
    }
    for (int r = 0; r < MR; ++r) S::store(c + r * ldc + j, acc[r]);
  }
  for (; j < N; ++j) {
    for (int r = 0; r < MR; ++r) {
      T acc = accumulate ? c[r * ldc + j] : T(0);
      for (int64_t p = 0; p < K; ++p) acc += a[r * a_i + p * a_p] * b[p * ldb + j];
      c[r * ldc + j] = acc;
    }
  }
}

// C[M, N] (= or +=) A[M, K] B[K, N] as rows_block, six rows at a time.
template <typename T>
void matmul(int64_t M, const T* a, int64_t a_i, int64_t a_p, int64_t K, const T* b, int64_t ldb, int64_t N, T* c,
            int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) rows_block<T, 6>(a + i * a_i, a_i, a_p, K, b, ldb, N, c + i * ldc, ldc, accumulate);
  a += i * a_i;
  c += i * ldc;
  switch (M - i) {
    case 5: rows_block<T, 5>(a, a_i, a_p, K, b, ldb, N, c, ldc, accumulate); break;
    case 4: rows_block<T, 4>(a, a_i, a_p, K, b, ldb, N, c, ldc, accumulate); break;
    case 3: rows_block<T, 3>(a, a_i, a_p, K, b, ldb, N, c, ldc, accumulate); break;
    case 2: rows_block<T, 2>(a, a_i, a_p, K, b, ldb, N, c, ldc, accumulate); break;
    case 1: rows_block<T, 1>(a, a_i, a_p, K, b, ldb, N, c, ldc, accumulate); break;
    default: break;
  }
}

struct Ranges {
  const int64_t* starts;
  const int64_t* lengths;
  const int64_t* dest;
  int64_t polylines, rows;
  int64_t chunks() const { return (polylines + kChunk - 1) / kChunk; }
  int64_t chunk_first_row(int64_t k) const { return starts[k * kChunk]; }
  int64_t chunk_end(int64_t k) const { return std::min(polylines, (k + 1) * kChunk); }
  int64_t chunk_rows(int64_t k) const {
    const int64_t last = chunk_end(k) - 1;
    return starts[last] + lengths[last] - starts[k * kChunk];
  }
};

// `kD` is the row width when known at compile time (VectorNet's 64: loops of a fixed count) and 0 for any other,
// read from `dim`. A polyline's rows go through each phase in turn (statistics, then outputs), so that a row's
// sums, whose additions wait on each other, overlap with the next row's loads instead of stalling it.
template <typename T, int64_t kD>
void forward_kernel(const T* __restrict__ inputs, int64_t K, const T* __restrict__ weight_t,
                    const T* __restrict__ per_polyline, const T* __restrict__ gamma, const T* __restrict__ beta,
                    const Ranges& ranges, int64_t dim, T eps, T* __restrict__ pre, T* __restrict__ nodes,
                    T* __restrict__ pooled, int32_t* __restrict__ argmax, T* __restrict__ mean_out,
                    T* __restrict__ rstd_out) {
  const int64_t D = kD ? kD : dim;
  const auto first_row = [&](int64_t k) { return ranges.chunk_first_row(k); };
  parallel_by_rows(ranges.chunks(), ranges.rows, first_row, [&](int64_t first, int64_t last) {
    std::vector<T> out_row(D), best(D);  // a row's output where the nodes are not kept; the running max
    std::vector<int32_t> slot_of_best(D);
    T* __restrict__ pool = best.data();
    int32_t* __restrict__ arg = slot_of_best.data();
    for (int64_t k = first; k < last; ++k) {
      const int64_t row0 = ranges.chunk_first_row(k);
      // the chunk's matmul, inputs [rows, K] x weight^T [K, D], into the LayerNorm's inputs
      matmul<T>(ranges.chunk_rows(k), inputs + row0 * K, K, 1, K, weight_t, D, D, pre + row0 * D, D, false);
      for (int64_t p = k * kChunk; p < ranges.chunk_end(k); ++p) {
        const int64_t start = ranges.starts[p], n = ranges.lengths[p], q = ranges.dest[p];
        const T* __restrict__ add = per_polyline ? per_polyline + q * D : nullptr;
        T* __restrict__ mean = mean_out + start;
        T* __restrict__ rstd = rstd_out + start;
        for (int64_t i = 0; i < n; ++i) {  // the per-polyline row added, and the means
          T* __restrict__ v = pre + (start + i) * D;
          if (add) for (int64_t c = 0; c < D; ++c) v[c] += add[c];
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < D; ++c) sum += v[c];
          mean[i] = sum / D;
        }
        for (int64_t i = 0; i < n; ++i) {  // the (biased) variances
          const T* __restrict__ v = pre + (start + i) * D;
          const T m = mean[i];
          T var = 0;
#pragma omp simd reduction(+ : var)
          for (int64_t c = 0; c < D; ++c) var += (v[c] - m) * (v[c] - m);
          rstd[i] = T(1) / std::sqrt(var / D + eps);
        }
        for (int64_t c = 0; c < D; ++c) { pool[c] = n ? -std::numeric_limits<T>::infinity() : T(0); arg[c] = 0; }
        for (int64_t i = 0; i < n; ++i) {  // LayerNorm, ReLU, the max
          const T* __restrict__ v = pre + (start + i) * D;
          const T m = mean[i], s = rstd[i];
          T* __restrict__ y = nodes ? nodes + (start + i) * D : out_row.data();
          for (int64_t c = 0; c < D; ++c) {
            const T o = (v[c] - m) * s * gamma[c] + beta[c];
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
    }
  });
}

// Without the nodes' own gradient (the last layer, whose nodes only feed the max-pool) the output gradient is
// the pooled one at each maximum, where the ReLU's gradient is 1 exactly if the max is above 0: the nodes are
// not needed (nor kept).
template <typename T, int64_t kD>
void backward_kernel(const T* __restrict__ grad_nodes, const T* __restrict__ grad_pooled, const T* __restrict__ inputs,
                     int64_t K, const T* __restrict__ weight, const T* __restrict__ pre, const T* __restrict__ nodes,
                     const T* __restrict__ pooled, const T* __restrict__ gamma, const T* __restrict__ mean_in,
                     const T* __restrict__ rstd_in, const int32_t* __restrict__ argmax, const Ranges& ranges,
                     int64_t dim, T* __restrict__ grad_inputs, T* __restrict__ grad_per_polyline,
                     T* __restrict__ partial_weight, T* __restrict__ partial_gamma, T* __restrict__ partial_beta) {
  const int64_t D = kD ? kD : dim;
  const auto first_row = [&](int64_t k) { return ranges.chunk_first_row(k); };
  parallel_by_rows(ranges.chunks(), ranges.rows, first_row, [&](int64_t first, int64_t last) {
    // a polyline's rows' gradients (times gamma), normalised inputs, the two means; the chunk's input gradients
    std::vector<T> grads, normed, sums, grad_pre;
    for (int64_t k = first; k < last; ++k) {
      const int64_t row0 = ranges.chunk_first_row(k), chunk_rows = ranges.chunk_rows(k);
      if (static_cast<int64_t>(grad_pre.size()) < chunk_rows * D) grad_pre.resize(chunk_rows * D);
      T* __restrict__ pg = partial_gamma + k * D;
      T* __restrict__ pb = partial_beta + k * D;
      for (int64_t c = 0; c < D; ++c) { pg[c] = 0; pb[c] = 0; }
      for (int64_t p = k * kChunk; p < ranges.chunk_end(k); ++p) {
        const int64_t start = ranges.starts[p], n = ranges.lengths[p], q = ranges.dest[p];
        T* __restrict__ grad_add = grad_per_polyline ? grad_per_polyline + q * D : nullptr;  // zeroed by the caller
        const T* __restrict__ gp = grad_pooled + q * D;
        const T* __restrict__ best = pooled + q * D;
        const int32_t* __restrict__ arg = argmax + q * D;
        if (static_cast<int64_t>(grads.size()) < n * D) { grads.resize(n * D); normed.resize(n * D); sums.resize(2 * n); }
        for (int64_t i = 0; i < n; ++i) {  // the gradients at LayerNorm's output and their two means
          const int64_t r = start + i;
          const T* __restrict__ v = pre + r * D;
          T* __restrict__ g = grads.data() + i * D;
          T* __restrict__ xh = normed.data() + i * D;
          const T mean = mean_in[r], rstd = rstd_in[r];
          const int32_t slot = static_cast<int32_t>(i);
          // the nodes' own gradient plus the pooled one at each maximum, through the ReLU (its gradient is 0
          // where the output is 0; every operand loaded: no branch)
          if (grad_nodes) {
            const T* __restrict__ own = grad_nodes + r * D;
            const T* __restrict__ y = nodes + r * D;
            for (int64_t c = 0; c < D; ++c) {
              const T grad = arg[c] == slot ? own[c] + gp[c] : own[c];
              g[c] = y[c] > T(0) ? grad : T(0);
            }
          } else {
            for (int64_t c = 0; c < D; ++c) g[c] = arg[c] == slot && best[c] > T(0) ? gp[c] : T(0);
          }
          for (int64_t c = 0; c < D; ++c) xh[c] = (v[c] - mean) * rstd;
          for (int64_t c = 0; c < D; ++c) { pg[c] += g[c] * xh[c]; pb[c] += g[c]; }
          for (int64_t c = 0; c < D; ++c) g[c] *= gamma[c];
          T sum1 = 0, sum2 = 0;
#pragma omp simd reduction(+ : sum1, sum2)
          for (int64_t c = 0; c < D; ++c) { sum1 += g[c]; sum2 += g[c] * xh[c]; }
          sums[2 * i] = sum1 / D;
          sums[2 * i + 1] = sum2 / D;
        }
        for (int64_t i = 0; i < n; ++i) {  // the gradients at LayerNorm's input
          const int64_t r = start + i;
          const T* __restrict__ g = grads.data() + i * D;
          const T* __restrict__ xh = normed.data() + i * D;
          const T rstd = rstd_in[r], m1 = sums[2 * i], m2 = sums[2 * i + 1];
          T* __restrict__ dx = grad_pre.data() + (r - row0) * D;
          for (int64_t c = 0; c < D; ++c) dx[c] = rstd * (g[c] - m1 - xh[c] * m2);
          if (grad_add) for (int64_t c = 0; c < D; ++c) grad_add[c] += dx[c];
        }
      }
      // the matmul's gradients: inputs' = grad_pre [rows, D] x weight [D, K]; the weight's, this chunk's part
      // of grad_pre^T [D, rows] x inputs [rows, K]
      if (grad_inputs)
        matmul<T>(chunk_rows, grad_pre.data(), D, 1, D, weight, K, K, grad_inputs + row0 * K, K, false);
      if (chunk_rows == 0) std::fill(partial_weight + k * D * K, partial_weight + (k + 1) * D * K, T(0));
      for (int64_t s = 0; s < chunk_rows; s += kRowBlock)
        matmul<T>(D, grad_pre.data() + s * D, 1, D, std::min(kRowBlock, chunk_rows - s), inputs + (row0 + s) * K, K, K,
                  partial_weight + k * D * K, K, s > 0);
    }
  });
}

// The polylines' ranges, checked to tile the rows in order (polyline p's rows right after p - 1's, the last
// ending at the last row) and to pool into distinct rows below pooled_rows: every row and pooled row read is in
// bounds, and no two threads write one pooled row.
Ranges check(const torch::Tensor& inputs, const torch::Tensor& starts, const torch::Tensor& lengths,
             const torch::Tensor& dest, int64_t pooled_rows) {
  TORCH_CHECK(inputs.device().is_cpu() && inputs.dim() == 2 && inputs.is_contiguous(),
              "inputs must be a contiguous [rows, K] CPU tensor");
  for (const auto* t : {&starts, &lengths, &dest})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->device().is_cpu() && t->is_contiguous() &&
                    t->numel() == starts.numel(),
                "starts, lengths and dest must be contiguous int64 CPU tensors of one length");
  const Ranges ranges{starts.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), dest.data_ptr<int64_t>(),
                      starts.numel(), inputs.size(0)};
  int64_t row = 0;
  std::vector<bool> taken(pooled_rows);
  for (int64_t p = 0; p < ranges.polylines; ++p) {
    TORCH_CHECK(ranges.starts[p] == row && ranges.lengths[p] >= 0, "polyline ", p, "'s rows do not follow the previous polyline's");
    TORCH_CHECK(ranges.dest[p] >= 0 && ranges.dest[p] < pooled_rows, "polyline ", p, " pools outside the pooled rows");
    TORCH_CHECK(!taken[ranges.dest[p]], "polyline ", p, " pools into row ", ranges.dest[p], " as an earlier polyline does");
    taken[ranges.dest[p]] = true;
    row += ranges.lengths[p];
  }
  TORCH_CHECK(row == ranges.rows, "the polylines hold ", row, " rows, the inputs ", ranges.rows);
  return ranges;
}

// The chunks' partial sums [chunks, n] in order, on one thread: the same bits on any number of threads.
torch::Tensor sum_chunks(const torch::Tensor& partial) {
  auto total = torch::zeros({partial.size(1)}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "polyline_layer_sum_chunks", [&] {
    const scalar_t* p = partial.data_ptr<scalar_t>();
    scalar_t* t = total.data_ptr<scalar_t>();
    const int64_t n = partial.size(1);
    for (int64_t k = 0; k < partial.size(0); ++k)
      for (int64_t c = 0; c < n; ++c) t[c] += p[k * n + c];
  });
  return total;
}

}  // namespace

// inputs [R, K], weight_t [K, D] (the Linear's weight transposed); returns (pre, nodes, pooled, argmax, mean,
// rstd): pre [R, D] the LayerNorm's inputs (inputs x weight^T + the polyline's row), nodes [R, D] (empty unless
// keep_nodes), pooled and argmax [pooled_rows, D], mean and rstd [R].
std::vector<torch::Tensor> forward(torch::Tensor inputs, torch::Tensor weight_t, std::optional<torch::Tensor> per_polyline,
                                   torch::Tensor gamma, torch::Tensor beta, torch::Tensor starts, torch::Tensor lengths,
                                   torch::Tensor dest, int64_t pooled_rows, double eps, bool keep_nodes) {
  const Ranges ranges = check(inputs, starts, lengths, dest, pooled_rows);
  const int64_t R = inputs.size(0), K = inputs.size(1), D = weight_t.size(1);
  TORCH_CHECK(weight_t.is_contiguous() && weight_t.size(0) == K, "weight_t must be a contiguous [K, D] tensor");
  TORCH_CHECK(!per_polyline || (per_polyline->is_contiguous() && per_polyline->size(0) == pooled_rows &&
                                per_polyline->size(1) == D),
              "per_polyline must be a contiguous [pooled_rows, D] tensor");
  TORCH_CHECK(gamma.is_contiguous() && beta.is_contiguous() && gamma.numel() == D && beta.numel() == D,
              "the LayerNorm weight and bias must be contiguous [D] tensors");
  auto options = inputs.options();
  auto pre = torch::empty({R, D}, options);
  auto nodes = keep_nodes ? torch::empty({R, D}, options) : torch::empty({0, D}, options);
  auto pooled = torch::zeros({pooled_rows, D}, options);
  auto argmax = torch::zeros({pooled_rows, D}, options.dtype(torch::kInt32));
  auto mean = torch::empty({R}, options);
  auto rstd = torch::empty({R}, options);
  if (ranges.polylines == 0) return {pre, nodes, pooled, argmax, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "polyline_layer_forward", [&] {
    auto kernel = D == 64 ? forward_kernel<scalar_t, 64> : forward_kernel<scalar_t, 0>;
    kernel(inputs.data_ptr<scalar_t>(), K, weight_t.data_ptr<scalar_t>(),
           per_polyline ? per_polyline->data_ptr<scalar_t>() : nullptr, gamma.data_ptr<scalar_t>(),
           beta.data_ptr<scalar_t>(), ranges, D, static_cast<scalar_t>(eps), pre.data_ptr<scalar_t>(),
           keep_nodes ? nodes.data_ptr<scalar_t>() : nullptr, pooled.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>(),
           mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  return {pre, nodes, pooled, argmax, mean, rstd};
}

// Returns (grad_inputs (undefined unless need_inputs), grad_weight [D, K], grad_per_polyline (undefined unless
// has_per_polyline), grad_gamma, grad_beta). `nodes` is read only with grad_nodes.
std::vector<torch::Tensor> backward(std::optional<torch::Tensor> grad_nodes, torch::Tensor grad_pooled,
                                    torch::Tensor inputs, torch::Tensor weight, torch::Tensor pre, torch::Tensor nodes,
                                    torch::Tensor pooled, torch::Tensor gamma, torch::Tensor mean, torch::Tensor rstd,
                                    torch::Tensor argmax, torch::Tensor starts, torch::Tensor lengths, torch::Tensor dest,
                                    bool need_inputs, bool has_per_polyline) {
  const Ranges ranges = check(inputs, starts, lengths, dest, pooled.size(0));
  const int64_t K = inputs.size(1), D = pre.size(1), chunks = ranges.chunks();
  TORCH_CHECK(weight.is_contiguous() && weight.size(0) == D && weight.size(1) == K, "weight must be a contiguous [D, K] tensor");
  TORCH_CHECK(grad_pooled.is_contiguous() && grad_pooled.sizes() == pooled.sizes(), "grad_pooled must be contiguous, pooled's shape");
  TORCH_CHECK(!grad_nodes || (grad_nodes->is_contiguous() && grad_nodes->sizes() == pre.sizes() &&
                              nodes.sizes() == pre.sizes()),
              "grad_nodes needs the kept nodes, both contiguous [rows, D]");
  auto options = inputs.options();
  torch::Tensor grad_inputs = need_inputs ? torch::empty_like(inputs) : torch::Tensor();
  torch::Tensor grad_per_polyline = has_per_polyline ? torch::zeros_like(pooled) : torch::Tensor();
  auto partial_weight = torch::empty({chunks, D * K}, options);  // every chunk writes its own partial sums
  auto partial_gamma = torch::empty({chunks, D}, options);
  auto partial_beta = torch::empty({chunks, D}, options);
  if (ranges.rows == 0) {  // no thread runs: nothing to sum
    partial_weight.zero_();
    partial_gamma.zero_();
    partial_beta.zero_();
  }
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "polyline_layer_backward", [&] {
    auto kernel = D == 64 ? backward_kernel<scalar_t, 64> : backward_kernel<scalar_t, 0>;
    kernel(grad_nodes ? grad_nodes->data_ptr<scalar_t>() : nullptr, grad_pooled.data_ptr<scalar_t>(),
           inputs.data_ptr<scalar_t>(), K, weight.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(),
           grad_nodes ? nodes.data_ptr<scalar_t>() : nullptr, pooled.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
           mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>(), ranges, D,
           need_inputs ? grad_inputs.data_ptr<scalar_t>() : nullptr,
           has_per_polyline ? grad_per_polyline.data_ptr<scalar_t>() : nullptr, partial_weight.data_ptr<scalar_t>(),
           partial_gamma.data_ptr<scalar_t>(), partial_beta.data_ptr<scalar_t>());
  });
  return {grad_inputs, sum_chunks(partial_weight).view({D, K}), grad_per_polyline, sum_chunks(partial_gamma),
          sum_chunks(partial_beta)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "matmul -> (per-polyline row added) -> LayerNorm -> ReLU -> max-pool per polyline");
  m.def("backward", &backward, "its backward");
}
