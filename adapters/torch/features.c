/* The per-feature algebra of a batch renorm training step (specification sections 3 and 4)
 * for the PyTorch layers' CPU path: one call in place of some twenty small tensor
 * operations, whose dispatch cost dominates a step on small batches.  Compiled on first
 * use by portable_brn/adapters/torch/compiled.py; arithmetic in double, results rounded
 * once to the arrays' type. */
#include <math.h>
#include <stddef.h>

static double clamp(double value, double low, double high) {
    /* min(max(value, low), high), NaN kept, as torch.clamp */
    if (value < low) value = low;
    if (value > high) value = high;
    return value;
}

static double lerp(double start, double end, double weight) {
    /* torch.lerp's formula, so the state moves as the tensor path moves it */
    return fabs(weight) < 0.5 ? start + weight * (end - start)
                              : end - (end - start) * (1.0 - weight);
}

/* Forward: from the batch statistics (of x minus `origin`, NULL for none) returns 1
 * without writing anything when `shift_above` > 0, no origin is given and some feature's
 * |mean| exceeds `shift_above` times its std (the caller then shifts x and calls again);
 * otherwise writes the rows of `out` (inv_std, r, d, scale = weight * r,
 * shift = weight * d + bias, k = scale * inv_std, offset = shift - mean * k), moves the
 * running statistics toward the batch's where they are finite (flags in `finite`, NULL
 * for none), advances `step` and returns 0. */
#define FORWARD(NAME, T)                                                                   \
    int NAME(long n, const T *mean, const T *var, const T *origin, T *run_mean,            \
             T *run_std, const T *weight, const T *bias, T *out, unsigned char *finite,    \
             long long *step, double eps, double r_min, double r_max, double d_max,        \
             double momentum, double shift_above) {                                        \
        if (shift_above > 0 && origin == NULL) {                                           \
            for (long j = 0; j < n; ++j) {                                                 \
                double m = mean[j], v = var[j] + eps;                                      \
                if (m * m > shift_above * shift_above * v) return 1;                       \
            }                                                                              \
        }                                                                                  \
        for (long j = 0; j < n; ++j) {                                                     \
            double shifted_mean = mean[j], at = origin ? origin[j] : 0.0;                  \
            double std = sqrt((double)var[j] + eps), inv_std = 1.0 / std;                  \
            double old_mean = run_mean[j], old_std = run_std[j];                           \
            double r = clamp(std / old_std, r_min, r_max);                                 \
            double d = clamp((shifted_mean - (old_mean - at)) / old_std, -d_max, d_max);   \
            double w = weight ? weight[j] : 1.0, b = bias ? bias[j] : 0.0;                 \
            double scale = w * r, shift = w * d + b, k = scale * inv_std;                  \
            T *row = out + j;                                                              \
            row[0] = (T)inv_std;                                                           \
            row[n] = (T)r;                                                                 \
            row[2 * n] = (T)d;                                                             \
            row[3 * n] = (T)scale;                                                         \
            row[4 * n] = (T)shift;                                                         \
            row[5 * n] = (T)k;                                                             \
            row[6 * n] = (T)(shift - shifted_mean * k);                                    \
            int ok = std < INFINITY;                                                       \
            if (ok) {                                                                      \
                run_mean[j] = (T)lerp(old_mean, (T)(shifted_mean + at), momentum);         \
                run_std[j] = (T)lerp(old_std, (T)std, momentum);                           \
            }                                                                              \
            if (finite) finite[j] = (unsigned char)ok;                                     \
        }                                                                                  \
        *step += 1;                                                                        \
        return 0;                                                                          \
    }

/* Backward: from the sums of g * x_hat and g writes the rows of `out`: x_scale and
 * dx_shift, with dx = g * k + x * x_scale + dx_shift (specification section 4), and
 * dweight = sum(g * (x_hat * r + d)). */
#define BACKWARD(NAME, T)                                                                  \
    void NAME(long n, const T *sum_g_xhat, const T *sum_g, const T *inv_std, const T *k,   \
              const T *mean, const T *r, const T *d, double count, T *out) {               \
        for (long j = 0; j < n; ++j) {                                                     \
            double x_scale = -(double)k[j] * inv_std[j] * sum_g_xhat[j] / count;           \
            out[j] = (T)x_scale;                                                           \
            out[n + j] = (T)(-(double)k[j] * sum_g[j] / count - mean[j] * x_scale);        \
            out[2 * n + j] = (T)((double)sum_g_xhat[j] * r[j] + (double)d[j] * sum_g[j]);  \
        }                                                                                  \
    }

FORWARD(forward_float, float)
FORWARD(forward_double, double)
BACKWARD(backward_float, float)
BACKWARD(backward_double, double)
