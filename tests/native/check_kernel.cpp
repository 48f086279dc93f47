// Runs the CPU entmax kernel (structattn/_native_entmax.cpp, included below) over awkward
// shapes under the address and undefined-behaviour sanitizers: row lengths around the vector
// width, masked keys, rows of -inf only, one alpha for all rows and one per row, one pass and
// many, with and without the alpha gradient.  Exits non-zero on a non-finite output, a row
// that does not sum to 1, or (through the sanitizers) any out-of-bounds access.
#include STRUCTATTN_KERNEL

#include <cstdio>
#include <random>
#include <vector>

int main() {
    std::mt19937 generator(0);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::uniform_real_distribution<double> uniform(0.1, 1.0);
    const int64_t lengths[] = {1, 3, 15, 16, 17, 31, 64, 100, 257, 1025};
    const int64_t row_counts[] = {1, 5, 17, 33};
    int failures = 0;
    for (int64_t d : lengths) {
        for (int64_t rows : row_counts) {
            for (int per_row = 0; per_row < 2; ++per_row) {
                for (int passes : {1, 50}) {
                    std::vector<float> z(rows * d), out(rows * d), shift(rows), grad(rows * d);
                    std::vector<float> grad_z(rows * d);
                    std::vector<double> tau(rows), slack(per_row ? rows : 1);
                    std::vector<float> grad_alpha(rows);
                    std::vector<int32_t> used(rows);
                    for (auto& v : z) v = normal(generator);
                    for (auto& v : grad) v = normal(generator);
                    for (auto& v : slack) v = uniform(generator);
                    slack[0] = 1.0;
                    for (int64_t i = 0; i < rows * d; i += 7) z[i] = -INFINITY;  // masked keys
                    if (rows > 2)
                        for (int64_t i = 0; i < d; ++i) z[2 * d + i] = -INFINITY;  // an empty row
                    structattn_entmax_bisect_f32(z.data(), slack.data(), per_row ? 1 : 0,
                                                 out.data(), shift.data(), tau.data(),
                                                 used.data(), rows, d, passes, nullptr);
                    for (int with_alpha = 0; with_alpha < 2; ++with_alpha) {
                        structattn_entmax_bisect_backward_f32(
                            z.data(), out.data(), grad.data(), shift.data(), slack.data(),
                            per_row ? 1 : 0, tau.data(), grad_z.data(),
                            with_alpha ? grad_alpha.data() : nullptr, rows, d);
                    }
                    for (int64_t r = 0; r < rows; ++r) {
                        double total = 0.0;
                        bool any = false;
                        for (int64_t i = 0; i < d; ++i) {
                            const float p = out[r * d + i];
                            any = any || z[r * d + i] > -INFINITY;
                            if (!std::isfinite(p) || p < 0 || !std::isfinite(grad_z[r * d + i])) {
                                ++failures;
                            }
                            total += p;
                        }
                        if (!std::isfinite(grad_alpha[r])) ++failures;
                        if (any ? std::fabs(total - 1.0) > 1e-5 : total != 0.0) {
                            std::printf("row %lld of %lld x %lld sums to %g\n", (long long)r,
                                        (long long)rows, (long long)d, total);
                            ++failures;
                        }
                    }
                }
            }
        }
    }
    std::printf("%d failures\n", failures);
    return failures == 0 ? 0 : 1;
}
