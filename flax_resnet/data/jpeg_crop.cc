// Decodes only a window of a JPEG, straight to RGB uint8, with libjpeg-turbo.
//
// Rows above the window are skipped (entropy-decoded only, no IDCT, upsampling
// or colour conversion: jpeg_skip_scanlines), columns outside it are cut
// before the IDCT (jpeg_crop_scanline), and decoding stops after its last row.
// This is what tf.data's decode_and_crop_jpeg does. Called from Python through
// ctypes (flax_resnet/data/jpeg.py); errors come back as a message, never as
// libjpeg's default exit().

#include <csetjmp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include <jpeglib.h>
// jpeglib.h first: jerror.h needs its types.
#include <jerror.h>

namespace {

struct ErrorManager {
  jpeg_error_mgr base;
  std::jmp_buf jump;
  char* message;
  int message_size;
};

void ErrorExit(j_common_ptr cinfo) {
  auto* errors = reinterpret_cast<ErrorManager*>(cinfo->err);
  char text[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, text);
  std::snprintf(errors->message, errors->message_size, "%s", text);
  std::longjmp(errors->jump, 1);
}

// Warnings are ignored as PIL ignores them (ImageNet has JPEGs with stray
// bytes that decode fine), except running out of data: a truncated file would
// otherwise come back padded with grey, where PIL raises.
void EmitMessage(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
    ErrorExit(cinfo);
  }
}

// What the caller needs on every path: libjpeg state plus the error hooks.
struct Decoder {
  jpeg_decompress_struct cinfo;
  ErrorManager errors;

  Decoder(char* message, int message_size) {
    cinfo.err = jpeg_std_error(&errors.base);
    errors.base.error_exit = ErrorExit;
    errors.base.emit_message = EmitMessage;
    errors.message = message;
    errors.message_size = message_size;
    jpeg_create_decompress(&cinfo);
  }
  ~Decoder() { jpeg_destroy_decompress(&cinfo); }
};

// Colour spaces libjpeg itself converts to RGB; CMYK/YCCK are left to PIL.
bool ConvertsToRgb(J_COLOR_SPACE space) {
  return space == JCS_YCbCr || space == JCS_RGB || space == JCS_GRAYSCALE;
}

}  // namespace

extern "C" {

// Image size; returns 0, 1 (a JPEG this decoder leaves to PIL: CMYK/YCCK) or
// -1 (not a readable JPEG, reason in `message`).
int FlaxResnetJpegInfo(const uint8_t* data, size_t size, int* width,
                       int* height, char* message, int message_size) {
  Decoder decoder(message, message_size);
  jpeg_decompress_struct* cinfo = &decoder.cinfo;
  if (setjmp(decoder.errors.jump)) return -1;
  jpeg_mem_src(cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(cinfo, TRUE);
  *width = static_cast<int>(cinfo->image_width);
  *height = static_cast<int>(cinfo->image_height);
  return ConvertsToRgb(cinfo->jpeg_color_space) ? 0 : 1;
}

// Decodes the image at scale 1/scale_denom (1, 2, 4 or 8; the size is then
// ceil(size / scale_denom), as PIL's draft gives) and writes the window
// [left, left + width) x [top, top + height) of that scaled image as RGB into
// `out` (height * width * 3 bytes). Returns 0, 1 (left to PIL) or -1 (error,
// reason in `message`).
int FlaxResnetJpegDecodeCrop(const uint8_t* data, size_t size,
                             int scale_denom, int left, int top, int width,
                             int height, uint8_t* out, char* message,
                             int message_size) {
  Decoder decoder(message, message_size);
  jpeg_decompress_struct* cinfo = &decoder.cinfo;
  // Declared before setjmp: nothing with a destructor may be skipped by the
  // longjmp out of libjpeg.
  std::vector<uint8_t> rows;
  std::vector<JSAMPROW> row_pointers;
  if (setjmp(decoder.errors.jump)) return -1;
  jpeg_mem_src(cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(cinfo, TRUE);
  if (!ConvertsToRgb(cinfo->jpeg_color_space)) return 1;
  cinfo->out_color_space = JCS_RGB;
  cinfo->scale_num = 1;
  cinfo->scale_denom = static_cast<unsigned int>(scale_denom);
  jpeg_start_decompress(cinfo);
  if (left < 0 || top < 0 || width <= 0 || height <= 0 ||
      static_cast<JDIMENSION>(left + width) > cinfo->output_width ||
      static_cast<JDIMENSION>(top + height) > cinfo->output_height) {
    std::snprintf(message, message_size,
                  "crop window %dx%d at (%d, %d) outside the %ux%u image",
                  width, height, left, top, cinfo->output_width,
                  cinfo->output_height);
    return -1;
  }
  // libjpeg widens the window leftwards to an iMCU boundary (and may widen
  // it to the right); the rows it returns are cut back here. At the edges of
  // what it decodes, fancy chroma upsampling has no neighbour sample and
  // repeats the edge one, unlike a full decode: so ask for kEdge more columns
  // each side, which keeps the window's pixels exactly a full decode's.
  constexpr int kEdge = 2;
  const int wide_left = left > kEdge ? left - kEdge : 0;
  const int wide_right =
      left + width + kEdge < static_cast<int>(cinfo->output_width)
          ? left + width + kEdge
          : static_cast<int>(cinfo->output_width);
  JDIMENSION x_offset = static_cast<JDIMENSION>(wide_left);
  JDIMENSION crop_width = static_cast<JDIMENSION>(wide_right - wide_left);
  if (crop_width < cinfo->output_width) {
    jpeg_crop_scanline(cinfo, &x_offset, &crop_width);
  } else {
    x_offset = 0;
  }
  const size_t skip_bytes = static_cast<size_t>(left - x_offset) * 3;
  const size_t row_bytes = static_cast<size_t>(width) * 3;
  const size_t decoded_row_bytes = static_cast<size_t>(cinfo->output_width) * 3;
  if (top > 0) jpeg_skip_scanlines(cinfo, static_cast<JDIMENSION>(top));
  const int group = cinfo->rec_outbuf_height > 0 ? cinfo->rec_outbuf_height : 1;
  rows.resize(decoded_row_bytes * group);
  row_pointers.resize(group);
  for (int i = 0; i < group; ++i) row_pointers[i] = &rows[decoded_row_bytes * i];
  int done = 0;
  while (done < height) {
    JDIMENSION got = jpeg_read_scanlines(
        cinfo, row_pointers.data(),
        static_cast<JDIMENSION>(height - done < group ? height - done : group));
    if (got == 0) {  // only a suspending data source returns nothing
      std::snprintf(message, message_size, "decoder returned no rows");
      return -1;
    }
    for (JDIMENSION i = 0; i < got; ++i) {
      std::memcpy(out + row_bytes * (done + i), row_pointers[i] + skip_bytes,
                  row_bytes);
    }
    done += static_cast<int>(got);
  }
  // The rows below the window are never decoded.
  jpeg_abort_decompress(cinfo);
  return 0;
}

}  // extern "C"
