// N:M selection vectorised across blocks, for the CPU kernel (gradwire_cpu.cpp includes this
// inside namespace gradwire::<anonymous>, after GW_SIMD_CLONES is defined).
#pragma once
#include <stdint.h>

// ---- N:M selection, vectorised across blocks ---------------------------------------------
// nm.h's nm_block_u is written for one block at a time, with branches. Here the same float32
// operations, in the same order, are written as selects over a batch of blocks (one lane per
// block), so the compiler vectorises the batch; blocks that rules 1-2 of nm.h settle (a sum that
// is zero or non-finite) are flagged and redone by nm_block_u afterwards.
namespace nmv {

inline uint32_t bits(float v) { return f32_bits(v); }
// Selects as mask arithmetic, not ?: -- GCC turns chains of ?: over lane-dependent indices into
// multi-way branches (jump threading), which blocks vectorisation; masks keep the loop straight.
inline uint32_t mask(bool c) { return 0u - static_cast<uint32_t>(c); }
inline float self(bool c, float a, float b) {
  const uint32_t m = mask(c);
  return f32_from_bits((bits(a) & m) | (bits(b) & ~m));
}
inline int seli(bool c, int a, int b) { return b ^ ((a ^ b) & static_cast<int>(mask(c))); }
inline float copysign_(float mag, float sign_of) {
  return f32_from_bits((bits(mag) & 0x7FFFFFFFu) | (bits(sign_of) & 0x80000000u));
}
inline float absf(float v) { return f32_from_bits(bits(v) & 0x7FFFFFFFu); }
inline float zero_if(bool c, float v) { return f32_from_bits(bits(v) & ~mask(c)); }
inline float sel4(int k, float v0, float v1, float v2, float v3) {
  return f32_from_bits((bits(v0) & mask(k == 0)) | (bits(v1) & mask(k == 1)) |
                       (bits(v2) & mask(k == 2)) | (bits(v3) & mask(k == 3)));
}
inline int first4(float c0, float c1, float c2, float c3, float t) {
  return (c0 <= t) + (c1 <= t) + (c2 <= t) + (c3 <= t);
}
// nm.h highest_positive4: highest k != exclude with a[k] > 0, else 0.
inline int highest4(float a0, float a1, float a2, float a3, int exclude) {
  int h = 0;
  h = seli((a1 > 0.0f) & (exclude != 1), 1, h);
  h = seli((a2 > 0.0f) & (exclude != 2), 2, h);
  h = seli((a3 > 0.0f) & (exclude != 3), 3, h);
  return h;  // k = 0 would set h = 0: the same as the default
}
inline uint8_t special(float s) {
  return static_cast<uint8_t>(((bits(s) & 0x7F800000u) == 0x7F800000u) | (s == 0.0f));
}
// nm.h pair_out: two slots sorted by index.
inline void pair(int i, float vi, int j, float vj, float* val, uint8_t* idx) {
  const bool sw = i > j;
  idx[0] = static_cast<uint8_t>(seli(sw, j, i));
  idx[1] = static_cast<uint8_t>(seli(sw, i, j));
  val[0] = self(sw, vj, vi);
  val[1] = self(sw, vi, vj);
}

}  // namespace nmv

// u[k] = uniform01 of block k (r24 * 2**-24); 1:2, x = 2 * cnt floats.
GW_SIMD_CLONES void nm12_lanes(const float* x, const uint32_t* r, int cnt, float* pv, uint8_t* pi,
                               uint8_t* sp) {
  using namespace nmv;
  for (int k = 0; k < cnt; ++k) {
    const float x0 = x[2 * k], x1 = x[2 * k + 1];
    const float a0 = absf(x0), a1 = absf(x1);
    const float s = a0 + a1;
    const float u = static_cast<float>(static_cast<int32_t>(r[k])) * 5.9604644775390625e-08f;
    const int keep = !((u * s < a0) | (a1 == 0.0f));
    pi[k] = static_cast<uint8_t>(keep);
    pv[k] = copysign_(s, self(keep, x1, x0));
    sp[k] = special(s);
  }
}

// Exact 2:4 (nm.h NM_MVUE24_EXACT), x = 4 * cnt floats, outputs 2 per block.
GW_SIMD_CLONES void nm24e_lanes(const float* x, const uint32_t* r, int cnt, float* pv, uint8_t* pi,
                                uint8_t* sp) {
  using namespace nmv;
  for (int k = 0; k < cnt; ++k) {
    const float x0 = x[4 * k], x1 = x[4 * k + 1], x2 = x[4 * k + 2], x3 = x[4 * k + 3];
    const float a0 = absf(x0), a1 = absf(x1), a2 = absf(x2), a3 = absf(x3);
    const float c0 = a0, c1 = c0 + a1, c2 = c1 + a2, c3 = c2 + a3;
    const float s = c3;
    const float u = static_cast<float>(static_cast<int32_t>(r[k])) * 5.9604644775390625e-08f;
    // m: first argmax of a
    int m = 0;
    float am = a0;
    m = seli(a1 > am, 1, m); am = self(a1 > am, a1, am);
    m = seli(a2 > am, 2, m); am = self(a2 > am, a2, am);
    m = seli(a3 > am, 3, m); am = self(a3 > am, a3, am);
    const float o0 = zero_if(m == 0, a0), o1 = zero_if(m == 1, a1);
    const float o2 = zero_if(m == 2, a2), o3 = zero_if(m == 3, a3);
    const float q0 = o0, q1 = q0 + o1, q2 = q1 + o2, q3 = q2 + o3;
    const float rr = q3;
    // regime a_max > rest
    int kk = first4(q0, q1, q2, q3, u * rr);
    kk = seli(kk == 4, highest4(o0, o1, o2, o3, m), kk);
    kk = seli(rr == 0.0f, m == 0, kk);
    const float vk = zero_if(rr == 0.0f, copysign_(rr, sel4(kk, x0, x1, x2, x3)));
    const float xm = sel4(m, x0, x1, x2, x3);
    // systematic sampling, q = 2 A / S
    const float t1 = u * s;
    int i = first4(2.0f * c0, 2.0f * c1, 2.0f * c2, 2.0f * c3, t1);
    i = seli(i > 3, 3, i);
    int j = first4(2.0f * c0, 2.0f * c1, 2.0f * c2, 2.0f * c3, t1 + s);
    j = seli((j == 4) | (j == i), highest4(a0, a1, a2, a3, i), j);
    const float half = 0.5f * s;
    const float vi = copysign_(half, sel4(i, x0, x1, x2, x3));
    const float vj = copysign_(half, sel4(j, x0, x1, x2, x3));
    const bool dom = am > rr;  // a[m] > r
    pair(seli(dom, m, i), self(dom, xm, vi), seli(dom, kk, j), self(dom, vk, vj), pv + 2 * k, pi + 2 * k);
    sp[k] = special(s);
  }
}

// Approximate 2:4 (nm.h NM_MVUE24_APPROX); r holds 2 draws per block (counters 2 ctr, 2 ctr + 1).
GW_SIMD_CLONES void nm24a_lanes(const float* x, const uint32_t* r, int cnt, float* pv, uint8_t* pi,
                                uint8_t* sp) {
  using namespace nmv;
  for (int k = 0; k < cnt; ++k) {
    const float x0 = x[4 * k], x1 = x[4 * k + 1], x2 = x[4 * k + 2], x3 = x[4 * k + 3];
    const float a0 = absf(x0), a1 = absf(x1), a2 = absf(x2), a3 = absf(x3);
    const float c0 = a0, c1 = c0 + a1, c2 = c1 + a2, c3 = c2 + a3;
    const float s = c3;
    const float u1 = static_cast<float>(static_cast<int32_t>(r[2 * k])) * 5.9604644775390625e-08f;
    const float u2 = static_cast<float>(static_cast<int32_t>(r[2 * k + 1])) * 5.9604644775390625e-08f;
    int i = first4(c0, c1, c2, c3, u1 * s);
    i = seli(i == 4, highest4(a0, a1, a2, a3, -1), i);
    const float o0 = zero_if(i == 0, a0), o1 = zero_if(i == 1, a1);
    const float o2 = zero_if(i == 2, a2), o3 = zero_if(i == 3, a3);
    const float q0 = o0, q1 = q0 + o1, q2 = q1 + o2, q3 = q2 + o3;
    const float rr = q3;
    int j = first4(q0, q1, q2, q3, u2 * rr);
    j = seli(j == 4, highest4(o0, o1, o2, o3, i), j);
    j = seli(rr == 0.0f, i == 0, j);
    // rr_l = a_l / D_l, D_l = running sum of a with a_l zeroed (nm.h's order of additions).
    const float d0 = ((0.0f + a1) + a2) + a3, d1 = ((a0 + 0.0f) + a2) + a3;
    const float d2 = ((a0 + a1) + 0.0f) + a3, d3 = ((a0 + a1) + a2) + 0.0f;
    const float r0 = a0 / d0, r1 = a1 / d1, r2 = a2 / d2, r3 = a3 / d3;
    // w_k = 1 + sum_{l != k} rr_l, accumulated in l order.
    const float w0 = ((1.0f + r1) + r2) + r3, w1 = ((1.0f + r0) + r2) + r3;
    const float w2 = ((1.0f + r0) + r1) + r3, w3 = ((1.0f + r0) + r1) + r2;
    const float vi = copysign_(s / sel4(i, w0, w1, w2, w3), sel4(i, x0, x1, x2, x3));
    const float vj = zero_if(rr == 0.0f, copysign_(s / sel4(j, w0, w1, w2, w3), sel4(j, x0, x1, x2, x3)));
    pair(i, vi, j, vj, pv + 2 * k, pi + 2 * k);
    sp[k] = special(s);
  }
}

