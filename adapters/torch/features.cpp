// The PyTorch layers' compiled CPU code (built on first use by compiled.py):
//
// - forward_features / backward_features: the per-feature algebra of a training step
//   (specification sections 3 and 4) and the running-state update, one loop in place of
//   some twenty small tensor operations, for the steps functional.py drives;
// - train_rows: the whole eager step on (N, C) rows as a C++ autograd function, whose
//   fixed cost per call is close to batch norm's own (a Python autograd.Function costs
//   more than the step itself on a critic's small batches).
//
// Arithmetic in double, results rounded once to the tensors' type; functional.py holds
// the same algebra in tensor operations (_tensor_features, _backward_features,
// _moved_state), and the tests hold the two to each other and to the reference.
#include <torch/extension.h>

#include <cmath>
#include <optional>

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

// One eager training step on float32/float64 (N, C) rows: batch statistics (of x shifted
// by its first row where far from zero), the rows and state update above, then
// y = x * k + offset; the backward takes batch norm's sums and two addcmul passes.
struct RowsRenorm : public torch::autograd::Function<RowsRenorm> {
  static Tensor forward(AutogradContext* ctx, Tensor x, std::optional<Tensor> weight,
                        std::optional<Tensor> bias, Tensor run_mean, Tensor run_std,
                        Tensor step, std::optional<Tensor> finite, double eps, double r_min,
                        double r_max, double d_max, double momentum, double shift_above) {
    Limits limits{eps, r_min, r_max, d_max, momentum, shift_above};
    auto [mean, var] = at::batch_norm_update_stats(x, {}, {}, 0.0);
    Tensor xs = x;
    auto rows = forward_rows(mean, var, std::nullopt, run_mean, run_std, weight, bias,
                             finite, step, limits);
    if (!rows.has_value()) {  // far from zero: shift; the state has not moved
      Tensor origin = x.select(0, 0).clone();
      xs = x - origin;
      std::tie(mean, var) = at::batch_norm_update_stats(xs, {}, {}, 0.0);
      limits.shift_above = 0.0;
      rows = forward_rows(mean, var, origin, run_mean, run_std, weight, bias, finite, step,
                          limits);
    }
    ctx->save_for_backward({xs, mean, *rows});
    ctx->saved_data["eps"] = eps;
    return at::addcmul((*rows)[6], xs, (*rows)[5]);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &xs = saved[0], &mean = saved[1], &rows = saved[2], &grad = grads[0];
    auto [unused, sum_g_xhat, sum_g] = at::native_batch_norm_backward(
        grad, xs, {}, {}, {}, mean, rows[0], true, ctx->saved_data["eps"].toDouble(),
        {false, true, true});
    Tensor out = backward_features(sum_g_xhat, sum_g, rows[0], rows[5], mean, rows[1],
                                   rows[2], static_cast<double>(xs.size(0)));
    Tensor dx;
    if (ctx->needs_input_grad(0)) {
      dx = at::addcmul(out[1], xs, out[0]);
      dx.addcmul_(grad, rows[5]);
    }
    variable_list result(13);
    result[0] = dx;
    if (ctx->needs_input_grad(1)) result[1] = out[2];
    if (ctx->needs_input_grad(2)) result[2] = sum_g;
    return result;
  }
};

Tensor train_rows(Tensor x, std::optional<Tensor> weight, std::optional<Tensor> bias,
                  Tensor run_mean, Tensor run_std, Tensor step, std::optional<Tensor> finite,
                  double eps, double r_min, double r_max, double d_max, double momentum,
                  double shift_above) {
  return RowsRenorm::apply(x, weight, bias, run_mean, run_std, step, finite, eps, r_min,
                           r_max, d_max, momentum, shift_above);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_features", &forward_features);
  m.def("backward_features", &backward_features);
  m.def("train_rows", &train_rows);
}
