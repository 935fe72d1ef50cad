// One VectorNet subgraph layer fused for CPUs: Linear over [node, the polyline's previous max] -> LayerNorm ->
// ReLU -> max-pool over each polyline's rows, and its backward. Built on first use by
// frozenlm.models.polyline_kernel (torch.utils.cpp_extension); frozenlm.models.vectornet falls back to PyTorch's
// own operations without it.
//
// Rows `inputs [R, K]` come in contiguous ranges, one per polyline: range p is rows starts[p] .. starts[p] +
// lengths[p] and its pooled row is dest[p] of `[P, D]` (P polylines). The Linear's input `[node, max]` is never
// built: its weight's first K columns multiply the rows, its last W the polyline's previous pooled row once per
// polyline (with the bias: the row added to each of the polyline's rows). The work goes by chunks of kChunk
// polylines (a few hundred rows): the chunk's matmul and its polylines' added rows, then its rows through the
// rest while they are still in cache, where PyTorch's operations take a pass over all rows each (the matmul,
// add, LayerNorm, ReLU, pool; in backward a zero fill, a scatter, the gradients' sum, the ReLU's and the
// LayerNorm's backward, the added rows' index_add and four matmuls). The matmuls are a register-blocked kernel
// (6 rows by two SIMD vectors), faster than a BLAS call on these thin `[R, 64] x [64, 64]` shapes.
//
// Same results as PyTorch's operations up to rounding: max_pool1d's tie rule (the first maximum; NaN wins),
// the ReLU's (NaN passes, its gradient is 0 where the output is 0), LayerNorm's biased variance. The weight,
// bias, LayerNorm weight and bias gradients are summed per chunk, then the chunks in order: the same bits on
// any number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;  // polylines per chunk (and per partial sum of the parameters' gradients)
constexpr int64_t kRowBlock = 16;  // rows per step of the weight gradient's sum (its operands stay in L1)

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

// `body(first, last)` over the chunks of polylines, whose rows are contiguous and in order: the threads split the
// work evenly, counted as a chunk's rows plus kPolylineCost rows per polyline (its pooled row, added row and their
// gradients: a lane of 9 rows costs more per row than an agent of 49), each taking the chunks that start in its
// share.
constexpr int64_t kPolylineCost = 1;

template <typename Body>
void parallel_by_work(const Ranges& ranges, const Body& body) {
  const int64_t items = ranges.chunks();
  const auto position = [&](int64_t k) { return ranges.chunk_first_row(k) + kPolylineCost * k * kChunk; };
  const int64_t total = ranges.rows + kPolylineCost * ranges.polylines;
  at::parallel_for(0, total, 2048, [&](int64_t r0, int64_t r1) {
    auto find = [&](int64_t r) {  // the first chunk starting at or after position r
      int64_t lo = 0, hi = items;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (position(mid) < r) lo = mid + 1;
        else hi = mid;
      }
      return lo;
    };
    body(r0 == 0 ? 0 : find(r0), r1 >= total ? items : find(r1));
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

// rows[i] = source[index[i]] for `count` rows of width W (nothing when W is 0).
template <typename T>
void gather_rows(const T* __restrict__ source, int64_t W, const int64_t* __restrict__ index, int64_t count,
                 T* __restrict__ rows) {
  for (int64_t i = 0; i < count; ++i) std::copy(source + index[i] * W, source + (index[i] + 1) * W, rows + i * W);
}

// out [count, D] = bias + rows [count, W] x weight_t [W, D] (the bias alone when W is 0).
template <typename T>
void linear_rows(int64_t count, const T* rows, int64_t W, const T* weight_t, const T* __restrict__ bias, int64_t D,
                 T* __restrict__ out) {
  for (int64_t i = 0; i < count; ++i) std::copy(bias, bias + D, out + i * D);
  if (W) matmul<T>(count, rows, W, 1, W, weight_t, D, D, out, D, true);
}


// `kD` is the row width when known at compile time (VectorNet's 64: loops of a fixed count) and 0 for any other,
// read from `dim`. A polyline's rows go through each phase in turn (statistics, then outputs), so that a row's
// sums, whose additions wait on each other, overlap with the next row's loads instead of stalling it.
template <typename T, int64_t kD>
void forward_kernel(const T* __restrict__ inputs, int64_t K, const T* __restrict__ weight_t, const T* __restrict__ bias,
                    const T* __restrict__ previous, int64_t W, const T* __restrict__ gamma, const T* __restrict__ beta,
                    const Ranges& ranges, int64_t dim, T eps, T* __restrict__ pre, T* __restrict__ nodes,
                    T* __restrict__ pooled, int32_t* __restrict__ argmax, T* __restrict__ mean_out,
                    T* __restrict__ rstd_out) {
  const int64_t D = kD ? kD : dim;
  parallel_by_work(ranges, [&](int64_t first, int64_t last) {
    std::vector<T> out_row(D), best(D);  // a row's output where the nodes are not kept; the running max
    std::vector<int32_t> slot_of_best(D);
    std::vector<T> rows_of_previous(kChunk * W), added(kChunk * D);  // the chunk's polylines' rows
    T* __restrict__ pool = best.data();
    int32_t* __restrict__ arg = slot_of_best.data();
    for (int64_t k = first; k < last; ++k) {
      const int64_t row0 = ranges.chunk_first_row(k), p0 = k * kChunk, count = ranges.chunk_end(k) - p0;
      // the chunk's matmul, inputs [rows, K] x weight^T [K, D], into the LayerNorm's inputs
      matmul<T>(ranges.chunk_rows(k), inputs + row0 * K, K, 1, K, weight_t, D, D, pre + row0 * D, D, false);
      // each polyline's row added to its rows: bias + previous [its pooled row, W] x weight^T [K + W rows on]
      gather_rows(previous, W, ranges.dest + p0, count, rows_of_previous.data());
      linear_rows(count, rows_of_previous.data(), W, weight_t + K * D, bias, D, added.data());
      for (int64_t p = p0; p < p0 + count; ++p) {
        const int64_t start = ranges.starts[p], n = ranges.lengths[p], q = ranges.dest[p];
        const T* __restrict__ add = added.data() + (p - p0) * D;
        T* __restrict__ mean = mean_out + start;
        T* __restrict__ rstd = rstd_out + start;
        for (int64_t i = 0; i < n; ++i) {  // the per-polyline row added, and the means
          T* __restrict__ v = pre + (start + i) * D;
          for (int64_t c = 0; c < D; ++c) v[c] += add[c];
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
          rstd[i] = var;
        }
        // 1 / sqrt, a row per SIMD lane (one row's square root and division at a time stalled the rows' loop)
        for (int64_t i = 0; i < n; ++i) rstd[i] = T(1) / std::sqrt(rstd[i] / D + eps);
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
// not needed (nor kept). The weight's partial sums are (K + W) D per chunk: the rows' part (the weight's
// columns 0 .. K) transposed, [K, D], whose rows are whole SIMD vectors also where K is not (the first layer's
// K is the vectors' width), then the polylines' part (columns K .. K + W), [D, W].
template <typename T, int64_t kD>
void backward_kernel(const T* __restrict__ grad_nodes, const T* __restrict__ grad_pooled, const T* __restrict__ inputs,
                     int64_t K, const T* __restrict__ weight, const T* __restrict__ previous, int64_t W,
                     const T* __restrict__ pre, const T* __restrict__ nodes, const T* __restrict__ pooled,
                     const T* __restrict__ gamma, const T* __restrict__ mean_in, const T* __restrict__ rstd_in,
                     const int32_t* __restrict__ argmax, const Ranges& ranges, int64_t dim,
                     T* __restrict__ grad_inputs, T* __restrict__ grad_previous, T* __restrict__ partial_weight,
                     T* __restrict__ partial_bias, T* __restrict__ partial_gamma, T* __restrict__ partial_beta) {
  const int64_t D = kD ? kD : dim, KW = K + W;
  parallel_by_work(ranges, [&](int64_t first, int64_t last) {
    // a polyline's rows' gradients (times gamma), normalised inputs, the two means; the chunk's input gradients;
    // the chunk's polylines' added rows' gradients, their previous pooled rows and those rows' gradients
    std::vector<T> grads, normed, sums, grad_pre;
    std::vector<T> grad_added(kChunk * D), rows_of_previous(kChunk * W), grad_rows_of_previous(kChunk * W);
    for (int64_t k = first; k < last; ++k) {
      const int64_t row0 = ranges.chunk_first_row(k), chunk_rows = ranges.chunk_rows(k);
      const int64_t p0 = k * kChunk, count = ranges.chunk_end(k) - p0;
      if (static_cast<int64_t>(grad_pre.size()) < chunk_rows * D) grad_pre.resize(chunk_rows * D);
      T* __restrict__ pg = partial_gamma + k * D;
      T* __restrict__ pb = partial_beta + k * D;
      for (int64_t c = 0; c < D; ++c) { pg[c] = 0; pb[c] = 0; }
      for (int64_t p = p0; p < p0 + count; ++p) {
        const int64_t start = ranges.starts[p], n = ranges.lengths[p], q = ranges.dest[p];
        T* __restrict__ grad_add = grad_added.data() + (p - p0) * D;
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
          // where the output is 0); every operand loaded before the selects, which then need neither a branch
          // nor a masked load (slow on AMD's cores)
          if (grad_nodes) {
            const T* __restrict__ own = grad_nodes + r * D;
            const T* __restrict__ y = nodes + r * D;
            for (int64_t c = 0; c < D; ++c) {
              const T mine = own[c], up = gp[c], out = y[c];
              const T grad = arg[c] == slot ? mine + up : mine;
              g[c] = out > T(0) ? grad : T(0);
            }
          } else {
            for (int64_t c = 0; c < D; ++c) {
              const T up = gp[c], top = best[c];
              g[c] = (arg[c] == slot) & (top > T(0)) ? up : T(0);
            }
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
        for (int64_t c = 0; c < D; ++c) grad_add[c] = 0;
        for (int64_t i = 0; i < n; ++i) {  // the gradients at LayerNorm's input; their sum, the added row's
          const int64_t r = start + i;
          const T* __restrict__ g = grads.data() + i * D;
          const T* __restrict__ xh = normed.data() + i * D;
          const T rstd = rstd_in[r], m1 = sums[2 * i], m2 = sums[2 * i + 1];
          T* __restrict__ dx = grad_pre.data() + (r - row0) * D;
          for (int64_t c = 0; c < D; ++c) dx[c] = rstd * (g[c] - m1 - xh[c] * m2);
          for (int64_t c = 0; c < D; ++c) grad_add[c] += dx[c];
        }
      }
      // the added rows' gradients [count, D]: summed into the bias's partial sums; x weight [D, K + W rows on]
      // into the previous pooled rows' gradients; ^T x those rows into the weight's polyline columns
      T* __restrict__ pw = partial_weight + k * D * KW;  // [K, D], then [D, W]
      T* __restrict__ pbias = partial_bias + k * D;
      for (int64_t c = 0; c < D; ++c) pbias[c] = 0;
      for (int64_t i = 0; i < count; ++i)
        for (int64_t c = 0; c < D; ++c) pbias[c] += grad_added[i * D + c];
      if (W) {
        matmul<T>(count, grad_added.data(), D, 1, D, weight + K, KW, W, grad_rows_of_previous.data(), W, false);
        for (int64_t i = 0; i < count; ++i) {
          const T* src = grad_rows_of_previous.data() + i * W;
          std::copy(src, src + W, grad_previous + ranges.dest[p0 + i] * W);
        }
        gather_rows(previous, W, ranges.dest + p0, count, rows_of_previous.data());
        matmul<T>(D, grad_added.data(), 1, D, count, rows_of_previous.data(), W, W, pw + K * D, W, false);
      }
      // the matmul's gradients: inputs' = grad_pre [rows, D] x weight [D, K]; the weight's (transposed), this
      // chunk's part of inputs^T [K, rows] x grad_pre [rows, D]
      if (grad_inputs)
        matmul<T>(chunk_rows, grad_pre.data(), D, 1, D, weight, KW, K, grad_inputs + row0 * K, K, false);
      if (chunk_rows == 0) std::fill(pw, pw + K * D, T(0));  // no rows: the rows' part is 0
      for (int64_t s = 0; s < chunk_rows; s += kRowBlock)
        matmul<T>(K, inputs + (row0 + s) * K, 1, K, std::min(kRowBlock, chunk_rows - s), grad_pre.data() + s * D, D, D,
                  pw, D, s > 0);
    }
  });
}

// The polylines' ranges, checked to tile the rows in order (polyline p's rows right after p - 1's, the last
// ending at the last row) and to pool into distinct rows below the polylines' count, so into every pooled row
// once: every row read is in bounds, every pooled row written, and no two threads write one.
Ranges check(const torch::Tensor& inputs, const torch::Tensor& starts, const torch::Tensor& lengths,
             const torch::Tensor& dest) {
  TORCH_CHECK(inputs.device().is_cpu() && inputs.dim() == 2 && inputs.is_contiguous(),
              "inputs must be a contiguous [rows, K] CPU tensor");
  for (const auto* t : {&starts, &lengths, &dest})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->device().is_cpu() && t->is_contiguous() &&
                    t->numel() == starts.numel(),
                "starts, lengths and dest must be contiguous int64 CPU tensors of one length");
  const Ranges ranges{starts.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), dest.data_ptr<int64_t>(),
                      starts.numel(), inputs.size(0)};
  int64_t row = 0;
  std::vector<bool> taken(ranges.polylines);
  for (int64_t p = 0; p < ranges.polylines; ++p) {
    TORCH_CHECK(ranges.starts[p] == row && ranges.lengths[p] >= 0, "polyline ", p, "'s rows do not follow the previous polyline's");
    TORCH_CHECK(ranges.dest[p] >= 0 && ranges.dest[p] < ranges.polylines, "polyline ", p, " pools outside the pooled rows");
    TORCH_CHECK(!taken[ranges.dest[p]], "polyline ", p, " pools into row ", ranges.dest[p], " as an earlier polyline does");
    taken[ranges.dest[p]] = true;
    row += ranges.lengths[p];
  }
  TORCH_CHECK(row == ranges.rows, "the polylines hold ", row, " rows, the inputs ", ranges.rows);
  return ranges;
}

// The chunks' partial sums [chunks, n] in order, each column on one thread: the same bits on any number of threads.
torch::Tensor sum_chunks(const torch::Tensor& partial) {
  auto total = torch::zeros({partial.size(1)}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "polyline_layer_sum_chunks", [&] {
    const scalar_t* p = partial.data_ptr<scalar_t>();
    scalar_t* t = total.data_ptr<scalar_t>();
    const int64_t n = partial.size(1), chunks = partial.size(0);
    at::parallel_for(0, n, 1024, [&](int64_t c0, int64_t c1) {
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = c0; c < c1; ++c) t[c] += p[k * n + c];
    });
  });
  return total;
}

}  // namespace

// One layer: inputs [R, K] (the previous layer's nodes, or the vectors), weight_t [K + W, D] (the Linear's weight
// transposed: the nodes' K rows, then the previous pooled rows' W), bias [D], previous [P, W] (the previous
// layer's pooled rows; none for the first layer, W = 0). Returns (pre, nodes, pooled, argmax, mean, rstd): pre
// [R, D] the LayerNorm's inputs, nodes [R, D] (empty unless keep_nodes), pooled and argmax [P, D], mean and
// rstd [R].
std::vector<torch::Tensor> forward(torch::Tensor inputs, torch::Tensor weight_t, torch::Tensor bias,
                                   std::optional<torch::Tensor> previous, torch::Tensor gamma, torch::Tensor beta,
                                   torch::Tensor starts, torch::Tensor lengths, torch::Tensor dest, double eps,
                                   bool keep_nodes) {
  const Ranges ranges = check(inputs, starts, lengths, dest);
  const int64_t R = inputs.size(0), K = inputs.size(1), D = weight_t.size(1), P = ranges.polylines;
  const int64_t W = previous ? previous->size(1) : 0;
  TORCH_CHECK(weight_t.is_contiguous() && weight_t.dim() == 2 && weight_t.size(0) == K + W,
              "weight_t must be a contiguous [K + W, D] tensor");
  TORCH_CHECK(!previous || (previous->is_contiguous() && previous->dim() == 2 && previous->size(0) == P),
              "previous must be a contiguous [polylines, W] tensor");
  TORCH_CHECK(bias.is_contiguous() && gamma.is_contiguous() && beta.is_contiguous() && bias.numel() == D &&
                  gamma.numel() == D && beta.numel() == D,
              "the bias and the LayerNorm weight and bias must be contiguous [D] tensors");
  auto options = inputs.options();
  auto pre = torch::empty({R, D}, options);
  auto nodes = keep_nodes ? torch::empty({R, D}, options) : torch::empty({0, D}, options);
  auto pooled = torch::empty({P, D}, options);  // every row written: the polylines pool into distinct rows
  auto argmax = torch::empty({P, D}, options.dtype(torch::kInt32));
  auto mean = torch::empty({R}, options);
  auto rstd = torch::empty({R}, options);
  if (P == 0) return {pre, nodes, pooled, argmax, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "polyline_layer_forward", [&] {
    auto kernel = D == 64 ? forward_kernel<scalar_t, 64> : forward_kernel<scalar_t, 0>;
    kernel(inputs.data_ptr<scalar_t>(), K, weight_t.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
           previous ? previous->data_ptr<scalar_t>() : nullptr, W, gamma.data_ptr<scalar_t>(),
           beta.data_ptr<scalar_t>(), ranges, D, static_cast<scalar_t>(eps), pre.data_ptr<scalar_t>(),
           keep_nodes ? nodes.data_ptr<scalar_t>() : nullptr, pooled.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>(),
           mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  return {pre, nodes, pooled, argmax, mean, rstd};
}

// Returns (grad_inputs (undefined unless need_inputs), grad_weight [D, K + W], grad_bias [D], grad_previous [P, W]
// (undefined without previous), grad_gamma, grad_beta). `nodes` is read only with grad_nodes.
std::vector<torch::Tensor> backward(std::optional<torch::Tensor> grad_nodes, torch::Tensor grad_pooled,
                                    torch::Tensor inputs, torch::Tensor weight, std::optional<torch::Tensor> previous,
                                    torch::Tensor pre, torch::Tensor nodes, torch::Tensor pooled, torch::Tensor gamma,
                                    torch::Tensor mean, torch::Tensor rstd, torch::Tensor argmax, torch::Tensor starts,
                                    torch::Tensor lengths, torch::Tensor dest, bool need_inputs) {
  const Ranges ranges = check(inputs, starts, lengths, dest);
  const int64_t R = inputs.size(0), K = inputs.size(1), D = pre.size(1), P = ranges.polylines, chunks = ranges.chunks();
  const int64_t W = previous ? previous->size(1) : 0;
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(0) == D && weight.size(1) == K + W,
              "weight must be a contiguous [D, K + W] tensor");
  TORCH_CHECK(!previous || (previous->is_contiguous() && previous->dim() == 2 && previous->size(0) == P),
              "previous must be a contiguous [polylines, W] tensor");
  TORCH_CHECK(pre.dim() == 2 && pre.size(0) == R && mean.numel() == R && rstd.numel() == R && gamma.numel() == D &&
                  pooled.size(0) == P && pooled.size(1) == D && argmax.sizes() == pooled.sizes(),
              "pre, mean, rstd, gamma, pooled and argmax must be the forward's");
  TORCH_CHECK(grad_pooled.is_contiguous() && grad_pooled.sizes() == pooled.sizes(), "grad_pooled must be contiguous, pooled's shape");
  TORCH_CHECK(!grad_nodes || (grad_nodes->is_contiguous() && grad_nodes->sizes() == pre.sizes() &&
                              nodes.sizes() == pre.sizes()),
              "grad_nodes needs the kept nodes, both contiguous [rows, D]");
  auto options = inputs.options();
  torch::Tensor grad_inputs = need_inputs ? torch::empty_like(inputs) : torch::Tensor();
  torch::Tensor grad_previous = previous ? torch::empty_like(*previous) : torch::Tensor();  // every row written
  auto partial_weight = torch::empty({chunks, D * (K + W)}, options);  // every chunk writes its own partial sums
  auto partial_bias = torch::empty({chunks, D}, options);
  auto partial_gamma = torch::empty({chunks, D}, options);
  auto partial_beta = torch::empty({chunks, D}, options);
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "polyline_layer_backward", [&] {
    auto kernel = D == 64 ? backward_kernel<scalar_t, 64> : backward_kernel<scalar_t, 0>;
    kernel(grad_nodes ? grad_nodes->data_ptr<scalar_t>() : nullptr, grad_pooled.data_ptr<scalar_t>(),
           inputs.data_ptr<scalar_t>(), K, weight.data_ptr<scalar_t>(),
           previous ? previous->data_ptr<scalar_t>() : nullptr, W, pre.data_ptr<scalar_t>(),
           grad_nodes ? nodes.data_ptr<scalar_t>() : nullptr, pooled.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
           mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>(), ranges, D,
           need_inputs ? grad_inputs.data_ptr<scalar_t>() : nullptr,
           previous ? grad_previous.data_ptr<scalar_t>() : nullptr, partial_weight.data_ptr<scalar_t>(),
           partial_bias.data_ptr<scalar_t>(), partial_gamma.data_ptr<scalar_t>(), partial_beta.data_ptr<scalar_t>());
  });
  const auto weight_sums = sum_chunks(partial_weight);
  const auto grad_weight = torch::cat({weight_sums.narrow(0, 0, K * D).view({K, D}).t(),
                                       weight_sums.narrow(0, K * D, D * W).view({D, W})}, 1);
  return {grad_inputs, grad_weight, sum_chunks(partial_bias), grad_previous,
          sum_chunks(partial_gamma), sum_chunks(partial_beta)};
}

// Groups of polylines, vectors [B, N_g, V_g, C] and masks [B, N_g, V_g] (bool, True = real), checked alike.
void check_groups(const std::vector<torch::Tensor>& vectors, const std::vector<torch::Tensor>& masks) {
  TORCH_CHECK(!vectors.empty() && vectors.size() == masks.size(), "one mask per group of vectors");
  for (size_t g = 0; g < vectors.size(); ++g) {
    const auto &v = vectors[g], &m = masks[g];
    TORCH_CHECK(v.device().is_cpu() && v.dim() == 4 && v.stride(3) == 1 && v.scalar_type() == vectors[0].scalar_type() &&
                    v.size(0) == vectors[0].size(0) && v.size(3) == vectors[0].size(3),
                "each group's vectors must be a [B, N, V, C] CPU tensor of the first's dtype, B and C, its channels "
                "contiguous (a vector's C values side by side; the collated batch's are a view of a wider tensor)");
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == torch::kBool && m.is_contiguous() && m.dim() == 3 &&
                    m.sizes() == v.sizes().slice(0, 3),
                "each group's mask must be a contiguous bool [B, N, V] CPU tensor, its vectors' shape");
  }
}

// The subgraph's inputs in one pass, as frozenlm.models.vectornet's padded_rows, polyline_ranges and the
// polylines' `real` (any real vector): rows [sum B N_g V_g, C] (each padded slot a copy of its polyline's first
// real vector, every slot of an empty polyline 0), starts, lengths, dest [B sum N_g] and real [B, sum N_g].
std::vector<torch::Tensor> polyline_rows(const std::vector<torch::Tensor>& vectors, const std::vector<torch::Tensor>& masks) {
  check_groups(vectors, masks);
  const int64_t B = vectors[0].size(0), C = vectors[0].size(3);
  int64_t total = 0, R = 0;
  for (const auto& v : vectors) { total += v.size(1); R += v.size(0) * v.size(1) * v.size(2); }
  auto rows = torch::empty({R, C}, vectors[0].options());
  auto index = torch::TensorOptions().dtype(torch::kInt64);
  auto starts = torch::empty({B * total}, index), lengths = torch::empty({B * total}, index);
  auto dest = torch::empty({B * total}, index);
  auto real = torch::empty({B, total}, index.dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES(vectors[0].scalar_type(), "polyline_rows", [&] {
    scalar_t* out = rows.data_ptr<scalar_t>();
    int64_t *st = starts.data_ptr<int64_t>(), *len = lengths.data_ptr<int64_t>(), *dst = dest.data_ptr<int64_t>();
    bool* any = real.data_ptr<bool>();
    int64_t row = 0, p = 0, first = 0;
    for (size_t g = 0; g < vectors.size(); ++g) {
      const int64_t N = vectors[g].size(1), V = vectors[g].size(2);
      const scalar_t* vec = vectors[g].data_ptr<scalar_t>();
      const int64_t sb = vectors[g].stride(0), sn = vectors[g].stride(1), ss = vectors[g].stride(2);
      const bool* mask = masks[g].data_ptr<bool>();
      for (int64_t i = 0; i < B * N; ++i, ++p, row += V) {
        const bool* m = mask + i * V;
        const scalar_t* v = vec + (i / N) * sb + (i % N) * sn;
        const int64_t f = std::find(m, m + V, true) - m;  // the first real slot (V: none)
        for (int64_t s = 0; s < V; ++s) {
          scalar_t* o = out + (row + s) * C;
          if (f == V) std::fill(o, o + C, scalar_t(0));
          else { const scalar_t* src = v + (m[s] ? s : f) * ss; std::copy(src, src + C, o); }
        }
        st[p] = row;
        len[p] = V;
        dst[p] = (i / N) * total + first + i % N;
        any[dst[p]] = f < V;
      }
      first += N;
    }
  });
  return {rows, starts, lengths, dest, real};
}

// VectorNet's identifiers [B, sum N_g, 2]: each polyline's minimum start coordinates (x and y apart) over its real
// vectors (the vectors' first two channels), NaN if one is NaN, 0 for an empty polyline.
torch::Tensor polyline_identifiers(const std::vector<torch::Tensor>& vectors, const std::vector<torch::Tensor>& masks) {
  check_groups(vectors, masks);
  const int64_t B = vectors[0].size(0), C = vectors[0].size(3);
  TORCH_CHECK(C >= 2, "vectors need their start coordinates (C >= 2)");
  int64_t total = 0;
  for (const auto& v : vectors) total += v.size(1);
  auto ids = torch::empty({B, total, 2}, vectors[0].options());
  AT_DISPATCH_FLOATING_TYPES(vectors[0].scalar_type(), "polyline_identifiers", [&] {
    scalar_t* out = ids.data_ptr<scalar_t>();
    int64_t first = 0;
    for (size_t g = 0; g < vectors.size(); ++g) {
      const int64_t N = vectors[g].size(1), V = vectors[g].size(2);
      const scalar_t* vec = vectors[g].data_ptr<scalar_t>();
      const int64_t sb = vectors[g].stride(0), sn = vectors[g].stride(1), ss = vectors[g].stride(2);
      const bool* mask = masks[g].data_ptr<bool>();
      for (int64_t i = 0; i < B * N; ++i) {
        scalar_t lo[2] = {std::numeric_limits<scalar_t>::infinity(), std::numeric_limits<scalar_t>::infinity()};
        bool has = false;
        for (int64_t s = 0; s < V; ++s) {
          if (!mask[i * V + s]) continue;
          has = true;
          for (int d = 0; d < 2; ++d) {
            const scalar_t x = vec[(i / N) * sb + (i % N) * sn + s * ss + d];
            if (lo[d] == lo[d] && !(x >= lo[d])) lo[d] = x;  // x below the minimum, or NaN (then kept)
          }
        }
        scalar_t* o = out + ((i / N) * total + first + i % N) * 2;
        o[0] = has ? lo[0] : scalar_t(0);
        o[1] = has ? lo[1] : scalar_t(0);
      }
      first += N;
    }
  });
  return ids;
}

// VectorNet's paper global graph, softmax(Q K^T) V over each scene's polylines with the padded ones masked as
// keys, a scene at a time (its [N, N] scores stay in cache): qkv [B, N, 3d] (Q, K, V side by side), mask [B, N]
// bool. Returns (out [B, N, d], weights [B, N, N]); a scene without a real polyline attends to nothing (0).
std::vector<torch::Tensor> attention_forward(torch::Tensor qkv, torch::Tensor mask) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 3 && qkv.is_contiguous() && qkv.size(2) % 3 == 0,
              "qkv must be a contiguous [B, N, 3d] CPU tensor");
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.dim() == 2 && mask.size(0) == qkv.size(0) &&
                  mask.size(1) == qkv.size(1),
              "mask must be a contiguous bool [B, N] tensor");
  const int64_t B = qkv.size(0), N = qkv.size(1), d = qkv.size(2) / 3;
  auto out = torch::empty({B, N, d}, qkv.options());
  auto weights = torch::empty({B, N, N}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "polyline_attention_forward", [&] {
    const scalar_t* x = qkv.data_ptr<scalar_t>();
    const bool* real = mask.data_ptr<bool>();
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* w = weights.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> keys_t(d * N);  // K^T [d, N]
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* q = x + b * N * 3 * d;
        const bool* m = real + b * N;
        scalar_t* p = w + b * N * N;
        for (int64_t j = 0; j < N; ++j)
          for (int64_t c = 0; c < d; ++c) keys_t[c * N + j] = q[j * 3 * d + d + c];
        matmul<scalar_t>(N, q, 3 * d, 1, d, keys_t.data(), N, N, p, N, false);  // Q K^T
        const bool any = std::find(m, m + N, true) != m + N;
        for (int64_t i = 0; i < N; ++i) {  // the masked softmax of each row (PyTorch's: max subtracted, then exp)
          scalar_t* row = p + i * N;
          if (!any) { std::fill(row, row + N, scalar_t(0)); continue; }
          scalar_t top = -std::numeric_limits<scalar_t>::infinity();
          for (int64_t j = 0; j < N; ++j) {
            row[j] = m[j] ? row[j] : -std::numeric_limits<scalar_t>::infinity();
            if (top == top && !(row[j] <= top)) top = row[j];  // NaN kept
          }
          using Vec = at::vec::Vectorized<scalar_t>;  // ATen's SIMD exp (Sleef's, as PyTorch's own kernels)
          at::vec::map([top](Vec v) { return (v - Vec(top)).exp(); }, row, row, N);
          scalar_t sum = 0;
          for (int64_t j = 0; j < N; ++j) sum += row[j];
          for (int64_t j = 0; j < N; ++j) row[j] /= sum;
        }
        matmul<scalar_t>(N, p, N, 1, N, q + 2 * d, 3 * d, d, o + b * N * d, d, false);  // weights V
      }
    });
  });
  return {out, weights};
}

// Its backward: grad_out [B, N, d] -> grad_qkv [B, N, 3d].
torch::Tensor attention_backward(torch::Tensor grad_out, torch::Tensor qkv, torch::Tensor weights) {
  TORCH_CHECK(grad_out.is_contiguous() && qkv.is_contiguous() && weights.is_contiguous() && qkv.dim() == 3 &&
                  grad_out.size(0) == qkv.size(0) && grad_out.size(1) == qkv.size(1) && 3 * grad_out.size(2) == qkv.size(2) &&
                  weights.size(0) == qkv.size(0) && weights.size(1) == qkv.size(1) && weights.size(2) == qkv.size(1),
              "grad_out [B, N, d], qkv [B, N, 3d] and weights [B, N, N] must be contiguous");
  const int64_t B = qkv.size(0), N = qkv.size(1), d = grad_out.size(2);
  auto grad_qkv = torch::empty_like(qkv);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "polyline_attention_backward", [&] {
    const scalar_t* x = qkv.data_ptr<scalar_t>();
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    scalar_t* gx = grad_qkv.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> values_t(d * N), grad_scores(N * N);  // V^T [d, N]; dP, then dS [N, N]
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* q = x + b * N * 3 * d;
        const scalar_t* g = go + b * N * d;
        const scalar_t* p = w + b * N * N;
        scalar_t* gq = gx + b * N * 3 * d;
        for (int64_t j = 0; j < N; ++j)
          for (int64_t c = 0; c < d; ++c) values_t[c * N + j] = q[j * 3 * d + 2 * d + c];
        matmul<scalar_t>(N, p, 1, N, N, g, d, d, gq + 2 * d, 3 * d, false);  // dV = P^T dO
        matmul<scalar_t>(N, g, d, 1, d, values_t.data(), N, N, grad_scores.data(), N, false);  // dP = dO V^T
        for (int64_t i = 0; i < N; ++i) {  // softmax's backward: dS = P (dP - sum(P dP))
          scalar_t* ds = grad_scores.data() + i * N;
          const scalar_t* pi = p + i * N;
          scalar_t dot = 0;
          for (int64_t j = 0; j < N; ++j) dot += pi[j] * ds[j];
          for (int64_t j = 0; j < N; ++j) ds[j] = pi[j] * (ds[j] - dot);
        }
        matmul<scalar_t>(N, grad_scores.data(), N, 1, N, q + d, 3 * d, d, gq, 3 * d, false);  // dQ = dS K
        matmul<scalar_t>(N, grad_scores.data(), 1, N, N, q, 3 * d, d, gq + d, 3 * d, false);  // dK = dS^T Q
      }
    });
  });
  return grad_qkv;
}

// The subgraph's polyline features from its last max-pool, pooled [P, D] and real [P] (bool): F.normalize([p, p])
// (p / max(sqrt(2) |p|, eps), twice side by side) for a real polyline, 0 for the others: out [P, 2D].
torch::Tensor features_forward(torch::Tensor pooled, torch::Tensor real, double eps) {
  TORCH_CHECK(pooled.device().is_cpu() && pooled.dim() == 2 && pooled.is_contiguous() && real.scalar_type() == torch::kBool &&
                  real.is_contiguous() && real.numel() == pooled.size(0),
              "pooled must be a contiguous [P, D] CPU tensor, real a contiguous bool [P]");
  const int64_t P = pooled.size(0), D = pooled.size(1);
  auto out = torch::empty({P, 2 * D}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "polyline_features_forward", [&] {
    const scalar_t* x = pooled.data_ptr<scalar_t>();
    const bool* r = real.data_ptr<bool>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t p = 0; p < P; ++p) {
      scalar_t* row = o + p * 2 * D;
      if (!r[p]) { std::fill(row, row + 2 * D, scalar_t(0)); continue; }
      const scalar_t* v = x + p * D;
      scalar_t squares = 0;
      for (int64_t c = 0; c < D; ++c) squares += v[c] * v[c];
      const scalar_t norm = std::max(std::sqrt(2 * squares), static_cast<scalar_t>(eps));
      for (int64_t c = 0; c < D; ++c) row[c] = row[D + c] = v[c] / norm;
    }
  });
  return out;
}

// Its backward: grad [P, 2D] -> grad_pooled [P, D] (0 for the polylines not real; below eps the norm is the
// constant eps, as clamp_min's gradient).
torch::Tensor features_backward(torch::Tensor grad, torch::Tensor pooled, torch::Tensor real, double eps) {
  TORCH_CHECK(grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == pooled.size(0) && grad.size(1) == 2 * pooled.size(1),
              "grad must be a contiguous [P, 2D] tensor");
  const int64_t P = pooled.size(0), D = pooled.size(1);
  auto grad_pooled = torch::empty_like(pooled);
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "polyline_features_backward", [&] {
    const scalar_t* x = pooled.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const bool* r = real.data_ptr<bool>();
    scalar_t* gx = grad_pooled.data_ptr<scalar_t>();
    for (int64_t p = 0; p < P; ++p) {
      scalar_t* out = gx + p * D;
      if (!r[p]) { std::fill(out, out + D, scalar_t(0)); continue; }
      const scalar_t* v = x + p * D;
      const scalar_t* gp = g + p * 2 * D;
      scalar_t squares = 0, dot = 0;
      for (int64_t c = 0; c < D; ++c) { squares += v[c] * v[c]; dot += (gp[c] + gp[D + c]) * v[c]; }
      const scalar_t norm = std::sqrt(2 * squares);
      if (!(norm <= static_cast<scalar_t>(eps))) {  // d/dv of [v, v] / |[v, v]| (NaN passes, as PyTorch's)
        for (int64_t c = 0; c < D; ++c) out[c] = (gp[c] + gp[D + c]) / norm - v[c] * (2 * dot / (norm * norm * norm));
      } else {
        for (int64_t c = 0; c < D; ++c) out[c] = (gp[c] + gp[D + c]) / static_cast<scalar_t>(eps);
      }
    }
  });
  return grad_pooled;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "matmul -> (per-polyline row added) -> LayerNorm -> ReLU -> max-pool per polyline");
  m.def("backward", &backward, "its backward");
  m.def("polyline_rows", &polyline_rows, "the subgraph's rows, the polylines' ranges and which are real");
  m.def("polyline_identifiers", &polyline_identifiers, "each polyline's minimum start coordinates");
  m.def("attention_forward", &attention_forward, "the paper global graph's masked softmax(Q K^T) V, scene by scene");
  m.def("attention_backward", &attention_backward, "its backward");
  m.def("features_forward", &features_forward, "the polyline features: normalize([max, max]), 0 where not real");
  m.def("features_backward", &features_backward, "its backward");
}
