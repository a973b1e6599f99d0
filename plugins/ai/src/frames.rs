//! What arrives from cameras and callers, turned into input tensors: PNG/JPEG decoding with the
//! model's preprocessing (resize, scale, mean/std, channel order, layout), and
//! `sensor_msgs/CompressedImage` as the ROS bridge sends it (CDR).

use crate::config::{image_dims, Channels, ImageConfig, Layout};
use crate::tensor::{Data, Tensor};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("not a PNG or JPEG image: {0}")]
    Decode(String),
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    #[error("not a sensor_msgs/CompressedImage in CDR: {0}")]
    Cdr(String),
}

/// Decodes PNG or JPEG bytes and preprocesses them for an input of `shape`.
pub fn image_tensor(
    bytes: &[u8],
    image: &ImageConfig,
    shape: &[usize],
) -> Result<Tensor, FrameError> {
    let (h, w) = image_dims(shape, image.layout).ok_or_else(|| {
        FrameError::Decode(format!("the model's input {shape:?} is not an image input"))
    })?;
    let format = image::guess_format(bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(FrameError::Decode(format!(
            "{format:?} is not supported; send PNG or JPEG"
        )));
    }
    let decoded = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| FrameError::Decode(e.to_string()))?
        .to_rgb8();
    let rgb = if decoded.dimensions() == (w as u32, h as u32) {
        decoded
    } else {
        image::imageops::resize(
            &decoded,
            w as u32,
            h as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    let mut out = vec![0f32; 3 * h * w];
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
#[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
pub fn is_image(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

/// The image bytes inside a CDR-encoded `sensor_msgs/CompressedImage`
/// (header: stamp sec/nanosec, frame_id; format; data).
#[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
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
        let t = image_tensor(&bytes, &config(Layout::Nchw, Channels::Rgb), &[1, 3, 2, 4]).unwrap();
        let Data::F32(v) = &t.data else { panic!() };
        let norm = |p: f32| (p / 255.0 - 0.5) / 0.5;
        assert!((v[3] - norm(180.0)).abs() < 1e-6); // R at (x=3, y=0)
        assert!((v[8 + 4] - norm(200.0)).abs() < 1e-6); // G at (x=0, y=1)
        assert!((v[16] - 1.0).abs() < 1e-6); // B = 255
        let t = image_tensor(&bytes, &config(Layout::Nhwc, Channels::Bgr), &[1, 2, 4, 3]).unwrap();
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
        )
        .unwrap();
        assert_eq!(t.shape, vec![1, 3, 24, 32]);
        assert!(image_tensor(
            b"garbage",
            &config(Layout::Nchw, Channels::Rgb),
            &[1, 3, 2, 2]
        )
        .is_err());
        assert!(image_tensor(
            &bytes[..40],
            &config(Layout::Nchw, Channels::Rgb),
            &[1, 3, 2, 2]
        )
        .is_err());
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
}
