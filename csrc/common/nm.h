// MVUE N:M selection per block, the float32 algorithms of gradwire/numerics/nm.py (paper 004:
// 1:2 Eq. 7; exact 2:4 App. A.2 as corrected in NOTES-ON-SEEDS.md; approx 2:4 Eq. 25), written
// operation for operation in the oracle's order so the results are bit-identical.
// Framework-free: shared by the CPU and CUDA kernels.
#pragma once
#include <stdint.h>

#include "fp_codec.h"
#include "rng.h"

namespace gradwire {

enum NmScheme { NM_MVUE12 = 0, NM_MVUE24_EXACT = 1, NM_MVUE24_APPROX = 2 };

GW_HD float copysign_f(float mag, float sign_of) {
  return f32_from_bits((f32_bits(mag) & 0x7FFFFFFFu) | (f32_bits(sign_of) & 0x80000000u));
}

GW_HD bool is_finite_f(float v) { return (f32_bits(v) & 0x7F800000u) != 0x7F800000u; }

// Number of running sums c[0..3] that are <= t (the oracle's first()).
GW_HD int first4(const float c[4], float t) {
  return (c[0] <= t) + (c[1] <= t) + (c[2] <= t) + (c[3] <= t);
}

// Highest index k != exclude with a[k] > 0, else 0 (the oracle's clamp_min(0)).
GW_HD int highest_positive4(const float a[4], int exclude) {
  int h = -1;
  for (int k = 0; k < 4; ++k)
    if (a[k] > 0.0f && k != exclude) h = k;
  return h < 0 ? 0 : h;
}

GW_HD void running4(const float a[4], float c[4]) {
  c[0] = a[0];
  c[1] = c[0] + a[1];
  c[2] = c[1] + a[2];
  c[3] = c[2] + a[3];
}

// Two slots sorted by index.
GW_HD void pair_out(int i, float vi, int j, float vj, float* val, uint8_t* idx) {
  if (i > j) {
    idx[0] = static_cast<uint8_t>(j); val[0] = vj;
    idx[1] = static_cast<uint8_t>(i); val[1] = vi;
  } else {
    idx[0] = static_cast<uint8_t>(i); val[0] = vi;
    idx[1] = static_cast<uint8_t>(j); val[1] = vj;
  }
}

// Common rules 1 (non-finite block) and 2 (all-zero block); returns true if one applied.
GW_HD bool nm_special(const float* x, int m, int n, float s, float* val, uint8_t* idx) {
  if (is_finite_f(s) && s != 0.0f) return false;
  if (s == 0.0f) {
    for (int k = 0; k < n; ++k) { idx[k] = static_cast<uint8_t>(k); val[k] = 0.0f; }
    return true;
  }
  // pivot: first non-finite element, else the first largest |x| (argmax, first occurrence)
  int p = 0;
  float best = -1.0f;
  for (int k = 0; k < m; ++k) {
    const float key = is_finite_f(x[k]) ? f32_from_bits(f32_bits(x[k]) & 0x7FFFFFFFu)
                                        : f32_from_bits(0x7F800000u);
    if (key > best) { best = key; p = k; }
  }
  const float vp = is_finite_f(x[p]) ? copysign_f(f32_from_bits(0x7F800000u), x[p]) : x[p];
  // the pivot plus (n == 2) the lowest other index, ascending; n is 1 or 2 here
  if (n == 1) {
    idx[0] = static_cast<uint8_t>(p); val[0] = vp;
  } else {
    pair_out(p, vp, p == 0 ? 1 : 0, 0.0f, val, idx);
  }
  return true;
}

// One block: x[0..M-1] (float32), outputs N values and ascending indices. u1, u2 are the
// block's uniforms, drawn by the caller (so a CPU kernel can hash many blocks at once, vectorised):
//   1:2 and exact 2:4: u1 = uniform01(seed, ctr) (u2 unused);
//   approx 2:4:        u1 = uniform01(seed, 2 ctr), u2 = uniform01(seed, 2 ctr + 1).
// Drawing them eagerly (also for blocks that rules 1-2 settle) changes no result: they are pure
// functions of (seed, counter).
GW_HD void nm_block_u(const float* x, int scheme, float u1, float u2, float* val, uint8_t* idx) {
  if (scheme == NM_MVUE12) {
    const float a0 = f32_from_bits(f32_bits(x[0]) & 0x7FFFFFFFu);
    const float a1 = f32_from_bits(f32_bits(x[1]) & 0x7FFFFFFFu);
    const float s = a0 + a1;
    if (nm_special(x, 2, 1, s, val, idx)) return;
    const float u = u1;
    const int keep = (u * s < a0 || a1 == 0.0f) ? 0 : 1;
    idx[0] = static_cast<uint8_t>(keep);
    val[0] = copysign_f(s, x[keep]);
    return;
  }
  float a[4], c[4];
  for (int k = 0; k < 4; ++k) a[k] = f32_from_bits(f32_bits(x[k]) & 0x7FFFFFFFu);
  running4(a, c);
  const float s = c[3];
  if (nm_special(x, 4, 2, s, val, idx)) return;
  if (scheme == NM_MVUE24_EXACT) {
    const float u = u1;
    int m = 0;
    for (int k = 1; k < 4; ++k)
      if (a[k] > a[m]) m = k;
    float ao[4], co[4];
    for (int k = 0; k < 4; ++k) ao[k] = k == m ? 0.0f : a[k];
    running4(ao, co);
    const float r = co[3];
    if (a[m] > r) {  // regime a4 > a1 + a2 + a3
      int k = first4(co, u * r);
      if (k == 4) k = highest_positive4(ao, m);
      if (r == 0.0f) k = m == 0 ? 1 : 0;
      const float vk = r == 0.0f ? 0.0f : copysign_f(r, x[k > 3 ? 3 : k]);
      pair_out(m, x[m], k, vk, val, idx);
    } else {  // systematic sampling, q = 2 A / S
      float cc[4];
      for (int k = 0; k < 4; ++k) cc[k] = 2.0f * c[k];
      const float t1 = u * s;
      int i = first4(cc, t1);
      if (i > 3) i = 3;
      int j = first4(cc, t1 + s);
      if (j == 4 || j == i) j = highest_positive4(a, i);
      const float half = 0.5f * s;
      pair_out(i, copysign_f(half, x[i]), j, copysign_f(half, x[j]), val, idx);
    }
    return;
  }
  // NM_MVUE24_APPROX
  int i = first4(c, u1 * s);
  if (i == 4) i = highest_positive4(a, -1);
  float ao[4], co[4];
  for (int k = 0; k < 4; ++k) ao[k] = k == (i > 3 ? 3 : i) ? 0.0f : a[k];
  running4(ao, co);
  const float r = co[3];
  int j = first4(co, u2 * r);
  if (j == 4) j = highest_positive4(ao, i);
  if (r == 0.0f) j = i == 0 ? 1 : 0;
  // W[k] = 1 + sum_{l != k} A[l] / D[l], D[l] = running sum of A with A[l] zeroed.
  float rr[4];
  for (int l = 0; l < 4; ++l) {
    float al[4], cl[4];
    for (int k = 0; k < 4; ++k) al[k] = k == l ? 0.0f : a[k];
    running4(al, cl);
    rr[l] = a[l] / cl[3];
  }
  float w[4];
  for (int k = 0; k < 4; ++k) {
    float acc = 1.0f;
    for (int l = 0; l < 4; ++l)
      if (l != k) acc = acc + rr[l];
    w[k] = acc;
  }
  const float vi = copysign_f(s / w[i], x[i]);
  const float vj = r == 0.0f ? 0.0f : copysign_f(s / w[j], x[j]);
  pair_out(i, vi, j, vj, val, idx);
}

// One block with its uniforms drawn here from (seed, block counter ctr): the CUDA kernels' entry.
GW_HD void nm_block(const float* x, int scheme, RngKeys keys, uint64_t ctr, float* val, uint8_t* idx) {
  const bool approx = scheme == NM_MVUE24_APPROX;
  const float u1 = uniform01(keys, approx ? 2 * ctr : ctr);
  const float u2 = approx ? uniform01(keys, 2 * ctr + 1) : 0.0f;
  nm_block_u(x, scheme, u1, u2, val, idx);
}

}  // namespace gradwire
