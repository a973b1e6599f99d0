//! Camera frames for the ai plugin: PNG/JPEG at the HTTP API, and `sensor_msgs/CompressedImage`
//! (CDR) or bare images from the zenoh pipeline, decoded and preprocessed into a tensor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin_plugin_ai::frames::{
    compressed_image_data, decode_rgb, image_tensor, is_image, Channels, ImageConfig, Layout,
};

/// Smaller than the plugin's default (64 MiB) so huge declared images cost little; the check
/// against the header is the same code whatever the value.
const LIMIT: usize = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let [mode, h, w, frame @ ..] = data else {
        return;
    };
    let layout = if mode & 1 == 0 {
        Layout::Nchw
    } else {
        Layout::Nhwc
    };
    let config = ImageConfig {
        resize: None,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        scale: 1.0 / 255.0,
        channels: if mode & 2 == 0 {
            Channels::Rgb
        } else {
            Channels::Bgr
        },
        layout,
    };
    // A model input of at most 64×64, as the model file would declare it.
    let (h, w) = (usize::from(h % 64) + 1, usize::from(w % 64) + 1);
    let shape = match layout {
        Layout::Nchw => [1, 3, h, w],
        Layout::Nhwc => [1, h, w, 3],
    };
    // The pipeline's `format = "auto"`: an image as is, anything else as CDR.
    let image = if is_image(frame) {
        frame
    } else {
        match compressed_image_data(frame) {
            Ok(image) => image,
            Err(_) => return,
        }
    };
    if mode & 4 != 0 {
        let _ = decode_rgb(image, LIMIT);
    } else if let Ok(t) = image_tensor(image, &config, &shape, LIMIT) {
        assert_eq!(t.data.len(), 3 * h * w);
    }
});
