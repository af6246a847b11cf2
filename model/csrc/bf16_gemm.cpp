// y = x W^T for a few rows of bf16 x against a bf16 weight, on AVX512-BF16 CPUs.
//
// Why it exists: a decode step multiplies 1-16 rows by each weight, so its matmuls are memory
// bound, and oneDNN's bf16 kernel streams a weight at ~15-20 GB/s on the 2-core reference
// machine where a plain sum reads ~30 (BENCHMARKS.md §7, stop 25). This kernel reads each
// weight once, as one sequential stream per 16 output rows, at close to the sum's speed.
//
// Layout (model/bf16_gemm.py `pack`): W (N, K) becomes [N/16][K/2][16][2], so one 64-byte
// load holds a pair of k for 16 output rows, which is what VDPBF16PS multiplies with a pair of
// x broadcast to every lane. Each output is a float32 sum over k pairs in order (each pair's two
// products added inside the instruction), rounded once to bf16 (round to nearest even), as
// oneDNN rounds; the order of the sum differs from oneDNN's, so a few outputs differ in the last
// bf16 bit.
//
// Threads: OpenMP, the runtime torch already loaded (libgomp.so.1 by soname), `threads` of them,
// each with a contiguous range of the 16-row groups.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

namespace {

// rows m0..m0+MC of y, output groups g..g+NC (16 outputs each), over all of K
template <int MC, int NC>
inline void tile(const uint16_t* x, const uint16_t* wp, uint16_t* y, int m0, int g, int N, int K) {
    __m512 acc[MC][NC];
    for (int m = 0; m < MC; ++m)
        for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_setzero_ps();
    const int64_t group = (int64_t)K * 16;  // elements of one packed 16-row group
    const uint16_t* w = wp + (int64_t)g * group;
    const int pairs = K / 2;
    const uint16_t* xr = x + (int64_t)m0 * K;
    for (int p = 0; p < pairs; ++p) {
        __m512bh wv[NC];
        for (int c = 0; c < NC; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(w + c * group + (int64_t)p * 32);
        for (int m = 0; m < MC; ++m) {
            int pair;  // x[m][2p], x[m][2p + 1]: one 32-bit lane, broadcast
            memcpy(&pair, xr + (int64_t)m * K + 2 * p, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], wv[c], xv);
        }
    }
    for (int m = 0; m < MC; ++m)
        for (int c = 0; c < NC; ++c)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (int64_t)(m0 + m) * N + (int64_t)(g + c) * 16),
                                (__m256i)_mm512_cvtneps_pbh(acc[m][c]));
}

// every row of x against groups g..g+NC: four rows a tile, then the remainder
template <int NC>
inline void column(const uint16_t* x, const uint16_t* wp, uint16_t* y, int M, int g, int N, int K) {
    int m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) tile<4, NC>(x, wp, y, m0, g, N, K);
    switch (M - m0) {
        case 3: tile<3, NC>(x, wp, y, m0, g, N, K); break;
        case 2: tile<2, NC>(x, wp, y, m0, g, N, K); break;
        case 1: tile<1, NC>(x, wp, y, m0, g, N, K); break;
        default: break;
    }
}

}  // namespace

extern "C" {

// 0 on success; -1 when the shapes do not fit the packed layout (the caller checks first).
int r2ec_bf16_gemm(const uint16_t* x, const uint16_t* wp, uint16_t* y, int M, int N, int K, int threads) {
    if (M < 1 || N % 16 || K % 2 || threads < 1) return -1;
    const int groups = N / 16;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int per = (groups + T - 1) / T;
        const int g0 = t * per, g1 = g0 + per < groups ? g0 + per : groups;
        int g = g0;
        for (; g + 3 <= g1; g += 3) column<3>(x, wp, y, M, g, N, K);  // three streams of W at once
        for (; g < g1; ++g) column<1>(x, wp, y, M, g, N, K);
    }
    return 0;
}

int r2ec_bf16_gemm_version(void) { return 1; }

}  // extern "C"
