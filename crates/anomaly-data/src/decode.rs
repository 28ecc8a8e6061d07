use std::io::{Cursor, Read};
use std::path::Path;

use image::{DynamicImage, GrayImage, ImageFormat, ImageReader, RgbImage};

use crate::DataError;

/// What one image may cost to decode, checked from the file's header before any pixel is decoded, so that
/// a small file claiming to be huge (a "decompression bomb") is refused instead of exhausting memory. One
/// value serves every command (`--max-pixels`) and the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    max_pixels: u64,
}

impl ImageLimits {
    /// 64 megapixels: above any industrial camera's frame, well below what exhausts a workstation
    /// (one such image is 192 MB as 8-bit RGB).
    pub const DEFAULT_MAX_PIXELS: u64 = 64_000_000;

    /// At most `max_pixels` pixels (width × height) per image.
    pub fn new(max_pixels: u64) -> Self {
        Self { max_pixels }
    }

    /// The most pixels an image may have.
    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
    }

    /// Refuses an image whose header says it is larger than the limit.
    fn check(&self, path: &Path, width: u64, height: u64) -> Result<(), DataError> {
        let pixels = width.saturating_mul(height);
        if pixels > self.max_pixels {
            return Err(DataError::TooLarge { path: path.into(), width, height, max_pixels: self.max_pixels });
        }
        Ok(())
    }

    /// The largest file an image within the limit can plausibly be: 8 bytes a pixel (uncompressed 16-bit
    /// RGBA) plus 64 MiB of metadata. Anything larger is refused before it is read into memory.
    fn max_file_bytes(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(64 << 20)
    }

    /// Decoder limits for the image crate, as a second line of defence behind the header check: room for
    /// the largest allowed image at 16-bit RGBA.
    fn decoder_limits(&self) -> image::Limits {
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8).max(512 << 20));
        limits
    }
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_PIXELS)
    }
}

/// Decodes any supported image (PNG, JPEG, BMP, TIFF; gray, 16-bit, alpha) into 8-bit RGB, as PIL's
/// `convert("RGB")` does: gray is replicated, alpha is dropped, 16-bit is rounded to 8-bit. JPEGs go
/// through libjpeg-turbo's decoder, PIL's own, so their pixels are identical to PyTorch pipelines'.
/// Images larger than `limits` are refused from their header, before decoding.
pub fn load_rgb8(path: &Path, limits: &ImageLimits) -> Result<RgbImage, DataError> {
    let (bytes, format) = read_image_file(path, limits)?;
    decode_rgb8(&bytes, format, path, limits)
}

/// As [`load_rgb8`], for an image already in memory (an upload to the service); `name` stands for the file
/// in errors. The same limits apply: a body larger than any image within them, or a header declaring too
/// many pixels, is refused before decoding.
pub fn decode_rgb8_bytes(bytes: &[u8], name: &Path, limits: &ImageLimits) -> Result<RgbImage, DataError> {
    if bytes.len() as u64 > limits.max_file_bytes() {
        return Err(DataError::FileTooLarge { path: name.into(), bytes: bytes.len() as u64, max_pixels: limits.max_pixels() });
    }
    decode_rgb8(bytes, image_format(bytes, name)?, name, limits)
}

/// As [`load_rgb8`], with the colour type the file stores (e.g. `Rgb8`, `L16`) from its header, for one
/// read of the file.
pub fn load_rgb8_and_color(path: &Path, limits: &ImageLimits) -> Result<(RgbImage, String), DataError> {
    let (bytes, format) = read_image_file(path, limits)?;
    let decoder =
        ImageReader::with_format(Cursor::new(&bytes), format).into_decoder().map_err(|e| DataError::decode(path, e.to_string()))?;
    let color = format!("{:?}", image::ImageDecoder::color_type(&decoder));
    Ok((decode_rgb8(&bytes, format, path, limits)?, color))
}

/// Decodes a ground-truth mask into one 8-bit channel; any non-zero pixel is defective. Limited as
/// [`load_rgb8`] is.
pub fn load_mask(path: &Path, limits: &ImageLimits) -> Result<GrayImage, DataError> {
    let (bytes, format) = read_image_file(path, limits)?;
    Ok(decode_with_image_crate(&bytes, format, path, limits)?.to_luma8())
}

/// A read image file's bytes to 8-bit RGB: libjpeg-turbo for JPEGs it can convert, the image crate else.
fn decode_rgb8(bytes: &[u8], format: ImageFormat, path: &Path, limits: &ImageLimits) -> Result<RgbImage, DataError> {
    if format == ImageFormat::Jpeg
        && let Some(rgb) = decode_jpeg(bytes, path, limits)?
    {
        return Ok(rgb);
    }
    Ok(match decode_with_image_crate(bytes, format, path, limits)? {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// Reads an image file whole, refusing what is not a regular file (a FIFO would block forever), a file
/// larger than any image within the limit, and a file that is not a PNG, JPEG, BMP or TIFF.
fn read_image_file(path: &Path, limits: &ImageLimits) -> Result<(Vec<u8>, ImageFormat), DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let metadata = file.metadata().map_err(|e| DataError::io(path, e))?;
    if !metadata.is_file() {
        return Err(DataError::NotImage { path: path.into() });
    }
    if metadata.len() > limits.max_file_bytes() {
        return Err(DataError::FileTooLarge { path: path.into(), bytes: metadata.len(), max_pixels: limits.max_pixels() });
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    // The file may grow while it is read; never read more than the limit allows.
    file.take(limits.max_file_bytes() + 1).read_to_end(&mut bytes).map_err(|e| DataError::io(path, e))?;
    if bytes.len() as u64 > limits.max_file_bytes() {
        return Err(DataError::FileTooLarge { path: path.into(), bytes: bytes.len() as u64, max_pixels: limits.max_pixels() });
    }
    let format = image_format(&bytes, path)?;
    Ok((bytes, format))
}

/// The format an image's first bytes say it is in, if it is one we decode.
fn image_format(bytes: &[u8], path: &Path) -> Result<ImageFormat, DataError> {
    image::guess_format(bytes)
        .ok()
        .filter(|f| matches!(f, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Bmp | ImageFormat::Tiff))
        .ok_or_else(|| DataError::decode(path, "not a PNG, JPEG, BMP or TIFF file"))
}

/// The image crate's decoder: the header is read once, its dimensions checked against the limit, then
/// the pixels decoded.
fn decode_with_image_crate(bytes: &[u8], format: ImageFormat, path: &Path, limits: &ImageLimits) -> Result<DynamicImage, DataError> {
    let decode_error = |e: image::ImageError| DataError::decode(path, e.to_string());
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.decoder_limits());
    let decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    limits.check(path, width.into(), height.into())?;
    DynamicImage::from_decoder(decoder).map_err(decode_error)
}

/// libjpeg-turbo decoding to RGB; `None` for colour spaces it cannot convert to RGB (CMYK), which the
/// image crate then handles. The frame header's size is checked against the limit before decoding, and so
/// is the number of scans (each progressive scan re-reads the whole image: thousands of tiny scans are a
/// CPU bomb). libjpeg reports fatal errors by unwinding, caught here.
fn decode_jpeg(bytes: &[u8], path: &Path, limits: &ImageLimits) -> Result<Option<RgbImage>, DataError> {
    let decode_error = |reason: String| DataError::decode(path, reason);
    // libjpeg only warns about a missing end-of-image marker and pads with gray; PIL refuses the file.
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(decode_error("truncated JPEG (no end-of-image marker)".into()));
    }
    // Start-of-scan markers cannot occur inside entropy-coded data (0xFF is stuffed there), so this counts scans.
    let scans = bytes.windows(2).filter(|w| *w == [0xFF, 0xDA]).count();
    if scans > MAX_JPEG_SCANS {
        return Err(decode_error(format!("{scans} scans (more than {MAX_JPEG_SCANS}): not a camera image")));
    }
    let decoded = std::panic::catch_unwind(|| -> Result<Option<RgbImage>, DataError> {
        let io_error = |e: std::io::Error| decode_error(e.to_string());
        let decompress = mozjpeg::Decompress::with_markers(&[]).from_mem(bytes).map_err(io_error)?;
        let (width, height) = (decompress.width() as u32, decompress.height() as u32);
        limits.check(path, width.into(), height.into())?;
        if matches!(decompress.color_space(), mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK) {
            return Ok(None);
        }
        let mut started = decompress.rgb().map_err(io_error)?;
        let pixels: Vec<u8> = started.read_scanlines::<[u8; 3]>().map_err(io_error)?.into_iter().flatten().collect();
        started.finish().map_err(io_error)?;
        Ok(RgbImage::from_raw(width, height, pixels))
    });
    match decoded {
        Ok(result) => result,
        Err(panic) => Err(decode_error(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "corrupt JPEG".into()),
        )),
    }
}

/// More scans than any encoder writes (progressive JPEGs have about ten).
const MAX_JPEG_SCANS: usize = 256;
