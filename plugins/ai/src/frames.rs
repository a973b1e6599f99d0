//! What arrives from cameras and callers, turned into input tensors: PNG/JPEG decoding with the
//! model's preprocessing (resize, scale, mean/std, channel order, layout), and
//! `sensor_msgs/CompressedImage` as the ROS bridge sends it (CDR).
//!
//! Every function here takes untrusted bytes and returns an error rather than panicking.

use crate::config::image_dims;
pub use crate::config::{Channels, ImageConfig, Layout};
use crate::tensor::{Data, Tensor};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("not a PNG or JPEG image: {0}")]
    Decode(String),
    #[error("not a sensor_msgs/CompressedImage in CDR: {0}")]
    Cdr(String),
    /// Decoding would allocate more than the caller's limit.
    #[error("{what}, more than the limit of {limit} bytes for one request")]
    TooLarge { what: String, limit: usize },
}

/// Decodes untrusted PNG or JPEG bytes into 8-bit RGB, allocating at most `max_decoded` bytes
/// for the pixels: the size the header declares (width × height × bytes per pixel, plus the
/// RGB copy when the image is not already RGB) is checked before anything is decoded.
pub fn decode_rgb(bytes: &[u8], max_decoded: usize) -> Result<image::RgbImage, FrameError> {
    decode_to(bytes, None, max_decoded)
}

/// Decodes, then resizes to `target` (width, height) when given and different. The peak of
/// either step must fit `max_decoded`: resizing a very wide image to a few hundred rows costs
/// a float buffer of `source width × target height`, far more than the image itself.
fn decode_to(
    bytes: &[u8],
    target: Option<(u32, u32)>,
    max_decoded: usize,
) -> Result<image::RgbImage, FrameError> {
    let too_large = |what: String| FrameError::TooLarge {
        what,
        limit: max_decoded,
    };
    let format = image::guess_format(bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(FrameError::Decode(format!(
            "{format:?} is not supported; send PNG or JPEG"
        )));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_decoded as u64);
    reader.limits(limits);
    let limit_error = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => too_large(format!("decoding the image: {l}")),
        e => FrameError::Decode(e.to_string()),
    };
    let decoder = reader.into_decoder().map_err(limit_error)?;
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    let color = image::ImageDecoder::color_type(&decoder);
    let resize = target.filter(|&t| t != (width, height));
    let (w, h) = (u128::from(width), u128::from(height));
    let rgb = w * h * 3;
    let decoding = w * h * u128::from(color.bytes_per_pixel())
        + if color == image::ColorType::Rgb8 {
            0
        } else {
            rgb
        };
    let resizing = resize.map_or(0, |(tw, th)| {
        // image's resize: a 4 × f32 buffer of source width × target height, then the output.
        rgb + w * u128::from(th) * 16 + u128::from(tw) * u128::from(th) * 3
    });
    let need = decoding.max(resizing);
    if need > max_decoded as u128 {
        return Err(too_large(format!(
            "a {width}×{height} {color:?} image takes {need} bytes to decode{}",
            if resizing > decoding {
                " and resize"
            } else {
                ""
            }
        )));
    }
    let decoded = image::DynamicImage::from_decoder(decoder)
        .map_err(limit_error)?
        .into_rgb8();
    Ok(match resize {
        Some((tw, th)) => {
            image::imageops::resize(&decoded, tw, th, image::imageops::FilterType::Triangle)
        }
        None => decoded,
    })
}

/// Decodes untrusted PNG or JPEG bytes and preprocesses them for an input of `shape` as `image`
/// says: resize, scale, mean/std, channel order, layout. `max_decoded` caps the bytes decoding
/// and resizing may hold, checked against the image's header before decoding.
pub fn image_tensor(
    bytes: &[u8],
    image: &ImageConfig,
    shape: &[usize],
    max_decoded: usize,
) -> Result<Tensor, FrameError> {
    let (h, w) = image_dims(shape, image.layout).ok_or_else(|| {
        FrameError::Decode(format!("the model's input {shape:?} is not an image input"))
    })?;
    let target = u32::try_from(w)
        .ok()
        .zip(u32::try_from(h).ok())
        .ok_or_else(|| {
            FrameError::Decode(format!(
                "the model's input {shape:?} is too large for an image"
            ))
        })?;
    let len = crate::tensor::element_count(shape).map_err(|e| FrameError::Decode(e.to_string()))?;
    let rgb = decode_to(bytes, Some(target), max_decoded)?;
    let mut out = vec![0f32; len];
    for (x, y, px) in rgb.enumerate_pixels() {
        for c in 0..3 {
            let src = match image.channels {
                Channels::Rgb => c,
                Channels::Bgr => 2 - c,
            };
            let v = (f32::from(px.0[src]) * image.scale - image.mean[c]) / image.std[c];
            let (x, y) = (x as usize, y as usize);
            let at = match image.layout {
                Layout::Nchw => c * h * w + y * w + x,
                Layout::Nhwc => (y * w + x) * 3 + c,
            };
            out[at] = v;
        }
    }
    Tensor::new(shape.to_vec(), Data::F32(out)).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Whether `bytes` look like PNG or JPEG (rather than CDR).
pub fn is_image(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

/// The image bytes inside a CDR-encoded `sensor_msgs/CompressedImage`
/// (header: stamp sec/nanosec, frame_id; format; data), from untrusted bytes.
pub fn compressed_image_data(cdr: &[u8]) -> Result<&[u8], FrameError> {
    let bad = |m: &str| FrameError::Cdr(m.to_string());
    if cdr.len() < 4 || cdr[0] != 0 {
        return Err(bad("no CDR encapsulation header"));
    }
    let little = match cdr[1] {
        0 => false,
        1 => true,
        _ => return Err(bad("the encapsulation is not plain CDR")),
    };
    let body = &cdr[4..];
    let mut at = 8usize; // stamp: int32 sec, uint32 nanosec
    let u32_at = |at: &mut usize| -> Result<usize, FrameError> {
        *at = (*at + 3) & !3;
        let b = body
            .get(*at..*at + 4)
            .ok_or_else(|| bad("it is cut short"))?;
        *at += 4;
        let a = [b[0], b[1], b[2], b[3]];
        Ok(if little {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        } as usize)
    };
    for _string in 0..2 {
        // frame_id, then format: length (with the NUL) and bytes.
        let len = u32_at(&mut at)?;
        at = at
            .checked_add(len)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| bad("a string runs past the end"))?;
    }
    let len = u32_at(&mut at)?;
    body.get(at..at.saturating_add(len))
        .ok_or_else(|| bad("the image data runs past the end"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DEFAULT_MAX_DECODED_BYTES as LIMIT;

    fn config(layout: Layout, channels: Channels) -> ImageConfig {
        ImageConfig {
            resize: None,
            mean: [0.5, 0.5, 0.5],
            std: [0.5, 0.5, 0.5],
            scale: 1.0 / 255.0,
            channels,
            layout,
        }
    }

    fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn pixels_land_where_the_layout_says() {
        let bytes = png(4, 2, |x, y| [(x * 60) as u8, (y * 200) as u8, 255]);
        let t = image_tensor(
            &bytes,
            &config(Layout::Nchw, Channels::Rgb),
            &[1, 3, 2, 4],
            LIMIT,
        )
        .unwrap();
        let Data::F32(v) = &t.data else { panic!() };
        let norm = |p: f32| (p / 255.0 - 0.5) / 0.5;
        assert!((v[3] - norm(180.0)).abs() < 1e-6); // R at (x=3, y=0)
        assert!((v[8 + 4] - norm(200.0)).abs() < 1e-6); // G at (x=0, y=1)
        assert!((v[16] - 1.0).abs() < 1e-6); // B = 255
        let t = image_tensor(
            &bytes,
            &config(Layout::Nhwc, Channels::Bgr),
            &[1, 2, 4, 3],
            LIMIT,
        )
        .unwrap();
        let Data::F32(v) = &t.data else { panic!() };
        assert!((v[3 * 3] - 1.0).abs() < 1e-6); // B first at (x=3, y=0)
        assert!((v[3 * 3 + 2] - norm(180.0)).abs() < 1e-6); // then R
    }

    #[test]
    fn other_sizes_are_resized_and_garbage_is_an_error() {
        let bytes = png(64, 48, |_, _| [10, 20, 30]);
        let t = image_tensor(
            &bytes,
            &config(Layout::Nchw, Channels::Rgb),
            &[1, 3, 24, 32],
            LIMIT,
        )
        .unwrap();
        assert_eq!(t.shape, vec![1, 3, 24, 32]);
        assert!(image_tensor(
            b"garbage",
            &config(Layout::Nchw, Channels::Rgb),
            &[1, 3, 2, 2],
            LIMIT
        )
        .is_err());
        assert!(image_tensor(
            &bytes[..40],
            &config(Layout::Nchw, Channels::Rgb),
            &[1, 3, 2, 2],
            LIMIT
        )
        .is_err());
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([90, 60, 30]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn declared_image_size_is_checked_before_decoding() {
        let cfg = config(Layout::Nchw, Channels::Rgb);
        let shape = [1, 3, 24, 32];
        // A JPEG whose frame header claims 5000×5000 (75 MB of RGB): refused from its header.
        let mut big = jpeg(16, 16);
        let sof = big
            .windows(4)
            .position(|w| w == [0xFF, 0xC0, 0x00, 0x11])
            .unwrap();
        big[sof + 5..sof + 9].copy_from_slice(&[0x13, 0x88, 0x13, 0x88]);
        let e = image_tensor(&big, &cfg, &shape, LIMIT).unwrap_err();
        assert!(
            matches!(&e, FrameError::TooLarge { what, limit: LIMIT } if what.contains("5000×5000")),
            "{e}"
        );
        assert!(e.to_string().contains("67108864 bytes"), "{e}");
        // Under a raised limit the same header gets as far as decoding.
        assert!(!matches!(
            image_tensor(&big, &cfg, &shape, 128 << 20),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(image_tensor(&jpeg(16, 16), &cfg, &shape, LIMIT).is_ok());
        assert_eq!(
            decode_rgb(&jpeg(16, 16), LIMIT).unwrap().dimensions(),
            (16, 16)
        );
        assert!(matches!(
            decode_rgb(&jpeg(16, 16), 100),
            Err(FrameError::TooLarge { limit: 100, .. })
        ));
    }

    #[test]
    fn a_wide_image_cannot_blow_up_the_resize() {
        // 3 MiB of pixels, but resizing it to 480 rows would take 2^20 × 480 × 16 bytes (8 GB).
        let wide = png(1 << 20, 1, |_, _| [1, 2, 3]);
        let e = image_tensor(
            &wide,
            &config(Layout::Nchw, Channels::Rgb),
            &[1, 3, 480, 640],
            LIMIT,
        )
        .unwrap_err();
        assert!(
            matches!(&e, FrameError::TooLarge { what, .. } if what.contains("and resize")),
            "{e}"
        );
        assert_eq!(decode_rgb(&wide, LIMIT).unwrap().dimensions(), (1 << 20, 1));
    }

    #[test]
    fn compressed_image_cdr_yields_its_data() {
        // header.stamp (8), frame_id "cam\0", format "jpeg\0" (aligned), data [FF D8 FF 01]
        let mut body = vec![1, 0, 0, 0, 2, 0, 0, 0];
        body.extend_from_slice(&4u32.to_le_bytes());
        body.extend_from_slice(b"cam\0");
        body.extend_from_slice(&5u32.to_le_bytes());
        body.extend_from_slice(b"jpeg\0");
        body.extend_from_slice(&[0, 0, 0]);
        body.extend_from_slice(&4u32.to_le_bytes());
        body.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0x01]);
        let mut cdr = vec![0, 1, 0, 0];
        cdr.extend_from_slice(&body);
        assert_eq!(
            compressed_image_data(&cdr).unwrap(),
            &[0xFF, 0xD8, 0xFF, 0x01]
        );
        for n in 0..cdr.len() - 1 {
            assert!(compressed_image_data(&cdr[..n]).is_err(), "prefix {n}");
        }
        assert!(is_image(&[0xFF, 0xD8, 0xFF, 0xE0]));
        assert!(!is_image(&cdr));
    }

    /// Found by the `image_frame` fuzz target: a JPEG whose coefficients overflow in zune-jpeg's
    /// dequantisation. It must decode to something or be an error, never a panic, in every
    /// build (Cargo.toml turns zune-jpeg's overflow checks off, as upstream's `wrapping_mul`).
    #[test]
    fn a_jpeg_with_overflowing_coefficients_is_no_panic() {
        let input =
            include_bytes!("../../../fuzz/regressions/image_frame/zune-jpeg-coefficient-overflow");
        let jpeg = &input[3..];
        assert!(is_image(jpeg));
        let _ = decode_rgb(jpeg, LIMIT);
        let _ = image_tensor(
            jpeg,
            &config(Layout::Nchw, Channels::Rgb),
            &[1, 3, 8, 8],
            LIMIT,
        );
    }
}
