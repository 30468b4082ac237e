/* CPU kernels around graphopt's int8 GEMMs: the passes ATen would need several of, in one sweep each.
 *
 * quantize_rows_u8: per row, m = max |x * smooth| and the uint8 codes of x * smooth / m on a fixed
 *   grid (code = rint(v * half_levels) + zero_point, clamped to [0, 2 * zero_point - 1]), which an
 *   int8 GEMM with the constant activation scale 1 / half_levels then multiplies; m is the per-token
 *   scale the epilogue applies. One read of x, one write of a quarter of its bytes.
 * prescale_rows_f32: the row maxima and the rows divided by them, in fp32 (for fbgemm, which
 *   quantizes on the fixed grid itself).
 * quantize_rows_s8: symmetric int8 codes rint(v * 127 / m), row scale m / 127 (for _int_mm).
 * epilogue_f32: y = act(y * row_scale[r] * col_scale[c] + bias[c]) in place.
 * epilogue_i32: the same from an int32 accumulator into a float output.
 * wo_int8_gemv / wo_int4_gemv: weight-only linears for a few rows (decoding), reading the int8 /
 *   packed int4 weights once and converting them in registers: a quarter / an eighth of fp32's bytes.
 *
 * Every loop is written for the compiler to vectorise (-O3 -march=native, omp simd): no branches
 * inside; optional operands are passed as ones and zeros by the caller; GELU is evaluated with
 * polynomial exp and erf (Cephes' expf, Abramowitz-Stegun 7.1.26 erf, |error| < 2e-7) because the
 * C library's erff and tanhf are scalar calls, 10-20x slower than the whole epilogue otherwise.
 */
#include <math.h>
#include <stdint.h>
#include <stddef.h>

/* below this many elements a row kernel runs on one thread: waking the pool costs more than it saves */
#define PARALLEL_MIN_ELEMENTS (1 << 15)

/* The C library's fmaxf/fminf must honour NaN operands, which keeps GCC from vectorising them; these compile to maxps/minps */
#define MAXF(a, b) ((a) > (b) ? (a) : (b))
#define MINF(a, b) ((a) < (b) ? (a) : (b))

#pragma omp declare simd notinbranch
static inline float exp_poly(float x) {
    x = MINF(MAXF(x, -87.3f), 88.3f);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    float y = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x + 4.1665795894e-2f) * x + 1.6666665459e-1f) * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return y * scale.f;
}

#pragma omp declare simd notinbranch
static inline float gelu_erf(float v) {
    const float z = fabsf(v) * 0.70710678118654752f;
    const float t = 1.f / (1.f + 0.3275911f * z);
    const float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
    const float erf_abs = 1.f - poly * exp_poly(-z * z);
    return 0.5f * v * (1.f + copysignf(erf_abs, v));
}

#pragma omp declare simd notinbranch
static inline float gelu_tanh(float v) { /* 0.5 v (1 + tanh(u)) = v * sigmoid(2u) */
    const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    return v / (1.f + exp_poly(-2.f * u));
}

void quantize_rows_u8(const float *restrict x, const float *restrict smooth, int64_t rows, int64_t cols, float half_levels, int zero_point, uint8_t *restrict q,
                      float *restrict row_scale, int threads) {
    const float top = (float)(2 * zero_point - 1), zp = (float)zero_point;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * cols;
        uint8_t *restrict qr = q + r * cols;
        float m = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t c = 0; c < cols; c++) m = MAXF(m, fabsf(xr[c] * smooth[c]));
        const float inv = m > 0.f ? half_levels / m : 0.f;
        row_scale[r] = m;
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) {
            const float v = MINF(MAXF(rintf(xr[c] * smooth[c] * inv) + zp, 0.f), top);
            qr[c] = (uint8_t)(int32_t)v;
        }
    }
}

void prescale_rows_f32(const float *restrict x, const float *restrict smooth, int64_t rows, int64_t cols, float *restrict out, float *restrict row_max, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * cols;
        float *restrict outr = out + r * cols;
        float m = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t c = 0; c < cols; c++) m = MAXF(m, fabsf(xr[c] * smooth[c]));
        const float inv = m > 0.f ? 1.f / m : 0.f;
        row_max[r] = m;
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) outr[c] = xr[c] * smooth[c] * inv;
    }
}

void quantize_rows_s8(const float *restrict x, const float *restrict smooth, int64_t rows, int64_t cols, int8_t *restrict q, float *restrict row_scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * cols;
        int8_t *restrict qr = q + r * cols;
        float m = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t c = 0; c < cols; c++) m = MAXF(m, fabsf(xr[c] * smooth[c]));
        const float scale = m > 0.f ? m / 127.f : 1.f;
        const float inv = 1.f / scale;
        row_scale[r] = scale;
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) qr[c] = (int8_t)(int32_t)MINF(MAXF(rintf(xr[c] * smooth[c] * inv), -127.f), 127.f);
    }
}

/* The epilogue, one function per activation and input type so that each inner loop is a single
 * branch-free vectorisable loop; epilogue_f32 / epilogue_i32 dispatch on the activation code. */
#define ACT_NONE(v) (v)
#define ACT_RELU(v) MAXF((v), 0.f)
#define ACT_GELU(v) gelu_erf(v)
#define ACT_GELU_TANH(v) gelu_tanh(v)

#define DEFINE_EPILOGUE(NAME, IN_T, ACT)                                                                                               \
    static void NAME(const IN_T *restrict in, float *restrict y, const float *restrict row_scale, const float *restrict col_scale,     \
                     const float *restrict bias, int64_t rows, int64_t cols, int threads) {                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)")                    \
        for (int64_t r = 0; r < rows; r++) {                                                                                         \
            const IN_T *restrict ir = in + r * cols;                                                                                 \
            float *restrict yr = y + r * cols;                                                                                       \
            const float a = row_scale[r];                                                                                            \
            _Pragma("omp simd")                                                                                                      \
            for (int64_t c = 0; c < cols; c++) {                                                                                     \
                const float v = (float)ir[c] * a * col_scale[c] + bias[c];                                                           \
                yr[c] = ACT(v);                                                                                                      \
            }                                                                                                                        \
        }                                                                                                                            \
    }

DEFINE_EPILOGUE(epilogue_f32_none, float, ACT_NONE)
DEFINE_EPILOGUE(epilogue_f32_relu, float, ACT_RELU)
DEFINE_EPILOGUE(epilogue_f32_gelu, float, ACT_GELU)
DEFINE_EPILOGUE(epilogue_f32_gelu_tanh, float, ACT_GELU_TANH)
DEFINE_EPILOGUE(epilogue_i32_none, int32_t, ACT_NONE)
DEFINE_EPILOGUE(epilogue_i32_relu, int32_t, ACT_RELU)
DEFINE_EPILOGUE(epilogue_i32_gelu, int32_t, ACT_GELU)
DEFINE_EPILOGUE(epilogue_i32_gelu_tanh, int32_t, ACT_GELU_TANH)

/* in place: y = act(y * row_scale[r] * col_scale[c] + bias[c]) */
void epilogue_f32(float *y, const float *row_scale, const float *col_scale, const float *bias, int64_t rows, int64_t cols, int activation, int threads) {
    switch (activation) {
    case 1: epilogue_f32_relu(y, y, row_scale, col_scale, bias, rows, cols, threads); break;
    case 2: epilogue_f32_gelu(y, y, row_scale, col_scale, bias, rows, cols, threads); break;
    case 3: epilogue_f32_gelu_tanh(y, y, row_scale, col_scale, bias, rows, cols, threads); break;
    default: epilogue_f32_none(y, y, row_scale, col_scale, bias, rows, cols, threads); break;
    }
}

void epilogue_i32(const int32_t *acc, float *y, const float *row_scale, const float *col_scale, const float *bias, int64_t rows, int64_t cols, int activation, int threads) {
    switch (activation) {
    case 1: epilogue_i32_relu(acc, y, row_scale, col_scale, bias, rows, cols, threads); break;
    case 2: epilogue_i32_gelu(acc, y, row_scale, col_scale, bias, rows, cols, threads); break;
    case 3: epilogue_i32_gelu_tanh(acc, y, row_scale, col_scale, bias, rows, cols, threads); break;
    default: epilogue_i32_none(acc, y, row_scale, col_scale, bias, rows, cols, threads); break;
    }
}

/* y[m, n] = sum_k x[m, k] * q[n, k] * scale[n] + bias[n], rows m < M (a few), columns split over threads. */
void wo_int8_gemv(const float *restrict x, const int8_t *restrict q, const float *restrict scale, const float *restrict bias, float *restrict y, int64_t M, int64_t N, int64_t K,
                  int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *restrict qn = q + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *restrict xm = x + m * K;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < K; k++) acc += xm[k] * (float)qn[k];
            y[m * N + n] = acc * scale[n] + bias[n];
        }
    }
}

/* Packed int4 (even k in the low nibble), groups of G along k with a scale s and zero point z each,
 * w = (q - z) s. Per output row the codes are converted group by group into two fp32 rows (even and
 * odd k, in a buffer on the stack, each loop contiguous and vectorised), then dotted with the even
 * and odd columns of x, which the caller splits (xe, xo: [M, K/2]). xsum is unused (kept for the
 * signature). */
void wo_int4_gemv(const float *restrict xe, const float *restrict xo, const float *restrict xsum, const uint8_t *restrict packed, const float *restrict scale,
                  const float *restrict zero, const float *restrict bias, float *restrict y, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    const int64_t groups = K / G, half = G / 2, width = K / 2;
    (void)xsum;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float we[width], wo[width]; /* K <= 2^16 keeps these under 256 KiB of stack */
        const uint8_t *restrict pn = packed + n * width;
        for (int64_t g = 0; g < groups; g++) {
            const float s = scale[n * groups + g], zs = zero[n * groups + g] * s;
            const uint8_t *restrict pg = pn + g * half;
            float *restrict eg = we + g * half, *restrict og = wo + g * half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                eg[i] = (float)(pg[i] & 0xF) * s - zs;
                og[i] = (float)(pg[i] >> 4) * s - zs;
            }
        }
        for (int64_t m = 0; m < M; m++) {
            const float *restrict em = xe + m * width, *restrict om = xo + m * width;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < width; i++) dot += em[i] * we[i] + om[i] * wo[i];
            y[m * N + n] = dot + bias[n];
        }
    }
}
