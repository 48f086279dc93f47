// alpha-entmax of float32 rows on the CPU, forward and backward (structattn/_native.py
// builds this file on first use and calls it through ctypes; structattn.functional's
// entmax_bisect routes float32 CPU rows here).
//
// Forward, per row: the row maximum; a lower bound on the threshold tau of
// x = (alpha - 1)(z - max) from the keys above a few offsets; the keys above that bound packed
// (the candidates: the support is among them, and for alpha >= 1.3 on N(0, 1) rows they are
// 4-60% of the keys); Halley's method on P(tau)^(alpha - 1) - 1, P = sum [x - tau]_+^e,
// e = 1 / (alpha - 1), over the candidates only, until Newton's step on P - 1 is so small that
// a second-order expansion of each power in it (keys next to the threshold computed exactly)
// is exact to float32 precision (set_step_limits); then the powers renormalised and put back
// in place.  Powers are 2^(e log2 gap) from polynomials accurate to 2e-8 (no libm call per
// key).  Rows are worked on in batches, one phase at a time for every row of the batch, so
// that one row's dependency chains overlap with the next row's work; batches of W short rows
// reduce their sums together (reduce_rows).
//
// Backward, per row: w = p / gap from the forward's threshold, grad_z = w (g - <g, w> / sum w),
// and for the alpha gradient its row sums over the support, packed.
//
// Written with GCC/Clang vector extensions (W lanes), plus AVX-512 compress/expand/scalef
// where the compiler targets it; no -ffast-math (the rounding trick in power() without
// AVX-512 needs exact arithmetic, and the threshold's high + low split must not be fused).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int W = 16;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

inline vf splat(float a) { return vf{} + a; }
inline vi splati(int32_t a) { return vi{} + a; }
inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf as_f(vi v) { vf r; std::memcpy(&r, &v, sizeof r); return r; }
inline vi as_i(vf v) { vi r; std::memcpy(&r, &v, sizeof r); return r; }
// Materialise a value: the compiler may not fuse the rounding of what computed it into what
// uses it (x = (z - max)(alpha - 1) must round as it does in the forward pass and in torch).
inline vf rounded(vf v) {
#if defined(__AVX512F__)
    __asm__("" : "+v"(v));
#else
    __asm__("" : "+m"(v));
#endif
    return v;
}
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
// Sums and maxima across lanes by halving (a chain of 16 dependent adds costs ~60 cycles).
inline bool any(vi m) {
#ifdef __AVX512F__
    return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#else
    typedef int32_t vi8 __attribute__((vector_size(32)));
    vi8 a, b;
    std::memcpy(&a, &m, 32);
    std::memcpy(&b, (const char*)&m + 32, 32);
    a |= b;
    for (int j = 0; j < 8; ++j) if (a[j]) return true;
    return false;
#endif
}
inline float hsum(vf v) {
    vf8 a, b; std::memcpy(&a, &v, 32); std::memcpy(&b, (const char*)&v + 32, 32);
    vf8 h = a + b;
    vf4 c, d; std::memcpy(&c, &h, 16); std::memcpy(&d, (const char*)&h + 16, 16);
    vf4 q = c + d;
    return (q[0] + q[2]) + (q[1] + q[3]);
}
inline float hmax(vf v) {
    vf8 a, b; std::memcpy(&a, &v, 32); std::memcpy(&b, (const char*)&v + 32, 32);
    vf8 h = a > b ? a : b;
    vf4 c, d; std::memcpy(&c, &h, 16); std::memcpy(&d, (const char*)&h + 16, 16);
    vf4 q = c > d ? c : d;
    float m0 = q[0] > q[2] ? q[0] : q[2], m1 = q[1] > q[3] ? q[1] : q[3];
    return m0 > m1 ? m0 : m1;
}

#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

// The sums of W = 16 vectors at once, by a transposing tree (15 shuffle pairs instead of 16
// separate reductions): lane b of the result is the sum of v[b]'s lanes.
inline vf reduce_lanes(const vf* v) {
    static_assert(W == 16, "reduce_lanes is written for 16 lanes");
    vf u[8], w[4], q[2];
    for (int i = 0; i < 8; ++i) {
        u[i] = SHUFFLE(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SHUFFLE(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    for (int j = 0; j < 4; ++j) {
        w[j] = SHUFFLE(u[2 * j], u[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + SHUFFLE(u[2 * j], u[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    }
    for (int k = 0; k < 2; ++k) {
        q[k] = SHUFFLE(w[2 * k], w[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + SHUFFLE(w[2 * k], w[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    }
    return SHUFFLE(q[0], q[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SHUFFLE(q[0], q[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Lane b: the sum of rows[b].lanes[slot] (rows of a batch of at most W that left their sums
// in vectors; rows past count add nothing).
template <class T>
inline vf reduce_rows(const T* rows, int64_t count, int slot) {
    vf v[W];
    for (int b = 0; b < W; ++b) v[b] = b < count ? rows[b].lanes[slot] : vf{};
    return reduce_lanes(v);
}

// An exponent e split as e_hi + e_lo with e_hi * k exact for |k| < 2^8.
struct Exponent {
    float e, hi, lo;
    explicit Exponent(double value) {
        e = (float)value;
        int32_t b; std::memcpy(&b, &e, 4); b &= ~0xFFFF; std::memcpy(&hi, &b, 4);
        lo = (float)(value - (double)hi);
    }
};

// g^e for lanes with g > 0 normal (others: pass 1 and mask with keep); 0 below 2^-126.
// log2 g = k + log2(m), m in [sqrt(1/2), sqrt(2)), by a degree-9 polynomial in m - 1
// (absolute error 2e-8); 2^f, |f| <= 1/2, by a degree-6 polynomial (relative error 2e-8).
// (coarse: degree-5 and degree-4 polynomials instead, to about 2e-5 relative: enough for a
// start or a step far from the root, at two thirds of the cost.)
template <bool coarse = false, class E>
inline vf power(vf g, vi keep, const E& ex) {
    vi bits = as_i(g);
    vi k = (bits - splati(0x3F3504F3)) >> 23;
    vf t = as_f(bits - (k << 23)) - 1.0f;
    vf l = coarse
        ? t * (1.4427015781402588f + t * (-0.7212063670158386f + t * (0.47981181740760803f
            + t * (-0.3664915859699249f + t * (0.3182002604007721f + t * -0.20619216561317444f)))))
        : t * (1.4426950216293335f + t * (-0.7213473320007324f + t * (0.4808982312679291f
            + t * (-0.3606966435909271f + t * (0.2885674238204956f + t * (-0.23961740732192993f
            + t * (0.20460057258605957f + t * (-0.19106268882751465f + t * (0.18617519736289978f
            + t * -0.10994996875524521f)))))))));
    vf kf = __builtin_convertvector(k, vf);
    vf a = ex.hi * kf;
    vf b = ex.lo * kf + ex.e * l;
    vf y = a + b;
#ifdef __AVX512F__
    vf n = (vf)_mm512_roundscale_ps((__m512)y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to int
    vf n = (y + magic) - magic;
#endif
    vf f = (a - n) + b;
    vf q = coarse
        ? 0.9999992847442627f + f * (0.6931217908859253f + f * (0.24024741351604462f
            + f * (0.055917881429195404f + f * 0.00957027543336153f)))
        : 1.0f + f * (0.6931471824645996f + f * (0.24022646248340607f
            + f * (0.05550328642129898f + f * (0.009618488140404224f
            + f * (0.0013399934396147728f + f * 0.00015346014697570354f)))));
#ifdef __AVX512F__
    // q 2^n in one instruction, zero where masked or below 2^-126 (subnormals are slow).
    __mmask16 ok = _mm512_test_epi32_mask((__m512i)keep, (__m512i)keep)
        & _mm512_cmp_ps_mask((__m512)n, _mm512_set1_ps(-126.5f), _CMP_GT_OQ);
    return (vf)_mm512_maskz_scalef_ps(ok, (__m512)q, (__m512)n);
#else
    vi ni = __builtin_convertvector(n, vi);
    vi ok = keep & (ni > -127) & (y < 128.0f);
    return ok ? q * as_f((ni + 127) << 23) : splat(0.0f);
#endif
}

// One exponent per lane (per row, where a vector holds one value of each of W rows).
struct LaneExponent {
    vf e, hi, lo;
    void set(int lane, double value) {
        Exponent one(value);
        e[lane] = one.e; hi[lane] = one.hi; lo[lane] = one.lo;
    }
};

struct Sums { double p, q, r; };

// Sums over candidates x (padded with -inf to a multiple of W) of gap^e, gap^(e-1), gap^(e-2)
// at gap = x - tau; the powers go to pw and gap^(e-1) to wt.  With lanes (at most 16 W
// candidates), the three sums are left there as vectors for reduce_rows.
Sums evaluate(const float* x, int64_t n, double tau, const Exponent& ex, float* pw, float* wt,
              vf* lanes = nullptr) {
    float th = (float)tau;
    float tl = (float)(tau - (double)th);
    Sums s{0, 0, 0};
    for (int64_t start = 0; start < n; start += 16 * W) {
        int64_t stop = start + 16 * W < n ? start + 16 * W : n;
        vf sp = vf{}, sq = vf{}, sr = vf{};
        for (int64_t i = start; i < stop; i += W) {
            vf gap = (loadu(x + i) - th) - tl;
            vi pos = gap > 0.0f;
            vf g = pos ? gap : splat(1.0f);
            vf p = power(g, pos, ex);
            vf ig = 1.0f / g;
            vf w = p * ig;
            sp += p; sq += w; sr += w * ig;
            storeu(pw + i, p);
            storeu(wt + i, w);
        }
        if (lanes) { lanes[0] = sp; lanes[1] = sq; lanes[2] = sr; return s; }
        s.p += hsum(sp); s.q += hsum(sq); s.r += hsum(sr);
    }
    if (lanes) lanes[0] = lanes[1] = lanes[2] = vf{};
    return s;
}

// P^s - 1 for P = 1 + u: a series in double next to the root (where the step needs
// relative accuracy), the float power further away (where 1e-7 relative is plenty).
inline double power_minus_one(double u, double s, const Exponent& es) {
    if (std::fabs(u) <= 1e-2) {
        double l = u * (1.0 + u * (-0.5 + u * (1.0 / 3 + u * (-0.25 + u * (0.2 - u / 6)))));
        double v = s * l;
        return v * (1.0 + v * (0.5 + v * (1.0 / 6 + v * (1.0 / 24 + v * (1.0 / 120 + v / 720)))));
    }
    vf p = power<true>(splat((float)(1.0 + u)), splati(-1), es);
    return (double)p[0] - 1.0;
}

// The state of one row between the phases; rows are worked on in batches, one phase (or one
// pass) for every row of the batch in turn, so that the long dependency chains of one row
// (the per-row arithmetic between passes) overlap with the work of the next.
struct Row {
    const float* z = nullptr;
    float* out = nullptr;
    float* cand = nullptr;     // the candidate keys' x, packed, padded with -inf to W
    float* pw = nullptr;       // their powers gap^e at the last threshold
    float* wt = nullptr;       // and gap^(e-1)
    int32_t* idx = nullptr;    // the keys of the candidates not packed by the vector loop
    uint16_t* masks = nullptr; // which keys of each W-block are candidates (AVX-512 packing)
    int64_t n = 0, padded = 0, packed_blocks = 0, packed_n = 0;
    double s = -1.0, e = 0.0, step_limit = 0.0, t = 0.0, lo = 0.0, hi = 0.0, newton = 0.0;
    Exponent ex{1.0}, es{1.0};
    Sums sums{0, 0, 0};
    double total = 0.0;        // the sum of the final powers (phase 3)
    vf lanes[8] = {};          // partial sums left in vectors for reduce_rows (short rows)
    vf counts{}, totals{};     // keys above each start offset, and their sum
    float cut = 0.0f;          // the candidates are the keys with x > cut
    float mx = 0.0f, sf = 0.0f;
    int used = 0;
    bool done = false, converged = false;
    bool finite = true;        // every key of the row finite (checked by find_max)
    bool crossed = false;      // phase 3 moved a key across the threshold (a retry may follow)
    bool retry = false;        // the row resumes its passes after such a finish
};

// Phase 3 moves the threshold by the last step delta through a second-order expansion of
// each key's power, (g - delta)^e ~ g^e - e delta g^(e-1) + e (e-1)/2 delta^2 g^(e-2), and
// computes the keys with g < 8 |delta| exactly.  The rest of the expansion is below
// c delta^3 g^(e-3) with c = 1.5 |e (e-1) (e-2)| / 6 for g >= 8 |delta| (and g <= 1): at most
// c delta^3 for e >= 3, and c 8^(e-3) delta^e for e < 3.  The step is taken where that is
// below 2^-25, and never above 1e-3.  For the rows of a batch at once (one power for all).
double step_limit(double s) {
    const double e = 1.0 / s;
    const double c = 1.5 * std::fabs(e * (e - 1.0) * (e - 2.0)) / 6.0;
    if (c == 0.0) return 1e-3;
    // (2^-25 / c)^(1/3), or (2^-25 / c 8^(e-3))^(1/e).
    const double limit = e >= 3.0 ? std::cbrt(0x1p-25 / c)
                                  : std::pow(0x1p-25 / (c * std::pow(8.0, e - 3.0)), 1.0 / e);
    return std::fmin(1e-3, limit);
}

// The limit at alpha - 1 in [0.1, 1] (the kernel's range) from a table, the smaller of the two
// grid values around it less 1% (the limit varies by far less than that between them), which
// spares the powers on every row when each row has its own alpha.
double tabled_step_limit(double s) {
    constexpr int N = 1024;
    constexpr double LOW = 0.1, HIGH = 1.0;
    static const std::vector<double> table = [] {
        std::vector<double> values(N + 1);
        for (int i = 0; i <= N; ++i) values[i] = step_limit(LOW + (HIGH - LOW) * i / N);
        return values;
    }();
    if (!(s >= LOW && s <= HIGH)) return step_limit(s);
    const double position = (s - LOW) / (HIGH - LOW) * N;
    const int i = position >= N ? N - 1 : (int)position;
    return 0.99 * std::fmin(table[i], table[i + 1]);
}

void set_step_limits(Row* rows, int64_t count) {
    for (int64_t b = 0; b < count; ++b) rows[b].step_limit = tabled_step_limit(rows[b].s);
}

// Phase 1: the row maximum, a lower bound on the threshold, and the candidate keys above it.
void find_max(Row& R, int64_t d) {
    const float* z = R.z;
    vf vm = splat(-INFINITY);
    vi finite = splati(-1);  // v - v is 0 for finite v, NaN for NaN and +-inf
    int64_t i = 0;
    for (; i + W <= d; i += W) {
        vf v = loadu(z + i);
        vm = v > vm ? v : vm;
        finite &= (v - v) == 0.0f;
    }
    float mx = hmax(vm);
    bool all_finite = !any(~finite);
    for (; i < d; ++i) {
        mx = z[i] > mx ? z[i] : mx;
        all_finite = all_finite && std::isfinite(z[i]);
    }
    R.finite = all_finite;
    R.used = 0;
    R.newton = 0.0;
    R.done = R.converged = R.crossed = false;
    R.mx = mx;
    if (!(mx > -INFINITY)) {  // every key -inf (or NaN): probabilities 0
        R.mx = 0.0f; R.t = 0.0; R.n = R.padded = R.packed_blocks = R.packed_n = 0;
        R.sums = Sums{1, 0, 0};
        R.done = R.converged = true;
    }
}

// A lower bound on the threshold: n keys of mean m above an offset c give
// P(t) >= n (m - t)^e (Jensen), so t = m - n^-s has P(t) >= 1; the best over the offsets (and
// -1, the maximum alone).  First the counts and sums (lane k of R.counts and R.totals) ...
template <int NOFF>
void count_above(Row& R, int64_t d, const float (&offsets)[NOFF], bool lanes) {
    const float* z = R.z;
    const float mx = R.mx;
    const float sf = R.sf;
    vf cnt[NOFF], sum[NOFF];
    for (int k = 0; k < NOFF; ++k) { cnt[k] = vf{}; sum[k] = vf{}; }
    for (int64_t i = 0; i < d; i += W) {
        vf v;
        if (i + W <= d) v = loadu(z + i);
        else {
            float tail[W];
            for (int j = 0; j < W; ++j) tail[j] = i + j < d ? z[i + j] : -INFINITY;
            v = loadu(tail);
        }
        vf x = (v - mx) * sf;
        for (int k = 0; k < NOFF; ++k) {
            vi above = x > offsets[k];
            cnt[k] += above ? splat(1.0f) : splat(0.0f);
            sum[k] += above ? x : splat(0.0f);
        }
    }
    if (lanes) {
        for (int k = 0; k < NOFF; ++k) { R.lanes[2 * k] = cnt[k]; R.lanes[2 * k + 1] = sum[k]; }
        return;
    }
    for (int k = 0; k < NOFF; ++k) { R.counts[k] = hsum(cnt[k]); R.totals[k] = hsum(sum[k]); }
}

// (The counts of a batch of short rows, from the vectors count_above left.)
void reduce_counts(Row* rows, int64_t count, int noff) {
    for (int k = 0; k < noff; ++k) {
        vf counts = reduce_rows(rows, count, 2 * k), totals = reduce_rows(rows, count, 2 * k + 1);
        for (int64_t b = 0; b < count; ++b) {
            rows[b].counts[k] = counts[b];
            rows[b].totals[k] = totals[b];
        }
    }
}

// ... then the bound, and the candidates x > bound (the support is among them), packed.
// (n^-s for W / noff rows per power, coarse: a start needs no more; pushed down by 1e-4
// relative against its error.)
void set_lower_bounds(Row* rows, int64_t count, int noff) {
    const int per = W / noff;
    for (int64_t first = 0; first < count; first += per) {
        vf n = splat(1.0f), mean = splat(0.0f);
        LaneExponent ex{splat(1.0f), splat(1.0f), vf{}};
        vi keep = vi{};
        for (int64_t b = first; b < count && b < first + per; ++b) {
            const Row& R = rows[b];
            for (int k = 0; k < noff; ++k) {
                const int lane = (int)(b - first) * noff + k;
                n[lane] = R.counts[k] > 1.0f ? R.counts[k] : 1.0f;
                mean[lane] = R.totals[k] / n[lane];
                ex.set(lane, -R.s);
                keep[lane] = -1;
            }
        }
        vf bounds = mean - power<true>(n, keep, ex) * 1.0001f;
        for (int64_t b = first; b < count && b < first + per; ++b) {
            double lower = -1.0;
            for (int k = 0; k < noff; ++k) {
                const float bound = bounds[(int)(b - first) * noff + k];
                lower = bound > lower ? bound : lower;
            }
            rows[b].lo = lower;
        }
    }
}

void pack(Row& R, int64_t d) {
    const float* z = R.z;
    const float mx = R.mx;
    const float sf = R.sf;
    const double lower = R.lo;
    float lower_f = (float)lower;
    if ((double)lower_f > lower) lower_f = std::nextafter(lower_f, -INFINITY);
    R.cut = lower_f;
    int64_t n = 0;
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 mxv = _mm512_set1_ps(mx), sfv = _mm512_set1_ps(sf);
    const __m512 lowv = _mm512_set1_ps(lower_f);
    for (; i + W <= d; i += W) {
        __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(z + i), mxv), sfv);
        __mmask16 m = _mm512_cmp_ps_mask(x, lowv, _CMP_GT_OQ);
        // A compress in registers and a plain store: the memory form is microcoded on AMD.
        _mm512_storeu_ps(R.cand + n, _mm512_maskz_compress_ps(m, x));
        R.masks[i / W] = (uint16_t)m;
        n += __builtin_popcount((unsigned)m);
    }
#endif
    R.packed_blocks = i / W;
    R.packed_n = n;
    for (; i < d; ++i) {
        float x = (z[i] - mx) * sf;
        R.cand[n] = x;
        R.idx[n] = (int32_t)i;
        n += x > lower_f;
    }
    R.n = n;
    R.padded = (n + W - 1) / W * W;
    storeu(R.cand + n, splat(-INFINITY));  // (the buffer holds d + W)
    R.t = R.lo = lower;
    R.hi = 0.0;
}

// Phase 2, once per pass: the sums at the threshold, then Halley's step on F(t) = P(t)^s - 1
// (kept in the bracket [lo, hi]), or done once Newton's step on P - 1 is small enough for the
// second-order finish of phase 3.
// (The sums of every row of a batch are taken first, then every row's step: interleaved, the
// scalar arithmetic of a step stalled the vector work of the next row's pass.)
void sum_powers(Row& R, bool lanes) {
    R.sums = evaluate(R.cand, R.padded, R.t, R.ex, R.pw, R.wt, lanes ? R.lanes : nullptr);
    ++R.used;
}

// (The sums of a batch of short rows, from the vectors sum_powers left; rows that are done
// keep theirs.)
void reduce_sums(Row* rows, int64_t count) {
    vf p = reduce_rows(rows, count, 0), q = reduce_rows(rows, count, 1);
    vf r = reduce_rows(rows, count, 2);
    for (int64_t b = 0; b < count; ++b) {
        if (!rows[b].done) rows[b].sums = Sums{p[b], q[b], r[b]};
    }
}

void step(Row& R) {
    const Sums& S = R.sums;
    const double s = R.s, e = R.e, u = S.p - 1.0;
    // (Three divisions, independent of each other: they dominated this step's time.)
    const double inv_eq = S.q > 0 ? 1.0 / (e * S.q) : 0.0;
    const double inv_p = 1.0 / S.p;
    // Newton's step on P - 1, refined to second order: phase 3 applies it to the powers.
    const double first = u * inv_eq;
    R.newton = (u + 0.5 * e * (e - 1.0) * first * first * S.r) * inv_eq;
    if (std::fabs(R.newton) <= R.step_limit && R.t + R.newton > R.cut) {
        R.done = R.converged = true;
        return;
    }
    double value = power_minus_one(u, s, R.es);
    if (value >= 0) R.lo = R.t; else R.hi = R.t;
    double scale = (1.0 + value) * inv_p;  // P^(s-1)
    double slope = -scale * S.q;
    double curv = scale * ((s - 1.0) * e * S.q * S.q * inv_p + (e - 1.0) * S.r);
    double den = 2.0 * slope * slope - value * curv;
    const bool halley = value >= 0 && den > 0;
    double move = (halley ? -2.0 * value * slope : -value) / (halley ? den : slope);
    double next = R.t + move;
    if (!(next > R.lo && next < R.hi)) next = 0.5 * (R.lo + R.hi);
    if (next == R.t) { R.newton = 0.0; R.done = R.converged = true; return; }
    R.t = next;
}

// Phase 3: the candidates' powers at the threshold moved by the last step (see
// set_step_limits) and their sum ...
void finish_powers(Row& R, bool lanes) {
    R.total = 0.0;
    if (lanes) R.lanes[0] = vf{};
    if (R.n == 0) return;
    // A row stopped by max_passes keeps its last threshold (the expansion needs a small step).
    if (!R.converged) R.newton = 0.0;
    const double delta = R.newton, e = R.e;
    const float th = (float)R.t, tl = (float)(R.t - (double)th);
    const double moved = R.t + delta;
    const float mh = (float)moved, ml = (float)(moved - (double)mh);
    const float first = (float)(e * delta), second = (float)(0.5 * e * (e - 1.0) * delta * delta);
    const float near_above = (float)(8.0 * std::fabs(delta)), near_below = -(float)std::fabs(delta);
    double total = 0.0;
    for (int64_t start = 0; start < R.padded; start += 16 * W) {
        const int64_t stop = start + 16 * W < R.padded ? start + 16 * W : R.padded;
        vf acc = vf{};
        for (int64_t j = start; j < stop; j += W) {
            vf x = loadu(R.cand + j);
            vf gap = (x - th) - tl;
            vi pos = gap > 0.0f;
            vf w = loadu(R.wt + j);
            vf r = pos ? w / (pos ? gap : splat(1.0f)) : splat(0.0f);
            vf p = loadu(R.pw + j) - first * w + second * r;
            vi near = (gap < near_above) & (gap > near_below);
            if (delta != 0.0 && any(near)) {
                // Keys within a few steps of the threshold (where the expansion fails, or
                // which enter or leave the support): their power at the new threshold.
                vf moved_gap = (x - mh) - ml;
                vi inside = moved_gap > 0.0f;
                p = near ? power(inside ? moved_gap : splat(1.0f), inside, R.ex) : p;
                R.crossed = R.crossed || any(near & (inside != pos));
            }
            p = p > 0.0f ? p : splat(0.0f);
            storeu(R.pw + j, p);
            acc += p;
        }
        if (lanes) { R.lanes[0] = acc; break; }  // (at most 16 W candidates)
        total += hsum(acc);
    }
    R.total = total;
    R.t = moved;
}

// ... and renormalised and put back in place (zeros elsewhere).
void finish(Row& R, int64_t d) {
    float* out = R.out;
    if (R.n == 0) { std::memset(out, 0, sizeof(float) * d); return; }
    const double total = R.total;
    const float inv = (float)(1.0 / (total > 0 ? total : 1.0));
#ifdef __AVX512F__
    const __m512 scale = _mm512_set1_ps(inv);
    int64_t pos = 0;
    for (int64_t b = 0; b < R.packed_blocks; ++b) {
        __mmask16 m = (__mmask16)R.masks[b];
        __m512 p = _mm512_mul_ps(_mm512_loadu_ps(R.pw + pos), scale);
        _mm512_storeu_ps(out + b * W, _mm512_maskz_expand_ps(m, p));
        pos += __builtin_popcount((unsigned)m);
    }
#endif
    for (int64_t j = R.packed_blocks * W; j < d; ++j) out[j] = 0.0f;
    for (int64_t j = R.packed_n; j < R.n; ++j) out[R.idx[j]] = R.pw[j] * inv;
}

// The start's offsets: two on short rows (where counting costs as much as a pass), four on
// longer ones (where a tighter bound leaves fewer candidates).
constexpr int NSHORT = 2, NLONG = 4;
constexpr float SHORT_OFFSETS[NSHORT] = {-0.5f, -0.25f};
constexpr float LONG_OFFSETS[NLONG] = {-0.5f, -0.25f, -0.125f, -0.0625f};
constexpr int64_t SHORT_ROW = 128;

// Rows per batch: enough to overlap short rows' dependency chains, few enough for the
// batch's scratch to stay in the L1 cache.
int64_t batch_rows(int64_t d) { return d >= 1024 ? 1 : (d >= 256 ? 4 : 16); }

// ln p for p > 0 (lanes with p <= 0: pass 1 and mask).
inline vf log_of(vf p) {
    vi bits = as_i(p);
    vi k = (bits - splati(0x3F3504F3)) >> 23;
    vf t = as_f(bits - (k << 23)) - 1.0f;
    vf l = t * (1.4426950216293335f + t * (-0.7213473320007324f + t * (0.4808982312679291f
        + t * (-0.3606966435909271f + t * (0.2885674238204956f + t * (-0.23961740732192993f
        + t * (0.20460057258605957f + t * (-0.19106268882751465f + t * (0.18617519736289978f
        + t * -0.10994996875524521f)))))))));
    return (__builtin_convertvector(k, vf) + l) * 0.6931471805599453f;
}

// The backward pass of one row: grad_z = w (g - <g, w> / sum w) with w = p / gap, and, if
// grad_alpha is not null, sum_i g_i dp_i/dalpha (see structattn.functional's
// _alpha_gradient_terms for the formula and its cancellation-free form).  In two sweeps, each
// taken for every row of a batch in turn (as the forward's phases are).
struct Back {
    const float* z;
    const float* probs;
    const float* grad;
    float* grad_z;
    float* grad_alpha;
    float* packed;  // scratch, 3 (d + W): the support's p, g and w, packed (alpha gradient)
    int64_t n;      // the support's size
    double s, tau, sw, sgw;
    float mx, p_max, k;
    vf lanes[5];  // partial sums left in vectors for reduce_rows (short rows)
};

// k = p^(1 - s) / w = (-tau) p_max^(-s) for the rows of a batch (one power for all): p^s =
// gap / T^s on every key (T the sum before renormalising) and the maximum's gap is -tau.
void set_power_scales(Back* rows, int64_t count) {
    vf p_max = splat(1.0f);
    LaneExponent ex{splat(1.0f), splat(1.0f), vf{}};
    vi keep = vi{};
    for (int64_t b = 0; b < count; ++b) {
        p_max[b] = rows[b].p_max > 0 ? rows[b].p_max : 1.0f;
        keep[b] = rows[b].p_max > 0 ? -1 : 0;
        ex.set((int)b, -rows[b].s);
    }
    vf scaled = power(p_max, keep, ex);
    for (int64_t b = 0; b < count; ++b) rows[b].k = (float)-rows[b].tau * scaled[b];
}

// Sweep 1: the weights w (into grad_z), their sum, <g, w> and the largest probability; for
// the alpha gradient also (p, g, w) of the support packed (3-25x fewer keys for its sweep).
void backward_weights(Back& B, int64_t d, bool lanes) {
    const float* z = B.z;
    const float* probs = B.probs;
    const float* grad = B.grad;
    float* grad_z = B.grad_z;
    const float mx = B.mx;
    const double tau = B.tau;
    const float sf = (float)B.s;
    const float th = (float)tau;
    const float tl = (float)(tau - (double)th);
    const int64_t stride = d + W;
    float* pp = B.packed;
    float* pg = pp + stride;
    float* pw = pg + stride;
    const bool pack = B.grad_alpha != nullptr;
    int64_t n = 0;
    double sw = 0, sgw = 0;
    vf vmax = vf{};
    for (int64_t start = 0; start < d; start += 16 * W) {
        const int64_t stop = start + 16 * W < d ? start + 16 * W : d;
        vf aw = vf{}, agw = vf{};
        for (int64_t i = start; i < stop; i += W) {
            vf p, g, zz;
            const bool full = i + W <= d;
            if (full) { p = loadu(probs + i); g = loadu(grad + i); zz = loadu(z + i); }
            else {
                float bp[W] = {0}, bg[W] = {0}, bz[W] = {0};
                std::memcpy(bp, probs + i, sizeof(float) * (d - i));
                std::memcpy(bg, grad + i, sizeof(float) * (d - i));
                std::memcpy(bz, z + i, sizeof(float) * (d - i));
                p = loadu(bp); g = loadu(bg); zz = loadu(bz);
            }
            vf gap = (rounded((zz - mx) * sf) - th) - tl;
            vi pos = (p > 0.0f) & (gap > 0.0f);
            vf w = pos ? p / (pos ? gap : splat(1.0f)) : splat(0.0f);
            aw += w; agw += g * w;
            vmax = p > vmax ? p : vmax;
            if (full) storeu(grad_z + i, w);
            else for (int64_t j = 0; i + j < d; ++j) grad_z[i + j] = w[j];
            if (pack) {
#ifdef __AVX512F__
                __mmask16 m = _mm512_test_epi32_mask((__m512i)pos, (__m512i)pos);
                _mm512_storeu_ps(pp + n, _mm512_maskz_compress_ps(m, (__m512)p));
                _mm512_storeu_ps(pg + n, _mm512_maskz_compress_ps(m, (__m512)g));
                _mm512_storeu_ps(pw + n, _mm512_maskz_compress_ps(m, (__m512)w));
                n += __builtin_popcount((unsigned)m);
#else
                for (int j = 0; j < W; ++j) {
                    pp[n] = p[j]; pg[n] = g[j]; pw[n] = w[j];
                    n += pos[j] != 0;
                }
#endif
            }
        }
        if (lanes) { B.lanes[0] = aw; B.lanes[1] = agw; break; }  // (at most 16 W keys)
        sw += hsum(aw); sgw += hsum(agw);
    }
    // Padding: p = 0 adds nothing to any of the alpha gradient's sums.
    if (pack) { storeu(pp + n, vf{}); storeu(pg + n, vf{}); storeu(pw + n, vf{}); }
    B.n = n;
    B.sw = sw;
    B.sgw = sgw;
    B.p_max = hmax(vmax);
}

// Sweep 2: grad_z = w (g - centre).
void backward_scores(Back& B, int64_t d) {
    const float* grad = B.grad;
    float* grad_z = B.grad_z;
    const float centre = (float)(B.sw > 0 ? B.sgw / B.sw : 0.0);
    int64_t i = 0;
    for (; i + W <= d; i += W) storeu(grad_z + i, loadu(grad_z + i) * (loadu(grad + i) - centre));
    for (; i < d; ++i) grad_z[i] = grad_z[i] * (grad[i] - centre);
}

// The alpha gradient from its five row sums <p, l>, <p, gamma>, <g, p>, <g, p l>, <g, p gamma>.
void alpha_gradient(Back& B, const double* sums) {
    const double s = B.s, ml = sums[0], mg = sums[1], gp = sums[2], gpl = sums[3], gpg = sums[4];
    const double centred = mg * gp - gpg;
    const double cross = mg * gpl - ml * gpg;
    *B.grad_alpha = (float)((centred - s * cross) / (1.0 - s * ml + s * s * mg));
}

// Sweep 3, for the alpha gradient: those sums over the support (packed by sweep 1); with
// lanes, left in vectors for reduce_rows.
void backward_alpha_sums(Back& B, int64_t d, bool lanes) {
    const float sf = (float)B.s;
    const float k = B.k;
    const float inv_s2 = (float)(1.0 / (B.s * B.s));
    const int64_t stride = d + W;
    const float* pp = B.packed;
    const float* pg = pp + stride;
    const float* pw = pg + stride;
    double sums[5] = {0, 0, 0, 0, 0};
    for (int64_t start = 0; start == 0 || start < B.n; start += 16 * W) {
        const int64_t stop = start + 16 * W < B.n ? start + 16 * W : B.n;
        vf acc[5] = {};
        for (int64_t j = start; j < stop; j += W) {
            vf p = loadu(pp + j), g = loadu(pg + j), w = loadu(pw + j);
            vi pos = p > 0.0f;
            vf l = pos ? log_of(pos ? p : splat(1.0f)) : splat(0.0f);
            vf t = sf * l;
            vi small = (t < 0.1f) & (t > -0.1f);
            vf series = 0.5f + t * (-1.0f / 6 + t * (1.0f / 24 + t * (-1.0f / 120)));
            vf direct = (w * k - p + p * t) * inv_s2;
            vf pgamma = pos ? (small ? p * l * l * series : direct) : splat(0.0f);
            vf pl = p * l;
            acc[0] += pl; acc[1] += pgamma; acc[2] += g * p; acc[3] += g * pl; acc[4] += g * pgamma;
        }
        if (lanes) { for (int m = 0; m < 5; ++m) B.lanes[m] = acc[m]; return; }
        for (int m = 0; m < 5; ++m) sums[m] += hsum(acc[m]);
    }
    alpha_gradient(B, sums);
}

// (For a batch of short rows: the sums of sweep 1 or of sweep 3 from their vectors.)
void reduce_weights(Back* rows, int64_t count) {
    vf sw = reduce_rows(rows, count, 0), sgw = reduce_rows(rows, count, 1);
    for (int64_t b = 0; b < count; ++b) { rows[b].sw = sw[b]; rows[b].sgw = sgw[b]; }
}

void reduce_alpha_sums(Back* rows, int64_t count) {
    vf sums[5];
    for (int m = 0; m < 5; ++m) sums[m] = reduce_rows(rows, count, m);
    for (int64_t b = 0; b < count; ++b) {
        double row[5];
        for (int m = 0; m < 5; ++m) row[m] = sums[m][b];
        alpha_gradient(rows[b], row);
    }
}

}  // namespace

// Phase 2's passes for the rows of a batch that are not done, then phase 3's powers and sums
// (for every row, or with only_retry for the rows resuming after a crossing finish).  Kept
// out of line: inlined at both call sites it slowed the passes by 5-10% (measured).
__attribute__((noinline)) void passes_and_finish(Row* rows, int64_t count, int max_passes,
                                                 bool lanes, bool only_retry) {
    for (int pass = 0; pass < max_passes; ++pass) {
        bool active = false;
        for (int64_t b = 0; b < count; ++b) {
            Row& R = rows[b];
            if (!R.done) { sum_powers(R, lanes); active = true; }
            else if (lanes) { for (vf& lane : R.lanes) lane = vf{}; }
        }
        if (!active) break;
        if (lanes) reduce_sums(rows, count);
        for (int64_t b = 0; b < count; ++b) {
            if (!rows[b].done) step(rows[b]);
        }
    }
    for (int64_t b = 0; b < count; ++b) {
        if (only_retry && !rows[b].retry) { if (lanes) rows[b].lanes[0] = vf{}; continue; }
        finish_powers(rows[b], lanes);
    }
    if (lanes) {
        vf totals = reduce_rows(rows, count, 0);
        for (int64_t b = 0; b < count; ++b) {
            if (!only_retry || rows[b].retry) rows[b].total = totals[b];
        }
    }
}

extern "C" {

// alpha-entmax of rows z: (rows, d) float32, slack = alpha - 1 in (0, 1] per row (float64,
// stride 0 or 1).  Writes out (rows, d), shift (rows,) float32 (the row maximum), tau (rows,)
// float64 (the threshold on x = (z - shift)(alpha - 1)) and, if not null, the passes per row
// and (added to *nonfinite) the number of rows holding NaN or +-inf.  Returns the number of
// rows not converged within max_passes.
int64_t structattn_entmax_bisect_f32(const float* z, const double* slack, int64_t slack_stride,
                                     float* out, float* shift, double* tau, int32_t* passes,
                                     int64_t rows, int64_t d, int32_t max_passes,
                                     int64_t* nonfinite) {
    const int64_t batch = batch_rows(d);
    const int64_t stride = d + W;
    std::vector<float> buffer(3 * batch * stride);
    std::vector<int32_t> idx(batch * stride);
    std::vector<uint16_t> masks(batch * (d / W + 1));
    std::vector<Row> state(batch);
    for (int64_t b = 0; b < batch; ++b) {
        Row& R = state[b];
        R.cand = buffer.data() + 3 * b * stride;
        R.pw = R.cand + stride;
        R.wt = R.pw + stride;
        R.idx = idx.data() + b * stride;
        R.masks = masks.data() + b * (d / W + 1);
    }
    int64_t unconverged = 0;
    bool changed = true;
    // Short rows (a batch of W, at most 16 W candidates each) leave their sums in vectors, and
    // each batch reduces them together (reduce_rows).
    const bool lanes = batch == W;
    for (int64_t r0 = 0; r0 < rows; r0 += batch) {
        const int64_t count = rows - r0 < batch ? rows - r0 : batch;
        for (int64_t b = 0; b < count; ++b) {
            Row& R = state[b];
            const double s = slack[(r0 + b) * slack_stride];
            if (s != R.s) {
                R.s = s; R.e = 1.0 / s; R.sf = (float)s;
                R.ex = Exponent(R.e); R.es = Exponent(s);
                changed = true;
            }
            R.z = z + (r0 + b) * d;
            R.out = out + (r0 + b) * d;
            find_max(R, d);
        }
        if (changed) set_step_limits(state.data(), count);
        changed = false;
        for (int64_t b = 0; b < count; ++b) {
            Row& R = state[b];
            if (R.done) { for (vf& lane : R.lanes) lane = vf{}; continue; }
            if (d <= SHORT_ROW) count_above(R, d, SHORT_OFFSETS, lanes);
            else count_above(R, d, LONG_OFFSETS, lanes);
        }
        const int noff = d <= SHORT_ROW ? NSHORT : NLONG;
        if (lanes) reduce_counts(state.data(), count, noff);
        set_lower_bounds(state.data(), count, noff);
        for (int64_t b = 0; b < count; ++b) {
            if (!state[b].done) pack(state[b], d);
        }
        passes_and_finish(state.data(), count, max_passes, lanes, false);
        // The second-order finish takes the support as fixed over the last step: a key that
        // crossed the threshold there left the sum off by its own power (about |step| as
        // alpha -> 2).  Such rows resume their passes from the moved threshold.
        for (int round = 0; round < 2; ++round) {
            bool again = false;
            for (int64_t b = 0; b < count; ++b) {
                Row& R = state[b];
                R.retry = R.crossed && R.used < max_passes
                          && std::fabs(R.total - 1.0) > 0x1p-22;
                R.crossed = false;
                if (!R.retry) continue;
                R.done = R.converged = false;
                R.newton = 0.0;
                R.lo = R.cut;   // P(cut) >= 1: the candidates' bound
                R.hi = 0.0;     // P(0) < 1: the maximum's gap is 0 there
                again = true;
            }
            if (!again) break;
            passes_and_finish(state.data(), count, max_passes, lanes, true);
        }
        for (int64_t b = 0; b < count; ++b) {
            Row& R = state[b];
            finish(R, d);
            shift[r0 + b] = R.mx;
            tau[r0 + b] = R.t;
            if (passes) passes[r0 + b] = R.used;
            unconverged += !R.converged;
            if (nonfinite) *nonfinite += !R.finite;
        }
    }
    return unconverged;
}

// The backward pass of structattn_entmax_bisect_f32 from its outputs: grad_z (rows, d) and, if
// grad_alpha (rows,) float32 is not null, the gradient with respect to each row's alpha.
void structattn_entmax_bisect_backward_f32(const float* z, const float* probs, const float* grad,
                                           const float* shift, const double* slack,
                                           int64_t slack_stride, const double* tau,
                                           float* grad_z, float* grad_alpha, int64_t rows,
                                           int64_t d) {
    const int64_t batch = batch_rows(d);
    const bool lanes = batch == W;  // (as in the forward pass)
    std::vector<Back> state(batch);
    std::vector<float> scratch(grad_alpha ? batch * 3 * (d + 2 * W) : 0);
    for (int64_t r0 = 0; r0 < rows; r0 += batch) {
        const int64_t count = rows - r0 < batch ? rows - r0 : batch;
        for (int64_t b = 0; b < count; ++b) {
            const int64_t r = r0 + b;
            state[b] = Back{z + r * d, probs + r * d, grad + r * d, grad_z + r * d,
                            grad_alpha ? grad_alpha + r : nullptr,
                            grad_alpha ? scratch.data() + b * 3 * (d + 2 * W) : nullptr, 0,
                            slack[r * slack_stride], tau[r], 0.0, 0.0, shift[r], 0.0f, 0.0f, {}};
            backward_weights(state[b], d, lanes);
        }
        if (lanes) reduce_weights(state.data(), count);
        for (int64_t b = 0; b < count; ++b) backward_scores(state[b], d);
        if (!grad_alpha) continue;
        set_power_scales(state.data(), count);
        for (int64_t b = 0; b < count; ++b) backward_alpha_sums(state[b], d, lanes);
        if (lanes) reduce_alpha_sums(state.data(), count);
    }
}

}  // extern "C"
