/* Template: paged_attention.c's bf16 attention of one work item (a query row's group of heads over one KV
 * head's keys) for one head size, on CPUs with AVX-512 BF16, included once per size. The includer
 * defines HEAD_FN (the function's name), HEAD_HD (64 or 128) and HEAD_SUB (query heads per value pass:
 * PV_NH of the largest paged_attention_pv.h instance of that size); a template rather than a macro so that
 * a debugger steps through it. */
static void HEAD_FN(const uint16_t *q, const uint16_t *k_plane, const uint16_t *v_plane, uint16_t *out,
                    const int64_t *blocks, int64_t len, int64_t block_size, int64_t group, float scale, float *sg,
                    float *inv, const kv_item *next) {
    enum { P = HEAD_HD / 32 };
    const int chunked = block_size % 16 == 0;
    for (int64_t g = 0; g < group; g++) {
        float *s = sg + g * len, mx = -INFINITY;
        __m512bh qz[P];
        for (int c = 0; c < P; c++) qz[c] = (__m512bh)_mm512_loadu_si512(q + g * HEAD_HD + 32 * c);
        for (int64_t first = 0, b = 0; first < len; first += block_size, b++) {
            const uint16_t *kb = k_plane + blocks[b] * block_size * HEAD_HD;
            const int64_t count = len - first < block_size ? len - first : block_size;
            if (g == 0) { /* the first head's pass: ask for this block's values, */
                prefetch_rows(v_plane + blocks[b] * block_size * HEAD_HD, count * HEAD_HD);
                if (next != NULL && first < next->len) { /* and the next item's block b, into L2 */
                    const int64_t nb = next->blocks[b] * block_size * HEAD_HD;
                    prefetch_rows(next->k_plane + nb, block_size * HEAD_HD);
                    prefetch_rows(next->v_plane + nb, block_size * HEAD_HD);
                }
            }
            int64_t o = 0;
            for (; chunked && o + 16 <= count; o += 16) { /* sixteen keys, one joint reduction */
                v16f t[16];
                for (int k = 0; k < 16; k++) t[k] = (v16f)dot_lanes(P, qz, kb + (o + k) * HEAD_HD);
                const v16f sc = hsum16x16(t) * scale;
                memcpy(s + first + o, &sc, sizeof sc);
                const float m = _mm512_reduce_max_ps((__m512)sc);
                mx = m > mx ? m : mx;
            }
            for (; o < count; o++) {
                const float score = hsum16((v16f)dot_lanes(P, qz, kb + o * HEAD_HD)) * scale;
                s[first + o] = score;
                mx = score > mx ? score : mx;
            }
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < len; j++) {
            s[j] = fast_expf(s[j] - mx);
            sum += s[j];
        }
        inv[g] = sum > 0.0f ? 1.0f / sum : 0.0f; /* len 0: zeros, as the other kernels write */
    }
    for (int64_t g = 0; g < group;) {
        const int64_t nh = group - g < HEAD_SUB ? group - g : HEAD_SUB;
#if HEAD_HD == 64
        switch (nh) {
        case 4: pv_64_4(v_plane, blocks, len, block_size, sg + g * len, len, inv + g, out + g * HEAD_HD); break;
        case 3: pv_64_3(v_plane, blocks, len, block_size, sg + g * len, len, inv + g, out + g * HEAD_HD); break;
        case 2: pv_64_2(v_plane, blocks, len, block_size, sg + g * len, len, inv + g, out + g * HEAD_HD); break;
        default: pv_64_1(v_plane, blocks, len, block_size, sg + g * len, len, inv + g, out + g * HEAD_HD); break;
        }
#else
        switch (nh) {
        case 2: pv_128_2(v_plane, blocks, len, block_size, sg + g * len, len, inv + g, out + g * HEAD_HD); break;
        default: pv_128_1(v_plane, blocks, len, block_size, sg + g * len, len, inv + g, out + g * HEAD_HD); break;
        }
#endif
        g += nh;
    }
}

#undef HEAD_FN
#undef HEAD_HD
#undef HEAD_SUB
