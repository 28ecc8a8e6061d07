use std::path::PathBuf;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use rayon::prelude::*;

use crate::{DataError, ImageLimits, Preprocess};

/// A batch of preprocessed images, ready to become an `N × 3 × crop × crop` tensor.
#[derive(Debug)]
pub struct Batch {
    pub paths: Vec<PathBuf>,
    /// The images' normalised pixels, one CHW image after another.
    pub pixels: Vec<f32>,
    /// Each image's width and height as decoded, before resizing: maps over the input crop are put back
    /// onto the original image by them.
    pub original_sizes: Vec<(u32, u32)>,
}

impl Batch {
    /// Number of images in the batch.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// Decodes and preprocesses images in parallel on a background thread, a few batches ahead of the
/// consumer, so that decoding overlaps the forward pass. Stops at the first file it cannot read.
pub struct BatchLoader {
    receiver: Receiver<Result<Batch, DataError>>,
    producer: Option<JoinHandle<()>>,
}

impl BatchLoader {
    /// Starts loading `paths` (each decoded within `limits`) in batches of `batch_size`, keeping at most
    /// `prefetch` batches ready.
    pub fn new(paths: Vec<PathBuf>, preprocess: Preprocess, limits: ImageLimits, batch_size: usize, prefetch: usize) -> Self {
        let batch_size = batch_size.max(1);
        let (sender, receiver) = sync_channel(prefetch.max(1));
        let producer = std::thread::spawn(move || {
            for chunk in paths.chunks(batch_size) {
                let loaded: Result<Vec<_>, DataError> = chunk.par_iter().map(|p| preprocess.load(p, &limits)).collect();
                let batch = loaded.map(|images| Batch {
                    paths: chunk.to_vec(),
                    original_sizes: images.iter().map(|image| image.original_size).collect(),
                    pixels: images.into_iter().flat_map(|image| image.pixels).collect(),
                });
                let failed = batch.is_err();
                if sender.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        Self { receiver, producer: Some(producer) }
    }
}

impl Iterator for BatchLoader {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver.recv() {
            Ok(batch) => Some(batch),
            Err(_) => {
                if let Some(producer) = self.producer.take() {
                    // A panic in the producer is a bug; surface it rather than end the stream quietly.
                    if let Err(panic) = producer.join() {
                        std::panic::resume_unwind(panic);
                    }
                }
                None
            }
        }
    }
}
