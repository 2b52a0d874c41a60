/* GGUF's quantized blocks, shared by the kernels that read them (gguf_linear.c,
 * int8_linear.c): the block length, ggml's type ids, block sizes and f16 scales. */
#ifndef TEXTGEN_GGUF_BLOCKS_H
#define TEXTGEN_GGUF_BLOCKS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 32 /* input features per block */

enum { TYPE_Q4_0 = 2, TYPE_Q4_1 = 3, TYPE_Q8_0 = 8 }; /* ggml's type ids */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1f;
    uint32_t mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13); /* inf, nan */
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal half: normalise */
        exponent = 113;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* f16 of a float32, rounded to nearest even (only exact values are packed here: the
 * rounding never matters, but infinities and the subnormal range are kept right). */
static inline uint16_t float_to_half(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x47800000u) /* >= 65536, or inf / nan */
        return sign | (magnitude > 0x7f800000u ? 0x7e00 : 0x7c00);
    if (magnitude < 0x38800000u) { /* below f16's smallest normal: subnormal or zero */
        const float scaled = (magnitude == 0 ? 0.0f : f < 0 ? -f : f) * 16777216.0f;
        return sign | (uint16_t)nearbyintf(scaled); /* units of 2^-24 */
    }
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    return sign | (uint16_t)((rounded - 0x38000000u) >> 13);
}

static inline int64_t block_bytes(int type) {
    switch (type) {
        case TYPE_Q4_0: return 18;
        case TYPE_Q4_1: return 20;
        case TYPE_Q8_0: return 34;
        default: return 0;
    }
}

#endif
