/* CPU kernels of graphopt::rms_norm and graphopt::crms_norm for contiguous fp32 rows.
 *
 * Built by cpu.py on first use (cc -O3 -march=native -fopenmp, linked against the OpenMP runtime
 * torch has loaded) and called through ctypes; the signatures below are declared there too. Per
 * row: one sweep for the sums, one that writes the output.
 */
#include <math.h>
#include <stdint.h>

/* Rows of d floats, split over threads; each row is read twice, the second time from cache. */
#define PARALLEL_MIN_ELEMENTS 16384

void rms_norm_f32(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t d, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float sum_of_squares = 0.0f;
        #pragma omp simd reduction(+ : sum_of_squares)
        for (int64_t i = 0; i < d; i++) sum_of_squares += xr[i] * xr[i];
        const float inv_rms = 1.0f / sqrtf(sum_of_squares / (float)d + eps);
        if (w && b) {
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms * w[i] + b[i];
        } else if (w) {
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms * w[i];
        } else if (b) {
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms + b[i];
        } else {
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms;
        }
    }
}

/* The row holds d of d + 1 coordinates of a zero-mean vector; the missing one is -sum(row). */
void crms_norm_f32(const float *x, float *y, int64_t rows, int64_t d, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float sum = 0.0f, sum_of_squares = 0.0f;
        #pragma omp simd reduction(+ : sum, sum_of_squares)
        for (int64_t i = 0; i < d; i++) {
            sum += xr[i];
            sum_of_squares += xr[i] * xr[i];
        }
        const float inv_rms = 1.0f / sqrtf((sum_of_squares + sum * sum) / (float)(d + 1) + eps);
        #pragma omp simd
        for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv_rms;
    }
}
