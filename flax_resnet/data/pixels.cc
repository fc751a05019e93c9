// Normalising uint8 pixels into float32 through a per-channel table.
//
// A uint8 channel has 256 values, so (value - mean[c]) / std[c] has at most
// 256 results per channel: the caller computes them once, in float32 with
// numpy (so each is bit for bit what numpy's per-pixel arithmetic gives), and
// this loop only looks them up. One read and one write per value, where
// numpy's subtract-then-divide makes two float32 passes and divides.

#include <cstddef>
#include <cstdint>

extern "C" {

// dst (height, width, channels, C order) = table[src value * channels + c].
// src is strided by rows and pixels (in bytes, either sign: flipped and
// cropped views), its channels adjacent.
void FlaxResnetNormalizeU8(const uint8_t* src, int64_t height, int64_t width,
                           int channels, int64_t row_stride,
                           int64_t pixel_stride, const float* table,
                           float* dst) {
  for (int64_t y = 0; y < height; ++y) {
    const uint8_t* row = src + y * row_stride;
    float* out = dst + y * width * channels;
    if (channels == 3) {
      for (int64_t x = 0; x < width; ++x) {
        const uint8_t* s = row + x * pixel_stride;
        out[3 * x] = table[3 * s[0]];
        out[3 * x + 1] = table[3 * s[1] + 1];
        out[3 * x + 2] = table[3 * s[2] + 2];
      }
      continue;
    }
    for (int64_t x = 0; x < width; ++x) {
      for (int c = 0; c < channels; ++c) {
        out[x * channels + c] = table[row[x * pixel_stride + c] * channels + c];
      }
    }
  }
}

}  // extern "C"
