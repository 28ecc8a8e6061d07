use std::path::Path;

use image::{DynamicImage, GrayImage, ImageFormat, ImageReader, RgbImage};

use crate::DataError;

/// Decodes any supported image (PNG, JPEG, BMP, TIFF; gray, 16-bit, alpha) into 8-bit RGB, as PIL's
/// `convert("RGB")` does: gray is replicated, alpha is dropped, 16-bit is rounded to 8-bit. JPEGs go
/// through libjpeg-turbo's decoder, PIL's own, so their pixels are identical to PyTorch pipelines'.
pub fn load_rgb8(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let decode_error = |reason: String| DataError::Decode { path: path.into(), reason };
    let format = image::guess_format(&bytes).map_err(|_| decode_error("not a PNG, JPEG, BMP or TIFF file".into()))?;
    if format == ImageFormat::Jpeg
        && let Some(rgb) = decode_jpeg(&bytes).map_err(decode_error)?
    {
        return Ok(rgb);
    }
    let image = ImageReader::with_format(std::io::Cursor::new(&bytes), format).decode().map_err(|e| decode_error(e.to_string()))?;
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// Decodes a ground-truth mask into one 8-bit channel; any non-zero pixel is defective.
pub fn load_mask(path: &Path) -> Result<GrayImage, DataError> {
    let reader = ImageReader::open(path).map_err(|e| DataError::io(path, e))?.with_guessed_format().map_err(|e| DataError::io(path, e))?;
    let image = reader.decode().map_err(|e| DataError::Decode { path: path.into(), reason: e.to_string() })?;
    Ok(image.to_luma8())
}

/// libjpeg-turbo decoding to RGB; `None` for colour spaces it cannot convert to RGB (CMYK), which the
/// image crate then handles. libjpeg reports fatal errors by unwinding, caught here.
fn decode_jpeg(bytes: &[u8]) -> Result<Option<RgbImage>, String> {
    // libjpeg only warns about a missing end-of-image marker and pads with gray; PIL refuses the file.
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err("truncated JPEG (no end-of-image marker)".into());
    }
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Option<RgbImage>> {
        let decompress = mozjpeg::Decompress::with_markers(&[]).from_mem(bytes)?;
        if matches!(decompress.color_space(), mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK) {
            return Ok(None);
        }
        let (width, height) = (decompress.width() as u32, decompress.height() as u32);
        let mut started = decompress.rgb()?;
        let pixels: Vec<u8> = started.read_scanlines::<[u8; 3]>()?.into_iter().flatten().collect();
        started.finish()?;
        Ok(RgbImage::from_raw(width, height, pixels))
    });
    match decoded {
        Ok(Ok(Some(image))) => Ok(Some(image)),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "corrupt JPEG".into())),
    }
}
