//! The convolutional autoencoder: strided convolutions down to a small grid, a dense latent code, and
//! transposed convolutions back to the image. A defect it never saw in training reconstructs badly, and
//! the reconstruction error marks where it is.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{leaky_relu, sigmoid};
use burn::tensor::{Device, Tensor};

/// The autoencoder's shape.
#[derive(Config, Debug, PartialEq)]
pub struct ConvAutoencoderConfig {
    /// Side of the square input images, in pixels; a multiple of 2^(number of stages).
    #[config(default = 128)]
    pub image_size: usize,
    /// Length of the latent code.
    #[config(default = 128)]
    pub latent: usize,
    /// Channels after each stride-2 stage of the encoder (the decoder mirrors them).
    #[config(default = "vec![32, 64, 128, 256]")]
    pub channels: Vec<usize>,
}

impl ConvAutoencoderConfig {
    /// Side of the grid at the bottom of the encoder.
    pub fn grid(&self) -> usize {
        self.image_size >> self.channels.len()
    }

    /// Checks the shape can be built: sizes positive, the image divisible down to at least a 2×2 grid.
    pub fn check(&self) -> Result<(), String> {
        let stages = self.channels.len();
        // Past 16 stages the image side would pass 2^17 px; the cap also keeps the shifts below in range.
        if stages == 0 || stages > 16 || self.latent == 0 || self.channels.contains(&0) {
            return Err("the autoencoder needs 1 to 16 stages, and positive channel and latent sizes".into());
        }
        if !self.image_size.is_multiple_of(1 << stages) || self.grid() < 2 {
            return Err(format!(
                "image size {} must be a multiple of {} and at least {} for {stages} stages",
                self.image_size,
                1 << stages,
                2 << stages
            ));
        }
        Ok(())
    }

    /// The network's parameters as its model file names and shapes them, computed without building it (and
    /// `None` where a size overflows), so that a file's tensors are checked before anything is allocated.
    pub fn parameter_shapes(&self) -> Option<Vec<(String, Vec<usize>)>> {
        let top = *self.channels.last()?;
        let flat = top.checked_mul(self.grid())?.checked_mul(self.grid())?;
        let mut shapes = Vec::new();
        let mut input = 3;
        for (i, &channels) in self.channels.iter().enumerate() {
            shapes.push((format!("encoder.{i}.weight"), vec![channels, input, 4, 4]));
            shapes.push((format!("encoder.{i}.bias"), vec![channels]));
            input = channels;
        }
        shapes.push(("to_latent.weight".into(), vec![flat, self.latent]));
        shapes.push(("to_latent.bias".into(), vec![self.latent]));
        shapes.push(("from_latent.weight".into(), vec![self.latent, flat]));
        shapes.push(("from_latent.bias".into(), vec![flat]));
        let outputs = self.channels.iter().rev().skip(1).copied().chain([3]);
        for (i, channels) in outputs.enumerate() {
            shapes.push((format!("decoder.{i}.weight"), vec![input, channels, 4, 4]));
            shapes.push((format!("decoder.{i}.bias"), vec![channels]));
            input = channels;
        }
        Some(shapes)
    }

    /// Builds the network with fresh weights (seed the device first for a reproducible start).
    pub fn init(&self, device: &Device) -> ConvAutoencoder {
        let mut encoder = Vec::new();
        let mut input = 3;
        for &channels in &self.channels {
            encoder.push(
                Conv2dConfig::new([input, channels], [4, 4])
                    .with_stride([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device),
            );
            input = channels;
        }
        let top = *self.channels.last().expect("checked: at least one stage");
        let flat = top * self.grid() * self.grid();
        let mut decoder = Vec::new();
        let outputs: Vec<usize> = self.channels.iter().rev().skip(1).copied().chain([3]).collect();
        for &channels in &outputs {
            decoder.push(ConvTranspose2dConfig::new([input, channels], [4, 4]).with_stride([2, 2]).with_padding([1, 1]).init(device));
            input = channels;
        }
        ConvAutoencoder {
            encoder,
            to_latent: LinearConfig::new(flat, self.latent).init(device),
            from_latent: LinearConfig::new(self.latent, flat).init(device),
            decoder,
            top,
            grid: self.grid(),
        }
    }
}

/// The network; see [`ConvAutoencoderConfig`].
#[derive(Module, Debug)]
pub struct ConvAutoencoder {
    encoder: Vec<Conv2d>,
    to_latent: Linear,
    from_latent: Linear,
    decoder: Vec<ConvTranspose2d>,
    top: usize,
    grid: usize,
}

const SLOPE: f64 = 0.2;

impl ConvAutoencoder {
    /// The latent codes of `[batch, 3, size, size]` images in [0, 1].
    pub fn encode(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.encoder.iter().fold(images, |x, conv| leaky_relu(conv.forward(x), SLOPE));
        let [batch, ..] = x.dims();
        self.to_latent.forward(x.reshape([batch, self.top * self.grid * self.grid]))
    }

    /// Images (in [0, 1]) from latent codes.
    pub fn decode(&self, codes: Tensor<2>) -> Tensor<4> {
        let [batch, _] = codes.dims();
        let x = leaky_relu(self.from_latent.forward(codes), SLOPE).reshape([batch, self.top, self.grid, self.grid]);
        let last = self.decoder.len() - 1;
        let x = self.decoder.iter().enumerate().fold(x, |x, (i, deconv)| {
            let x = deconv.forward(x);
            if i == last { x } else { leaky_relu(x, SLOPE) }
        });
        sigmoid(x)
    }

    /// The reconstruction and the latent code of each image.
    pub fn forward(&self, images: Tensor<4>) -> (Tensor<4>, Tensor<2>) {
        let codes = self.encode(images);
        (self.decode(codes.clone()), codes)
    }
}
