// The PyTorch layers' compiled CPU code (built on first use by compiled.py):
//
// - forward_features / backward_features: the per-feature algebra of a training step
//   (specification sections 3 and 4) and the running-state update, one loop in place of
//   some twenty small tensor operations (train_step's parts, exported so that the tests
//   hold them to functional.py's tensor operations);
// - train_step: the whole eager step of one group as a C++ autograd function, whose
//   fixed cost per call is close to batch norm's own (a Python autograd.Function costs
//   more than the step itself on a critic's small batches, and 5% of a large one);
// - clip_forward / clip_sums / clip_dx: output_clip's elementwise passes, fused;
// - batch_stats: float32 and 16-bit batch statistics in one pass, NCHW or features
//   innermost.
//
// Arithmetic in double, results rounded once to the tensors' type; functional.py holds
// the same algebra in tensor operations (_tensor_features, _backward_features,
// _moved_state), and the tests hold the two to each other and to the reference.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kForwardRows = 7;   // inv_std, r, d, scale, shift, k, offset
constexpr int64_t kBackwardRows = 3;  // x_scale, dx_shift, dweight

double clamp(double value, double low, double high) {  // NaN kept, as torch.clamp
  if (value < low) value = low;
  if (value > high) value = high;
  return value;
}

double lerp(double start, double end, double weight) {  // torch.lerp's formula
  return std::fabs(weight) < 0.5 ? start + weight * (end - start)
                                 : end - (end - start) * (1.0 - weight);
}

template <typename T>
const T* data_or_null(const std::optional<Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr<T>() : nullptr;
}

struct Limits {
  double eps, r_min, r_max, d_max, momentum, shift_above;
};

// From the batch statistics (of x minus `origin`, if given): false, with nothing
// written, when no origin is given and some feature's |mean| exceeds `shift_above`
// stds (> 0); else the rows of `out`, the running statistics moved toward the batch's
// where finite (flags in `finite`), the step advanced, and true.
template <typename T>
bool forward_loop(int64_t n, const T* mean, const T* var, const T* origin, T* run_mean,
                  T* run_std, const T* weight, const T* bias, T* out, bool* finite,
                  int64_t* step, const Limits& l) {
  if (l.shift_above > 0 && origin == nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      double m = mean[j], v = var[j] + l.eps;
      if (m * m > l.shift_above * l.shift_above * v) return false;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    double shifted_mean = mean[j], at = origin ? origin[j] : 0.0;
    double std = std::sqrt(static_cast<double>(var[j]) + l.eps), inv_std = 1.0 / std;
    double old_mean = run_mean[j], old_std = run_std[j];
    double r = clamp(std / old_std, l.r_min, l.r_max);
    double d = clamp((shifted_mean - (old_mean - at)) / old_std, -l.d_max, l.d_max);
    double w = weight ? weight[j] : 1.0, b = bias ? bias[j] : 0.0;
    double scale = w * r, shift = w * d + b, k = scale * inv_std;
    T* row = out + j;
    row[0] = static_cast<T>(inv_std);
    row[n] = static_cast<T>(r);
    row[2 * n] = static_cast<T>(d);
    row[3 * n] = static_cast<T>(scale);
    row[4 * n] = static_cast<T>(shift);
    row[5 * n] = static_cast<T>(k);
    row[6 * n] = static_cast<T>(shift - shifted_mean * k);
    bool ok = std < INFINITY;  // NaN: false
    if (ok) {
      run_mean[j] = static_cast<T>(lerp(old_mean, static_cast<T>(shifted_mean + at),
                                        l.momentum));
      run_std[j] = static_cast<T>(lerp(old_std, static_cast<T>(std), l.momentum));
    }
    if (finite) finite[j] = ok;
  }
  *step += 1;
  return true;
}

// dx = g * k + x * x_scale + dx_shift (specification section 4) and
// dweight = sum(g * (x_hat * r + d)), from the sums of g * x_hat and g.
template <typename T>
void backward_loop(int64_t n, const T* sum_g_xhat, const T* sum_g, const T* inv_std,
                   const T* k, const T* mean, const T* r, const T* d, double count, T* out) {
  for (int64_t j = 0; j < n; ++j) {
    double x_scale = -static_cast<double>(k[j]) * inv_std[j] * sum_g_xhat[j] / count;
    out[j] = static_cast<T>(x_scale);
    out[n + j] = static_cast<T>(-static_cast<double>(k[j]) * sum_g[j] / count -
                                mean[j] * x_scale);
    out[2 * n + j] = static_cast<T>(static_cast<double>(sum_g_xhat[j]) * r[j] +
                                    static_cast<double>(d[j]) * sum_g[j]);
  }
}

void bump_versions(const Tensor& run_mean, const Tensor& run_std, const Tensor& step) {
  for (const Tensor& written : {run_mean, run_std, step}) {
    torch::autograd::impl::bump_version(written);  // as an in-place op would
  }
}

std::optional<Tensor> forward_rows(const Tensor& mean, const Tensor& var,
                                   const std::optional<Tensor>& origin, Tensor run_mean,
                                   Tensor run_std, const std::optional<Tensor>& weight,
                                   const std::optional<Tensor>& bias,
                                   const std::optional<Tensor>& finite, Tensor step,
                                   const Limits& limits) {
  for (const auto& array : {std::optional<Tensor>(mean), std::optional<Tensor>(var), origin,
                            std::optional<Tensor>(run_mean), std::optional<Tensor>(run_std),
                            weight, bias, finite}) {
    TORCH_CHECK(!array.has_value() || array->is_contiguous(),
                "portable_brn: per-feature arrays must be contiguous");
  }
  int64_t n = mean.size(0);
  Tensor out = at::empty({kForwardRows, n}, mean.options());
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "forward_features", [&] {
    done = forward_loop<scalar_t>(
        n, mean.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(), data_or_null<scalar_t>(origin),
        run_mean.data_ptr<scalar_t>(), run_std.data_ptr<scalar_t>(),
        data_or_null<scalar_t>(weight), data_or_null<scalar_t>(bias), out.data_ptr<scalar_t>(),
        finite.has_value() ? finite->data_ptr<bool>() : nullptr, step.data_ptr<int64_t>(),
        limits);
  });
  if (!done) return std::nullopt;
  bump_versions(run_mean, run_std, step);
  return out;
}

// The forward rows (7, C) with the state moved, or None (nothing moved) when x must be
// shifted first.
std::optional<Tensor> forward_features(Tensor mean, Tensor var, std::optional<Tensor> origin,
                                       Tensor run_mean, Tensor run_std,
                                       std::optional<Tensor> weight, std::optional<Tensor> bias,
                                       std::optional<Tensor> finite, Tensor step, double eps,
                                       double r_min, double r_max, double d_max,
                                       double momentum, double shift_above) {
  return forward_rows(mean, var, origin, run_mean, run_std, weight, bias, finite, step,
                      {eps, r_min, r_max, d_max, momentum, shift_above});
}

// The backward rows (3, C): x_scale, dx_shift, dweight.
Tensor backward_features(Tensor sum_g_xhat, Tensor sum_g, Tensor inv_std, Tensor k,
                         Tensor mean, Tensor r, Tensor d, double count) {
  int64_t n = mean.size(0);
  Tensor out = at::empty({kBackwardRows, n}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "backward_features", [&] {
    backward_loop<scalar_t>(n, sum_g_xhat.data_ptr<scalar_t>(), sum_g.data_ptr<scalar_t>(),
                            inv_std.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                            mean.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                            d.data_ptr<scalar_t>(), count, out.data_ptr<scalar_t>());
  });
  return out;
}

// -- output_clip: the transform, clip and affine in one pass; the backward's sums in one
// pass and dx in another (batch norm's kernels would take three passes and the clip's
// mask two more).  x (N, C, ...) is contiguous with features innermost ((N, C) rows,
// channels-last) or outermost after the batch (NCHW); groups micro-batches along dim 0.

struct Layout {
  int64_t batch, channels, inner, micro;  // inner: values per (sample, feature)
  bool innermost;
};

Layout layout_of(const Tensor& x, int64_t groups) {
  int64_t batch = x.size(0), channels = x.size(1);
  int64_t inner = batch * channels ? x.numel() / (batch * channels) : 0;
  bool innermost = x.dim() == 2 || (inner > 1 && x.stride(1) == 1);
  std::vector<int64_t> features_last{0};
  for (int64_t d = 2; d < x.dim(); ++d) features_last.push_back(d);
  features_last.push_back(1);
  TORCH_CHECK(innermost ? x.permute(features_last).is_contiguous() : x.is_contiguous(),
              "portable_brn: x must be contiguous, features innermost or NCHW");
  return {batch, channels, inner, batch / groups, innermost};
}

template <typename T>
inline T clip_to(T value, T low, T high) {  // NaN kept, as torch.clamp
  return value < low ? low : (value > high ? high : value);
}

template <typename T>
inline T passes(T z, T low, T high) {  // 1 where the clip passes the gradient, branch-free
  return static_cast<T>((z >= low) & (z <= high));
}

// The loops over one run of values: a row of features (per-feature parameters) or a
// plane of one feature (scalar parameters); restrict-qualified so that they vectorize.
template <typename X, typename T>
void forward_row(int64_t n, const X* __restrict__ x, const T* __restrict__ k,
                 const T* __restrict__ offset, const T* __restrict__ weight,
                 const T* __restrict__ bias, T low, T high, X* __restrict__ y,
                 T* __restrict__ z) {
  for (int64_t c = 0; c < n; ++c) {
    T zc = static_cast<T>(x[c]) * k[c] + offset[c];
    z[c] = zc;
    y[c] = static_cast<X>(weight[c] * clip_to(zc, low, high) + bias[c]);
  }
}

template <typename X, typename T>
void forward_plane(int64_t n, const X* __restrict__ x, T k, T offset, T weight, T bias,
                   T low, T high, X* __restrict__ y, T* __restrict__ z) {
  for (int64_t s = 0; s < n; ++s) {
    T zc = static_cast<T>(x[s]) * k + offset;
    z[s] = zc;
    y[s] = static_cast<X>(weight * clip_to(zc, low, high) + bias);
  }
}

template <typename X, typename T>
void sums_row(int64_t n, const X* __restrict__ grad, const T* __restrict__ z,
              const X* __restrict__ x, const T* __restrict__ mean,
              const T* __restrict__ inv_std, T low, T high, T* __restrict__ sum_g,
              T* __restrict__ sum_g_clipped, T* __restrict__ sum_passed,
              T* __restrict__ sum_passed_xhat) {
  for (int64_t c = 0; c < n; ++c) {
    T g = static_cast<T>(grad[c]), zc = z[c], passed = g * passes(zc, low, high);
    sum_g[c] += g;
    sum_g_clipped[c] += g * clip_to(zc, low, high);
    sum_passed[c] += passed;
    sum_passed_xhat[c] += passed * ((static_cast<T>(x[c]) - mean[c]) * inv_std[c]);
  }
}

template <typename X, typename T>
void sums_plane(int64_t n, const X* __restrict__ grad, const T* __restrict__ z,
                const X* __restrict__ x, T mean, T inv_std, T low, T high, double* totals) {
  T sum_g = 0, sum_g_clipped = 0, sum_passed = 0, sum_passed_xhat = 0;
#pragma omp simd reduction(+ : sum_g, sum_g_clipped, sum_passed, sum_passed_xhat)
  for (int64_t s = 0; s < n; ++s) {
    T g = static_cast<T>(grad[s]), zc = z[s], passed = g * passes(zc, low, high);
    sum_g += g;
    sum_g_clipped += g * clip_to(zc, low, high);
    sum_passed += passed;
    sum_passed_xhat += passed * ((static_cast<T>(x[s]) - mean) * inv_std);
  }
  totals[0] += sum_g;
  totals[1] += sum_g_clipped;
  totals[2] += sum_passed;
  totals[3] += sum_passed_xhat;
}

template <typename X, typename T>
void dx_row(int64_t n, const X* __restrict__ grad, const T* __restrict__ z,
            const X* __restrict__ x, const T* __restrict__ k, const T* __restrict__ x_scale,
            const T* __restrict__ dx_shift, T low, T high, X* __restrict__ dx) {
  for (int64_t c = 0; c < n; ++c) {
    T g = static_cast<T>(grad[c]) * passes(z[c], low, high);
    dx[c] = static_cast<X>(g * k[c] + static_cast<T>(x[c]) * x_scale[c] + dx_shift[c]);
  }
}

template <typename X, typename T>
void dx_plane(int64_t n, const X* __restrict__ grad, const T* __restrict__ z,
              const X* __restrict__ x, T k, T x_scale, T dx_shift, T low, T high,
              X* __restrict__ dx) {
  for (int64_t s = 0; s < n; ++s) {
    T g = static_cast<T>(grad[s]) * passes(z[s], low, high);
    dx[s] = static_cast<X>(g * k + static_cast<T>(x[s]) * x_scale + dx_shift);
  }
}

// Calls row(at, group) for each row of features (features innermost) or
// plane(at, group, channel) for each plane of one feature (NCHW), at its offset in x;
// the samples split between torch's threads.
template <typename Row, typename Plane>
void for_each_run(const Layout& l, Row row, Plane plane) {
  const int64_t channels = l.channels, inner = l.inner, micro = l.micro;
  const bool innermost = l.innermost;
  at::parallel_for(0, l.batch, 1, [=](int64_t begin, int64_t end) {
    for (int64_t sample = begin; sample < end; ++sample) {
      int64_t group = sample / micro;
      if (innermost) {
        for (int64_t s = 0; s < inner; ++s) row((sample * inner + s) * channels, group);
      } else {
        for (int64_t c = 0; c < channels; ++c) plane((sample * channels + c) * inner, group, c);
      }
    }
  });
}

// y = weight * clip(z) + bias with z = x * k + offset, per (group, feature).
template <typename X, typename T>
void clip_forward_kernel(const Layout& l, const X* x, const T* k, const T* offset,
                         const T* weight, const T* bias, T low, T high, X* y, T* z) {
  const int64_t channels = l.channels, inner = l.inner;
  for_each_run(
      l,
      [=](int64_t at, int64_t group) {
        forward_row(channels, x + at, k + group * channels, offset + group * channels, weight,
                    bias, low, high, y + at, z + at);
      },
      [=](int64_t at, int64_t group, int64_t c) {
        int64_t cell = group * channels + c;
        forward_plane(inner, x + at, k[cell], offset[cell], weight[c], bias[c], low, high,
                      y + at, z + at);
      });
}

// Per (group, feature): sum g, sum g * clip(z), and over the elements the clip passes
// (low <= z <= high) sum g and sum g * x_hat; in the values' type within a plane or a
// block of rows, in double across them.
template <typename X, typename T>
void clip_sums_kernel(const Layout& l, const X* grad, const T* z, const X* x,
                      const T* mean, const T* inv_std, T low, T high, int64_t groups,
                      double* sums) {
  const int64_t cells = groups * l.channels, channels = l.channels, inner = l.inner;
  const int64_t micro = l.micro;
  if (!l.innermost) {  // a thread per (group, feature): contiguous planes
    at::parallel_for(0, cells, 1, [=](int64_t begin, int64_t end) {
      for (int64_t cell = begin; cell < end; ++cell) {
        int64_t group = cell / channels, channel = cell % channels;
        double totals[4] = {0, 0, 0, 0};
        for (int64_t sample = group * micro; sample < (group + 1) * micro; ++sample) {
          int64_t at = (sample * channels + channel) * inner;
          sums_plane(inner, grad + at, z + at, x + at, mean[cell], inv_std[cell], low, high,
                     totals);
        }
        for (int q = 0; q < 4; ++q) sums[q * cells + cell] = totals[q];
      }
    });
    return;
  }
  // features innermost: threads take blocks of rows, each with its own (4, C) sums
  std::fill(sums, sums + 4 * cells, 0.0);
  constexpr int64_t kBlock = 64;
  for (int64_t group = 0; group < groups; ++group) {
    const int64_t first = group * micro * inner, rows = micro * inner;
    const T* m = mean + group * channels;
    const T* inv = inv_std + group * channels;
    std::mutex merge;
    at::parallel_for(0, (rows + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> local(4 * channels, 0.0);
      std::vector<T> part(4 * channels);
      for (int64_t block = begin; block < end; ++block) {
        std::fill(part.begin(), part.end(), T(0));
        T* p = part.data();
        int64_t last = std::min(first + rows, first + (block + 1) * kBlock);
        for (int64_t row = first + block * kBlock; row < last; ++row) {
          int64_t at = row * channels;
          sums_row(channels, grad + at, z + at, x + at, m, inv, low, high, p, p + channels,
                   p + 2 * channels, p + 3 * channels);
        }
        for (int64_t q = 0; q < 4 * channels; ++q) local[q] += part[q];
      }
      std::lock_guard<std::mutex> hold(merge);
      for (int64_t q = 0; q < 4; ++q) {
        for (int64_t c = 0; c < channels; ++c) {
          sums[q * cells + group * channels + c] += local[q * channels + c];
        }
      }
    });
  }
}

// dx = g * [low <= z <= high] * k + x * x_scale + dx_shift, per (group, feature).
template <typename X, typename T>
void clip_dx_kernel(const Layout& l, const X* grad, const T* z, const X* x, const T* k,
                    const T* x_scale, const T* dx_shift, T low, T high, X* dx) {
  const int64_t channels = l.channels, inner = l.inner;
  for_each_run(
      l,
      [=](int64_t at, int64_t group) {
        int64_t first = group * channels;
        dx_row(channels, grad + at, z + at, x + at, k + first, x_scale + first,
               dx_shift + first, low, high, dx + at);
      },
      [=](int64_t at, int64_t group, int64_t c) {
        int64_t cell = group * channels + c;
        dx_plane(inner, grad + at, z + at, x + at, k[cell], x_scale[cell], dx_shift[cell], low,
                 high, dx + at);
      });
}

// Sums of (v - shift) and of its squares over n values, in float32.
struct ShiftedSums {
  float sum, squares;
};

template <typename S>
inline float widened(S value) {
  return static_cast<float>(value);
}

#ifdef __AVX2__
// Eight values as float32 lanes: F16C's conversion for float16, a shift for bfloat16
// (GCC vectorizes neither through c10's scalar conversions).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}
inline float lane_sum(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
#endif

template <typename S>
ShiftedSums shifted_sums(const S* __restrict__ v, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0, squares = 0;
#ifdef __AVX2__
  const __m256 k = _mm256_set1_ps(shift);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, q0 = s0, q1 = s0;  // two chains each
  for (; i + 16 <= n; i += 16) {
    __m256 a = _mm256_sub_ps(load8(v + i), k), b = _mm256_sub_ps(load8(v + i + 8), k);
    s0 = _mm256_add_ps(s0, a);
    s1 = _mm256_add_ps(s1, b);
    q0 = _mm256_fmadd_ps(a, a, q0);
    q1 = _mm256_fmadd_ps(b, b, q1);
  }
  sum = lane_sum(_mm256_add_ps(s0, s1));
  squares = lane_sum(_mm256_add_ps(q0, q1));
#endif
#pragma omp simd reduction(+ : sum, squares)
  for (int64_t j = i; j < n; ++j) {
    float e = widened(v[j]) - shift;
    sum += e;
    squares += e * e;
  }
  return {sum, squares};
}

// Count, mean and M2 (sum of squared deviations) of some values of one feature.
struct Moments {
  double count = 0, mean = 0, m2 = 0;

  // Chan et al.'s rule: these values and a run of n more, summed about `shift` in
  // float32 (ShiftedSums), as the moments of both.
  void add(const ShiftedSums& run, int64_t n, float shift) {
    double dn = static_cast<double>(n), sum = run.sum;
    merge({dn, shift + sum / dn, std::max(run.squares - sum * sum / dn, 0.0)});
  }

  void merge(const Moments& other) {
    double total = count + other.count, delta = other.mean - mean;
    if (total == 0) return;
    mean += delta * other.count / total;
    m2 += other.m2 + delta * delta * count * other.count / total;
    count = total;
  }
};

// Per (group, feature) mean and biased variance of NCHW-contiguous x, one pass: runs
// of kRun values summed in float32 about the running mean so far (no cancellation at
// any offset), the runs merged in double (Moments).  Five times faster than torch's
// NCHW statistics for float32; for 16-bit inputs as fast or faster.
template <typename S>
void planes_stats_kernel(const Layout& l, const S* x, int64_t groups, double* out) {
  constexpr int64_t kRun = 512;
  const int64_t cells = groups * l.channels, channels = l.channels, inner = l.inner;
  const int64_t micro = l.micro;
  at::parallel_for(0, cells, 1, [=](int64_t begin, int64_t end) {
    for (int64_t cell = begin; cell < end; ++cell) {
      int64_t group = cell / channels, channel = cell % channels;
      Moments moments;
      float shift = inner ? widened(x[(group * micro * channels + channel) * inner]) : 0.f;
      for (int64_t sample = group * micro; sample < (group + 1) * micro; ++sample) {
        const S* plane = x + (sample * channels + channel) * inner;
        for (int64_t at = 0; at < inner; at += kRun) {
          int64_t n = std::min(kRun, inner - at);
          moments.add(shifted_sums(plane + at, n, shift), n, shift);
          shift = static_cast<float>(moments.mean);
        }
      }
      out[cell] = moments.mean;
      out[cells + cell] = moments.m2 / moments.count;
    }
  });
}

// sum[c] += e and squares[c] += e * e for e = row[c] - shift[c], c < n.
template <typename S>
inline void add_row(const S* __restrict__ row, const float* __restrict__ shift,
                    float* __restrict__ sum, float* __restrict__ squares, int64_t n) {
  int64_t c = 0;
#ifdef __AVX2__
  for (; c + 8 <= n; c += 8) {
    __m256 e = _mm256_sub_ps(load8(row + c), _mm256_loadu_ps(shift + c));
    _mm256_storeu_ps(sum + c, _mm256_add_ps(_mm256_loadu_ps(sum + c), e));
    _mm256_storeu_ps(squares + c, _mm256_fmadd_ps(e, e, _mm256_loadu_ps(squares + c)));
  }
#endif
  for (; c < n; ++c) {
    float e = widened(row[c]) - shift[c];
    sum[c] += e;
    squares[c] += e * e;
  }
}

// The same for x with features innermost (channels-last, rows): each chunk of kChunk
// rows of a group in runs of kRun rows, each run summed in float32 about its first row,
// per feature across the vector lanes; the runs and then the chunks merged in double.
template <typename S>
void rows_stats_kernel(const Layout& l, const S* x, int64_t groups, double* out) {
  constexpr int64_t kRun = 128, kChunk = 4096;
  const int64_t channels = l.channels, rows = l.micro * l.inner;  // rows per group
  const int64_t chunks = std::max<int64_t>((rows + kChunk - 1) / kChunk, 1);
  std::vector<Moments> partial(groups * chunks * channels);
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> shift(channels), sum(channels), squares(channels);
    for (int64_t task = begin; task < end; ++task) {
      const S* group_rows = x + (task / chunks) * rows * channels;
      int64_t first = (task % chunks) * kChunk, last = std::min(first + kChunk, rows);
      Moments* moments = partial.data() + task * channels;
      for (int64_t at = first; at < last; at += kRun) {
        int64_t n = std::min(kRun, last - at);
        const S* run = group_rows + at * channels;
        for (int64_t c = 0; c < channels; ++c) {
          shift[c] = widened(run[c]);
          sum[c] = squares[c] = 0;
        }
        for (int64_t r = 0; r < n; ++r) {
          add_row(run + r * channels, shift.data(), sum.data(), squares.data(), channels);
        }
        for (int64_t c = 0; c < channels; ++c) {
          moments[c].add({sum[c], squares[c]}, n, shift[c]);
        }
      }
    }
  });
  const int64_t cells = groups * channels;
  for (int64_t cell = 0; cell < cells; ++cell) {
    int64_t group = cell / channels, channel = cell % channels;
    Moments total;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      total.merge(partial[(group * chunks + chunk) * channels + channel]);
    }
    out[cell] = total.mean;
    out[cells + cell] = total.m2 / total.count;
  }
}

// (2, groups, C) float32: mean and biased variance per (group, feature).
Tensor batch_stats(Tensor x, int64_t groups) {
  Layout l = layout_of(x, groups);
  Tensor out = at::empty({2, groups, l.channels}, x.options().dtype(at::kDouble));
  auto run = [&](const auto* data) {
    if (l.innermost) {
      rows_stats_kernel(l, data, groups, out.data_ptr<double>());
    } else {
      planes_stats_kernel(l, data, groups, out.data_ptr<double>());
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(x.data_ptr<float>()); break;
    case at::kHalf: run(x.data_ptr<c10::Half>()); break;
    case at::kBFloat16: run(x.data_ptr<c10::BFloat16>()); break;
    default: TORCH_CHECK(false, "portable_brn: batch_stats takes float32 or 16-bit x");
  }
  return out.to(at::kFloat);
}

// Batch mean and biased variance of x over every dimension but 1, float32 for 16-bit x:
// batch_stats for float32 and 16-bit images, NCHW or channels-last, else torch's
// statistics kernel (its mixed-type one for 16-bit x, which float32 buffers select).
std::tuple<Tensor, Tensor> moments(const Tensor& x) {
  bool packed = x.is_contiguous() ||
                (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (x.dim() > 2 && packed && x.scalar_type() != at::kDouble) {
    Tensor stats = batch_stats(x, 1);
    return {stats[0][0], stats[1][0]};
  }
  if (!at::isReducedFloatingType(x.scalar_type())) {
    return at::batch_norm_update_stats(x, {}, {}, 0.0);
  }
  Tensor scratch = at::empty({2, x.size(1)}, x.options().dtype(at::kFloat));
  return at::batch_norm_update_stats(x, scratch[0], scratch[1], 0.0);
}

// x's first sample's features, (C,) contiguous: the origin a far-from-zero x is shifted by.
Tensor first_features(const Tensor& x) {
  Tensor origin = x.select(0, 0);
  while (origin.dim() > 1) origin = origin.select(1, 0);
  return origin.clone(at::MemoryFormat::Contiguous);
}

// y (x's dtype) and z = x * k + offset (the parameters' dtype), clip (low, high).
std::vector<Tensor> clip_forward(Tensor x, Tensor k, Tensor offset,
                                 std::optional<Tensor> weight, std::optional<Tensor> bias,
                                 double low, double high, int64_t groups) {
  Layout l = layout_of(x, groups);
  Tensor y = at::empty_like(x), z = at::empty_like(x, k.options());
  Tensor w = weight.has_value() ? *weight : at::ones({l.channels}, k.options());
  Tensor b = bias.has_value() ? *bias : at::zeros({l.channels}, k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "clip_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    clip_forward_kernel<scalar_t, T>(l, x.data_ptr<scalar_t>(), k.data_ptr<T>(),
                                     offset.data_ptr<T>(), w.data_ptr<T>(), b.data_ptr<T>(),
                                     static_cast<T>(low),
                                     static_cast<T>(high), y.data_ptr<scalar_t>(),
                                     z.data_ptr<T>());
  });
  return {y, z};
}

// (4, groups, C) in the parameters' dtype: sum g, sum g * clip(z), sum g and
// sum g * x_hat where the clip passes the gradient.
Tensor clip_sums(Tensor grad, Tensor z, Tensor x, Tensor mean, Tensor inv_std, double low,
                 double high, int64_t groups) {
  Layout l = layout_of(x, groups);
  Tensor sums = at::empty({4, groups, l.channels}, mean.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "clip_sums", [&] {
    using T = at::opmath_type<scalar_t>;
    clip_sums_kernel<scalar_t, T>(l, grad.data_ptr<scalar_t>(), z.data_ptr<T>(),
                                  x.data_ptr<scalar_t>(), mean.data_ptr<T>(),
                                  inv_std.data_ptr<T>(), static_cast<T>(low),
                                  static_cast<T>(high), groups, sums.data_ptr<double>());
  });
  return sums.to(mean.scalar_type());
}

Tensor clip_dx(Tensor grad, Tensor z, Tensor x, Tensor k, Tensor x_scale, Tensor dx_shift,
               double low, double high, int64_t groups) {
  Layout l = layout_of(x, groups);
  Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "clip_dx", [&] {
    using T = at::opmath_type<scalar_t>;
    clip_dx_kernel<scalar_t, T>(l, grad.data_ptr<scalar_t>(), z.data_ptr<T>(),
                                x.data_ptr<scalar_t>(), k.data_ptr<T>(), x_scale.data_ptr<T>(),
                                dx_shift.data_ptr<T>(), static_cast<T>(low),
                                static_cast<T>(high), dx.data_ptr<scalar_t>());
  });
  return dx;
}

// One eager training step of one group, any layout: batch statistics (of x shifted by
// its first sample's features where far from zero), the rows and state update above,
// then y = x * k + offset: one addcmul on float32/float64 (N, C) rows, batch norm's
// inference kernel elsewhere; with `clip` (low, high), the fused clip passes below.  The
// backward takes batch norm's backward (its sums and two addcmul passes on rows), or
// the clip's two passes.  As functional.py's _NativeRenorm, without a Python
// autograd.Function's cost per call.
struct StepRenorm : public torch::autograd::Function<StepRenorm> {
  static bool by_addcmul(const Tensor& x) {
    return x.dim() == 2 && !at::isReducedFloatingType(x.scalar_type());
  }

  static Tensor forward(AutogradContext* ctx, Tensor x, std::optional<Tensor> weight,
                        std::optional<Tensor> bias, Tensor run_mean, Tensor run_std,
                        Tensor step, std::optional<Tensor> finite, double eps, double r_min,
                        double r_max, double d_max, double momentum, double shift_above,
                        std::optional<std::vector<double>> clip) {
    Limits limits{eps, r_min, r_max, d_max, momentum, shift_above};
    auto [mean, var] = moments(x);
    Tensor xs = x;
    auto rows = forward_rows(mean, var, std::nullopt, run_mean, run_std, weight, bias,
                             finite, step, limits);
    if (!rows.has_value()) {  // far from zero: shift; the state has not moved
      Tensor origin = first_features(x);
      std::vector<int64_t> shape(x.dim(), 1);
      shape[1] = x.size(1);
      xs = x - origin.view(shape);
      std::tie(mean, var) = moments(xs);
      limits.shift_above = 0.0;
      rows = forward_rows(mean, var, origin, run_mean, run_std, weight, bias, finite, step,
                          limits);
    }
    if (clip.has_value()) {  // z = x_hat * r + d, clipped, then the affine
      Tensor k_z = at::mul((*rows)[1], (*rows)[0]);
      Tensor offset_z = at::addcmul((*rows)[2], mean, k_z, -1);
      auto y_z = clip_forward(xs, k_z, offset_z, weight, bias, (*clip)[0], (*clip)[1], 1);
      ctx->save_for_backward({xs, mean, *rows, y_z[1]});
      ctx->saved_data["clip"] = *clip;
      return y_z[0];
    }
    ctx->save_for_backward({xs, mean, *rows});
    ctx->saved_data["eps"] = eps;
    if (by_addcmul(x)) return at::addcmul((*rows)[6], xs, (*rows)[5]);
    return at::batch_norm(xs, (*rows)[3], (*rows)[4], mean, var, false, 0.0, eps, false);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::NoGradGuard once_differentiable;  // as the Python paths: dx of dx does not exist
    auto saved = ctx->get_saved_variables();
    const Tensor &xs = saved[0], &mean = saved[1], &rows = saved[2];
    bool need_x = ctx->needs_input_grad(0);
    double count = static_cast<double>(xs.numel() / xs.size(1));
    Tensor dx, dweight, dbias;
    if (saved.size() > 3) {
      std::tie(dx, dweight, dbias) = clip_backward(ctx, grads[0], xs, mean, rows, saved[3],
                                                   count, need_x);
    } else {
      std::tie(dx, dweight, dbias) = plain_backward(ctx, grads[0], xs, mean, rows, count,
                                                    need_x);
    }
    variable_list result(14);
    result[0] = need_x ? dx : Tensor();
    if (ctx->needs_input_grad(1)) result[1] = dweight;
    if (ctx->needs_input_grad(2)) result[2] = dbias;
    return result;
  }

  static std::tuple<Tensor, Tensor, Tensor> plain_backward(
      AutogradContext* ctx, const Tensor& grad, const Tensor& xs, const Tensor& mean,
      const Tensor& rows, double count, bool need_x) {
    bool by_addcmul = StepRenorm::by_addcmul(xs);
    auto [dx, sum_g_xhat, sum_g] = at::native_batch_norm_backward(
        grad, xs, rows[3], {}, {}, mean, rows[0], true, ctx->saved_data["eps"].toDouble(),
        {need_x && !by_addcmul, true, true});
    Tensor out = backward_features(sum_g_xhat, sum_g, rows[0], rows[5], mean, rows[1],
                                   rows[2], count);
    if (need_x && by_addcmul) {
      dx = at::addcmul(out[1], xs, out[0]);
      dx.addcmul_(grad, rows[5]);
    }
    return {dx, out[2], sum_g};
  }

  // dweight = sum(g * clip(z)), dbias = sum(g); dx from the sums where the clip passes g.
  static std::tuple<Tensor, Tensor, Tensor> clip_backward(
      AutogradContext* ctx, Tensor grad, const Tensor& xs, const Tensor& mean,
      const Tensor& rows, const Tensor& z, double count, bool need_x) {
    auto clip = ctx->saved_data["clip"].toDoubleVector();
    if (grad.strides() != xs.strides()) grad = at::empty_like(xs).copy_(grad);
    Tensor sums = clip_sums(grad, z, xs, mean, rows[0], clip[0], clip[1], 1).select(1, 0);
    Tensor dx;
    if (need_x) {
      Tensor out = backward_features(sums[3], sums[2], rows[0], rows[5], mean, rows[1],
                                     rows[2], count);
      dx = clip_dx(grad, z, xs, rows[5], out[0], out[1], clip[0], clip[1], 1);
    }
    return {dx, sums[1], sums[0]};
  }
};

Tensor train_step(Tensor x, std::optional<Tensor> weight, std::optional<Tensor> bias,
                  Tensor run_mean, Tensor run_std, Tensor step, std::optional<Tensor> finite,
                  double eps, double r_min, double r_max, double d_max, double momentum,
                  double shift_above, std::optional<std::vector<double>> clip) {
  return StepRenorm::apply(x, weight, bias, run_mean, run_std, step, finite, eps, r_min,
                           r_max, d_max, momentum, shift_above, clip);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_features", &forward_features);
  m.def("backward_features", &backward_features);
  m.def("train_step", &train_step);
  m.def("clip_forward", &clip_forward);
  m.def("clip_sums", &clip_sums);
  m.def("clip_dx", &clip_dx);
  m.def("batch_stats", &batch_stats);
}
