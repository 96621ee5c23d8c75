/* The CPU's float32 fused-multiply-add peak, from registers only (no memory traffic).
 *
 * Why: numpy's sgemm is a practical matrix-multiply peak, but a well-tuned convolution kernel can
 * beat it (ONNX Runtime's MLAS does on AMD EPYC). This probe is the ceiling no float32 kernel can
 * pass, so bench_runtime.py can say what share of it a speed target would need.
 *
 * Built and run by benchmarks/bench_runtime.py:  cc -O3 -march=native -fopenmp fma_peak.c
 * Prints one number: GFLOP/s over OMP_NUM_THREADS threads (2 FLOPs per lane per FMA). */
#include <omp.h>
#include <stdio.h>
#include <time.h>

#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#else
#define VECTOR_BYTES 32
#endif
#define LANES (VECTOR_BYTES / 4)
typedef float vec __attribute__((vector_size(VECTOR_BYTES)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    const long iters = 100000000L / (LANES / 8 > 0 ? LANES / 8 : 1);
    int threads = 1;
    float sink = 0.0f;
    double start = now();
#pragma omp parallel reduction(+ : sink)
    {
#pragma omp single
        threads = omp_get_num_threads();
        /* 12 independent chains hide the FMA latency (4-5 cycles, 2 pipes). */
        vec a0 = {0}, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5;
        vec a6 = a0 + 6, a7 = a0 + 7, a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10, a11 = a0 + 11;
        const vec b = a0 + 0.9999f, c = a0 + 1e-7f;
        for (long k = 0; k < iters; k++) {
            a0 = a0 * b + c; a1 = a1 * b + c; a2 = a2 * b + c; a3 = a3 * b + c;
            a4 = a4 * b + c; a5 = a5 * b + c; a6 = a6 * b + c; a7 = a7 * b + c;
            a8 = a8 * b + c; a9 = a9 * b + c; a10 = a10 * b + c; a11 = a11 * b + c;
        }
        vec s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
        for (int i = 0; i < LANES; i++) sink += s[i];
    }
    double seconds = now() - start;
    double flops = (double)threads * iters * 12 * LANES * 2;
    printf("%.3f\n", flops / seconds / 1e9);
    return sink == 12345.0f; /* keeps the chains alive */
}
