/* Template: paged_attention.c's value pass for the AVX-512 BF16 heads, included once per (head size, query
 * heads at once): out rows of PV_NH query heads (probabilities p[h][0..len)) = sum over keys of p * v, then
 * * inv[h], with PV_NH * PV_HD / 16 accumulators in registers. The includer defines PV_FN (the function's
 * name), PV_HD (64 or 128) and PV_NH; a template rather than a macro so that a debugger steps through it. */
static inline __attribute__((always_inline)) void PV_FN(const uint16_t *v_plane, const int64_t *blocks, int64_t len,
                                                         int64_t block_size, const float *p, int64_t p_stride,
                                                         const float *inv, uint16_t *out) {
    enum { D = PV_HD / 16 };
    __m512 acc[PV_NH][D];
    for (int h = 0; h < PV_NH; h++)
        for (int c = 0; c < D; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t first = 0, b = 0; first < len; first += block_size, b++) {
        const uint16_t *vb = v_plane + blocks[b] * block_size * PV_HD;
        const int64_t count = len - first < block_size ? len - first : block_size;
        for (int64_t o = 0; o < count; o++) {
            __m512 v[D];
            for (int c = 0; c < D; c++) v[c] = load16_bf16(vb + o * PV_HD + c * 16, 0xffff);
            for (int h = 0; h < PV_NH; h++) {
                const __m512 w = _mm512_set1_ps(p[h * p_stride + first + o]);
                for (int c = 0; c < D; c++) acc[h][c] = _mm512_fmadd_ps(w, v[c], acc[h][c]);
            }
        }
    }
    for (int h = 0; h < PV_NH; h++)
        for (int c = 0; c < D; c++) {
            const __m512 r = _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h]));
            store16_bf16(out + h * PV_HD + c * 16, 0xffff, r);
        }
}

#undef PV_FN
#undef PV_HD
#undef PV_NH
